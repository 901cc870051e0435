"""`vaekit bench`: encode and decode timed against diffusers and the machine's peaks."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from .common import CLIError, add_command, add_conv_flag, conv_path, add_device_flag, add_dtype_flag, add_model_flags, add_tile_flag, files_of


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bench", cmd_bench, "time encode and decode against diffusers and the machine's peaks; peak memory; FLOPs")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--size", type=int, nargs="+", default=[256, 512], metavar="PX", help="image sides (default 256 512)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="batch sizes (default 1)")
    add_dtype_flag(p, "compute dtypes (default fp32)", flag="--precision", default=["fp32"], nargs="+")
    add_tile_flag(p, "run vaekit tiled with N-pixel tiles (diffusers untiled)")
    p.add_argument("--against", choices=["diffusers", "none"], default="diffusers", help="the peer (default diffusers)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs of each (default 5; fewer than 3 are noise)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="run vaekit and diffusers under torch.compile (default backend inductor: needs a C++ compiler on "
                        "a CPU, Triton on a GPU) and report each one's compile time; FLOPs are counted uncompiled")
    add_conv_flag(p)
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    add_device_flag(p)
    add_model_flags(p)


def cmd_bench(args: argparse.Namespace) -> None:
    """Time MODEL's encode and decode (median of --repeats runs after a warm-up, interleaved with diffusers' class
    on the same weights), peak memory above the loaded model (RSS on a CPU, max_memory_allocated on CUDA), the
    largest difference to diffusers, FLOPs per image and the GFLOP/s achieved against a matmul and a 3x3 conv
    measured by the same command on the same threads; with the default --conv auto, also the convolution chosen for
    each layer shape on this machine and both timings. See docs/BENCHMARKS.md."""
    import json

    from ..checkpoints import load
    from ..files import check_targets, write_atomic
    from ..model import convchoice
    from ..speed import bench, format_choices, format_rows, has_diffusers_peer, to_dicts

    if args.json:  # may replace an earlier result, never the model
        check_targets([Path(args.json)], files_of(args.model), overwrite=True)
    if args.repeats < 1:
        raise CLIError(f"--repeats {args.repeats}: give at least 1 timed run")
    conv = conv_path(args)
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
    try:
        with contextlib.redirect_stdout(sys.stderr):
            rows, peaks = bench(model, args.size, args.batch, args.precision, tile=args.tile, against=against,
                                repeats=args.repeats, compile=args.compile, conv=conv, report=report)  # fmt: skip
    except RuntimeError as e:
        from torch._dynamo.exc import BackendCompilerFailed

        if args.compile and isinstance(e, BackendCompilerFailed):  # inductor without a C++ compiler or Triton: as torch says
            raise CLIError(str(e)) from None
        raise
    print(format_rows(rows, peaks))
    if choices := convchoice.used():
        print("\n" + format_choices(choices))
    if args.json:
        text = json.dumps({"model": args.model, "peaks": peaks, "rows": to_dicts(rows), "machine": convchoice.machine(),
                           "convolutions": convchoice.used()}, indent=2) + "\n"
        write_atomic(Path(args.json), lambda tmp: tmp.write_text(text))
        print(f"wrote {args.json}")
