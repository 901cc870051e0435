"""`vaekit <command>`: thin wrappers over the Python API. Errors are one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CLIError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


# ---- presets -----------------------------------------------------------------------------


def cmd_presets(args: argparse.Namespace) -> None:
    from .config import PRESETS
    from .model import Autoencoder

    rows = [("name", "params", "factor", "latent ch", "scale", "shift", "description")]
    with torch.device("meta"):  # count parameters without allocating them
        for name, p in PRESETS.items():
            c = p.config
            n = Autoencoder(c).num_parameters()
            rows.append((name, f"{n / 1e6:.1f}M", f"{c.factor}x", str(c.latent_channels), f"{c.scaling_factor:g}", f"{c.shift_factor:g}", p.description))
    _print_table(rows)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


# ---- inspect / convert -------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> None:
    from .checkpoints import read_checkpoint

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
    print(f"normalisation  (z - {c.shift_factor:g}) * {c.scaling_factor:g}   [{ck.normalisation_source}]")
    print(f"dtype          {ck.dtype}")
    print("config:")
    for k, v in c.to_dict().items():
        print(f"  {k:22s} {v}")
    for note in ck.notes:
        print(f"note: {note}")


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoints import load

    model = load(args.source, family=args.family)
    dtype = DTYPES[args.dtype] if args.dtype else None
    model.save(args.dest, format=args.format, dtype=dtype)
    print(f"wrote {args.dest} ({args.format}{', ' + args.dtype if args.dtype else ''})")


# ---- reconstruct -------------------------------------------------------------------------


def cmd_reconstruct(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .checkpoints import load
    from .data import find_images, read_image, to_tensor, to_uint8, write_image

    src = Path(args.input)
    files = find_images(src)
    if not files:
        raise CLIError(f"no images (png/jpg/webp/bmp/tif) found under {src}")
    model = load(args.model, family=args.family, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None).eval()
    out = Path(args.outdir)
    failed: list[str] = []
    done = 0
    for path in tqdm(files, desc="reconstruct", unit="img", disable=None):
        rel = path.relative_to(src) if src.is_dir() else Path(path.name)
        try:
            image = read_image(path)
        except Exception as e:  # unreadable files are reported and skipped, not fatal
            failed.append(f"{path}: {e}")
            continue
        x = to_tensor(image).to(model.device)
        with torch.inference_mode():
            recon, _ = model(x, pad=args.pad) if not args.tile else _tiled_recon(model, x, args.pad, args.tile)
        write_image(out / rel.with_suffix(".png"), to_uint8(recon)[0])
        done += 1
    for f in failed:
        print(f"skipped unreadable {f}", file=sys.stderr)
    if not done:
        raise CLIError(f"none of the {len(files)} files under {src} could be read")
    print(f"wrote {done} reconstructions to {out}" + (f" ({len(failed)} skipped)" if failed else ""))


def _tiled_recon(model, x: torch.Tensor, pad: bool, tile: int):
    posterior = model.encode(x, pad=pad, tile=tile)
    return model.decode(posterior.mode(), size=posterior.image_size, tile=tile), posterior


# ---- eval --------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, format_table, to_json
    from .metrics import METRICS

    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise CLIError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(METRICS)}")
    result = evaluate(args.model, args.data, metrics=metrics, resolution=args.resolution, batch_size=args.batch_size,
                      lpips_net=args.lpips_net, device=args.device, family=args.family)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(to_json(result) + "\n")
        print(f"wrote {args.json}")


# ---- wiring ------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", help="normalisation family when the file does not say (e.g. sd3 or flux1 for 16-channel VAEs)")


def build_parser() -> argparse.ArgumentParser:
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
    _add_model_args(p)

    p = add("convert", "convert a checkpoint to a diffusers folder or a single .safetensors file", cmd_convert,
            "Convert SOURCE (any loadable checkpoint, or preset:NAME for random weights) to DEST.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("dest", metavar="DEST", help="a folder for --format diffusers, a .safetensors file for single-file")
    p.add_argument("--format", choices=["diffusers", "single-file"], default="diffusers")
    p.add_argument("--dtype", choices=list(DTYPES), help="store weights in this dtype (default: as loaded)")
    _add_model_args(p)

    p = add("reconstruct", "encode and decode images; write PNGs of the same size and relative names", cmd_reconstruct,
            "Reconstruct INPUT (an image or a folder, searched recursively) into OUTDIR as PNGs with the same "
            "relative names and pixel size. Unreadable files are reported and skipped.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("outdir", metavar="OUTDIR")
    p.add_argument("--pad", action=argparse.BooleanOptionalAction, default=True,
                   help="reflect-pad sides to a multiple of the model's factor and crop back (default: on); "
                        "--no-pad rejects such images")
    p.add_argument("--tile", type=int, metavar="N", help="run the full-resolution layers in N-pixel tiles to bound memory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default fp32)")
    _add_model_args(p)

    p = add("eval", "score reconstructions: PSNR, SSIM, MS-SSIM, LPIPS, rFID, with the protocol behind the numbers", cmd_eval,
            "Reconstruct DATA with MODEL exactly as `vaekit reconstruct` does (posterior mode, padded and cropped back, "
            "uint8) and score the result against the originals. DATA is an image, a folder (recursive), tar shards or "
            "'samples' (the built-in photos; samples:val for the held-out three). See docs/EVALUATION.md.")
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
    _add_model_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings (an assumed latent normalisation, the fp16 fallback) read as one line, like errors.
    warnings.showwarning = lambda message, *_, **__: print(f"vaekit {args.command}: warning: {message}", file=sys.stderr)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("vaekit: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, OSError, RuntimeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"vaekit {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
