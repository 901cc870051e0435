"""Inference in less memory: the levers every family's model runs on, and what tiling needs from a model.

Without autograd nothing needs a layer's intermediate tensors, so the model files' blocks hand inference to the
functions here, which give the same values (up to float summation order) while holding fewer and smaller tensors
(docs/BENCHMARKS.md, "Levers, measured"):

- `resnet_block`: SiLU and the residual add in place; on a large input GroupNorm + SiLU + conv in bands of rows
  with the whole input's statistics (`norm_silu_conv_banded`), the second conv writing over the first's output;
- `upsample_conv_banded`: nearest 2x upsampling and its conv, band by band of output rows;
- `attention`: keys and values whole, queries in blocks of ATTENTION_QUERIES tokens, the result into a buffer the
  caller may give up (`overwrite`);

The contract with `vaekit.model.tiling`: a coder that tiles is `Staged` (`body_stages()` at full resolution, `head`
at latent resolution), and every GroupNorm in its stages is this module's `GroupNorm`. Tiling runs each stage within
`given_statistics(normalise)`: there every GroupNorm normalises by `normalise(norm, x)` (a tile, with the whole
image's statistics), and the banded paths, which would compute statistics from the tile alone, stay off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convchoice import conv2d

# ---- the contract with vaekit.model.tiling -----------------------------------------------------------------------

Normalise = Callable[[nn.GroupNorm, Tensor], Tensor]
_GIVEN: ContextVar[Normalise | None] = ContextVar("vaekit_group_norm_statistics", default=None)


@contextmanager
def given_statistics(normalise: Normalise) -> Iterator[None]:
    """Within it (in this thread), every `GroupNorm` returns `normalise(norm, x)` instead of normalising x by its own
    statistics, and nothing runs banded: vaekit.model.tiling runs each stage of a tiled coder so, with the whole
    image's statistics for each tile."""
    token = _GIVEN.set(normalise)
    try:
        yield
    finally:
        _GIVEN.reset(token)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (the same parameters and checkpoint keys) whose statistics a caller may give: `given_statistics`."""

    def forward(self, x: Tensor) -> Tensor:
        normalise = _GIVEN.get()
        return super().forward(x) if normalise is None else normalise(self, x)


class Staged(nn.Module):
    """An encoder or decoder whose full-resolution part is `body_stages()`: run in order by `body`, or one
    at a time over tiles by `vaekit.model.tiling`. Shared by every architecture that tiles."""

    def body_stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def body(self, x: Tensor) -> Tensor:
        for stage in self.body_stages():
            x = stage(x)
        return x


# ---- bands of rows ---------------------------------------------------------------------------------------------

# What one band of rows holds at a time in the banded inference paths below. 8 MB bands stay in this CPU's
# caches: SD1's 512² decode ran 1.1x faster and peaked 0.67x lower than with 32 MB bands (docs/BENCHMARKS.md).
BAND_BYTES = 8 * 2**20


# Tensors up to this size run whole. Bands save memory, but each band's output is copied into place, a pass over
# memory the whole-tensor path does not make: it cost SD1's 256² decode 5-10% when another process kept a core busy
# (docs/BENCHMARKS.md, "A busy machine"), to save under 100 MB. From 64 MB on, the memory is worth it.
BANDED_FROM = 64 * 2**20


def banded(x: Tensor) -> bool:
    """Whether an inference-time norm + SiLU + conv on x runs in bands: x is large (BANDED_FROM) and spans several
    bands, and no caller gives the norms their statistics (`given_statistics`: vaekit.model.tiling)."""
    return x.numel() * x.element_size() > max(BANDED_FROM, 2 * BAND_BYTES) and _GIVEN.get() is None


def _band_rows(x: Tensor, scale: int = 1) -> int:
    """Rows per band for `x` (at `scale` times its width) so that one band holds about BAND_BYTES."""
    n, c, _, w = x.shape
    return max(2, BAND_BYTES // max(1, n * c * scale * w * x.element_size()) // 2 * 2)


STATISTICS_CHUNK = 2**20  # bytes of a group's values per step of its variance: within a core's L2 cache


def group_moments(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Variance and mean of each row (float32), by two passes: the mean from a sum, then the squared deviations a
    cache-sized chunk at a time. As exact as `torch.var_mean` (1e-7 relative on activations of mean 50 and std 20)
    and ~7x faster on a CPU, where var_mean's one-pass Welford reduction took a third as long as a convolution."""
    length = rows.shape[1]
    mean = rows.sum(dim=1) / length
    squares = torch.zeros_like(mean)
    for chunk in rows.split(max(1, STATISTICS_CHUNK // (rows.shape[0] * rows.element_size())), dim=1):
        squares += (chunk - mean[:, None]).square_().sum(dim=1)
    return squares / length, mean


def group_affine(x: Tensor, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
    """`norm(x)` as `x * scale + shift` per sample and channel (each (n, c), x's dtype), from the whole of x's
    statistics (`group_moments`): the banded inference paths normalise one band at a time with them."""
    n, c = x.shape[:2]
    var, mean = group_moments(x.reshape(n * norm.num_groups, -1).float())
    var, mean = var.view(n, -1), mean.view(n, -1)
    per = c // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per, dim=1) * norm.weight.float()
    shift = norm.bias.float() - mean.repeat_interleave(per, dim=1) * scale
    return scale.to(x.dtype), shift.to(x.dtype)


def norm_silu_conv_banded(x: Tensor, norm: nn.GroupNorm, conv: nn.Conv2d, residual: nn.Module | None = None,
                          skip: Tensor | None = None, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """conv(silu(norm(x))) [+ residual(skip)] band by band of rows: GroupNorm's statistics come from the whole
    of x first (`group_moments`), then each band (with the conv's one-row halo) is normalised and convolved
    on its own. The same values up to float summation order, without the whole normalised tensor. The result
    goes into `out` (default: a new tensor), which may be x itself (a conv that keeps the shape: each band's
    last input row is kept aside for the next band, whose halo it is) or skip (read row for row before)."""
    n, c, height, width = x.shape
    scale, shift = (t[..., None, None] for t in group_affine(x, norm))
    band = _band_rows(x)
    in_place = out is x
    above: Tensor | None = None  # in place: the input row above the band, before the previous band overwrote it
    # One buffer for every band's activations and the conv's halo rows (zero at the image's edges): no new tensor, pad
    # or cat per band. Fewer passes over memory and fewer fresh pages count most when another process shares the cores.
    buffer = x.new_empty(n, c, min(band, height) + 2, width)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        lo, hi = max(0, y0 - 1), min(height, y1 + 1)  # the rows the band's 3x3 conv reads: one above and one below
        top, bottom = int(y0 == 0), int(y1 == height)  # zero rows: the conv's padding at the image's edges
        a = buffer[:, :, : top + hi - lo + bottom]
        if top:
            a[:, :, 0].zero_()
        if bottom:
            a[:, :, -1].zero_()
        rows = a[:, :, top : top + hi - lo]
        if above is not None:
            torch.addcmul(shift, above, scale, out=rows[:, :, :1])
            torch.addcmul(shift, x[:, :, y0:hi], scale, out=rows[:, :, 1:])
        else:
            torch.addcmul(shift, x[:, :, lo:hi], scale, out=rows)
        F.silu(rows, inplace=True)
        y = conv2d(a, conv.weight, conv.bias, padding=(0, 1))
        if residual is not None and skip is not None:
            y += residual(skip[:, :, y0:y1])
        if in_place:
            above = x[:, :, y1 - 1 : y1].clone()
        if out is None:
            out = y.new_empty(n, y.shape[1], height, width)
        out[:, :, y0:y1] = y
    assert out is not None
    return out


def upsample_conv_banded(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(nearest 2x upsampling of x), computed band by band of output rows: the same values as the
    whole-image form (up to the convolution's float summation order), without the 4x-sized upsampled tensor."""
    n, c, h, w = x.shape
    height = 2 * h
    band = _band_rows(x, scale=2)
    if band >= height or 4 * x.numel() * x.element_size() <= BANDED_FROM:
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


class NormSiluConv(nn.Module):
    """conv(silu(norm(x))) as one stage (a decoder's output layers), banded in inference like a ResNet block's."""

    def __init__(self, norm: nn.GroupNorm, conv: nn.Conv2d):
        super().__init__()
        self.norm, self.conv = norm, conv

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and banded(x):
            return norm_silu_conv_banded(x, self.norm, self.conv)
        return self.conv(F.silu(self.norm(x)))


# ---- blocks without autograd -----------------------------------------------------------------------------------


def resnet_block(block: nn.Module, x: Tensor, overwrite: bool = False) -> Tensor:
    """A ResNet block (`norm1`, `conv1`, `norm2`, `conv2`, `nin_shortcut`) without autograd. On a large input
    GroupNorm + SiLU + conv run in bands of rows, so neither normalised tensor exists whole, and the second conv
    writes over the first's output, or over x with `overwrite` (the caller's own temporary; honoured when the block
    keeps the shape): besides its input the block holds one tensor of its output's size and one band. Otherwise
    SiLU and the residual add reuse their buffers (the same values; two fewer full-size tensors alive at a time)."""
    if banded(x):
        h = norm_silu_conv_banded(x, block.norm1, block.conv1)
        into = x if overwrite and h.shape == x.shape else h
        return norm_silu_conv_banded(h, block.norm2, block.conv2, residual=block.nin_shortcut, skip=x, out=into)
    h = block.conv1(F.silu(block.norm1(x), inplace=True))
    h = block.conv2(F.silu(block.norm2(h), inplace=True))
    return h.add_(block.nin_shortcut(x))


ATTENTION_QUERIES = 4096  # queries per block in inference attention: 8 MB of results at 512 channels


def attention(block: nn.Module, x: Tensor, overwrite: bool = False) -> Tensor:
    """Single-head self-attention (`norm`, 1x1 convs `q`, `k`, `v`, `proj_out`) plus its residual, without autograd:
    in blocks of ATTENTION_QUERIES tokens, normalised with the whole image's GroupNorm statistics. Keys and values
    first, then each block's queries attend and the block's result plus its residual goes to the output: x itself
    with `overwrite` (the caller's own temporary; honoured on a contiguous x), else a new tensor. Besides x and the
    output only k and v exist whole; the straightforward way also holds the normalised x, q and the attention's
    output (at 4096² each of these is 512 MB; docs/BENCHMARKS.md)."""
    out = x if overwrite and x.is_contiguous() else x.new_empty(x.shape)
    n, c, h, w = x.shape
    scale, shift = group_affine(x, block.norm)
    tokens, results = x.reshape(n, c, h * w), out.view(n, c, h * w)
    blocks = range(0, h * w, ATTENTION_QUERIES)

    def project(i: int, conv: nn.Conv2d) -> Tensor:  # (n, 1, block, c)
        y = torch.addcmul(shift[..., None], tokens[:, :, i : i + ATTENTION_QUERIES], scale[..., None])
        return F.linear(y.transpose(1, 2), conv.weight.flatten(1), conv.bias).unsqueeze(1)

    k, v = (x.new_empty(n, 1, h * w, c) for _ in range(2))
    for i in blocks:
        k[:, :, i : i + ATTENTION_QUERIES] = project(i, block.k)
        v[:, :, i : i + ATTENTION_QUERIES] = project(i, block.v)
    for i in blocks:
        a = F.scaled_dot_product_attention(project(i, block.q), k, v).squeeze(1)
        a = F.linear(a, block.proj_out.weight.flatten(1), block.proj_out.bias).transpose(1, 2)
        results[:, :, i : i + ATTENTION_QUERIES] = a.add_(tokens[:, :, i : i + ATTENTION_QUERIES])
    return out
