"""What latent channels buy (docs/LATENT_SPACES.md): the same autoencoder trained with 4, 8, 16 and 32
latent channels at 8x and 64 at 16x, the same recipe and steps, then measured on the held-out photos,
on rendered text, and in latent space.

    python bench/latent_spaces.py                     # ~45 min on a 2-core CPU; writes runs/latent_spaces/
    python bench/latent_spaces.py --doc-images docs/img   # and the pictures in docs/img
    python bench/latent_spaces.py --kl-weight 1e-6 --arms f8c4 f8c16 f8c32 --out runs/latent_spaces_kl1e-6  # SD's KL

Models: `tiny-fast-f8c4` (the quickstart's architecture: DC-AE shortcuts, 2x2 patch stem, widths 32, 64,
128) with `latent_channels` = 4, 8, 16, 32; for 16x one more level of width 128 and 64 channels (the
same 1/4 latent number per image pixel as 16 channels at 8x). Recipe: `vaekit.train.QUICKSTART` with a
fixed step count (same batches for all), its KL weight (LDM's 0.012288).
Measures: PSNR/SSIM of the posterior-mode reconstructions of (a) the three held-out photos, shorter side
256, centre crop (whole scenes scaled down), (b) 256x256 centre crops of the same photos at their native
resolution (the fine detail real use brings), and (c) four 256x256 pages of text drawn with PIL's built-in font at 8-28 px, black on
white and coloured; then `vaekit compare` on the photos for the latent-space measures. LPIPS is left out
(its weights need a download). Baselines: the bicubic thumbnail at 8x, 4x and 2x (3, 12 and 48 numbers per
8x8 patch, plotted at those channel counts). Outputs: OUT/table.json, OUT/table.md, OUT/channels.png, OUT/report/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import vaekit
from vaekit import preset
from vaekit.cli import main as cli
from vaekit.data import center_crop, sample_images, to_tensor, to_uint8
from vaekit.metrics import bicubic_thumbnail, psnr, ssim
from vaekit.train import QUICKSTART, train

ARMS = {"f8c4": (8, 4), "f8c8": (8, 8), "f8c16": (8, 16), "f8c32": (8, 32), "f16c64": (16, 64)}
THUMBNAILS = {8: 3, 4: 12, 2: 48}  # bicubic thumbnail factor: numbers kept per 8x8 patch, the channels it compares with
SD3_TABLE = {4: 25.12, 8: 26.40, 16: 28.62}  # the SD3 paper's VAE ablation, PSNR at 8x (their models and data)
TEXT = ("The quick brown fox jumps over the lazy dog. 0123456789",
        "Latent diffusion compresses pixels; text is the first thing to go.",
        "VAEKIT: PSNR SSIM LPIPS rFID - channels 4 8 16 32 64")  # fmt: skip


def text_pages(size: int = 256) -> list[tuple[str, np.ndarray]]:
    """Pages of text at several point sizes: black on white, white on blue, red on yellow, mixed sizes."""
    pages = []
    for name, ink, paper, sizes in (("black-on-white", "black", "white", (8, 10, 12, 14)),
                                    ("white-on-blue", "white", (20, 40, 160), (12, 16, 20)),
                                    ("red-on-yellow", (200, 20, 20), (250, 230, 60), (10, 14, 18)),
                                    ("large", "black", "white", (20, 28))):  # fmt: skip
        page = Image.new("RGB", (size, size), paper)
        draw, y = ImageDraw.Draw(page), 4
        while y < size - 8:
            for points in sizes:
                for line in TEXT:
                    draw.text((4, y), line, fill=ink, font=ImageFont.load_default(size=points))
                    y += points + 3
        pages.append((name, np.asarray(page)))
    return pages


def native_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre size x size pixels at the photo's own resolution: no resize smooths the detail away."""
    y, x = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[y : y + size, x : x + size])


def config(factor: int, channels: int) -> dict:
    """The quickstart's architecture with `channels` latent channels; 16x adds a level of the last width."""
    base = preset("tiny-fast-f8c4").replace(family="", latent_channels=channels)  # what docs/LATENT_SPACES.md measured
    if factor == 16:
        base = base.replace(block_channels=(*base.block_channels, base.block_channels[-1]))
    return base.to_dict()


@torch.no_grad()
def scores(model_dir: Path, images: list[tuple[str, np.ndarray]]) -> dict:
    model = vaekit.load(model_dir, dtype=torch.float32)
    originals = np.stack([im for _, im in images])
    recons = np.concatenate([to_uint8(model(to_tensor(im), pad=True)[0]) for _, im in images])
    p, s = psnr(recons, originals), ssim(recons, originals)
    return {"psnr": float(p.mean()), "ssim": float(s.mean()), "per_image": {n: round(float(v), 2) for (n, _), v in zip(images, p)},
            "recons": recons}  # fmt: skip


def thumbnail_scores(images: list[tuple[str, np.ndarray]], factor: int) -> dict:
    originals = np.stack([im for _, im in images])
    recons = np.stack([bicubic_thumbnail(im, factor) for im in originals])
    return {"psnr": float(psnr(recons, originals).mean()), "ssim": float(ssim(recons, originals).mean())}


def plot(rows: dict, thumbnails: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    eight = [k for k in rows if rows[k]["factor"] == 8]
    x = [rows[k]["channels"] for k in eight]
    sixteen = [k for k in rows if rows[k]["factor"] == 16]
    for ax, keys in zip(axes, ((("photos", "scaled"), ("crops", "native crops")), (("text", "text"),))):
        for (key, label), colour in zip(keys, ("C0", "C1")):
            ax.plot(x, [rows[k][key]["psnr"] for k in eight], "o-", color=colour, label=f"{label}: VAE, 8x")
            ax.plot([16 for _ in sixteen], [rows[k][key]["psnr"] for k in sixteen], "s", color=colour, label=f"{label}: VAE, 16x 64 ch")
        for (key, label), colour in zip(keys, ("C0", "C1")):
            ax.plot(list(THUMBNAILS.values()), [thumbnails[f][key]["psnr"] for f in THUMBNAILS], ":", color=colour, alpha=0.7,
                    label=f"{label}: bicubic thumbnail")  # fmt: skip
        if keys[0][0] == "photos":
            ax.plot(list(SD3_TABLE), list(SD3_TABLE.values()), "^--", color="grey", label="SD3 paper (their VAEs, data)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([3, 4, 8, 12, 16, 32, 48], ["3", "4", "8", "12", "16", "32", "48"])
        ax.set_xlabel("numbers per 8x8 patch (= channels at 8x)")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title("held-out photos: scaled, native crops" if len(keys) == 2 else "rendered text")
        ax.legend(fontsize=6.5, loc="lower right")
    ax = axes[2]
    for measure, label in (("latent_std", "latent std"), ("kl_mean", "KL / element (nats)"), ("latent_high_frequency", "latent high-freq. share")):
        ax.plot(x, [rows[k]["latent"][measure] for k in eight], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([4, 8, 16, 32], ["4", "8", "16", "32"])
    ax.set_xlabel("latent channels at 8x")
    ax.set_title("latent space (held-out photos)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/latent_spaces", help="folder for the runs, the report, table and plot")
    p.add_argument("--steps", type=int, default=1200, help="training steps per model (default 1200)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="models to train and compare (default all)")
    p.add_argument("--kl-weight", type=float, default=QUICKSTART.loss.kl_weight,
                   help=f"LDM's kl_weight for every arm (default the quickstart's, {QUICKSTART.loss.kl_weight}; SD's is 1e-6)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--doc-images", metavar="DIR", help="also copy the plot and a text crop comparison there")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    photos = [(n, center_crop(im, 256)) for n, im in sample_images("val")]
    crops = [(n, native_crop(im, 256)) for n, im in sample_images("val")]
    pages = text_pages()
    rows: dict = {}
    arms = {name: ARMS[name] for name in args.arms}
    loss = dataclasses.replace(QUICKSTART.loss, kl_weight=args.kl_weight)
    for name, (factor, channels) in arms.items():
        run = out / name
        if not (run / "model").is_dir():
            train(dataclasses.replace(QUICKSTART, out=str(run), config=config(factor, channels), loss=loss, steps=args.steps, seconds=None))
        params = vaekit.load(run / "model").num_parameters()
        photo, crop, text = (scores(run / "model", images) for images in (photos, crops, pages))
        rows[name] = {"factor": factor, "channels": channels, "parameters": params, "photos": photo, "crops": crop, "text": text}
        print(f"{name}: photos {photo['psnr']:.2f} dB / {photo['ssim']:.3f}, native crops {crop['psnr']:.2f} dB / {crop['ssim']:.3f}, "
              f"text {text['psnr']:.2f} dB / {text['ssim']:.3f}")
    code = cli(["compare", *[str(out / n / "model") for n in arms], "samples:val", "--report", str(out / "report"),
                   "--resolution", "256", "--lpips", "off", "--samples", "8", "--pairs", "2"])  # fmt: skip
    if code:
        raise SystemExit(code)
    numbers = json.loads((out / "report" / "report.json").read_text())["models"]
    for name in arms:
        lat = numbers[str(out / name / "model")]["latents"]
        rows[name]["latent"] = {"latent_std": lat["normalised_std"], "kl_mean": lat["kl_mean"], "posterior_noise": lat["posterior_noise"],
                                "latent_high_frequency": lat["high_frequency_fraction"]}  # fmt: skip
    thumbnails = {f: {key: thumbnail_scores(images, f) for key, images in (("photos", photos), ("crops", crops), ("text", pages))}
                  for f in THUMBNAILS}  # fmt: skip
    plot(rows, thumbnails, out / "channels.png")
    table = ["| model | params | photos PSNR / SSIM | native crops PSNR / SSIM | text PSNR / SSIM | latent std | KL / element | posterior noise | latent high-freq. |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lat = r["latent"]
        table.append(f"| {r['factor']}x, {r['channels']} ch | {r['parameters'] / 1e6:.2f}M | {r['photos']['psnr']:.2f} / {r['photos']['ssim']:.3f} | "
                     f"{r['crops']['psnr']:.2f} / {r['crops']['ssim']:.3f} | {r['text']['psnr']:.2f} / {r['text']['ssim']:.3f} | {lat['latent_std']:.2f} | {lat['kl_mean']:.2f} | "
                     f"{lat['posterior_noise']:.4f} | {lat['latent_high_frequency']:.3f} |")  # fmt: skip
    for f, n in THUMBNAILS.items():
        t = thumbnails[f]
        table.append(f"| bicubic {f}x thumbnail ({n} per 8x8) | - | {t['photos']['psnr']:.2f} / {t['photos']['ssim']:.3f} | "
                     f"{t['crops']['psnr']:.2f} / {t['crops']['ssim']:.3f} | {t['text']['psnr']:.2f} / {t['text']['ssim']:.3f} | - | - | - | - |")  # fmt: skip
    (out / "table.md").write_text("\n".join(table) + "\n")
    for r in rows.values():
        for part in ("photos", "crops", "text"):
            r[part].pop("recons")
    (out / "table.json").write_text(json.dumps({"models": rows, "bicubic_thumbnails": thumbnails}, indent=2) + "\n")
    print("\n".join(table))
    if args.doc_images:
        doc = Path(args.doc_images)
        doc.mkdir(parents=True, exist_ok=True)
        Image.open(out / "channels.png").save(doc / "latent_spaces_channels.png", optimize=True)
        crops = [("original", pages[0][1][:96, :160])] + [
            (f"{arms[n][1]} ch at {arms[n][0]}x", scores(out / n / "model", pages[:1])["recons"][0][:96, :160]) for n in arms]
        sheet = Image.new("RGB", (3 * 330, 2 * 216), "white")  # 2x2 pixel blocks, so the loss of each stroke shows
        draw = ImageDraw.Draw(sheet)
        for i, (label, crop) in enumerate(crops):
            x, y = (i % 3) * 330, (i // 3) * 216
            sheet.paste(Image.fromarray(crop).resize((320, 192), Image.NEAREST), (x, y + 22))
            draw.text((x + 2, y + 2), label, fill="black", font=ImageFont.load_default(size=16))
        sheet.save(doc / "latent_spaces_text.png", optimize=True)


if __name__ == "__main__":
    main()
