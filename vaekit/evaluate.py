"""`evaluate`: score an autoencoder's reconstructions of a set of images, with the protocol that
produced the numbers (published VAE scores disagree mostly through protocol, so it travels with them).

What is scored is exactly what `vaekit reconstruct` writes: posterior mode, padded to the model's
factor and cropped back, clamped and quantised to uint8 by `vaekit.data.to_uint8`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .data import center_crop, find_images, iter_images, to_tensor, to_uint8
from .config import AutoencoderConfig
from .metrics import (DEFAULT_METRICS, FID, LPIPS, PerImageMetric, as_uint8_images, bicubic_thumbnail, build_metric,
                      colour_error, package_version, periodic_energy, psnr, ssim)  # fmt: skip
from .model import Autoencoder
from .progress import progress as progress_bar

Metric = PerImageMetric | LPIPS | FID


def evaluate(
    model: Autoencoder | str | Path,
    data: str | Path,
    metrics: Sequence[str | Metric] = DEFAULT_METRICS,
    resolution: int | None = None,
    batch_size: int = 1,
    lpips_net: str = "alex",
    device: str | torch.device | None = None,
    family: str | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """Reconstruct every image of `data` and score it.

    model: an Autoencoder (used on its own device) or anything `vaekit.load` accepts (loaded on
    `device`, with `family`). data: an image, a folder (recursive), tar shards or "samples".
    metrics: names from `vaekit.metrics.METRICS`, or metric objects (e.g. LPIPS with a random
    backbone in tests). resolution: None scores each image at its own size; R resizes the shorter
    side to R and cuts the centre R x R (`vaekit.data.center_crop`). batch_size > 1 reconstructs
    images of one size together: faster on a GPU, but a batch's float rounding differs from a single
    image's, so a few pixels may land one level away from `vaekit reconstruct`'s PNGs (1-2 of 12288
    measured at 64x64); batch_size=1 gives exactly those pixels. dtype: the compute dtype of a loaded
    model (fp32 by default, whatever the file stores; None keeps the stored one); seed: preset:NAME's
    random weights. Images smaller than a metric can score (SSIM 7 px, LPIPS 16-31 px, MS-SSIM 161
    px) are skipped before they are reconstructed and listed with the unreadable ones.

    Returns {"model", "data", "n", "resolution", "mean", "per_image", "seconds", "protocol"};
    rfid is a set-level score, so it appears in "mean" only.
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    if isinstance(model, (str, Path)):
        from .checkpoints import load

        name = str(model)
        model = load(name, family=family, device=str(device) if device is not None else None, dtype=dtype, seed=seed)
    else:
        name = _describe(model)
    device = model.device
    scorers = [build_metric(m, device, lpips_net) if isinstance(m, str) else m for m in metrics]
    names = [m.name for m in scorers]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give each metric once, got {names}")
    for m in scorers:
        if not m.per_image:
            m.reset()

    skipped: list[str] = []
    smallest = max(scorers, key=lambda m: m.min_side)
    rgba = model.config.rgba  # colour scored by the metrics, alpha by ALPHA_METRICS
    images = _images(data, resolution, skipped, smallest, rgba)
    total = len(find_images(data)) if Path(data).exists() else None
    per_image: dict[int, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        with progress_bar(desc="eval", unit="img", total=total, enabled=progress) as bar:
            for batch in _same_size_batches(images, batch_size):
                stack = np.stack([im for _, _, im in batch])  # a writable copy (sample photos are read-only)
                real = torch.from_numpy(stack).permute(0, 3, 1, 2).to(device)
                x = torch.cat([to_tensor(im) for im in stack]).to(device)
                with torch.inference_mode():
                    recon, _ = model(x, pad=True)  # posterior mode
                fake = torch.from_numpy(to_uint8(recon)).movedim(-1, -3).to(device)  # the PNGs' rounding
                for (i, source, _), alpha in zip(batch, alpha_scores(real, fake) if rgba else [{}] * len(batch)):
                    per_image[i] = {"source": source, **alpha}
                real, fake = real[:, :3], fake[:, :3]
                for m in scorers:
                    if not m.per_image:
                        m.update(real, fake)
                        continue
                    for (i, _, _), v in zip(batch, m(real, fake).tolist()):
                        per_image[i][m.name] = v
                bar.update(len(batch))
    finally:
        model.train(was_training)
    if not per_image:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise ValueError(f"no image in {data} could be scored" + (f": {skipped[0]}{more}" if skipped else ""))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} image(s): " + "; ".join(skipped), RuntimeWarning, stacklevel=2)

    rows = [per_image[i] for i in sorted(per_image)]
    mean: dict[str, float] = {}
    for m in scorers:
        mean[m.name] = float(np.mean([r[m.name] for r in rows])) if m.per_image else m.compute()  # FID warns on few images
    for name in ALPHA_METRICS if rgba else ():
        mean[name] = float(np.mean([r[name] for r in rows]))
    protocol = _protocol(model, scorers, resolution, batch_size, device, skipped)
    return {
        "model": name,
        "data": str(data),
        "n": len(rows),
        "resolution": resolution,
        "mean": mean,
        "per_image": rows,
        "seconds": round(time.perf_counter() - start, 3),
        "protocol": protocol,
    }


def _images(data: str | Path, resolution: int | None, skipped: list[str], smallest: Metric,
            alpha: bool = False) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """The images as scored (RGBA with `alpha`); those below the metrics' smallest size are skipped (named in `skipped`)."""
    for source, image in iter_images(str(data), skipped, alpha):
        image = center_crop(image, resolution) if resolution else image
        h, w = image.shape[:2]
        if min(h, w) < smallest.min_side:
            skipped.append(f"{source}: {h}x{w} px, below the {smallest.min_side} px a side {smallest.name} needs "
                           f"(score at a larger --resolution, or leave {smallest.name} out)")
            continue
        yield source, image


ALPHA_METRICS = ("alpha_psnr", "alpha_mae")


def alpha_scores(real: torch.Tensor, fake: torch.Tensor) -> list[dict[str, float]]:
    """Per image of uint8 NCHW RGBA batches, the alpha channel's PSNR (dB; PSNR_CAP when exact, as opaque images'
    alpha often is) and mean absolute error (levels of 255). The metrics score the colour channels as stored."""
    d = real[:, 3].double() - fake[:, 3].double()
    mse, mae = d.pow(2).mean(dim=(1, 2)), d.abs().mean(dim=(1, 2))
    return [{"alpha_psnr": min(PSNR_CAP, 10 * math.log10(255.0**2 / e)) if e > 0 else PSNR_CAP, "alpha_mae": float(a)}
            for e, a in zip(mse.tolist(), mae.tolist())]


def _same_size_batches(
    images: Iterable[tuple[str, np.ndarray]], batch_size: int
) -> Iterator[list[tuple[int, str, np.ndarray]]]:
    """(index, source, image) batches of one image size each; streams, holding at most one
    unfinished batch per distinct size."""
    buckets: dict[tuple[int, ...], list[tuple[int, str, np.ndarray]]] = {}
    for i, (source, image) in enumerate(images):
        bucket = buckets.setdefault(image.shape, [])
        bucket.append((i, source, image))
        if len(bucket) == batch_size:
            yield buckets.pop(image.shape)
    yield from buckets.values()


def _describe(model: Autoencoder) -> str:
    c = model.config
    return f"Autoencoder({c.family or 'custom'}, {c.kind}, f{c.factor}, {c.latent_channels} ch)"


def _protocol(
    model: Autoencoder, scorers: list[Metric], resolution: int | None, batch_size: int, device: torch.device, skipped: list[str]
) -> dict[str, Any]:
    if resolution is None:
        view = "each image at its own size"
    else:
        view = (f"shorter side resized to {resolution} px (Pillow {package_version('pillow')} Image.LANCZOS, "
                f"antialiased), then the centre {resolution}x{resolution} cut (vaekit.data.center_crop)")
    return {
        "reconstruction": {
            "latent": "posterior mode (the mean; no sampling)",
            "padding": f"reflect-pad height and width up to a multiple of {model.factor}, crop the output back "
            "(as vaekit reconstruct --pad)",
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(device),
            "batch_size": batch_size,
        },
        "images": {
            "view": view,
            "originals": ("the files' RGBA as uint8 (vaekit.data.read_image(alpha=True): alpha as stored, colours "
                          "unpremultiplied; no alpha: opaque); the metrics score R, G, B, alpha_psnr and alpha_mae "
                          "the alpha channel" if model.config.rgba else
                          "the files' RGB as uint8 (vaekit.data.read_image: alpha on white, 16-bit scaled)"),  # fmt: skip
            "quantisation": "reconstruction clamped to [-1, 1], (x + 1) * 127.5, torch.round (half to even), "
            "uint8: vaekit.data.to_uint8, the pixels of vaekit reconstruct's PNGs",
            "skipped": skipped,
        },
        "metrics": {m.name: dict(m.info) for m in scorers},
        "versions": {name: package_version(name) for name in ("vaekit", "torch", "numpy", "pillow")},
        "model_config": model.config.to_dict(),
    }


# ---- output --------------------------------------------------------------------------------


def to_json(result: dict[str, Any]) -> str:
    """Strict JSON: non-finite numbers (PSNR of identical images is inf) become null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(result), indent=2, allow_nan=False)


def format_table(result: dict[str, Any]) -> str:
    """The summary a person reads: one row per metric with mean, std, min and max over images."""
    size = "own sizes" if result["resolution"] is None else f"{result['resolution']}x{result['resolution']}"
    n = result["n"]
    lines = [f"{result['model']} on {result['data']}: {n} image{'' if n == 1 else 's'} ({size}), {result['seconds']:.1f} s"]
    rows = [("metric", "mean", "std", "min", "max")]
    for name, value in result["mean"].items():
        values = [r[name] for r in result["per_image"] if name in r]
        if values:
            spread = _fmt(float(np.std(values))) if all(math.isfinite(v) for v in values) else "-"  # inf PSNR: no spread
            rows.append((name, _fmt(value), spread, _fmt(min(values)), _fmt(max(values))))
        else:  # set-level (rfid)
            rows.append((name, _fmt(value), "-", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else str(v)


PSNR_CAP = 60.0  # an exact reconstruction (a flat patch) counts as 60 dB in means, not as infinity


def thumbnail_factor(config: AutoencoderConfig) -> int:
    """The bicubic thumbnail that keeps at most as many numbers per pixel as the model's latent: 3 per
    8x8 patch (8x) against 4 channels at 8x, 12 (4x) against 16 or 32, 48 (2x) against 64 at 8x."""
    factor, keep = config.factor, 3
    while factor > 1 and keep * 4 <= config.latent_channels:
        factor, keep = factor // 2, keep * 4
    return factor


def against_thumbnail(model: Autoencoder, images: Sequence[tuple[str, np.ndarray]], saturated: Sequence[str] = ()) -> dict[str, Any]:
    """Is the model a faithful coder of these images? PSNR/SSIM next to the bicubic thumbnail with as many
    numbers (`thumbnail_factor`), the worst image's gap to it, the mean-colour error (levels) of the
    `saturated` images, and the error's periodic energy at 2/4/8 px (`vaekit.metrics.periodic_energy`)
    for both. Images are reconstructed one at a time from the posterior mode, as `evaluate` does."""
    factor = thumbnail_factor(model.config)
    originals = [im for _, im in images]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            recons = [as_uint8_images(model(to_tensor(im).to(model.device), pad=True)[0].float())[0].permute(1, 2, 0).cpu().numpy()
                      for im in originals]  # fmt: skip
    finally:
        model.train(was_training)
    thumbs = [bicubic_thumbnail(im, factor) for im in originals]
    per_image = []
    for (name, im), rec, th in zip(images, recons, thumbs):
        p, t = min(float(psnr(rec, im)), PSNR_CAP), min(float(psnr(th, im)), PSNR_CAP)
        per_image.append({"name": name, "psnr": p, "ssim": float(ssim(rec, im)), "thumbnail_psnr": t, "gap": p - t,
                          "colour_error": float(colour_error(rec, im))})  # fmt: skip
    worst = min(per_image, key=lambda r: r["gap"])
    colours = [r["colour_error"] for r in per_image if r["name"] in saturated]
    same = lambda arrays: [a for a in arrays if a.shape == originals[0].shape]  # noqa: E731  (one spectrum size)
    mean = lambda key: float(np.mean([r[key] for r in per_image]))  # noqa: E731
    return {
        "n": len(per_image), "thumbnail_factor": factor, "psnr": mean("psnr"), "ssim": mean("ssim"),
        "thumbnail_psnr": mean("thumbnail_psnr"), "worst_gap": worst["gap"], "worst_image": worst["name"],
        "below_thumbnail_1db": sum(r["gap"] < -1 for r in per_image),
        "saturated_colour_error": max(colours) if colours else None,
        "periodic": periodic_energy(np.stack(same(recons)), np.stack(same(originals))),
        "thumbnail_periodic": periodic_energy(np.stack(same(thumbs)), np.stack(same(originals))),
        "per_image": per_image,
    }  # fmt: skip
