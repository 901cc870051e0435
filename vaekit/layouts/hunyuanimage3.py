"""Hunyuan Image 3.0's VAE: Tencent's names (`hunyuan_image_3/autoencoder_kl_3d.py`), which are the model's own.
The release keeps them under `vae.` inside its model shards (read through `model.safetensors.index.json`); a bare
VAE state dict has them without it. diffusers has no class for this VAE, so there is no diffusers folder to read or write.

The names are those of Hunyuan Image 2.1's Tencent files (`encoder.down.{level}.block.{i}`, `.downsample.conv`,
`decoder.up.0.upsample` on the latent side, `mid.attn_1.q`): only the shapes tell them apart, 3D convolution weights
(5D) here against 2D ones (4D) there. So this layout needs the tensors' shapes (`recognise` given a mapping of names
to tensors or shapes, as `vaekit.checkpoints` gives it) and is asked before 2.1's; given names alone it says nothing.
Hunyuan Image 2.1's refiner (HunyuanVideo-1.5) has `conv1.conv.weight` and RMS `norm1.gamma`: never these names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Iterable, NoReturn

from torch import Tensor

from ..config import AutoencoderConfig

ARCH = "hunyuanimage3"
DIFFUSERS_CLASSES: tuple[str, ...] = ()
FAMILY = "hunyuanimage3"  # no other published model has these names with 3D convolutions
LOAD_DTYPE = None
NO_WEIGHTS = None
DIFFUSERS_FRAMES = False

_NO_DIFFUSERS = ("Hunyuan Image 3.0's VAE has no diffusers class, so no diffusers folder: save it as one .safetensors "
                 "file in Tencent's names (the single-file format)")  # fmt: skip


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    return False


def recognise(keys: Iterable[str] | Mapping[str, Any]) -> str | None:
    if not isinstance(keys, Mapping) or ("encoder.conv_in.weight" not in keys and "decoder.conv_in.weight" not in keys):
        return None
    conv = keys.get("encoder.conv_in.weight", keys.get("decoder.conv_in.weight"))
    nested = any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in keys)
    rank = len(conv.shape) if hasattr(conv, "shape") else len(conv)
    return "Tencent Hunyuan Image 3.0 VAE layout (3D convolutions)" if nested and rank == 5 else None


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return dict(tensors)  # Tencent's names are the model's


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return dict(tensors)


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> NoReturn:
    raise ValueError(_NO_DIFFUSERS)


def diffusers_config(config: AutoencoderConfig) -> NoReturn:
    raise ValueError(_NO_DIFFUSERS)


def config_from_diffusers(d: dict[str, Any]) -> NoReturn:
    raise NotImplementedError("diffusers has no class for Hunyuan Image 3.0's VAE")


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    """The architecture from the tensor shapes. The decoder always has ResNet blocks (layers + 1 per level), so the
    widths come from its levels, counted from the latent side; a downsampling makes a quarter of the next width, or
    an eighth when it also halves time."""
    levels = sorted({int(m[1]) for k in t if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    channels = tuple(t[f"decoder.up.{i}.block.0.conv1.weight"].shape[0] for i in reversed(levels))
    layers = len({m[1] for k in t if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", k))}) - 1
    times = [t[key].shape[0] * 8 == channels[i + 1] for i in range(len(channels))
             if (key := f"encoder.down.{i}.downsample.conv.weight") in t]  # fmt: skip
    latent = t["decoder.conv_in.weight"].shape[1]
    config = AutoencoderConfig(
        arch=ARCH, in_channels=t["encoder.conv_in.weight"].shape[1], out_channels=t["decoder.conv_out.weight"].shape[0],
        block_channels=channels, layers_per_block=layers, latent_channels=latent, use_quant_conv=False,
        use_post_quant_conv=False, downsample_levels=None if len(times) == len(channels) - 1 else len(times),
        temporal_downsample=tuple(times), kind="vae" if t["encoder.conv_out.weight"].shape[0] == 2 * latent else "ae",
    )  # fmt: skip
    return config, f"config inferred from tensor shapes ({ARCH} layout)"
