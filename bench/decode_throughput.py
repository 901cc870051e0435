"""Images/s of `vaekit decode` against the loop people write (docs/BENCHMARKS.md, "Throughput").

    python bench/decode_throughput.py                       # sd1, 16 latents of 256², 3 rounds: ~10 min on 2 cores
    python bench/decode_throughput.py --latents 8 --size 512 --repeats 2

Data: --latents raw latents (seeded normal draws, as a sampler's output would be after denormalising) in one
.safetensors file. Weights: random sd1, the same for every arm (vaekit writes the preset as a diffusers folder;
diffusers' AutoencoderKL loads that folder). Arms, each timed from the latent file to all PNGs on disk,
interleaved over --repeats rounds (the median is reported):

  loop          safetensors load -> diffusers `AutoencoderKL.decode`, one latent at a time -> uint8 -> PIL PNG
  vaekit        `vaekit.latents.decode_latents` (what `vaekit decode LATENTS --raw` runs), its default convolutions
                ("auto": per layer shape the faster of direct and Winograd, timed once on this machine)
  vaekit-direct the same with --conv direct (PyTorch's own convolutions, as diffusers runs)

2 torch threads. The first vaekit round also times any layer shape the machine has not met yet (once per machine);
the median of 3 rounds does not see it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vaekit import Autoencoder, convolutions, preset
from vaekit.latents import decode_latents


def loop(peer, path: Path, out: Path) -> None:
    out.mkdir()
    with torch.inference_mode():
        for key, z in load_file(str(path)).items():
            for i, one in enumerate(z):
                x = peer.decode(one[None]).sample
                pixels = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(np.ascontiguousarray(pixels)).save(out / f"{key}_{i:05d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd1")
    p.add_argument("--latents", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="image side the latents decode to (default 256)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = Autoencoder(preset(args.preset)).eval()
    side = args.size // model.factor
    z = torch.randn(args.latents, model.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({"z": z}, str(tmp / "latents.safetensors"))
        model.save(str(tmp / "model"))
        peer = AutoencoderKL.from_pretrained(tmp / "model").eval()
        arms = {
            "loop": lambda out: loop(peer, tmp / "latents.safetensors", out),
            "vaekit": lambda out: decode_latents(model, tmp / "latents.safetensors", out, raw=True, progress=False),
            "vaekit-direct": lambda out: _direct(model, tmp / "latents.safetensors", out),
        }
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for r in range(args.repeats):
            for arm, fn in arms.items():
                out = tmp / f"out_{arm}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                fn(out)
                times[arm].append(time.perf_counter() - start)
                assert len(list(out.glob("*.png"))) == args.latents
                print(f"{arm} round {r}: {args.latents / times[arm][-1]:.2f} img/s", flush=True)
    base = statistics.median(times["loop"])
    print(f"\n{args.latents} latents -> {args.size}x{args.size} PNGs, {args.preset}, 2 torch threads, median of {args.repeats}\n")
    print("| arm | images/s (median) | min - max | vs loop |")
    print("|---|---|---|---|")
    for arm, t in times.items():
        med = statistics.median(t)
        print(f"| {arm} | {args.latents / med:.2f} | {args.latents / max(t):.2f} - {args.latents / min(t):.2f} | {base / med:.2f}x |")


def _direct(model: Autoencoder, path: Path, out: Path) -> None:
    with convolutions("direct"):
        decode_latents(model, path, out, raw=True, progress=False)


if __name__ == "__main__":
    main()
