"""`vaekit analyze`, `vaekit compare`, `vaekit diffusability`: measurements of a latent space, in HTML reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .common import CLIError, add_command, add_device_flag, add_model_flags, print_table

ANALYSIS_HELP = (
    "DATA is an image, a folder (recursive), tar shards or 'samples' (the built-in photos; samples:val for the "
    "held-out three, samples:native for native-resolution crops and saturated colours); each image is resized (shorter "
    "side) and centre-cropped to --resolution. A 4-channel (RGBA) model gets the images with their alpha (opaque where "
    "a file has none) and is scored as `vaekit eval` scores it (PSNR, SSIM, LPIPS of R, G, B; alpha_psnr, alpha_mae); "
    "a 3-channel model gets them composited on white. The report (DIR/report.html, opens offline, pictures beside it, "
    "RGBA shown on white; DIR/report.json with every number) explains each measure."
)


def register(sub: argparse._SubParsersAction) -> None:
    _add_analyze(sub)
    _add_compare(sub)
    _add_diffusability(sub)


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "analyze", cmd_analyze,
                    "measure a model's reconstructions and latent space (continuity, completeness, statistics, blur) into an HTML report",
                    cmd_analyze.__doc__ + ANALYSIS_HELP)  # fmt: skip
    p.add_argument("model", metavar="MODEL")
    _add_analysis_flags(p)


def cmd_analyze(args: argparse.Namespace) -> None:
    """Measure MODEL (a VAE or a plain AE) on DATA: reconstruction (PSNR, SSIM, LPIPS, sharpness), continuity
    (decoding along latent lines and under growing latent noise), completeness (decoding random latents), latent
    statistics (per-channel mean/std, the scale/shift that would normalise them, KL per channel, latent spectrum).
    """
    from ..files import check_output_folder
    from ..report import write_analysis_report

    check_output_folder(Path(args.report), "--report")
    names, images, notes = _analysis_images(args)
    lpips, note = _analysis_lpips(args)
    kid = _kid_extractor(args.kid, args.device) if args.diffusability else None
    result = _run_analysis(args.model, names, images, lpips, kid, args)
    path = write_analysis_report(result, args.report, f"vaekit analyze: {args.model}", notes + ([note] if note else []))
    _print_summary({args.model: result})
    print(f"wrote {path} and report.json")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "compare", cmd_compare, "several models side by side on the same images, in one HTML report",
                    cmd_compare.__doc__ + ANALYSIS_HELP)
    p.add_argument("models", nargs="+", metavar="MODEL")
    _add_analysis_flags(p)
    p.add_argument("--crops", type=int, default=4, metavar="N", help="images whose most detailed region is shown from every model (default 4)")


def cmd_compare(args: argparse.Namespace) -> None:
    """Run the analysis of `vaekit analyze` for each MODEL on the same DATA and put the results side by side:
    metrics tables with the best value highlighted, the same regions reconstructed by each model, and the
    interpolations and random samples next to each other. Models may differ in latent channels, factor and kind
    (VAE or AE) and in channels (RGB and RGBA: each gets the images as `vaekit analyze` gives them; the regions
    shown are the images on white). Each model's full report is written under DIR/models/.
    """
    from ..analysis import crop, detail_box
    from ..files import check_output_folder
    from ..report import slug, write_analysis_report, write_comparison_report

    if len(args.models) < 2:
        raise CLIError("compare needs at least 2 models (MODEL MODEL ... DATA); use `vaekit analyze` for one")
    check_output_folder(Path(args.report), "--report")
    names, images, notes = _analysis_images(args)
    lpips, note = _analysis_lpips(args)
    notes += [note] if note else []
    kid = _kid_extractor(args.kid, args.device) if args.diffusability else None  # loaded once for every model
    side = max(16, args.resolution // 4)
    x = images[3]  # the regions shown: the images on white, as 3-channel models get them and RGBA pictures are shown
    boxes = [(i, detail_box(x[i], side)) for i in range(min(args.crops, len(names)))]
    results, crops, reports = {}, {}, {}
    for k, source in enumerate(args.models, 1):
        label = source if source not in results else f"{source} ({k})"
        print(f"[{k}/{len(args.models)}] {label}", file=sys.stderr)
        result = _run_analysis(source, names, images, lpips, kid, args)
        folder = f"models/{k}_{slug(label)}"
        write_analysis_report(result, Path(args.report) / folder, f"vaekit analyze: {label}", notes)
        results[label], reports[label] = result, f"{folder}/report.html"
        crops[label] = [crop(result.reconstructions[i], box) for i, box in boxes]
    originals = [(names[i], crop(x[i], box)) for i, box in boxes]
    path = write_comparison_report(results, originals, crops, args.report, "vaekit compare: " + " vs ".join(results), notes, reports)
    _print_summary(results)
    print(f"wrote {path} and report.json (each model's own report under {Path(args.report) / 'models'})")


# ---- what analyze and compare share -----------------------------------------------------------


def _add_analysis_flags(p: argparse.ArgumentParser) -> None:
    """The flags analyze and compare share (after MODEL)."""
    from ..diffusability import Protocol

    p.add_argument("data", metavar="DATA")
    p.add_argument("--report", required=True, metavar="DIR", help="folder for report.html, its pictures and report.json")
    p.add_argument("--resolution", type=int, default=256, metavar="R", help="side of the square crops analysed (default 256; a multiple of each model's factor)")
    p.add_argument("--limit", type=int, default=32, metavar="N", help="use at most the first N images (default 32)")
    p.add_argument("--pairs", type=int, default=4, help="latent lines between neighbouring images (1-2, 2-3, ...), and images to perturb (default 4)")
    p.add_argument("--steps", type=int, default=8, help="decoded points along each latent line (default 8)")
    p.add_argument("--noise", type=float, default=1.0, metavar="S",
                   help="largest perturbation, in standard deviations of the data's latents per channel (default 1)")
    p.add_argument("--samples", type=int, default=16, help="random latents decoded from the prior and from the fitted Gaussian (default 16)")
    p.add_argument("--lpips", choices=["alex", "vgg", "off"], default="alex",
                   help="LPIPS backbone for the reconstruction and continuity distances (default alex); without its "
                        "downloaded weights the report says so and uses RMSE only")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="images decoded together (default 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random latents and noise directions, and of preset:NAME's random weights (default 0)")
    p.add_argument("--diffusability", metavar="TRAIN_DATA", help="also score how easily a diffusion model learns each "
                   "latent space, training vaekit's small fixed denoiser on latents of TRAIN_DATA (see `vaekit diffusability`). "
                   "On 2 idle CPU cores: about 1.5 minutes per small model (8x, 4 channels), about 15 minutes for pixel "
                   "space (preset:pixel), whose latents are the image at full resolution: its denoiser learns 192 values "
                   "per position instead of 4 at width 384 instead of 64, ~18x the time per step. A busy machine takes "
                   "several times longer")
    p.add_argument("--diffusability-steps", type=int, default=Protocol.steps, metavar="N",
                   help=f"with --diffusability: denoiser training steps (default {Protocol.steps}; scores compare only at equal steps)")
    p.add_argument("--kid", choices=["auto", "off"], default="auto",
                   help="with --diffusability: KID of the samples (needs Inception's weights; auto leaves it out with a note offline)")
    add_device_flag(p)
    add_model_flags(p, seed=False)


def _analysis_images(args: argparse.Namespace) -> tuple[list[str], dict[int, torch.Tensor], list[str]]:
    """DATA as names, batches of resolution x resolution centre crops by channel count (3: composited on white,
    exactly as `read_image` gives them to an RGB model; 4: RGBA, for an RGBA model), and notes on skipped files.
    Read once with alpha, so models of both kinds can be compared on the same images."""
    from ..data import center_crop, load_images, on_white, to_tensor

    skipped: list[str] = []
    images = load_images(args.data, limit=args.limit, skipped=skipped, alpha=True)
    if len(images) < 2:
        raise CLIError(f"{args.data} has {len(images)} readable image(s); the analysis needs at least 2 (it interpolates between pairs)")
    rgb = torch.cat([to_tensor(center_crop(on_white(image), args.resolution)) for _, image in images])
    rgba = torch.cat([to_tensor(center_crop(image, args.resolution)) for _, image in images])
    notes = [f"skipped unreadable {s}" for s in skipped]
    for note in notes:
        print(note, file=sys.stderr)
    return [name for name, _ in images], {3: rgb, 4: rgba}, notes


def _analysis_model(source: str, args: argparse.Namespace):
    from ..checkpoints import load

    model = load(source, family=args.family, device=args.device, dtype=torch.float32, seed=args.seed)
    if args.resolution % model.factor:
        f, r = model.factor, args.resolution
        raise CLIError(f"--resolution {r} is not a multiple of {source}'s factor {f}: use --resolution {max(f, r - r % f)} or {r - r % f + f}")
    return model


def _analysis_lpips(args: argparse.Namespace):
    """The LPIPS metric, or None and a note saying why it is left out (offline weights, --lpips off)."""
    if args.lpips == "off":
        return None, None
    from ..metrics import LPIPS

    return _optional("LPIPS", "--lpips", lambda: LPIPS(args.lpips, device=args.device))


def _optional(what: str, flag: str, build: Callable[[], Any]) -> tuple[Any, str | None]:
    """`build()`, or None and a note (printed) saying why `what` is not measured: its weights offline, its package missing."""
    from ..weights import MissingWeights

    try:
        return build(), None
    except (RuntimeError, OSError, ImportError) as e:
        reason = e.message(f"pass {flag} off to leave it out without this note") if isinstance(e, MissingWeights) else e
        note = f"{what} not measured ({reason})"
        print(f"note: {note}", file=sys.stderr)
        return None, note


def _kid_extractor(kid: str, device: str):
    """Inception features for KID, or None (--kid off, or its weights missing: a note says so)."""
    if kid == "off":
        return None
    from ..metrics import FID

    return _optional("KID", "--kid", lambda: FID(device=device))[0]


def _run_analysis(source: str, names: list[str], images: dict[int, torch.Tensor], lpips, kid, args: argparse.Namespace):
    """`vaekit.analysis.analyze` of the model on the images as it takes them (RGBA or RGB; `_analysis_images`)."""
    from ..analysis import analyze

    model = _analysis_model(source, args)
    x = images[4 if model.config.rgba else 3]
    result = analyze(model, x, pairs=args.pairs, steps=args.steps, noise_max=args.noise, samples=args.samples,
                     lpips=lpips, batch_size=args.batch_size, seed=args.seed)
    lpips_info = lpips.info["backbone"] if lpips is not None else None
    result.numbers = {"model": source, "data": args.data, "sources": names, "lpips": lpips_info, **result.numbers}
    if args.diffusability:
        from ..analysis import grid
        from ..diffusability import Protocol, score

        protocol = Protocol(steps=args.diffusability_steps, seed=args.seed)
        numbers, samples = score(model, args.diffusability, protocol, kid=kid, device=args.device)
        result.numbers["diffusability"] = numbers
        result.images["diffusability_samples"] = grid(samples[:32], 8)
    return result


def _print_summary(results: dict) -> None:
    from ..report import MEASURES, SUMMARY, fmt, lookup

    paths = [p for p in SUMMARY if any(lookup(r.numbers, p) is not None for r in results.values())]
    rows = [("measure", *results)]
    rows += [(MEASURES[p].label, *(fmt(lookup(r.numbers, p), MEASURES[p].digits) for r in results.values())) for p in paths]
    print_table(rows)


# ---- diffusability ------------------------------------------------------------------------------


def _add_diffusability(sub: argparse._SubParsersAction) -> None:
    from ..diffusability import Protocol

    d = Protocol()  # the defaults
    p = add_command(sub, "diffusability", cmd_diffusability,
                    "score how easily a diffusion model learns MODEL's latent space (a small fixed denoiser, trained here)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.html, report.json and the pictures")
    p.add_argument("--val", metavar="DATA", help="held-out images (default: held out of DATA, as `vaekit train` does)")
    p.add_argument("--resolution", type=int, default=d.resolution, metavar="R", help=f"crop side (default {d.resolution})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"denoiser training steps (default {d.steps})")
    p.add_argument("--train-crops", type=int, default=d.train_crops, metavar="N", help=f"training crops encoded (default {d.train_crops})")
    p.add_argument("--val-crops", type=int, default=d.val_crops, metavar="N", help=f"held-out crops scored (default {d.val_crops})")
    p.add_argument("--samples", type=int, default=d.samples, metavar="N", help=f"samples drawn and decoded (default {d.samples})")
    p.add_argument("--kid", choices=["auto", "off"], default="auto",
                   help="KID of the samples against the held-out crops (needs Inception's weights; auto leaves it out with a note offline)")
    p.add_argument("--seed", type=int, default=0, help="seed of crops, denoiser, noise and samples, and of preset:NAME's random weights (default 0)")
    add_device_flag(p)
    add_model_flags(p, seed=False)


def cmd_diffusability(args: argparse.Namespace) -> None:
    """Encode crops of DATA with MODEL (RGBA with their alpha for a 4-channel model; to_latent: what a diffusion model
    sees, then standardised to mean 0, std 1), train a small conv UNet denoiser on them (rectified flow; its size
    follows the latent shape by a fixed rule; fixed steps and seed) and report its held-out relative denoising error
    per noise level and their mean, the SCORE (0 perfect, 1 knows nothing: lower is easier to diffuse), the quality
    of its decoded samples (image-statistics distance; KID with Inception's weights) and the latents' spectrum beside
    the images'. The protocol is the same for every model (any family, pixel space: preset:pixel), so scores compare
    only at the same options. DATA is split as `vaekit train` splits it (samples: the held-out photos chelsea,
    coffee, flower). Writes OUT/report.html and OUT/report.json. See docs/DIFFUSABILITY.md."""
    from ..analysis import grid
    from ..checkpoints import load
    from ..diffusability import Protocol, score
    from ..files import check_output_folder
    from ..report import write_diffusability_report

    check_output_folder(Path(args.out), "--out")
    model = load(args.model, family=args.family, device=args.device, dtype=torch.float32, seed=args.seed)
    protocol = Protocol(resolution=args.resolution, train_crops=args.train_crops, val_crops=args.val_crops, steps=args.steps,
                        samples=args.samples, seed=args.seed)  # fmt: skip
    kid = _kid_extractor(args.kid, args.device)
    numbers, samples = score(model, args.data, protocol, val=args.val, kid=kid, device=args.device)
    numbers["model"] = args.model
    path = write_diffusability_report(numbers, grid(samples, 8), args.out, f"vaekit diffusability: {args.model}")
    levels = "  ".join(f"t={t:g}: {e:.4f}" for t, e in zip(numbers["levels"], numbers["errors"]))
    print(f"score {numbers['score']:.4f} (mean relative denoising error; lower is easier to diffuse)")
    print(f"per noise level: {levels}")
    lat, img = numbers["latents"], numbers["images"]
    print(f"latents {tuple(lat['shape'])}: high-frequency share {lat['high_frequency_fraction']:.3f}, slope {lat['spectrum_slope']:.2f} "
          f"(images: {img['high_frequency_fraction']:.3f}, {img['spectrum_slope']:.2f})")
    kid_text = f", KID {numbers['samples']['kid']['mean']:.4f} ± {numbers['samples']['kid']['std']:.4f}" if numbers["samples"]["kid"] else ""
    print(f"samples: edge distance {numbers['samples']['distance']['gradient']:.3f}{kid_text}")
    print(f"wrote {path} and report.json")
