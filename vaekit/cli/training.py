"""`vaekit train`, `vaekit quickstart` and `vaekit distill`. Train's flags are generated from the trainer's settings
(vaekit.train.TrainConfig and its LossConfig): one list of names, types, defaults and help texts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from .common import CLIError, add_command, plural


def register(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_quickstart(sub)
    _add_distill(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from ..train import TrainConfig

    p = add_command(sub, "train", cmd_train, "train or fine-tune a VAE or plain AE (resumable, multi-GPU with torchrun)")
    add_settings_flags(p, TrainConfig)


def cmd_train(args: argparse.Namespace) -> None:
    """Train an autoencoder on DATA into the run folder RUN: RUN/config.json (every setting), RUN/checkpoints/
    (atomic, the last K kept), RUN/model/ (final EMA weights, diffusers format), RUN/metrics.json (validation
    PSNR/SSIM), RUN/logs/ (TensorBoard), RUN/samples/ (validation reconstructions). DATA is a folder (searched
    recursively), an image, tar shards ('shards/{000..099}.tar'), or 'samples' (built-in photos). --resume continues
    RUN exactly where its last checkpoint stopped, with the run's saved settings (options given again override
    them); Ctrl-C saves a checkpoint first. Under `torchrun --nproc_per_node N -m vaekit.cli train ...` each process
    trains on its share of the data with DDP. See docs/TRAINING.md."""
    from ..train import train

    _run_training(lambda: train(_train_config(args)), "train")


def _train_config(args: argparse.Namespace):
    """TrainConfig from the options given; with --resume, the run's saved settings fill in the rest."""
    from ..train import TrainConfig

    given = {k: v for k, v in vars(args).items() if k not in ("command", "fn", "argv")}
    sources = [f"--{k}" for k in ("preset", "config", "init") if k in given]
    if len(sources) > 1:
        raise CLIError(f"give one of --preset, --config and --init, not {' and '.join(sources)}")
    saved = _saved_settings(given)
    if given.get("resume") and saved is None and "data" not in given:
        raise CLIError(f"no run to resume in {given['out']} (it has no config.json): start one with --data DATA")
    return _with_options(saved or TrainConfig(), given)


def _saved_settings(given: dict[str, Any]):
    """With --resume, the settings RUN/config.json saved (None when not resuming or RUN has none)."""
    from ..train import TrainConfig

    saved = Path(given["out"]) / "config.json"
    if given.get("resume") and saved.is_file():
        return TrainConfig.from_dict(json.loads(saved.read_text())["train"])
    return None


def _with_options(base, given: dict[str, Any]):
    """`base` with the flags given: LossConfig's fields into its loss, the rest into the TrainConfig."""
    from ..losses import LossConfig

    loss_names = {f.name for f in dataclasses.fields(LossConfig)}
    loss = dataclasses.replace(base.loss, **{k: v for k, v in given.items() if k in loss_names})
    return dataclasses.replace(base, loss=loss, **{k: v for k, v in given.items() if k not in loss_names})


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    from ..train import QUICKSTART

    p = add_command(sub, "quickstart", cmd_quickstart,
                    "train a small VAE on the built-in photos in a few minutes and report its held-out PSNR/SSIM")  # fmt: skip
    p.add_argument("--out", default=QUICKSTART.out, metavar="DIR", help=f"run folder (default: ./{QUICKSTART.out})")
    p.add_argument("--seconds", type=float, metavar="S", help="wall-clock budget of the training run, evaluation and saving "
                   f"included (default: {QUICKSTART.seconds:g}; the command adds ~5 s of start-up)")


def cmd_quickstart(args: argparse.Namespace) -> None:
    """Train vaekit's quickstart recipe (vaekit.train.QUICKSTART: a small 8x, 4-channel VAE) on the photos that ship
    with scikit-image and scikit-learn, within a wall-clock budget: the step count is calibrated from the measured
    speed of the first steps. Then evaluate it on the three held-out photos (chelsea, coffee, flower) at 256x256 and
    print where the model, the reconstruction grid and the metrics are."""
    from ..train import quickstart

    _run_training(lambda: quickstart(args.out, args.seconds), "quickstart")


def _run_training(run: Callable, command: str) -> None:
    from ..train import TrainingDiverged
    from ..weights import MissingWeights

    try:
        result = run()
    except KeyboardInterrupt as e:
        if str(e):
            print(f"vaekit {command}: {e}", file=sys.stderr)
        raise
    except MissingWeights as e:
        raise CLIError(e.message("train without it (--lpips-weight 0)")) from None
    except ImportError as e:  # an optional extra is missing: the message says which
        raise CLIError(str(e)) from None
    except TrainingDiverged as e:  # a RuntimeError, but no bug: the message says what to change
        raise CLIError(str(e)) from None
    if result.rank == 0:  # under torchrun, rank 0 reports
        _report(result)


def _report(result) -> None:
    """Where the run, the model, the samples and the metrics are, and the held-out scores."""
    from ..config import AutoencoderConfig
    from ..model import ARCHITECTURES

    m = result.metrics
    done = m["step"] - m["start_step"]
    if done == 0:
        print(f"nothing to train: {result.run} was already at step {m['step']} of {m['steps']} (a larger --steps continues it)")
    else:
        span = f", steps {m['start_step']}-{m['step']} of {m['steps']}" if m["start_step"] else ""
        print(f"trained {plural(done, 'step')} in {m['seconds']:.0f} s ({m['stopped']}{span}); run folder: {result.run}")
    config = AutoencoderConfig.from_dict(json.loads((result.run / "config.json").read_text())["model"])
    layout = ARCHITECTURES[config.arch].layout
    loaders = f"vaekit.load, or diffusers {layout.diffusers_config(config)['_class_name']}.from_pretrained" if layout.diffusers_can_load(config) else "vaekit.load"
    print(f"model:   {result.model}  ({loaders})")
    if "final" in m:
        grid = sorted((result.run / "samples").glob("step_*.png"))[-1]
        f, before = m["final"], m.get("initial")
        start = "before fine-tuning" if m.get("init") else "untrained"
        was = f" ({start} {before['psnr']:.2f} dB / {before['ssim']:.3f})" if before else ""
        print(f"samples: {grid}  (validation images above, reconstructions below)")
        alpha = f"; alpha PSNR {f['alpha_psnr']:.2f} dB" if "alpha_psnr" in f else ""  # an RGBA model: PSNR and SSIM are of R, G, B
        print(f"held-out {plural(f['n'], 'image')} at {m['val_resolution']}x{m['val_resolution']}: PSNR {f['psnr']:.2f} dB, "
              f"SSIM {f['ssim']:.4f}{was}{alpha}")
        for name, title in (("photos", "held-out photos"), ("crops", "native-resolution crops"), ("synthetic", "saturated colours")):
            t = m.get("against_teacher", {}).get(name)
            if t:
                lin = t["linear"]
                print(f"{title}: PSNR against the teacher's decode {t['psnr_teacher']:.2f} dB (fitted linear preview "
                      f"{lin['psnr_teacher']:.2f}), against the images {t['psnr']:.2f} ({lin['psnr']:.2f}); colour shift "
                      f"{t['colour_shift']:.1f} levels at most ({lin['colour_shift']:.1f})")  # fmt: skip
            t = m.get("against_thumbnail", {}).get(name)
            if t:
                colour = f", colour error {t['saturated_colour_error']:.1f} levels at most" if t["saturated_colour_error"] is not None else ""
                print(f"{title}: PSNR {t['psnr']:.2f} dB, {t['thumbnail_factor']}x bicubic thumbnail {t['thumbnail_psnr']:.2f} dB, "
                      f"worst image {t['worst_gap']:+.2f} dB against it ({t['worst_image']}){colour}")  # fmt: skip
        print(f"metrics: {result.run / 'metrics.json'}   logs: tensorboard --logdir {result.run / 'logs'}")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    from ..distill import DistillConfig
    from ..train import TrainConfig

    p = add_command(sub, "distill", cmd_distill, "make a preview for a VAE's latent space: a tiny autoencoder, or (--linear) "
                    "ComfyUI's latent_rgb_factors, fitted")  # fmt: skip
    p.add_argument("teacher", nargs="?", metavar="TEACHER", help="the VAE whose latent space the preview decodes (any MODEL "
                   "vaekit.load reads); not needed with --resume")
    p.add_argument("data", nargs="?", metavar="DATA", help="training images: folder, image file, tar shards, or 'samples'")
    p.add_argument("--linear", action="store_true", help="fit only the linear preview (least squares against the "
                   "teacher's decode, under a minute on a CPU): print it in ComfyUI's form and write RUN/linear_preview.safetensors")
    add_settings_flags(p, DistillConfig)
    # a preview's architecture and latents are its teacher's, and it is a deterministic AE: no KL, no scale equivariance
    add_settings_flags(p, TrainConfig, skip=("preset", "config", "kind", "latent_channels", "data", "kl_weight", "scale_equivariance"))


def cmd_distill(args: argparse.Namespace) -> None:
    """Make a preview of TEACHER's latent space: a tiny autoencoder (~1.2M parameters a half at 8x, taesd's design)
    whose latents are TEACHER's normalised latents (`to_latent`, what its diffusion model sees) and whose decoder
    draws what TEACHER would, many times faster. It trains on the trainer (time budget, --resume, EMA, torchrun) and
    writes RUN/model.safetensors (vaekit.load reads it; `vaekit decode RUN/model.safetensors LATENTS OUT` previews a
    latent dataset of TEACHER). The decoder starts from the linear preview fitted on DATA and learns what that misses
    (--no-linear-skip: taesd's plain network, which taesd.py and, without taef2's branch, AutoencoderTiny load). --linear fits the
    linear preview alone, in seconds to a minute. Defaults: on a CPU, a 300 s run on 64-pixel crops (set --seconds); on a GPU, 100k steps on 256-pixel crops
    with LPIPS (VGG weights: see docs/TRAINING.md), hours. --decoder-only trains a decoder alone. See docs/PREVIEWS.md."""
    from ..train import train

    if args.linear:
        _fit_linear(args)
        return
    _run_training(lambda: train(_distill_config(args)), "distill")


def _fit_linear(args: argparse.Namespace) -> None:
    """--linear: fit the linear preview, write RUN/linear_preview.safetensors (a vaekit preview model) and
    RUN/latent_rgb_factors.py (ComfyUI's form), and print the latter."""
    from ..checkpoints import load, save
    from ..distill import LINEAR_FIT_IMAGES, fit_linear_preview
    from ..files import check_output_folder, output_folder, write_atomic
    from ..previews import comfyui_factors

    if not (args.teacher and args.data and getattr(args, "out", None)):
        raise CLIError("--linear needs TEACHER, DATA and --out RUN")
    out = Path(args.out)
    check_output_folder(out, "--out")
    teacher = load(args.teacher)
    linear, images = fit_linear_preview(teacher, args.data, limit=getattr(args, "fit_images", LINEAR_FIT_IMAGES))
    text = comfyui_factors(linear) + "\n"
    with output_folder(out, "vaekit distill --linear"):
        save(linear, out / "linear_preview.safetensors", format="single-file")
        write_atomic(out / "latent_rgb_factors.py", lambda tmp: tmp.write_text(text))
    print(text, end="")
    print(f"fitted on {plural(images, 'image')} against the teacher's decode; wrote {out / 'linear_preview.safetensors'} "
          f"(vaekit decode takes it as MODEL) and {out / 'latent_rgb_factors.py'}")  # fmt: skip


def _distill_config(args: argparse.Namespace):
    """The recipe for this machine (vaekit.train.DISTILL_CPU / DISTILL_GPU) with the options given; --resume continues
    the run's saved settings."""
    import torch

    from ..distill import DistillConfig
    from ..train import DISTILL_CPU, DISTILL_GPU

    given = {k: v for k, v in vars(args).items() if k not in ("command", "fn", "argv", "teacher", "data", "linear")}
    base = _saved_settings(given)
    if base is None and not (args.teacher and args.data):
        raise CLIError("give TEACHER and DATA (or --resume a run folder that has a config.json)")
    if base is None:
        base = DISTILL_GPU if torch.cuda.is_available() else DISTILL_CPU
        if "steps" in given and "seconds" not in given:  # a step count replaces the CPU recipe's time budget
            base = dataclasses.replace(base, seconds=None)
    distill_names = {f.name for f in dataclasses.fields(DistillConfig)}
    distill = dataclasses.replace(base.distill, **{k: v for k, v in given.items() if k in distill_names},
                                  **({"teacher": args.teacher} if args.teacher else {}))  # fmt: skip
    options = {k: v for k, v in given.items() if k not in distill_names}
    return dataclasses.replace(_with_options(base, {**options, **({"data": args.data} if args.data else {})}), distill=distill)


# ---- train's flags from the settings' fields ----------------------------------------------------


def add_settings_flags(p: argparse.ArgumentParser, settings: type, group: str | None = None,
                       groups: dict[str, argparse._ArgumentGroup] | None = None, skip: tuple[str, ...] = ()) -> None:  # fmt: skip
    """A flag --name-with-dashes for each field of the dataclass `settings` whose metadata has a "help", in the
    argument group its metadata names (a field that is itself a dataclass: its fields, in its group), except the
    fields in `skip`. Flags left out stay out of the namespace (default SUPPRESS): `_train_config` tells given
    ones from the rest."""
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        name = f.metadata.get("group", group)
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            add_settings_flags(p, hints[f.name], name, groups, skip)
        elif "help" in f.metadata:
            if name not in groups:
                groups[name] = p.add_argument_group(name)
            groups[name].add_argument("--" + f.name.replace("_", "-"), **_flag(f, hints[f.name]))


def _flag(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """add_argument's keywords for field `f` of type `hint` (see TrainConfig's note on the metadata)."""
    meta, kind = f.metadata, _unwrap(hint)
    kw: dict[str, Any] = {"metavar": meta.get("metavar"), "choices": meta.get("choices")}
    if kind is bool:
        kw = {"action": argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"}
    elif typing.get_origin(kind) is typing.Literal:
        kw["choices"] = list(typing.get_args(kind))
    elif typing.get_origin(kind) is tuple:
        kw["type"], kw["nargs"] = typing.get_args(kind)[0], len(typing.get_args(kind))
    elif kind in (int, float):
        kw["type"] = kind
        kw["metavar"] = kw["metavar"] or ("N" if kind is int else "X")
    shown = f.default not in (None, "") and kw.get("action") != "store_true"
    default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    kw["help"] = meta["help"] + (f" (default: {default})" if shown else "")
    if meta.get("required"):
        return {**kw, "required": True}
    return {**kw, "default": argparse.SUPPRESS}


def _unwrap(hint: Any) -> Any:
    """`int | None` -> int; `str | dict | None` -> str (the type a flag gives); others as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
