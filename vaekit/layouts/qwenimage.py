"""Qwen-Image's and Wan 2.1's VAE: diffusers' AutoencoderKLQwenImage names (the model's own, and
AutoencoderKLWan's with is_residual=False: the same network) and the Wan 2.1 names of the single files
ComfyUI users download (`qwen_image_vae.safetensors`, `wan_2.1_vae.safetensors`; Wan's own `Wan2.1_VAE.pth`
and `vae.py`, which ComfyUI's `comfy/ldm/wan/vae.py` keeps). The Wan layout is the one diffusers'
single-file loader converts (`convert_wan_vae_to_diffusers`); a test converts vaekit's files with it.

Wan 2.1 or Qwen-Image: Qwen-Image's VAE is Wan 2.1's (its decoder fine-tuned) with the same latent
statistics, so the normalisation is the same either way; the family only names the model and picks the
diffusers class a folder is written as. An AutoencoderKLWan config.json (handed here by `layouts.wan22`,
which owns the class name) is family `wan2.1` when its latents_mean/std are Wan 2.1's published ones (the
class's defaults), and is written back as AutoencoderKLWan; a single file in Wan's names cannot tell the
two apart and is taken as `qwenimage` (FAMILY below), unless `family="wan2.1"` says otherwise."""

from __future__ import annotations

import re
from typing import Any, Iterable

from torch import Tensor

from ..config import PRESETS, AutoencoderConfig

ARCH = "qwenimage"
DIFFUSERS_CLASSES = ("AutoencoderKLQwenImage",)
FAMILY = "qwenimage"  # Wan 2.1's VAE has the same architecture and the same latent statistics
LOAD_DTYPE = None
NO_WEIGHTS = None
DIFFUSERS_FRAMES = True  # AutoencoderKLQwenImage is a video VAE

# Inside one residual block: Wan's `residual` Sequential (norm, SiLU, conv, norm, SiLU, dropout, conv).
_RESIDUAL = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.",
             "conv_shortcut.": "shortcut."}  # fmt: skip
_TOP = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
        "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.", "encoder.conv_out.": "encoder.head.2.",
        "decoder.norm_out.": "decoder.head.0.", "decoder.conv_out.": "decoder.head.2."}  # fmt: skip


WAN21 = "wan2.1"  # the family written as diffusers' AutoencoderKLWan


def config_from_diffusers(d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
    wan = d.get("_class_name") == "AutoencoderKLWan"  # Wan 2.1's (is_residual false; layouts.wan22 hands it here)
    if wan and (d.get("patch_size") or 1) != 1:
        raise NotImplementedError(f"patch_size={d['patch_size']} without is_residual: not implemented")
    if wan and d.get("decoder_base_dim") not in (None, d.get("base_dim", 96)):
        raise NotImplementedError(f"decoder_base_dim={d['decoder_base_dim']} without is_residual: not implemented")
    mult = list(d.get("dim_mult", [1, 2, 4, 4]))
    if d.get("attn_scales"):
        raise NotImplementedError(f"attn_scales={d['attn_scales']}: attention inside the encoder levels is not implemented")
    if mult[0] != 1:
        raise NotImplementedError(f"dim_mult={mult}: vaekit's Qwen-Image layout needs dim_mult[0] == 1")
    base = d.get("base_dim", 96)
    channels = (d.get("in_channels", 3), d.get("out_channels", 3)) if wan else (d.get("input_channels", 3),) * 2
    published = PRESETS[WAN21].config
    if wan:  # AutoencoderKLWan's defaults are Wan 2.1's statistics: a config.json without them means those
        d = {"latents_mean": published.latents_mean, "latents_std": published.latents_std, **d}
    config = AutoencoderConfig(
        arch=ARCH, in_channels=channels[0], out_channels=channels[1],
        block_channels=tuple(base * m for m in mult), layers_per_block=d.get("num_res_blocks", 2),
        latent_channels=d.get("z_dim", 16), temporal_downsample=tuple(d.get("temperal_downsample", [False, True, True])),
        latent_norm="channel", latents_mean=tuple(d["latents_mean"]), latents_std=tuple(d["latents_std"]),
    )  # fmt: skip
    if wan and (config.latents_mean, config.latents_std) == (published.latents_mean, published.latents_std):
        config = config.replace(family=WAN21)  # Wan 2.1's latent space (a smaller network keeps its name, as presets do)
    return config, True  # its per-channel statistics


def diffusers_config(c: AutoencoderConfig) -> dict[str, Any]:
    base = c.block_channels[0]
    if c.family == WAN21:  # diffusers' AutoencoderKLWan, as Wan-AI/Wan2.1-*-Diffusers ship it
        return {
            "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0", "attn_scales": [], "base_dim": base,
            "decoder_base_dim": None, "dim_mult": [ch // base for ch in c.block_channels], "dropout": 0.0,
            "in_channels": c.in_channels, "out_channels": c.out_channels, "is_residual": False,
            "latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std), "num_res_blocks": c.layers_per_block,
            "patch_size": None, "scale_factor_spatial": c.factor, "scale_factor_temporal": 2 ** sum(c.temporal_downsample),
            "temperal_downsample": list(c.temporal_downsample), "z_dim": c.latent_channels,
        }  # fmt: skip
    return {
        "_class_name": DIFFUSERS_CLASSES[0], "_diffusers_version": "0.35.0", "attn_scales": [], "base_dim": base,
        "dim_mult": [ch // base for ch in c.block_channels], "dropout": 0.0, "input_channels": c.in_channels,
        "latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std),
        "num_res_blocks": c.layers_per_block, "temperal_downsample": list(c.temporal_downsample), "z_dim": c.latent_channels,
    }  # fmt: skip


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    return config.kind == "vae"  # the class has a Gaussian posterior; vaekit's AE variant has none


def recognise(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if any(k.startswith("encoder.downsamples.") for k in keys) and any(k.startswith("decoder.upsamples.") for k in keys):
        return "Wan 2.1 / Qwen-Image layout (ComfyUI)"
    if any(re.match(r"encoder\.down_blocks\.\d+\.norm1\.gamma$", k) for k in keys):
        return "diffusers AutoencoderKLQwenImage naming"
    return None


def _layers(keys: Iterable[str]) -> int:
    """Residual blocks per decoder level (one more than the encoder's, as in LDM)."""
    return len({m[1] for k in keys if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))})


def _wan_name(key: str, per_level: int) -> str:
    """The Wan name of one native (diffusers) name; `per_level` = decoder resnets per level + 1 resample."""
    for native, wan in _TOP.items():
        if key.startswith(native):
            return wan + key[len(native):]
    key = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.middle.{2 * int(m[2])}.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{(int(m[1]) + 1) * per_level - 1}.", key)
    m = re.match(r"^((?:encoder|decoder)\.(?:downsamples|upsamples|middle)\.\d+\.)(.*)$", key)
    if m:
        return m[1] + next((wan + m[2][len(native):] for native, wan in _RESIDUAL.items() if m[2].startswith(native)), m[2])
    return key


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    per_level = _layers(tensors) + 1
    return {_wan_name(k, per_level): t for k, t in tensors.items()}


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return dict(tensors)  # the model's names are diffusers'


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    if not any(k.startswith("encoder.downsamples.") for k in tensors):
        return dict(tensors)  # diffusers names already
    # The decoder's flat Wan list closes each level but the last with a resample, so a level holds
    # (index of the first resample) + 1 entries.
    per_level = 1 + min(int(m[1]) for k in tensors if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k)))
    return {_native_name(k, per_level): t for k, t in tensors.items()}


def _native_name(key: str, per_level: int) -> str:
    """A Wan name -> the native name: `_wan_name` inverted."""
    for native, wan in _TOP.items():
        if key.startswith(wan):
            return native + key[len(wan):]
    m = re.match(r"^(encoder\.downsamples|decoder\.upsamples|encoder\.middle|decoder\.middle)\.(\d+)\.(.*)$", key)
    if not m:
        return key
    where, index, rest = m[1], int(m[2]), m[3]
    rest = next((native + rest[len(wan):] for native, wan in _RESIDUAL.items() if rest.startswith(wan)), rest)
    if where == "encoder.downsamples":
        return f"encoder.down_blocks.{index}.{rest}"
    if where.endswith("middle"):
        return f"{where.split('.')[0]}.mid_block.{'attentions.0' if index == 1 else f'resnets.{index // 2}'}.{rest}"
    level, within = divmod(index, per_level)
    if within == per_level - 1:
        return f"decoder.up_blocks.{level}.upsamplers.0.{rest}"
    return f"decoder.up_blocks.{level}.resnets.{within}.{rest}"


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    """The architecture from native-named tensor shapes: a level is its residual blocks, closed by a
    resample (with a time convolution where video downsamples time) except the last."""
    blocks = sorted({int(m[1]) for k in t if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    dims: list[int] = []
    temporal: list[bool] = []
    counts: list[int] = []
    count = 0
    for i in blocks:
        if f"encoder.down_blocks.{i}.resample.1.weight" in t:
            temporal.append(f"encoder.down_blocks.{i}.time_conv.weight" in t)
            dims.append(width)
            counts.append(count)
            count = 0
        else:
            width, count = t[f"encoder.down_blocks.{i}.conv1.weight"].shape[0], count + 1
    dims.append(width)
    latent = t["decoder.conv_in.weight"].shape[1]
    config = AutoencoderConfig(
        arch=ARCH, in_channels=t["encoder.conv_in.weight"].shape[1], out_channels=t["decoder.conv_out.weight"].shape[0],
        block_channels=tuple(dims), layers_per_block=counts[0] if counts else count, latent_channels=latent,
        temporal_downsample=tuple(temporal), kind="vae" if t["encoder.conv_out.weight"].shape[0] == 2 * latent else "ae",
    )  # fmt: skip
    return config, f"config inferred from tensor shapes ({ARCH} layout)"
