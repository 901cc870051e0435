"""The HTML reports of `vaekit analyze` and `vaekit compare`: one page that opens offline.

Every picture and plot is a PNG beside report.html (relative links), the styles are inline, and the
page has no scripts and no external requests, so the folder can be zipped, mailed or opened from a
disk. report.json beside it holds every number. Plots use matplotlib's object API (no pyplot, so the
caller's backend is left alone).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._version import __version__
from .analysis import HIGH_FREQUENCY, Analysis, ERROR_MAP_CEILING
from .data import write_image
from .files import mark_output_folder
from .evaluate import to_json
from .extras import MissingPackage


# ---- what each number means (one source for both reports) ----------------------------------


@dataclass(frozen=True)
class Measure:
    path: str  # dotted path into the analysis numbers
    label: str
    meaning: str  # one sentence a user can act on
    better: str = ""  # "high", "low", "one" (closest to 1) or "" (no direction)
    digits: int = 3


MEASURES: dict[str, Measure] = {m.path: m for m in [
    Measure("reconstruction.psnr", "PSNR (dB)", "Peak signal-to-noise ratio of the uint8 reconstructions: higher means closer to the originals pixel by pixel.", "high", 2),
    Measure("reconstruction.ssim", "SSIM", "Structural similarity (scikit-image's definition): 1 means the local structure is identical.", "high", 4),
    Measure("reconstruction.lpips", "LPIPS", "Learned perceptual distance: lower means the reconstructions look more like the originals to people.", "low", 4),
    Measure("reconstruction.alpha_psnr", "alpha PSNR (dB)", "PSNR of the alpha channel alone (RGBA models; 60 when exact): higher means transparency is kept more exactly. PSNR, SSIM and LPIPS above are of R, G, B.", "high", 2),
    Measure("reconstruction.alpha_mae", "alpha error", "Mean absolute error of the alpha channel, in levels of 255 (RGBA models): lower is better.", "low", 2),
    Measure("blur.high_frequency_ratio", "sharpness", f"High-frequency energy (above {HIGH_FREQUENCY} cycles/pixel) of the reconstructions over that of the originals: 1 is as sharp, below 1 blurrier, above 1 adds artefacts.", "one"),
    Measure("continuity.interpolation.l2.mean_step", "interp. step", "Mean change (RMSE) between neighbouring images when decoding evenly spaced points on the straight line between two images' latents.", "", 4),
    Measure("continuity.interpolation.l2.worst_jump", "interp. worst jump", "The largest of those changes over their mean: 1 means the image morphs evenly (a continuous latent space), large means it snaps from one image to another.", "low", 2),
    Measure("continuity.interpolation.l2.detour", "interp. detour", "Length of the path the decoded images take over the direct distance between its two ends: 1 is a straight cross-fade, larger means the images on the way are unlike both ends (a detour through garbage).", "low", 2),
    Measure("continuity.interpolation.lpips.worst_jump", "interp. worst jump (LPIPS)", "The same worst jump measured with LPIPS instead of RMSE.", "low", 2),
    Measure("continuity.perturbation.l2.mean_step", "noise step", "Mean change (RMSE) between neighbouring images as noise added to a latent grows evenly to one latent standard deviation: lower means small latent errors make small image errors.", "low", 4),
    Measure("continuity.perturbation.l2.worst_jump", "noise worst jump", "The largest of those changes over their mean: 1 means the output degrades gradually, large means a sudden break.", "low", 2),
    Measure("completeness.prior.distance.gradient", "prior: edges", "Distance (0 to 1) between the edge-strength histograms of images decoded from unit-Gaussian latents and of the real images: 0 means photo-like, 1 means nothing like a photo.", "low"),
    Measure("completeness.prior.distance.spectrum_slope", "prior: spectrum", "Difference between the spectrum slope of images decoded from unit-Gaussian latents and that of the real images (photos fall near -2, noise is flat at 0).", "low", 2),
    Measure("completeness.prior.distance.color", "prior: colour", "Mean difference of the per-channel colour means and standard deviations of images decoded from unit-Gaussian latents and of the real images ([0, 1] units).", "low"),
    Measure("completeness.fitted.distance.gradient", "fitted: edges", "The edge-histogram distance for images decoded from a Gaussian fitted to the data's latents (per-channel mean and std).", "low"),
    Measure("completeness.fitted.distance.spectrum_slope", "fitted: spectrum", "The spectrum-slope difference for images decoded from that fitted Gaussian.", "low", 2),
    Measure("completeness.reconstructions.distance.gradient", "recon: edges", "The edge-histogram distance of the reconstructions themselves: the floor the sampled images can reach.", "low"),
    Measure("latents.normalised_std", "latent std", "Standard deviation of the latents after the model's configured scale and shift: a diffusion model expects 1.", "one"),
    Measure("latents.normalised_mean", "latent mean", "Mean of the latents after the configured scale and shift: a diffusion model expects 0.", "", 3),
    Measure("latents.configured_scaling_factor", "scale (configured)", "The scaling_factor in the model's config: a diffusion model sees (z - shift) * scale.", "", 4),
    Measure("latents.suggested_scaling_factor", "scale (measured)", "The scaling_factor that would give these images' latents unit standard deviation.", "", 4),
    Measure("latents.configured_shift_factor", "shift (configured)", "The shift_factor in the model's config.", "", 4),
    Measure("latents.suggested_shift_factor", "shift (measured)", "The shift_factor that would give these images' latents zero mean.", "", 4),
    Measure("latents.kl_mean", "KL / element", "KL divergence of the posterior from the unit Gaussian, in nats per latent element (empty for a plain AE, which has no posterior).", "", 3),
    Measure("latents.kl_min", "KL, least-used ch.", "The smallest per-channel KL: near 0 means a channel carries no information (unused capacity); empty for a plain AE.", "", 4),
    Measure("latents.posterior_noise", "posterior noise", "Mean posterior standard deviation over the spread of the latents: the size of the neighbourhood the decoder was trained to decode to the same image (0 for a plain AE, whose decoder only ever saw exact latents).", "", 3),
    Measure("diffusability.score", "diffusability", "Mean relative error of a small diffusion model trained on these latents by vaekit's fixed protocol, denoising held-out latents (0 perfect, 1 knows nothing): lower means a diffusion model learns this latent space more easily.", "low", 4),
    Measure("diffusability.samples.distance.gradient", "diffusion samples: edges", "Edge-histogram distance of that diffusion model's decoded samples to the held-out images (0 = photo-like).", "low"),
    Measure("diffusability.samples.kid.mean", "diffusion samples: KID", "Kernel Inception Distance of its decoded samples to the held-out images (needs Inception's weights).", "low", 4),
    Measure("latents.high_frequency_fraction", "latent high-freq.", "Share of the latents' spectral power in the upper half of the frequencies: latents with much of it are known to be harder for a diffusion model to learn.", "low"),
]}

SUMMARY = [
    "reconstruction.psnr", "reconstruction.ssim", "reconstruction.lpips", "reconstruction.alpha_psnr", "blur.high_frequency_ratio",
    "continuity.interpolation.l2.worst_jump", "continuity.interpolation.l2.detour", "continuity.perturbation.l2.mean_step",
    "completeness.prior.distance.gradient", "completeness.prior.distance.spectrum_slope",
    "latents.normalised_std", "latents.kl_min", "latents.high_frequency_fraction", "diffusability.score",
]

# The reconstruction table of both reports (alpha's rows only for RGBA models, which have them).
RECONSTRUCTION = ["reconstruction.psnr", "reconstruction.ssim", "reconstruction.lpips", "reconstruction.alpha_psnr",
                  "reconstruction.alpha_mae", "blur.high_frequency_ratio"]


def lookup(numbers: dict[str, Any], path: str) -> Any:
    """numbers["a"]["b"] for path "a.b"; None where any part is missing."""
    value: Any = numbers
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if math.isinf(value):
        return "∞"
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.{max(1, digits - 1)}e}"
    return f"{value:.{digits}f}"


def best_index(values: Sequence[Any], better: str) -> int | None:
    """Which of the values is best for the measure's direction (None when it has none or ties all)."""
    scored = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
    if not better or len(scored) < 2:
        return None
    key: Callable[[float], float] = {"high": lambda v: -v, "low": lambda v: v, "one": lambda v: abs(math.log(v)) if v > 0 else math.inf}[better]
    best = min(scored, key=lambda iv: key(iv[1]))
    return None if all(key(v) == key(best[1]) for _, v in scored) else best[0]


# An RGBA model's report says how its pictures and numbers treat alpha (vaekit.analysis's conventions).
RGBA_NOTE = ("RGBA: pictures show the images composited on white (as 3-channel models read the same files); PSNR, SSIM "
             "and LPIPS score R, G, B as stored, as vaekit eval does, and alpha is scored apart (alpha PSNR, alpha error); "
             "RMSE distances, error maps, spectra and colour statistics include the alpha channel.")


# ---- page building --------------------------------------------------------------------------

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0; background: #f5f6f8; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 36px 0 6px; border-bottom: 2px solid #e3e6ec; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 20px 0 4px; }
p.lead, p.note, figcaption, .meaning { color: #525b6b; } p.note { font-size: 13px; }
table { border-collapse: collapse; margin: 10px 0 6px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e3e6ec; text-align: right; vertical-align: top; }
th { background: #f0f2f6; font-weight: 600; } th:first-child, td:first-child { text-align: left; }
table.measures td:last-child, table.measures th:last-child { text-align: left; font-size: 13px; color: #525b6b; max-width: 620px; }
td.best { font-weight: 700; background: #e7f5ea; }
dl.legend { font-size: 13px; color: #525b6b; display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; }
dl.legend dt { font-weight: 600; color: #1d2330; }
figure { margin: 12px 0 18px; } figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ec; }
figcaption { font-size: 13px; margin-top: 4px; }
img.pixelated { image-rendering: pixelated; }
.crops td { text-align: center; } .crops img { width: 192px; height: auto; }
.row { display: flex; flex-wrap: wrap; gap: 18px; } .row figure { flex: 1 1 320px; }
code { background: #f0f2f6; padding: 1px 4px; border-radius: 3px; }
"""


class Page:
    """An HTML page under construction plus the picture files beside it."""

    def __init__(self, folder: Path, title: str):
        self.folder, self.title, self.parts = folder, title, []
        mark_output_folder(folder, "a vaekit report")

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def picture(self, name: str, image: np.ndarray) -> str:
        """Save a uint8 picture as NAME.png beside the page; its relative link."""
        write_image(self.folder / f"{name}.png", image)
        return f"{name}.png"

    def figure(self, src: str, caption: str, width: int | None = None, height: int | None = None, cls: str = "") -> None:
        size = f' width="{width}" height="{height}"' if width and height else ""
        klass = f' class="{cls}"' if cls else ""
        self.add(f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}"{size}{klass}>'
                 f"<figcaption>{caption}</figcaption></figure>")

    def image_figure(self, name: str, image: np.ndarray, caption: str) -> None:
        """A picture shown with square pixels, small ones (thumbnail-sized images) at twice their size."""
        zoom = 2 if image.shape[0] <= 128 and image.shape[1] <= 560 else 1
        self.figure(self.picture(name, image), caption, zoom * image.shape[1], zoom * image.shape[0], "pixelated")

    def write(self) -> Path:
        body = "\n".join(self.parts)
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head>\n"
                f"<body><main>\n{body}\n<p class=\"note\">Made by vaekit {__version__}. Every number is in "
                f'<a href="report.json">report.json</a>.</p></main></body></html>\n')
        path = self.folder / "report.html"
        path.write_text(page, encoding="utf-8")
        return path


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], best: Sequence[int | None] = (), cls: str = "") -> str:
    """Rows of already-escaped cells; `best[c]` is the row to highlight in column c."""
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for r, row in enumerate(rows):
        cells = []
        for c, cell in enumerate(row):
            mark = ' class="best"' if c < len(best) and best[c] == r else ""
            cells.append(f"<td{mark}>{cell}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _measures_table(numbers: dict[str, Any], paths: Sequence[str]) -> str:
    """One row per measure: its label, value and one-sentence meaning."""
    rows = [[html.escape(MEASURES[p].label), fmt(lookup(numbers, p), MEASURES[p].digits), html.escape(MEASURES[p].meaning)] for p in paths]
    return _table(["measure", "value", "what it means"], rows, cls="measures")


def _legend(paths: Sequence[str]) -> str:
    items = "".join(f"<dt>{html.escape(MEASURES[p].label)}</dt><dd>{html.escape(MEASURES[p].meaning)}</dd>" for p in paths)
    return f'<dl class="legend">{items}</dl>'


def _write_json(folder: Path, numbers: dict[str, Any]) -> None:
    (folder / "report.json").write_text(to_json(numbers), encoding="utf-8")  # inf/nan become null


# ---- plots ------------------------------------------------------------------------------------


def _figure(width: float = 5.2, height: float = 3.2):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingPackage("the report's plots need matplotlib: pip install 'vaekit[eval]'") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _save_plot(page: Page, fig, name: str) -> str:
    fig.savefig(page.folder / f"{name}.png")
    return f"{name}.png"


def _plot_spectra(page: Page, name: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, ylabel: str = "power",
                  ratio: bool = False) -> str:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = _figure()
    ax = fig.add_subplot()
    for label, (f, p) in curves.items():
        ax.loglog(f, p, label=label, lw=1.6)
    ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels collide
    if ratio:  # a ratio reads best against 1, in plain numbers
        ax.axhline(1.0, color="#999", lw=1)
        lo, hi = ax.get_ylim()
        ax.set_yticks([t for t in (0.001, 0.01, 0.1, 0.25, 0.5, 1, 2, 4, 8) if lo <= t <= hi])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axvline(HIGH_FREQUENCY, color="#999", ls="--", lw=1)
    ax.text(HIGH_FREQUENCY, ax.get_ylim()[1], " high frequencies →", va="top", fontsize=8, color="#666")
    ax.set(xlabel="frequency (cycles / pixel)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save_plot(page, fig, name)


def _plot_lines(page: Page, name: str, x: Sequence[float], curves: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    for label, y in curves.items():
        ax.plot(x, y, marker="o", ms=3, lw=1.6, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _save_plot(page, fig, name)


def _plot_histograms(page: Page, latents: dict[str, Any]) -> str:
    channels = latents["channels"]
    cols = min(4, len(channels))
    rows = -(-len(channels) // cols)
    fig = _figure(2.3 * cols, 1.6 * rows + 0.4)
    edges = np.asarray(latents["histogram_edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    gauss = np.exp(-centres**2 / 2) / math.sqrt(2 * math.pi) * width
    for i, ch in enumerate(channels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.bar(centres, ch["histogram"], width=width, color="#4c72b0")
        ax.plot(centres, gauss, color="#dd8452", lw=1.2)
        ax.set_title(f"ch {i}: mean {ch['mean']:+.2f}, std {ch['std']:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    fig.suptitle("normalised latent values per channel (orange: unit Gaussian)", fontsize=9)
    return _save_plot(page, fig, "latent_histograms")


def _plot_bars(page: Page, name: str, values: Sequence[float], title: str, ylabel: str) -> str:
    fig = _figure(max(3.5, 0.35 * len(values) + 1.5), 2.8)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set(xlabel="latent channel", ylabel=ylabel, title=title, xticks=range(len(values)))
    ax.tick_params(labelsize=7)
    return _save_plot(page, fig, name)


# ---- the analyze report -----------------------------------------------------------------------


def write_analysis_report(analysis: Analysis, folder: str | Path, title: str, notes: Sequence[str] = ()) -> Path:
    """DIR/report.html (+ pictures, plots, report.json) for one model; the page's path."""
    folder = Path(folder)
    n = analysis.numbers
    page = Page(folder, title)
    _write_json(folder, n)
    kind = "VAE (Gaussian posterior)" if n["kind"] == "vae" else "plain AE (deterministic latent)"
    page.add(f"<h1>{html.escape(title)}</h1>")
    page.add(f'<p class="lead">{kind}, {n["latent_channels"]} latent channels, {n["factor"]}x downsampling; '
             f'{n["n_images"]} images of {n["resolution"][0]}x{n["resolution"][1]} from <code>{html.escape(str(n.get("data", "")))}</code>.</p>')
    page.add('<p class="lead">A diffusion model needs two things from its autoencoder: faithful reconstructions, and a '
             "latent space that is <b>continuous</b> (nearby latents decode to similar images) and <b>complete</b> "
             "(latents near the data decode to images, not garbage). A KL-regularised VAE trades a little sharpness "
             "for both; this page measures each on these images.</p>")
    for note in [*notes, RGBA_NOTE] if n.get("channels") == 4 else notes:
        page.add(f'<p class="note">Note: {html.escape(note)}</p>')

    page.add("<h2>Summary</h2>")
    page.add(_measures_table(n, [p for p in SUMMARY if lookup(n, p) is not None or p.startswith("latents.kl")]))

    _reconstruction_section(page, analysis)
    _continuity_section(page, analysis)
    _completeness_section(page, analysis)
    _latent_section(page, analysis)
    if "diffusability" in n:
        _diffusability_section(page, n["diffusability"], analysis.images.get("diffusability_samples"))
    return page.write()


def write_diffusability_report(numbers: dict[str, Any], samples: np.ndarray, folder: str | Path, title: str) -> Path:
    """`vaekit diffusability`'s run folder: report.html, report.json (the numbers) and the pictures."""
    folder = Path(folder)
    page = Page(folder, title)
    _write_json(folder, numbers)
    page.add(f"<h1>{html.escape(title)}</h1>")
    _diffusability_section(page, numbers, samples)
    return page.write()


def _diffusability_section(page: Page, d: dict[str, Any], samples: np.ndarray | None) -> None:
    """The protocol's numbers for one model (vaekit.diffusability; docs/DIFFUSABILITY.md)."""
    kid = d["samples"]["kid"]
    page.add("<h2>Diffusability</h2>")
    page.add(f'<p class="lead">A small diffusion model (rectified flow, {d["protocol"]["steps"]} steps, '
             f'{d["denoiser"]["parameters"]:,} parameters) trained on {d["protocol"]["train_crops"]} latents of '
             f'{d["protocol"]["resolution"]}² crops ({html.escape(d["data"])}), scored on {d["protocol"]["val_crops"]} held-out ones. '
             "The same protocol for every model, so scores compare across models: lower is easier.</p>")
    rows = [["score (mean relative denoising error)", fmt(d["score"], 4)],
            ["latent shape (C, H, W)", html.escape(str(tuple(d["latents"]["shape"])))],
            ["latent high-freq. share / spectrum slope", f'{fmt(d["latents"]["high_frequency_fraction"])} / {fmt(d["latents"]["spectrum_slope"], 2)}'],
            ["images' high-freq. share / spectrum slope", f'{fmt(d["images"]["high_frequency_fraction"])} / {fmt(d["images"]["spectrum_slope"], 2)}'],
            ["samples: edges / spectrum / colour distance", " / ".join(fmt(d["samples"]["distance"][k]) for k in ("gradient", "spectrum_slope", "color"))],
            ["samples: KID", f'{fmt(kid["mean"], 4)} ± {fmt(kid["std"], 4)}' if kid else "not measured (no Inception weights)"]]
    page.add(_table(["measure", "value"], rows, cls="measures"))
    page.add('<div class="row">')
    page.figure(_plot_lines(page, "diffusability_errors", d["levels"], {"held-out": d["errors"]}, "denoising error per noise level",
                            "noise level t", "relative error"), "Relative error of the one-step estimate of the clean latent at each noise level.", 520, 320)
    if samples is not None:
        on_white = " RGBA, shown composited on white." if d["images"].get("channels") == 4 else ""
        page.image_figure("diffusability_samples", samples, "Samples of that diffusion model, decoded (a tiny model trained briefly: judge them "
                          f"side by side, not alone).{on_white}")
    page.add("</div>")


def _reconstruction_section(page: Page, a: Analysis) -> None:
    n = a.numbers
    page.add("<h2>Reconstruction and blur</h2>")
    paths = [p for p in RECONSTRUCTION if lookup(n, p) is not None]
    page.add(_table([MEASURES[p].label for p in paths], [[fmt(lookup(n, p), MEASURES[p].digits) for p in paths]]))
    page.add(_legend(paths))
    s = n["blur"]["spectrum"]
    src = _plot_spectra(page, "blur_spectra", {"originals": (s["frequency"], s["originals"]), "reconstructions": (s["frequency"], s["reconstructions"])},
                        "radial power spectrum of the images")
    page.figure(src, "Power at each spatial frequency, averaged over the images. Where the reconstructions' curve falls below "
                "the originals', detail is lost (blur); where it rises above, the decoder invents texture.", 520, 320)
    page.add("<h3>Worst reconstructions</h3>")
    for rank, worst in enumerate(n["blur"]["worst"]):
        name = f"worst_{rank}"
        if name in a.images:
            source = _source_name(n, worst["index"])
            page.image_figure(name, a.images[name], f"{html.escape(source)}: original | reconstruction | error (PSNR {fmt(worst['psnr'], 2)} dB). "
                              f"Error map: black is exact, white is an error of {ERROR_MAP_CEILING:.0%} of the full range or more.")


def _source_name(n: dict[str, Any], index: int) -> str:
    sources = n.get("sources") or []
    return sources[index] if index < len(sources) else f"image {index}"


def _continuity_section(page: Page, a: Analysis) -> None:
    c = a.numbers["continuity"]
    page.add("<h2>Continuity</h2>")
    page.add('<p class="lead">Decoding evenly spaced points on a straight line in latent space should change the image '
             "evenly. In a discontinuous latent space (the textbook failure of a plain AE) the image stays, then snaps, "
             "or passes through garbage on the way.</p>")
    paths = [p for p in ("continuity.interpolation.l2.mean_step", "continuity.interpolation.l2.worst_jump", "continuity.interpolation.l2.detour",
                         "continuity.interpolation.lpips.worst_jump",
                         "continuity.perturbation.l2.mean_step", "continuity.perturbation.l2.worst_jump") if lookup(a.numbers, p) is not None]
    page.add(_table([MEASURES[p].label for p in paths], [[fmt(lookup(a.numbers, p), MEASURES[p].digits) for p in paths]]))
    page.add(_legend(paths))
    steps = len(c["interpolation"]["l2"]["distance_from_start"])
    t = np.linspace(0, 1, steps).tolist()
    curves = {"interpolation": c["interpolation"]["l2"]["distance_from_start"], "growing noise": c["perturbation"]["l2"]["distance_from_start"]}
    src = _plot_lines(page, "continuity_curves", t, curves, "change from the first image along the line", "position on the line (0 to 1)", "RMSE from the start")
    page.figure(src, "A continuous latent space gives straight, gently rising curves; a jump shows as a step.", 520, 320)
    page.add("<h3>Interpolations between two images</h3>")
    for name in sorted(k for k in a.images if k.startswith("interpolation_")):
        k = int(name.rsplit("_", 1)[1])
        steps_ = c["interpolation"]["l2"]["steps"][k]
        page.image_figure(name, a.images[name], f"Decoded from {steps} evenly spaced latents between two images; step changes (RMSE): "
                          + ", ".join(f"{s:.3f}" for s in steps_) + ".")
    page.add("<h3>Growing noise</h3>")
    sigmas = c["perturbation"]["noise"]
    for name in sorted(k for k in a.images if k.startswith("perturbation_")):
        page.image_figure(name, a.images[name], f"One image's latent plus noise in a fixed random direction, growing from 0 to "
                          f"{sigmas[-1]:g} standard deviations of the data's latents (per channel).")


def _completeness_section(page: Page, a: Analysis) -> None:
    c = a.numbers["completeness"]
    page.add("<h2>Completeness</h2>")
    page.add('<p class="lead">A diffusion model starts from Gaussian noise and must land on latents that decode to images. '
             "Here random latents are decoded directly: from the unit Gaussian a diffusion model starts from (the prior), "
             "and from a Gaussian fitted to the data's latents (per-channel mean and standard deviation). In a complete "
             "latent space both look image-like (blobs of plausible colour and texture); in an incomplete one they are garbage.</p>")
    rows = []
    labels = {"reconstructions": "reconstructions (floor)", "prior": "prior samples", "fitted": "fitted-Gaussian samples"}
    for key, label in labels.items():
        d = c[key]["distance"]
        rows.append([label, fmt(d["gradient"]), fmt(d["spectrum_slope"], 2), fmt(d["color"]), fmt(c[key]["spectrum_slope"], 2)])
    page.add(_table(["images", "edge distance", "spectrum-slope difference", "colour distance", "spectrum slope"], rows))
    page.add('<dl class="legend"><dt>edge distance</dt><dd>Total-variation distance (0 to 1) between the histograms of edge '
             "strength (luma gradient magnitude) of these images and of the real images: photos have mostly flat regions and a "
             "few strong edges, noise has edges everywhere.</dd><dt>spectrum-slope difference</dt><dd>How far the slope of the "
             f"log power spectrum is from the real images' ({c['real']['spectrum_slope']:.2f}); photos fall near -2, noise is flat "
             "at 0.</dd><dt>colour distance</dt><dd>Mean difference of the per-channel colour means and standard deviations "
             "([0, 1] units).</dd></dl>")
    for key, caption in (("samples_prior", "Decoded from unit-Gaussian latents (the prior)."),
                         ("samples_fitted", "Decoded from a Gaussian fitted to the data's latents.")):
        if key in a.images:
            page.image_figure(key, a.images[key], caption)


def _latent_section(page: Page, a: Analysis) -> None:
    lat = a.numbers["latents"]
    page.add("<h2>Latent statistics</h2>")
    page.add('<p class="lead">What a diffusion model trained on these latents will see, after the model\'s configured '
             "normalisation <code>(z - shift) * scale</code>.</p>")
    paths = ["latents.normalised_mean", "latents.normalised_std", "latents.configured_scaling_factor", "latents.suggested_scaling_factor",
             "latents.configured_shift_factor", "latents.suggested_shift_factor", "latents.kl_mean", "latents.kl_min", "latents.posterior_noise",
             "latents.high_frequency_fraction"]
    page.add(_measures_table(a.numbers, paths))
    rows = [[str(i), fmt(ch["mean"]), fmt(ch["std"]), fmt(ch["kl"], 4), fmt(ch["high_frequency_fraction"])] for i, ch in enumerate(lat["channels"])]
    page.add("<h3>Per channel</h3>")
    page.add(_table(["channel", "mean", "std", "KL (nats/element)", "high-freq. share"], rows))
    page.add('<p class="note">Mean and std are of the normalised latents. A channel whose KL is near 0 matches the prior '
             "whatever the image: it carries no information.</p>")
    page.figure(_plot_histograms(page, lat), "Histograms of the normalised latents, channel by channel, against the unit Gaussian a diffusion model assumes.")
    page.add('<div class="row">')
    if lat["kl_mean"] is not None:
        page.figure(_plot_bars(page, "latent_kl", [ch["kl"] for ch in lat["channels"]], "KL per channel", "nats / element"),
                    "KL per channel: bars near 0 are unused channels.")
    s = lat["spectrum"]
    page.figure(_plot_spectra(page, "latent_spectrum", {"latents": (s["frequency"], s["power"])}, "radial power spectrum of the latents"),
                "Power of the normalised latents at each spatial frequency (cycles per latent pixel).", 520, 320)
    page.add("</div>")


# ---- the compare report -----------------------------------------------------------------------

COMPARE_LATENT = [
    "continuity.interpolation.l2.worst_jump", "continuity.interpolation.l2.detour", "continuity.interpolation.lpips.worst_jump",
    "continuity.perturbation.l2.mean_step",
    "continuity.perturbation.l2.worst_jump", "completeness.prior.distance.gradient", "completeness.prior.distance.spectrum_slope",
    "completeness.fitted.distance.gradient", "completeness.fitted.distance.spectrum_slope", "latents.normalised_std",
    "latents.kl_min", "latents.posterior_noise", "latents.high_frequency_fraction",
    "diffusability.score", "diffusability.samples.distance.gradient", "diffusability.samples.kid.mean",
]


def slug(name: str) -> str:
    """A folder name for a model argument (paths and repo ids have slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def write_comparison_report(
    results: dict[str, Analysis],
    originals: Sequence[tuple[str, np.ndarray]],
    crops: dict[str, list[np.ndarray]],
    folder: str | Path,
    title: str,
    notes: Sequence[str] = (),
    reports: dict[str, str] | None = None,
) -> Path:
    """DIR/report.html comparing models on the same images.

    `originals`: (caption, crop) of each region; `crops[model]`: that model's reconstruction of the
    same regions; `reports[model]`: relative link to the model's own analyze report.
    """
    folder = Path(folder)
    names = list(results)
    page = Page(folder, title)
    first = next(iter(results.values())).numbers
    _write_json(folder, {"models": {name: r.numbers for name, r in results.items()}, "reports": reports or {}})
    page.add(f"<h1>{html.escape(title)}</h1>")
    page.add(f'<p class="lead">{len(names)} models on the same {first["n_images"]} images of {first["resolution"][0]}x{first["resolution"][1]} '
             f'from <code>{html.escape(str(first.get("data", "")))}</code>. The best value in each column is highlighted; '
             "a VAE usually trades a little sharpness for a continuous, complete latent space.</p>")
    rgba = any(r.numbers.get("channels") == 4 for r in results.values())
    for note in [*notes, RGBA_NOTE] if rgba else notes:
        page.add(f'<p class="note">Note: {html.escape(note)}</p>')

    def model_cells(name: str) -> list[str]:
        n = results[name].numbers
        link = html.escape(name)
        if reports and name in reports:
            link = f'<a href="{html.escape(reports[name])}">{link}</a>'
        return [link, n["kind"].upper(), str(n["latent_channels"]), f'{n["factor"]}x']

    for heading, paths in (("Reconstruction", RECONSTRUCTION), ("Latent space", COMPARE_LATENT)):
        paths = [p for p in paths if any(lookup(r.numbers, p) is not None for r in results.values())]
        values = [[lookup(results[name].numbers, p) for p in paths] for name in names]
        best = [None] * 4 + [best_index([v[c] for v in values], MEASURES[p].better) for c, p in enumerate(paths)]
        rows = [model_cells(name) + [fmt(v, MEASURES[p].digits) for v, p in zip(values[i], paths)] for i, name in enumerate(names)]
        page.add(f"<h2>{heading}</h2>")
        page.add(_table(["model", "kind", "latent ch", "factor"] + [html.escape(MEASURES[p].label) for p in paths], rows, best))
        page.add(_legend(paths))

    scored = {name: r.numbers["diffusability"] for name, r in results.items() if "diffusability" in r.numbers}
    if scored:
        page.add("<h2>Diffusability</h2>")
        page.add('<p class="lead">The same small diffusion model trained on each latent space by one fixed protocol '
                 "(docs/DIFFUSABILITY.md); lower errors mean an easier latent space.</p>")
        curves = {name: d["errors"] for name, d in scored.items()}
        levels = next(iter(scored.values()))["levels"]
        page.figure(_plot_lines(page, "diffusability_errors", levels, curves, "denoising error per noise level", "noise level t", "relative error"),
                    "Held-out relative denoising error at each noise level, one curve per model.", 520, 320)

    page.add("<h2>The same regions, reconstructed</h2>")
    page.add('<p class="lead">The most detailed region of each image (where blur shows first), shown at 3x with square pixels.</p>')
    header = ["region", "original"] + [html.escape(n) for n in names]
    rows = []
    for r, (caption, original) in enumerate(originals):
        cells = [html.escape(caption), f'<img class="pixelated" src="{page.picture(f"crop_{r}_original", original)}" alt="original">']
        for m, name in enumerate(names):
            src = page.picture(f"crop_{r}_model{m}", crops[name][r])
            cells.append(f'<img class="pixelated" src="{src}" alt="{html.escape(name)}">')
        rows.append(cells)
    page.add(_table(header, rows, cls="crops"))

    spectra = {}
    for name, r in results.items():
        s = r.numbers["blur"]["spectrum"]
        spectra[name] = (s["frequency"], (np.asarray(s["reconstructions"]) / np.asarray(s["originals"])).tolist())
    src = _plot_spectra(page, "sharpness", spectra, "reconstruction power / original power", "ratio", ratio=True)
    page.figure(src, "Per frequency, the power of each model's reconstructions over the originals': 1 is perfect, lower is blurrier.", 520, 320)

    page.add("<h2>Continuity and completeness, side by side</h2>")
    curves = {name: r.numbers["continuity"]["interpolation"]["l2"]["distance_from_start"] for name, r in results.items()}
    t = np.linspace(0, 1, len(next(iter(curves.values())))).tolist()
    page.figure(_plot_lines(page, "interpolation_curves", t, curves, "interpolation: change from the first image", "position on the line", "RMSE from the start"),
                "Straight, evenly rising curves mean a continuous latent space.", 520, 320)
    for key, caption in (("interpolation_0", "Interpolation between the same two images"), ("perturbation_0", "The same image with growing latent noise"),
                         ("samples_prior", "Decoded from unit-Gaussian latents")):
        page.add(f"<h3>{caption}</h3>")
        for m, name in enumerate(names):
            image = results[name].images.get(key)
            if image is not None:
                page.image_figure(f"{key}_model{m}", image, html.escape(name))
    return page.write()
