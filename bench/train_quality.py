"""Quickstart quality benchmark (issue 4): held-out PSNR/SSIM at 256x256 after the same training budget.

    python bench/train_quality.py                           # 4 and 16 channels, every arm, 300 s each (~21 min)
    python bench/train_quality.py --channels 4 --arms quickstart bicubic
    python bench/train_quality.py --clock cpu               # a busy machine: budget in CPU time (see below)

Arms, all on the built-in photos (`--data samples`: 13 training photos, held out: chelsea, coffee,
flower, shorter side resized to 256 with Lanczos and centre-cropped, as vaekit.data.center_crop):

  diffusers   the plain way: diffusers `AutoencoderKL`, block channels (32, 64, 128, 128), one layer
              per block, AdamW (torch defaults) at --diffusers-lr, mean L1 + 1e-6 * KL (sum over latent
              elements, as diffusers' posterior.kl(); against a *mean* L1 that is LDM's kl_weight
              1e-6 x 3 x 64 x 64 = 0.012288, the quickstart's), batch 16, 64x64 random crops (vaekit's crops,
              no down-scaling), posterior sampled; evaluated on the posterior mode.
  quickstart  `vaekit.train.quickstart`: the QUICKSTART recipe, the real code path of `vaekit
              quickstart` (its own step calibration, EMA model, validation); 16 channels change only
              `latent_channels`.
  bicubic     the cheapest non-learned codec: a bicubic thumbnail (PIL) upsampled back. 8x keeps 3
              numbers per 8x8 patch (fewer than a 4-channel latent's 4), 4x keeps 12 (fewer than 16).

Budget: `--seconds` per trained model. `--clock wall` (default) is the issue's measure: wall-clock
time with 2 torch threads. On a shared machine wall time mostly measures the neighbours, and two
threads that wait for each other burn CPU time spinning, so `--clock cpu` runs 1 thread and counts
its CPU time at half: two idle cores do the same work in half the time (a training step costs the
same CPU time with 1 or 2 threads on an idle machine, within 5%). For the quickstart arm this swaps
the trainer's clock (`vaekit.train.time`) for that clock; nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vaekit.data import sample_images, center_crop, to_tensor, to_uint8, training_data
from vaekit.metrics import bicubic_thumbnail, psnr, ssim

CORES = 2  # the budget is for a 2-core CPU
RESOLUTION = 256


def held_out() -> np.ndarray:
    """The three held-out photos at 256x256 (N x 256 x 256 x 3 uint8), as the trainer validates them."""
    return np.stack([center_crop(image, RESOLUTION) for _, image in sample_images("val")])


def scores(recons: np.ndarray, originals: np.ndarray) -> dict[str, Any]:
    p, s = psnr(recons, originals), ssim(recons, originals)
    return {"psnr": float(p.mean()), "ssim": float(s.mean()), "per_image_psnr": [round(float(v), 2) for v in p]}


def make_clock(kind: str) -> Callable[[], float]:
    if kind == "wall":
        return time.time
    return lambda: time.process_time() / CORES


# ---- arms -------------------------------------------------------------------------------------


def bicubic(factor: int, originals: np.ndarray) -> dict[str, Any]:
    recons = np.stack([bicubic_thumbnail(im, factor) for im in originals])
    return {"arm": "bicubic", "recipe": f"{factor}x bicubic thumbnail ({3 * (8 // factor) ** 2} numbers per 8x8 patch)",
            **scores(recons, originals)}  # fmt: skip


def plain_diffusers(channels: int, seconds: float, clock: Callable[[], float], lr: float, originals: np.ndarray,
                    seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The issue's baseline: what a user writes around diffusers without a trainer."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = 4
    model = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, latent_channels=channels,
    ).train()  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = iter(training_data("samples", 64, min_scale=1.0).loader(16, seed))
    started, wall, cpu, steps = clock(), time.time(), time.process_time(), 0
    while clock() - started < seconds:
        x = next(batches).images.float() / 127.5 - 1.0
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    wall, cpu = time.time() - wall, time.process_time() - cpu
    model.eval()
    with torch.no_grad():
        x = torch.cat([to_tensor(im) for im in originals])
        recons = to_uint8(model.decode(model.encode(x).latent_dist.mode()).sample)
    recipe = f"diffusers AutoencoderKL (32,64,128,128)x1, AdamW lr {lr:g}, L1 + 1e-6 KL, batch 16, 64px crops"
    return {"arm": "diffusers", "recipe": recipe, "steps": steps, "wall_s": wall, "cpu_s": cpu, **scores(recons, originals)}


def vaekit_quickstart(channels: int, seconds: float, clock_kind: str, originals: np.ndarray) -> dict[str, Any]:
    """`vaekit quickstart`'s code path; the trainer's own validation is the same held-out view."""
    from vaekit import train as trainer

    recipe = trainer.QUICKSTART
    if clock_kind == "cpu":
        trainer.time = types.SimpleNamespace(time=make_clock("cpu"))  # the trainer's only clock call is time.time()
    try:
        with tempfile.TemporaryDirectory() as out:
            wall, cpu = time.time(), time.process_time()
            result = trainer.quickstart(out=str(Path(out) / "run"), seconds=seconds, progress=False,
                                        latent_channels=channels)
            wall, cpu = time.time() - wall, time.process_time() - cpu
    finally:
        trainer.time = time
    final = result.metrics["final"]
    names = [p["name"] for p in final["per_image"]]
    if names != [n for n, _ in sample_images("val")]:
        raise RuntimeError(f"the trainer validated on {names}, not the benchmark's held-out photos")
    return {
        "arm": "quickstart", "recipe": describe(recipe, channels), "steps": result.metrics["step"], "wall_s": wall, "cpu_s": cpu,
        "psnr": final["psnr"], "ssim": final["ssim"], "per_image_psnr": [round(p["psnr"], 2) for p in final["per_image"]],
    }  # fmt: skip


def describe(recipe: Any, channels: int) -> str:
    loss = recipe.loss
    return (f"{recipe.preset} with {channels} latent channels, AdamW lr {recipe.lr:g} (warm-up {recipe.warmup}, cosine to x{recipe.min_lr_ratio:g}), "
            f"{loss.pixel} + {loss.kl_weight:g} KL, batch {recipe.batch_size}, {recipe.resolution}px crops "
            f"(scale {recipe.min_scale:g}-1{', colours permuted' if recipe.permute_colors else ''}), EMA {recipe.ema_decay:g}")  # fmt: skip


# ---- main -------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| latent | arm | recipe | steps | wall s | CPU s | PSNR dB | SSIM | per image (chelsea, coffee, flower) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        t = lambda k: f"{r[k]:.0f}" if k in r else "-"  # noqa: E731
        lines.append(f"| {r['channels']} | {r['arm']} | {r['recipe']} | {r.get('steps', '-')} | {t('wall_s')} | {t('cpu_s')} "
                     f"| {r['psnr']:.2f} | {r['ssim']:.3f} | {', '.join(f'{v:.2f}' for v in r['per_image_psnr'])} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0, help="training budget per model (default: 300)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what --seconds measures (default: wall)")
    p.add_argument("--channels", type=int, nargs="+", choices=(4, 16), default=[4, 16])
    p.add_argument("--arms", nargs="+", choices=("diffusers", "quickstart", "bicubic"), default=["diffusers", "quickstart", "bicubic"])
    p.add_argument("--diffusers-lr", type=float, default=1e-4, help="the plain arm's learning rate (issue: 1e-4; also try 1e-3)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()

    torch.set_num_threads(CORES if args.clock == "wall" else 1)
    originals = held_out()
    rows: list[dict[str, Any]] = []
    for channels in args.channels:
        for arm in args.arms:
            if arm == "bicubic":
                row = bicubic(8 if channels == 4 else 4, originals)
            elif arm == "diffusers":
                row = plain_diffusers(channels, args.seconds, make_clock(args.clock), args.diffusers_lr, originals)
            else:
                row = vaekit_quickstart(channels, args.seconds, args.clock, originals)
            rows.append({"channels": channels, **row})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nbudget {args.seconds:g} s ({args.clock} clock), {torch.get_num_threads()} thread(s), held-out chelsea/coffee/flower at {RESOLUTION}x{RESOLUTION}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
