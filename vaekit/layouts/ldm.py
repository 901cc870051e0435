"""The LDM architecture's files: the native LDM names (the model's own, so SD/SDXL/SD3 single files load as
they are), FLUX.1's `ae.safetensors` (the LDM names without quant convs), BFL's FLUX.2 `ae.safetensors`
(its encoder and decoder own the quant convs: BFL_NAMES; its latent BatchNorm `bn.*` states the
normalisation), and diffusers' AutoencoderKL and AutoencoderKLFlux2 folders, one key mapping away from the
native names (`diffusers_key_map`, used in both directions)."""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, Iterable

from torch import Tensor

from ..config import PATCH_BN_EPS, AutoencoderConfig
from . import not_an_autoencoder

ARCH = "ldm"
DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")
FAMILY = None  # SD1 and SDXL share the architecture, so do SD3 and FLUX.1: the names do not tell the family
LOAD_DTYPE = None
NO_WEIGHTS = None
DIFFUSERS_FRAMES = False

# BFL's FLUX.2 ae.safetensors names for the native (vaekit, diffusers) quant convs: its encoder and
# decoder own them. Single files of patch_bn models are written with these names, as BFL's code loads.
BFL_NAMES = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
# Written into diffusers config.json: a release that reads every key written there.
DIFFUSERS_VERSION = "0.30.0"
# diffusers' AutoencoderKL only uses sample_size to pick its tile size for enable_tiling().
DIFFUSERS_SAMPLE_SIZE = 512

_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14
# The mid-block attention projections: 1x1 convs in LDM, Linear [C, C] in diffusers.
_ATTENTION_PROJECTION = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


# ---- which names a file has, and the native names ---------------------------------------------------


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    return config.diffusers_compatible  # AutoencoderKL / AutoencoderKLFlux2: no AE, no fast-training options


def recognise(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        if any(k.startswith(tuple(BFL_NAMES.values())) for k in keys):
            return "BFL FLUX.2 naming"
        if "quant_conv.weight" not in keys:
            return "LDM naming, no quant convs: the FLUX.1 ae.safetensors layout"
        return "LDM naming"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "diffusers naming"
    return None


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers-named tensors (old attention names included) -> native names; native ones pass through, BFL's
    FLUX.2 quant conv names renamed. Linear-shaped attention projections become the 1x1 convs they are."""
    naming = recognise(tensors)
    if naming is None:
        raise not_an_autoencoder(tensors)
    if naming == "BFL FLUX.2 naming":
        bfl = {v: k for k, v in BFL_NAMES.items()}
        tensors = {_renamed(k, bfl): t for k, t in tensors.items()}
    elif naming == "diffusers naming":
        levels = 1 + max(int(m[1]) for k in tensors if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
        layers = 1 + max(int(m[1]) for k in tensors if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
        native = {v: k for k, v in diffusers_key_map(levels, layers).items()}
        old = re.compile(r"(attentions\.0\.)(query|key|value|proj_attn)\.")
        tensors = {native.get(k, k): t for k, t in ((old.sub(lambda m: m[1] + _OLD_DIFFUSERS_ATTENTION[m[2]] + ".", k), t)
                                                    for k, t in tensors.items())}  # fmt: skip
    return {k: t[:, :, None, None] if t.ndim == 2 and _ATTENTION_PROJECTION.search(k) else t for k, t in tensors.items()}


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """The native names, as SD/SDXL/SD3/FLUX.1 files have them; FLUX.2's (patch_bn) as BFL's file has them."""
    if config.latent_norm == "patch_bn":
        return {_renamed(k, BFL_NAMES): t for k, t in tensors.items()}
    return dict(tensors)


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    names = diffusers_key_map(len(config.block_channels), config.layers_per_block)
    return {names.get(k, k): t[:, :, 0, 0] if t.ndim == 4 and _ATTENTION_PROJECTION.search(k) else t for k, t in tensors.items()}


@lru_cache
def diffusers_key_map(levels: int, layers_per_block: int) -> dict[str, str]:
    """Native name -> diffusers name for every tensor a model of this depth can have (`_native_keys`).
    Invert it for the other direction."""
    return {k: _diffusers_name(k, levels) for k in _native_keys(levels, layers_per_block)}


def _native_keys(levels: int, layers: int) -> list[str]:
    """Every tensor name of an LDM model of this depth whose channels grow at every level, so every optional
    tensor (shortcuts, quant convs, attention) is there; in the model's order. tests/test_architectures.py checks
    them against `Autoencoder(...).state_dict()`."""

    def params(*modules: str) -> list[str]:
        return [f"{m}.{w}" for m in modules for w in ("weight", "bias")]

    def resnet(prefix: str, shortcut: bool) -> list[str]:
        return params(*(f"{prefix}.{n}" for n in ("norm1", "conv1", "norm2", "conv2")), *([f"{prefix}.nin_shortcut"] if shortcut else []))

    def mid(part: str) -> list[str]:
        attention = params(*(f"{part}.mid.attn_1.{n}" for n in _ATTENTION_NAMES))
        return resnet(f"{part}.mid.block_1", False) + attention + resnet(f"{part}.mid.block_2", False)

    keys = params("encoder.conv_in")
    for i in range(levels):
        for j in range(layers):
            keys += resnet(f"encoder.down.{i}.block.{j}", shortcut=i > 0 and j == 0)
        keys += params(f"encoder.down.{i}.downsample.conv") if i < levels - 1 else []
    keys += mid("encoder") + params("encoder.norm_out", "encoder.conv_out", "decoder.conv_in") + mid("decoder")
    for i in range(levels):  # up.i works at encoder level i's resolution; its first block changes the width
        for j in range(layers + 1):
            keys += resnet(f"decoder.up.{i}.block.{j}", shortcut=i < levels - 1 and j == 0)
        keys += params(f"decoder.up.{i}.upsample.conv") if i > 0 else []
    return keys + params("decoder.norm_out", "decoder.conv_out", "quant_conv", "post_quant_conv")


def _diffusers_name(key: str, levels: int) -> str:
    """The diffusers name of one native tensor name. Decoder levels run in the opposite order."""
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", key)
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = re.sub(r"\.mid\.attn_1\.(\w+)\.", lambda m: f".mid_block.attentions.0.{_ATTENTION_NAMES[m[1]]}.", key)
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def _renamed(key: str, names: dict[str, str]) -> str:
    """`key` with its leading prefix replaced by `names` (prefix -> prefix), if one matches."""
    prefix = next((p for p in names if key.startswith(p)), None)
    return names[prefix] + key[len(prefix):] if prefix else key


# ---- diffusers config.json ---------------------------------------------------------------------------


def diffusers_config(c: AutoencoderConfig) -> dict[str, Any]:
    n = len(c.block_channels)
    if c.latent_norm == "patch_bn":  # AutoencoderKLFlux2's own keys (it takes no scaling_factor)
        return {
            "_class_name": "AutoencoderKLFlux2", "_diffusers_version": "0.36.0", "act_fn": "silu",
            "batch_norm_eps": PATCH_BN_EPS, "batch_norm_momentum": 0.1, "block_out_channels": list(c.block_channels),
            "decoder_block_out_channels": None if c.decoder_block_channels is None else list(c.decoder_block_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "in_channels": c.in_channels, "latent_channels": c.latent_channels, "layers_per_block": c.layers_per_block,
            "mid_block_add_attention": c.mid_attention, "norm_num_groups": c.norm_groups, "out_channels": c.out_channels,
            "patch_size": [2, 2], "sample_size": DIFFUSERS_SAMPLE_SIZE, "up_block_types": ["UpDecoderBlock2D"] * n,
            "use_post_quant_conv": c.use_post_quant_conv, "use_quant_conv": c.use_quant_conv,
        }  # fmt: skip
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(c.block_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": c.in_channels,
        "latent_channels": c.latent_channels,
        "latents_mean": list(c.latents_mean) if c.latent_norm == "channel" else None,
        "latents_std": list(c.latents_std) if c.latent_norm == "channel" else None,
        "layers_per_block": c.layers_per_block,
        "mid_block_add_attention": c.mid_attention,
        "norm_num_groups": c.norm_groups,
        "out_channels": c.out_channels,
        "sample_size": DIFFUSERS_SAMPLE_SIZE,
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": c.use_post_quant_conv,
        "use_quant_conv": c.use_quant_conv,
    }


def config_from_diffusers(d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
    flux2 = d.get("_class_name", "AutoencoderKL") == "AutoencoderKLFlux2"
    channels = tuple(d.get("block_out_channels", (64,)))  # diffusers' defaults throughout
    n = len(channels)
    unsupported = [f"{k}={d[k]}" for k, ok in (
        ("act_fn", d.get("act_fn", "silu") == "silu"),
        ("down_block_types", d.get("down_block_types", ["DownEncoderBlock2D"] * n) == ["DownEncoderBlock2D"] * n),
        ("up_block_types", d.get("up_block_types", ["UpDecoderBlock2D"] * n) == ["UpDecoderBlock2D"] * n),
        # AutoencoderKLFlux2's decoder widths (FLUX.2's small decoder); AutoencoderKL has no such option
        ("decoder_block_out_channels", flux2 or d.get("decoder_block_out_channels") in (None, list(channels))),
        ("patch_size", not flux2 or list(d.get("patch_size", [2, 2])) == [2, 2]),
        ("batch_norm_eps", not flux2 or d.get("batch_norm_eps", PATCH_BN_EPS) == PATCH_BN_EPS),
    ) if not ok]
    if unsupported:
        raise NotImplementedError(f"options vaekit does not implement: {', '.join(unsupported)}")
    per_channel = d.get("latents_mean") is not None and d.get("latents_std") is not None
    config = AutoencoderConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        block_channels=channels,
        decoder_block_channels=tuple(d["decoder_block_out_channels"]) if flux2 and d.get("decoder_block_out_channels") else None,
        layers_per_block=d.get("layers_per_block", 1),
        latent_channels=d.get("latent_channels", 4),
        use_quant_conv=d.get("use_quant_conv", True),
        use_post_quant_conv=d.get("use_post_quant_conv", True),
        mid_attention=d.get("mid_block_add_attention", True),
        norm_groups=d.get("norm_num_groups", 32),
        latent_norm="patch_bn" if flux2 else "channel" if per_channel else "affine",
        scaling_factor=float(d.get("scaling_factor", 1.0)),
        shift_factor=float(d.get("shift_factor") or 0.0),
        latents_mean=tuple(d["latents_mean"]) if per_channel else (),
        latents_std=tuple(d["latents_std"]) if per_channel else (),
    )
    return config, flux2 or "scaling_factor" in d


# ---- a file with no config --------------------------------------------------------------------------


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    def shape(key: str) -> tuple[int, ...]:
        if key not in t:
            raise ValueError(f"cannot infer the architecture: tensor {key} is missing")
        return tuple(t[key].shape)

    levels = sorted({int(m[1]) for k in t if (m := re.match(r"encoder\.down\.(\d+)\.block\.", k))})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"cannot infer the architecture: encoder levels {levels} are not 0..n-1")
    channels = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels)
    # The decoder's widths from its own tensors (FLUX.2's small decoder is narrower than its encoder): up.i works at
    # encoder level i's resolution, and its first block's conv1 makes that level's width.
    up = sorted({int(m[1]) for k in t if (m := re.match(r"decoder\.up\.(\d+)\.block\.", k))})
    if up != levels:
        raise ValueError(f"cannot infer the architecture: decoder levels {up} do not match the encoder's {levels}")
    decoder = tuple(shape(f"decoder.up.{i}.block.0.conv1.weight")[0] for i in up)
    layers = len({m[1] for k in t if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    latent = shape("decoder.conv_in.weight")[1]
    moments = shape("encoder.conv_out.weight")[0]
    if moments not in (latent, 2 * latent):
        raise ValueError(f"cannot infer the architecture: the encoder outputs {moments} channels for {latent} latent channels")
    groups = 32 if all(c % 32 == 0 for c in channels + decoder) else math.gcd(32, *channels, *decoder)
    note = (f"config inferred from tensor shapes; norm_groups={groups} assumed (GroupNorm weights do not record it"
            + ("; every published LDM VAE uses 32)" if groups == 32 else "; 32 does not divide the channel counts)"))
    config = AutoencoderConfig(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_channels=channels,
        decoder_block_channels=decoder,  # None when it is the encoder's
        layers_per_block=layers,
        latent_channels=latent,
        kind="vae" if moments == 2 * latent else "ae",
        use_quant_conv="quant_conv.weight" in t,
        use_post_quant_conv="post_quant_conv.weight" in t,
        mid_attention="encoder.mid.attn_1.q.weight" in t,
        norm_groups=groups,
        latent_norm="patch_bn" if "bn.running_mean" in t else "affine",
    )
    return config, note
