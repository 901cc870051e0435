"""Preview models of a teacher's latent space (docs/PREVIEWS.md): how one is made, filled and saved.

    teacher = vaekit.load("ae.safetensors", family="flux1")
    preview = preview_model(teacher)                          # taesd-shaped, random weights, 1.2M parameters a half
    # train it: preview.decode(teacher.to_latent(x)) ~ x, preview.encode(x) ~ teacher.to_latent(x)
    vaekit.save(preview, "taeflux.safetensors", format="single-file")   # vaekit.load reads it back, teacher and all
    vaekit.save(preview, "out/taeflux", format="pair")        # taesd.py's out/taeflux_encoder/_decoder.safetensors

    linear = linear_preview(factors, bias, teacher)           # ComfyUI's latent_rgb_factors (C x 3) and _bias
    print(comfyui_factors(linear))                            # in ComfyUI's python-list form; parse_comfyui_factors reads it

A preview's latents are its teacher's normalised ones (`teacher.to_latent`; FLUX.2's 128-channel patches at 1/16 too),
its own normalisation the identity, so `preview.to_latent == preview.encode(x).mode()` and `from_latent == decode`.
Its config records whose latents they are (`teacher`, `teacher_normalisation`), and `vaekit decode` refuses a latent
dataset of another space (`vaekit.config.preview_refusal`)."""

from __future__ import annotations

import ast
from typing import Sequence

import torch

from .config import AutoencoderConfig, preview_config
from .latents import weights_hash
from .layouts.taesd import linear_tensors
from .model import Autoencoder


def teacher_name(teacher: Autoencoder | AutoencoderConfig) -> str:
    """How a preview names its teacher: the teacher's family, or for a model without one (a VAE trained here)
    "weights:" and its weights hash, which the latent datasets it encodes record too."""
    if isinstance(teacher, AutoencoderConfig):
        return teacher.family
    return teacher.config.family or f"weights:{weights_hash(teacher)}"


def preview_model(teacher: Autoencoder | AutoencoderConfig, decoder_only: bool = False, linear: bool = False, width: int = 64,
                  blocks: int = 3, midblock_gn: bool | None = None, linear_skip: bool = False, seed: int = 0) -> Autoencoder:  # fmt: skip
    """A preview model of `teacher`'s latent space with random weights (seeded), in eval mode: madebyollin's tiny
    autoencoder by default, `decoder_only` without its encoder, or the `linear` preview (all zero: fit it). The
    options are `vaekit.config.preview_config`'s."""
    config = teacher if isinstance(teacher, AutoencoderConfig) else teacher.config
    config = preview_config(config, teacher_name(teacher), decoder_only=decoder_only, linear=linear, width=width, blocks=blocks,
                            midblock_gn=midblock_gn, linear_skip=linear_skip)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Autoencoder(config)
    if linear:
        torch.nn.init.zeros_(model.decoder.conv_out.weight)
        torch.nn.init.zeros_(model.decoder.conv_out.bias)
    return model.eval()


def linear_preview(factors: Sequence[Sequence[float]] | torch.Tensor, bias: Sequence[float] | torch.Tensor,
                   teacher: Autoencoder | AutoencoderConfig) -> Autoencoder:  # fmt: skip
    """The linear preview of `teacher`'s latents with ComfyUI's `latent_rgb_factors` (one row of RGB weights per latent
    channel; FLUX.2: per channel of its 32 unpacked ones, as ComfyUI's) and `latent_rgb_factors_bias`: image =
    latent @ factors + bias at latent resolution, bilinearly upsampled to the image size."""
    model = preview_model(teacher, linear=True)
    tensors = linear_tensors(factors, bias)
    want = tuple(model.decoder.conv_out.weight.shape)
    if tuple(tensors["decoder.conv_out.weight"].shape) != want:
        raise ValueError(f"this teacher's linear preview takes {want[1]} rows of {want[0]} factors (one per latent channel"
                         f"{', of its unpacked 2x2 patches' if model.config.latent_patches else ''}); got "
                         f"{tensors['decoder.conv_out.weight'].shape[1]} rows of {tensors['decoder.conv_out.weight'].shape[0]}")  # fmt: skip
    model.load_state_dict(tensors)
    return model


def comfyui_factors(model: Autoencoder) -> str:
    """A linear preview as ComfyUI's latent format writes it: `latent_rgb_factors = [...]` (a row per latent channel) and
    `latent_rgb_factors_bias = [...]`, python that `parse_comfyui_factors` (or ComfyUI's latent_formats.py) reads."""
    if not model.config.linear:
        raise ValueError("only a linear preview has latent_rgb_factors (vaekit.previews.linear_preview makes one)")
    weight, bias = model.decoder.conv_out.weight.detach()[:, :, 0, 0].t().tolist(), model.decoder.conv_out.bias.detach().tolist()
    row = lambda values: "[" + ", ".join(f"{v:8.4f}" for v in values) + "]"  # noqa: E731
    header = "    #" + "".join(f"{c:>9}" for c in "RGBA"[: len(bias)])
    return "\n".join(["latent_rgb_factors = [", header, *(f"    {row(r)}," for r in weight), "]",
                      f"latent_rgb_factors_bias = {row(bias)}"])  # fmt: skip


def parse_comfyui_factors(text: str) -> tuple[list[list[float]], list[float]]:
    """(factors, bias) from python in ComfyUI's form (`latent_rgb_factors = [...]`, `latent_rgb_factors_bias = [...]`),
    read as literals: nothing in `text` is run."""
    found = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], (ast.Name, ast.Attribute)):
            name = node.targets[0].id if isinstance(node.targets[0], ast.Name) else node.targets[0].attr
            if name in ("latent_rgb_factors", "latent_rgb_factors_bias"):
                found[name] = ast.literal_eval(node.value)
    if len(found) != 2:
        raise ValueError(f"no {' and '.join(n for n in ('latent_rgb_factors', 'latent_rgb_factors_bias') if n not in found)} "
                         "list in the text: give ComfyUI's two assignments")  # fmt: skip
    return found["latent_rgb_factors"], found["latent_rgb_factors_bias"]
