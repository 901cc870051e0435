"""Exact resume: 20 steps straight == 10 steps + resume to 20, bit for bit, on CPU."""

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from vaekit.losses import AutoencoderLoss, LossConfig
from vaekit.train import TrainConfig, train

TINY = dict(block_channels=[16, 32, 32, 32], layers_per_block=1, norm_groups=8, latent_channels=4)
# Every piece of state in play: posterior sampling, multi-scale crops and flips, gradient
# accumulation, EMA, scale equivariance (2x and 4x by step), and a GAN whose discriminator (with batch
# norm) starts training at step 5.
LOSS = LossConfig(kl_weight=1e-4, gan_weight=0.5, gan_start=5, disc_channels=8, disc_layers=2, scale_equivariance=0.5)


def config(out: Path, **changes) -> TrainConfig:
    settings = dict(data="samples", out=str(out), config=TINY, steps=20, batch_size=2, grad_accum=2, resolution=32,
                    min_scale=0.5, lr=2e-3, warmup=4, loss=LOSS, val_resolution=32, sample_every=0, save_every=10,
                    keep_checkpoints=5)  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


def assert_identical(a: object, b: object, where: str = "") -> int:
    """torch.equal on every tensor of two nested checkpoint structures; returns how many were compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return sum(assert_identical(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        return sum(assert_identical(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, where
    return 0


STATE = ("step", "model", "ema", "optimizer", "discriminator", "disc_optimizer", "rng", "skipped_steps")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    train(config(run), progress=False)
    return run


def test_resuming_from_a_checkpoint_continues_bit_for_bit(straight: Path, tmp_path: Path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_0000010.pt", resumed / "checkpoints")
    train(config(resumed, resume=True), progress=False)
    a = torch.load(straight / "checkpoints" / "step_0000020.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step_0000020.pt", weights_only=True)
    n = sum(assert_identical(a[k], b[k], k) for k in STATE)
    assert n > 100  # weights, EMA, both optimizers' moments, discriminator incl. batch-norm buffers
    assert a["disc_optimizer"]["state"]  # the discriminator did train
    for k in a["model"]:  # and the final model folder holds the same EMA weights
        assert torch.equal(a["ema"][k], b["ema"][k])


def test_ctrl_c_saves_a_checkpoint_after_the_current_step_and_resume_is_exact(straight: Path, tmp_path: Path, monkeypatch):
    terms = AutoencoderLoss.terms

    def interrupt_at_step_7(self, x, recon, posterior, step, se=None):
        if step == 6 and not interrupted:  # 0-based: during the 7th step
            interrupted.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return terms(self, x, recon, posterior, step, se)

    interrupted: list[bool] = []
    monkeypatch.setattr(AutoencoderLoss, "terms", interrupt_at_step_7)
    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt, match="step_0000007.pt; continue with --resume"):
        train(config(run), progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000007.pt"]
    assert not (run / "model").exists()
    train(config(run, resume=True), progress=False)
    a = torch.load(straight / "checkpoints" / "step_0000020.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "step_0000020.pt", weights_only=True)
    assert sum(assert_identical(a[k], b[k], k) for k in STATE) > 100
