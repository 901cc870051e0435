"""The LDM/SD encoder and decoder (SD1, SDXL, PixArt, SD3, FLUX.1, FLUX.2, Lumina 2), written once.

Module names follow the original LDM checkpoints (`encoder.down.0.block.1.norm1`, `mid.attn_1`,
...), so single-file checkpoints load as they are and the diffusers layout is one key mapping
away (see `vaekit.checkpoints`). `body` (full resolution, convolutions only) and `head` (latent
resolution, global attention) are split so `vaekit.model.tiling` can tile the body.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig

_WINOGRAD: ContextVar[bool] = ContextVar("vaekit_winograd", default=False)


@contextmanager
def winograd(enabled: bool = True) -> Iterator[None]:
    """Within it, CPU fp32 inference runs every 3x3 stride-1 convolution by NNPACK's Winograd F(6x6, 3x3)
    transform: SD1's layers run 2-2.6x faster than oneDNN's direct convolution on an AVX2 CPU (the whole model
    1.3-1.4x), with ~1e-5 relative error per convolution instead of ~1e-7 (SD1 ends within 4e-5 of diffusers;
    docs/BENCHMARKS.md). Opt-in, like a reduced precision; training, GPUs and other dtypes are untouched."""
    if enabled and not torch._nnpack_available():
        warnings.warn("this PyTorch build has no NNPACK: --winograd has no effect, convolutions run as usual", stacklevel=3)
    token = _WINOGRAD.set(enabled)
    try:
        yield
    finally:
        _WINOGRAD.reset(token)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int | tuple[int, ...] = 1,
           padding: int | tuple[int, ...] = 0) -> Tensor:  # fmt: skip
    """F.conv2d, or NNPACK's Winograd convolution where `winograd` is on and it applies."""
    pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
    # _nnpack_available() last: it is also NNPACK's one-time initialisation, without which its convolution fails.
    if (_WINOGRAD.get() and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and weight.shape[-2:] == (3, 3) and stride in (1, (1, 1))
            and torch._nnpack_available()):  # fmt: skip
        return torch._nnpack_spatial_convolution(x, weight, bias, list(pad))
    return F.conv2d(x, weight, bias, stride, pad)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and checkpoint keys) that runs through `conv2d`: Winograd under `winograd`."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        assert self.padding_mode == "zeros" and self.dilation == (1, 1) and self.groups == 1
        return conv2d(x, weight, bias, self.stride, self.padding)  # type: ignore[arg-type]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, *, overwrite: bool = False) -> Tensor:
        """`overwrite` (honoured in banded inference when the block keeps the shape) writes the result into x:
        the caller's own temporary, one activation less."""
        inplace = not torch.is_grad_enabled()
        # Inference on a large input: GroupNorm + SiLU + conv in bands of rows, so neither normalised tensor
        # exists whole, and the second conv writes over the first's output (or over x): besides its input, the
        # block holds one tensor of its output's size and one band (docs/BENCHMARKS.md).
        if inplace and _banded(x, self.norm1):
            h = norm_silu_conv_banded(x, self.norm1, self.conv1)
            into = x if overwrite and h.shape == x.shape else h
            return norm_silu_conv_banded(h, self.norm2, self.conv2, residual=self.nin_shortcut, skip=x, out=into)
        # Without autograd nothing needs the intermediate tensors: SiLU and the residual add reuse their
        # buffers (the same values; two fewer full-size tensors alive at a time).
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(self.nin_shortcut(x)) if inplace else self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; used only at latent resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, *, overwrite: bool = False) -> Tensor:
        """`overwrite` (honoured without autograd, on a contiguous x) writes the result into x: the caller's own
        temporary, one activation less."""
        if not torch.is_grad_enabled():
            return self._in_blocks(x, x if overwrite and x.is_contiguous() else x.new_empty(x.shape))
        n, c, h, w = x.shape
        # Tokens-major (n, 1, tokens, channels) straight out of the projections, contiguous: with a transposed
        # view SDPA falls back to its math kernel, which holds the whole tokens x tokens matrix (16 GiB for the
        # latent of a 2048x2048 image). A 1x1 conv is a matmul over channels: no copies to change the layout.
        y = self.norm(x).flatten(2).transpose(1, 2).unsqueeze(1)
        q, k, v = (F.linear(y, p.weight.flatten(1), p.bias) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = F.linear(y, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + y.view(n, h * w, c).transpose(1, 2).view(n, c, h, w)

    def _in_blocks(self, x: Tensor, out: Tensor) -> Tensor:
        """Inference in blocks of ATTENTION_QUERIES tokens, normalised with the whole image's GroupNorm statistics:
        keys and values first, then each block's queries attend and the block's result plus its residual goes to
        `out`. Besides x and out only k and v exist whole; the straightforward way also holds the normalised x,
        q and the attention's output (at 4096² each of these is 512 MB; docs/BENCHMARKS.md)."""
        n, c, h, w = x.shape
        scale, shift = group_affine(x, self.norm)
        tokens, results = x.reshape(n, c, h * w), out.view(n, c, h * w)
        blocks = range(0, h * w, ATTENTION_QUERIES)

        def project(i: int, conv: nn.Conv2d) -> Tensor:  # (n, 1, block, c)
            y = torch.addcmul(shift[..., None], tokens[:, :, i : i + ATTENTION_QUERIES], scale[..., None])
            return F.linear(y.transpose(1, 2), conv.weight.flatten(1), conv.bias).unsqueeze(1)

        k, v = (x.new_empty(n, 1, h * w, c) for _ in range(2))
        for i in blocks:
            k[:, :, i : i + ATTENTION_QUERIES] = project(i, self.k)
            v[:, :, i : i + ATTENTION_QUERIES] = project(i, self.v)
        for i in blocks:
            a = F.scaled_dot_product_attention(project(i, self.q), k, v).squeeze(1)
            a = F.linear(a, self.proj_out.weight.flatten(1), self.proj_out.bias).transpose(1, 2)
            results[:, :, i : i + ATTENTION_QUERIES] = a.add_(tokens[:, :, i : i + ATTENTION_QUERIES])
        return out


ATTENTION_QUERIES = 4096  # queries per block in inference attention: 8 MB of results at 512 channels


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
        self.conv = Conv2d(channels, self.out, 3, stride=2, padding=0)

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
        self.conv = Conv2d(channels, self.out * (4 if shortcut else 1), 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut:
            return F.pixel_shuffle(self.conv(x), 2) + channel_to_space(x, self.out)
        if not torch.is_grad_enabled():  # inference: never hold the whole 2x image, only a band of it
            return upsample_conv_banded(x, self.conv)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# What one band of rows holds at a time in the banded inference paths below. 8 MB bands stay in this CPU's
# caches: SD1's 512² decode ran 1.1x faster and peaked 0.67x lower than with 32 MB bands (docs/BENCHMARKS.md).
BAND_BYTES = 8 * 2**20


def upsample_conv_banded(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(nearest 2x upsampling of x), computed band by band of output rows: the same values as the
    whole-image form (up to the convolution's float summation order), without the 4x-sized upsampled tensor."""
    n, c, h, w = x.shape
    height = 2 * h
    band = _band_rows(x, scale=2)
    if band >= height:
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out: Tensor | None = None
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        lo, hi = max(0, y0 - 1), min(height, y1 + 1)  # upsampled rows the band's 3x3 conv reads
        a, b = lo // 2, (hi + 1) // 2  # the input rows that make them
        up = F.interpolate(x[:, :, a:b], scale_factor=2.0, mode="nearest")[:, :, lo - 2 * a : hi - 2 * a]
        up = F.pad(up, (0, 0, int(y0 == 0), int(y1 == height)))  # the conv's zero padding at the image's edges
        y = conv2d(up, conv.weight, conv.bias, padding=(0, 1))
        if out is None:
            out = y.new_empty(n, y.shape[1], height, 2 * w)
        out[:, :, y0:y1] = y
    assert out is not None
    return out


def _band_rows(x: Tensor, scale: int = 1) -> int:
    """Rows per band for `x` (at `scale` times its width) so that one band holds about BAND_BYTES."""
    n, c, _, w = x.shape
    return max(2, BAND_BYTES // max(1, n * c * scale * w * x.element_size()) // 2 * 2)


def _banded(x: Tensor, norm: nn.GroupNorm) -> bool:
    """Whether an inference-time norm + SiLU + conv on x runs in bands: x spans several bands and
    vaekit.model.tiling has not replaced the norm's forward (it brings its own whole-image statistics)."""
    return x.numel() * x.element_size() > 2 * BAND_BYTES and "forward" not in vars(norm)


class NormSiluConv(nn.Module):
    """conv(silu(norm(x))): the decoder's output layers, banded in inference like a ResnetBlock's."""

    def __init__(self, norm: nn.GroupNorm, conv: nn.Conv2d):
        super().__init__()
        self.norm, self.conv = norm, conv

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and _banded(x, self.norm):
            return norm_silu_conv_banded(x, self.norm, self.conv)
        return self.conv(F.silu(self.norm(x)))


def group_affine(x: Tensor, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
    """`norm(x)` as `x * scale + shift` per sample and channel (each (n, c), x's dtype), from the whole of x's
    statistics (float32 `var_mean`): the banded inference paths normalise one band at a time with them."""
    n, c = x.shape[:2]
    var, mean = torch.var_mean(x.reshape(n, norm.num_groups, -1).float(), dim=-1, correction=0)
    per = c // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per, dim=1) * norm.weight.float()
    shift = norm.bias.float() - mean.repeat_interleave(per, dim=1) * scale
    return scale.to(x.dtype), shift.to(x.dtype)


def norm_silu_conv_banded(x: Tensor, norm: nn.GroupNorm, conv: nn.Conv2d, residual: nn.Module | None = None,
                          skip: Tensor | None = None, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """conv(silu(norm(x))) [+ residual(skip)] band by band of rows: GroupNorm's statistics come from the whole
    of x first (float32 `var_mean`), then each band (with the conv's one-row halo) is normalised and convolved
    on its own. The same values up to float summation order, without the whole normalised tensor. The result
    goes into `out` (default: a new tensor), which may be x itself (a conv that keeps the shape: each band's
    last input row is kept aside for the next band, whose halo it is) or skip (read row for row before)."""
    n, c, height, _ = x.shape
    scale, shift = (t[..., None, None] for t in group_affine(x, norm))
    band = _band_rows(x)
    in_place = out is x
    above: Tensor | None = None  # in place: the input row above the band, before the previous band overwrote it
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        hi = min(height, y1 + 1)  # the rows the band's 3x3 conv reads: one above and one below
        if y0 == 0:
            rows = x[:, :, :hi]
        else:
            rows = torch.cat([above, x[:, :, y0:hi]], dim=2) if above is not None else x[:, :, y0 - 1 : hi]
        a = F.silu(torch.addcmul(shift, rows, scale), inplace=True)
        a = F.pad(a, (0, 0, int(y0 == 0), int(y1 == height)))  # the conv's zero padding at the image's edges
        y = conv2d(a, conv.weight, conv.bias, padding=(0, 1))
        if residual is not None and skip is not None:
            y += residual(skip[:, :, y0:y1])
        if in_place:
            above = x[:, :, y1 - 1 : y1].clone()
        if out is None:
            out = y.new_empty(n, y.shape[1], height, x.shape[3])
        out[:, :, y0:y1] = y
    assert out is not None
    return out


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor, *, overwrite: bool = False) -> Tensor:
        """`overwrite`: x is the caller's temporary, and inference may write into it. Either way every later
        step writes over the running tensor (block_1's result is this block's own), so the mid block holds
        one activation besides its input (none with `overwrite`), plus attention's keys and values."""
        h = self.block_1(x, overwrite=overwrite)
        if isinstance(self.attn_1, AttnBlock):
            h = self.attn_1(h, overwrite=True)
        return self.block_2(h, overwrite=True)


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


class Staged(nn.Module):
    """An encoder or decoder whose full-resolution part is `body_stages()`: run in order by `body`, or one
    at a time over tiles by `vaekit.model.tiling`. Shared by every architecture that tiles."""

    def body_stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def body(self, x: Tensor) -> Tensor:
        for stage in self.body_stages():
            x = stage(x)
        return x


class Encoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.patch_size, self.shortcuts, self.latent_channels = cfg.patch_size, cfg.shortcuts, cfg.latent_channels
        self.conv_in = Conv2d(cfg.in_channels * cfg.patch_size**2, ch[0], 3, padding=1)
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
        self.conv_out = Conv2d(ch[-1], moments, 3, padding=1)

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


class Decoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.patch_size, self.shortcuts, self.patch_out = cfg.patch_size, cfg.shortcuts, cfg.patch_out
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
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
        per_position = cfg.patch_size**2 if cfg.patch_out == "shuffle" else 1
        self.conv_out = Conv2d(ch[0], cfg.out_channels * per_position, 3, padding=1)

    def head(self, z: Tensor) -> Tensor:
        """Latent-resolution part, with global attention: always runs on the whole latent."""
        h = self.conv_in(z)
        if self.shortcuts:  # the bottleneck's shortcut: each latent channel repeated
            h = h + z.repeat_interleave(h.shape[1] // z.shape[1], dim=1)
        return self.mid(h, overwrite=True)  # h is the head's own

    def body_stages(self) -> list[nn.Module]:
        """The upsampling layers in order; `vaekit.model.tiling` runs them one at a time."""
        stages: list[nn.Module] = []
        for level in reversed(self.up):
            stages += list(level.block)
            if level.resample is not None:
                stages.append(level.resample)
        # Not registered as a submodule: checkpoint keys stay `decoder.norm_out` / `decoder.conv_out`.
        if self.patch_size == 1:
            stages.append(NormSiluConv(self.norm_out, self.conv_out))
        elif self.patch_out == "nearest":
            stages.append(nn.Sequential(self.norm_out, nn.SiLU(), nn.Upsample(scale_factor=self.patch_size), self.conv_out))
        else:
            stages.append(nn.Sequential(NormSiluConv(self.norm_out, self.conv_out), nn.PixelShuffle(self.patch_size)))
        return stages

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))
