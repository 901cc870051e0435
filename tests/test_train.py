import dataclasses
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaekit
import vaekit.train
from vaekit.cli import main
from vaekit.losses import AutoencoderLoss, LossConfig
from vaekit.train import QUICKSTART, Schedule, TrainConfig, TrainingDiverged, quickstart, train

TINY = dict(block_channels=[16, 32, 32, 32], layers_per_block=1, norm_groups=8, latent_channels=4)


def tiny_run(out: Path, **changes) -> TrainConfig:
    """A few-second run: tiny model, 32-px crops, 32-px validation of the held-out photos."""
    settings = dict(data="samples", out=str(out), config=TINY, steps=6, batch_size=2, resolution=32, val_resolution=32,
                    lr=1e-3, warmup=2, save_every=3, sample_every=3, log_every=2)  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    f = [Schedule.of(100, 10, 0.1).factor(s) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.55) and f[99] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert Schedule.of(20, 10, 0.1).factor(4) == 1.0  # warm-up is capped at a quarter of the run


def test_retargeting_the_schedule_never_moves_the_lr_backwards():
    def curve(schedule: Schedule, at: int, total: int) -> list[float]:
        after = schedule.retarget(at, total)
        return [schedule.factor(s) for s in range(at)] + [after.factor(s) for s in range(at, total)]

    first = Schedule.of(100, 500, 0.1)  # warm-up capped at 25 steps
    # The case: the count grows from 100 to 130 at step 20, during warm-up. The old rule (warm-up =
    # a quarter of the new count) went from 0.84 at step 20 to 21/32 = 0.66.
    f = curve(first, 20, 130)
    assert f[19] == pytest.approx(0.8) and f[20] == pytest.approx(0.84) and f[24] == 1.0
    assert all(a < b for a, b in zip(f[:24], f[1:25])) and all(a >= b for a, b in zip(f[24:], f[25:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    # In the decay, growing or shrinking the count continues from the current value to the floor at the new end.
    for total in (60, 200):
        f = curve(first, 40, total)
        assert f[40] == pytest.approx(first.factor(40)) and 0.1 < f[-1] < 0.11, total  # continuous, to the floor
        assert all(a >= b for a, b in zip(f[24:], f[25:])), total


def test_a_run_writes_the_whole_run_folder(tmp_path: Path):
    result = train(tiny_run(tmp_path / "run", steps=10, keep_checkpoints=2, save_every=2), progress=False)
    run = result.run
    settings = json.loads((run / "config.json").read_text())
    assert settings["train"]["steps"] == 10 and settings["train"]["loss"]["kl_weight"] == 1e-6
    assert settings["model"]["block_channels"] == TINY["block_channels"] and settings["precision"] == "fp32"
    # Checkpoints: every 2 steps, the last two kept, no temp files left behind.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000008.pt", "step_0000010.pt"]
    last = _weights(run / "checkpoints" / "step_0000010.pt")
    assert last["step"] == 10 and last["discriminator"] is None
    # The model folder holds the EMA weights, loadable by vaekit.load (diffusers layout).
    model = vaekit.load(str(run / "model"))
    assert (run / "model" / "config.json").is_file()
    for k, v in model.state_dict().items():
        assert torch.equal(v, last["ema"][k]), k
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])  # EMA is not the raw model
    # Metrics of the held-out photos: the trained EMA model beats the untrained one.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == result.metrics and metrics["final"]["n"] == 3 and metrics["stopped"] == "done"
    assert metrics["final"]["psnr"] > metrics["initial"]["psnr"] + 0.5
    assert [r["name"] for r in metrics["final"]["per_image"]] == ["chelsea", "coffee", "flower"]
    # Logs: TensorBoard events and one JSON line per logged step; validation grids every 3 steps and at the end.
    assert list((run / "logs").glob("events.out.tfevents.*"))
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6, 8, 10]
    assert all(math.isfinite(line["loss"]) and line["lr"] > 0 and line["images_per_s"] > 0 for line in lines)
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == [f"step_{s:07d}.png" for s in (0, 3, 6, 9, 10)]
    assert Image.open(run / "samples" / "step_0000010.png").size == (3 * 32, 2 * 32)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny_run(tmp_path / "run"), progress=False)


def test_non_finite_steps_are_skipped_and_a_persistent_one_stops_with_a_usable_checkpoint(tmp_path: Path, monkeypatch):
    forward = AutoencoderLoss.forward
    nan_steps: set[int] = set()

    def poisoned(self, x, recon, posterior, step, last_layer=None, se=None):
        loss, logs = forward(self, x, recon, posterior, step, last_layer, se)
        return (loss * math.nan, logs) if step in nan_steps else (loss, logs)

    monkeypatch.setattr(AutoencoderLoss, "forward", poisoned)
    nan_steps.update({1, 2})  # 0-based: the 2nd and 3rd steps
    result = train(tiny_run(tmp_path / "skips", steps=6), progress=False)
    assert result.metrics["skipped_steps"] == 2 and result.metrics["stopped"] == "done"
    lines = [json.loads(line) for line in (tmp_path / "skips" / "log.jsonl").read_text().splitlines()]
    assert [line["skipped_steps"] for line in lines] == [1, 2, 2] and all(math.isfinite(line["loss"]) for line in lines)
    state = _weights(tmp_path / "skips" / "checkpoints" / "step_0000006.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    nan_steps.clear()
    nan_steps.update(range(4, 100))
    with pytest.raises(TrainingDiverged, match=r"non-finite for 4 steps in a row \(step 8\).*step_0000008.pt.*lower --lr"):
        train(tiny_run(tmp_path / "diverged", steps=20, max_bad_steps=3, save_every=100), progress=False)
    state = _weights(tmp_path / "diverged" / "checkpoints" / "step_0000008.pt")
    assert state["step"] == 8 and state["bad_in_a_row"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())


def test_decoder_only_fine_tuning_leaves_the_encoder_untouched(tmp_path: Path):
    torch.manual_seed(1)
    start = vaekit.Autoencoder(vaekit.AutoencoderConfig(**TINY))
    start.save(str(tmp_path / "start"))
    result = train(tiny_run(tmp_path / "ft", config=None, init=str(tmp_path / "start"), decoder_only=True), progress=False)
    state = _weights(result.run / "checkpoints" / "step_0000006.pt")
    before = start.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(state["model"][k], before[k]) and torch.equal(state["ema"][k], before[k]) for k in frozen)
    assert all(not torch.equal(state["model"][k], before[k]) for k in trained if k.endswith("weight"))
    # Only the decoder's parameters are in the optimizer.
    assert len(state["optimizer"]["state"]) == len(trained)
    assert vaekit.load(str(result.model)).config == start.config  # --init keeps the checkpoint's config


def test_kind_and_latent_channel_overrides_and_gan_training(tmp_path: Path):
    loss = LossConfig(gan_weight=0.5, gan_start=3, disc_channels=8, disc_layers=2)
    result = train(tiny_run(tmp_path / "ae", config=None, preset="tiny-f8c4", kind="ae", latent_channels=8, loss=loss,
                            steps=4, save_every=2, keep_checkpoints=5), progress=False)  # fmt: skip
    config = vaekit.load(str(result.model)).config
    assert config.kind == "ae" and config.latent_channels == 8 and config.family == "" and config.scaling_factor == 1.0
    before, after = (_weights(result.run / "checkpoints" / f"step_000000{s}.pt") for s in (2, 4))
    # The discriminator and its optimizer are checkpointed; it only trains from gan_start on.
    assert before["disc_optimizer"]["state"] == {} and after["disc_optimizer"]["state"]
    assert any(not torch.equal(before["discriminator"][k], after["discriminator"][k]) for k in before["discriminator"])
    lines = [json.loads(line) for line in (result.run / "log.jsonl").read_text().splitlines()]
    assert "disc" not in lines[0] and "disc" in lines[1] and "kl" not in lines[1]  # AE: no KL term


def test_cli_train_resume_takes_the_runs_settings_and_lpips_fails_in_one_line(tmp_path: Path, capsys):
    run = tmp_path / "cli"
    common = ["--config", str(tmp_path / "tiny.json"), "--batch-size", "2", "--resolution", "32", "--val-resolution", "32"]
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    assert main(["train", "--data", "samples", "--out", str(run), "--steps", "3", "--warmup", "1", "--save-every", "2", *common]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "held-out 3 images at 32x32: PSNR" in out and str(run / "model") in out
    assert main(["train", "--out", str(run), "--resume", "--steps", "5"]) == 0
    settings = json.loads((run / "config.json").read_text())["train"]
    assert settings["steps"] == 5 and settings["resolution"] == 32 and settings["data"] == "samples"
    assert json.loads((run / "metrics.json").read_text())["step"] == 5
    out = capsys.readouterr().out  # what happened, not the run's total
    assert "trained 2 steps in" in out and "(done, steps 3-5 of 5)" in out and "(untrained " in out
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert capsys.readouterr().out.startswith(f"nothing to train: {run} was already at step 5 of 5 (a larger --steps continues it)")
    assert main(["train", "--data", "samples", "--out", str(tmp_path / "ft"), "--init", str(run / "model"), "--steps", "1",
                 "--batch-size", "2", "--resolution", "32", "--val-resolution", "32"]) == 0
    out = capsys.readouterr().out
    assert "trained 1 step in" in out and "(before fine-tuning " in out
    assert main(["train", "--out", str(tmp_path / "never"), "--resume"]) == 1
    assert "no run to resume in" in capsys.readouterr().err
    assert main(["train", "--data", "samples", "--out", str(tmp_path / "l"), "--lpips-weight", "1", *common]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LPIPS" in err and "could not download" in err
    assert main(["train", "--out", str(tmp_path / "nodata")]) == 1
    assert "needs --data" in capsys.readouterr().err
    assert main(["train", "--data", "samples", "--out", str(tmp_path / "x"), "--preset", "sd1", "--init", "m"]) == 1
    assert "not --preset and --init" in capsys.readouterr().err


def test_quickstart_trains_within_its_budget_and_reports(tmp_path: Path, monkeypatch, capsys):
    # The real recipe needs minutes; the same code path with a tiny model needs seconds. Its learning rate is
    # high enough that the 6 steps a loaded CI machine may fit in 15 s already gain > 1 dB (CI once fit ~8 at 1e-3).
    small = dataclasses.replace(QUICKSTART, config=TINY, resolution=32, batch_size=4, warmup=2, lr=3e-3)
    monkeypatch.setattr(vaekit.train, "QUICKSTART", small)
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--seconds", "15"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert metrics["val_resolution"] == 256 and metrics["final"]["n"] == 3
    assert 6 <= metrics["steps"], metrics["steps"]
    assert metrics["final"]["psnr"] > metrics["initial"]["psnr"] + 0.5, metrics["steps"]
    assert metrics["final"]["ssim"] > metrics["initial"]["ssim"]
    assert metrics["seconds"] < 15 * 1.2  # slack for a loaded machine
    assert f"PSNR {metrics['final']['psnr']:.2f} dB" in out and "samples:" in out
    # Every held-out set against the bicubic thumbnail: the three photos (as validated) and samples:native's two parts.
    sets = metrics["against_thumbnail"]
    assert [sets[k]["n"] for k in ("photos", "crops", "synthetic")] == [3, 10, 7] and sets["photos"]["thumbnail_factor"] == 8
    assert abs(sets["photos"]["psnr"] - metrics["final"]["psnr"]) < 0.05  # the same reconstructions as validation's
    for name, title in (("photos", "held-out photos"), ("crops", "native-resolution crops"), ("synthetic", "saturated colours")):
        assert f"{title}: PSNR {sets[name]['psnr']:.2f} dB, 8x bicubic thumbnail {sets[name]['thumbnail_psnr']:.2f} dB" in out
    assert sets["synthetic"]["saturated_colour_error"] is not None and set(sets["crops"]["periodic"]) == {"2", "4", "8"}
    grid = sorted((tmp_path / "qs" / "samples").glob("*.png"))[-1]
    assert Image.open(grid).size == (3 * 256, 2 * 256)
    assert vaekit.load(str(tmp_path / "qs" / "model")).config.latent_channels == 4
    assert quickstart.__defaults__[0] == "quickstart" and QUICKSTART.seconds <= 295 and QUICKSTART.data == "samples"


class FakeClock:
    """Stands in for the trainer's `time`: each reading costs 1 s until `slow_until`, then 0.1 s."""

    def __init__(self, slow_until: float):
        self.now, self.slow_until = 0.0, slow_until

    def time(self) -> float:
        self.now += 1.0 if self.now < self.slow_until else 0.1
        return self.now


def test_time_budget_is_measured_again_after_slow_first_steps(tmp_path: Path, monkeypatch):
    # Slow first steps: 1 s per clock reading for the first 10 s, then 0.1 s (a step reads it 3 times).
    # The count from steps 2-6 alone (196 steps) would end the run at about 70 s.
    monkeypatch.setattr(vaekit.train, "time", FakeClock(slow_until=10))
    result = train(tiny_run(tmp_path / "r", steps=10_000, seconds=100, sample_every=0, save_every=0, log_every=1000), progress=False)
    reserve = vaekit.train._reserve(2.0)  # the initial validation reads the clock twice: 2 s
    assert result.metrics["stopped"] == "done" and 100 - reserve - 5 < result.metrics["seconds"] <= 100


def test_a_time_budget_that_grows_during_warm_up_never_lowers_the_lr(tmp_path: Path, monkeypatch):
    # 1 s per clock reading for the first 40 s (a step reads it 4 times when it logs), then 0.1 s. The first
    # count (from steps 2-6) caps warm-up at a quarter of it; the second measurement, still in warm-up, finds
    # the run much faster and raises the count. Warm-up keeps its length, so the learning rate rises to its
    # peak and then only falls (with warm-up a quarter of the new count it fell from 0.81 to 0.58 of the peak).
    monkeypatch.setattr(vaekit.train, "time", FakeClock(slow_until=40))
    small = dict(block_channels=[8, 16], layers_per_block=1, norm_groups=8)  # only the learning rate matters here
    run = tiny_run(tmp_path / "r", config=small, resolution=16, batch_size=1, steps=10_000, seconds=300, sample_every=0,
                   save_every=0, log_every=1, warmup=500)  # fmt: skip
    result = train(run, progress=False)
    lr = [json.loads(line)["lr"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    peak = lr.index(max(lr))
    assert len(lr) == result.metrics["steps"] and max(lr) == pytest.approx(1e-3) and 10 < peak < len(lr) // 4
    assert all(a < b for a, b in zip(lr[:peak], lr[1 : peak + 1])) and all(a >= b for a, b in zip(lr[peak:], lr[peak + 1 :]))


class StepClock:
    """Stands in for the trainer's `time`: only the training steps move it (in `ema_update`, once a step), by
    `seconds_per_step(now)`, so how long a run lasts and how many steps fit do not depend on the machine."""

    def __init__(self, seconds_per_step):
        self.now, self.seconds_per_step = 0.0, seconds_per_step

    def time(self) -> float:
        return self.now

    def install(self, monkeypatch) -> None:
        update = vaekit.train.ema_update

        def timed_update(*args):
            self.now += self.seconds_per_step(self.now)
            update(*args)

        monkeypatch.setattr(vaekit.train, "time", self)
        monkeypatch.setattr(vaekit.train, "ema_update", timed_update)


@pytest.mark.parametrize(
    "seconds_per_step",
    [
        # The case: another process loads the machine for the first 10 of 30 s, 3x slower steps. The first
        # count (steps 2-6) and the only other measurement there was (at a fifth of it, step 7) both fell in it:
        # 32 steps, "done" at 16.8 s. Measured again as the run goes on, it makes 72, done at 28.8 s.
        lambda now: 0.9 if now < 10 else 0.3,
        # Genuinely slower than first measured (twice as slow from 3 s on): the count shrinks to what fits. The one
        # measurement there was (step 29, half its window fast) said 92: "out of time" at step 82, lr 0.18 x peak.
        lambda now: 0.2 if now < 3 else 0.4,
        # On time: 96 steps, done at 28.8 s, as before measuring again.
        lambda now: 0.3,
    ],
    ids=["slow-start", "slower-later", "on-time"],
)
def test_a_time_budget_is_used_whatever_speed_the_first_steps_had(tmp_path: Path, monkeypatch, seconds_per_step):
    StepClock(seconds_per_step).install(monkeypatch)
    small = dict(block_channels=[8, 16], layers_per_block=1, norm_groups=8)  # only the clock and the lr matter here
    run = tiny_run(tmp_path / "r", config=small, resolution=16, val_resolution=16, batch_size=1, steps=10_000,
                   seconds=30, sample_every=0, save_every=0, log_every=1, warmup=500)  # fmt: skip
    metrics = train(run, progress=False).metrics
    end = 30 - vaekit.train._reserve(0.0)  # the initial validation takes no time on this clock
    assert metrics["stopped"] == "done" and metrics["step"] == metrics["steps"], metrics
    assert end - 0.9 <= metrics["seconds"] <= end, metrics  # within one slow step of its budget
    lr = [json.loads(line)["lr"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    peak = lr.index(max(lr))
    assert len(lr) == metrics["steps"] and max(lr) == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lr[:peak], lr[1 : peak + 1])) and all(a >= b for a, b in zip(lr[peak:], lr[peak + 1 :]))
    assert lr[-1] == pytest.approx(1e-4, rel=0.05)  # the decay ends at the floor on the last step


def _first_step_gradients(run: TrainConfig, monkeypatch) -> list[torch.Tensor]:
    """The gradients the first optimizer step applies: the autoencoder's, then the discriminator's."""
    clip, grads = torch.nn.utils.clip_grad_norm_, []

    def record(params, max_norm, *args, **kwargs):
        params = list(params)
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone())
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    train(dataclasses.replace(run, steps=1, sample_every=0), progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return grads


def test_gradient_accumulation_with_a_gan_equals_the_larger_batch(tmp_path: Path, monkeypatch):
    # A VAE (posterior samples), KL, the adaptive GAN weight from the first step. The adaptive weight is taken
    # from the whole step's gradients, and each image's posterior noise is keyed by its place in the step, so
    # 2 micro-batches of 4 give batch 8's gradients (with a weight per micro-batch they were 75% apart). A
    # batch-norm discriminator normalises each micro-batch alone, so the check uses GroupNorm.
    loss = LossConfig(kl_weight=1.0, gan_weight=0.5, gan_start=0, disc_channels=8, disc_layers=2, disc_norm="group")
    one = _first_step_gradients(tiny_run(tmp_path / "one", batch_size=8, loss=loss, log_every=1), monkeypatch)
    acc = _first_step_gradients(tiny_run(tmp_path / "acc", batch_size=4, grad_accum=2, loss=loss, log_every=1), monkeypatch)
    assert len(one) == len(acc) == 2  # the autoencoder's and the discriminator's
    for a, b in zip(one, acc):
        assert a.norm() > 0 and ((a - b).norm() / a.norm()).item() < 1e-5
    logged = [json.loads((tmp_path / r / "log.jsonl").read_text())["gan_weight"] for r in ("one", "acc")]
    assert logged[0] > 0 and logged[1] == pytest.approx(logged[0], rel=1e-4)


def test_workers_load_the_same_batches_as_the_main_process(tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    a = train(tiny_run(tmp_path / "w0", data=str(folder), val="samples:val", workers=0, steps=3, sample_every=0), progress=False)
    b = train(tiny_run(tmp_path / "w2", data=str(folder), val="samples:val", workers=2, steps=3, sample_every=0), progress=False)
    wa, wb = (_weights(r.run / "checkpoints" / "step_0000003.pt")["model"] for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_streams_tar_shards(tmp_path: Path):
    import io

    import webdataset as wds

    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"{s}.tar")) as sink:
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(np.random.default_rng(10 * s + i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"s{s}_{i}", "png": buf.getvalue()})
    result = train(tiny_run(tmp_path / "run", data=str(tmp_path / "{0..1}.tar"), val_fraction=0.3, steps=4), progress=False)
    held = [r["name"] for r in result.metrics["final"]["per_image"]]
    assert held and all(vaekit.data.held_out(k, 0.3) for k in held)
    assert result.metrics["data"].startswith("2 tar shard(s)") and result.metrics["step"] == 4


def test_the_discriminator_trains_with_ldms_adam_unclipped(tmp_path: Path, monkeypatch):
    # LDM: Adam betas (0.5, 0.9), no weight decay, no gradient clipping, the autoencoder's learning rate
    # unless --disc-lr says otherwise. Here the autoencoder is clipped hard (--clip 1e-6) to show the
    # discriminator's gradient reaches its optimizer as computed.
    seen: dict[str, list[float]] = {"ae": [], "disc": []}
    steps = {name: getattr(torch.optim, name).step for name in ("Adam", "AdamW")}

    def record(name):
        def step(self, *args, **kwargs):
            norm = torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]).norm()
            seen["disc" if name == "Adam" else "ae"].append(float(norm))
            return steps[name](self, *args, **kwargs)
        return step

    for name in steps:
        monkeypatch.setattr(getattr(torch.optim, name), "step", record(name))
    loss = LossConfig(gan_weight=0.5, gan_start=0, disc_channels=8, disc_layers=2)
    train(tiny_run(tmp_path / "run", loss=loss, steps=3, clip=1e-6, disc_lr=3e-4, warmup=1, sample_every=0), progress=False)
    assert len(seen["disc"]) == 3 and min(seen["disc"]) > 1e-3 and max(seen["ae"]) <= 1.01e-6
    state = _weights(tmp_path / "run" / "checkpoints" / "step_0000003.pt")
    (group,) = state["disc_optimizer"]["param_groups"]
    assert group["betas"] == (0.5, 0.9) and group["weight_decay"] == 0.0
    assert group["lr"] == pytest.approx(3e-4 * Schedule.of(3, 1, 0.1).factor(2))  # its own peak, the same schedule
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)  # the autoencoder keeps --betas


def test_resuming_a_run_from_before_ldm_weights_keeps_its_kl_strength(tmp_path: Path, capsys):
    # A run whose checkpoints predate the LDM convention: kl_weight 1e-4 then multiplied a KL against a mean
    # pixel loss; at 32x32 crops LDM's equivalent is 1e-4 x 3 x 32 x 32. Resuming converts it and says so.
    run = tmp_path / "old"
    loss = LossConfig(kl_weight=1e-4)
    train(tiny_run(run, loss=loss, steps=2, sample_every=0), progress=False)
    path = run / "checkpoints" / "step_0000002.pt"
    state = _weights(path)
    assert state["loss_convention"] == "ldm" and json.loads((run / "config.json").read_text())["loss_convention"] == "ldm"
    del state["loss_convention"], state["schedule"]
    torch.save(state, path)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0
    assert "its kl_weight 0.0001 (against a mean pixel loss) continues as 0.3072 in LDM's terms" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["loss"]["kl_weight"] == pytest.approx(0.3072)
    assert _weights(run / "checkpoints" / "step_0000003.pt")["loss_convention"] == "ldm"
    # A --kl-weight given anew is taken in LDM's terms as it is.
    torch.save(state, path)
    (run / "checkpoints" / "step_0000003.pt").unlink()
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--kl-weight", "1e-6"]) == 0
    assert "kl_weight 1e-06 is taken as LDM's" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["loss"]["kl_weight"] == 1e-6


def test_deterministic_runs_its_steps_with_deterministic_algorithms(tmp_path: Path, monkeypatch):
    terms, modes = AutoencoderLoss.terms, []

    def record(self, *args):
        modes.append(torch.are_deterministic_algorithms_enabled())
        return terms(self, *args)

    monkeypatch.setattr(AutoencoderLoss, "terms", record)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    a = train(tiny_run(tmp_path / "det", deterministic=True, steps=2, sample_every=0), progress=False)
    assert modes == [True, True] and not torch.are_deterministic_algorithms_enabled()  # restored afterwards
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert json.loads((a.run / "config.json").read_text())["train"]["deterministic"] is True
    b = train(tiny_run(tmp_path / "plain", steps=2, sample_every=0), progress=False)
    assert modes[2:] == [False, False]
    wa, wb = (_weights(r.run / "checkpoints" / "step_0000002.pt")["model"] for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # on the CPU it changes nothing


def test_bad_settings_fail_before_anything_is_written(tmp_path: Path, capsys):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    run = tmp_path / "run"
    common = ["--data", "samples", "--out", str(run), "--config", str(tmp_path / "tiny.json")]
    assert main(["train", *common, "--resolution", "100"]) == 1
    assert capsys.readouterr().err.strip() == (
        "vaekit train: error: --resolution 100 is not a multiple of the model's factor 8: use --resolution 96 or 104")
    assert main(["train", *common, "--val-resolution", "36"]) == 1
    assert "--val-resolution 36 is not a multiple of the model's factor 8: use --val-resolution 32 or 40" in capsys.readouterr().err
    assert not run.exists()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "mine.txt").write_text("a user's file")
    assert main(["train", "--data", "samples", "--out", str(tmp_path / "photos"), "--config", str(tmp_path / "tiny.json")]) == 1
    assert "already holds files that vaekit did not write" in capsys.readouterr().err


def test_an_unreadable_validation_image_gives_way_to_a_readable_one(tmp_path: Path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    names = sorted((p.name for p in folder.iterdir()), key=lambda n: zlib.crc32(n.encode()))
    assert not any(vaekit.data.held_out(n, 0.05) for n in names)  # so the first by hash is the validation image
    (folder / names[0]).write_bytes(b"")  # ...and it is empty
    result = train(tiny_run(tmp_path / "run", data=str(folder), steps=2, sample_every=0), progress=False)
    assert [r["name"] for r in result.metrics["final"]["per_image"]] == [names[1]]
    assert any(names[0] in u for u in result.metrics["unreadable"])
    assert result.metrics["data"].startswith("2 training images") and f"skipped unreadable validation image {folder / names[0]}" in capsys.readouterr().err
    train(tiny_run(tmp_path / "noval", data=str(folder), val_fraction=0.0, steps=1, sample_every=0), progress=False)
    assert "no validation images: the model is not measured during or after training; pass --val DATA" in capsys.readouterr().err
