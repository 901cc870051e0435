"""Peak resident memory and time of one large decode, each way in a fresh process (docs/BENCHMARKS.md).

    python bench/memory.py --size 1024                      # untiled vaekit and diffusers, tiled, tiled + spilled
    python bench/memory.py --size 2048 --ways tiled spilled --tile 512
    python bench/memory.py --size 1024 --ways vaekit --precision bf16
    python bench/memory.py --size 1024 --ways vaekit --conv direct         # vaekit's ways on PyTorch's own convolutions
    python bench/memory.py --size 4096 --ways head                          # the untiled head alone (mid block, attention)

RSS only shows memory newly taken from the system, so every figure comes from its own process: the
model and the latent are made first, then `vaekit.speed.peak_memory` wraps the decode alone. "tiled"
keeps the whole-image activations between stages in RAM, "spilled" in memory-mapped files
(docs/TILING.md). Random sd1 weights (seed 0), one decode each: at 1024² that is ~100 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WAYS = ("vaekit", "diffusers", "tiled", "spilled", "head")

ONE = """
import json, sys, time, torch
from vaekit import convolutions, load
from vaekit.model.tiling import decode_body_tiled
from vaekit.speed import PRECISIONS, diffusers_peer, peak_memory
way, size, tile, precision, threads, conv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
torch.set_num_threads(threads)
dtype = PRECISIONS[precision]
model = load("preset:sd1", seed=0).eval().to(dtype)
z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(dtype)
peer = diffusers_peer(model, dtype) if way == "diffusers" else None
with torch.inference_mode():
    decode = {
        "vaekit": lambda: model.decode(z),
        "diffusers": lambda: peer.decode(z).sample,
        "tiled": lambda: _tiled(False),
        "spilled": lambda: _tiled(True),
        "head": lambda: model.decoder.head(model.post_quant_conv(z)),  # the untiled latent-resolution part alone
    }
    def _tiled(spill):  # model.decode(z, tile=tile) with the spilling forced on or off
        h = model.decoder.head(model.post_quant_conv(z))
        return decode_body_tiled(model.decoder, h, tile, model.config, spill=spill)
    t = time.time()
    with peak_memory(torch.device("cpu")) as mem, convolutions(conv):  # diffusers' convolutions are PyTorch's whatever it says
        x = decode[way]()
    seconds = time.time() - t
print(json.dumps({"way": way + (f" {conv}" if way != "diffusers" else ""), "size": size, "tile": tile if way in ("tiled", "spilled") else None, "precision": precision,
                  "peak_mb": round(mem["mb"]), "seconds": round(seconds, 1), "us_per_pixel": round(seconds / size**2 * 1e6, 2)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tile", type=int, default=256, help="tile side in pixels for tiled/spilled (default 256)")
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--conv", choices=["auto", "direct", "winograd"], default="auto",
                   help="vaekit's convolutions (default auto, as vaekit's default; diffusers' are PyTorch's own)")
    args = p.parse_args()
    rows = []
    for way in args.ways:
        cmd = [sys.executable, "-c", ONE, way, str(args.size), str(args.tile), args.precision, str(args.threads), args.conv]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            why = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            raise SystemExit(f"{way}: {why}\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| way | size | tile | peak MB above the model | seconds | µs / pixel |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['size']}² | {r['tile'] or '-'} | {r['peak_mb']} | {r['seconds']} | {r['us_per_pixel']} |")


if __name__ == "__main__":
    main()
