"""Hunyuan Image's VAE: diffusers' AutoencoderKLHunyuanImage names (the model's own) and the names of
Tencent's release (`hyimage/models/vae/hunyuanimage_vae.py`: `encoder.down.{level}.block.{i}`,
`.downsample.conv`, `mid.block_1` / `mid.attn_1` with `q, k, v, proj_out`), which ComfyUI's loader
keeps. Tencent's decoder counts `up.{level}` from the latent side, unlike LDM's: a file with
`decoder.up.0.upsample` is this layout, never LDM's (whose up.0 is the full-resolution level)."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import torch
from torch import Tensor

from ..config import AutoencoderConfig

ARCH = "hunyuanimage"
DIFFUSERS_CLASSES = ("AutoencoderKLHunyuanImage",)
FAMILY = "hunyuanimage"
LOAD_DTYPE = torch.float32  # its authors run it in fp32 (hyimage's load_vae), whatever the file stores
NO_WEIGHTS = None
DIFFUSERS_FRAMES = False

# (native part, flat list, Tencent's nested list, its resample) for the encoder and the decoder.
_PARTS = (("encoder", "down_blocks", "down", "downsample"), ("decoder", "up_blocks", "up", "upsample"))
_MID = {"mid_block.resnets.0.": "mid.block_1.", "mid_block.resnets.1.": "mid.block_2.", "mid_block.attentions.0.": "mid.attn_1."}
_ATTENTION = {"to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "proj.": "proj_out.", "norm.": "norm."}


def config_from_diffusers(d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
    if not (d.get("downsample_match_channel", True) and d.get("upsample_match_channel", True)):
        raise NotImplementedError("downsample_match_channel/upsample_match_channel false is not implemented (no release uses it)")
    channels = tuple(d["block_out_channels"])
    levels = int(math.log2(d["spatial_compression_ratio"]))
    _check_widths(channels, levels)
    config = AutoencoderConfig(
        arch=ARCH, in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), block_channels=channels,
        layers_per_block=d["layers_per_block"], latent_channels=d["latent_channels"], use_quant_conv=False,
        use_post_quant_conv=False, downsample_levels=None if levels == len(channels) - 1 else levels,
        scaling_factor=float(d.get("scaling_factor") or 1.0),
    )  # fmt: skip
    return config, True


def _check_widths(channels: tuple[int, ...], levels: int) -> None:
    """Levels not joined by a resampling must share one width (the blocks never change width): the
    encoder's last levels, and the decoder's, which are the encoder's first ones reversed."""
    for order, where in ((channels, "last"), (channels[::-1], "first")):
        if any(a != b for i, (a, b) in enumerate(zip(order, order[1:])) if i >= levels):
            raise NotImplementedError(f"block_out_channels {list(channels)}: with {levels} resamplings the {where} "
                                      f"{len(channels) - levels} levels must share one width")


def diffusers_config(c: AutoencoderConfig) -> dict[str, Any]:
    return {
        "_class_name": DIFFUSERS_CLASSES[0], "_diffusers_version": "0.36.0", "block_out_channels": list(c.block_channels),
        "downsample_match_channel": True, "in_channels": c.in_channels, "latent_channels": c.latent_channels,
        "layers_per_block": c.layers_per_block, "out_channels": c.out_channels, "sample_size": 384,
        "scaling_factor": c.scaling_factor, "spatial_compression_ratio": c.factor, "upsample_match_channel": True,
    }  # fmt: skip


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    return config.kind == "vae"  # the class has a Gaussian posterior; vaekit's AE variant has none


def recognise(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if any(k.startswith("decoder.up.0.upsample.") for k in keys):
        return "Tencent Hunyuan Image layout"
    if any(re.match(r"encoder\.down_blocks\.\d+\.norm1\.weight$", k) for k in keys):
        return "diffusers AutoencoderKLHunyuanImage naming"
    return None


def _nested_names(t: dict[str, Tensor]) -> dict[str, str]:
    """Native flat-list prefix -> Tencent's nested prefix, read off the native names: a flat entry
    with `norm1` is a ResNet block of the current level; any other is the resampling that ends it."""
    names = {}
    for part, flat, nested, resample in _PARTS:
        level, block = 0, 0
        for i in sorted({int(m[1]) for k in t if (m := re.match(rf"{part}\.{flat}\.(\d+)\.", k))}):
            if f"{part}.{flat}.{i}.norm1.weight" in t:
                names[f"{part}.{flat}.{i}."], block = f"{part}.{nested}.{level}.block.{block}.", block + 1
            else:
                names[f"{part}.{flat}.{i}."], level, block = f"{part}.{nested}.{level}.{resample}.", level + 1, 0
    return names


def _tencent_name(key: str, nested: dict[str, str]) -> str:
    prefix = next((p for p in nested if key.startswith(p)), None)
    if prefix is not None:
        return nested[prefix] + key[len(prefix):].replace("conv_shortcut.", "nin_shortcut.")
    for part in ("encoder.", "decoder."):
        for native, tencent in _MID.items():
            if key.startswith(part + native):
                rest = key[len(part + native):]
                if native.startswith("mid_block.attentions"):
                    rest = next(t + rest[len(n):] for n, t in _ATTENTION.items() if rest.startswith(n))
                return part + tencent + rest
    return key


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    nested = _nested_names(tensors)
    return {_tencent_name(k, nested): t for k, t in tensors.items()}


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return dict(tensors)  # the model's names are diffusers'


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    if not any(k.startswith("decoder.up.0.") for k in tensors):
        return dict(tensors)  # diffusers names already
    native = {}
    for part, flat, nested, resample in _PARTS:  # Tencent's (level, block) -> the flat index, in order
        entries = sorted({(int(m[1]), m[2] is None, int(m[2] or 0))
                          for k in tensors if (m := re.match(rf"{part}\.{nested}\.(\d+)\.(?:block\.(\d+)|{resample})\.", k))})  # fmt: skip
        for i, (level, is_resample, block) in enumerate(entries):
            tencent = f"{part}.{nested}.{level}.{resample if is_resample else f'block.{block}'}."
            native[tencent] = f"{part}.{flat}.{i}."
    mids = {part + t: part + n for part in ("encoder.", "decoder.") for n, t in _MID.items()}
    out = {}
    for k, t in tensors.items():
        prefix = next((p for p in native if k.startswith(p)), None)
        if prefix is not None:
            out[native[prefix] + k[len(prefix):].replace("nin_shortcut.", "conv_shortcut.")] = t
            continue
        prefix = next((p for p in mids if k.startswith(p)), None)
        if prefix is not None:
            rest = k[len(prefix):]
            if mids[prefix].endswith("attentions.0."):
                rest = next(n + rest[len(a):] for n, a in _ATTENTION.items() if rest.startswith(a))
            out[mids[prefix] + rest] = t
            continue
        out[k] = t
    return out


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    """The architecture from native-named tensor shapes. The encoder's flat list is runs of ResNet
    blocks separated by resamplings: each run is a level, but the last run holds every level after the
    last resampling (they share one width), so it splits by the first run's length."""
    runs: list[list[int]] = [[0, 0]]  # [width, blocks]
    for i in sorted({int(m[1]) for k in t if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))}):
        if f"encoder.down_blocks.{i}.norm1.weight" in t:
            runs[-1] = [t[f"encoder.down_blocks.{i}.conv1.weight"].shape[0], runs[-1][1] + 1]
        else:
            runs.append([0, 0])
    layers = runs[0][1]
    levels = [width for width, _ in runs[:-1]] + [runs[-1][0]] * (runs[-1][1] // layers)
    latent = t["decoder.conv_in.weight"].shape[1]
    config = AutoencoderConfig(
        arch=ARCH, in_channels=t["encoder.conv_in.weight"].shape[1], out_channels=t["decoder.conv_out.weight"].shape[0],
        block_channels=tuple(levels), layers_per_block=layers, latent_channels=latent, use_quant_conv=False,
        use_post_quant_conv=False, downsample_levels=None if len(runs) == len(levels) else len(runs) - 1,
        kind="vae" if t["encoder.conv_out.weight"].shape[0] == 2 * latent else "ae",
    )  # fmt: skip
    return config, f"config inferred from tensor shapes ({ARCH} layout)"
