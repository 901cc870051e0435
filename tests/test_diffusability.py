"""Diffusability (vaekit.diffusability, `vaekit diffusability`) and scale equivariance (`--scale-equivariance`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vaekit
from vaekit import preset
from vaekit.cli import main
from vaekit.diffusability import Protocol, denoiser_shape, score, shuffle_positions
from vaekit.losses import AutoencoderLoss, LossConfig, downsample, scale_factors
from vaekit.model import Autoencoder
from vaekit.train import TrainConfig, _ScaleEquivariantForward, train

SMALL = Protocol(steps=120, train_crops=384, val_crops=96, samples=8, batch=32)


def test_the_size_rule() -> None:
    assert denoiser_shape(4, 8, 64) == {"patch": 1, "width": 64, "levels": 1}  # SD-like f8c4
    assert denoiser_shape(16, 8, 64) == {"patch": 1, "width": 64, "levels": 1}  # f8c16
    assert denoiser_shape(64, 8, 64) == {"patch": 1, "width": 128, "levels": 1}  # 64 channels
    assert denoiser_shape(128, 4, 64) == {"patch": 1, "width": 256, "levels": 0}  # FLUX.2's normalised 1/16 patches
    assert denoiser_shape(3, 64, 64) == {"patch": 8, "width": 384, "levels": 1}  # pixel space: 8x8 pixels per position


def test_a_shuffled_latent_space_scores_worse_than_the_same_latents_in_place() -> None:
    """The known order: a fixed permutation of latent positions keeps every value and statistic but breaks
    which values are neighbours; the denoiser must find it harder at (nearly) every noise level."""
    torch.manual_seed(0)
    model = vaekit.load("preset:tiny-thumb-f8c4")  # random weights; its latents carry a thumbnail of the crop
    plain, _ = score(model, "samples", SMALL, kid=None, progress=False)
    shuffled, _ = score(model, "samples", SMALL, kid=None, progress=False, transform=shuffle_positions)
    assert shuffled["score"] > plain["score"] + 0.02, (plain["score"], shuffled["score"])
    worse = sum(s > p for s, p in zip(shuffled["errors"], plain["errors"]))
    assert worse >= len(SMALL.levels) - 1, (plain["errors"], shuffled["errors"])
    # The shuffle moves power to high frequencies; the numbers say so.
    assert shuffled["latents"]["high_frequency_fraction"] > plain["latents"]["high_frequency_fraction"] + 0.2
    # Relative errors: small at low noise, growing with it; the images' own spectrum is photo-like.
    assert 0 < plain["errors"][0] < 0.05 and plain["errors"][-1] > plain["errors"][0]
    assert plain["images"]["spectrum_slope"] < -1.5


def test_the_protocol_is_deterministic() -> None:
    model = vaekit.load("preset:tiny-f8c4")
    small = Protocol(steps=10, train_crops=64, val_crops=32, samples=4)
    a, images_a = score(model, "samples", small, progress=False)
    b, images_b = score(model, "samples", small, progress=False)
    assert a["errors"] == b["errors"] and torch.equal(images_a, images_b)
    assert a["latents"]["shape"] == [4, 8, 8] and abs(a["latents"]["scale"]) > 0


@pytest.mark.parametrize("family", ["flux2", "qwenimage", "hunyuanimage", "pixel"])
def test_every_family_is_scored_on_what_its_diffusion_model_sees(family: str) -> None:
    small = {"flux2": preset("flux2").replace(block_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8),
             "qwenimage": preset("qwenimage").replace(block_channels=(8, 16, 16, 16), layers_per_block=1),
             "hunyuanimage": preset("hunyuanimage").replace(block_channels=(32, 64, 64, 64), latent_channels=16, layers_per_block=1),
             "pixel": preset("pixel")}[family]  # fmt: skip
    torch.manual_seed(0)
    numbers, images = score(Autoencoder(small).eval(), "samples", Protocol(steps=3, train_crops=32, val_crops=16, samples=4),
                            progress=False)  # fmt: skip
    shape = {"flux2": [128, 4, 4], "qwenimage": [16, 8, 8], "hunyuanimage": [16, 8, 8], "pixel": [3, 64, 64]}[family]
    assert numbers["latents"]["shape"] == shape
    assert numbers["denoiser"]["patch"] == (8 if family == "pixel" else 1)
    assert images.shape == (4, 3, 64, 64) and np.isfinite(numbers["score"])


def test_cli_writes_a_report_and_refuses_a_bad_resolution(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    assert main(["diffusability", "preset:tiny-f8c4", "samples", "--out", str(out), "--steps", "5", "--train-crops", "32",
                 "--val-crops", "16", "--samples", "4", "--kid", "off"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    numbers = json.loads((out / "report.json").read_text())
    assert f"score {numbers['score']:.4f}" in printed and len(numbers["errors"]) == 9
    assert numbers["samples"]["kid"] is None and numbers["protocol"]["steps"] == 5
    assert "Diffusability" in (out / "report.html").read_text() and (out / "diffusability_samples.png").is_file()
    assert main(["diffusability", "preset:tiny-f8c4", "samples", "--out", str(tmp_path / "e"), "--resolution", "60"]) == 1
    assert "--resolution 64" in capsys.readouterr().err


def test_compare_reports_diffusability_side_by_side(tmp_path: Path) -> None:
    assert main(["compare", "preset:tiny-f8c4", "preset:tiny-f8c16", "samples:val", "--report", str(tmp_path / "r"),
                 "--resolution", "64", "--lpips", "off", "--samples", "2", "--steps", "3", "--pairs", "1",
                 "--diffusability", "samples", "--diffusability-steps", "5", "--kid", "off"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    scores = [m["diffusability"]["score"] for m in report["models"].values()]
    assert len(scores) == 2 and all(np.isfinite(scores))
    assert [m["diffusability"]["latents"]["shape"][0] for m in report["models"].values()] == [4, 16]
    assert "diffusability_errors.png" in (tmp_path / "r" / "report.html").read_text()


# ---- scale equivariance ---------------------------------------------------------------------------


def test_scale_factors() -> None:
    assert scale_factors(8) == [2, 4] and scale_factors(6) == [2]
    with pytest.raises(ValueError, match="even"):
        scale_factors(3)


def test_scale_equivariance_decodes_the_downsampled_latent_and_its_gradients_reach_both_halves(tiny_model) -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = tiny_model.train()
    noise = [torch.Generator().manual_seed(i) for i in range(2)]
    recon, posterior, (small, target) = _ScaleEquivariantForward(model)(x, noise, 2)
    # The same latent as the reconstruction, downsampled: replay it with the same noise.
    z = posterior.sample([torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.allclose(recon, model.decode(z), atol=1e-6)
    assert torch.allclose(small, model.decode(downsample(z, 2)), atol=1e-6)
    assert small.shape == target.shape == (2, 3, 16, 16)
    from PIL import Image  # the paper's bilinear downsampling, antialiased as PIL's

    pil = Image.fromarray(x[0, 0].numpy(), mode="F").resize((16, 16), Image.BILINEAR)
    assert np.abs(target[0, 0].numpy() - np.asarray(pil)).max() < 1e-6

    crit = AutoencoderLoss(LossConfig(kl_weight=1e-4, scale_equivariance=0.5))
    plain, logs = crit(x, recon, posterior, step=0)
    with_se, logs_se = crit(x, recon, posterior, step=0, se=(small, target))
    assert "se" not in logs and torch.allclose(with_se - plain, 0.5 * logs_se["se"])
    model.zero_grad()
    (with_se - plain).backward()  # the SE term alone
    enc = sum(p.grad.abs().sum() for p in model.encoder.parameters() if p.grad is not None)
    dec = sum(p.grad.abs().sum() for p in model.decoder.parameters() if p.grad is not None)
    assert enc > 0 and dec > 0


def test_scale_equivariance_in_training_is_logged_and_off_by_default(tmp_path: Path) -> None:
    tiny = dict(block_channels=[16, 32, 32, 32], layers_per_block=1, norm_groups=8, latent_channels=4)
    common = dict(data="samples", config=tiny, steps=4, batch_size=2, resolution=32, val_resolution=32, sample_every=0, warmup=1)
    on = train(TrainConfig(out=str(tmp_path / "on"), loss=LossConfig(kl_weight=1e-4, scale_equivariance=1.0), log_every=1, **common), progress=False)
    off = train(TrainConfig(out=str(tmp_path / "off"), loss=LossConfig(kl_weight=1e-4), log_every=1, **common), progress=False)
    logs_on = [json.loads(line) for line in (on.run / "log.jsonl").read_text().splitlines()]
    logs_off = [json.loads(line) for line in (off.run / "log.jsonl").read_text().splitlines()]
    assert all(line["se"] > 0 for line in logs_on if "loss" in line) and not any("se" in line for line in logs_off)
    # Same batches and noise: the first step's reconstruction term agrees, the loss differs by exactly W * se.
    first_on, first_off = (next(line for line in logs if "loss" in line) for logs in (logs_on, logs_off))
    assert first_on["l1"] == pytest.approx(first_off["l1"], rel=1e-6)
    assert first_on["loss"] == pytest.approx(first_off["loss"] + first_on["se"], rel=1e-5)
    settings = json.loads((on.run / "config.json").read_text())
    assert settings["train"]["loss"]["scale_equivariance"] == 1.0
