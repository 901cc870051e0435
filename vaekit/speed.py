"""Speed and memory of an autoencoder, against its diffusers class and against the machine's own peaks:
what `vaekit bench` runs (docs/BENCHMARKS.md).

Times are medians of `repeats` runs after a warm-up, vaekit and the peer interleaved run by run, so a
neighbour's load hits both alike. Memory is the peak resident set size above the one before the call (the
loaded model and the input) on a CPU, sampled every millisecond; `max_memory_allocated` on CUDA. FLOPs come
from `torch.utils.flop_counter` (a multiply-add counts 2); the achieved GFLOP/s are read against a large fp32
matmul and a 3x3 convolution measured by the same process, on the same threads.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import AutoencoderConfig
from .model import ARCHITECTURES, Autoencoder, convchoice

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    op: str  # "encode" or "decode"
    size: int
    batch: int
    precision: str
    tile: int | str | None
    seconds: float  # per call (the whole batch), median
    spread: tuple[float, float]  # min, max
    gflop_per_image: float
    gflops: float  # achieved
    conv_peak_share: float
    rss_mb: float | None  # peak above the start of the call (CPU), or CUDA max_memory_allocated
    peer_seconds: float | None = None
    peer_rss_mb: float | None = None
    max_abs_diff: float | None = None
    compile_seconds: float | None = None  # with `compile`: the first call's time above a compiled call's
    peer_compile_seconds: float | None = None

    @property
    def speedup(self) -> float | None:
        return self.peer_seconds / self.seconds if self.peer_seconds else None


def machine_peaks(device: torch.device, seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of a 2048² fp32 matmul and of a 3x3 conv (128 channels, 256², batch 1) on this device and threads."""
    a = torch.randn(2048, 2048, device=device)
    x = torch.randn(1, 128, 256, 256, device=device)
    w = torch.randn(128, 128, 3, 3, device=device)
    tests = {"matmul": (lambda: a @ a, 2 * 2048**3), "conv": (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 128 * 128 * 9 * 256 * 256)}
    peaks = {}
    for name, (fn, flop) in tests.items():
        fn()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            best = min(best, _timed(fn, device))
        peaks[f"{name}_gflops"] = flop / best / 1e9
    return peaks


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """{"mb": peak above the start} once the block ends: RSS sampled every ms (CPU), or CUDA's allocator peak.
    The sampler is a thread: it sees what lives while torch computes (its kernels release the GIL), and can
    miss a buffer that is allocated and freed within one millisecond of pure Python."""
    out: dict[str, float] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        out["mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    if not os.path.exists("/proc/self/statm"):  # not Linux: no cheap RSS probe
        yield out
        return
    start, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out["mb"] = (max(peak[0], _rss()) - start) / 2**20


def has_diffusers_peer(config: AutoencoderConfig) -> bool:
    """Whether diffusers has a class for this config (pixel space, AEs and the fast-training options have none)."""
    return ARCHITECTURES[config.arch].layout.diffusers_can_load(config)


def diffusers_peer(model: Autoencoder, dtype: torch.dtype) -> Any | None:
    """The same weights in the diffusers class that vaekit's diffusers folder names (AutoencoderKL,
    AutoencoderKLFlux2, AutoencoderKLQwenImage, AutoencoderKLHunyuanImage, AutoencoderDC, AutoencoderKLHunyuanImageRefiner, ...), or None when there is none."""
    if not has_diffusers_peer(model.config):
        return None
    import diffusers

    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        name = json.loads((Path(folder) / "config.json").read_text())["_class_name"]
        return getattr(diffusers, name).from_pretrained(folder, torch_dtype=dtype).to(model.device).eval()


@contextlib.contextmanager
def quiet_diffusers(level: int = logging.ERROR) -> Iterator[None]:
    """diffusers' own log notices below `level` silenced within the block (e.g. that `accelerate` is missing, when
    `from_pretrained` builds a peer): they say nothing about the timings and would land among bench's lines. Its
    errors still show, its verbosity is restored after the block, and a DIFFUSERS_VERBOSITY set by the user wins."""
    from diffusers.utils import logging as diffusers_logging

    if os.environ.get("DIFFUSERS_VERBOSITY"):
        yield
        return
    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(max(before, level))
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)


def bench(model: Autoencoder, sizes: list[int], batches: list[int], precisions: list[str], tile: int | str | None = None,
          against: str | None = "diffusers", repeats: int = 5, seed: int = 0, compile: str | None = None,
          winograd: bool = False, report: Callable[[Row], None] | None = None,
          conv: str | None = None) -> tuple[list[Row], dict[str, float]]:  # fmt: skip
    """Encode and decode timings for every (size, batch, precision); see the module docstring. `compile` names a
    `torch.compile` backend ("inductor" for speed) that both vaekit's and the peer's calls run under; FLOPs are
    still counted eagerly. `conv` ("auto", "direct", "winograd"; default: the path in force, "auto" unless
    $VAEKIT_CONV says otherwise; `winograd=True` is "winograd") picks vaekit's CPU convolutions (the peer's are
    PyTorch's own); CPU fp32 rows name it ("fp32 auto"), and the FLOPs and GFLOP/s stay the direct convolution's.
    `convchoice.used()` then holds the choices "auto" made."""
    if compile is not None and compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"unknown torch.compile backend {compile!r}; torch knows {', '.join(torch._dynamo.list_backends())} "
                         "and, for debugging, eager and aot_eager")  # fmt: skip
    device = model.device
    conv = "winograd" if winograd else conv or convchoice.path_in_force()
    peaks = machine_peaks(device)
    rows: list[Row] = []
    # diffusers' notices (building and running the peer) stay out of the output; vaekit's own reports still print
    quiet = quiet_diffusers() if against == "diffusers" and has_diffusers_peer(model.config) else contextlib.nullcontext()
    with quiet:
        for precision in precisions:
            dtype = PRECISIONS[precision]
            model = model.to(dtype).eval()
            peer = diffusers_peer(model, dtype) if against == "diffusers" else None
            for size in sizes:
                for batch in batches:
                    g = torch.Generator().manual_seed(seed)
                    x = (torch.rand(batch, model.config.in_channels, size, size, generator=g) * 2 - 1).to(device, dtype)
                    with torch.inference_mode():
                        z = model.encode(x, tile=tile).mean
                    # A video VAE's diffusers class (Qwen-Image's) takes videos: an image is one frame.
                    video = ARCHITECTURES[model.config.arch].layout.DIFFUSERS_FRAMES
                    frame, unframe = (lambda t: t[:, :, None], lambda t: t[:, :, 0]) if video else (lambda t: t, lambda t: t)
                    ops = {
                        "encode": (lambda: model.encode(x, tile=tile).mean,
                                   (lambda: unframe(_peer_latent(peer.encode(frame(x))))) if peer is not None else None),
                        "decode": (lambda: model.decode(z, tile=tile),
                                   (lambda: unframe(peer.decode(frame(z)).sample)) if peer is not None else None),
                    }  # fmt: skip
                    for op, (ours, theirs) in ops.items():
                        row = _measure(op, ours, theirs, size, batch, precision, tile, repeats, device, peaks, compile, conv)
                        rows.append(row)
                        if report:
                            report(row)
    return rows, peaks


def _peer_latent(out: Any) -> torch.Tensor:
    """A diffusers encode's latent: a VAE's posterior mean, or a deterministic autoencoder's latent (AutoencoderDC's
    `latent`, AutoencoderTiny's `latents`)."""
    return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents if hasattr(out, "latents") else out.latent


def _measure(op: str, ours: Callable, theirs: Callable | None, size: int, batch: int, precision: str, tile: int | str | None,
             repeats: int, device: torch.device, peaks: dict[str, float], compile: str | None = None,
             conv: str = "auto") -> Row:  # fmt: skip
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter, convchoice.convolutions("direct"):  # no formula for NNPACK's
            ours()
        flop = counter.get_total_flops()
        ours = _under(conv, ours)
        out = ours()  # the warm-up; under "auto", also the first timing of each new layer shape
        if device.type == "cpu" and precision == "fp32":
            precision += f" {conv}"
        compiled: dict[str, float] = {}
        if compile:
            torch._dynamo.reset()  # the previous rows' graphs: each row compiles anew and reports its own time
            ours, compiled["ours"] = _compiled(ours, compile, device)
            if theirs is not None:
                theirs, compiled["theirs"] = _compiled(theirs, compile, device)
        diff = None
        if theirs is not None:
            diff = float((theirs().float() - out.float()).abs().max())
        del out
        with peak_memory(device) as mem:
            ours()
        peer_mem: dict[str, float] = {}
        if theirs is not None:
            with peak_memory(device) as peer_mem:
                theirs()
        times, peer_times = [], []
        for _ in range(repeats):  # interleaved: a neighbour's load hits both alike
            times.append(_timed(ours, device))
            if theirs is not None:
                peer_times.append(_timed(theirs, device))
    t = statistics.median(times)
    return Row(op=op, size=size, batch=batch, precision=precision, tile=tile, seconds=t, spread=(min(times), max(times)),
               gflop_per_image=flop / batch / 1e9, gflops=flop / t / 1e9, conv_peak_share=flop / t / 1e9 / peaks["conv_gflops"],
               rss_mb=mem.get("mb"), peer_seconds=statistics.median(peer_times) if peer_times else None,
               peer_rss_mb=peer_mem.get("mb"), max_abs_diff=diff, compile_seconds=compiled.get("ours"),
               peer_compile_seconds=compiled.get("theirs"))  # fmt: skip


def _under(conv: str, fn: Callable) -> Callable:
    def run() -> Any:
        with convchoice.convolutions(conv):
            return fn()

    return run


def format_choices(choices: dict[str, dict[str, Any]]) -> str:
    """The layer shapes "auto" met and what it chose for each on this machine (`convchoice.used()`), as markdown."""
    if not choices:
        return ""
    wins = sum(c["path"] == "winograd" for c in choices.values())
    lines = [f"convolutions (auto, {convchoice.machine()}): Winograd for {wins} of {len(choices)} layer shapes, "
             f"remembered in {convchoice.cache_file()}", "",
             "| layer shape | direct ms | Winograd ms | chosen |", "|---|---|---|---|"]  # fmt: skip
    for key, c in sorted(choices.items(), key=lambda kv: -kv[1]["direct_ms"]):
        lines.append(f"| {key} | {c['direct_ms']:.2f} | {c['winograd_ms']:.2f} | {c['path']} |")
    return "\n".join(lines)


def _compiled(fn: Callable, backend: str, device: torch.device) -> tuple[Callable, float]:
    """fn under torch.compile, and the compile time: the first call's time less a second (compiled) call's."""
    compiled = torch.compile(fn, backend=backend, dynamic=False)
    first = _timed(compiled, device)
    return compiled, max(0.0, first - _timed(compiled, device))


def format_rows(rows: list[Row], peaks: dict[str, float]) -> str:
    """A markdown table of the rows, with the machine's peaks above it."""
    lines = [f"machine: {torch.get_num_threads()} threads; fp32 matmul {peaks['matmul_gflops']:.0f} GFLOP/s, "
             f"3x3 conv {peaks['conv_gflops']:.0f} GFLOP/s", "",
             "| op | size | batch | precision | vaekit s | diffusers s | speed-up | GFLOP/img | GFLOP/s | of conv peak | "
             "peak MB (vaekit / diffusers) | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    compiled = any(r.compile_seconds is not None for r in rows)
    if compiled:
        lines[-2] += " compile s (vaekit / diffusers) |"
        lines[-1] += "---|"
    for r in rows:
        peer = f"{r.peer_seconds:.3f}" if r.peer_seconds else "-"
        speed = f"{r.speedup:.2f}x" if r.speedup else "-"
        mem = f"{r.rss_mb:.0f}" if r.rss_mb is not None else "-"
        mem += f" / {r.peer_rss_mb:.0f}" if r.peer_rss_mb is not None else ""
        diff = f"{r.max_abs_diff:.1e}" if r.max_abs_diff is not None else "-"
        size = f"{r.size}²" + (f" tile {r.tile}" if r.tile else "")
        lines.append(f"| {r.op} | {size} | {r.batch} | {r.precision} | {r.seconds:.3f} | {peer} | {speed} | "
                     f"{r.gflop_per_image:.0f} | {r.gflops:.0f} | {r.conv_peak_share:.0%} | {mem} | {diff} |")  # fmt: skip
        if compiled:
            lines[-1] += f" {r.compile_seconds or 0:.1f}" + (f" / {r.peer_compile_seconds:.1f}" if r.peer_compile_seconds is not None else "") + " |"
    return "\n".join(lines)


def to_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [{**asdict(r), "speedup": r.speedup} for r in rows]
