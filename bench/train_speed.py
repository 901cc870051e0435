"""Training-step throughput (issue 14): images/s of vaekit's trainer against a plain diffusers `AutoencoderKL` +
AdamW loop with the same model, loss (L1 + KL, LDM's weight 0.012288 at 64² = 1e-6 on diffusers' summed KL)
and batch (16 crops of 64² from the built-in photos).

    python bench/train_speed.py                 # tiny-f8c4 (diffusers has it) and the quickstart's tiny-thumb-f8c4

vaekit's figure is the median images/s its trainer logs (log.jsonl, every 5 steps after the first 10: EMA,
gradient clipping and data loading included); the loop's is measured the same way over the same steps.
2 torch threads.

The last column bounds what any training loop can gain over the diffusers one on this machine: the share of its
step spent in convolutions, forward and backward (torch.profiler over 3 more steps). A loop that took no time
at all for everything else (norms, activations, optimizer, data) would be at most 1 / share faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vaekit import preset
from vaekit.data import training_data
from vaekit.losses import LossConfig
from vaekit.train import QUICKSTART, train


def vaekit_rate(name: str, steps: int, out: Path) -> float:
    cfg = dataclasses.replace(QUICKSTART, preset=name, out=str(out), seconds=None, steps=steps, warmup=5, log_every=5,
                              sample_every=0, save_every=10**6, permute_colors=False, min_scale=1.0,
                              loss=LossConfig(pixel="l1", kl_weight=0.012288))  # fmt: skip
    train(cfg, progress=False)
    rates = [json.loads(line)["images_per_s"] for line in (out / "log.jsonl").read_text().splitlines()][2:]
    return statistics.median(rates)


CONVOLUTION_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward")


def diffusers_rate(name: str, steps: int) -> tuple[float, float]:
    """The loop's images/s, and the share of its step that convolutions take."""
    from diffusers import AutoencoderKL

    c = preset(name)
    torch.manual_seed(0)
    n = len(c.block_channels)
    model = AutoencoderKL(block_out_channels=c.block_channels, down_block_types=("DownEncoderBlock2D",) * n,
                          up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=c.layers_per_block,
                          latent_channels=c.latent_channels, norm_num_groups=c.norm_groups).train()  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = iter(training_data("samples", 64).loader(16, 0))

    def one_step() -> None:
        x = next(batches).images.float() / 127.5 - 1.0
        posterior = model.encode(x).latent_dist
        loss = (model.decode(posterior.sample()).sample - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rates, t = [], time.perf_counter()
    for step in range(1, steps + 1):
        one_step()
        if step % 5 == 0:
            now = time.perf_counter()
            rates.append(5 * 16 / (now - t))
            t = now
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(3):
            one_step()
        wall_us = (time.perf_counter() - t) * 1e6
    convs = sum(e.cpu_time_total for e in prof.key_averages() if e.key in CONVOLUTION_OPS)
    return statistics.median(rates[2:]), convs / wall_us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny-f8c4", "tiny-thumb-f8c4"])
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(2)
    print("| model | vaekit trainer img/s | diffusers loop img/s | ratio | convolutions' share of the loop's step (bound) |")
    print("|---|---|---|---|---|")
    for name in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            ours = vaekit_rate(name, args.steps, Path(tmp) / "run")
        theirs, share = diffusers_rate(name, args.steps) if preset(name).diffusers_compatible else (None, None)
        ratio = f"{ours / theirs:.2f}x" if theirs else "- (no diffusers class)"
        bound = f"{share:.0%} ({1 / share:.2f}x)" if share else "-"
        print(f"| {name} | {ours:.1f} | {f'{theirs:.1f}' if theirs else '-'} | {ratio} | {bound} |", flush=True)


if __name__ == "__main__":
    main()
