"""Quickstart quality benchmark (issues 4 and 12): how faithful the model of a 300-second training is,
on two held-out sets, against the bicubic thumbnail with as many numbers per patch.

    python bench/train_quality.py --json runs/train_quality.json   # 4 and 16 channels, every arm (~45 min)
    python bench/train_quality.py --channels 4 --arms quickstart bicubic
    python bench/train_quality.py --clock cpu               # a busy machine: budget in CPU time (see below)

Held-out sets (`vaekit.train.held_out_against_thumbnail` scores every trained arm, as `vaekit quickstart` does):
  photos      chelsea, coffee, flower: shorter side resized to 256 (Lanczos), centre 256x256, as the
              trainer validates them (whole photos scaled down).
  crops       the first part of samples:native: 10 crops of 256x256 at the photos' own resolution (from
              the held-out photos and from strips of the larger training photos that training never sees).
  synthetic   its second part: 7 synthetic saturated images (flat patches at and near the RGB cube's
              corners, hue and two-colour gradients, a petal-like shading). Colour error is measured here.
Columns: mean PSNR/SSIM; the thumbnail's PSNR; the worst image's gap to the thumbnail; how many images fall
more than 1 dB below it; the largest mean-colour shift (levels); the error's periodic energy at 2/4/8 px
(`vaekit.metrics.periodic_energy`: 1 = no grid; the bicubic row is the reference).

Arms, all trained on the built-in photos (`--data samples`):

  diffusers   the plain way: diffusers `AutoencoderKL`, block channels (32, 64, 128, 128), one layer
              per block, AdamW (torch defaults) at --diffusers-lr, mean L1 + 1e-6 * KL (sum over latent
              elements, as diffusers' posterior.kl(); against a *mean* L1 that is LDM's kl_weight
              1e-6 x 3 x 64 x 64 = 0.012288, the quickstart's), batch 16, 64x64 random crops (vaekit's crops,
              no down-scaling), posterior sampled; evaluated on the posterior mode.
  previous    the quickstart recipe before issue 12 (RECIPES["previous"]: tiny-fast-f8c4, colours permuted).
  quickstart  `vaekit.train.QUICKSTART`, through the trainer's code path (its step calibration, EMA model);
              16 channels change only `latent_channels`.
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
import dataclasses
import json
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vaekit import load
from vaekit.config import preset
from vaekit.data import held_out_sets, synthetic_colours, training_data
from vaekit.evaluate import PSNR_CAP, thumbnail_factor
from vaekit.losses import LossConfig
from vaekit.metrics import bicubic_thumbnail, colour_error, periodic_energy, psnr, ssim
from vaekit.train import held_out_against_thumbnail

CORES = 2  # the budget is for a 2-core CPU
RESOLUTION = 256


SATURATED = tuple(name for name, _ in synthetic_colours())


def make_clock(kind: str) -> Callable[[], float]:
    if kind == "wall":
        return time.time
    return lambda: time.process_time() / CORES


# ---- arms -------------------------------------------------------------------------------------


def bicubic(channels: int, sets: dict[str, list[tuple[str, np.ndarray]]]) -> dict[str, Any]:
    """The thumbnail's own row: its PSNR/SSIM, colour error and periodic energy, scored as the models are."""
    factor = thumbnail_factor(preset("tiny-f8c4").replace(latent_channels=channels))  # every arm is 8x
    rows = {}
    for name, images in sets.items():
        originals = np.stack([im for _, im in images])
        thumbs = np.stack([bicubic_thumbnail(im, factor) for im in originals])
        p = psnr(thumbs, originals).clamp(max=PSNR_CAP)
        saturated = [i for i, (n, _) in enumerate(images) if n in SATURATED]
        rows[name] = {"psnr": float(p.mean()), "ssim": float(ssim(thumbs, originals).mean()), "worst_gap": 0.0,
                      "below_thumbnail_1db": 0, "thumbnail_psnr": float(p.mean()),
                      "saturated_colour_error": float(colour_error(thumbs[saturated], originals[saturated]).max()) if saturated else None,
                      "periodic": periodic_energy(thumbs, originals)}  # fmt: skip
    return {"arm": "bicubic", "recipe": f"{factor}x bicubic thumbnail ({3 * (8 // factor) ** 2} numbers per 8x8 patch)", "sets": rows}


def plain_diffusers(channels: int, seconds: float, clock: Callable[[], float], lr: float,
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
    with tempfile.TemporaryDirectory() as folder:  # scored by the same code as every arm: through vaekit.load
        model.save_pretrained(folder)
        result = held_out_against_thumbnail(load(folder), RESOLUTION)
    recipe = f"diffusers AutoencoderKL (32,64,128,128)x1, AdamW lr {lr:g}, L1 + 1e-6 KL, batch 16, 64px crops"
    return {"arm": "diffusers", "recipe": recipe, "steps": steps, "wall_s": wall, "cpu_s": cpu, "sets": result}


# The recipes the trainer arms run: changes to vaekit.train.QUICKSTART. "previous" is the quickstart before
# issue 12 (DC-AE shortcuts and pixel-shuffle upsampling, no thumbnail shortcut, colours permuted).
RECIPES: dict[str, dict[str, Any]] = {
    "quickstart": {},
    "previous": dict(preset="tiny-fast-f8c4", min_scale=0.25, permute_colors=True, batch_size=16, lr=1e-3, warmup=50,
                     ema_decay=0.99, loss=LossConfig(pixel="l1", kl_weight=0.012288)),
}  # fmt: skip


def vaekit_recipe(arm: str, channels: int, seconds: float, clock_kind: str) -> dict[str, Any]:
    """`vaekit quickstart`'s code path (its step calibration, EMA model), with RECIPES[arm]'s changes."""
    from vaekit import train as trainer

    changes = {**RECIPES[arm], "latent_channels": channels}
    recipe = dataclasses.replace(trainer.QUICKSTART, **changes)
    if clock_kind == "cpu":
        trainer.time = types.SimpleNamespace(time=make_clock("cpu"))  # the trainer's only clock call is time.time()
    try:
        with tempfile.TemporaryDirectory() as out:
            wall, cpu = time.time(), time.process_time()
            result = trainer.train(dataclasses.replace(recipe, out=str(Path(out) / "run"), seconds=seconds), progress=False)
            wall, cpu = time.time() - wall, time.process_time() - cpu
            measured = held_out_against_thumbnail(load(result.model), RESOLUTION)
    finally:
        trainer.time = time
    return {"arm": arm, "recipe": describe(recipe, channels), "steps": result.metrics["step"], "wall_s": wall, "cpu_s": cpu,
            "sets": measured}  # fmt: skip


def describe(recipe: Any, channels: int) -> str:
    loss = recipe.loss
    return (f"{recipe.preset} with {channels} latent channels, AdamW lr {recipe.lr:g} (warm-up {recipe.warmup}, cosine to x{recipe.min_lr_ratio:g}), "
            f"{loss.pixel} + {loss.kl_weight:g} KL, batch {recipe.batch_size}, {recipe.resolution}px crops "
            f"(scale {recipe.min_scale:g}-1{', colours permuted' if recipe.permute_colors else ''}), EMA {recipe.ema_decay:g}")  # fmt: skip


# ---- main -------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for name, title in (("photos", "held-out photos (chelsea, coffee, flower at 256x256)"),
                        ("crops", "native-resolution crops (samples:native, 10 of 256x256)"),
                        ("synthetic", "synthetic saturated colours (samples:native, 7 of 256x256)")):  # fmt: skip
        lines += [f"**{title}**", "",
                  "| latent | arm | steps | PSNR dB | SSIM | thumbnail dB | worst gap dB | images > 1 dB below | colour error (saturated) | periodic 2 / 4 / 8 px |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            m = r["sets"][name]
            col = "-" if m["saturated_colour_error"] is None else f"{m['saturated_colour_error']:.1f}"
            per = " / ".join(f"{m['periodic'][k]:.1f}" for k in sorted(m["periodic"], key=int))
            lines.append(f"| {r['channels']} | {r['arm']} | {r.get('steps', '-')} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['thumbnail_psnr']:.2f} "
                         f"| {m['worst_gap']:+.2f} | {m['below_thumbnail_1db']} | {col} | {per} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0, help="training budget per model (default: 300)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what --seconds measures (default: wall)")
    p.add_argument("--channels", type=int, nargs="+", choices=(4, 16), default=[4, 16])
    arms = ("diffusers", "previous", "quickstart", "bicubic")
    p.add_argument("--arms", nargs="+", choices=arms, default=list(arms))
    p.add_argument("--diffusers-lr", type=float, default=1e-4, help="the plain arm's learning rate (issue: 1e-4; also try 1e-3)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()

    torch.set_num_threads(CORES if args.clock == "wall" else 1)
    sets = held_out_sets(RESOLUTION)
    rows: list[dict[str, Any]] = []
    for channels in args.channels:
        for arm in args.arms:
            if arm == "bicubic":
                row = bicubic(channels, sets)
            elif arm == "diffusers":
                row = plain_diffusers(channels, args.seconds, make_clock(args.clock), args.diffusers_lr)
            else:
                row = vaekit_recipe(arm, channels, args.seconds, args.clock)
            rows.append({"channels": channels, **row})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "sets"}), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nbudget {args.seconds:g} s ({args.clock} clock), {torch.get_num_threads()} thread(s)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
