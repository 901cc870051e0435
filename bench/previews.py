"""Decode time of the preview models against their teachers on this machine (docs/PREVIEWS.md): each teacher's
`from_latent`, its tiny autoencoder's (preset tae-NAME) and its linear preview's, on the same normalised latents.

    python bench/previews.py                                   # sd1 at 512², 2 threads (~3 min on 2 EPYC cores)
    python bench/previews.py --teachers sd1 flux2 --sizes 512 1024 --repeats 5

Random weights (time does not depend on them); fp32; the median of --repeats runs after a warm-up, the three models
interleaved so that a neighbour's load hits them alike; FLOPs per image from torch's FlopCounterMode (the warm-up).
The numbers are ratios measured in one run on one machine: re-measure on yours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from vaekit import preset
from vaekit.config import PRESETS, preset_name, preview_config
from vaekit.model import Autoencoder


def flops(model: Autoencoder, z: torch.Tensor) -> int:
    """FLOPs of one decode, counted by torch (this is also the warm-up)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.from_latent(z)
    return counter.get_total_flops()


def seconds(model: Autoencoder, z: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model.from_latent(z)
        return time.perf_counter() - start


def decoder_parameters(model: Autoencoder) -> int:
    """What decodes: the decoder and the conv before it."""
    return sum(p.numel() for part in (model.decoder, model.post_quant_conv) if part is not None for p in part.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=["sd1"])
    p.add_argument("--sizes", type=int, nargs="+", default=[512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} (other work on the machine slows all alike)")
    print("| teacher | size | decoder | decoder parameters | GFLOP | seconds (median) | runs | speed-up |\n|---|---|---|---|---|---|---|---|")
    for name in args.teachers:
        teacher = preset(name)
        torch.manual_seed(0)
        tiny = preset_name(f"tae-{name}") if f"tae-{name}" in PRESETS else f"tiny ({name}'s space)"  # not every space has a preset
        models = {f"{name} (teacher)": Autoencoder(teacher).eval(), tiny: Autoencoder(preview_config(teacher)).eval(),
                  "linear preview": Autoencoder(preview_config(teacher, linear=True)).eval()}  # fmt: skip
        for size in args.sizes:
            channels, factor = teacher.normalised_shape
            z = torch.randn(1, channels, size // factor, size // factor, generator=torch.Generator().manual_seed(0))
            counted = {label: flops(model, z) for label, model in models.items()}
            times: dict[str, list[float]] = {label: [] for label in models}
            for _ in range(args.repeats):  # interleaved, so that a neighbour's load hits all three alike
                for label, model in models.items():
                    times[label].append(seconds(model, z))
            base = statistics.median(times[f"{name} (teacher)"])
            for label, model in models.items():
                median = statistics.median(times[label])
                print(f"| {name} | {size}² | {label} | {decoder_parameters(model):,} | {counted[label] / 1e9:.4g} | {median:.4g} | "
                      f"{len(times[label])} | {base / median:.0f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
