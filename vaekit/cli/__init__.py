"""`vaekit <command>`: thin wrappers over the Python API. Errors are one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import os
import shlex
import sys
import warnings
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

from ..data import MAX_PIXELS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WINOGRAD_HELP = ("CPU fp32: 3x3 convolutions by NNPACK's Winograd transform, about 2x faster on AVX2 CPUs, ~1e-5 relative "
                 "error per convolution (SD1 decodes within 1e-4 of the direct result; docs/BENCHMARKS.md)")


class CLIError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


# ---- presets -----------------------------------------------------------------------------


def cmd_presets(args: argparse.Namespace) -> None:
    from ..config import PRESETS
    from ..model import Autoencoder

    rows = [("name", "params", "factor", "latent ch", "normalisation", "description")]
    with torch.device("meta"):  # count parameters without allocating them
        for name, p in PRESETS.items():
            c = p.config
            n = Autoencoder(c).num_parameters()
            rows.append((name, f"{n / 1e6:.1f}M", f"{c.factor}x", str(c.latent_channels), c.normalisation, p.description))
    _print_table(rows)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


# ---- inspect / convert -------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> None:
    from ..checkpoints import read_checkpoint

    ck = read_checkpoint(args.source, family=args.family)
    c = ck.config
    n = sum(t.numel() for t in ck.state_dict.values())
    print(f"source         {args.source}")
    print(f"format         {ck.format}")
    print(f"family         {c.family or '(custom)'}")
    print(f"kind           {c.kind}")
    print(f"parameters     {n:,} ({n / 1e6:.1f}M)")
    print(f"factor         {c.factor}x")
    print(f"latent ch      {c.latent_channels}")
    print(f"normalisation  {c.normalisation}   [{ck.normalisation_source}]")
    print(f"dtype          {ck.dtype}")
    print("config:")
    for k, v in c.to_dict().items():
        print(f"  {k:22s} {v}")
    for note in ck.notes:
        print(f"note: {note}")


def cmd_convert(args: argparse.Namespace) -> None:
    from ..checkpoints import load

    dest = Path(args.dest)
    single = dest.suffix == ".safetensors"
    fmt = args.format or ("single-file" if single else "diffusers")
    if fmt == "diffusers" and single:
        raise CLIError(f"DEST {dest} names a .safetensors file but --format diffusers writes a folder: drop --format, or give a folder name")
    _check_model_dest(args.source, dest, fmt, args.overwrite)
    model = load(args.source, family=args.family, seed=args.seed)
    dtype = DTYPES[args.dtype] if args.dtype else None
    model.save(dest, format=fmt, dtype=dtype)
    print(f"wrote {dest} ({fmt}{', ' + args.dtype if args.dtype else ''})")


# ---- reconstruct -------------------------------------------------------------------------


def cmd_reconstruct(args: argparse.Namespace) -> None:
    from ..checkpoints import load
    from ..data import IMAGE_SUFFIXES, find_images, read_image, to_tensor, to_uint8, write_image
    from ..files import check_output_folder, check_targets, output_folder, output_names
    from ..progress import progress

    src, out = Path(args.input), Path(args.outdir)
    to_file = src.is_file() and out.suffix.lower() in IMAGE_SUFFIXES  # `reconstruct M photo.jpg recon.png`
    if src.is_dir() and out.resolve() == src.resolve():
        raise CLIError(f"OUTDIR is INPUT ({src}): the reconstructions would land among the originals; choose another folder")
    if out.is_file() and not to_file:
        raise CLIError(f"OUTDIR {out} is a file: give a folder (or, for one input image, a file name ending in .png)")
    if not to_file:  # a new or empty folder, or one vaekit wrote: then it is marked, and never searched as INPUT
        check_output_folder(out, "OUTDIR")
    files = find_images(src)
    if not files:
        raise CLIError(f"no images (png/jpg/webp/bmp/tif) found under {src}")
    rel = [PurePosixPath((f.relative_to(src) if src.is_dir() else Path(f.name)).as_posix()) for f in files]
    targets = [out] if to_file else [out / name for name in output_names(rel)]
    check_targets(targets, files, args.overwrite, inside=None if to_file else out)
    model = load(args.model, family=args.family, device=args.device, dtype=DTYPES[args.dtype], seed=args.seed).eval()
    skipped: list[str] = []
    with contextlib.nullcontext() if to_file else output_folder(out, "vaekit reconstruct"):
        for path, target in progress(list(zip(files, targets)), "reconstruct", "img"):
            try:
                image = read_image(path)
            except Exception as e:  # unreadable files are reported and skipped, not fatal
                skipped.append(f"skipped unreadable {path}: {e}")
                continue
            h, w = image.shape[:2]
            if not args.pad and (h % model.factor or w % model.factor):
                f = model.factor
                fits = " or ".join(dict.fromkeys(f"{a}x{b}" for a, b in ((h - h % f or f, w - w % f or f), (h - h % f + f, w - w % f + f))))
                message = f"{path} is {h}x{w}, not a multiple of the model's factor {f}: crop or resize it to {fits}, or drop --no-pad"
                if src.is_file():
                    raise CLIError(message)
                skipped.append(f"skipped {message}")
                continue
            x = to_tensor(image).to(model.device)
            with torch.inference_mode():
                recon, _ = model(x, pad=args.pad) if not args.tile else _tiled_recon(model, x, args.pad, args.tile)
            write_image(target, to_uint8(recon)[0])
        written = len(files) - len(skipped)
        if not written:
            raise CLIError(f"no image under {src} could be reconstructed ({skipped[0]}{f'; {len(skipped) - 1} more' if len(skipped) > 1 else ''})")
    for line in skipped:
        print(line, file=sys.stderr)
    print(f"wrote {plural(written, 'reconstruction')} to {out}" + (f" ({len(skipped)} skipped)" if skipped else ""))


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _tiled_recon(model, x: torch.Tensor, pad: bool, tile: int | str):
    posterior = model.encode(x, pad=pad, tile=tile)
    return model.decode(posterior.mode(), size=posterior.image_size, tile=tile), posterior


# ---- eval --------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> None:
    from ..data import find_images
    from ..evaluate import evaluate, format_table, to_json
    from ..files import check_targets, write_atomic
    from ..metrics import METRICS
    from ..weights import MissingWeights

    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise CLIError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(METRICS)}")
    if args.json:  # the scores may replace an earlier JSON, never an input image or the model
        images = find_images(args.data) if Path(args.data).exists() else []
        check_targets([Path(args.json)], images + _files_of(args.model), overwrite=True)
    try:
        result = evaluate(args.model, args.data, metrics=metrics, resolution=args.resolution, batch_size=args.batch_size,
                          lpips_net=args.lpips_net, device=args.device, family=args.family, dtype=DTYPES[args.dtype],
                          seed=args.seed)
    except MissingWeights as e:
        raise CLIError(e.message("leave it out of --metrics")) from None
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.json), lambda tmp: tmp.write_text(to_json(result) + "\n"))
        print(f"wrote {args.json}")


# ---- analyze / compare -------------------------------------------------------------------


def _analysis_images(args: argparse.Namespace) -> tuple[list[str], torch.Tensor, list[str]]:
    """DATA as names, a batch of resolution x resolution centre crops, and notes on skipped files."""
    from ..data import center_crop, load_images, to_tensor

    skipped: list[str] = []
    images = load_images(args.data, limit=args.limit, skipped=skipped)
    if len(images) < 2:
        raise CLIError(f"{args.data} has {len(images)} readable image(s); the analysis needs at least 2 (it interpolates between pairs)")
    x = torch.cat([to_tensor(center_crop(image, args.resolution)) for _, image in images])
    notes = [f"skipped unreadable {s}" for s in skipped]
    for note in notes:
        print(note, file=sys.stderr)
    return [name for name, _ in images], x, notes


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
    from ..weights import MissingWeights

    try:
        return LPIPS(args.lpips, device=args.device), None
    except (RuntimeError, OSError, ImportError) as e:
        reason = e.message("pass --lpips off to leave it out without this note") if isinstance(e, MissingWeights) else e
        note = f"LPIPS not measured ({reason})"
        print(f"note: {note}", file=sys.stderr)
        return None, note


def _run_analysis(source: str, names: list[str], x: torch.Tensor, lpips, kid, args: argparse.Namespace):
    from ..analysis import analyze

    model = _analysis_model(source, args)
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


def _kid_extractor(kid: str, device: str):
    """Inception features for KID, or None (--kid off, or its weights missing: a note says so)."""
    if kid == "off":
        return None
    from ..metrics import FID
    from ..weights import MissingWeights

    try:
        return FID(device=device)
    except (RuntimeError, OSError, ImportError) as e:
        reason = e.message("pass --kid off to leave it out without this note") if isinstance(e, MissingWeights) else e
        print(f"note: KID not measured ({reason})", file=sys.stderr)
        return None


def cmd_diffusability(args: argparse.Namespace) -> None:
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


def _print_summary(results: dict) -> None:
    from ..report import MEASURES, SUMMARY, fmt, lookup

    paths = [p for p in SUMMARY if any(lookup(r.numbers, p) is not None for r in results.values())]
    rows = [("measure", *results)]
    rows += [(MEASURES[p].label, *(fmt(lookup(r.numbers, p), MEASURES[p].digits) for r in results.values())) for p in paths]
    _print_table(rows)


def cmd_analyze(args: argparse.Namespace) -> None:
    from ..files import check_output_folder
    from ..report import write_analysis_report

    check_output_folder(Path(args.report), "--report")
    names, x, notes = _analysis_images(args)
    lpips, note = _analysis_lpips(args)
    kid = _kid_extractor(args.kid, args.device) if args.diffusability else None
    result = _run_analysis(args.model, names, x, lpips, kid, args)
    path = write_analysis_report(result, args.report, f"vaekit analyze: {args.model}", notes + ([note] if note else []))
    _print_summary({args.model: result})
    print(f"wrote {path} and report.json")


def cmd_compare(args: argparse.Namespace) -> None:
    from ..analysis import crop, detail_box
    from ..files import check_output_folder
    from ..report import slug, write_analysis_report, write_comparison_report

    if len(args.models) < 2:
        raise CLIError("compare needs at least 2 models (MODEL MODEL ... DATA); use `vaekit analyze` for one")
    check_output_folder(Path(args.report), "--report")
    names, x, notes = _analysis_images(args)
    lpips, note = _analysis_lpips(args)
    notes += [note] if note else []
    kid = _kid_extractor(args.kid, args.device) if args.diffusability else None  # loaded once for every model
    side = max(16, args.resolution // 4)
    boxes = [(i, detail_box(x[i], side)) for i in range(min(args.crops, len(names)))]
    results, crops, reports = {}, {}, {}
    for k, source in enumerate(args.models, 1):
        label = source if source not in results else f"{source} ({k})"
        print(f"[{k}/{len(args.models)}] {label}", file=sys.stderr)
        result = _run_analysis(source, names, x, lpips, kid, args)
        folder = f"models/{k}_{slug(label)}"
        write_analysis_report(result, Path(args.report) / folder, f"vaekit analyze: {label}", notes)
        results[label], reports[label] = result, f"{folder}/report.html"
        crops[label] = [crop(result.reconstructions[i], box) for i, box in boxes]
    originals = [(names[i], crop(x[i], box)) for i, box in boxes]
    path = write_comparison_report(results, originals, crops, args.report, "vaekit compare: " + " vs ".join(results), notes, reports)
    _print_summary(results)
    print(f"wrote {path} and report.json (each model's own report under {Path(args.report) / 'models'})")


# ---- encode / decode / calibrate -------------------------------------------------------------


def cmd_encode(args: argparse.Namespace) -> None:
    from ..checkpoints import load
    from ..latents import EncodeOptions, encode_dataset
    from ..model import winograd

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    device = args.device
    if distributed and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        model = load(args.model, family=args.family, device=device, dtype=DTYPES[args.precision], seed=args.seed)
        options = EncodeOptions(
            resolution=args.resolution, resize_mode=args.resize_mode, buckets=args.buckets, store=args.store, dtype=args.dtype,
            precision=args.precision, shard_size=args.shard_size, batch_size=args.batch_size, min_side=args.min_side,
            max_pixels=args.max_pixels, tile=args.tile, workers=args.workers, seed=args.sample_seed, flip=args.flip,
            reduced_jpeg=args.reduced_jpeg, commit_seconds=args.commit_seconds,
        )  # fmt: skip
        with winograd(args.winograd):
            result = encode_dataset(model, args.data, args.out, options, add=args.add, command=_command_line(args))
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0 and Path(args.out, "info.json").is_file():
            print(f"vaekit encode: interrupted; what was encoded is kept in {args.out}: the same command continues it", file=sys.stderr)
        raise
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        state = "complete" if result["shards"] == result["of"] else f"{result['shards']} of {result['of']} shards"
        added = f"added {plural(result['added'], 'new source')} as new shards; " if result["added"] else ""
        print(f"{added}encoded {plural(result['encoded_now'], 'source')} now in {result['seconds']:.0f} s; {args.out}: "
              f"{plural(result['items'], 'latent')}, {result['errors']} skipped (errors.jsonl), {state}")  # fmt: skip


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (for messages that say how to run it again)."""
    return "vaekit " + shlex.join(args.argv)


def cmd_decode(args: argparse.Namespace) -> None:
    from ..checkpoints import load
    from ..data import to_uint8, write_image
    from ..files import check_output_folder, check_targets, output_folder, output_names, safe_name
    from ..latents import LatentDataset, encoded_by, is_latent_dataset, output_name, read_latent_file
    from ..model import winograd
    from ..model.autoencoder import denormalize_latents
    from ..progress import progress

    src, out = Path(args.latents), Path(args.outdir)
    model = load(args.model, family=args.family, device=args.device, dtype=DTYPES[args.dtype], seed=args.seed)
    check_output_folder(out, "OUTDIR")
    skipped: list[str] = []
    if is_latent_dataset(src):
        dataset = LatentDataset(src)
        if not args.force and not encoded_by(model, dataset.info):
            raise CLIError(f"{args.model} is not the model that encoded {src} (its info.json records other weights): "
                           "decode with that model (or a recalibrated copy of it), or pass --force to decode anyway")  # fmt: skip
        _check_channels(model, dataset.config.latent_channels, f"{src} holds", raw=True)
        kept = []
        for i, item in enumerate(dataset.items):
            try:
                kept.append((i, output_name(item["source"], item.get("flipped", False))))
            except ValueError as e:
                skipped.append(f"skipped {item['source']}: {e}")
        names = [name for _, name in kept]
        latents = (dataset.raw_latent(i) for i, _ in kept)  # raw: no round trip through the normalisation
    elif src.is_dir():
        raise CLIError(f"LATENTS {src} is a folder without info.json: give a latent dataset `vaekit encode` wrote, or a .safetensors or .pt file of latents")
    else:
        pairs = []
        for key, t in read_latent_file(src):
            _check_channels(model, t.shape[0], f"{src}: {key!r} has", raw=args.raw)
            try:
                pairs.append((safe_name(key), t))
            except ValueError as e:
                skipped.append(f"skipped {key!r}: {e}")
        names = [name for name, _ in pairs]
        bn = model.bn_stats()
        latents = (t.float() if args.raw else denormalize_latents(t.float()[None], model.config, bn)[0] for _, t in pairs)
    if not names:
        raise CLIError(f"nothing to decode in {src}" + (f" ({skipped[0]})" if skipped else ""))
    targets = [out / name for name in output_names(names)]
    check_targets(targets, [], args.overwrite, inside=out)
    for line in skipped:
        print(line, file=sys.stderr)
    with output_folder(out, "vaekit decode"):
        for target, z in progress(zip(targets, latents), "decode", "img", total=len(targets)):
            with torch.inference_mode(), winograd(args.winograd):
                x = model.decode(z[None].to(model.device), tile=args.tile)
            write_image(target, to_uint8(x)[0])
    print(f"wrote {plural(len(targets), 'image')} to {out}" + (f" ({len(skipped)} skipped)" if skipped else ""))


def _check_channels(model, channels: int, what: str, raw: bool) -> None:
    """Latents the model cannot decode are refused before any folder is made."""
    want = model.config.latent_channels if raw else model.config.normalised_shape[0]
    if channels != want:
        kind = "raw" if raw else "normalised"
        raise CLIError(f"{what} {channels}-channel latents; the model's {kind} latents have {want}: decode with the model "
                       "that made them" + ("" if raw else " (or pass --raw if they are raw, as `encode` returns them)"))  # fmt: skip


def _check_model_dest(source: str, dest: Path, fmt: str, overwrite: bool) -> None:
    """A model file or folder vaekit writes: never over its source, never over an existing file without --overwrite."""
    from ..checkpoints import DIFFUSERS_WEIGHTS
    from ..files import check_targets

    if fmt == "diffusers" and dest.is_file():
        raise CLIError(f"{dest} is a file; a diffusers model is a folder: give a folder name (or a name ending in .safetensors)")
    check_targets([dest] if fmt == "single-file" else [dest / DIFFUSERS_WEIGHTS[0], dest / "config.json"], _files_of(source), overwrite)


def _files_of(source: str) -> list[Path]:
    """The files a MODEL (or SOURCE) argument names: the file, or every file of the folder; none for preset:NAME or a repo id."""
    path = Path(source).expanduser()
    return [p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()] if path.exists() else []


def cmd_calibrate(args: argparse.Namespace) -> None:
    from ..checkpoints import load
    from ..latents import (EncodeOptions, LatentDataset, calibrate, calibrated_model, encoded_by, is_latent_dataset,
                          latent_statistics, prepared_images, stored_latents)  # fmt: skip

    fmt = "single-file" if args.write and args.write.endswith(".safetensors") else "diffusers"
    if args.write:  # refused before any work, as `convert` refuses
        _check_model_dest(args.model, Path(args.write), fmt, args.overwrite)
    model = load(args.model, family=args.family, device=args.device, dtype=torch.float32, seed=args.seed)
    per_channel = args.per_channel or model.config.latent_norm == "patch_bn"
    skipped: list[str] = []
    if is_latent_dataset(args.data):  # the stored raw latents: no re-encoding
        dataset = LatentDataset(args.data)
        if not encoded_by(model, dataset.info):
            raise CLIError(f"{args.data} was encoded by another model (its info.json records other weights): calibrate the "
                           "model that encoded it, or calibrate on images")  # fmt: skip
        sample = not args.mode and dataset.info["store"] == "both"
        what = {"both": "posterior samples" if sample else "posterior mode", "mean": "posterior mode (the dataset stores the mean)",
                "sample": "the dataset's stored posterior samples"}[dataset.info["store"]]  # fmt: skip
        where = f"the latent dataset {args.data} ({dataset.info['resolution']} px, {dataset.info['resize_mode']})"

        def measure(per: bool, normalised: bool) -> dict:
            return latent_statistics(model, stored_latents(dataset, sample, args.seed, args.limit), per, normalised)
    else:
        if args.resolution % model.factor:
            raise CLIError(f"--resolution {args.resolution} is not a multiple of the model's factor {model.factor}")
        options = EncodeOptions(resolution=args.resolution, min_side=args.min_side, max_pixels=args.max_pixels)
        images = [x for _, x in itertools.islice(prepared_images(args.data, options, skipped), args.limit)]
        for line in skipped:  # encode's limits and skips: unreadable, decompression bombs, too small
            print(f"skipped {line}", file=sys.stderr)
        if not images:
            raise CLIError(f"no usable images in {args.data}" + (f" ({len(skipped)} skipped)" if skipped else ""))
        what = "posterior mode" if args.mode else "posterior samples"
        where = f"{plural(len(images), 'image')} at {args.resolution}x{args.resolution}"

        def measure(per: bool, normalised: bool) -> dict:
            return calibrate(model, images, per, sample=not args.mode, seed=args.seed, normalised=normalised)
    stats, now = measure(per_channel, False), measure(False, True)
    show = lambda v: ", ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else f"{v:.4f}"  # noqa: E731
    print(f"measured on {plural(stats['images'], 'latent')} of {where} ({what}; {len(skipped)} skipped):")
    print(f"  raw latents: mean {show(stats['mean'])}; std {show(stats['std'])}")
    new = calibrated_model(model, stats)
    print(f"  configured normalisation: {model.config.normalisation}")
    print(f"  calibrated normalisation: {new.config.normalisation}" + ("" if per_channel else
          f"  (scaling_factor {new.config.scaling_factor:.5f}, shift_factor {new.config.shift_factor:.5f})"))  # fmt: skip
    print(f"  with the configured normalisation these latents have mean {now['mean']:.4f} and std {now['std']:.4f} "
          "(a diffusion model expects 0 and 1)")  # fmt: skip
    if args.write:
        new.save(args.write, format=fmt)
        print(f"wrote {args.write} (the same weights with the calibrated normalisation; LatentDataset(..., model=...) "
              "and `vaekit decode` take it for latents the original encoded)")  # fmt: skip


# ---- bench ---------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> None:
    import json

    from ..checkpoints import load
    from ..files import check_targets, write_atomic
    from ..speed import bench, format_rows, has_diffusers_peer, to_dicts

    if args.json:  # may replace an earlier result, never the model
        check_targets([Path(args.json)], _files_of(args.model), overwrite=True)
    if args.repeats < 1:
        raise CLIError(f"--repeats {args.repeats}: give at least 1 timed run")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, family=args.family, device=args.device, dtype=torch.float32, seed=args.seed)
    against = None if args.against == "none" else args.against
    if against and not has_diffusers_peer(model.config):
        print(f"note: diffusers has no class for {args.model}'s architecture; timing vaekit alone", file=sys.stderr)
    if args.repeats < 3:
        print(f"note: --repeats {args.repeats}: timings from fewer than 3 repeats are noise (one slow run sets the median); "
              "use --repeats 5 (the default) or more to compare numbers", file=sys.stderr)  # fmt: skip
    report = lambda r: print(f"{r.op} {r.size}² x{r.batch} {r.precision}: {r.seconds:.3f} s" +  # noqa: E731
                             (f" (diffusers {r.peer_seconds:.3f} s, {r.speedup:.2f}x)" if r.peer_seconds else "") +
                             (f", compiled in {r.compile_seconds:.1f} s" if r.compile_seconds is not None else ""), file=sys.stderr)
    # stdout holds the table alone: whatever diffusers or torch print while the peer is built and run goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        rows, peaks = bench(model, args.size, args.batch, args.precision, tile=args.tile, against=against, repeats=args.repeats,
                            compile=args.compile, winograd=args.winograd, report=report)  # fmt: skip
    print(format_rows(rows, peaks))
    if args.json:
        text = json.dumps({"model": args.model, "peaks": peaks, "rows": to_dicts(rows)}, indent=2) + "\n"
        write_atomic(Path(args.json), lambda tmp: tmp.write_text(text))
        print(f"wrote {args.json}")


# ---- train / quickstart ------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> None:
    from ..train import train

    _run_training(lambda: train(_train_config(args)), "train")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from ..train import quickstart

    _run_training(lambda: quickstart(args.out, args.seconds), "quickstart")


def _train_config(args: argparse.Namespace):
    """TrainConfig from the options given; with --resume, the run's saved settings fill in the rest."""
    import dataclasses
    import json

    from ..losses import LossConfig
    from ..train import TrainConfig

    given = {k: v for k, v in vars(args).items() if k not in ("command", "fn", "argv")}
    sources = [f"--{k}" for k in ("preset", "config", "init") if k in given]
    if len(sources) > 1:
        raise CLIError(f"give one of --preset, --config and --init, not {' and '.join(sources)}")
    base = TrainConfig()
    saved = Path(given["out"]) / "config.json"
    if given.get("resume") and saved.is_file():
        base = TrainConfig.from_dict(json.loads(saved.read_text())["train"])
    elif given.get("resume") and "data" not in given:
        raise CLIError(f"no run to resume in {given['out']} (it has no config.json): start one with --data DATA")
    loss_names = {f.name for f in dataclasses.fields(LossConfig)}
    loss = dataclasses.replace(base.loss, **{k: v for k, v in given.items() if k in loss_names})
    return dataclasses.replace(base, loss=loss, **{k: v for k, v in given.items() if k not in loss_names})


def _run_training(run: Callable, command: str) -> None:
    import json

    from ..config import AutoencoderConfig
    from ..weights import MissingWeights

    try:
        result = run()
    except KeyboardInterrupt as e:
        if str(e):
            print(f"vaekit {command}: {e}", file=sys.stderr)
        raise
    except MissingWeights as e:
        raise CLIError(e.message("train without it (--lpips-weight 0)")) from None
    except ImportError as e:  # an optional extra is missing: the message says which
        raise CLIError(str(e)) from None
    if result.rank != 0:  # under torchrun, rank 0 reports
        return
    m = result.metrics
    done = m["step"] - m["start_step"]
    if done == 0:
        print(f"nothing to train: {result.run} was already at step {m['step']} of {m['steps']} (a larger --steps continues it)")
    else:
        span = f", steps {m['start_step']}-{m['step']} of {m['steps']}" if m["start_step"] else ""
        print(f"trained {plural(done, 'step')} in {m['seconds']:.0f} s ({m['stopped']}{span}); run folder: {result.run}")
    config = AutoencoderConfig.from_dict(json.loads((result.run / "config.json").read_text())["model"])
    loaders = "vaekit.load, or diffusers AutoencoderKL.from_pretrained" if config.diffusers_compatible else "vaekit.load"
    print(f"model:   {result.model}  ({loaders})")
    if "final" in m:
        grid = sorted((result.run / "samples").glob("step_*.png"))[-1]
        f, before = m["final"], m.get("initial")
        start = "before fine-tuning" if m.get("init") else "untrained"
        was = f" ({start} {before['psnr']:.2f} dB / {before['ssim']:.3f})" if before else ""
        print(f"samples: {grid}  (validation images above, reconstructions below)")
        print(f"held-out {plural(f['n'], 'image')} at {m['val_resolution']}x{m['val_resolution']}: PSNR {f['psnr']:.2f} dB, SSIM {f['ssim']:.4f}{was}")
        for name, title in (("photos", "held-out photos"), ("crops", "native-resolution crops"), ("synthetic", "saturated colours")):
            t = m.get("against_thumbnail", {}).get(name)
            if t:
                colour = f", colour error {t['saturated_colour_error']:.1f} levels at most" if t["saturated_colour_error"] is not None else ""
                print(f"{title}: PSNR {t['psnr']:.2f} dB, {t['thumbnail_factor']}x bicubic thumbnail {t['thumbnail_psnr']:.2f} dB, "
                      f"worst image {t['worst_gap']:+.2f} dB against it ({t['worst_image']}){colour}")  # fmt: skip
        print(f"metrics: {result.run / 'metrics.json'}   logs: tensorboard --logdir {result.run / 'logs'}")


def _tile_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a tile side in pixels or 'auto', got {value!r}") from None


# ---- wiring ------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--family", help="normalisation family when the file does not say (e.g. sd3 or flux1 for 16-channel VAEs; "
                   "case-insensitive, aliases such as flux, sd15, sd2 accepted)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset:NAME model (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from ..diffusability import Protocol

    parser = argparse.ArgumentParser(
        prog="vaekit",
        description="Build, load, convert, train and measure latent-diffusion autoencoders. "
        "MODEL/SOURCE is a diffusers folder, a .safetensors/.ckpt/.pt/.bin file, a Hugging Face repo id, or preset:NAME.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, fn: Callable[[argparse.Namespace], None], description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(fn=fn)
        return p

    add("presets", "list the built-in architectures with their factor, channels and scale/shift", cmd_presets)

    p = add("inspect", "show a checkpoint's format, config, size, normalisation and dtype", cmd_inspect)
    p.add_argument("source", metavar="SOURCE")
    _add_model_args(p, seed=False)

    p = add("convert", "convert a checkpoint to a diffusers folder or a single .safetensors file", cmd_convert,
            "Convert SOURCE (any loadable checkpoint, or preset:NAME for random weights) to DEST. Never writes over "
            "an existing file unless --overwrite is given.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("dest", metavar="DEST", help="a .safetensors file (single-file) or a folder (diffusers)")
    p.add_argument("--format", choices=["diffusers", "single-file"],
                   help="default: single-file when DEST ends in .safetensors, else a diffusers folder")
    p.add_argument("--dtype", choices=list(DTYPES), help="store weights in this dtype (default: as loaded)")
    p.add_argument("--overwrite", action="store_true", help="replace DEST's model files if they exist")
    _add_model_args(p)

    p = add("reconstruct", "encode and decode images; write PNGs of the same size and relative names", cmd_reconstruct,
            "Reconstruct INPUT (an image or a folder, searched recursively) into OUTDIR as PNGs with the same "
            "relative names (suffix .png) and pixel size; when two inputs would share a name (x.jpg and x.png), "
            "the one not already a .png keeps its whole name (x.jpg.png). Unreadable files are reported and "
            "skipped. Safe by default: OUTDIR may not be INPUT, no input is ever written over, an existing file "
            "only with --overwrite, and folders vaekit wrote (they hold a .vaekit-output file) are never read "
            "as INPUT.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("outdir", metavar="OUTDIR", help="output folder; for one input image, a file name ending in .png "
                   "(or .jpg, .webp, ...) writes that file")
    p.add_argument("--overwrite", action="store_true", help="replace reconstructions that already exist in OUTDIR")
    p.add_argument("--pad", action=argparse.BooleanOptionalAction, default=True,
                   help="reflect-pad sides to a multiple of the model's factor and crop back (default: on); "
                        "--no-pad rejects such images")
    p.add_argument("--tile", type=_tile_arg, metavar="N", help="run the full-resolution layers in N-pixel tiles to bound "
                   "GPU memory, with the untiled result; 'auto' picks N from free GPU memory (see docs/TILING.md)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="compute dtype (default fp32, whatever the file stores; fp16/bf16 are faster on a GPU and "
                        "move some pixels by a level or two)")
    _add_model_args(p)

    p = add("eval", "score reconstructions: PSNR, SSIM, MS-SSIM, LPIPS, rFID, with the protocol behind the numbers", cmd_eval,
            "Reconstruct DATA with MODEL exactly as `vaekit reconstruct` does (posterior mode, padded and cropped back, "
            "uint8) and score the result against the originals. DATA is an image, a folder (recursive), tar shards or "
            "'samples' (the built-in photos; samples:val for the held-out three, samples:native for native-resolution crops "
            "and saturated colours). See docs/EVALUATION.md.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--metrics", default="psnr,ssim",
                   help="comma-separated, from psnr,ssim,ms-ssim,lpips,rfid (default psnr,ssim: they need no downloaded "
                        "weights). ms-ssim needs images of at least 161 px; lpips and rfid download their network weights "
                        "once (offline: the error names the file and where to put it)")
    p.add_argument("--json", metavar="FILE", help="also write every number, per image, and the protocol to FILE")
    p.add_argument("--resolution", type=int, metavar="R",
                   help="resize the shorter side to R (Lanczos) and cut the centre R x R; default: each image at its own size")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="reconstruct up to B images of the same size together: faster on a GPU, but float rounding then "
                        "moves a few pixels by one level against `vaekit reconstruct` (default 1: identical to it)")
    p.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex",
                   help="LPIPS backbone (default alex; VGG gives several times larger values, so compare like with like)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="compute dtype (default fp32, whatever the file stores; recorded in the JSON protocol)")
    _add_model_args(p)

    analysis_help = (
        "DATA is an image, a folder (recursive), tar shards or 'samples' (the built-in photos; samples:val for the "
        "held-out three, samples:native for native-resolution crops and saturated colours); each image is resized (shorter side) and centre-cropped to --resolution. The report "
        "(DIR/report.html, opens offline, pictures beside it; DIR/report.json with every number) explains each measure."
    )

    def add_analysis_args(p: argparse.ArgumentParser) -> None:
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
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        _add_model_args(p, seed=False)

    p = add("analyze", "measure a model's reconstructions and latent space (continuity, completeness, statistics, blur) into an HTML report",
            cmd_analyze,
            "Measure MODEL (a VAE or a plain AE) on DATA: reconstruction (PSNR, SSIM, LPIPS, sharpness), continuity "
            "(decoding along latent lines and under growing latent noise), completeness (decoding random latents), "
            "latent statistics (per-channel mean/std, the scale/shift that would normalise them, KL per channel, "
            "latent spectrum). " + analysis_help)
    p.add_argument("model", metavar="MODEL")
    add_analysis_args(p)

    p = add("compare", "several models side by side on the same images, in one HTML report", cmd_compare,
            "Run the analysis of `vaekit analyze` for each MODEL on the same DATA and put the results side by side: "
            "metrics tables with the best value highlighted, the same regions reconstructed by each model, and the "
            "interpolations and random samples next to each other. Models may differ in latent channels, factor and "
            "kind (VAE or AE). Each model's full report is written under DIR/models/. " + analysis_help)
    p.add_argument("models", nargs="+", metavar="MODEL")
    add_analysis_args(p)
    p.add_argument("--crops", type=int, default=4, metavar="N", help="images whose most detailed region is shown from every model (default 4)")

    p = add("diffusability", "score how easily a diffusion model learns MODEL's latent space (a small fixed denoiser, trained here)",
            cmd_diffusability,
            "Encode crops of DATA with MODEL (to_latent: what a diffusion model sees, then standardised to mean 0, "
            "std 1), train a small conv UNet denoiser on them (rectified flow; its size follows the latent shape by a "
            "fixed rule; fixed steps and seed) and report its held-out relative denoising error per noise level and "
            "their mean, the SCORE (0 perfect, 1 knows nothing: lower is easier to diffuse), the quality of its "
            "decoded samples (image-statistics distance; KID with Inception's weights) and the latents' spectrum "
            "beside the images'. The protocol is the same for every model (any family, pixel space: preset:pixel), "
            "so scores compare only at the same options. DATA is split as `vaekit train` splits it (samples: the "
            "held-out photos chelsea, coffee, flower). Writes OUT/report.html and OUT/report.json. See docs/DIFFUSABILITY.md.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.html, report.json and the pictures")
    p.add_argument("--val", metavar="DATA", help="held-out images (default: held out of DATA, as `vaekit train` does)")
    p.add_argument("--resolution", type=int, default=Protocol.resolution, metavar="R", help=f"crop side (default {Protocol.resolution})")
    d = Protocol()
    p.add_argument("--steps", type=int, default=d.steps, help=f"denoiser training steps (default {d.steps})")
    p.add_argument("--train-crops", type=int, default=d.train_crops, metavar="N", help=f"training crops encoded (default {d.train_crops})")
    p.add_argument("--val-crops", type=int, default=d.val_crops, metavar="N", help=f"held-out crops scored (default {d.val_crops})")
    p.add_argument("--samples", type=int, default=d.samples, metavar="N", help=f"samples drawn and decoded (default {d.samples})")
    p.add_argument("--kid", choices=["auto", "off"], default="auto",
                   help="KID of the samples against the held-out crops (needs Inception's weights; auto leaves it out with a note offline)")
    p.add_argument("--seed", type=int, default=0, help="seed of crops, denoiser, noise and samples, and of preset:NAME's random weights (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_model_args(p, seed=False)

    p = add("train", "train or fine-tune a VAE or plain AE (resumable, multi-GPU with torchrun)", cmd_train,
            "Train an autoencoder on DATA into the run folder RUN: RUN/config.json (every setting), RUN/checkpoints/ "
            "(atomic, the last K kept), RUN/model/ (final EMA weights, diffusers format), RUN/metrics.json (validation "
            "PSNR/SSIM), RUN/logs/ (TensorBoard), RUN/samples/ (validation reconstructions). DATA is a folder "
            "(searched recursively), an image, tar shards ('shards/{000..099}.tar'), or 'samples' (built-in photos). "
            "--resume continues RUN exactly where its last checkpoint stopped, with the run's saved settings (options "
            "given again override them); Ctrl-C saves a checkpoint first. Under `torchrun --nproc_per_node N -m "
            "vaekit.cli train ...` each process trains on its share of the data with DDP. See docs/TRAINING.md.")
    _add_train_args(p)

    p = add("encode", "encode images once into a sharded latent dataset for diffusion training (resumable, torchrun)",
            cmd_encode,
            "Encode every image of DATA (a folder searched recursively in sorted order, an image, tar shards, or "
            "'samples') with MODEL into OUT: shard-NNNNN.safetensors of --shard-size items (raw posterior mean and "
            "logvar, or --store mean|sample), manifest.jsonl (one line per item: source relative to DATA, caption, "
            "flipped, SDXL's original_size / crop_coords_top_left / target_size, shard, index, crop box, bucket), "
            "errors.jsonl (every skipped file and why: unreadable, truncated, not an image, a decompression bomb, too "
            "small, an unsafe name in a tar shard) and info.json (the model's weights hash and every option that shapes "
            "a latent). Captions come from a .txt, .caption or .json file beside each image (in tar shards: members of "
            "the same key), or a folder's metadata.jsonl. Photos are read upright (EXIF orientation). Running the same "
            "command again continues an interrupted run (Ctrl-C, a crash, kill -9: at most --commit-seconds of work is "
            "lost) with the result of one clean run; any other model or option is refused; --add appends images DATA "
            "gained as new shards. Under `torchrun --nproc_per_node K -m vaekit.cli encode ...` the ranks share the "
            "shards. Read it with vaekit.LatentDataset; see docs/LATENTS.md (also: feeding it to kohya, SimpleTuner "
            "and diffusers' training scripts).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("data", metavar="DATA")
    p.add_argument("out", metavar="OUT", help="the latent dataset folder (new, or one this command started)")
    p.add_argument("--resolution", type=int, required=True, metavar="R",
                   help="image side in pixels (a multiple of the model's factor); with --buckets, about R*R pixels")
    p.add_argument("--resize-mode", choices=["center-crop", "resize", "pad"], default="center-crop",
                   help="center-crop: shorter side to R, centre cut (default); resize: stretch to RxR; pad: longer side "
                        "to R, centred on black")
    p.add_argument("--buckets", action="store_true",
                   help="aspect-ratio buckets as SDXL's and kohya's: at most R*R pixels, sides multiples of 64 (of the "
                        "factor below R=256), aspect 1:4 to 4:1, each with its mirror; each image goes to the bucket "
                        "nearest its aspect ratio, then covers it and is centre-cut")
    p.add_argument("--flip", action="store_true",
                   help="also store each image's mirror image's latents (kohya's --flip_aug): two items per image, "
                        "each with flipped true/false")
    p.add_argument("--add", action="store_true",
                   help="append the images DATA names that OUT does not hold yet, as new shards (the existing shards "
                        "stay as they are); names are relative to DATA, so give the same DATA")
    p.add_argument("--store", choices=["both", "mean", "sample"], default="both",
                   help="both: posterior mean and logvar (default; LatentDataset(sample=True) draws per access); mean; "
                        "sample: one seeded draw per image")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="storage dtype (default fp16)")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32", help="the model's compute dtype (default fp32)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="sources per shard (default 1000)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="sources per encoder call, with --flip their mirrors too (default: 8 on a GPU, 1 on a CPU, where larger batches are slower per image)")
    p.add_argument("--workers", type=int, default=2, metavar="W",
                   help="DataLoader processes that read and resize images while the model runs (default 2; 0: in the main process)")
    p.add_argument("--min-side", type=int, metavar="PX", help="skip images whose shorter side is below PX (default R/2)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"images above N pixels are refused as decompression bombs, from their header (default {MAX_PIXELS:,}, PIL's limit)")
    p.add_argument("--reduced-jpeg", action=argparse.BooleanOptionalAction, default=True,
                   help="decode large JPEGs at 1/2, 1/4 or 1/8 scale where that keeps 4x the target size: up to 2x "
                        "faster, within 7 levels of a full decode on photos (docs/LATENTS.md); --no-reduced-jpeg "
                        "decodes every image whole")
    p.add_argument("--commit-seconds", type=float, default=60.0, metavar="S",
                   help="keep an unfinished shard's encoded images on disk every S seconds (and on Ctrl-C), so an "
                        "interruption loses at most S seconds of work (default 60)")
    p.add_argument("--tile", type=int, metavar="N", help="encode the full-resolution layers in N-pixel tiles (large images, bounded GPU memory)")
    p.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP)
    p.add_argument("--sample-seed", type=int, default=0, metavar="S", help="seed of --store sample's draws (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_model_args(p)

    p = add("decode", "decode a latent dataset (or a file of latents) back to PNGs", cmd_decode,
            "Decode LATENTS, a folder `vaekit encode` wrote or one .safetensors / weights-only .pt file of latents "
            "(normalised, as a diffusion model makes them, unless --raw), with MODEL into OUTDIR. A dataset's items are "
            "named after their sources (suffix .png; x.jpg and x.png become x.jpg.png and x.png; a tar shard's "
            "shard-000.tar/ becomes shard-000/; a mirrored item x.flipped.png) and decoded from the stored posterior "
            "mean; a file's tensors after their keys (a batch: KEY_00000.png, ...). Names that would leave OUTDIR "
            "(absolute, '..') are skipped. MODEL must have the weights that encoded the dataset (any normalisation: "
            "a recalibrated copy is fine), unless --force.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("latents", metavar="LATENTS")
    p.add_argument("outdir", metavar="OUTDIR")
    p.add_argument("--raw", action="store_true", help="a file's latents are raw (as `encode` returns), not normalised")
    p.add_argument("--force", action="store_true", help="decode a dataset with a model other than the one that encoded it")
    p.add_argument("--overwrite", action="store_true", help="replace images that already exist in OUTDIR")
    p.add_argument("--tile", type=_tile_arg, metavar="N", help="decode in N-pixel tiles (see docs/TILING.md)")
    p.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (default fp32)")
    _add_model_args(p)

    p = add("calibrate", "measure the latent scale/shift (or per-channel mean/std) that gives unit variance on your data",
            cmd_calibrate,
            "Measure MODEL's raw latents' mean and std on DATA, globally (SD/FLUX.1-style scaling_factor and "
            "shift_factor) or per channel (--per-channel: latents_mean/latents_std; FLUX.2-style models always: their "
            "BatchNorm statistics). DATA is images (read, resized and skipped as `vaekit encode` does: centre crops of "
            "--resolution) or a latent dataset MODEL encoded, whose stored latents are measured without re-encoding. "
            "Prints them beside the configured normalisation; --write saves the same weights with the calibrated "
            "normalisation (never over MODEL's files; over an existing file only with --overwrite), which "
            "LatentDataset(OUT, model=NEWMODEL) and `vaekit decode` then use for that dataset.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("data", metavar="DATA", help="images (any DATA), or a latent dataset folder `vaekit encode` wrote with MODEL")
    p.add_argument("--resolution", type=int, default=256, metavar="R", help="images: centre-crop side (default 256)")
    p.add_argument("--per-channel", action="store_true", help="per-channel mean/std instead of one scale and shift")
    p.add_argument("--mode", action="store_true", help="measure the posterior mode instead of posterior samples (SD's scale was measured on samples)")
    p.add_argument("--limit", type=int, metavar="N", help="use the first N usable images (or latents)")
    p.add_argument("--min-side", type=int, metavar="PX", help="images: skip those whose shorter side is below PX (default R/2, as encode)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"images: refuse those above N pixels as decompression bombs (default {MAX_PIXELS:,}, as encode)")
    p.add_argument("--write", metavar="NEWMODEL", help="save the model with the calibrated normalisation (a diffusers folder, or a .safetensors file)")
    p.add_argument("--overwrite", action="store_true", help="replace NEWMODEL's files if they exist (never MODEL's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_model_args(p)

    p = add("bench", "time encode and decode against diffusers and the machine's peaks; peak memory; FLOPs", cmd_bench,
            "Time MODEL's encode and decode (median of --repeats runs after a warm-up, interleaved with diffusers' class "
            "on the same weights), peak memory above the loaded model (RSS on a CPU, max_memory_allocated on CUDA), the "
            "largest difference to diffusers, FLOPs per image and the GFLOP/s achieved against a matmul and a 3x3 conv "
            "measured by the same command on the same threads. See docs/BENCHMARKS.md.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--size", type=int, nargs="+", default=[256, 512], metavar="PX", help="image sides (default 256 512)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="batch sizes (default 1)")
    p.add_argument("--precision", nargs="+", choices=list(DTYPES), default=["fp32"], help="compute dtypes (default fp32)")
    p.add_argument("--tile", type=int, metavar="N", help="run vaekit tiled with N-pixel tiles (diffusers untiled)")
    p.add_argument("--against", choices=["diffusers", "none"], default="diffusers", help="the peer (default diffusers)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs of each (default 5; fewer than 3 are noise)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="run vaekit and diffusers under torch.compile (default backend inductor: needs a C++ compiler on "
                        "a CPU, Triton on a GPU) and report each one's compile time; FLOPs are counted uncompiled")
    p.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP + " (vaekit only; diffusers stays direct)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_model_args(p)

    p = add("quickstart", "train a small VAE on the built-in photos in a few minutes and report its held-out PSNR/SSIM",
            cmd_quickstart,
            "Train vaekit's quickstart recipe (vaekit.train.QUICKSTART: a small 8x, 4-channel VAE) on the photos that "
            "ship with scikit-image and scikit-learn, within a wall-clock budget: the step count is calibrated from the "
            "measured speed of the first steps. Then evaluate it on the three held-out photos (chelsea, coffee, flower) "
            "at 256x256 and print where the model, the reconstruction grid and the metrics are.")
    p.add_argument("--out", default="quickstart", metavar="DIR", help="run folder (default: ./quickstart)")
    p.add_argument("--seconds", type=float, metavar="S", help="wall-clock budget of the training run, evaluation and saving included (default: 290; the command adds ~5 s of start-up)")
    return parser


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Options default to TrainConfig's values; unset ones stay out of the namespace (see _train_config)."""
    from ..train import TrainConfig

    d = TrainConfig()

    def opt(g: argparse._ArgumentGroup, flag: str, help: str, default: object = None, **kw) -> None:
        if kw.get("type") in (int, float) and "metavar" not in kw:
            kw["metavar"] = "N" if kw["type"] is int else "X"
        shown = f" (default: {default})" if default is not None else ""
        g.add_argument(flag, default=argparse.SUPPRESS, help=help + shown, **kw)

    g = p.add_argument_group("data")
    opt(g, "--data", "training images: folder, image file, tar shards, or 'samples' (required unless --resume)", metavar="DATA")
    g.add_argument("--out", required=True, metavar="RUN", help="run folder")
    opt(g, "--val", "validation images (any DATA); default: held out of --data (samples: chelsea, coffee, flower)", metavar="DATA")
    opt(g, "--val-fraction", "share of --data held out for validation, chosen by a hash of each file name", d.val_fraction, type=float)
    opt(g, "--val-images", "at most this many validation images", d.val_images, type=int)
    opt(g, "--val-resolution", "validation images: shorter side resized to this, centre square", d.val_resolution, type=int)
    opt(g, "--resolution", "training crop side in pixels", d.resolution, type=int)
    opt(g, "--min-scale", "scale each image by a random factor in [X, 1] before cropping (multi-scale)", d.min_scale, type=float)
    opt(g, "--flip", "random horizontal flips", d.flip, action=argparse.BooleanOptionalAction)
    opt(g, "--permute-colors", "put each crop's R, G, B channels in a random order (more palettes from few photos)",
        d.permute_colors, action=argparse.BooleanOptionalAction)
    opt(g, "--workers", "data-loading processes (default: 0 for the built-in photos, else up to 4)", type=int)

    g = p.add_argument_group("model")
    opt(g, "--preset", "architecture to train from scratch (see `vaekit presets`)", d.preset, metavar="NAME")
    opt(g, "--config", "architecture as a JSON AutoencoderConfig file (instead of --preset)", metavar="FILE")
    opt(g, "--init", "fine-tune from this checkpoint (any MODEL vaekit.load reads)", metavar="MODEL")
    opt(g, "--kind", "override the preset: Gaussian-posterior VAE or deterministic AE", choices=["vae", "ae"])
    opt(g, "--latent-channels", "override the preset's latent channels", type=int)
    opt(g, "--decoder-only", "freeze the encoder and quant_conv: improve decoding, keep the latent space", action="store_true")

    g = p.add_argument_group("optimisation")
    opt(g, "--steps", "optimizer steps (the cosine schedule ends here)", d.steps, type=int)
    opt(g, "--seconds", "wall-clock budget: the step count (at most --steps) is calibrated from the speed of the first steps", type=float)
    opt(g, "--batch-size", "images per process per micro-step", d.batch_size, type=int)
    opt(g, "--grad-accum", "micro-steps per optimizer step", d.grad_accum, type=int)
    opt(g, "--lr", "peak learning rate of the autoencoder (AdamW)", d.lr, type=float)
    opt(g, "--min-lr-ratio", "cosine decay ends at lr * X", d.min_lr_ratio, type=float)
    opt(g, "--warmup", "linear warm-up steps (at most a quarter of the run)", d.warmup, type=int)
    opt(g, "--betas", "AdamW betas", " ".join(map(str, d.betas)), type=float, nargs=2, metavar=("B1", "B2"))
    opt(g, "--weight-decay", "AdamW weight decay", d.weight_decay, type=float)
    opt(g, "--clip", "gradient-norm clipping of the autoencoder (0: off; LDM has none). The loss is LDM's / (3*R*R), "
        "so diffusers' --max_grad_norm 1 is --clip 1/(3*R*R) here", d.clip, type=float)
    opt(g, "--disc-lr", "peak learning rate of the discriminator (default: --lr, as in LDM)", type=float)
    opt(g, "--disc-betas", "Adam betas of the discriminator (LDM's; no weight decay, no clipping)",
        " ".join(map(str, d.disc_betas)), type=float, nargs=2, metavar=("B1", "B2"))
    opt(g, "--ema-decay", "EMA of the weights, used for validation and the saved model", d.ema_decay, type=float)
    opt(g, "--precision", "autocast precision (default: bf16 on CUDA, fp32 on CPU, where bf16 is slower)", choices=["fp32", "bf16"])
    opt(g, "--seed", "seed of the initial weights, the data order and crops, and the posterior samples", d.seed, type=int)
    opt(g, "--deterministic", "deterministic CUDA algorithms: repeated and resumed runs bit-exact on the same GPU and "
        "software, at some speed (docs/TRAINING.md); CPU runs are deterministic without it", action="store_true")

    g = p.add_argument_group("loss")
    opt(g, "--pixel", "reconstruction loss", d.loss.pixel, choices=["l1", "l2", "charbonnier"])
    opt(g, "--ssim-weight", "weight of the 1 - SSIM loss", d.loss.ssim_weight, type=float)
    opt(g, "--kl-weight", "LDM's kl_weight, as in published configs (SD's VAE: 1e-6): it multiplies the KL summed over "
        "latent elements against the pixel loss summed over an image's 3*R*R values, at any crop size; ignored for "
        "--kind ae", d.loss.kl_weight, type=float)
    opt(g, "--lpips-weight", "weight of the LPIPS loss: LDM's perceptual_weight (LDM: 1.0; needs the backbone weights)", d.loss.lpips_weight, type=float)
    opt(g, "--lpips-net", "LPIPS backbone", d.loss.lpips_net, choices=["vgg", "alex"])
    opt(g, "--gan-weight", "PatchGAN weight (LDM: 0.5), scaled by the adaptive weight", d.loss.gan_weight, type=float)
    opt(g, "--gan-start", "first step with the GAN term and discriminator updates (LDM: 50001)", d.loss.gan_start, type=int)
    opt(g, "--gan-loss", "discriminator loss", d.loss.gan_loss, choices=["hinge", "vanilla"])
    opt(g, "--scale-equivariance", "weight W of scale equivariance (Skorokhodov et al. 2025): decoding the latent downsampled "
        "2x or 4x must give the image downsampled alike (reconstruction loss x W). With --init it is the paper's short "
        "fine-tune that takes high frequencies out of the latents (docs/DIFFUSABILITY.md; the paper fine-tunes 10-20k steps)",
        d.loss.scale_equivariance, type=float, metavar="W")
    opt(g, "--disc-norm", "discriminator normalisation: LDM's batch norm, or group/none, which do not depend on the "
        "batch (with --grad-accum, only they make accumulation equal a larger batch)", d.loss.disc_norm,
        choices=["batch", "group", "none"])

    g = p.add_argument_group("run")
    opt(g, "--resume", "continue RUN from its last checkpoint (starts fresh if it has none)", action="store_true")
    opt(g, "--log-every", "steps between log lines (TensorBoard, RUN/log.jsonl)", d.log_every, type=int)
    opt(g, "--sample-every", "steps between validation grids and metrics (0: only at the start and end)", d.sample_every, type=int)
    opt(g, "--save-every", "steps between checkpoints (one is always written at the end)", d.save_every, type=int)
    opt(g, "--keep-checkpoints", "checkpoints kept in RUN/checkpoints", d.keep_checkpoints, type=int)
    opt(g, "--max-bad-steps", "stop (with a checkpoint) when more than N steps in a row had non-finite loss or gradients", d.max_bad_steps, type=int)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # Warnings (an assumed latent normalisation, the fp16 fallback) read as one line, like errors.
    warnings.showwarning = lambda message, *_, **__: print(f"vaekit {args.command}: warning: {message}", file=sys.stderr)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("vaekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vaekit ... | head`: the reader has what it wanted; end quietly
        _detach_stdout()
        return 0
    except (CLIError, ValueError, TypeError, FileNotFoundError, OSError, RuntimeError) as e:
        msg = " ".join(_explain(e).split()) or type(e).__name__
        print(f"vaekit {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return 0


# What to do about an operating-system error, by errno: the path it names goes before it.
OS_ADVICE = {
    errno.EEXIST: "it already exists: remove it or choose another name",
    errno.EACCES: "permission denied: check its permissions or choose another location",
    errno.EPERM: "not permitted: check its permissions or choose another location",
    errno.ENOSPC: "no space left on the disk: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "part of this path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
}


def _explain(e: BaseException) -> str:
    """An OS error (which names a path) as 'PATH: what happened and what to do'; others as they are."""
    if isinstance(e, OSError) and e.errno is not None and e.filename is not None:
        return f"{e.filename}: {OS_ADVICE.get(e.errno, e.strerror)}"
    if isinstance(e, OSError) and e.strerror:  # no path to name: its text (vaekit's own carry advice), not "[Errno N] ..."
        return e.strerror
    return str(e)


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so Python's own flush at exit does not hit the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by something without a descriptor
        pass


if __name__ == "__main__":
    sys.exit(main())
