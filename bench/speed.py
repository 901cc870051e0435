"""Speed and memory against diffusers and the machine's peaks (docs/BENCHMARKS.md): `vaekit bench` over sizes,
for the tables and the plot of time and memory against pixels.

    python bench/speed.py                                  # sd1, fp32 and bf16, 256² to 1024², batch 1 (~25 min)
    python bench/speed.py --preset tiny-f8c4 --sizes 256 512 --precision fp32
    python bench/speed.py --plot docs/img/benchmarks.png --json runs/speed.json
    python bench/speed.py --from runs/speed.json runs/speed_winograd.json --plot docs/img/benchmarks.png  # re-plot saved runs

Random weights of the preset (`preset:NAME`), the same in both implementations; 2 torch threads unless
--threads. The numbers are ratios measured in one run on one machine: re-measure on yours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vaekit import load
from vaekit.speed import bench, format_rows, to_dicts


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = set()  # diffusers once per op and dtype: runs on several convolution paths share it
    for op, style in (("encode", "o-"), ("decode", "s-")):
        for precision in sorted({r["precision"] for r in rows}):
            sel = sorted((r for r in rows if r["op"] == op and r["precision"] == precision and r["batch"] == 1), key=lambda r: r["size"])
            if not sel:
                continue
            px = [r["size"] ** 2 / 1e6 for r in sel]
            axes[0].plot(px, [r["seconds"] for r in sel], style, label=f"vaekit {op} {precision}")
            peer = (op, precision.split()[0]) not in drawn
            drawn.add((op, precision.split()[0]))
            if peer and sel[0]["peer_seconds"]:
                axes[0].plot(px, [r["peer_seconds"] for r in sel], style, alpha=0.4, label=f"diffusers {op} {precision}")
            axes[1].plot(px, [r["rss_mb"] for r in sel], style, label=f"vaekit {op} {precision}")
            if peer and sel[0]["peer_rss_mb"] is not None:
                axes[1].plot(px, [r["peer_rss_mb"] for r in sel], style, alpha=0.4, label=f"diffusers {op} {precision}")
    axes[0].set(xlabel="megapixels", ylabel="seconds per image", xscale="log", yscale="log", title="time")
    axes[1].set(xlabel="megapixels", ylabel="peak memory above the model (MB)", xscale="log", yscale="log", title="memory")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd1")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--from", dest="saved", type=Path, nargs="+", metavar="JSON", help="plot these saved runs instead of measuring")
    args = p.parse_args()
    if args.saved:
        if not args.plot:
            p.error("--from only re-plots: give --plot PNG")
        plot([row for path in args.saved for row in json.loads(path.read_text())["rows"]], args.plot)
        return
    torch.set_num_threads(args.threads)
    model = load(f"preset:{args.preset}", dtype=torch.float32)
    report = lambda r: print(f"{r.op} {r.size}² {r.precision}: {r.seconds:.3f} s, diffusers {r.peer_seconds or 0:.3f} s", file=sys.stderr, flush=True)  # noqa: E731
    rows, peaks = bench(model, args.sizes, [1], args.precision, repeats=args.repeats, report=report)
    print(f"preset {args.preset}, random weights\n")
    print(format_rows(rows, peaks))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": args.preset, "peaks": peaks, "rows": to_dicts(rows)}, indent=2) + "\n")
    if args.plot:
        plot(to_dicts(rows), args.plot)


if __name__ == "__main__":
    main()
