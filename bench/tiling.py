"""Tiled against untiled encode/decode: vaekit's tiles, the same tiles with per-tile GroupNorm
statistics, and diffusers' `enable_tiling()`, all with the same random weights on 512x512 photos.

    python bench/tiling.py                 # tiny-f8c4 on astronaut, chelsea, coffee (CPU: ~5 min)
    python bench/tiling.py --sd1 --tile 256   # also SD1-size on astronaut (CPU, 1 thread: ~15 min)
    python bench/tiling.py --device cuda --tile 256 128

Differences are from vaekit untiled (which matches diffusers untiled: the `diffusers` row): decoded
images in 0-255 levels (mean and max over pixels), latents as max abs difference of the posterior
mean. Peak memory: on CUDA `max_memory_allocated`; on CPU the process's peak resident memory above
its level before the call (Linux only), which for vaekit's tiles includes the whole-image
activations kept in RAM between stages. The "tile working set" line measures one interior tile
through every stage against `tile_memory`'s estimate, which `tile="auto"` plans with.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from vaekit import preset
from vaekit.checkpoints import save
from vaekit.data import to_tensor, to_uint8
from vaekit.model import Autoencoder
from vaekit.model.tiling import _halo, _stage_shapes, decode_body_tiled, encode_body_tiled, tile_memory

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
IMAGES = {"astronaut": skdata.astronaut, "chelsea": skdata.chelsea, "coffee": skdata.coffee}


def photo(name: str) -> torch.Tensor:
    return to_tensor(np.array(Image.fromarray(IMAGES[name]()).resize((512, 512), Image.BICUBIC)))


def diffusers_twin(model: Autoencoder):
    """diffusers' AutoencoderKL with the same weights, through vaekit's own diffusers export."""
    from diffusers import AutoencoderKL

    with tempfile.TemporaryDirectory() as folder:
        save(model, folder, format="diffusers")
        return AutoencoderKL.from_pretrained(folder).eval().to(model.device)


class Meter:
    """Peak memory, then (in a later phase) time, of single calls.

    On CPU, peak memory is the process's peak resident size above its level before the call, read
    from /proc (Linux). For it to follow the tensors, malloc must return freed blocks to the system
    at once: from the start, every allocation over 64 KiB gets its own mapping. That makes each
    allocation fault its pages in, so the timing phase goes back to malloc's usual reuse.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.phase = "memory"
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)

    def start_time_phase(self) -> None:
        self.phase = "time"
        if self.libc is not None:  # glibc's defaults once it has adapted: map only blocks over 32 MiB
            self.libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)

    def time(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Output and seconds: wall time on CUDA; on CPU process time, which other jobs on shared
        cores do not inflate (summed over threads)."""
        assert self.phase == "time"
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        self._sync()
        start = clock()
        with torch.inference_mode():
            out = fn()
        self._sync()
        return out, clock() - start

    def peak(self, fn: Callable[[], torch.Tensor]) -> float:
        """MiB above the level before the call."""
        assert self.phase == "memory"
        if self.device.type == "cuda":
            self._sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            self.libc.malloc_trim(0)  # free heap pages left from earlier calls would hide new use
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident size to the current one
            base = _proc_status("VmRSS")
        with torch.inference_mode():
            fn()
        self._sync()
        top = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else _proc_status("VmHWM")
        return (top - base) / 2**20

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def tile_working_set(model: Autoencoder, tile: int, meter: Meter) -> float:
    """MiB: the largest measured peak of one interior tile through any single stage."""
    worst = 0.0
    cfg = model.config
    starts = ((model.encoder.body_stages(), tile // cfg.factor * cfg.factor), (model.decoder.body_stages(), tile // cfg.factor))
    for (stages, core), shapes in zip(starts, _stage_shapes(cfg)):
        for stage, (_, c_in, _, scale) in zip(stages, shapes):
            side = core + 2 * _halo(stage)
            x = torch.randn(1, c_in, side, side, device=model.device)
            worst = max(worst, meter.peak(lambda: stage(x)))
            core = int(core * scale)
    return worst


def levels(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    d = np.abs(to_uint8(out).astype(np.int16) - to_uint8(ref).astype(np.int16))
    return float(d.mean()), int(d.max())


Case = tuple[str, str, Callable[[], torch.Tensor]]  # call, method, fn


def cases(model: Autoencoder, twin, x: torch.Tensor, z: torch.Tensor, tiles: list[int]) -> list[Case]:
    f = model.config.factor
    found: list[Case] = [
        ("encode", "vaekit untiled", lambda: model.encode(x).mean),
        ("decode", "vaekit untiled", lambda: model.decode(z)),
        ("encode", "diffusers untiled", lambda: twin.encode(x).latent_dist.mean),
        ("decode", "diffusers untiled", lambda: twin.decode(z).sample),
    ]
    for t in tiles:
        found += [
            ("encode", f"vaekit tile {t}", lambda t=t: model.encode(x, tile=t).mean),
            ("decode", f"vaekit tile {t}", lambda t=t: model.decode(z, tile=t)),
            ("encode", f"vaekit tile {t} per-tile stats", lambda t=t: _encode_local(model, x, t)),
            ("decode", f"vaekit tile {t} per-tile stats", lambda t=t: _decode_local(model, z, t)),
            ("encode", f"diffusers tile {t}", lambda t=t: _diffusers_tiled(twin, t, f, lambda: twin.encode(x).latent_dist.mean)),
            ("decode", f"diffusers tile {t}", lambda t=t: _diffusers_tiled(twin, t, f, lambda: twin.decode(z).sample)),
        ]
    return found


def bench(configs: list[tuple[str, list[str]]], tiles: list[int], device: torch.device, repeat: int) -> None:
    meter = Meter(device)
    runs = []  # (config name, model, image, cases)
    for name, images in configs:
        torch.manual_seed(0)
        model = Autoencoder(preset(name)).eval().to(device)
        twin = diffusers_twin(model)
        for image in images:
            x = photo(image).to(device)
            with torch.inference_mode():
                z = model.encode(x).mean  # also the warm-up: first calls allocate caches and pick kernels
            runs.append((name, model, image, cases(model, twin, x, z, tiles)))
    models = {name: model for name, model, _, _ in runs}
    working_sets = {(name, t): tile_working_set(model, t, meter) for name, model in models.items() for t in tiles}
    peaks = {(name, image, call, method): meter.peak(fn) for name, _, image, found in runs for call, method, fn in found}
    meter.start_time_phase()
    timed = {}
    for name, _, image, found in runs:
        for call, method, fn in found:
            outs, secs = zip(*(meter.time(fn) for _ in range(repeat)))
            timed[name, image, call, method] = (outs[0], min(secs))
    clock = "time s" if device.type == "cuda" else "cpu s"
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} thread(s)"
    header = None
    for name, model, image, found in runs:
        if name != header:
            header = name
            print(f"\n## {name}: {model.num_parameters() / 1e6:.1f}M parameters, {device}{threads}")
            for t in tiles:
                print(f"tile {t}: one tile's working set measured {working_sets[name, t]:.0f} MiB, "
                      f"estimated {tile_memory(model.config, t) / 2**20:.0f} MiB (tile_memory)")
            print(f"{'image':10} {'call':7} {'method':30} {'mean lv':>8} {'max lv':>7} {'latent max':>11} {clock:>7} {'peak MiB':>9}")
        for call, method, _ in found:
            out, secs = timed[name, image, call, method]
            ref = timed[name, image, call, "vaekit untiled"][0]
            if call == "encode":
                diff = f"{'':>8} {'':>7} {(out - ref).abs().max().item():11.2e}"
            else:
                lv_mean, lv_max = levels(out, ref)
                diff = f"{lv_mean:8.3f} {lv_max:7d} {'':>11}"
            print(f"{image:10} {call:7} {method:30} {diff} {secs:7.2f} {peaks[name, image, call, method]:9.0f}")


def _encode_local(model: Autoencoder, x: torch.Tensor, tile: int) -> torch.Tensor:
    h = model.encoder.head(encode_body_tiled(model.encoder, x, tile, model.config, whole_image_stats=False))
    return (model.quant_conv(h) if model.quant_conv is not None else h).chunk(2, dim=1)[0]


def _decode_local(model: Autoencoder, z: torch.Tensor, tile: int) -> torch.Tensor:
    z = model.post_quant_conv(z) if model.post_quant_conv is not None else z
    return decode_body_tiled(model.decoder, model.decoder.head(z), tile, model.config, whole_image_stats=False)


def _diffusers_tiled(twin, tile: int, factor: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    twin.enable_tiling()
    twin.tile_sample_min_size, twin.tile_latent_min_size = tile, tile // factor
    try:
        return fn()
    finally:
        twin.disable_tiling()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd1", action="store_true", help="also bench the SD1-size architecture (slow on CPU)")
    p.add_argument("--images", nargs="+", default=list(IMAGES), choices=list(IMAGES))
    p.add_argument("--sd1-images", nargs="+", default=["astronaut"], choices=list(IMAGES), help="images for --sd1")
    p.add_argument("--tile", nargs="+", type=int, default=[256, 128], help="tile sides in pixels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier numbers)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per case; the fastest counts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configs = [("tiny-f8c4", args.images)] + ([("sd1", args.sd1_images)] if args.sd1 else [])
    bench(configs, args.tile, torch.device(args.device), args.repeat)


if __name__ == "__main__":
    main()
