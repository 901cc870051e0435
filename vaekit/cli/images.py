"""`vaekit reconstruct` and `vaekit eval`: a model's reconstructions of image files, and their scores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (DTYPES, CLIError, add_command, add_conv_flag, conv_path, add_device_flag, add_dtype_flag, add_model_flags, add_tile_flag, files_of,
                     plural)  # fmt: skip

# reconstruct()'s arguments as this command names them (vaekit.reconstruct.PYTHON_WORDS).
RECONSTRUCT_WORDS = {"input": "INPUT", "output": "OUTDIR", "pad": "drop --no-pad"}


def register(sub: argparse._SubParsersAction) -> None:
    _add_reconstruct(sub)
    _add_eval(sub)


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "reconstruct", cmd_reconstruct, "encode and decode images; write PNGs of the same size and relative names")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("outdir", metavar="OUTDIR", help="output folder; for one input image, a file name ending in .png "
                   "(or .jpg, .webp, ...) writes that file")
    p.add_argument("--overwrite", action="store_true", help="replace reconstructions that already exist in OUTDIR")
    p.add_argument("--pad", action=argparse.BooleanOptionalAction, default=True,
                   help="reflect-pad sides to a multiple of the model's factor and crop back (default: on); "
                        "--no-pad rejects such images")
    add_tile_flag(p, "run the full-resolution layers in N-pixel tiles to bound GPU memory, with the untiled result")
    add_conv_flag(p)
    add_device_flag(p)
    add_dtype_flag(p, "compute dtype (default fp32, whatever the file stores; fp16/bf16 are faster on a GPU and move some "
                   "pixels by a level or two)")  # fmt: skip
    add_model_flags(p)


def cmd_reconstruct(args: argparse.Namespace) -> None:
    """Reconstruct INPUT (an image or a folder, searched recursively) into OUTDIR as PNGs with the same relative
    names (suffix .png) and pixel size; when two inputs would share a name (x.jpg and x.png), the one not already a
    .png keeps its whole name (x.jpg.png). Unreadable files are reported and skipped. Safe by default: OUTDIR may
    not be INPUT, no input is ever written over, an existing file only with --overwrite, and folders vaekit wrote
    (they hold a .vaekit-output file) are never read as INPUT."""
    from ..model import convolutions
    from ..reconstruct import Refused, reconstruct

    try:
        with convolutions(conv_path(args)):
            done = reconstruct(args.model, args.input, args.outdir, overwrite=args.overwrite, pad=args.pad, tile=args.tile,
                               family=args.family, device=args.device, dtype=DTYPES[args.dtype], seed=args.seed)  # fmt: skip
    except Refused as e:
        raise CLIError(e.say(RECONSTRUCT_WORDS)) from None
    for why in done.skipped:
        print(f"skipped {why.say(RECONSTRUCT_WORDS)}", file=sys.stderr)
    skipped = f" ({len(done.skipped)} skipped)" if done.skipped else ""
    print(f"wrote {plural(len(done.written), 'reconstruction')} to {done.output}{skipped}")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "eval", cmd_eval, "score reconstructions: PSNR, SSIM, MS-SSIM, LPIPS, rFID, with the protocol behind the numbers")
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
    add_conv_flag(p)
    add_device_flag(p)
    add_dtype_flag(p, "compute dtype (default fp32, whatever the file stores; recorded in the JSON protocol)")
    add_model_flags(p)


def cmd_eval(args: argparse.Namespace) -> None:
    """Reconstruct DATA with MODEL exactly as `vaekit reconstruct` does (posterior mode, padded and cropped back,
    uint8) and score the result against the originals. DATA is an image, a folder (recursive), tar shards or
    'samples' (the built-in photos; samples:val for the held-out three, samples:native for native-resolution crops
    and saturated colours). See docs/EVALUATION.md."""
    from ..data import find_images
    from ..evaluate import evaluate, format_table, to_json
    from ..files import check_targets, write_atomic
    from ..metrics import METRICS
    from ..model import convolutions
    from ..weights import MissingWeights

    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise CLIError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(METRICS)}")
    if args.json:  # the scores may replace an earlier JSON, never an input image or the model
        images = find_images(args.data) if Path(args.data).exists() else []
        check_targets([Path(args.json)], images + files_of(args.model), overwrite=True)
    try:
        with convolutions(conv_path(args)):
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
