"""Wan 2.2's VAE: diffusers' AutoencoderKLWan (is_residual=True) names, the model's own, and Wan 2.2's own
names (`Wan2.2_VAE.pth` of Wan-AI/Wan2.2-TI2V-5B; wan/modules/vae2_2.py). Wan's names, as diffusers'
scripts/convert_wan_to_diffusers.py (`convert_vae_22`) renames them: each level is one block holding a
Sequential, `encoder.downsamples.{level}.downsamples.{i}` (its residual blocks, then its resample at index
`layers_per_block`) and `decoder.upsamples.{level}.upsamples.{i}` (resample at `layers_per_block + 1`); the
middle, heads and the convs around the latent are named as in Wan 2.1 (`layouts.qwenimage`).

diffusers has one class, AutoencoderKLWan, for Wan 2.1 (is_residual false: the qwenimage architecture, read
by `layouts.qwenimage`, which this hands those configs to) and Wan 2.2 (is_residual true: this one).

Qwen-Image 2.1's VAE, diffusers' AutoencoderKLQwenImage21, is Wan 2.2's network (RGBA, no patches, 5 levels, 64
latent channels) with the causal convolutions stored as 2D ones (`AutoencoderConfig.image_convs`); its tensor names
are AutoencoderKLWan's, so a file is told from Wan 2.2's by its 4D convolution weights, never by its name. Its
authors' or ComfyUI's single-file names are not established here (diffusers has no single-file converter for the
class), so its single files are written in diffusers' names; a file in Wan 2.2's names with 2D weights reads too."""

from __future__ import annotations

import re
from typing import Any, Iterable

from torch import Tensor

from ..config import PRESETS, AutoencoderConfig
from . import qwenimage as wan21

ARCH = "wan22"
DIFFUSERS_CLASSES = ("AutoencoderKLWan", "AutoencoderKLQwenImage21")  # AutoencoderKLWan is_residual=False: layouts.qwenimage
FAMILY = "wan2.2"  # Wan 2.2's names belong to one published model (TI2V-5B's VAE)
LOAD_DTYPE = None
NO_WEIGHTS = None
DIFFUSERS_FRAMES = True  # AutoencoderKLWan is a video VAE

_PUBLISHED = "wan2.2"
QWEN21_CLASS, QWEN21 = "AutoencoderKLQwenImage21", "qwenimage2.1"


def _qwen21_defaults() -> dict[str, Any]:
    """AutoencoderKLQwenImage21's defaults (the preset is them): what a config.json without a key means."""
    p = PRESETS[QWEN21].config
    base = p.block_channels[0]
    return {"base_dim": base, "decoder_base_dim": p.decoder_channels[0], "z_dim": p.latent_channels,
            "dim_mult": [c // base for c in p.block_channels], "num_res_blocks": p.layers_per_block,
            "temperal_downsample": list(p.temporal_downsample), "latents_mean": list(p.latents_mean),
            "latents_std": list(p.latents_std), "is_residual": True, "in_channels": p.in_channels,
            "out_channels": p.out_channels, "patch_size": None}  # fmt: skip


def config_from_diffusers(d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
    image = d.get("_class_name") == QWEN21_CLASS
    if image:
        d = {**_qwen21_defaults(), **d}
        if not d["is_residual"]:
            raise NotImplementedError("AutoencoderKLQwenImage21 with is_residual=False (Wan 2.1's levels, 2D weights): not implemented")
    if not d.get("is_residual", False):
        return wan21.config_from_diffusers(d)  # Wan 2.1's network: the qwenimage architecture
    mult = list(d.get("dim_mult", [1, 2, 4, 4]))
    if d.get("attn_scales"):
        raise NotImplementedError(f"attn_scales={d['attn_scales']}: attention inside the encoder levels is not implemented")
    if mult[0] != 1:
        raise NotImplementedError(f"dim_mult={mult}: vaekit's Wan 2.2 layout needs dim_mult[0] == 1")
    p = d.get("patch_size") or 1
    base = d.get("base_dim", 96)
    dec = d.get("decoder_base_dim") or base
    if "latents_mean" not in d or "latents_std" not in d:
        raise ValueError("an AutoencoderKLWan config.json states latents_mean and latents_std")
    z = d.get("z_dim", 16)
    config = AutoencoderConfig(
        arch=ARCH, in_channels=d.get("in_channels", 3) // p**2, out_channels=d.get("out_channels", 3) // p**2, patch_size=p,
        block_channels=tuple(base * m for m in mult), decoder_block_channels=tuple(dec * m for m in mult) if dec != base else None,
        layers_per_block=d.get("num_res_blocks", 2), latent_channels=z,
        temporal_downsample=tuple(d.get("temperal_downsample", [False, True, True])), latent_norm="channel",
        latents_mean=tuple(d["latents_mean"]), latents_std=tuple(d["latents_std"]), image_convs=image,
    )  # fmt: skip
    name = QWEN21 if image else _PUBLISHED
    published = PRESETS[name].config
    if (config.latents_mean, config.latents_std) == (published.latents_mean, published.latents_std):
        config = config.replace(family=name)  # its latent space (a smaller network keeps its name, as presets do)
    return config, True  # its per-channel statistics


def diffusers_config(c: AutoencoderConfig) -> dict[str, Any]:
    base, p = c.block_channels[0], c.patch_size
    dec = c.decoder_channels[0]
    return {
        "_class_name": QWEN21_CLASS if c.image_convs else DIFFUSERS_CLASSES[0],
        "_diffusers_version": "0.42.1" if c.image_convs else "0.35.0", "attn_scales": [], "base_dim": base,
        "decoder_base_dim": dec, "dim_mult": [ch // base for ch in c.block_channels], "dropout": 0.0,
        "in_channels": c.in_channels * p * p, "out_channels": c.out_channels * p * p, "is_residual": True,
        "latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std), "num_res_blocks": c.layers_per_block,
        "patch_size": p if p > 1 else None, "scale_factor_spatial": c.factor,
        "scale_factor_temporal": 2 ** sum(c.temporal_downsample), "temperal_downsample": list(c.temporal_downsample),
        "z_dim": c.latent_channels,
    }  # fmt: skip


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    """A Gaussian VAE whose levels are base_dim x dim_mult (dim_mult[0] = 1) in the encoder and decoder alike."""
    ch, dec = config.block_channels, config.decoder_channels
    proportional = all(c % ch[0] == 0 and c * dec[0] == d * ch[0] for c, d in zip(ch, dec))
    return config.kind == "vae" and proportional and len(config.latents_mean) == config.latent_channels


def recognise(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.\d+\.", k) for k in keys):
        return "Wan 2.2 layout (Wan2.2_VAE.pth)"
    if any(re.match(r"encoder\.down_blocks\.\d+\.resnets\.\d+\.norm1\.gamma$", k) for k in keys):
        return "diffusers AutoencoderKLWan (Wan 2.2, is_residual) / AutoencoderKLQwenImage21 naming"
    return None


# Inside a level: the model's (diffusers') names -> Wan's, with `r` the resample's index in Wan's Sequential.
_LEVELS = ((r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", "encoder.downsamples.{0}.downsamples.{1}."),
           (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", "decoder.upsamples.{0}.upsamples.{1}."),
           (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", "encoder.downsamples.{0}.downsamples.{r}."),
           (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", "decoder.upsamples.{0}.upsamples.{r}."))  # fmt: skip


def _wan_name(key: str, layers: int) -> str:
    for i, (pattern, wan) in enumerate(_LEVELS):
        m = re.match(pattern, key)
        if m:
            rest = key[m.end() :]
            if i < 2:  # a residual block: Wan's `residual` Sequential and `shortcut`
                rest = next((w + rest[len(n) :] for n, w in wan21._RESIDUAL.items() if rest.startswith(n)), rest)
            r = layers if i == 2 else layers + 1  # the encoder's resample follows its blocks; the decoder has one more
            return wan.format(*m.groups(), r=r) + rest
    return wan21._wan_name(key, 0)  # the middle, heads and quant convs: Wan 2.1's names (no flat level list here)


def _layers(keys: Iterable[str]) -> int:
    """Residual blocks per encoder level."""
    return len({m[1] for k in keys if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    if config.image_convs:
        return dict(tensors)  # Qwen-Image 2.1: no single-file names of its own are established; diffusers'
    layers = _layers(tensors)
    return {_wan_name(k, layers): t for k, t in tensors.items()}


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return dict(tensors)  # the model's names are diffusers'


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    if not any(k.startswith("encoder.downsamples.") for k in tensors):
        return dict(tensors)  # diffusers names already
    return {_native_name(k): t for k, t in tensors.items()}


def _native_name(key: str) -> str:
    """A Wan 2.2 name -> the native name: a level's entry is a resample if it holds `resample.` or `time_conv.`."""
    m = re.match(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)$", key)
    if not m:
        return wan21._native_name(key, 1)  # the middle, heads and quant convs
    where, level, index, rest = m[1], m[2], m[3], m[4]
    block = "encoder.down_blocks" if where.startswith("encoder") else "decoder.up_blocks"
    if rest.startswith(("resample.", "time_conv.")):
        return f"{block}.{level}.{'downsampler' if block.startswith('encoder') else 'upsampler'}.{rest}"
    rest = next((n + rest[len(w) :] for n, w in wan21._RESIDUAL.items() if rest.startswith(w)), rest)
    return f"{block}.{level}.resnets.{index}.{rest}"


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    """The architecture from native-named tensor shapes. A file does not say how many channels its images have:
    an input conv over a multiple of 4 channels is taken as 2x2 patches (Wan 2.2's 12 = 3 x 2 x 2), except where the
    convolutions are 2D (Qwen-Image 2.1's image-only class, `image_convs`) over 3 or 4 channels: RGB or RGBA pixels."""
    levels = sorted({int(m[1]) for k in t if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    width = lambda k: t[k].shape[0]  # noqa: E731
    block_channels = tuple(width(f"encoder.down_blocks.{i}.resnets.0.conv1.weight") for i in levels)
    decoder = tuple(width(f"decoder.up_blocks.{len(levels) - 1 - i}.resnets.0.conv1.weight") for i in levels)
    temporal = tuple(f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in t for i in levels[:-1])
    c_in, c_out = t["encoder.conv_in.weight"].shape[1], t["decoder.conv_out.weight"].shape[0]
    image = t["encoder.conv_in.weight"].ndim == 4
    p = 1 if image and c_in in (3, 4) and c_out in (3, 4) else 2 if c_in % 4 == 0 and c_out % 4 == 0 else 1
    latent = t["decoder.conv_in.weight"].shape[1]
    config = AutoencoderConfig(
        arch=ARCH, in_channels=c_in // p**2, out_channels=c_out // p**2, patch_size=p, block_channels=block_channels,
        decoder_block_channels=decoder if decoder != block_channels else None, layers_per_block=_layers(t),
        latent_channels=latent, temporal_downsample=temporal, image_convs=image,
        kind="vae" if t["encoder.conv_out.weight"].shape[0] == 2 * latent else "ae",
    )  # fmt: skip
    weights = "2D weights (Qwen-Image 2.1's AutoencoderKLQwenImage21)" if image else "video weights"
    return config, (f"config inferred from tensor shapes ({ARCH} layout, {weights}; "
                    f"{'2x2 patches of ' if p == 2 else ''}{c_in // p**2}-channel images)")
