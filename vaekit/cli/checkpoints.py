"""`vaekit presets`, `vaekit inspect`, `vaekit convert`: the architectures and the checkpoint files."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import DTYPES, CLIError, add_command, add_dtype_flag, add_model_flags, check_model_dest, print_table


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "presets", cmd_presets, "list the built-in architectures with their factor, channels and scale/shift")

    p = add_command(sub, "inspect", cmd_inspect, "show a checkpoint's format, config, size, normalisation and dtype")
    p.add_argument("source", metavar="SOURCE")
    add_model_flags(p, seed=False)

    p = add_command(sub, "convert", cmd_convert, "convert a checkpoint to a diffusers folder or a single .safetensors file")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("dest", metavar="DEST", help="a .safetensors file (single-file), a folder (diffusers), or the common name of "
                   "a tiny autoencoder's two files (pair: DEST_encoder.safetensors, DEST_decoder.safetensors)")
    p.add_argument("--format", choices=["diffusers", "single-file", "pair"],
                   help="default: single-file when DEST ends in .safetensors, else a diffusers folder")
    add_dtype_flag(p, "store weights in this dtype (default: as loaded)", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace DEST's model files if they exist")
    add_model_flags(p)


def cmd_presets(args: argparse.Namespace) -> None:
    from ..config import PRESETS
    from ..model import Autoencoder

    rows = [("name", "params", "factor", "latent ch", "normalisation", "description")]
    with torch.device("meta"):  # count parameters without allocating them
        for name, p in PRESETS.items():
            c = p.config
            n = Autoencoder(c).num_parameters()
            rows.append((name, f"{n / 1e6:.1f}M", f"{c.factor}x", str(c.latent_channels), c.normalisation, p.description))
    print_table(rows)


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
    """Convert SOURCE (any loadable checkpoint, or preset:NAME for random weights) to DEST. Never writes over an
    existing file unless --overwrite is given."""
    from ..checkpoints import load

    dest = Path(args.dest)
    single = dest.suffix == ".safetensors"
    fmt = args.format or ("single-file" if single else "diffusers")
    if fmt == "diffusers" and single:
        raise CLIError(f"DEST {dest} names a .safetensors file but --format diffusers writes a folder: drop --format, or give a folder name")
    check_model_dest(args.source, dest, fmt, args.overwrite)
    model = load(args.source, family=args.family, seed=args.seed)
    dtype = DTYPES[args.dtype] if args.dtype else None
    model.save(dest, format=fmt, dtype=dtype)
    print(f"wrote {dest} ({fmt}{', ' + args.dtype if args.dtype else ''})")
