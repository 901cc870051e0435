"""Train or fine-tune an autoencoder: the loop behind `vaekit train` and `vaekit quickstart`.

`train(cfg)` reads top to bottom (after nanoGPT's train.py): processes and devices, model/EMA/loss/
optimizers, data, resume, the run folder, then the loop, each step: learning rates, the micro-steps'
forward and backward (`micro_steps`), clipping, one update or none, the time budget, logging,
validation, checkpoints. The pieces are named functions of explicit inputs; what a checkpoint saves
besides weights and optimizer states is a `RunState`. The run folder:

    RUN/config.json        every setting (train settings, the model config, versions)
    RUN/checkpoints/       step_XXXXXXX.pt, written atomically, the last --keep-checkpoints kept
    RUN/model/             final EMA weights as a diffusers folder (vaekit.load, and diffusers
                           whenever it has the architecture)
    RUN/metrics.json       validation PSNR/SSIM of the final EMA model (and of the initial one)
    RUN/logs/              TensorBoard: losses, lr, grad norm, images/s, skipped steps, val metrics
    RUN/log.jsonl          the same scalars, one JSON line per logged step
    RUN/samples/           PNG grids of fixed validation images (top) and their reconstructions

Exact resume: all randomness of a step is keyed by (seed, rank, step): the data crops (see
vaekit.data) and the posterior samples, so a checkpoint needs only the step, the weights, the
optimizer states and the global RNG states to continue bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoints import load
from .config import AutoencoderConfig, check_fields, preset
from .data import CropDataset, TrainingData, held_out_sets, to_tensor, to_uint8, training_data, write_image
from .evaluate import against_thumbnail
from .files import check_output_folder, mark_output_folder, write_atomic
from .losses import AutoencoderLoss, LossConfig, downsample, gan_weight_from_grads, scale_factors
from .metrics import psnr, ssim
from .model import Autoencoder
from .progress import progress as progress_bar


@dataclass
class TrainConfig:
    """Every setting of a training run; `RUN/config.json` holds this plus the model config."""

    # Data (any DATA string: folder, image file, tar shards, "samples").
    data: str = ""
    out: str = ""
    val: str | None = None  # validation DATA; default: held out of `data` (see vaekit.data.training_data)
    val_fraction: float = 0.05
    val_images: int = 16
    val_resolution: int = 256
    resolution: int = 256  # training crop side
    min_scale: float = 1.0  # random down-scale of each image by [min_scale, 1] before cropping
    flip: bool = True
    permute_colors: bool = False  # random R/G/B order per crop: more palettes from few photos
    workers: int | None = None  # data loader processes; None: 0 for in-memory photos, else up to 4
    # Model: a preset, a JSON AutoencoderConfig (file path or dict), or a checkpoint to fine-tune.
    preset: str = "tiny-f8c4"
    config: str | dict | None = None
    init: str | None = None
    kind: str | None = None  # override the preset's "vae" / "ae"
    latent_channels: int | None = None
    decoder_only: bool = False  # freeze the encoder (and quant_conv): the latent space stays as it is
    # Optimisation.
    steps: int = 10_000
    seconds: float | None = None  # wall-clock budget: the step count is calibrated from measured speed
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup: int = 500  # linear warm-up steps (at most a quarter of the run)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping of the autoencoder; 0 turns it off
    disc_lr: float | None = None  # the discriminator's peak learning rate; None: lr (LDM)
    disc_betas: tuple[float, float] = (0.5, 0.9)  # LDM's Adam betas for the discriminator (no decay, no clipping)
    ema_decay: float = 0.999
    precision: str | None = None  # "fp32" or "bf16" autocast; None: bf16 on CUDA, fp32 on CPU
    deterministic: bool = False  # deterministic CUDA algorithms: bit-exact repeats and resumes on a GPU, slower
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    # Bookkeeping.
    log_every: int = 10
    sample_every: int = 500
    save_every: int = 1000
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    resume: bool = False

    def __post_init__(self) -> None:
        self.betas, self.disc_betas = tuple(self.betas), tuple(self.disc_betas)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["disc_betas"] = list(self.betas), list(self.disc_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        check_fields(cls, d, "train settings")
        d = dict(d)
        if isinstance(d.get("loss"), dict):
            d["loss"] = LossConfig(**d["loss"])
        return cls(**d)


# The quickstart recipe: the one place to tune it (see docs/TRAINING.md for how it was chosen).
QUICKSTART = TrainConfig(
    data="samples",
    out="quickstart",
    seconds=285,  # + ~5 s of Python imports and ~5 s scoring both held-out sets: the command stays within 5 minutes
    preset="tiny-thumb-f8c4",
    resolution=64,
    min_scale=0.25,
    permute_colors=True,
    batch_size=16,
    lr=1e-3,
    warmup=50,
    ema_decay=0.99,
    # LDM's kl_weight; 0.012288 = 1e-6 x 3 x 64 x 64 is the strength the recipe was tuned at (1e-6 on a mean
    # pixel loss at 64^2 crops, before vaekit's weights meant LDM's), docs/TRAINING.md
    loss=LossConfig(pixel="l1", kl_weight=0.012288),
    sample_every=200,
    save_every=200,
    val_resolution=256,
)


@dataclass
class TrainResult:
    run: Path
    model: Path  # the diffusers folder of the final EMA weights
    metrics: dict[str, Any]  # what RUN/metrics.json holds (empty on ranks other than 0)
    rank: int = 0


class TrainingDiverged(RuntimeError):
    """Loss or gradients stayed non-finite for too many consecutive steps."""


# What LossConfig's weights mean, recorded in config.json and every checkpoint: "ldm" = LDM's and diffusers'
# (see vaekit.losses). Runs from before it (no entry) put kl_weight on a KL against a *mean* pixel loss.
LOSS_CONVENTION = "ldm"


# ---- the loop --------------------------------------------------------------------------------


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) one training run as described by `cfg`; see the module docstring."""
    started = time.time()
    _check(cfg)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first runs

    # ---- processes and devices; a checkpoint is read first, as one from before LDM's weights changes the loss ----
    procs = start_processes(cfg)
    run = Path(cfg.out)
    checkpoint_path = _checkpoint_to_resume(run, cfg.resume, procs.master)
    saved = torch.load(checkpoint_path, map_location=procs.device, weights_only=True) if checkpoint_path else None
    if saved is not None and saved.get("loss_convention") != LOSS_CONVENTION:
        cfg = _convert_old_weights(cfg, saved, procs.master)

    # ---- model, EMA, loss, optimizers (identical on every rank: seeded the same) ----
    _seed_everything(cfg.seed)
    nets = build_networks(cfg, procs.device)

    # ---- data (after the loss, so a missing LPIPS backbone fails before any image is read) ----
    data, workers = _training_data(cfg, procs)

    # ---- resume: weights, optimizer states, the global RNG and where the run stood; then DDP's wrappers ----
    state = resume(saved, checkpoint_path, nets, cfg, procs) if saved is not None else RunState.fresh(cfg)
    del saved  # its tensors are the models' and optimizers' now
    state.unreadable.update(data.skipped)
    start_step = state.step
    _distribute(nets, cfg, procs)

    # ---- the run folder (rank 0 writes; the others only compute) and the starting point's metrics ----
    writer = _start_run_folder(run, cfg, nets.model, procs, workers) if procs.master else None
    eval_seconds = 0.0  # what a validation takes, so a time budget keeps time for the final one
    if procs.master and data.val and state.step == 0:
        t = time.time()
        state.initial_metrics = validate(nets.ema, data, procs.device, run / "samples" / "step_0000000.png", writer, 0)
        eval_seconds = time.time() - t
    budget = None  # a time budget calibrates the step count from measured speed and keeps fitting it
    if cfg.seconds:
        budget = TimeBudget(cfg.seconds, started, _reserve(eval_seconds), cfg.steps, cfg.warmup, cfg.min_lr_ratio,
                            eval_seconds, cfg.sample_every if data.val else 0, procs.distributed, calibrated=checkpoint_path is not None)  # fmt: skip

    # ---- the loop ----
    batches = iter(data.loader(cfg.batch_size, cfg.seed, procs.rank, procs.world, start=state.step * cfg.grad_accum, workers=workers))
    bar = progress_bar(desc="train", unit="step", total=state.schedule.total, initial=state.step, enabled=procs.master and progress)
    window = LogWindow(started=time.time())
    step_times: list[float] = []  # every step's seconds since start or resume, for the time budget
    stopped = ""
    with _deferred_interrupt() as interrupted, _deterministic_algorithms(cfg.deterministic):
        while state.step < state.schedule.total:
            t_step = time.time()
            lr = _set_learning_rates(nets, cfg, state.schedule.factor(state.step))
            gan = nets.crit.gan_active(state.step)

            # Forward and backward over the micro-batches; the gradients add up in .grad.
            finite, step_logs, images = micro_steps(batches, nets, cfg, procs, state.step, gan, state.unreadable)
            window.images += images * procs.world

            # Clip, then one update, or none when anything is non-finite on any rank (ranks agree on it).
            grad_norm = nn.utils.clip_grad_norm_(nets.params, cfg.clip if cfg.clip > 0 else math.inf)
            d_norm = nn.utils.clip_grad_norm_(nets.disc.parameters(), math.inf) if gan else grad_norm  # LDM: not clipped
            out_of_time = budget is not None and budget.out_of_time()
            flags = [not (finite and torch.isfinite(grad_norm) and torch.isfinite(d_norm)), interrupted(), out_of_time]
            bad, stop_now, late = _agree(flags, procs.distributed)
            if bad:
                state.skipped_steps, state.bad_in_a_row = state.skipped_steps + 1, state.bad_in_a_row + 1
            else:
                _update(nets, cfg, state.step, gan)
                state.bad_in_a_row = 0
                window.add(step_logs)
            nets.zero_grad()
            state.step += 1
            bar.update(1)
            step_times.append(time.time() - t_step)

            # A time budget refits the step count to the speed measured so far.
            if budget is not None:
                fitted = budget.fit(state.step, step_times, state.schedule)
                if fitted is not state.schedule:
                    state.schedule, bar.total = fitted, fitted.total

            # Log, validate, checkpoint; stop if diverged, interrupted or out of time.
            if state.step % cfg.log_every == 0 or state.step == state.schedule.total:
                scalars = window.close(time.time(), lr=lr, grad_norm=float(grad_norm), skipped_steps=state.skipped_steps)
                if procs.master:
                    _log(writer, run, state.step, scalars)
                    bar.set_postfix(loss=f"{scalars.get('loss', math.nan):.4f}", img_s=f"{scalars['images_per_s']:.1f}", refresh=False)
            if state.bad_in_a_row > cfg.max_bad_steps:
                stopped = "diverged"
                break
            mid_run = state.step < state.schedule.total  # the last step's validation and checkpoint come after the loop
            if procs.master and data.val and cfg.sample_every and state.step % cfg.sample_every == 0 and mid_run:
                validate(nets.ema, data, procs.device, run / "samples" / f"step_{state.step:07d}.png", writer, state.step)
            if cfg.save_every and state.step % cfg.save_every == 0 and mid_run:
                checkpoint(run, state, nets, cfg, procs)
            if stop_now or late:
                stopped = "interrupted" if stop_now else "out of time"
                break
    bar.close()

    # ---- the end: a checkpoint, then the final model and its metrics ----
    path = checkpoint(run, state, nets, cfg, procs)
    if stopped == "diverged":
        raise TrainingDiverged(
            f"loss or gradients were non-finite for {state.bad_in_a_row} steps in a row (step {state.step}); the weights are "
            f"the last finite ones, saved in {path}: lower --lr or --gan-weight, raise --warmup, or use --precision fp32"
        )
    if stopped == "interrupted":
        raise KeyboardInterrupt(f"saved {path}; continue with --resume")
    metrics: dict[str, Any] = {"initial": state.initial_metrics} if state.initial_metrics else {}
    if procs.master:
        metrics.update(_final_model(nets.ema, data, cfg, procs.device, run, writer, state.step))
        metrics.update(step=state.step, start_step=start_step, steps=state.schedule.total, init=cfg.init,
                       skipped_steps=state.skipped_steps, stopped=stopped or "done", seconds=round(time.time() - started, 1),
                       val_resolution=cfg.val_resolution, unreadable=sorted(state.unreadable), data=data.description)  # fmt: skip
        _write_json(run / "metrics.json", metrics)
        writer.close()
    procs.finish()
    return TrainResult(run, run / "model", metrics, procs.rank)


def quickstart(out: str = QUICKSTART.out, seconds: float | None = None, progress: bool = True, **changes: Any) -> TrainResult:
    """Train the QUICKSTART recipe on the built-in photos within `seconds` (default: the recipe's), then
    score the model against the bicubic thumbnail on both held-out sets (metrics.json's "against_thumbnail")."""
    cfg = dataclasses.replace(QUICKSTART, **{"out": out, "seconds": seconds or QUICKSTART.seconds, **changes})
    result = train(cfg, progress=progress)
    if result.rank == 0 and cfg.data == "samples" and "final" in result.metrics:
        result.metrics["against_thumbnail"] = held_out_against_thumbnail(load(result.model), cfg.val_resolution)
        _write_json(result.run / "metrics.json", result.metrics)
    return result


def held_out_against_thumbnail(model: Autoencoder, resolution: int = 256) -> dict[str, Any]:
    """`vaekit.evaluate.against_thumbnail` on each of `vaekit.data.held_out_sets`, colour error on the synthetic one."""
    sets = held_out_sets(resolution)
    saturated = [name for name, _ in sets["synthetic"]]
    return {name: against_thumbnail(model, images, saturated) for name, images in sets.items()}


# ---- what a run holds ------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place in the run: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain run is one process."""

    world: int
    rank: int
    device: torch.device
    precision: str  # "fp32" or "bf16"
    autocast: torch.autocast  # bf16 autocast of the forward passes, or off
    own_group: bool  # this run started the process group, so it ends it

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:  # rank 0 writes the run folder; the others only compute
        return self.rank == 0

    def finish(self) -> None:
        """Wait for every rank (for rank 0's last writes), then end the process group if this run started it."""
        if self.distributed:
            dist.barrier()
        if self.own_group:
            dist.destroy_process_group()


@dataclass
class Networks:
    """What trains: the model, its EMA, the loss with its discriminator, and their optimizers."""

    model: Autoencoder
    ema: Autoencoder
    crit: AutoencoderLoss  # under DDP its .discriminator is DDP's wrapper of `disc`
    disc: nn.Module | None  # the discriminator itself: what is clipped and checkpointed
    params: list[nn.Parameter]  # the model's trained parameters (--decoder-only leaves the encoder out)
    opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None
    disc_lr: float  # the discriminator's peak learning rate
    forward: nn.Module | None = None  # the training forward, DDP's wrapper under torchrun (see _distribute)
    se_factors: list[int] = field(default_factory=list)  # scale equivariance's downsampling factors, if it is on

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight, where the adaptive GAN weight compares the two losses' gradients."""
        return self.model.decoder.conv_out.weight

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.disc_opt:
            self.disc_opt.zero_grad(set_to_none=True)


@dataclass
class RunState:
    """Where a run stands, beyond its weights and optimizer states: what a checkpoint saves with them
    (see checkpoint_state) and `resume` restores, and the unreadable images met (not saved: a resumed
    run lists those it meets)."""

    step: int
    schedule: Schedule
    skipped_steps: int = 0  # non-finite steps, skipped, in the whole run
    bad_in_a_row: int = 0  # ... and in a row, up to now
    initial_metrics: dict[str, Any] | None = None  # the validation before the first step
    unreadable: set[str] = field(default_factory=set)

    @classmethod
    def fresh(cls, cfg: TrainConfig) -> "RunState":
        return cls(step=0, schedule=Schedule.of(cfg.steps, cfg.warmup, cfg.min_lr_ratio))


@dataclass
class LogWindow:
    """The steps since the last log line: the logged terms summed over those that updated (a skipped step's
    are not finite), and the images all of them trained on, for images/s."""

    started: float
    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def close(self, now: float, lr: float, grad_norm: float, skipped_steps: int) -> dict[str, float]:
        """The log line's scalars: the window's means, the last step's lr and gradient norm; a new window starts `now`."""
        scalars = {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}
        scalars.update(lr=lr, grad_norm=grad_norm, skipped_steps=skipped_steps,
                       images_per_s=self.images / max(now - self.started, 1e-9))  # fmt: skip
        self.started, self.sums, self.steps, self.images = now, {}, 0, 0
        return scalars


# ---- setting up ------------------------------------------------------------------------------


def start_processes(cfg: TrainConfig) -> Processes:
    """Join torchrun's processes (starting their group unless the caller did) and take this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    return Processes(world, rank, device, precision, autocast, own_group)


def _checkpoint_to_resume(run: Path, resume: bool, master: bool) -> Path | None:
    """The run's latest checkpoint, which only --resume may continue; `run` must be new, empty or vaekit's."""
    if not ((run / "config.json").is_file() or (run / "checkpoints").is_dir()):  # unless a run: new, empty or vaekit's
        check_output_folder(run, "--out")
    path = latest_checkpoint(run / "checkpoints")
    if path and not resume:
        raise ValueError(f"{run} already holds checkpoints: pass --resume to continue it, or choose another --out")
    if resume and not path:
        _note(master, f"no checkpoint in {run} to resume: starting a new run")
    return path


def build_networks(cfg: TrainConfig, device: torch.device) -> Networks:
    """The model (see build_model), its EMA, the loss and the optimizers: identical on every rank when the
    global RNG is seeded alike. The crop sides are checked against the model before anything is written."""
    model = build_model(cfg).to(device).train()
    for name in ("resolution", "val_resolution"):
        side, model_factor = getattr(cfg, name), model.factor
        if side % model_factor:
            flag, below = "--" + name.replace("_", "-"), side - side % model_factor
            raise ValueError(f"{flag} {side} is not a multiple of the model's factor {model_factor}: use {flag} "
                             + " or ".join(str(s) for s in dict.fromkeys([max(model_factor, below), below + model_factor])))  # fmt: skip
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.decoder_only:
        for part in (model.encoder, model.quant_conv):
            if part is not None:
                part.requires_grad_(False)
    crit = AutoencoderLoss(cfg.loss, kind=model.config.kind).to(device)
    disc = crit.discriminator
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    disc_lr = cfg.disc_lr or cfg.lr
    disc_opt = torch.optim.Adam(disc.parameters(), lr=disc_lr, betas=cfg.disc_betas) if disc is not None else None  # LDM's
    return Networks(model, ema, crit, disc, params, opt, disc_opt, disc_lr)


def _training_data(cfg: TrainConfig, procs: Processes) -> tuple[TrainingData, int]:
    """The training and validation images (see vaekit.data.training_data) and the loader's worker count."""
    data = training_data(
        cfg.data, cfg.resolution, val=cfg.val, val_fraction=cfg.val_fraction, val_images=cfg.val_images,
        val_resolution=cfg.val_resolution, min_scale=cfg.min_scale, flip=cfg.flip,
        permute_colors=cfg.permute_colors,
    )  # fmt: skip
    workers = cfg.workers if cfg.workers is not None else _default_workers(data, procs.world)
    for s in data.skipped:
        _note(procs.master, f"skipped unreadable validation image {s}")
    if not data.val:
        _note(procs.master, "no validation images: the model is not measured during or after training; pass --val DATA")
    return data, workers


def resume(saved: dict[str, Any], path: Path, nets: Networks, cfg: TrainConfig, procs: Processes) -> RunState:
    """Continue from a checkpoint (`saved`, read from `path`): its weights and optimizer states into `nets`,
    the global RNG states restored, and the run's state as it was saved."""
    if AutoencoderConfig.from_dict(saved["model_config"]) != nets.model.config:
        raise ValueError(f"{path} holds a different architecture than this run's settings")
    nets.model.load_state_dict(saved["model"])
    nets.ema.load_state_dict(saved["ema"])
    nets.opt.load_state_dict(saved["optimizer"])
    if nets.disc is not None:
        if saved.get("discriminator") is None:
            raise ValueError(f"{path} has no discriminator, but this run has --gan-weight > 0")
        nets.disc.load_state_dict(saved["discriminator"])
        nets.disc_opt.load_state_dict(saved["disc_optimizer"])
    schedule = Schedule.of(cfg.steps, cfg.warmup, cfg.min_lr_ratio)
    if cfg.seconds:  # a time budget keeps its calibrated schedule; otherwise --steps sets it, as in a fresh run
        schedule = Schedule(**saved["schedule"]) if "schedule" in saved else Schedule.of(saved["steps"], cfg.warmup, cfg.min_lr_ratio)
    _set_rng_state(saved["rng"])
    if saved["world_size"] != procs.world:
        _note(procs.master, f"resuming a {saved['world_size']}-process run with {procs.world}: the data order changes")
    return RunState(saved["step"], schedule, saved["skipped_steps"], saved["bad_in_a_row"], saved["initial_metrics"] or None)


def _distribute(nets: Networks, cfg: TrainConfig, procs: Processes) -> None:
    """Set `nets.forward`, the training forward, and under torchrun wrap it and the discriminator in DDP.
    Scale equivariance decodes a second, downsampled latent: one module runs both decodes, so DDP syncs both."""
    nets.se_factors = scale_factors(cfg.resolution // nets.model.factor) if cfg.loss.scale_equivariance > 0 else []
    nets.forward = _ScaleEquivariantForward(nets.model) if nets.se_factors else nets.model
    if procs.distributed:
        ids = [procs.device.index] if procs.device.type == "cuda" else None
        nets.forward = nn.parallel.DistributedDataParallel(nets.forward, device_ids=ids)
        if nets.disc is not None:
            nets.crit.discriminator = nn.parallel.DistributedDataParallel(nets.disc, device_ids=ids)


def _start_run_folder(run: Path, cfg: TrainConfig, model: Autoencoder, procs: Processes, workers: int) -> Any:
    """Mark the folder as vaekit's, write config.json (every setting of the run) and open TensorBoard's writer."""
    mark_output_folder(run, "vaekit train")
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    _write_json(run / "config.json", {"train": cfg.to_dict(), "model": model.config.to_dict(), "loss_convention": LOSS_CONVENTION,
                                      "world_size": procs.world, "precision": procs.precision, "workers": workers,
                                      "versions": _versions()})  # fmt: skip
    return _tensorboard(run / "logs")


# ---- a step ----------------------------------------------------------------------------------


def _set_learning_rates(nets: Networks, cfg: TrainConfig, lr_scale: float) -> float:
    """Both optimizers at `lr_scale` times their peak (the schedule's value at this step); returns the model's lr."""
    lr = cfg.lr * lr_scale
    for group in nets.opt.param_groups:
        group["lr"] = lr
    for group in nets.disc_opt.param_groups if nets.disc_opt else []:
        group["lr"] = nets.disc_lr * lr_scale
    return lr


def micro_steps(batches: Iterator, nets: Networks, cfg: TrainConfig, procs: Processes, step: int, gan: bool,
                unreadable: set[str]) -> tuple[bool, dict[str, float], int]:  # fmt: skip
    """Forward and backward over one step's `cfg.grad_accum` micro-batches, their gradients adding up in
    .grad (the discriminator's too, once `gan`). Returns whether every loss was finite, the logged terms
    (means over the micro-batches) and how many images this rank trained on. An unreadable image is noted
    the first time it is met, and added to `unreadable`.

    With accumulation the adaptive GAN weight is decided once, from the whole step's gradients, so that
    accumulation equals a larger batch: the generator loss's gradients are kept apart until then."""
    crit, last = nets.crit, cfg.grad_accum - 1
    defer = gan and cfg.grad_accum > 1 and cfg.loss.adaptive_gan_weight
    g_grads: list[torch.Tensor | None] = []  # the generator loss's gradients, summed over micro-steps
    finite, step_logs, images = True, {}, 0
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        for s in batch.skipped:
            if s not in unreadable:
                unreadable.add(s)
                _note(True, f"skipped unreadable image {s}")
        x = batch.images.to(procs.device, non_blocking=True).float() / 127.5 - 1.0
        # Posterior noise keyed by the sample's place in the step: accumulation = a larger batch.
        noise = [_generator(cfg.seed, procs.rank, step, micro * cfg.batch_size + i, procs.device) for i in range(len(x))]
        with _maybe_no_sync(nets.forward, micro != last):
            with procs.autocast:
                if nets.se_factors:  # 2x and 4x in turn, by step: a resumed run continues the same sequence
                    recon, posterior, se = nets.forward(x, noise, nets.se_factors[step % len(nets.se_factors)])
                else:
                    (recon, posterior), se = nets.forward(x, sample_posterior=True, generator=noise), None
            if defer:
                loss, g_loss, logs = crit.without_gan(x, recon.float(), posterior, step, se)
                grads = torch.autograd.grad(g_loss / cfg.grad_accum, nets.params, retain_graph=True, allow_unused=True)
                g_grads = [_sum(a, b) for a, b in zip(g_grads, grads)] if g_grads else list(grads)
            else:
                loss, logs = crit(x, recon.float(), posterior, step, last_layer=nets.last_layer, se=se)
            (loss / cfg.grad_accum).backward()
        if gan:
            with _maybe_no_sync(crit.discriminator, micro != last):
                with procs.autocast:
                    d_loss, d_logs = crit.discriminator_loss(x, recon)
                (d_loss / cfg.grad_accum).backward()
            logs.update(d_logs)
        finite &= bool(torch.isfinite(loss)) and (not gan or bool(torch.isfinite(d_loss)))
        for k, v in logs.items():
            step_logs[k] = step_logs.get(k, 0.0) + float(v) / cfg.grad_accum
        images += len(x)
    if defer:
        _add_deferred_gan_term(nets.params, g_grads, nets.last_layer, cfg.loss.gan_weight, x[0].numel(), step_logs, procs.distributed)
    return finite, step_logs, images


def _update(nets: Networks, cfg: TrainConfig, step: int, gan: bool) -> None:
    """The optimizers' step (the discriminator's once `gan`), then the EMA's, its decay warmed up as (1+t)/(10+t)."""
    nets.opt.step()
    if gan:
        nets.disc_opt.step()
    ema_update(nets.ema, nets.model, min(cfg.ema_decay, (1 + step) / (10 + step)))


# ---- checkpoints and the end -----------------------------------------------------------------


def checkpoint_state(state: RunState, nets: Networks, cfg: TrainConfig, world: int) -> dict[str, Any]:
    """What a checkpoint holds: everything `resume` needs to continue bit for bit, and what the run was."""
    return {
        "step": state.step, "steps": state.schedule.total, "schedule": dataclasses.asdict(state.schedule),
        "loss_convention": LOSS_CONVENTION, "model": nets.model.state_dict(), "ema": nets.ema.state_dict(),
        "optimizer": nets.opt.state_dict(), "discriminator": nets.disc.state_dict() if nets.disc is not None else None,
        "disc_optimizer": nets.disc_opt.state_dict() if nets.disc_opt is not None else None,
        "rng": _rng_state(), "skipped_steps": state.skipped_steps, "bad_in_a_row": state.bad_in_a_row,
        "initial_metrics": state.initial_metrics, "model_config": nets.model.config.to_dict(),
        "train": cfg.to_dict(), "world_size": world,
    }  # fmt: skip


def checkpoint(run: Path, state: RunState, nets: Networks, cfg: TrainConfig, procs: Processes) -> Path:
    """RUN/checkpoints/step_XXXXXXX.pt of this step: rank 0 writes it, all ranks wait for it."""
    if procs.master:
        save_checkpoint(run / "checkpoints", state.step, checkpoint_state(state, nets, cfg, procs.world), cfg.keep_checkpoints)
    if procs.distributed:
        dist.barrier()
    return run / "checkpoints" / f"step_{state.step:07d}.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step_*.pt"))
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write step_XXXXXXX.pt atomically (temp file + rename), then delete all but the last `keep`."""
    path = folder / f"step_{step:07d}.pt"
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def _final_model(ema: Autoencoder, data: TrainingData, cfg: TrainConfig, device: torch.device, run: Path, writer: Any,
                 step: int) -> dict[str, Any]:  # fmt: skip
    """Save RUN/model, the EMA weights, and return their metrics (metrics.json's "latent_bn" and "final")."""
    metrics = {}
    if ema.config.latent_norm == "patch_bn" and not cfg.decoder_only:  # FLUX.2's layout: its normalisation is data
        metrics["latent_bn"] = fit_latent_bn(ema, data, cfg.batch_size, cfg.seed, device)
    ema.save(str(run / "model"))
    if data.val:
        metrics["final"] = validate(ema, data, device, run / "samples" / f"step_{step:07d}.png", writer, step)
    return metrics


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


# ---- the model, the schedule, validation, and small helpers ---------------------------------


def build_model(cfg: TrainConfig) -> Autoencoder:
    """The model to train: a checkpoint (--init), a JSON config, or a preset with --kind/--latent-channels.

    A model trained from scratch is nobody's published family, so its `family` is cleared and its
    latent normalisation reset to identity (measure it with `vaekit analyze`; a FLUX.2-layout model
    fits its BatchNorm at the end); --init keeps the checkpoint's, and a --config file is taken as written."""
    if cfg.init:
        if cfg.kind or cfg.latent_channels or cfg.config:
            raise ValueError("--init takes the architecture from the checkpoint; leave out --kind, --latent-channels and --config")
        return load(cfg.init, dtype=torch.float32)
    if cfg.config is not None:
        config = AutoencoderConfig.from_dict(cfg.config if isinstance(cfg.config, dict) else json.loads(Path(cfg.config).read_text()))
    else:
        config = preset(cfg.preset).replace(family="", scaling_factor=1.0, shift_factor=0.0)
        if config.latent_norm == "channel":  # a published family's statistics describe its latents, not these
            config = config.replace(latent_norm="affine", latents_mean=(), latents_std=())
    if cfg.kind:
        config = config.replace(kind=cfg.kind)
    if cfg.latent_channels:
        config = config.replace(latent_channels=cfg.latent_channels)
    return Autoencoder(config)


@dataclass(frozen=True)
class Schedule:
    """The learning rate's factor at each step: linear warm-up over `warmup` steps, then cosine decay
    from 1 to `min_ratio` at `total`. A time budget's later measurements move `total` mid-run through
    `retarget`, which keeps the curve continuous and monotone: warm-up keeps its length, and a decay
    already under way continues from where it is to the new end."""

    total: int
    warmup: int
    min_ratio: float
    start: int  # the decay runs from `start`, where its progress is `start_progress`, to `total`
    start_progress: float = 0.0

    @classmethod
    def of(cls, total: int, warmup: int, min_ratio: float) -> "Schedule":
        """Warm-up capped at a quarter of the run, so a short or time-budgeted run still reaches its peak and decays."""
        warmup = max(1, min(warmup, total // 4))
        return cls(total, warmup, min_ratio, start=warmup)

    def progress(self, step: int) -> float:
        return min(1.0, self.start_progress + (1.0 - self.start_progress) * (step - self.start) / max(1, self.total - self.start))

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def retarget(self, step: int, total: int) -> "Schedule":
        if step <= self.start:  # the decay has not begun: only its end moves
            return dataclasses.replace(self, total=total)
        return dataclasses.replace(self, total=total, start=step, start_progress=self.progress(step))


class TimeBudget:
    """Fits a --seconds run's step count to its budget, from the speed the run measures.

    The speed of steps 2-6 sets the first count and the schedule (warm-up capped at a quarter of it). The
    speed is measured again at a fifth of the run and after every tenth of it, each time retargeting the
    schedule (`Schedule.retarget`: the learning rate never steps back, the decay ends at the new last step).
    A measurement is the mean time of the steps since the one before, plus the time per step spent outside
    steps (validations, checkpoints, logs) since the first count. Recent steps decide, so a slow start
    (another process briefly loading the machine) is outgrown: with a single measurement, from the first
    count on and at a fifth of the count that slow start had made too small, a run kept that speed to the
    end and stopped "done" well inside its budget (the quickstart at 233 of 285 s, 533 steps of ~1030).
    A run that turns slower than measured shrinks its count; `out_of_time` still stops it at the budget.

    Every rank measures at the same steps and takes rank 0's count. A resumed run (`calibrated`) keeps the
    schedule it saved and only stops in time."""

    first_steps = 6  # steps 2-6 set the first count (the first step runs slow)
    min_window = 5  # steps between two measurements, at least

    def __init__(self, seconds: float, started: float, reserve: float, max_steps: int, warmup: int, min_ratio: float,
                 eval_seconds: float = 0.0, eval_every: int = 0, distributed: bool = False, calibrated: bool = False):  # fmt: skip
        self.end = started + seconds - reserve  # the loop stops by here: the rest is the final validation and saving
        self.max_steps, self.warmup, self.min_ratio, self.distributed = max_steps, warmup, min_ratio, distributed
        self.eval_seconds, self.eval_every = eval_seconds, eval_every  # expected validation time, until one is timed
        self.calibrated = calibrated
        self.first: tuple[float, int] = (0.0, 0)  # (time, step) of the first count
        self.last = 0  # the step of the last measurement
        self.next = 0  # the step of the next one; 0: none

    def out_of_time(self) -> bool:
        return self.calibrated and time.time() > self.end

    def fit(self, step: int, step_times: list[float], schedule: Schedule) -> Schedule:
        """After `step` (step_times[-1] is its time, step_times[0] the run's first since start or resume):
        the schedule to continue with, a new one at the first count and at each measurement."""
        if not self.calibrated:
            if len(step_times) < self.first_steps:
                return schedule
            per_step = float(np.mean(step_times[1:])) + self._eval_per_step()
            schedule = Schedule.of(self._steps_that_fit(step, per_step), self.warmup, self.min_ratio)
            self.calibrated, self.first, self.last = True, (time.time(), step), step
            self.next = max(step + 1, schedule.total // 5)
            return schedule
        if step != self.next:  # the same step on every rank: the broadcast cannot deadlock
            return schedule
        t0, s0 = self.first
        first = len(step_times) - step  # step_times index of step 0 (negative after a resume)
        stepping = sum(step_times[first + s0:])  # seconds inside steps since the first count
        outside = max(0.0, time.time() - t0 - stepping) / (step - s0)
        if self.eval_every and (step - 1) // self.eval_every == (s0 - 1) // self.eval_every:
            outside += self._eval_per_step()  # no validation yet (steps s0 .. step-1 validate after their fit)
        per_step = float(np.mean(step_times[first + self.last:])) + outside
        total = self._steps_that_fit(step, per_step)
        self.last, self.next = step, step + max(self.min_window, total // 10)
        return schedule.retarget(step, total) if total != schedule.total else schedule

    def _eval_per_step(self) -> float:
        return self.eval_seconds / self.eval_every if self.eval_every else 0.0

    def _steps_that_fit(self, step: int, per_step: float) -> int:
        """The step count (at most --steps) that ends the loop by `end` at this speed."""
        left = self.end - time.time()
        return _broadcast_int(max(step, min(self.max_steps, step + int(left / max(per_step, 1e-9)))), self.distributed)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model. The trainer warms the decay up as (1+t)/(10+t), so
    short runs are not dominated by the random initial weights."""
    e, m = list(ema.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


@torch.no_grad()
def fit_latent_bn(model: Autoencoder, data: TrainingData, batch_size: int, seed: int, device: torch.device,
                  images: int = 512) -> dict[str, Any]:  # fmt: skip
    """Set a FLUX.2-layout model's latent BatchNorm statistics (what `normalize` divides by) to the
    per-channel mean and variance of its 2x2-patchified posterior means over `images` training crops,
    drawn from a stream of their own (seed + 1). Returns what was measured, for metrics.json."""
    batches = iter(data.loader(batch_size, seed + 1))
    total, squares, count, seen = 0.0, 0.0, 0, 0
    while seen < images:
        x = next(batches).images.to(device).float() / 127.5 - 1.0
        z = torch.nn.functional.pixel_unshuffle(model.encode(x).mean.double(), 2)
        total, squares = total + z.sum(dim=(0, 2, 3)), squares + z.pow(2).sum(dim=(0, 2, 3))
        count, seen = count + z[:, 0].numel(), seen + len(x)
    mean = total / count
    var = (squares / count - mean**2).clamp_min(0) * count / max(count - 1, 1)  # unbiased, as BatchNorm keeps it
    model.bn.running_mean.copy_(mean)
    model.bn.running_var.copy_(var)
    return {"images": seen, "crop": list(x.shape[-2:]), "channels": len(mean),
            "mean_range": [float(mean.min()), float(mean.max())], "std_range": [float(var.min().sqrt()), float(var.max().sqrt())]}  # fmt: skip


@torch.no_grad()
def validate(model: Autoencoder, data: TrainingData, device: torch.device, grid: Path | None = None,
             writer: Any = None, step: int = 0, batch_size: int = 8) -> dict[str, Any]:  # fmt: skip
    """PSNR/SSIM (vaekit.metrics, on uint8) of the posterior-mode reconstructions of the validation
    images; writes a grid of the first 8 (originals above, reconstructions below)."""
    names = [n for n, _ in data.val]
    originals = np.stack([im for _, im in data.val])
    recons = []
    for i in range(0, len(originals), batch_size):
        x = torch.cat([to_tensor(im) for im in originals[i : i + batch_size]]).to(device)
        recons.append(to_uint8(model(x)[0]))
    recons = np.concatenate(recons)
    p, s = psnr(recons, originals), ssim(recons, originals)
    result = {"psnr": float(p.mean()), "ssim": float(s.mean()), "n": len(names),
              "per_image": [{"name": n, "psnr": float(a), "ssim": float(b)} for n, a, b in zip(names, p, s)]}  # fmt: skip
    if grid is not None:
        write_image(grid, np.concatenate([np.concatenate(list(originals[:8]), 1), np.concatenate(list(recons[:8]), 1)], 0))
    if writer is not None:
        writer.add_scalar("val/psnr", result["psnr"], step)
        writer.add_scalar("val/ssim", result["ssim"], step)
    return result


class _ScaleEquivariantForward(nn.Module):
    """The autoencoder's training forward (posterior sample, decode) plus scale equivariance's pair:
    the same latent downsampled by `downscale` and decoded, and the image downsampled alike."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, generator: list[torch.Generator], downscale: int):
        posterior = self.model.encode(x)
        z = posterior.sample(generator)
        recon = self.model.decode(z, size=posterior.image_size)
        return recon, posterior, (self.model.decode(downsample(z, downscale)), downsample(x, downscale))


def _generator(seed: int, rank: int, step: int, sample: int, device: torch.device) -> torch.Generator:
    """The posterior-sampling generator of one sample of a step: keyed, so resume needs no state for it."""
    g = torch.Generator(device)
    g.manual_seed(int(np.random.SeedSequence((seed, rank, step, sample)).generate_state(1, np.uint64)[0] >> 1))
    return g


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _add_deferred_gan_term(
    params: list[nn.Parameter], g_grads: list[torch.Tensor | None], last_layer: nn.Parameter, gan_weight: float,
    pixels: int, logs: dict[str, float], distributed: bool,
) -> None:  # fmt: skip
    """Finish a step whose micro-steps backpropagated the loss without its GAN term and collected the
    generator loss's gradients apart: LDM's adaptive weight from the whole step's gradients (under DDP,
    all ranks'), then that weight times the generator's gradients added in. The same gradient as one
    batch of every micro-batch together; costs one more backward pass per micro-step."""
    if distributed:  # DDP averaged the .grad part over ranks; average this part too
        present = [g for g in g_grads if g is not None]
        flat = torch.cat([g.flatten() for g in present]) / dist.get_world_size()
        dist.all_reduce(flat)
        for g, t in zip(present, flat.split([g.numel() for g in present])):
            g.copy_(t.view_as(g))
    i = next(i for i, p in enumerate(params) if p is last_layer)
    # The KL term has no path to the decoder, so last_layer.grad is the reconstruction terms' gradient.
    weight = gan_weight * float(gan_weight_from_grads(last_layer.grad, g_grads[i], scale=pixels))
    for p, g in zip(params, g_grads):
        if g is not None:
            p.grad = g * (weight / pixels) if p.grad is None else p.grad.add_(g, alpha=weight / pixels)
    logs["gan_weight"] = weight
    logs["loss"] += weight / pixels * logs["gan_g"]


def _convert_old_weights(cfg: TrainConfig, state: dict[str, Any], master: bool) -> TrainConfig:
    """Checkpoints from before LOSS_CONVENTION weighed the KL (and a fixed GAN weight) against a mean pixel
    loss: continue with the same strengths in LDM's terms (x C*H*W of the run's crops), except for weights
    given anew, which are taken as LDM's. Each change is stated."""
    saved, model = state["train"]["loss"], state["model_config"]
    pixels = model.get("in_channels", 3) * state["train"]["resolution"] ** 2
    names = ["kl_weight"] if model.get("kind", "vae") == "vae" else []
    names += [] if saved.get("adaptive_gan_weight", True) else ["gan_weight"]
    changes = {}
    for name in names:
        old, given = saved[name], getattr(cfg.loss, name)
        if old == 0:
            continue
        if given != old:
            _note(master, f"this run's checkpoints predate LDM-scaled loss weights; {name} {given:g} is taken as LDM's")
            continue
        changes[name] = old * pixels
        _note(master, f"this run's checkpoints predate LDM-scaled loss weights: its {name} {old:g} (against a mean pixel "
                      f"loss) continues as {old * pixels:g} in LDM's terms (x {pixels} values per crop), the same strength")  # fmt: skip
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **changes))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _agree(flags: list[bool], distributed: bool) -> list[bool]:
    """Any rank's flag becomes every rank's, so all ranks skip, stop or finish on the same step."""
    if not distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _broadcast_int(value: int, distributed: bool) -> int:
    if not distributed:
        return value
    t = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return int(t.item())


def _maybe_no_sync(module: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync for the micro-steps of gradient accumulation before the last one."""
    return module.no_sync() if skip_sync and isinstance(module, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """--deterministic: PyTorch's deterministic algorithms (cuDNN and cuBLAS included) for the training
    steps; an op without one stops the run with PyTorch's error naming it. The previous mode is restored."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Any]:
    """The first Ctrl-C only asks the loop to stop after the current step (it then saves a
    checkpoint); a second one interrupts at once."""
    requested = [False]

    def handler(signum: int, frame: Any) -> None:
        if requested[0]:
            raise KeyboardInterrupt
        requested[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        previous = None
    try:
        yield lambda: requested[0]
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _reserve(eval_seconds: float) -> float:
    """Seconds a time-budgeted run keeps for the final validation, checkpoint and model."""
    return 1.5 * eval_seconds + 1.0


def _default_workers(data: TrainingData, world: int) -> int:
    in_memory = isinstance(data.dataset, CropDataset) and all(isinstance(i, np.ndarray) for i in data.dataset.items)
    return 0 if in_memory else min(4, max(1, (os.cpu_count() or 1) // world - 1))


def _check(cfg: TrainConfig) -> None:
    if not cfg.data or not cfg.out:
        raise ValueError("training needs --data and --out")
    for name in ("steps", "batch_size", "grad_accum", "resolution", "keep_checkpoints", "log_every", "val_resolution"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 < cfg.min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {cfg.min_scale}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.precision not in (None, "fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.seconds is not None and cfg.seconds <= 0:
        raise ValueError(f"seconds must be positive, got {cfg.seconds}")
    if cfg.disc_lr is not None and cfg.disc_lr <= 0:
        raise ValueError(f"disc_lr must be positive, got {cfg.disc_lr}")
    for name in ("betas", "disc_betas"):
        if len(getattr(cfg, name)) != 2 or not all(0 <= b < 1 for b in getattr(cfg, name)):
            raise ValueError(f"{name} must be two numbers in [0, 1), got {list(getattr(cfg, name))}")


def _versions() -> dict[str, str]:
    from . import __version__

    return {"vaekit": __version__, "torch": torch.__version__, "numpy": np.__version__}


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'vaekit[train]'") from None
    return SummaryWriter(str(folder))


# The loss's "ssim" term is 1 - SSIM: logged as train/ssim_loss, not to be read as val/ssim, the metric.
_LOGGED_AS = {"ssim": "ssim_loss"}


def _log(writer: Any, run: Path, step: int, scalars: dict[str, float]) -> None:
    """The step's scalars as TensorBoard's train/* and as one line of RUN/log.jsonl."""
    scalars = {_LOGGED_AS.get(k, k): v for k, v in scalars.items()}
    for k, v in scalars.items():
        writer.add_scalar(f"train/{k}", v, step)
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in scalars.items()}}) + "\n")


def _note(enabled: bool, message: str) -> None:
    """One line on stderr, between the progress bar's redraws."""
    if enabled:
        from tqdm import tqdm

        tqdm.write(f"vaekit train: {message}", file=sys.stderr)
