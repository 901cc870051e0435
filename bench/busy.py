"""SD1 encode and decode with one core kept busy by another process (docs/BENCHMARKS.md, "A busy machine").

    python bench/busy.py --size 256 --repeats 5          # ~4 min on 2 cores
    python bench/busy.py --size 512 --repeats 3 --quiet  # the same without the load, for comparison

A second process runs a single-threaded fp32 matmul loop for the whole run (unless --quiet), as a neighbour's job
would. vaekit's convolution paths ("auto", the default, and "direct") and diffusers' AutoencoderKL on the same random
weights run interleaved call by call, 2 torch threads, so the load hits all alike; medians of --repeats after a warm-up
(which, under "auto", also times any layer shape this machine has not met yet).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from vaekit import convolutions, load
from vaekit.speed import diffusers_peer, quiet_diffusers

LOOP = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quiet", action="store_true", help="no busy core: the same comparison on an idle machine")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = load("preset:sd1", dtype=torch.float32).eval()
    with quiet_diffusers():
        peer = diffusers_peer(model, torch.float32)
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        z = model.encode(x, conv="direct").mean
    arms = {
        ("decode", "auto"): lambda: model.decode(z, conv="auto"),
        ("decode", "direct"): lambda: model.decode(z, conv="direct"),
        ("decode", "diffusers"): lambda: peer.decode(z).sample,
        ("encode", "auto"): lambda: model.encode(x, conv="auto").mean,
        ("encode", "direct"): lambda: model.encode(x, conv="direct").mean,
        ("encode", "diffusers"): lambda: peer.encode(x).latent_dist.mean,
    }
    busy = None if args.quiet else subprocess.Popen([sys.executable, "-c", LOOP])
    try:
        time.sleep(0 if args.quiet else 2)
        times: dict[tuple[str, str], list[float]] = {arm: [] for arm in arms}
        with torch.inference_mode(), convolutions(None):
            for fn in arms.values():
                fn()
            for _ in range(args.repeats):
                for arm, fn in arms.items():
                    start = time.perf_counter()
                    fn()
                    times[arm].append(time.perf_counter() - start)
    finally:
        if busy is not None:
            busy.kill()
    load_ = "idle machine" if args.quiet else "one core busy with a single-threaded matmul loop"
    print(f"SD1 at {args.size}², {load_}, 2 threads, median of {args.repeats}\n")
    print("| op | path | median s | min - max s | vs diffusers |\n|---|---|---|---|---|")
    for (op, path), t in times.items():
        base = statistics.median(times[(op, "diffusers")])
        print(f"| {op} | {path} | {statistics.median(t):.3f} | {min(t):.3f} - {max(t):.3f} | {base / statistics.median(t):.2f}x |")


if __name__ == "__main__":
    main()
