"""Tiled encode/decode that gives the untiled result, with accelerator memory bounded by one tile.

Other tools run the whole network per tile and blend the overlaps. Each tile then normalises with
its own GroupNorm statistics (tone shifts from tile to tile) and sees too little context at its
edges (seams). Here the full-resolution body runs one stage at a time (each ResNet block, each
resample, the decoder's output layers: the model's own modules, from `body_stages()`):

- Tiles partition the image (their *cores*, aligned to the model's factor so every stride-2 grid
  lines up). A tile is its core plus a halo of the stage's receptive field: one pixel per 3x3 conv
  at the stage's input, rounded up to even. Only the core of each result is kept, so every output
  pixel sees exactly the input it sees untiled; at the image border the model's own zero padding
  applies, as untiled. Cores are exact, so overlaps hold identical values and need no blending.
- Between stages the whole-image activation is kept on the *store* device (CPU when the model is on
  an accelerator), so the accelerator holds one tile at a time. In RAM this costs the input and
  output activations of one stage, unless they are *spilled*: kept in memory-mapped files whose pages
  the process releases after every tile (the kernel's page cache holds them, writing them to disk when
  memory runs short), so resident memory stays near one tile's. That happens by itself when a stage's
  two activations would take more than half of the available RAM (SD's decoder at 4096²: 24 GiB), or
  on request (`spill=`).
- GroupNorm uses statistics of the whole image: a stage runs over all tiles up to its first norm
  whose statistics are unknown, which adds up the tile cores (per sample and group, combined in
  float64), stops the tile, and the stage runs again with that norm known. A ResNet block therefore
  costs about 1.5 of its plain compute. The norms get these statistics through
  `vaekit.model.lean.given_statistics`, which also keeps the banded inference paths off.
- A video network's activations may carry frames, (N, C, T, H, W) (Hunyuan Image 3.0's VAE runs an
  image as a clip): tiles split rows and columns only, every frame whole, and GroupNorm's statistics
  span the frames as they do untiled.

The latent-resolution heads (mid block with global attention) run untiled in `Autoencoder`.
Tiling is meant for inference (`torch.no_grad()`/`inference_mode()`); docs/TILING.md has the
measured agreement, cost and memory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import AutoencoderConfig
from .architectures import ARCHITECTURES
from .lean import GroupNorm, Staged, given_statistics

# A stage's working set, in copies of its tile input and output: a ResNet block holds its input, the
# normalised input, the SiLU and a conv output at once; an upsample its input, the upsampled copy and
# the conv output. (2, 3) covers both; bench/tiling.py checks the estimate against measured peaks.
_LIVE_INPUTS, _LIVE_OUTPUTS = 2, 3
# Share of free accelerator memory that tile="auto" plans for; the rest is for the allocator's slack.
_AUTO_SHARE = 0.8


def encode_body_tiled(
    encoder: Staged,
    x: Tensor,
    tile: int | str,
    config: AutoencoderConfig,
    *,
    whole_image_stats: bool = True,
    offload: bool | None = None,
    spill: Spill = None,
) -> Tensor:
    """`encoder.body(x)` in tiles of `tile` image pixels (or "auto"). `whole_image_stats=False`
    gives the per-tile GroupNorm statistics of other tools, for comparison; `offload` keeps the
    between-stage activations on the CPU (default: when x is on an accelerator); `spill` keeps them
    in memory-mapped files: in that folder, True for the system's temporary folder, False never,
    None (default) when they would not fit in half the available RAM."""
    return _run_tiled(encoder.body_stages(), x, tile, config, config.factor, whole_image_stats, offload, spill)


def decode_body_tiled(
    decoder: Staged,
    h: Tensor,
    tile: int | str,
    config: AutoencoderConfig,
    *,
    whole_image_stats: bool = True,
    offload: bool | None = None,
    spill: Spill = None,
) -> Tensor:
    """`decoder.body(h)` (h: the head's output at latent resolution) in tiles of `tile` image pixels;
    options as in `encode_body_tiled`."""
    return _run_tiled(decoder.body_stages(), h, tile, config, 1, whole_image_stats, offload, spill)


def tile_memory(config: AutoencoderConfig, tile: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Estimated accelerator bytes for one interior tile of `tile` pixels (encode or decode, whichever
    needs more). Excludes the untiled latent-resolution heads and the convolution workspace."""
    worst = 0
    for core, stages in zip(((tile // config.factor) * config.factor, tile // config.factor), _stage_shapes(config)):
        for halo, c_in, c_out, scale in stages:
            side = core + 2 * halo
            worst = max(worst, _LIVE_INPUTS * c_in * side**2 + _LIVE_OUTPUTS * c_out * int(side * scale) ** 2)
            core = int(core * scale)
    return worst * batch * dtype.itemsize


def tile_size_for_budget(
    config: AutoencoderConfig, budget_bytes: int, batch: int = 1, dtype: torch.dtype = torch.float32
) -> int:
    """The largest tile side (pixels, a multiple of the factor) whose `tile_memory` fits the budget."""
    f = config.factor

    def fits(latent_side: int) -> bool:
        return tile_memory(config, latent_side * f, batch, dtype) <= budget_bytes

    if not fits(1):
        need = tile_memory(config, f, batch, dtype)
        raise ValueError(f"a memory budget of {budget_bytes / 2**20:.1f} MiB is too small: the smallest tile ({f} px) needs {need / 2**20:.1f} MiB")
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * f


# ---- internals ----------------------------------------------------------------------------------


def _run_tiled(
    stages: list[nn.Module],
    x: Tensor,
    tile: int | str,
    config: AutoencoderConfig,
    unit: int,
    whole_image_stats: bool,
    offload: bool | None,
    spill: Spill,
) -> Tensor:
    """Run `stages` over x in tiles; `unit` is x's pixels per latent pixel."""
    side = _latent_tile(tile, config, x)
    height, width = x.shape[-2] // unit, x.shape[-1] // unit  # latent pixels
    if side is None or (height <= side and width <= side):  # "auto" off an accelerator, or one tile
        for stage in stages:
            x = stage(x)
        return x
    rows, cols = _split(height, side), _split(width, side)
    device = x.device
    if offload is None:
        offload = device.type != "cpu"
    store = torch.device("cpu") if offload else device
    maps: _Maps = {}
    for stage in stages:
        y, unit = _run_stage(stage, x, rows, cols, unit, device, store, whole_image_stats, spill, maps)
        if _mapping(x, maps) is not None:  # a spilled input's file (its disk and its mapping) goes with the tensor:
            del maps[x.untyped_storage().data_ptr()]  # the files on disk are a stage's input and output, not all
        x = y
    return x.clone() if _mapping(x, maps) is not None else x.to(device)  # the image itself leaves the file


def _run_stage(
    stage: nn.Module,
    src: Tensor,
    rows: list[tuple[int, int]],
    cols: list[tuple[int, int]],
    unit: int,
    device: torch.device,
    store: torch.device,
    whole_image_stats: bool,
    spill: Spill,
    maps: _Maps,
) -> tuple[Tensor, int]:
    """One stage over all tiles of src; returns the whole output (on `store`) and its unit."""
    halo = _halo(stage)
    norms = _WholeImageNorms(stage) if whole_image_stats else None
    height, width = src.shape[-2:]
    out: Tensor | None = None
    out_unit = unit
    with given_statistics(norms.normalise) if norms else contextlib.nullcontext():
        while True:
            for (r0, r1), (c0, c1) in itertools.product(rows, cols):
                (y0, y1), (ya, yb) = _window(r0 * unit, r1 * unit, halo, height)
                (x0, x1), (xa, xb) = _window(c0 * unit, c1 * unit, halo, width)
                if norms:
                    norms.core = (slice(ya, yb), slice(xa, xb))
                piece = src[..., y0:y1, x0:x1]
                if _mapping(src, maps) is not None:  # copy the tile out of the file
                    piece = _copy(torch.empty_like(piece, memory_format=torch.contiguous_format), piece, src, maps)
                try:
                    y = stage(piece.to(device))
                except _StatsPending:
                    continue
                finally:
                    del piece
                # Resolution change of this stage: 1/2 (downsample), 1, or 2 (upsample).
                num, den = y.shape[-1], x1 - x0
                out_unit = unit * num // den
                if out is None:  # y: (N, C, H, W), or (N, C, T, H, W) for a video network's frames
                    out = _allocate((*y.shape[:-2], height * num // den, width * num // den), y.dtype, store, src, spill, maps)
                core = y[..., ya * num // den : yb * num // den, xa * num // den : xb * num // den]
                _copy(out[..., r0 * out_unit : r1 * out_unit, c0 * out_unit : c1 * out_unit], core, out, maps)
                del y, core
            if norms is None or norms.gathering is None:
                break
            norms.finish()
    assert out is not None
    return out, out_unit


# ---- spilling whole-image activations to memory-mapped files ----------------------------------------

Spill = str | Path | bool | None  # a folder, True (the temporary folder), False (never), None (when needed)
_SPILL_SHARE = 0.5  # spill when a stage's input and output would take more than this share of available RAM
_Maps = dict[int, mmap.mmap]  # storage address of a spilled tensor -> its mapping (the tensor keeps it alive)


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, store: torch.device, src: Tensor, spill: Spill, maps: _Maps) -> Tensor:
    """An empty whole-image tensor: in RAM (or on the accelerator), or in an unlinked file under the
    spill folder, mapped shared, so its pages can leave the process and stay in the page cache."""
    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    if store.type != "cpu" or spill is False:
        return torch.empty(shape, dtype=dtype, device=store)
    if spill is None:
        available = _available_ram()
        if available is None or nbytes + src.numel() * src.element_size() <= _SPILL_SHARE * available:
            return torch.empty(shape, dtype=dtype, device=store)
    folder = tempfile.gettempdir() if spill in (None, True) else str(spill)
    with tempfile.TemporaryFile(dir=folder) as f:  # unlinked at once: the mapping keeps it alive
        _reserve_disk(f.fileno(), nbytes, folder)
        mapping = mmap.mmap(f.fileno(), nbytes)
    out = torch.frombuffer(mapping, dtype=dtype).view(shape)
    maps[out.untyped_storage().data_ptr()] = mapping
    return out


def _reserve_disk(fd: int, nbytes: int, folder: str) -> None:
    """Give the spill file its blocks now. A sparse file gets them as pages are written back, and a full disk
    then kills the process with SIGBUS mid-decode, with no message; reserved, it fails here and says why."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except (AttributeError, OSError) as e:  # AttributeError: no posix_fallocate (macOS, Windows)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            free = shutil.disk_usage(folder).free / 2**30
            raise OSError(e.errno, f"no room to spill {nbytes / 2**30:.1f} GiB of activations to {folder} ({free:.1f} GiB "
                          "free): point TMPDIR (or spill=FOLDER) at a disk with more room") from e  # fmt: skip
        os.ftruncate(fd, nbytes)  # a file system that cannot reserve: sparse, as before


def _mapping(t: Tensor, maps: _Maps) -> mmap.mmap | None:
    """The file mapping behind a spilled tensor, or None."""
    return maps.get(t.untyped_storage().data_ptr()) if t.device.type == "cpu" else None


def _release(t: Tensor, maps: _Maps) -> None:
    """Drop a spilled tensor's pages from the process: MADV_DONTNEED on a shared file mapping keeps the
    data (in the page cache, or on disk), so resident memory holds one tile, not the whole image."""
    if (mapping := _mapping(t, maps)) is not None:
        mapping.madvise(mmap.MADV_DONTNEED)


def _copy(dst: Tensor, src: Tensor, whole: Tensor, maps: _Maps) -> Tensor:
    """dst.copy_(src), where one of them is a view into `whole`; if that is spilled, a few rows at a time with
    its pages released after each. A fault on a file mapping maps the neighbouring pages too, so a tile's part
    of each row brings whole rows into the process: for a tile of 512 in a 4096-wide image, 8x the tile."""
    if _mapping(whole, maps) is None:
        return dst.copy_(src)
    step = max(1, _COPY_BYTES // (whole[..., 0, :].numel() * whole.element_size()))
    for a in range(0, dst.shape[-2], step):
        dst[..., a : a + step, :].copy_(src[..., a : a + step, :])
        _release(whole, maps)
    return dst


_COPY_BYTES = 32 * 2**20  # whole-image rows a spilled copy maps at a time


def _available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere (then nothing spills unless asked)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _window(start: int, stop: int, halo: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The tile's extent along one axis (core plus halo, clipped to the image), and its core within it."""
    lo, hi = max(start - halo, 0), min(stop + halo, size)
    return (lo, hi), (start - lo, stop - lo)


def _split(length: int, side: int) -> list[tuple[int, int]]:
    """[0, length) in near-equal pieces of at most `side` (no sliver of a last tile)."""
    n = -(-length // side)
    bounds = [round(i * length / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _halo(stage: nn.Module) -> int:
    """Context a tile needs at the stage's input: one pixel per 3x3 conv (a conv after the 2x
    upsampling needs half a pixel, counted as one), rounded up to even so that a stride-2 conv
    sees the same grid as untiled. Each stage resamples at most once, at its end or its start."""
    reach = sum(m.dilation[-1] * (m.kernel_size[-1] // 2) for m in stage.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    return reach + reach % 2


def _latent_tile(tile: int | str, config: AutoencoderConfig, x: Tensor) -> int | None:
    """Tile side in latent pixels; None means untiled (tile="auto" off an accelerator)."""
    if tile == "auto":
        free = _free_memory(x.device)
        if free is None:
            return None
        tile = tile_size_for_budget(config, int(free * _AUTO_SHARE), batch=x.shape[0], dtype=x.dtype)
    f = config.factor
    if isinstance(tile, str) or tile < f:
        raise ValueError(f"tile must be a side in pixels of at least the model's factor {f}, or 'auto'; got {tile!r}")
    return tile // f


def _free_memory(device: torch.device) -> int | None:
    """Free accelerator bytes. None on CPU: there the whole-image activations between stages stay in
    the same RAM, so tiling saves little (see docs/TILING.md) and "auto" runs untiled."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@functools.lru_cache(maxsize=8)
def _stage_shapes(config: AutoencoderConfig) -> tuple[list[tuple[int, int, int, float]], ...]:
    """(halo, input channels, output channels, output/input resolution) of each tiled stage of the
    encoder and of the decoder, traced once through the architecture on the meta device (no weights).
    A video network's frames count as channels: values per pixel."""
    arch = ARCHITECTURES[config.arch].model
    with torch.device("meta"):
        encoder, decoder = arch.Encoder(config), arch.Decoder(config)
    shapes = []
    for stages, channels in ((encoder.body_stages(), config.in_channels), (decoder.body_stages(), config.decoder_channels[-1])):
        found, lead = [], (1, channels)
        for stage in stages:
            x = torch.empty(*lead, 16, 16, device="meta")
            y = stage(x)
            found.append((_halo(stage), math.prod(x.shape[1:-2]), math.prod(y.shape[1:-2]), y.shape[-1] / 16))
            lead = tuple(y.shape[:-2])
        shapes.append(found)
    return tuple(shapes)


class _StatsPending(Exception):
    """Stops a tile at a GroupNorm whose whole-image statistics are still being gathered."""


class _WholeImageNorms:
    """The stage's GroupNorms' statistics, of the whole image: `normalise` is what each of them does
    while the stage runs within `given_statistics(normalise)`.

    A norm with unknown statistics adds the current tile's core (`core`, set by the caller) to its
    running moments and raises `_StatsPending`; `finish()` turns the moments into mean and 1/std.
    """

    def __init__(self, stage: nn.Module):
        others = [type(m).__name__ for m in stage.modules() if isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm)]
        if others:  # they would normalise each tile by its own statistics
            raise TypeError(f"a tiled stage's GroupNorms must be vaekit.model.lean.GroupNorm, not {others[0]}")
        self.known: dict[nn.GroupNorm, tuple[Tensor, Tensor]] = {}  # mean, rstd: float32 (N, G)
        self.gathering: nn.GroupNorm | None = None
        self.core: tuple[slice, slice] = (slice(None), slice(None))
        self._moments: tuple[int, Tensor, Tensor] | None = None  # count, mean, sum of squared deviations
        self._device: torch.device | None = None

    def normalise(self, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        if norm in self.known:
            mean, rstd = self.known[norm]
            per, spread = x.shape[1] // norm.num_groups, (1,) * (x.ndim - 2)  # over (frames and) pixels
            mean = mean.repeat_interleave(per, dim=1).view(*x.shape[:2], *spread)
            scale = (rstd.repeat_interleave(per, dim=1) * norm.weight.float()).view(*x.shape[:2], *spread)
            return (x - mean.to(x.dtype)).mul_(scale.to(x.dtype)).add_(norm.bias.to(x.dtype).view(-1, *spread))
        self.gathering, self._device = norm, x.device
        self._add(x[..., self.core[0], self.core[1]].reshape(x.shape[0], norm.num_groups, -1))
        raise _StatsPending

    def _add(self, groups: Tensor) -> None:
        """Chan et al.'s pairwise update: exact combination of per-tile means and variances, in
        float64 on the CPU (not every accelerator has float64)."""
        var, mean = torch.var_mean(groups.float(), dim=-1, correction=0)
        count, mean, m2 = groups.shape[-1], mean.cpu().double(), var.cpu().double() * groups.shape[-1]
        if self._moments is not None:
            n0, mean0, m20 = self._moments
            total, delta = n0 + count, mean - mean0
            count, mean, m2 = total, mean0 + delta * (count / total), m20 + m2 + delta.square() * (n0 * count / total)
        self._moments = (count, mean, m2)

    def finish(self) -> None:
        assert self.gathering is not None and self._moments is not None
        count, mean, m2 = self._moments
        rstd = torch.rsqrt(m2 / count + self.gathering.eps)
        self.known[self.gathering] = (mean.float().to(self._device), rstd.float().to(self._device))
        self.gathering, self._moments = None, None
