"""Images/s of `vaekit encode` against the loop people write (docs/LATENTS.md).

    python bench/encode_throughput.py --images 16 --repeats 2   # sd1 and tiny-f8c4, 256²: ~6 min on 2 cores
    python bench/encode_throughput.py --presets sd1 --images 96 --repeats 3

Data: JPEGs (quality 90) cut from the built-in photos at 512 to 1024 pixels on the longer side, as photos
in a dataset are: every arm reads the same files and makes the same 256x256 centre crops (shorter side
resized with Lanczos). Weights: random, the same for every arm (vaekit writes the preset as a diffusers folder;
diffusers' AutoencoderKL loads that folder). Arms, each timed from the file list to all latents in memory
or on disk, interleaved over --repeats rounds (the median is reported):

  loop-1      PIL open, convert, resize, crop -> tensor -> diffusers `AutoencoderKL.encode`, one image at a time
  loop-8      the same, 8 images per encode call
  vaekit      `vaekit.latents.encode_dataset` (what `vaekit encode` runs) with its defaults (on a CPU one image
              per encoder call, where batches are slower per image), --workers reading and
              resizing in DataLoader processes beside the model, JPEGs decoded at a reduced DCT scale, shards
              written to disk; its default convolutions ("auto": per layer shape the faster of direct and
              Winograd, timed once on this machine)
  vaekit-direct the same with --conv direct (PyTorch's own convolutions, as the loops run)

The machine: 2 torch threads (the benchmark's budget); `--workers` processes for vaekit come on top, on the
same cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaekit import Autoencoder, convolutions, preset
from vaekit.data import sample_images
from vaekit.latents import EncodeOptions, encode_dataset

RESOLUTION = 256


def make_images(folder: Path, n: int) -> list[Path]:
    """n JPEGs, crops of the built-in photos rescaled to 512-1024 px on the longer side."""
    rng = np.random.default_rng(0)
    photos = [im for _, im in sample_images("all")]
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(photo[y : y + ch, x : x + cw])
        scale = rng.uniform(512, 1024) / max(ch, cw)
        im = im.resize((round(cw * scale), round(ch * scale)), Image.LANCZOS)
        paths.append(folder / f"{i:04d}.jpg")
        im.save(paths[-1], quality=90)
    return paths


def center_crop_tensor(path: Path) -> torch.Tensor:
    """What a hand-written loop does: decode the whole JPEG, shorter side to 256 (Lanczos), centre cut."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = RESOLUTION / min(w, h)
    im = im.resize((max(RESOLUTION, round(w * s)), max(RESOLUTION, round(h * s))), Image.LANCZOS)
    w, h = im.size
    x, y = (w - RESOLUTION) // 2, (h - RESOLUTION) // 2
    im = im.crop((x, y, x + RESOLUTION, y + RESOLUTION))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1


def loop(model, paths: list[Path], batch: int) -> list[torch.Tensor]:
    latents = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.stack([center_crop_tensor(p) for p in paths[i : i + batch]])
            dist = model.encode(x).latent_dist
            latents += list(torch.cat([dist.mean, dist.logvar], 1).half())
    return latents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["sd1", "tiny-f8c4"])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    from diffusers import AutoencoderKL

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        paths = make_images(tmp / "images", args.images)
        for name in args.presets:
            torch.manual_seed(0)
            model = Autoencoder(preset(name)).eval()
            arms = {"vaekit": None, "vaekit-direct": None}
            if model.config.diffusers_compatible:
                model.save(str(tmp / name))
                peer = AutoencoderKL.from_pretrained(tmp / name).eval()
                arms = {"loop-1": lambda: loop(peer, paths, 1), "loop-8": lambda: loop(peer, paths, 8), **arms}
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            for r in range(args.repeats):
                for arm, fn in arms.items():
                    start = time.perf_counter()
                    if arm.startswith("vaekit"):
                        out = tmp / f"lat_{name}_{arm}_{r}"
                        options = EncodeOptions(resolution=RESOLUTION, workers=args.workers, shard_size=1000)
                        with convolutions("direct" if arm == "vaekit-direct" else None):
                            encode_dataset(model, str(tmp / "images"), out, options, progress=False)
                    else:
                        fn()
                    times[arm].append(time.perf_counter() - start)
                    print(f"{name} {arm} round {r}: {args.images / times[arm][-1]:.2f} img/s", flush=True)
            base = statistics.median(times["loop-8"]) if "loop-8" in times else None
            for arm, t in times.items():
                med = statistics.median(t)
                rows.append((name, arm, args.images / med, args.images / max(t), args.images / min(t), base / med if base else None))
    print(f"\n{args.images} JPEGs (512-1024 px) -> {RESOLUTION}x{RESOLUTION} latents, 2 torch threads, median of {args.repeats}\n")
    print("| model | arm | images/s (median) | min - max | vs loop-8 |")
    print("|---|---|---|---|---|")
    for name, arm, med, lo, hi, ratio in rows:
        print(f"| {name} | {arm} | {med:.2f} | {lo:.2f} - {hi:.2f} | {f'{ratio:.2f}x' if ratio else '-'} |")


if __name__ == "__main__":
    main()
