"""The LDM/SD autoencoder (SD1, SDXL, PixArt, SD3, Flux.1, Lumina 2), written once.

Module names follow the original LDM checkpoints (`encoder.down.0.block.1.norm1`, `mid.attn_1`,
...), so single-file checkpoints load as they are and the diffusers layout is one key mapping
away (see `vaekit.checkpoints`). Inputs are validated here, at the public methods, so every
caller (Python API, CLI, trainer) gets the same clear errors.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig, describe_channels


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; used only at latent resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        # Contiguous (tokens, channels): with a transposed view SDPA falls back to its math kernel, which
        # holds the whole tokens x tokens matrix (16 GiB for the latent of a 2048x2048 image).
        q, k, v = (t(y).reshape(n, 1, c, h * w).transpose(2, 3).contiguous() for t in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(2, 3).reshape(n, c, h, w)
        return x + self.proj_out(y)


def space_to_channel(x: Tensor, channels: int) -> Tensor:
    """Half the resolution without parameters: each 2x2 block of pixels into channels, then the
    means of consecutive channel groups down to `channels` (DC-AE's downsampling shortcut)."""
    return F.pixel_unshuffle(x, 2).unflatten(1, (channels, -1)).mean(dim=2)


def channel_to_space(x: Tensor, channels: int) -> Tensor:
    """Twice the resolution without parameters: each channel repeated, then spread over 2x2 pixels
    (DC-AE's upsampling shortcut). `space_to_channel` undoes it exactly."""
    return F.pixel_shuffle(x.repeat_interleave(4 * channels // x.shape[1], dim=1), 2)


class Downsample(nn.Module):
    """LDM's stride-2 conv; with `shortcut`, it also changes channels and adds `space_to_channel`."""

    def __init__(self, channels: int, out: int | None = None, shortcut: bool = False):
        super().__init__()
        self.out, self.shortcut = out or channels, shortcut
        self.conv = nn.Conv2d(channels, self.out, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads right/bottom only; checkpoints depend on this exact alignment.
        y = self.conv(F.pad(x, (0, 1, 0, 1)))
        return y + space_to_channel(x, self.out) if self.shortcut else y


class Upsample(nn.Module):
    """LDM's nearest-neighbour 2x then conv; with `shortcut`, DC-AE's: a conv at the low resolution to
    4x the output channels, put into 2x2 pixels (cheaper), plus `channel_to_space`."""

    def __init__(self, channels: int, out: int | None = None, shortcut: bool = False):
        super().__init__()
        self.out, self.shortcut = out or channels, shortcut
        self.conv = nn.Conv2d(channels, self.out * (4 if shortcut else 1), 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.shortcut:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.pixel_shuffle(self.conv(x), 2) + channel_to_space(x, self.out)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """The ResNet blocks of one resolution, then the resampling to the next (if any)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self._resample_name = name  # "downsample" or "upsample", as in the checkpoints
        if resample is not None:
            self.add_module(name, resample)

    @property
    def resample(self) -> nn.Module | None:
        return self._modules.get(self._resample_name)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.patch_size, self.shortcuts, self.latent_channels = cfg.patch_size, cfg.shortcuts, cfg.latent_channels
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.layers_per_block)]
            last = i == len(ch) - 1
            # With shortcuts the resampling itself moves to the next level's channel count.
            nxt = ch[i + 1] if cfg.shortcuts and not last else cout
            self.down.append(Level(blocks, None if last else Downsample(cout, nxt, cfg.shortcuts), "downsample"))
            cin = nxt
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        self.norm_out = _norm(ch[-1], g)
        moments = 2 * cfg.latent_channels if cfg.kind == "vae" else cfg.latent_channels
        self.conv_out = nn.Conv2d(ch[-1], moments, 3, padding=1)

    def body_stages(self) -> list[nn.Module]:
        """The full-resolution layers in order; `vaekit.model.tiling` runs them one at a time."""
        # Not registered as a submodule: the checkpoint key stays `encoder.conv_in`.
        stem = nn.Sequential(nn.PixelUnshuffle(self.patch_size), self.conv_in) if self.patch_size > 1 else self.conv_in
        stages: list[nn.Module] = [stem]
        for level in self.down:
            stages += list(level.block)
            if level.resample is not None:
                stages.append(level.resample)
        return stages

    def body(self, x: Tensor) -> Tensor:
        """Full-resolution part: convolutions only, so it can run in tiles."""
        for stage in self.body_stages():
            x = stage(x)
        return x

    def head(self, h: Tensor) -> Tensor:
        """Latent-resolution part, with global attention: always runs on the whole image."""
        h = self.mid(h)
        moments = self.conv_out(F.silu(self.norm_out(h)))
        if not self.shortcuts:
            return moments
        # The latent (the mean of a VAE's posterior, not its log-variance) gets the channel-group
        # means of the features: the bottleneck's shortcut.
        c = self.latent_channels
        return torch.cat([moments[:, :c] + h.unflatten(1, (c, -1)).mean(dim=2), moments[:, c:]], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.patch_size, self.shortcuts = cfg.patch_size, cfg.shortcuts
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        # Indexed like LDM: up[i] works at the resolution of encoder level i; runs from the top.
        levels: list[Level] = []
        cin = ch[-1]
        for i in reversed(range(len(ch))):
            cout = ch[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.layers_per_block + 1)]
            nxt = ch[i - 1] if cfg.shortcuts and i > 0 else cout
            levels.insert(0, Level(blocks, Upsample(cout, nxt, cfg.shortcuts) if i > 0 else None, "upsample"))
            cin = nxt
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels * cfg.patch_size**2, 3, padding=1)

    def head(self, z: Tensor) -> Tensor:
        """Latent-resolution part, with global attention: always runs on the whole latent."""
        h = self.conv_in(z)
        if self.shortcuts:  # the bottleneck's shortcut: each latent channel repeated
            h = h + z.repeat_interleave(h.shape[1] // z.shape[1], dim=1)
        return self.mid(h)

    def body_stages(self) -> list[nn.Module]:
        """The upsampling layers in order; `vaekit.model.tiling` runs them one at a time."""
        stages: list[nn.Module] = []
        for level in reversed(self.up):
            stages += list(level.block)
            if level.resample is not None:
                stages.append(level.resample)
        # Not registered as a submodule: checkpoint keys stay `decoder.norm_out` / `decoder.conv_out`.
        unpatch = [nn.PixelShuffle(self.patch_size)] if self.patch_size > 1 else []
        stages.append(nn.Sequential(self.norm_out, nn.SiLU(), self.conv_out, *unpatch))
        return stages

    def body(self, h: Tensor) -> Tensor:
        """Upsampling part: convolutions only, so it can run in tiles."""
        for stage in self.body_stages():
            h = stage(h)
        return h

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))


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
        moments = 2 * config.latent_channels if config.kind == "vae" else config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1) if config.use_post_quant_conv else None

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- encode / decode -------------------------------------------------------------------

    def encode(self, x: Tensor, pad: bool = False, tile: int | str | None = None) -> Posterior:
        """Image -> posterior. `pad=True` reflect-pads sides that are not multiples of the factor;
        `tile` (pixels, or "auto" to fit free GPU memory) runs the full-resolution layers in tiles
        with the untiled result (see `vaekit.model.tiling`)."""
        x = self._check_images(x, pad)
        size = (x.shape[-2], x.shape[-1])
        x = self._pad(x) if pad else x
        moments = self._fp16_safe(lambda t: self._moments(t, tile), x)
        if self.config.kind == "vae":
            mean, logvar = moments.chunk(2, dim=1)
            posterior = Posterior(mean, logvar)
        else:
            posterior = Posterior(moments)
        posterior.image_size = size if size != tuple(x.shape[-2:]) else None
        return posterior

    def decode(self, z: Tensor, size: tuple[int, int] | None = None, tile: int | str | None = None) -> Tensor:
        """Latent -> image. `size` crops the output (undoing encode's padding); `tile` as in encode."""
        z = self._check_latents(z)
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
        """Raw latent -> the family's unit-variance latent. The only place normalisation lives."""
        shift, scale = self._latent_affine(z)
        return (z - shift) * scale

    def denormalize(self, z: Tensor) -> Tensor:
        shift, scale = self._latent_affine(z)
        return z / scale + shift

    def to_latent(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None, pad: bool = False, tile: int | str | None = None
    ) -> Tensor:
        posterior = self.encode(x, pad=pad, tile=tile)
        return self.normalize(posterior.sample(generator) if sample else posterior.mode())

    def from_latent(self, z: Tensor, size: tuple[int, int] | None = None, tile: int | str | None = None) -> Tensor:
        return self.decode(self.denormalize(z), size=size, tile=tile)

    def _latent_affine(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # Scalars today; per-channel vectors (Qwen-Image, Flux.2) become a view(1, C, 1, 1) here.
        c = self.config
        return (torch.as_tensor(c.shift_factor, dtype=z.dtype, device=z.device),
                torch.as_tensor(c.scaling_factor, dtype=z.dtype, device=z.device))

    # ---- saving ---------------------------------------------------------------------------

    def save(self, path: str, format: str = "diffusers", dtype: torch.dtype | None = None) -> None:
        """Write a diffusers folder or one LDM-named single-file `.safetensors`."""
        from ..checkpoints import save

        save(self, path, format=format, dtype=dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- internals ------------------------------------------------------------------------

    def _moments(self, x: Tensor, tile: int | str | None) -> Tensor:
        if tile:
            from .tiling import encode_body_tiled

            h = encode_body_tiled(self.encoder, x, tile, self.config)
        else:
            h = self.encoder.body(x)
        h = self.encoder.head(h)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z: Tensor, tile: int | str | None) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.decoder.head(z)
        if tile:
            from .tiling import decode_body_tiled

            return decode_body_tiled(self.decoder, h, tile, self.config)
        return self.decoder.body(h)

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


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
