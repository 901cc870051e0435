"""`vaekit <command>`: thin wrappers over the Python API, one module per group of commands, each
registering its subcommands' flags beside their handlers (common.py: the flags they share).

Expected errors (a refused argument, a missing or damaged file, an OS error) are one line on stderr,
exit 1; anything else is a bug in vaekit: its traceback, then a line asking to report it."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
import warnings

import torch

from ..advice import FLAGS
from ..extras import MissingPackage
from . import analysis, checkpoints, images, latents, speed, training
from .common import CLIError, command_line

# In the order `vaekit --help` lists them.
COMMAND_GROUPS = (checkpoints, images, analysis, training, latents, speed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaekit",
        description="Build, load, convert, train and measure latent-diffusion autoencoders. "
        "MODEL/SOURCE is a diffusers folder, a .safetensors/.ckpt/.pt/.bin file, a Hugging Face repo id, or preset:NAME.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # Warnings (an assumed latent normalisation, the fp16 fallback) read as one line, like errors.
    warnings.showwarning = lambda message, *_, **__: print(f"vaekit {args.command}: warning: {message}", file=sys.stderr)
    advice_in_flags = FLAGS.set(True)  # the library's errors name flags, not Python arguments
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("vaekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vaekit ... | head`: the reader has what it wanted; end quietly
        _detach_stdout()
        return 0
    except Exception as e:
        if not _expected(e):  # a bug: what it was and where, for the report
            _report_bug(e, args)
            return 1
        msg = " ".join(_explain(e).split()) or type(e).__name__
        print(f"vaekit {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        FLAGS.reset(advice_in_flags)
    return 0


# What the user can act on: the message says what happened and what to do. Everything else is a bug.
# ValueError includes UnreadableFile, ImageTooLarge and reconstruct's Refused; OSError includes
# FileNotFoundError and MissingWeights; MissingPackage is an optional extra not installed.
EXPECTED = (CLIError, ValueError, OSError, MissingPackage, torch.cuda.OutOfMemoryError)


def _expected(e: Exception) -> bool:
    # Out of memory on a CPU is a plain RuntimeError from torch's allocator: too large an input, not a bug.
    return isinstance(e, EXPECTED) or (isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def _report_bug(e: Exception, args: argparse.Namespace) -> None:
    from .. import __version__

    traceback.print_exception(e)
    print(f"vaekit {args.command}: internal error: {type(e).__name__} is a bug in vaekit {__version__}; please report it "
          f"with the traceback above and the command line: {command_line(args)}", file=sys.stderr)  # fmt: skip


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

