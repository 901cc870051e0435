"""`Autoencoder`: one interface over every architecture (`config.arch` picks the encoder and decoder
from the registry, `vaekit.model.architectures`), the posterior, and the latent normalisation in one place.

Inputs are validated here, at the public methods, so every caller (Python API, CLI, trainer) gets
the same clear errors.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PATCH_BN_EPS, AutoencoderConfig, describe_channels
from ..layouts import write
from .architectures import ARCHITECTURES
from .convchoice import convolutions


class Posterior:
    """Diagonal Gaussian over latents. For a plain AE it is a point mass: std 0, kl() 0."""

    def __init__(self, mean: Tensor, logvar: Tensor | None = None, image_size: tuple[int, int] | None = None):
        self.mean = mean
        self.deterministic = logvar is None
        # Same clamp as LDM/diffusers, so KL and sampling match them.
        self.logvar = torch.full_like(mean, -math.inf) if logvar is None else logvar.clamp(-30.0, 20.0)
        self.image_size = image_size  # the unpadded (H, W) when encode(pad=True) padded the input

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """mean + std * noise. A list holds one generator per image (as in diffusers), so an image's
        noise does not depend on the batch it is in."""
        if self.deterministic:
            return self.mean
        if isinstance(generator, (list, tuple)):
            if len(generator) != len(self.mean):
                raise ValueError(f"{len(generator)} generators for a batch of {len(self.mean)}; give one per image")
            eps = torch.stack([self._noise(self.mean.shape[1:], g) for g in generator])
        else:
            eps = self._noise(self.mean.shape, generator)
        return self.mean + self.std * eps

    def _noise(self, shape: torch.Size, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else self.mean.device
        return torch.randn(shape, generator=generator, device=device, dtype=self.mean.dtype).to(self.mean.device)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over latent elements: one value per image, in fp32 (a sum over
        thousands of elements loses its digits in bf16/fp16)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0], dtype=torch.float32)
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=[1, 2, 3])


class Autoencoder(nn.Module):
    """Encoder + decoder + the family's latent normalisation. Images are NCHW floats in [-1, 1]."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        c, moments = config.latent_channels, config.moment_channels
        arch = ARCHITECTURES[config.arch].model
        self.encoder = arch.Encoder(config)
        self.decoder = arch.Decoder(config)
        quant, post = arch.quant_convs(config) if hasattr(arch, "quant_convs") else (nn.Conv2d(moments, moments, 1), nn.Conv2d(c, c, 1))
        self.quant_conv = quant if config.use_quant_conv else None
        self.post_quant_conv = post if config.use_post_quant_conv else None
        if config.latent_norm == "patch_bn":  # FLUX.2: its running statistics are the normalisation
            self.bn = nn.BatchNorm2d(4 * c, eps=PATCH_BN_EPS, momentum=0.1, affine=False, track_running_stats=True)

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def dtype(self) -> torch.dtype:
        first = next(self.parameters(), None)  # pixel space has no parameters: it computes in fp32
        return first.dtype if first is not None else torch.float32

    @property
    def device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    # ---- encode / decode -------------------------------------------------------------------

    def encode(self, x: Tensor, pad: bool = False, tile: int | str | None = None, conv: str | None = None) -> Posterior:
        """Image -> posterior. `pad=True` reflect-pads sides that are not multiples of the factor;
        `tile` (pixels, or "auto" to fit free GPU memory) runs the full-resolution layers in tiles
        with the untiled result (see `vaekit.model.tiling`). `conv` picks CPU inference's convolutions:
        "auto" (the default: the faster of direct and Winograd per layer shape, measured once on this
        machine), "direct" (PyTorch's own, bit-stable) or "winograd" (`vaekit.model.convolutions`)."""
        x = self._check_images(x, pad)
        size = (x.shape[-2], x.shape[-1])
        x = self._pad(x) if pad else x
        with convolutions(conv):
            moments = self._fp16_safe(lambda t: self._moments(t, tile), x)
        if self.config.kind == "vae":
            mean, logvar = moments.chunk(2, dim=1)
            posterior = Posterior(mean, logvar)
        else:
            posterior = Posterior(moments)
        posterior.image_size = size if size != tuple(x.shape[-2:]) else None
        return posterior

    def decode(self, z: Tensor, size: tuple[int, int] | None = None, tile: int | str | None = None,
               conv: str | None = None) -> Tensor:  # fmt: skip
        """Latent -> image. `size` crops the output (undoing encode's padding); `tile` and `conv` as in encode."""
        z = self._check_latents(z)
        with convolutions(conv):
            x = self._fp16_safe(lambda t: self._decode(t, tile), z)
        return x[..., : size[0], : size[1]] if size is not None else x

    def forward(
        self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | list[torch.Generator] | None = None,
        pad: bool = False,
    ) -> tuple[Tensor, Posterior]:
        posterior = self.encode(x, pad=pad)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, size=posterior.image_size), posterior

    # ---- the latent space a diffusion model sees -------------------------------------------

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latent (what `encode` gives) -> the family's unit-variance latent (what its diffusion
        model sees). See `AutoencoderConfig.latent_norm` and `normalize_latents`."""
        return normalize_latents(z, self.config, self.bn_stats())

    def normalised_layout(self, t: Tensor) -> Tensor:
        """A tensor shaped like `encode`'s latents, in the layout of normalised latents: FLUX.2's 2x2
        patches (channel c*4 + 2*dy + dx at half the side); unchanged for every other family."""
        return normalised_layout(t, self.config)

    def denormalize(self, z: Tensor) -> Tensor:
        return denormalize_latents(z, self.config, self.bn_stats())

    def bn_stats(self) -> tuple[Tensor, Tensor] | None:
        """FLUX.2's normalisation statistics (running mean and variance of its patch BatchNorm); None for other families."""
        return (self.bn.running_mean, self.bn.running_var) if self.config.latent_norm == "patch_bn" else None

    def to_latent(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None, pad: bool = False, tile: int | str | None = None,
        conv: str | None = None,
    ) -> Tensor:
        """What the family's diffusion model sees: the normalised posterior mode (or a sample). FLUX.2:
        128 channels at 1/16 of the side, as BFL's `AutoEncoder.encode`; others: `encode`'s shape."""
        posterior = self.encode(x, pad=pad, tile=tile, conv=conv)
        return self.normalize(posterior.sample(generator) if sample else posterior.mode())

    def from_latent(self, z: Tensor, size: tuple[int, int] | None = None, tile: int | str | None = None,
                    conv: str | None = None) -> Tensor:  # fmt: skip
        return self.decode(self.denormalize(z), size=size, tile=tile, conv=conv)

    # ---- saving ---------------------------------------------------------------------------

    def save(self, path: str, format: str = "diffusers", dtype: torch.dtype | None = None) -> None:
        """`vaekit.save(self, ...)`: a diffusers folder or one single-file `.safetensors` (`vaekit.layouts.write`)."""
        write(self.state_dict(), self.config, ARCHITECTURES[self.config.arch].layout, path, format, dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- internals ------------------------------------------------------------------------

    def _moments(self, x: Tensor, tile: int | str | None) -> Tensor:
        if not hasattr(self.encoder, "body"):  # no full-resolution stages to tile (pixel space; DC-AE refuses)
            self._untiled(self.encoder, tile)
            return self.encoder(x)
        if tile:
            from .tiling import encode_body_tiled

            h = encode_body_tiled(self.encoder, x, tile, self.config)
        else:
            h = self.encoder.body(x)
        h = self.encoder.head(h)
        moments = self.quant_conv(h) if self.quant_conv is not None else h
        # A path from the image around the encoder and its quant conv, where the architecture has one (vaekit.model.fast).
        return self.encoder.bypass(x, moments) if hasattr(self.encoder, "bypass") else moments

    def _decode(self, z: Tensor, tile: int | str | None) -> Tensor:
        if not hasattr(self.decoder, "body"):
            self._untiled(self.decoder, tile)
            return self.decoder(z)
        h = self.decoder.head(self.post_quant_conv(z) if self.post_quant_conv is not None else z)
        if tile:
            from .tiling import decode_body_tiled

            x = decode_body_tiled(self.decoder, h, tile, self.config)
        else:
            x = self.decoder.body(h)
        return self.decoder.bypass(z, x) if hasattr(self.decoder, "bypass") else x

    def _untiled(self, coder: nn.Module, tile: int | str | None) -> None:
        """A coder that cannot be tiled exactly says why (`NOT_TILED`); asked to tile, it refuses rather than
        run untiled unasked (memory) or tiled inexactly. Pixel space has nothing to tile and ignores `tile`."""
        why = getattr(coder, "NOT_TILED", None)
        if tile and why:
            raise ValueError(f"cannot tile this model (tile {tile!r} asked): {why}")

    def _fp16_safe(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Run fn; if an fp16 model overflowed (the SDXL-VAE NaN problem), redo it in fp32."""
        out = fn(x)
        if self.dtype != torch.float16 or bool(torch.isfinite(out).all()):
            return out
        _warn_once(
            "fp16 activations overflowed (non-finite output); recomputing this call in fp32. "
            "Use bf16 or fp32 to avoid the extra cost, or a fp16-fixed VAE (e.g. madebyollin/sdxl-vae-fp16-fix)."
        )
        with self._as_fp32():
            out = fn(x.float())
        return out.to(torch.float16) if bool(torch.isfinite(out.to(torch.float16)).all()) else out

    @contextlib.contextmanager
    def _as_fp32(self) -> Iterator[None]:
        dtype = self.dtype
        self.float()
        try:
            yield
        finally:
            self.to(dtype)

    def _pad(self, x: Tensor) -> Tensor:
        f = self.factor
        ph, pw = -x.shape[-2] % f, -x.shape[-1] % f
        if not (ph or pw):
            return x
        # Reflect needs the pad to be smaller than the side; tiny images fall back to replicate.
        mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def _check_images(self, x: Tensor, pad: bool) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"images must be floats in [-1, 1], got {x.dtype}; convert uint8 images with x.float() / 127.5 - 1"
            )
        if x.ndim != 4:
            hint = " (add a batch dimension with x[None])" if x.ndim == 3 else ""
            raise ValueError(f"images must be NCHW, got shape {tuple(x.shape)}{hint}")
        c = self.config.in_channels
        if x.shape[1] != c:
            if x.shape[-1] == c:
                hint = ": this looks like NHWC; x.permute(0, 3, 1, 2) makes it NCHW"
            elif x.shape[1] == 1 and c == 3:
                hint = ": for grey images repeat the channel, x.expand(-1, 3, -1, -1)"
            elif x.shape[1] == 3 and c == 4:
                hint = (": the model takes RGBA; read images with vaekit.data.read_image(alpha=True), as every vaekit "
                        "command does for a 4-channel model")
            else:
                hint = " (images are NCHW)"
            raise ValueError(f"images have {x.shape[1]} channel{'s' if x.shape[1] != 1 else ''}, the model expects {c}{hint}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or Inf values")
        f = self.factor
        if not pad:
            for name, side in (("height", x.shape[-2]), ("width", x.shape[-1])):
                if side % f:
                    lo, hi = side - side % f, side - side % f + f
                    choices = f"{lo} or {hi}" if lo > 0 else f"{hi}"
                    raise ValueError(
                        f"image {name} {side} is not a multiple of the model's factor {f}: use {choices}, or pad=True"
                    )
        if x.numel() and float(x.detach().abs().amax()) > 1.5:
            _warn_once("image values go far outside [-1, 1]; vaekit expects x / 127.5 - 1 for uint8 images")
        return x.to(self.dtype)

    def _check_latents(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or not z.is_floating_point():
            raise TypeError(f"latents must be a float tensor, got {getattr(z, 'dtype', type(z).__name__)}")
        if z.ndim != 4:
            raise ValueError(f"latents must be NCHW, got shape {tuple(z.shape)}")
        want = self.config.latent_channels
        if z.shape[1] != want:
            raise ValueError(
                f"{describe_channels(z.shape[1], 'latent')} given to a {describe_channels(want, 'model')}; "
                f"decode it with a model whose latent_channels is {z.shape[1]}"
            )
        if not bool(torch.isfinite(z).all()):
            raise ValueError("latents contain NaN or Inf values")
        return z.to(self.dtype)


# ---- the latent normalisation, the one place it lives ------------------------------------------
# Functions of the config (and FLUX.2's BatchNorm statistics), so a latent dataset applies its model's
# normalisation on read without building the model (vaekit.latents).


def normalised_layout(t: Tensor, config: AutoencoderConfig) -> Tensor:
    return F.pixel_unshuffle(t, 2) if config.latent_norm == "patch_bn" else t


def normalize_latents(z: Tensor, config: AutoencoderConfig, bn_stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Raw latents -> what the family's diffusion model sees (`AutoencoderConfig.latent_norm`)."""
    z = normalised_layout(z, config)
    shift, scale = _latent_affine(z, config, bn_stats)
    return (z - shift) * scale


def denormalize_latents(z: Tensor, config: AutoencoderConfig, bn_stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    channels = config.normalised_shape[0]
    if z.ndim != 4 or z.shape[1] != channels:
        raise ValueError(f"normalised latents of this model have {channels} channels (NCHW), got shape {tuple(z.shape)}")
    shift, scale = _latent_affine(z, config, bn_stats)
    z = z / scale + shift
    return F.pixel_shuffle(z, 2) if config.latent_norm == "patch_bn" else z


def _latent_affine(z: Tensor, c: AutoencoderConfig, bn_stats: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """(shift, scale) with (z - shift) * scale normalised: scalars, or (1, C, 1, 1) per channel."""
    if c.latent_norm == "patch_bn":
        if bn_stats is None:
            raise ValueError("FLUX.2-style latents need the model's BatchNorm statistics to be normalised")
        shift, scale = bn_stats[0], torch.rsqrt(bn_stats[1].float() + PATCH_BN_EPS)
    elif c.latent_norm == "channel":
        shift, scale = torch.tensor(c.latents_mean), c.scaling_factor / torch.tensor(c.latents_std, dtype=torch.float64)
    else:
        return (torch.as_tensor(c.shift_factor, dtype=z.dtype, device=z.device),
                torch.as_tensor(c.scaling_factor, dtype=z.dtype, device=z.device))  # fmt: skip
    return (shift.to(z.device, z.dtype).view(1, -1, 1, 1), scale.to(z.device, z.dtype).view(1, -1, 1, 1))


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
