"""What an autoencoder's latent space is like: continuity, completeness, latent statistics, blur.

The textbook case for a VAE over a plain AE is about its latent space: an AE's is discontinuous
(nearby latents decode to unrelated images) and incomplete (latents away from the data decode to
garbage); the KL-regularised VAE's is continuous and complete, but blurrier. Each function here turns
one of those claims into numbers (and pictures) for any model and any images. They are pure: a model
and images in, numbers and uint8 pictures out; `vaekit.report` renders them.

Conventions: images are NCHW floats in [-1, 1] of one size; latents are the *normalised* ones a
diffusion model sees (`model.normalize`); distances between images are RMSE in [0, 1] pixel units
("l2") and, when an LPIPS function is given, LPIPS.

RGBA images (a 4-channel model's) are measured as `vaekit eval` scores them: PSNR, SSIM and LPIPS of
R, G, B as stored, and the alpha channel apart (alpha_psnr, alpha_mae). RMSE distances, error maps,
spectra and colour statistics take all four channels; luma (edges, detail boxes) and the pictures are
of the image composited on white (`picture`), as a page shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .data import on_white_tensor, to_uint8
from .evaluate import ALPHA_METRICS, alpha_scores
from .metrics import psnr, ssim
from .model import Autoencoder
from .progress import progress as progress_bar

# Frequencies above this (cycles per pixel; Nyquist is 0.5) count as "high": the top half of the band.
HIGH_FREQUENCY = 0.25
# Gradient-magnitude histogram bins (grayscale in [0, 1]); larger gradients fall in the last bin.
GRADIENT_BINS = np.linspace(0.0, 0.5, 26)
# Error maps: this mean absolute error (fraction of full range) or more shows as white.
ERROR_MAP_CEILING = 0.25

LpipsFn = Callable[[Tensor, Tensor], Tensor]  # (a, b) NCHW in [-1, 1] -> one distance per image


@dataclass
class Analysis:
    """Everything `analyze` measured: `numbers` is what report.json holds, `images` the pictures."""

    numbers: dict[str, Any] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> HxWx3 uint8 (RGBA: on white)
    reconstructions: Tensor | None = None  # of the analysed images, quantised as saved


# ---- encoding and decoding in batches -----------------------------------------------------


@torch.inference_mode()
def encode(model: Autoencoder, x: Tensor, batch_size: int = 8, bar: tqdm | None = None) -> tuple[Tensor, Tensor | None]:
    """Raw posterior means and log-variances (None for a plain AE), computed in batches."""
    means, logvars = [], []
    for batch in x.split(batch_size):
        posterior = model.encode(batch.to(model.device))
        means.append(posterior.mean.float().cpu())
        logvars.append(None if posterior.deterministic else posterior.logvar.float().cpu())
        if bar is not None:
            bar.update(len(batch))
    logvar = None if logvars[0] is None else torch.cat(logvars)
    return torch.cat(means), logvar


@torch.inference_mode()
def decode(model: Autoencoder, z: Tensor, batch_size: int = 8, bar: tqdm | None = None) -> Tensor:
    """Normalised latents -> images clamped to [-1, 1] and quantised to uint8 levels, as saved."""
    out = []
    for batch in z.split(batch_size):
        out.append(model.from_latent(batch.to(model.device)).float().cpu())
        if bar is not None:
            bar.update(len(batch))
    return quantise(torch.cat(out))


def quantise(x: Tensor) -> Tensor:
    """What a saved PNG holds (to_uint8's rounding), back as NCHW floats in [-1, 1]."""
    return torch.from_numpy(to_uint8(x)).movedim(-1, -3).float() / 127.5 - 1


# ---- image distances and statistics --------------------------------------------------------


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Root-mean-square difference per image, in [0, 1] pixel units."""
    return ((a - b) / 2).pow(2).mean(dim=(1, 2, 3)).sqrt()


def path_smoothness(steps: np.ndarray) -> dict[str, float]:
    """How evenly an image path moves, from the distances between consecutive frames.

    `mean_step` is the typical change per step; `worst_jump` is the largest step over the mean step
    (1 means perfectly even; a jump near the number of steps means the image snaps all at once).
    """
    steps = np.asarray(steps, dtype=np.float64)
    mean = float(steps.mean())
    return {"mean_step": mean, "worst_jump": float(steps.max() / mean) if mean > 0 else 1.0}


def _window(h: int, w: int, dtype: torch.dtype) -> Tensor:
    # A Hann window, so the jump between opposite borders does not add spurious high frequencies.
    return torch.outer(torch.hann_window(h, dtype=dtype), torch.hann_window(w, dtype=dtype))


def power_spectrum_2d(x: Tensor) -> tuple[Tensor, Tensor]:
    """Windowed power spectrum averaged over images and channels, and each bin's radial frequency."""
    x = x.double()
    h, w = x.shape[-2:]
    x = (x - x.mean(dim=(-2, -1), keepdim=True)) * _window(h, w, x.dtype)
    power = torch.fft.fft2(x).abs().pow(2).mean(dim=tuple(range(x.ndim - 2)))
    fy, fx = torch.fft.fftfreq(h, dtype=x.dtype), torch.fft.fftfreq(w, dtype=x.dtype)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    return power, radius


def radial_power_spectrum(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean power in rings of radial frequency (cycles/pixel, DC left out, up to Nyquist 0.5)."""
    power, radius = power_spectrum_2d(x)
    width = 1.0 / min(power.shape)
    edges = np.arange(width / 2, 0.5 + width, width)  # rings centred on multiples of `width`
    freqs, means = [], []
    r, p = radius.numpy(), power.numpy()
    for lo, hi in zip(edges[:-1], edges[1:]):
        ring = (r >= lo) & (r < hi)
        if ring.any():
            freqs.append((lo + hi) / 2)
            means.append(float(p[ring].mean()))
    return np.array(freqs), np.array(means)


def high_frequency_energy(x: Tensor) -> float:
    """Power above HIGH_FREQUENCY (up to Nyquist), per image and channel."""
    power, radius = power_spectrum_2d(x)
    return float(power[(radius > HIGH_FREQUENCY) & (radius <= 0.5)].sum())


def high_frequency_fraction(x: Tensor) -> float:
    """Share of the (non-DC) power above HIGH_FREQUENCY."""
    power, radius = power_spectrum_2d(x)
    band = (radius > 0) & (radius <= 0.5)
    total = float(power[band].sum())
    return float(power[band & (radius > HIGH_FREQUENCY)].sum()) / total if total > 0 else 0.0


def spectrum_slope(x: Tensor) -> float:
    """Slope of log power against log frequency; natural photos sit near -2, white noise at 0.

    Flat images have no spectrum to fit and get 0, like noise: neither looks like a photo."""
    freqs, power = radial_power_spectrum(x)
    keep = power > 1e-12 * max(power.max(initial=0.0), 1e-300)
    if keep.sum() < 2:
        return 0.0
    return float(np.polyfit(np.log(freqs[keep]), np.log(power[keep]), 1)[0])


def _gray(x: Tensor) -> Tensor:
    """NCHW in [-1, 1] -> Nx1xHxW luma in [0, 1] (of RGBA composited on white: the edges a person sees)."""
    rgb = (on_white_tensor(x.double()) + 1) / 2
    return (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]


def gradient_histogram(x: Tensor) -> np.ndarray:
    """Normalised histogram of luma gradient magnitudes (edges are rare in photos, common in noise)."""
    g = _gray(x)
    gx, gy = g[..., :-1, 1:] - g[..., :-1, :-1], g[..., 1:, :-1] - g[..., :-1, :-1]
    magnitude = (gx.pow(2) + gy.pow(2)).sqrt().clamp(max=float(GRADIENT_BINS[-1]) - 1e-9).flatten().numpy()
    counts, _ = np.histogram(magnitude, bins=GRADIENT_BINS)
    return counts / max(counts.sum(), 1)


def image_statistics(x: Tensor) -> dict[str, Any]:
    """A few simple statistics that separate photos from garbage, for a set of images."""
    rgb = (x.double() + 1) / 2
    return {
        "color_mean": rgb.mean(dim=(0, 2, 3)).tolist(),
        "color_std": rgb.std(dim=(0, 2, 3)).tolist(),
        "spectrum_slope": spectrum_slope(x),
        "gradient_histogram": gradient_histogram(x).tolist(),
    }


def statistics_distance(stats: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """How far a set's image statistics are from the reference (real) images' ones.

    `color`: mean absolute difference of the per-channel colour means and stds ([0, 1] units);
    `spectrum_slope`: absolute difference of the spectrum slopes; `gradient`: total-variation
    distance between the gradient-magnitude histograms (0 = same, 1 = disjoint).
    """
    color = np.abs(np.r_[stats["color_mean"], stats["color_std"]] - np.r_[reference["color_mean"], reference["color_std"]])
    gradient = 0.5 * np.abs(np.subtract(stats["gradient_histogram"], reference["gradient_histogram"])).sum()
    return {
        "color": float(color.mean()),
        "spectrum_slope": abs(stats["spectrum_slope"] - reference["spectrum_slope"]),
        "gradient": float(gradient),
    }


# ---- pictures --------------------------------------------------------------------------------


def picture(x: Tensor) -> np.ndarray:
    """(N)CHW in [-1, 1] -> (N)xHxWx3 uint8 as shown in reports: RGB as it is, RGBA composited on white."""
    return to_uint8(on_white_tensor(x))


def strip(frames: Tensor) -> np.ndarray:
    """Frames side by side, one picture."""
    return np.concatenate(list(picture(frames)), axis=1)


def grid(images: Tensor, columns: int) -> np.ndarray:
    """Images in rows of `columns` (a short last row is padded with white)."""
    pictures = list(picture(images))
    blank = np.full_like(pictures[0], 255)
    pictures += [blank] * (-len(pictures) % columns)
    rows = [np.concatenate(pictures[i : i + columns], axis=1) for i in range(0, len(pictures), columns)]
    return np.concatenate(rows, axis=0)


def error_map(original: Tensor, reconstruction: Tensor) -> np.ndarray:
    """Mean absolute error per pixel (over every channel, RGBA's alpha too) as a black-red-yellow-white heat map
    (white = ERROR_MAP_CEILING)."""
    v = ((original - reconstruction).abs().mean(dim=0) / 2 / ERROR_MAP_CEILING).clamp(0, 1).numpy()
    heat = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (heat * 255).round().astype(np.uint8)


def detail_box(image: Tensor, side: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the side x side window with the most edge energy: where blur shows."""
    g = _gray(image[None])
    energy = (g[..., 1:, 1:] - g[..., :-1, 1:]).pow(2) + (g[..., 1:, 1:] - g[..., 1:, :-1]).pow(2)
    stride = max(1, side // 4)
    pooled = torch.nn.functional.avg_pool2d(energy, side - 1, stride=stride)[0, 0]
    top, left = divmod(int(pooled.argmax()), pooled.shape[1])
    return top * stride, left * stride, side, side


def crop(image: Tensor, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box of a CHW image as an HxWx3 uint8 picture."""
    top, left, h, w = box
    return picture(image[:, top : top + h, left : left + w])


# ---- the four measurements ---------------------------------------------------------------------


def _distances(a: Tensor, b: Tensor, lpips: LpipsFn | None) -> dict[str, np.ndarray]:
    """RMSE over every channel; LPIPS of R, G, B (as `vaekit eval` scores RGBA)."""
    out = {"l2": l2_distance(a, b).numpy()}
    if lpips is not None:
        with torch.inference_mode():
            out["lpips"] = lpips(a[:, :3], b[:, :3]).flatten().float().cpu().numpy()
    return out


def continuity(
    model: Autoencoder,
    z: Tensor,
    pairs: list[tuple[int, int]],
    steps: int = 8,
    noise_max: float = 1.0,
    lpips: LpipsFn | None = None,
    batch_size: int = 8,
    seed: int = 0,
    bar: tqdm | None = None,
) -> Analysis:
    """Decode along straight latent lines and measure how evenly the output changes.

    Two kinds of line: from one image's latent to another's (interpolation), and from an image's
    latent in a random direction with noise growing to `noise_max` times the latents' per-channel
    spread (perturbation; in units of the data's own spread, so a model whose configured scale is off
    is perturbed as much as one whose scale is right).
    """
    if steps < 3:
        raise ValueError(f"steps must be at least 3, got {steps}")
    t = torch.linspace(0, 1, steps).view(-1, 1, 1, 1)
    spread = z.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    result = Analysis()
    lines = {"interpolation": [], "perturbation": []}
    for k, (i, j) in enumerate(pairs):
        lines["interpolation"].append((z[i] + t * (z[j] - z[i]), f"interpolation_{k}"))
    for k, (i, _) in enumerate(pairs):
        direction = torch.randn(z[i].shape, generator=g) * spread[0]
        lines["perturbation"].append((z[i] + noise_max * t * direction, f"perturbation_{k}"))
    for kind, paths in lines.items():
        per_metric: dict[str, list[np.ndarray]] = {}
        change: dict[str, list[np.ndarray]] = {}
        for path, name in paths:
            frames = decode(model, path, batch_size, bar)
            result.images[name] = strip(frames)
            for metric, d in _distances(frames[1:], frames[:-1], lpips).items():
                per_metric.setdefault(metric, []).append(d)
            for metric, d in _distances(frames, frames[:1].expand_as(frames), lpips).items():
                change.setdefault(metric, []).append(d)
        numbers: dict[str, Any] = {}
        for metric, per_path in per_metric.items():
            steps_ = np.stack(per_path)  # paths x (steps - 1)
            worst = max(path_smoothness(s)["worst_jump"] for s in steps_)
            ends = np.stack(change[metric])[:, -1]
            numbers[metric] = {
                "mean_step": float(steps_.mean()),
                "worst_jump": float(worst),
                # Path length over the direct distance between its ends: 1 for a straight cross-fade,
                # more when the images on the way are unlike both ends (a detour through garbage).
                "detour": float(np.mean(steps_.sum(axis=1) / np.maximum(ends, 1e-12))),
                "steps": steps_.tolist(),
                "distance_from_start": np.stack(change[metric]).mean(axis=0).tolist(),
            }
        if kind == "perturbation":
            numbers["noise"] = (noise_max * t.flatten()).tolist()
        result.numbers[kind] = numbers
    return result


def completeness(
    model: Autoencoder,
    x: Tensor,
    z: Tensor,
    reconstructions: Tensor,
    samples: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    bar: tqdm | None = None,
) -> Analysis:
    """Decode latents the data never produced and measure how image-like they are.

    `prior`: unit Gaussian in the normalised latent space (what a diffusion model starts from);
    `fitted`: a Gaussian with the data latents' per-channel mean and std. Each set's image statistics
    are compared with the real images'; the reconstructions' distances are the attainable floor.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (samples, *z.shape[1:])
    mean, std = z.mean(dim=(0, 2, 3)).view(1, -1, 1, 1), z.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    sets = {
        "prior": decode(model, torch.randn(shape, generator=g), batch_size, bar),
        "fitted": decode(model, mean + std * torch.randn(shape, generator=g), batch_size, bar),
    }
    real = image_statistics(x)
    result = Analysis(numbers={"real": real})
    for name, images in {"reconstructions": reconstructions, **sets}.items():
        stats = image_statistics(images)
        result.numbers[name] = {**stats, "distance": statistics_distance(stats, real)}
    columns = min(8, samples)
    for name, images in sets.items():
        result.images[f"samples_{name}"] = grid(images, columns)
    return result


def latent_statistics(model: Autoencoder, mean: Tensor, logvar: Tensor | None) -> dict[str, Any]:
    """Per-channel statistics of the posterior means, the normalisation they call for, KL, spectrum.

    `suggested_*` follow the config's convention, (z - shift) * scale with one scale and one shift
    for all channels, chosen to give the data's latents zero mean and unit variance.
    """
    c = model.config
    z = model.normalize(mean)
    edges = np.linspace(-4, 4, 33)
    channels = []
    for ch in range(z.shape[1]):
        zc = z[:, ch]
        counts, _ = np.histogram(zc.clamp(-4, 4).numpy(), bins=edges)
        channels.append({
            "mean": float(zc.mean()),
            "std": float(zc.std()),
            "kl": None,
            "high_frequency_fraction": high_frequency_fraction(zc[:, None]),
            "histogram": (counts / counts.sum()).tolist(),
        })
    if logvar is not None:
        # KL(q || N(0, I)) per element, averaged over images and positions: nats per latent element.
        kl = model.normalised_layout(0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar))  # per channel as `z` has them
        for ch, value in enumerate(kl.mean(dim=(0, 2, 3)).tolist()):
            channels[ch]["kl"] = value
    freqs, power = radial_power_spectrum(z)
    return {
        "channels": channels,
        "histogram_edges": edges.tolist(),
        "normalised_mean": float(z.mean()),
        "normalised_std": float(z.std()),
        "configured_scaling_factor": c.scaling_factor,
        "configured_shift_factor": c.shift_factor,
        "suggested_scaling_factor": float(1 / mean.std()),
        "suggested_shift_factor": float(mean.mean()),
        "kl_mean": None if logvar is None else float(np.mean([ch["kl"] for ch in channels])),
        "kl_min": None if logvar is None else float(min(ch["kl"] for ch in channels)),
        # The neighbourhood of each latent that training decoded to the same image (0 for a plain AE).
        "posterior_noise": 0.0 if logvar is None else float((0.5 * logvar).exp().mean() / mean.std()),
        "high_frequency_fraction": high_frequency_fraction(z),
        "spectrum": {"frequency": freqs.tolist(), "power": power.tolist()},
    }


def blur(x: Tensor, reconstructions: Tensor, worst: int = 3) -> Analysis:
    """Detail lost or invented: high-frequency energy of reconstructions relative to the originals.

    `high_frequency_ratio` is 1 when reconstructions are as sharp as the originals, below 1 when
    they are blurrier, above 1 when they add high-frequency artefacts. Error maps show the `worst`
    reconstructions (lowest PSNR).
    """
    freqs, p_orig = radial_power_spectrum(x)
    _, p_recon = radial_power_spectrum(reconstructions)
    scores = psnr(x[:, :3], reconstructions[:, :3])
    order = scores.argsort()[:worst].tolist()
    reference = high_frequency_energy(x)
    result = Analysis(numbers={
        # Flat originals have no detail to keep: no ratio.
        "high_frequency_ratio": high_frequency_energy(reconstructions) / reference if reference > 0 else None,
        "spectrum": {"frequency": freqs.tolist(), "originals": p_orig.tolist(), "reconstructions": p_recon.tolist()},
        "worst": [{"index": i, "psnr": float(scores[i])} for i in order],
    })
    for rank, i in enumerate(order):
        result.images[f"worst_{rank}"] = np.concatenate(
            [picture(x[i]), picture(reconstructions[i]), error_map(x[i], reconstructions[i])], axis=1
        )
    return result


def reconstruction_metrics(x: Tensor, reconstructions: Tensor, lpips: LpipsFn | None = None) -> dict[str, Any]:
    """PSNR and SSIM (and LPIPS when given) of `vaekit.metrics`: per image and their means. RGBA as `vaekit eval`
    scores it: those of R, G, B, and `vaekit.evaluate.alpha_scores` of the alpha channel."""
    colour, recon_colour = x[:, :3], reconstructions[:, :3]
    per_image = {"psnr": psnr(colour, recon_colour), "ssim": ssim(colour, recon_colour)}
    if lpips is not None:
        per_image["lpips"] = lpips(colour, recon_colour)
    if x.shape[1] == 4:
        real, fake = (torch.from_numpy(to_uint8(t)).movedim(-1, 1) for t in (x, reconstructions))
        alpha = alpha_scores(real, fake)
        per_image |= {name: torch.tensor([row[name] for row in alpha]) for name in ALPHA_METRICS}
    numbers: dict[str, Any] = {name: float(v.mean()) for name, v in per_image.items()}
    numbers["per_image"] = {name: v.tolist() for name, v in per_image.items()}
    return numbers


# ---- everything at once ------------------------------------------------------------------------


def analyze(
    model: Autoencoder,
    x: Tensor,
    pairs: int = 4,
    steps: int = 8,
    noise_max: float = 1.0,
    samples: int = 16,
    lpips: LpipsFn | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Analysis:
    """All four measurements on images `x` (N >= 2, one size; RGBA for a 4-channel model); the numbers report.json holds."""
    if x.shape[0] < 2:
        raise ValueError(f"analysis needs at least 2 images (it interpolates between pairs), got {x.shape[0]}")
    n = x.shape[0]
    # Neighbours in a ring, so a few held-out photos still give several lines: (0, 1), (1, 2), (2, 0).
    pair_list = [(k, (k + 1) % n) for k in range(min(pairs, n if n > 2 else 1))]
    c = model.config
    result = Analysis(numbers={
        "kind": c.kind, "latent_channels": c.latent_channels, "factor": c.factor,
        "n_images": int(x.shape[0]), "resolution": list(x.shape[-2:]), "channels": int(x.shape[1]),
    })
    # Progress in images through the model: encode and reconstruct all, then the lines and samples.
    total = 2 * n + 2 * len(pair_list) * steps + 2 * samples
    bar = progress_bar(desc="analyze", unit="img", total=total, enabled=progress)
    bar.set_postfix_str("reconstruction", refresh=False)
    mean, logvar = encode(model, x, batch_size, bar)
    z = model.normalize(mean)
    result.reconstructions = decode(model, z, batch_size, bar)
    result.numbers["reconstruction"] = reconstruction_metrics(x, result.reconstructions, lpips)
    result.numbers["latents"] = latent_statistics(model, mean, logvar)
    parts = {
        "blur": lambda: blur(x, result.reconstructions),
        "continuity": lambda: continuity(model, z, pair_list, steps, noise_max, lpips, batch_size, seed, bar),
        "completeness": lambda: completeness(model, x, z, result.reconstructions, samples, batch_size, seed, bar),
    }
    for name, measure in parts.items():
        bar.set_postfix_str(name, refresh=False)
        part = measure()
        result.numbers[name] = part.numbers
        result.images.update(part.images)
    bar.close()
    return result
