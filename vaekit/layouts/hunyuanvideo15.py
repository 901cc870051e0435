"""HunyuanVideo-1.5's causal VAE (Hunyuan Image 2.1's refiner): diffusers'
AutoencoderKLHunyuanImageRefiner and AutoencoderKLHunyuanVideo15 names (the model's own; one network on one frame,
the same names and config keys) and the names of Tencent's refiner release (`ckpts/vae/vae_refiner/pytorch_model.pt`,
tensors under `vae.`), as diffusers' scripts/convert_hunyuan_image_to_diffusers.py
(`convert_hunyuan_image_refiner_vae_checkpoint_to_diffusers`) renames them: `encoder.down.{i}.block.{j}`,
`.downsample.` / `.upsample.`, `mid.block_1` / `mid.attn_1` with `q, k, v`. That script never meets a ResNet
shortcut conv (no release changes width inside a level); `nin_shortcut` here is Tencent's name in its other VAEs.

The variant is read off config.json or the tensors, never a file name: the causal convs' `conv1.conv.weight` with
RMS `norm1.gamma` are this layout alone (Hunyuan Image 2.1's VAE has `norm1.weight` and plain convs; Wan's RMS
norms have plain `conv1.weight`; HunyuanVideo 1.0's causal convs have GroupNorm `norm1.weight`)."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

from torch import Tensor

from ..config import PRESETS, AutoencoderConfig

ARCH = "hunyuanvideo15"
DIFFUSERS_CLASSES = ("AutoencoderKLHunyuanImageRefiner", "AutoencoderKLHunyuanVideo15")
FAMILY = None  # HunyuanVideo-1.5's own files may share the names: the normalisation rule decides (the refiner's, said)
LOAD_DTYPE = None
NO_WEIGHTS = None
DIFFUSERS_FRAMES = True  # both classes take videos (N, C, T, H, W)

# Native (diffusers) name pieces <-> Tencent's, in the order to try them.
_TO_TENCENT = (
    (re.compile(r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\."), r"\1.down.\2.block.\3."),
    (re.compile(r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\."), r"\1.down.\2.downsample."),
    (re.compile(r"^(decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\."), r"\1.up.\2.block.\3."),
    (re.compile(r"^(decoder)\.up_blocks\.(\d+)\.upsamplers\.0\."), r"\1.up.\2.upsample."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.0\."), r"\1.mid.block_1."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.1\."), r"\1.mid.block_2."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\."), r"\1.mid.attn_1.\2."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\."), r"\1.mid.attn_1."),
)
_TO_NATIVE = (
    (re.compile(r"^(encoder)\.down\.(\d+)\.block\.(\d+)\."), r"\1.down_blocks.\2.resnets.\3."),
    (re.compile(r"^(encoder)\.down\.(\d+)\.downsample\."), r"\1.down_blocks.\2.downsamplers.0."),
    (re.compile(r"^(decoder)\.up\.(\d+)\.block\.(\d+)\."), r"\1.up_blocks.\2.resnets.\3."),
    (re.compile(r"^(decoder)\.up\.(\d+)\.upsample\."), r"\1.up_blocks.\2.upsamplers.0."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_1\."), r"\1.mid_block.resnets.0."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_2\."), r"\1.mid_block.resnets.1."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.([qkv])\."), r"\1.mid_block.attentions.0.to_\2."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\."), r"\1.mid_block.attentions.0."),
)


def temporal_for(levels: int, temporal_ratio: int) -> tuple[bool, ...]:
    """diffusers' rule: with `levels` spatial downsamplings, the last log2(temporal_ratio) also halve time."""
    t = int(math.log2(temporal_ratio))
    if 2**t != temporal_ratio or t > levels:
        raise NotImplementedError(f"temporal_compression_ratio {temporal_ratio}: needs a power of 2 of at most 2^{levels}")
    return tuple(i >= levels - t for i in range(levels))


def _rename(key: str, rules, shortcut: tuple[str, str]) -> str:
    for pattern, replacement in rules:
        new, n = pattern.subn(replacement, key)
        if n:
            return new.replace(*shortcut)
    return key


def _family(scaling_factor: float, class_name: str) -> str:
    """The published model a config.json is: the refiner's scale (its class's default) under the refiner's class.
    AutoencoderKLHunyuanVideo15 has the same default: HunyuanVideo-1.5's VAE, no vaekit family."""
    name = "hunyuanimage-refiner"
    same = math.isclose(scaling_factor, PRESETS[name].config.scaling_factor, rel_tol=1e-6)
    return name if same and class_name == DIFFUSERS_CLASSES[0] else ""


def config_from_diffusers(d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
    if not (d.get("downsample_match_channel", True) and d.get("upsample_match_channel", True)):
        raise NotImplementedError("downsample_match_channel/upsample_match_channel false is not implemented (no release uses it)")
    channels = tuple(d.get("block_out_channels", (128, 256, 512, 1024, 1024)))
    spatial = d.get("spatial_compression_ratio", 16)
    levels = int(math.log2(spatial))
    if 2**levels != spatial or levels > len(channels) - 1:
        raise NotImplementedError(f"spatial_compression_ratio {spatial} with {len(channels)} levels: needs a power of 2 "
                                  f"of at most 2^{len(channels) - 1}")  # fmt: skip
    scale = float(d.get("scaling_factor") or 1.03682)  # the classes' default
    config = AutoencoderConfig(
        arch=ARCH, in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), block_channels=channels,
        layers_per_block=d.get("layers_per_block", 2), latent_channels=d.get("latent_channels", 32), use_quant_conv=False,
        use_post_quant_conv=False, downsample_levels=None if levels == len(channels) - 1 else levels,
        temporal_downsample=temporal_for(levels, d.get("temporal_compression_ratio", 4)), scaling_factor=scale,
        family=_family(scale, d.get("_class_name", DIFFUSERS_CLASSES[0])),
    )  # fmt: skip
    return config, True


def diffusers_config(c: AutoencoderConfig) -> dict[str, Any]:
    """Written as the refiner's class (the image one; AutoencoderKLHunyuanVideo15 reads the same config)."""
    levels = c.downsample_levels if c.downsample_levels is not None else len(c.block_channels) - 1
    return {
        "_class_name": DIFFUSERS_CLASSES[0], "_diffusers_version": "0.36.0", "block_out_channels": list(c.block_channels),
        "downsample_match_channel": True, "in_channels": c.in_channels, "latent_channels": c.latent_channels,
        "layers_per_block": c.layers_per_block, "out_channels": c.out_channels, "scaling_factor": c.scaling_factor,
        "spatial_compression_ratio": 2**levels, "temporal_compression_ratio": 2 ** sum(c.temporal_downsample),
        "upsample_match_channel": True,
    }  # fmt: skip


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    # A Gaussian posterior, no shift, and time halved by the last downsamplings (the classes' only rule).
    levels = config.downsample_levels if config.downsample_levels is not None else len(config.block_channels) - 1
    t = sum(config.temporal_downsample)
    return (config.kind == "vae" and config.shift_factor == 0.0 and not (config.use_quant_conv or config.use_post_quant_conv)
            and config.temporal_downsample in ((), temporal_for(levels, 2**t)))  # fmt: skip


def recognise(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if not any(k.endswith(".norm1.gamma") for k in keys):
        return None
    if any(re.match(r"encoder\.down\.\d+\.block\.\d+\.conv1\.conv\.weight$", k) for k in keys):
        return "Tencent Hunyuan Image refiner / HunyuanVideo-1.5 VAE layout"
    if any(re.match(r"encoder\.down_blocks\.\d+\.resnets\.\d+\.conv1\.conv\.weight$", k) for k in keys):
        return "diffusers AutoencoderKLHunyuanImageRefiner / AutoencoderKLHunyuanVideo15 naming"
    return None


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return {_rename(k, _TO_TENCENT, (".conv_shortcut.", ".nin_shortcut.")): t for k, t in tensors.items()}


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return dict(tensors)  # the model's names are diffusers'


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {_rename(k, _TO_NATIVE, (".nin_shortcut.", ".conv_shortcut.")): t for k, t in tensors.items()}


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    """The architecture from native-named tensor shapes: each encoder level's width is its first ResNet's output, its
    downsampling (if any) makes a quarter of the next width, or an eighth when it also halves time."""
    levels = sorted({int(m[1]) for k in t if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    channels = tuple(t[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0] for i in levels)
    layers = len({m[1] for k in t if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    times = []
    for i in levels:
        key = f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight"
        if key in t:
            times.append(t[key].shape[0] * 8 == channels[i + 1])
    latent = t["decoder.conv_in.conv.weight"].shape[1]
    config = AutoencoderConfig(
        arch=ARCH, in_channels=t["encoder.conv_in.conv.weight"].shape[1], out_channels=t["decoder.conv_out.conv.weight"].shape[0],
        block_channels=channels, layers_per_block=layers, latent_channels=latent, use_quant_conv=False,
        use_post_quant_conv=False, downsample_levels=None if len(times) == len(channels) - 1 else len(times),
        temporal_downsample=tuple(times), kind="vae" if t["encoder.conv_out.conv.weight"].shape[0] == 2 * latent else "ae",
    )  # fmt: skip
    return config, f"config inferred from tensor shapes ({ARCH} layout)"

