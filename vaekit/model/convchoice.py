"""Which algorithm runs a convolution in CPU fp32 inference: oneDNN's direct one (PyTorch's own) or NNPACK's Winograd
F(6x6, 3x3), chosen per machine and per layer shape by timing both once and remembering the answer
(docs/BENCHMARKS.md, "Fast by default").

Why per shape and per machine: Winograd does fewer multiplies and more memory traffic, so it wins on wide layers and
loses on narrow ones, by amounts that depend on the CPU. On the AVX2 EPYC measured, SD1's 128-512-channel 3x3 layers
ran 2-2.6x faster by Winograd and its 4-channel `conv_in` 2x slower; on an AVX-512 Xeon the gain at 128 channels was
1.3x, and NNPACK has no AVX-512 kernels to win with at 512. A fixed choice loses somewhere; a measured one does not.

- "auto" (the default): the first time a layer shape (batch, channels in and out, padded pixels within a power of
  two) meets this machine (CPU model, vector extensions, PyTorch version, threads), both algorithms run it three
  times, alternating, and Winograd is kept where its best time is at most WINOGRAD_MARGIN of the direct one's. The
  answers live in CACHE_FILE, so later calls and later processes pay nothing.
- "direct": PyTorch's own convolution everywhere: bit for bit what torch gives, the same on every run.
- "winograd": NNPACK wherever it applies, fast or not (the opt-in of earlier releases).

Only 3x3 stride-1 convolutions of fp32 CPU tensors without autograd are ever Winograd's: training, GPUs and other
dtypes always run the direct convolution. Winograd's error is ~1e-5 of a convolution's output scale instead of
~1e-7; every published architecture stays within 1e-4 of diffusers (tests/test_speed.py).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import write_atomic

PATHS = ("auto", "direct", "winograd")
# Winograd is less exact than the direct convolution, so it must pay clearly: a 10% margin also keeps timing noise
# from flipping a shape where the two are level.
WINOGRAD_MARGIN = 0.9
TRIES = 3  # timed runs of each algorithm per new shape; the best of them counts (the first also builds caches)

_PATH: ContextVar[str | None] = ContextVar("vaekit_convolutions", default=None)


def path_in_force() -> str:
    """The innermost `convolutions(path)`, else $VAEKIT_CONV, else "auto"."""
    path = _PATH.get() or os.environ.get("VAEKIT_CONV") or "auto"
    if path not in PATHS:
        raise ValueError(f"VAEKIT_CONV={path!r}: set it to one of {', '.join(PATHS)}, or unset it")
    return path


@contextmanager
def convolutions(path: str | None = "auto") -> Iterator[None]:
    """Within it, CPU fp32 inference convolutions take `path` ("auto", "direct" or "winograd"; see the module
    docstring). None leaves the path in force unchanged."""
    if path is not None and path not in PATHS:
        raise ValueError(f"convolution path {path!r}: choose one of {', '.join(PATHS)}")
    if path == "winograd" and not torch._nnpack_available():
        warnings.warn("this PyTorch build has no NNPACK: Winograd convolutions are not available, they run direct", stacklevel=3)
    token = _PATH.set(path) if path is not None else None
    try:
        yield
    finally:
        if token is not None:
            _PATH.reset(token)


def winograd(enabled: bool = True) -> Any:
    """`convolutions("winograd")`: NNPACK's Winograd for every 3x3 stride-1 convolution it can run, chosen or not.
    `winograd(False)` leaves the path in force (the default "auto") unchanged."""
    return convolutions("winograd" if enabled else None)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int | tuple[int, ...] = 1,
           padding: int | tuple[int, ...] = 0) -> Tensor:  # fmt: skip
    """F.conv2d, or NNPACK's Winograd convolution where the path in force says so for this shape."""
    pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
    path = path_in_force()
    if path != "direct" and _winograd_applies(x, weight, stride):
        if path == "winograd":
            return torch._nnpack_spatial_convolution(x, weight, bias, list(pad))
        return _chosen(x, weight, bias, pad)
    return F.conv2d(x, weight, bias, stride, pad)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and checkpoint keys) that runs through `conv2d`."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        assert self.padding_mode == "zeros" and self.dilation == (1, 1) and self.groups == 1
        return conv2d(x, weight, bias, self.stride, self.padding)  # type: ignore[arg-type]


def _winograd_applies(x: Tensor, weight: Tensor, stride: int | tuple[int, ...]) -> bool:
    # _nnpack_available() last: it is also NNPACK's one-time initialisation, without which its convolution fails.
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 4
            and not torch.is_grad_enabled() and weight.shape[-2:] == (3, 3) and stride in (1, (1, 1))
            and torch._nnpack_available())  # fmt: skip


# ---- the choices, per machine and layer shape -------------------------------------------------------------------


def cache_file() -> Path:
    """Where the choices are kept: $VAEKIT_CACHE, else $XDG_CACHE_HOME/vaekit, else ~/.cache/vaekit; convolutions.json."""
    root = os.environ.get("VAEKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaekit"
    return Path(root) / "convolutions.json"


def machine() -> str:
    """What a choice holds for: the CPU model and its widest vector extensions, PyTorch's version and its threads."""
    return f"{_cpu()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


@functools.cache
def _cpu() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:  # not Linux: the model name platform gives
        pass
    return f"{model} | " + ("+".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags) or "-")


def shape_key(x: Tensor, weight: Tensor, pad: tuple[int, ...]) -> str:
    """Batch, channels in -> out, and the padded pixels rounded up to a power of two: the bands of one layer (whose
    last is shorter) and images of nearby sizes share a choice."""
    n, cin, h, w = x.shape
    pixels = (h + 2 * pad[0]) * (w + 2 * pad[1])
    return f"batch {n}, {cin} -> {weight.shape[0]}, <= {1 << max(0, pixels - 1).bit_length()} px"


_TABLE: dict[str, dict[str, Any]] | None = None  # machine -> shape -> {"path", "direct_ms", "winograd_ms"}
_USED: dict[str, dict[str, Any]] = {}  # this process's shapes on this machine, for `vaekit bench`


def _table() -> dict[str, dict[str, Any]]:
    global _TABLE
    if _TABLE is None:
        _TABLE = _read(cache_file())
    return _TABLE


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
        return data["machines"] if isinstance(data.get("machines"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):  # none yet, or unreadable: measure afresh
        return {}


def _save(where: str, key: str, entry: dict[str, Any]) -> None:
    """Merge one choice into the cache file: read what other processes wrote, add it, replace the file atomically.
    A cache that cannot be written (a read-only home) only costs the measurement again in the next process."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        machines = _read(path)
        machines.setdefault(where, {})[key] = entry
        text = json.dumps({"version": 1, "machines": machines}, indent=1, sort_keys=True)
        write_atomic(path, lambda tmp: tmp.write_text(text))
    except OSError:
        pass


def _chosen(x: Tensor, weight: Tensor, bias: Tensor | None, pad: tuple[int, ...]) -> Tensor:
    """The convolution by the algorithm chosen for this shape on this machine, measuring both the first time."""
    where, key = machine(), shape_key(x, weight, pad)
    entry = _table().setdefault(where, {}).get(key)
    if entry is not None and entry.get("path") in ("direct", "winograd"):
        _USED[key] = entry
        return torch._nnpack_spatial_convolution(x, weight, bias, list(pad)) if entry["path"] == "winograd" else F.conv2d(x, weight, bias, 1, pad)
    runs = {"direct": lambda: F.conv2d(x, weight, bias, 1, pad),
            "winograd": lambda: torch._nnpack_spatial_convolution(x, weight, bias, list(pad))}  # fmt: skip
    best = {name: float("inf") for name in runs}
    out: dict[str, Tensor] = {}
    for _ in range(TRIES):  # alternating, so a neighbour's load hits both alike
        for name, run in runs.items():
            out.pop(name, None)
            start = time.perf_counter()
            out[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    ms = {name: round(t * 1e3, 3) for name, t in best.items()}  # the file's figures are the ones the choice read
    path = "winograd" if ms["winograd"] <= WINOGRAD_MARGIN * ms["direct"] else "direct"
    entry = {"path": path, "direct_ms": ms["direct"], "winograd_ms": ms["winograd"]}
    _table()[where][key] = _USED[key] = entry
    _save(where, key, entry)
    return out[path]


def used() -> dict[str, dict[str, Any]]:
    """The layer shapes "auto" met in this process on this machine: {shape: {"path", "direct_ms", "winograd_ms"}}."""
    return dict(_USED)
