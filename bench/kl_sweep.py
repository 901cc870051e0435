"""The KL curve (docs/AE_vs_VAE.md): the quickstart architecture trained as a plain AE and as a VAE at KL
weights from 1e-6 to 1, the same batches and steps, each measured by `vaekit compare` (reconstruction,
sharpness, continuity, completeness, latent statistics and spectrum, KL per channel) and by
`vaekit diffusability`; then scale equivariance as a short fine-tune of one of them, against the same
fine-tune without it.

    python bench/kl_sweep.py                                    # the docs' run (about 80 minutes on 2 CPU cores)
    python bench/kl_sweep.py --steps 200 --kl-weights 1e-4 1    # a quick look
    python bench/kl_sweep.py --plot-only                        # redraw docs/img/kl_sweep.png from OUT/report

KL weights are LDM's `kl_weight` (docs/TRAINING.md): the KL summed over latent elements against the pixel
loss summed over an image's 3·64·64 values. Recipe: `vaekit.train.QUICKSTART` (tiny-thumb-f8c4, 64² crops
of the 13 built-in training photos, L1) with fixed steps instead of a time budget, seed 0 for every arm.
Also trained: the 16-channel variant (tiny-thumb-f8c16) at the --se-base weight, and scored: pixel space
(preset:pixel), the baseline a latent space must beat. Scale equivariance: --se-steps more steps from the
--se-base VAE with `--scale-equivariance --se-weight`, and the same steps with weight 0 (the control).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from vaekit.cli import main as vaekit
from vaekit.diffusability import Protocol
from vaekit.report import MEASURES, fmt, lookup
from vaekit.train import QUICKSTART, train

TABLE = [
    "reconstruction.psnr", "reconstruction.ssim", "blur.high_frequency_ratio",
    "continuity.interpolation.l2.worst_jump", "continuity.perturbation.l2.mean_step",
    "completeness.prior.distance.gradient", "completeness.fitted.distance.gradient",
    "latents.normalised_std", "latents.kl_mean", "latents.kl_min", "latents.posterior_noise",
    "latents.high_frequency_fraction", "diffusability.score", "diffusability.samples.distance.gradient",
    "diffusability.samples.kid.mean",
]
PLOTTED = [p for p in TABLE if p != "diffusability.samples.kid.mean"]


def arm_config(out: Path, kind: str | None, kl_weight: float, steps: int, **changes):
    """QUICKSTART with fixed steps; kind None: the --init checkpoint's."""
    loss = dataclasses.replace(QUICKSTART.loss, kl_weight=kl_weight if kind != "ae" else QUICKSTART.loss.kl_weight,
                               **changes.pop("loss", {}))  # fmt: skip
    return dataclasses.replace(QUICKSTART, out=str(out), kind=kind, loss=loss, steps=steps, seconds=None, **changes)


def plot(report: Path, weights: dict[str, float | None], path: Path) -> None:
    """Every measure against the KL weight; the AE at the left edge."""
    from matplotlib.figure import Figure

    numbers = json.loads((report / "report.json").read_text())["models"]
    sweep = [m for m in numbers if m in weights]
    xs = {m: weights[m] for m in sweep}
    vae = sorted((m for m in sweep if xs[m] is not None), key=lambda m: xs[m])
    ae = [m for m in sweep if xs[m] is None]
    left = min(xs[m] for m in vae) / 10
    cols = 4
    rows = -(-len(PLOTTED) // cols)
    fig = Figure(figsize=(3.1 * cols, 2.3 * rows), dpi=100, layout="constrained")
    for i, key in enumerate(PLOTTED):
        ax = fig.add_subplot(rows, cols, i + 1)
        m = MEASURES[key]
        ax.plot([xs[v] for v in vae], [lookup(numbers[v], key) for v in vae], marker="o", ms=3, lw=1.4)
        for a in ae:
            if lookup(numbers[a], key) is not None:
                ax.plot([left], [lookup(numbers[a], key)], marker="s", color="C3", ls="")
        ax.set_xscale("log")
        ticks = [left] + [xs[v] for v in vae][::2]
        ax.set_xticks(ticks, ["AE"] + [f"{xs[v]:g}" for v in vae][::2], fontsize=7)
        ax.axvline(1e-6, color="#bbb", ls=":", lw=1)  # SD's kl_weight
        direction = {"high": " ↑", "low": " ↓", "one": " → 1"}.get(m.better, "")
        ax.set_title(m.label + direction, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("quickstart architecture (tiny-thumb-f8c4) against LDM's kl_weight (dotted: SD's 1e-6; square: plain AE)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/kl_sweep", help="folder for every run and the report (default runs/kl_sweep)")
    p.add_argument("--steps", type=int, default=700, help="training steps of every arm (default 700)")
    p.add_argument("--kl-weights", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0], metavar="W")
    p.add_argument("--se-base", type=float, default=1e-2, help="KL weight of the VAE fine-tuned with scale equivariance (default 1e-2)")
    p.add_argument("--se-steps", type=int, default=300, help="fine-tuning steps with and without scale equivariance (default 300)")
    p.add_argument("--se-weight", type=float, default=1.0, help="--scale-equivariance weight of the fine-tune (default 1)")
    p.add_argument("--no-extras", action="store_true", help="only the sweep: no 16-channel arm, no pixel space, no scale equivariance")
    p.add_argument("--diffusability-steps", type=int, default=Protocol.steps, metavar="N",
                   help=f"denoiser steps of the diffusability protocol (default {Protocol.steps}, the protocol's own)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", default="docs/img/kl_sweep.png", help="where to draw the curves (default docs/img/kl_sweep.png)")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT/report and print the table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    arms: dict[str, tuple[str, float | None]] = {"ae": ("ae", None)} | {f"vae_kl{w:g}": ("vae", w) for w in args.kl_weights}
    models = {name: out / name / "model" for name in arms}
    labels = {name: "AE" if kind == "ae" else f"VAE {w:g}" for name, (kind, w) in arms.items()}
    extras: dict[str, Path | str] = {}
    if not args.no_extras:
        extras = {"f8c16": out / "f8c16" / "model", "se_control": out / "se_control" / "model", "se": out / "se" / "model",
                  "pixel": "preset:pixel"}  # fmt: skip
        labels |= {"f8c16": f"VAE {args.se_base:g}, 16 ch", "se_control": f"VAE {args.se_base:g} +{args.se_steps} steps",
                   "se": f"VAE {args.se_base:g} +{args.se_steps} steps, SE {args.se_weight:g}", "pixel": "pixel space"}  # fmt: skip

    if not args.plot_only:
        for name, (kind, w) in arms.items():
            if not (models[name] / "config.json").is_file():
                train(arm_config(out / name, kind, w or 0.0, args.steps), progress=True)
        if extras:
            if not (extras["f8c16"] / "config.json").is_file():
                train(arm_config(out / "f8c16", "vae", args.se_base, args.steps, preset="tiny-thumb-f8c16"))
            base = models[f"vae_kl{args.se_base:g}"]
            for name, weight in (("se_control", 0.0), ("se", args.se_weight)):
                if not (extras[name] / "config.json").is_file():
                    cfg = arm_config(out / name, None, args.se_base, args.se_steps, init=str(base), warmup=10,
                                     lr=QUICKSTART.lr / 4, loss={"scale_equivariance": weight})  # fmt: skip
                    train(cfg)
        sources = [str(m) for m in models.values()] + [str(e) for e in extras.values()]
        code = vaekit(["compare", *sources, "samples:val", "--report", str(out / "report"), "--resolution", "256",
                       "--samples", "16", "--pairs", "3", "--lpips", "off", "--diffusability", "samples",
                       "--diffusability-steps", str(args.diffusability_steps)])  # fmt: skip
        if code:
            raise SystemExit(code)

    numbers = json.loads((out / "report" / "report.json").read_text())["models"]
    by_source = {str(models.get(n, extras.get(n))): n for n in labels}
    names = [by_source[s] for s in numbers]
    print(f"\n| measure | {' | '.join(labels[n] for n in names)} |\n|---|{'---|' * len(names)}")
    for path in TABLE:
        m = MEASURES[path]
        print(f"| {m.label} | " + " | ".join(fmt(lookup(numbers[s], path), m.digits) for s in numbers) + " |")
    print("\nKL per channel (nats per element):")
    for s in numbers:
        channels = numbers[s]["latents"]["channels"]
        if channels and channels[0].get("kl") is not None:
            print(f"  {labels[by_source[s]]}: " + ", ".join(f"{c['kl']:.3g}" for c in channels))
    print("\ndenoising error per noise level " + str(next(iter(numbers.values()))["diffusability"]["levels"]) + ":")
    for s in numbers:
        print(f"  {labels[by_source[s]]}: " + ", ".join(f"{e:.3f}" for e in numbers[s]["diffusability"]["errors"]))
    weights = {str(models[n]): w for n, (_, w) in arms.items()}
    plot(out / "report", weights, Path(args.plot))
    print(f"\nplot: {args.plot}; report: {out / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
