"""`torchrun --nproc_per_node 2 ... vaekit train` trains one model with DDP (gloo on CPU): ranks split the data, keep
identical weights, only rank 0 writes the run folder, and `--resume` under torchrun continues bit-exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaekit

# Runs in each process: records what its rank trained on, what it wrote and its final weights.
WORKER = r"""
import json, os, sys, torch
import vaekit.train as T
from vaekit.losses import AutoencoderLoss

rank, out = int(os.environ["RANK"]), sys.argv[2]
seen, writes, refs = [], [], {}
terms, ema_update = AutoencoderLoss.terms, T.ema_update

def record(self, x, recon, posterior, step, se=None):
    seen.append(sorted(round(float(v), 3) for v in x[:, 0, 0, 0]))  # every image is one flat colour
    refs["loss"] = self
    return terms(self, x, recon, posterior, step, se)

def keep(ema, model, decay):
    refs["ema"], refs["model"] = ema, model
    return ema_update(ema, model, decay)

def spy(name, fn):
    def wrapped(*a, **k):
        writes.append(name)
        return fn(*a, **k)
    return wrapped

AutoencoderLoss.terms, T.ema_update = record, keep
T.write_atomic, T.save_checkpoint, T._tensorboard = (spy(n, getattr(T, n)) for n in ("write_atomic", "save_checkpoint", "_tensorboard"))
from vaekit.cli import main
assert main(json.loads(sys.argv[1])) == 0  # `vaekit train ...`, as a user runs it under torchrun
disc = refs["loss"].discriminator
torch.save({"seen": seen, "writes": writes, "model": refs["model"].state_dict(), "ema": refs["ema"].state_dict(),
            "disc": getattr(disc, "module", disc).state_dict(), "ddp": type(disc).__name__}, f"{out}/rank{rank}.pt")
"""


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_cpu_processes_train_one_model_on_split_data(tmp_path: Path, accumulate: int):
    # With --grad-accum 2 the adaptive GAN weight comes from all ranks' accumulated gradients (the generator
    # loss's gradients are all-reduced apart): the ranks must still end identical, and resume stay exact.
    folder = tmp_path / "flat"
    folder.mkdir()
    levels = [20 * i + 30 for i in range(8)]
    for i, v in enumerate(levels):
        Image.fromarray(np.full((40, 40, 3), v, np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    (tmp_path / "tiny.json").write_text(json.dumps(dict(block_channels=[8, 16], layers_per_block=1, norm_groups=8)))
    argv = ["train", "--data", str(folder), "--out", str(run), "--val", str(folder), "--val-images", "4",
            "--val-resolution", "16", "--resolution", "32", "--steps", "4", "--batch-size", "2", "--warmup", "1",
            "--lr", "1e-3", "--config", str(tmp_path / "tiny.json"), "--sample-every", "0", "--save-every", "2",
            "--log-every", "1", "--workers", "0", "--gan-weight", "0.5", "--gan-start", "1",
            "--grad-accum", str(accumulate)]  # fmt: skip
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(vaekit.__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), json.dumps(argv), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 4 steps") == 1  # rank 0 reports, once

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Each rank trained on its own half of every epoch (8 images, 2 per rank per micro-step: 2 micro-steps an epoch).
    value = {round(v / 127.5 - 1, 3): v for v in levels}
    assert len(r0["seen"]) == len(r1["seen"]) == 4 * accumulate
    for step in range(4):
        a, b = r0["seen"][step], r1["seen"][step]
        assert set(a).isdisjoint(b), step
    for epoch in range(2):
        rows = r0["seen"][2 * epoch : 2 * epoch + 2] + r1["seen"][2 * epoch : 2 * epoch + 2]
        assert sorted(value[v] for row in rows for v in row) == levels
    # DDP kept one model: both ranks end with identical weights, EMA and discriminator.
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    for part in ("model", "ema", "disc"):
        # (Batch-norm running statistics stay per rank, as in LDM: the discriminator always runs in
        # training mode, so they are never used.)
        same = [torch.equal(r0[part][k], r1[part][k]) for k in r0[part] if "running_" not in k]
        assert len(same) > 4 and all(same), part
    # Only rank 0 wrote; the run folder holds one set of files from a 2-process run.
    assert r1["writes"] == [] and {"write_atomic", "save_checkpoint", "_tensorboard"} <= set(r0["writes"])
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert len(list((run / "logs").glob("events.*"))) == 1
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    saved = vaekit.load(str(run / "model")).state_dict()
    assert all(torch.equal(saved[k], r0["ema"][k]) for k in saved)
    last = torch.load(run / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert last["world_size"] == 2 and all(torch.equal(last["model"][k], r1["model"][k]) for k in last["model"])
    assert json.loads((run / "metrics.json").read_text())["final"]["n"] == 4

    # Exact resume under DDP: 2 steps, then `--resume` to 4 (from a copy of the step-2 checkpoint) ends with the
    # same weights, EMA, discriminator and optimizer states as the 4 steps straight.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "step_0000002.pt").write_bytes((run / "checkpoints" / "step_0000002.pt").read_bytes())
    argv[argv.index(str(run))] = str(resumed)
    (tmp_path / "r").mkdir()
    cmd[-2:] = [json.dumps(argv + ["--resume"]), str(tmp_path / "r")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(r / "checkpoints" / "step_0000004.pt", weights_only=True) for r in (run, resumed))

    def tensors(tree, prefix=""):
        if isinstance(tree, torch.Tensor):
            yield prefix, tree
        elif isinstance(tree, dict):
            for k, v in tree.items():
                yield from tensors(v, f"{prefix}/{k}")
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                yield from tensors(v, f"{prefix}/{i}")

    for part in ("model", "ema", "discriminator", "optimizer", "disc_optimizer"):
        x, y = dict(tensors(a[part])), dict(tensors(b[part]))
        assert len(x) > 4 and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), part
