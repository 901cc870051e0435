"""The textbook AE-vs-VAE argument, measured (docs/AE_vs_VAE.md): train a plain AE and a VAE with
the same recipe and budget, then `vaekit compare` them on the held-out photos.

    python bench/ae_vs_vae.py                       # quickstart budget for the VAE, same steps for the AE
    python bench/ae_vs_vae.py --steps 1400          # a fixed number of steps for both (docs/AE_vs_VAE.md)
    python bench/ae_vs_vae.py --out runs/ae_vs_vae --resolution 256
    python bench/ae_vs_vae.py --steps 1400 --kl-weights 0.012288 1e-6   # two VAEs (LDM's kl_weight) and the AE

Recipe: `vaekit.train.QUICKSTART` on `tiny-fast-f8c4`, the quickstart's model when docs/AE_vs_VAE.md was
measured (the `vaekit quickstart` settings: 64 px crops of
the 13 built-in training photos, L1 + KL, ...), changing only `kind` and, with --kl-weights, the KL
weight (LDM's convention, docs/TRAINING.md). Budget: the first VAE trains for the quickstart's
wall-clock budget unless --steps is given; the other models then train for exactly as many steps, so
all see the same batches (same seed) and the same schedule. All are compared on the three held-out
photos (chelsea, coffee, flower). The run folders keep everything: OUT/vae (OUT/vae_kl<W> for each
further weight), OUT/ae (checkpoints, samples, metrics.json) and OUT/report (report.html, report.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from vaekit.cli import main as vaekit
from vaekit.report import MEASURES, fmt, lookup
from vaekit.train import QUICKSTART, train

RECIPE = dataclasses.replace(QUICKSTART, preset="tiny-fast-f8c4")  # what docs/AE_vs_VAE.md measured

TABLE = [
    "reconstruction.psnr", "reconstruction.ssim", "blur.high_frequency_ratio",
    "continuity.interpolation.l2.worst_jump", "continuity.interpolation.l2.detour",
    "continuity.perturbation.l2.mean_step", "continuity.perturbation.l2.worst_jump",
    "completeness.prior.distance.gradient", "completeness.prior.distance.spectrum_slope", "completeness.prior.distance.color",
    "completeness.fitted.distance.gradient", "completeness.fitted.distance.spectrum_slope",
    "completeness.reconstructions.distance.gradient",
    "latents.normalised_std", "latents.kl_mean", "latents.posterior_noise", "latents.high_frequency_fraction",
]


def doc_images(report: Path, out: Path, labels: list[str], frame: int = 80) -> None:
    """Small copies of the report's pictures for docs/img/: one row per model (labelled), frames downsized."""
    from PIL import Image, ImageDraw

    side = json.loads((report / "report.json").read_text())["models"]
    side = next(iter(side.values()))["resolution"][0]
    models = sorted((report / "models").iterdir())  # in the order compared, as `labels`

    def frames(path: Path) -> list[Image.Image]:
        image = Image.open(path).convert("RGB")
        return [image.crop((x, 0, x + side, side)).resize((frame, frame), Image.LANCZOS) for x in range(0, min(image.width, 8 * side), side)]

    def rows(name: str, pictures: list[list[Image.Image]], labels: list[str], label_width: int = 76) -> None:
        cell = pictures[0][0].width
        canvas = Image.new("RGB", (label_width + cell * max(map(len, pictures)), cell * len(pictures)), "white")
        draw = ImageDraw.Draw(canvas)
        for r, (label, row) in enumerate(zip(labels, pictures)):
            draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
            for c, f in enumerate(row):
                canvas.paste(f, (label_width + c * cell, r * cell))
        canvas.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out / f"ae_vs_vae_{name}.png", optimize=True)

    out.mkdir(parents=True, exist_ok=True)
    for name in ("interpolation_0", "perturbation_0", "samples_prior", "samples_fitted"):
        rows(name.removesuffix("_0").removeprefix("samples_"), [frames(m / f"{name}.png") for m in models], labels)
    crops = sorted(report.glob("crop_*_original.png"))
    kinds = ["original"] + [f"model{i}" for i in range(len(models))]
    grid = [[Image.open(report / c.name.replace("original", k)).convert("RGB") for k in kinds] for c in crops]
    rows("crops", [[im.resize((2 * frame, 2 * frame), Image.NEAREST) for im in row] for row in grid], [""] * len(grid), 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ae_vs_vae", help="folder for both runs and the report (default: runs/ae_vs_vae)")
    p.add_argument("--steps", type=int, help="train each model for this many steps (default: the first VAE's quickstart budget, then as many for the others)")
    p.add_argument("--kl-weights", type=float, nargs="+", metavar="W", default=[QUICKSTART.loss.kl_weight],
                   help=f"one VAE per KL weight (LDM's convention; default: the quickstart's {QUICKSTART.loss.kl_weight:g})")
    p.add_argument("--resolution", type=int, default=256, help="side of the held-out crops compared (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the quickstart's machine)")
    p.add_argument("--doc-images", metavar="DIR", help="also write small copies of the report's pictures there (docs/img)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    steps = args.steps
    arms = {("vae" if i == 0 else f"vae_kl{w:g}"): ("vae", w) for i, w in enumerate(args.kl_weights)} | {"ae": ("ae", 0.0)}
    runs = {}
    for name, (kind, kl_weight) in arms.items():
        loss = dataclasses.replace(RECIPE.loss, kl_weight=kl_weight) if kind == "vae" else RECIPE.loss
        cfg = dataclasses.replace(RECIPE, out=str(out / name), kind=kind, loss=loss)
        if steps:
            cfg = dataclasses.replace(cfg, steps=steps, seconds=None)
        result = train(cfg)
        steps = result.metrics["steps"]  # the others get exactly the first VAE's budget in steps
        runs[name] = result
        print(f"{name}: {steps} steps, held-out PSNR {result.metrics['final']['psnr']:.2f} dB")

    models = [str(run.model) for run in runs.values()]
    labels = [f"VAE {arms[name][1]:g}" if arms[name][0] == "vae" else "AE" for name in runs]
    code = vaekit(["compare", *models, "samples:val", "--report", str(out / "report"), "--resolution", str(args.resolution),
                   "--samples", "16", "--pairs", "3"])
    if code:
        raise SystemExit(code)
    numbers = json.loads((out / "report" / "report.json").read_text())["models"]
    print(f"\n| measure | {' | '.join(labels)} |\n|---|{'---|' * len(labels)}")
    for path in TABLE:
        m = MEASURES[path]
        print(f"| {m.label} | " + " | ".join(fmt(lookup(numbers[model], path), m.digits) for model in models) + " |")
    print(f"\nsteps: {steps} each; report: {out / 'report' / 'report.html'}")
    if args.doc_images:
        doc_images(out / "report", Path(args.doc_images), labels)


if __name__ == "__main__":
    main()
