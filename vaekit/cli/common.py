"""What the commands share: the one-line error, counts and tables, the MODEL argument's files, and one
helper per flag family (the model's --family/--seed, --device, --dtype/--precision, --tile), so that each
flag has one meaning and one default everywhere."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CLIError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (for messages that say how to run it again)."""
    return "vaekit " + shlex.join(args.argv)


def add_command(sub: argparse._SubParsersAction, name: str, fn: Callable[[argparse.Namespace], None], help: str,
                description: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """The subcommand `name`, run by `fn(args)`: `help` is its line in `vaekit --help`; its own --help shows
    `description`, by default `fn`'s docstring (argparse reflows it), else `help`."""
    p = sub.add_parser(name, help=help, description=description or fn.__doc__ or help)
    p.set_defaults(fn=fn)
    return p


# ---- the flag families -------------------------------------------------------------------------


def add_model_flags(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """--family, and --seed of preset:NAME's random weights (commands with a --seed of their own pass seed=False)."""
    p.add_argument("--family", help="normalisation family when the file does not say (e.g. sd3 or flux1 for 16-channel VAEs; "
                   "case-insensitive, aliases such as flux, sd15, sd2 accepted)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset:NAME model (default 0)")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_arg(value: str) -> str:
    """--device: a torch device this machine has (refused here, in the parser's words, rather than by torch later)."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    available = getattr(getattr(torch, device.type, None), "is_available", None)
    if device.type != "cpu" and available is not None and not available():
        raise argparse.ArgumentTypeError(f"{value}: this machine has no {device.type} device available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value}: this machine has {plural(torch.cuda.device_count(), 'CUDA device')}")
    return value


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_arg, default=default_device(),
                   help="torch device: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")


def add_dtype_flag(p: argparse.ArgumentParser, help: str, flag: str = "--dtype", default: str | list[str] | None = "fp32",
                   **kw) -> None:  # fmt: skip
    """A dtype by name (fp32, fp16, bf16): the compute dtype (--dtype, --precision) or a stored one."""
    p.add_argument(flag, choices=list(DTYPES), default=default, help=help, **kw)


def tile_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a tile side in pixels or 'auto', got {value!r}") from None


def add_tile_flag(p: argparse.ArgumentParser, what: str) -> None:
    """--tile N or auto, for every command that runs the model on whole images; `what` says what is tiled."""
    p.add_argument("--tile", type=tile_arg, metavar="N", help=f"{what}; 'auto' picks N from free GPU memory (see docs/TILING.md)")


def add_conv_flag(p: argparse.ArgumentParser) -> None:
    """--conv auto|direct|winograd (and --winograd, its older spelling), for every command that runs a model in CPU
    inference; `conv_path(args)` reads them."""
    p.add_argument("--conv", choices=["auto", "direct", "winograd"], default=None,
                   help="CPU fp32 convolutions: 'auto' (default; $VAEKIT_CONV overrides) runs each layer shape by the faster of "
                        "PyTorch's direct convolution and NNPACK's Winograd, timed once on this machine and remembered "
                        "(~/.cache/vaekit/convolutions.json), within 1e-4 of diffusers; 'direct' is PyTorch's own, bit-stable "
                        "run to run; 'winograd' forces Winograd wherever it applies (docs/BENCHMARKS.md)")
    p.add_argument("--winograd", action="store_true", help="the same as --conv winograd")


def conv_path(args: argparse.Namespace) -> str | None:
    """The path --conv / --winograd ask for; None: the default ("auto", or $VAEKIT_CONV). Commands call it before any
    work, so a contradiction or a bad $VAEKIT_CONV is refused at once."""
    from ..model import convchoice

    if args.winograd and args.conv not in (None, "winograd"):
        raise CLIError(f"--winograd and --conv {args.conv} contradict each other: give one of them")
    convchoice.path_in_force()  # raises on a bad $VAEKIT_CONV
    return "winograd" if args.winograd else args.conv


# ---- MODEL and model files -------------------------------------------------------------------


def files_of(source: str) -> list[Path]:
    """The files a MODEL (or SOURCE) argument names: the file, or every file of the folder; none for preset:NAME or a repo id."""
    path = Path(source).expanduser()
    return [p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()] if path.exists() else []


def check_model_dest(source: str, dest: Path, fmt: str, overwrite: bool) -> None:
    """A model file or folder vaekit writes: never over its source, never over an existing file without --overwrite."""
    from ..checkpoints import DIFFUSERS_WEIGHTS
    from ..files import check_targets
    from ..layouts import pair_file

    if fmt == "diffusers" and dest.is_file():
        raise CLIError(f"{dest} is a file; a diffusers model is a folder: give a folder name (or a name ending in .safetensors)")
    targets = {"single-file": [dest], "pair": [pair_file(dest, "encoder"), pair_file(dest, "decoder")]}
    check_targets(targets.get(fmt, [dest / DIFFUSERS_WEIGHTS[0], dest / "config.json"]), files_of(source), overwrite)
