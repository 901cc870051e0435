"""KVAE 2D's files: diffusers' AutoencoderKLKVAE folders (kandinskylab/KVAE-2D-1.0's `diffusers/` subfolder) and the
authors' single file (the same repository's root, written by `KVAE2D`'s PyTorchModelHubMixin). The authors' module
tree (kandinskylab/kvae: kvae/models/kvae_2d.py, kvae/layers/{resnet,norm,sampling}.py, and the older
kvae_2d/model/) has diffusers' names, which are the model's: no renaming either way. Read from their source; no
released file was opened here (no network).

The names look like LDM's (`encoder.down.0.block.0.conv1`) but are told apart by KVAE's own modules: the
resamplings' `spatial_conv` / `linear` and the decoder's spatial norms (`norm1.norm_layer`, `conv_y`, `conv_b`); a
2D file has a plain `encoder.conv_in.weight` (KVAE 3D's causal convs wrap theirs: `conv_in.conv.weight`). Widths,
blocks and latent channels are read off config.json or the tensor shapes, never a name."""

from __future__ import annotations

import re
from typing import Any, Iterable

from torch import Tensor

from ..config import AutoencoderConfig

ARCH = "kvae"
DIFFUSERS_CLASSES = ("AutoencoderKLKVAE",)
FAMILY = "kvae"  # one published model has these names
LOAD_DTYPE = None
NO_WEIGHTS = None
DIFFUSERS_FRAMES = False


def config_from_diffusers(d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
    base, mult = int(d.get("channels", 128)), tuple(int(m) for m in d.get("ch_mult", (1, 2, 4, 8)))
    if mult[0] != 1:
        raise NotImplementedError(f"ch_mult {list(mult)}: vaekit implements a first multiplier of 1 (the release's)")
    enc, dec = int(d.get("num_enc_blocks", 2)), int(d.get("num_dec_blocks", 2))
    if enc != dec:
        raise NotImplementedError(f"num_enc_blocks {enc} != num_dec_blocks {dec} is not implemented (the release has 2 and 2)")
    if not d.get("double_z", True):
        raise NotImplementedError("double_z false is not implemented (diffusers' class would split the latent into mean and logvar)")
    latent = int(d.get("z_channels", 16))
    in_channels = int(d.get("in_channels", 3))
    config = AutoencoderConfig(
        arch=ARCH, in_channels=in_channels, out_channels=in_channels, block_channels=tuple(base * m for m in mult),
        layers_per_block=enc, latent_channels=latent, use_quant_conv=False, use_post_quant_conv=False, mid_attention=False,
    )  # fmt: skip
    return config, False  # the class has no scaling_factor: the normalisation is the preset's (checkpoints' rule)


def diffusers_config(c: AutoencoderConfig) -> dict[str, Any]:
    base = c.block_channels[0]
    return {
        "_class_name": DIFFUSERS_CLASSES[0], "_diffusers_version": "0.37.0", "in_channels": c.in_channels,
        "channels": base, "num_enc_blocks": c.layers_per_block, "num_dec_blocks": c.layers_per_block,
        "z_channels": c.latent_channels, "double_z": True, "ch_mult": [w // base for w in c.block_channels], "sample_size": 1024,
    }  # fmt: skip


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    base = config.block_channels[0]
    return config.kind == "vae" and config.in_channels == config.out_channels and all(w % base == 0 for w in config.block_channels)


def recognise(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    if "encoder.conv_in.weight" not in keys:
        return None
    if any(re.match(r"encoder\.down\.\d+\.downsample\.spatial_conv\.weight$", k) for k in keys) or any(
        re.match(r"decoder\.(mid\.block_1|up\.\d+\.block\.\d+)\.norm1\.conv_y\.weight$", k) for k in keys
    ):
        return "KVAE 2D naming (diffusers AutoencoderKLKVAE, Kandinsky Lab's KVAE2D)"
    return None


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return dict(tensors)


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return dict(tensors)


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return dict(tensors)


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    if t["encoder.conv_in.weight"].ndim != 4:
        raise NotImplementedError("a KVAE file with 3D convolutions (KVAE 3D, the video model) is not implemented")
    levels = sorted({int(m[1]) for k in t if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = sorted({int(m[1]) for k in t if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    widths = tuple(t[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels)
    latent = t["decoder.conv_in.weight"].shape[1]
    moments = t["encoder.conv_out.weight"].shape[0]
    config = AutoencoderConfig(
        arch=ARCH, in_channels=t["encoder.conv_in.weight"].shape[1], out_channels=t["decoder.conv_out.weight"].shape[0],
        block_channels=widths, layers_per_block=len(blocks), latent_channels=latent, use_quant_conv=False,
        use_post_quant_conv=False, mid_attention=False, kind="vae" if moments == 2 * latent else "ae",
    )  # fmt: skip
    return config, f"config inferred from tensor shapes ({ARCH} layout)"
