"""The preview models' files (arch "taesd", `vaekit.model.taesd`):

- madebyollin's released pairs, `NAME_encoder.pth|safetensors` + `NAME_decoder.pth|safetensors` (taesd, taesdxl, taesd3,
  taef1, taef2): each half the keys of taesd.py's `nn.Sequential` (`0.weight`, `1.conv.0.weight`; the decoder starts at
  `1.weight`, its clamp being index 0), found from either file or their folder (`split_files`); which file is which
  half is read from its tensors, never its name; a decoder alone is a decoder-only model;
- taesd.py's `TAESD` module saved whole: the same keys under `encoder.` / `decoder.`;
- diffusers' `AutoencoderTiny` (`encoder.layers.N`, `decoder.layers.N`: EncoderTiny's indices are taesd's, DecoderTiny's
  one less, its clamp being in `forward`), as a folder and as one file (FLUX.2's `taef2.safetensors` has these names,
  with taef2's GroupNorm branch, `pool`, which the class has not);
- the linear preview: `latent_rgb_factors` (latent channels x 3, ComfyUI's rows) and `latent_rgb_factors_bias`;
- a decoder with a linear skip (`vaekit distill`'s): its `decoder.skip_weight` / `skip_bias` beside the decoder's names,
  in vaekit's single file only (taesd.py and AutoencoderTiny have no such path).

The model's own names are the `TAESD` module's (`encoder.1.conv.0.weight`; the linear preview's `decoder.conv_out`).
Widths, levels, blocks per level, latent channels and the GroupNorm branch come from the tensor shapes, never a file
name; FLUX.2's 2x2 latent patches are taken for 32 latent channels with the GroupNorm branch (taef2), as ComfyUI takes
them. No file states its teacher: vaekit's own files carry it in their config, others are assumed and said
(`vaekit.checkpoints`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from ..config import AutoencoderConfig

ARCH = "taesd"
DIFFUSERS_CLASSES = ("AutoencoderTiny",)
FAMILY = None  # every teacher's previews share these names: the teacher is stated, given or assumed (checkpoints.py)
# fp32 unless asked: the released files are fp16, and on a CPU torch's fp16 convolutions took 420 s for one 256x256
# encode+decode of taef2 against 0.1 s in fp32 (this machine); the models are tiny, so fp32 costs little anywhere
LOAD_DTYPE = torch.float32
NO_WEIGHTS = None
DIFFUSERS_FRAMES = False

LINEAR_KEYS = ("latent_rgb_factors", "latent_rgb_factors_bias")
SKIP_KEYS = ("decoder.skip_weight", "decoder.skip_bias")  # the same names in every form (vaekit's files only)
_KEY = re.compile(r"(?:(encoder|decoder)\.)?(layers\.)?(\d+)\.(weight|bias|conv\.[024]\.(?:weight|bias)|pool\.[013]\.(?:weight|bias))")
_PAIR = re.compile(r"(.+)_(encoder|decoder)\.(safetensors|pth)")


# ---- names ----------------------------------------------------------------------------------------


def recognise(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if sorted(keys) == sorted(LINEAR_KEYS):
        return "linear preview (ComfyUI's latent_rgb_factors)"
    keys = [k for k in keys if k not in SKIP_KEYS]
    matches = [_KEY.fullmatch(k) for k in keys]
    if not keys or not all(matches):
        return None
    halves = {m[1] for m in matches}
    if halves == {None}:
        return f"taesd.py's {_bare_half(keys)} file"
    if None in halves:
        return None
    return "diffusers AutoencoderTiny naming" if all(m[2] for m in matches) else "taesd.py's TAESD module naming"


def _bare_half(keys: Iterable[str]) -> str:
    """Which half a file of taesd.py's bare keys is: only the encoder has a layer 0 with weights (the decoder's is its clamp)."""
    return "encoder" if "0.weight" in keys else "decoder"


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    if set(tensors) == set(LINEAR_KEYS):
        factors, bias = tensors["latent_rgb_factors"], tensors["latent_rgb_factors_bias"]
        return {"decoder.conv_out.weight": factors.t()[:, :, None, None].contiguous(), "decoder.conv_out.bias": bias}
    bare = _bare_half(tensors)
    out = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:  # the model's own names (the linear preview's decoder.conv_out)
            out[key] = t
            continue
        half, diffusers, index = m[1] or bare, m[2], int(m[3])
        out[f"{half}.{index + 1 if diffusers and half == 'decoder' else index}.{m[4]}"] = t
    return out


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    if config.linear:
        return to_single_file(tensors, config)
    out = {k: t for k, t in tensors.items() if k in SKIP_KEYS}
    for key, t in tensors.items():
        if key in SKIP_KEYS:
            continue
        half, index, rest = key.split(".", 2)
        out[f"{half}.layers.{int(index) - 1 if half == 'decoder' else index}.{rest}"] = t
    return out


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """One file: diffusers' names (FLUX.2's `taef2.safetensors` form, any variant), or the linear preview's two tensors."""
    if config.linear:
        weight = tensors["decoder.conv_out.weight"]
        return {"latent_rgb_factors": weight[:, :, 0, 0].t().contiguous(), "latent_rgb_factors_bias": tensors["decoder.conv_out.bias"]}
    return to_diffusers(tensors, config)


def to_pair(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, tuple[dict[str, Tensor], AutoencoderConfig]]:
    """The released pair's halves: {"encoder": (its bare keys, the model that file alone makes), "decoder": ...}; the
    decoder's file alone is a decoder-only model, and its config says so."""
    if config.linear or config.linear_skip:
        raise ValueError(f"a {'linear preview' if config.linear else 'preview with a linear skip'} is not taesd.py's pair of "
                         "files: write it with format='single-file'")  # fmt: skip
    halves = ("decoder",) if config.decoder_only else ("encoder", "decoder")
    return {half: ({k.split(".", 1)[1]: t for k, t in tensors.items() if k.startswith(f"{half}.")},
                   config if half == "encoder" else config.replace(decoder_only=True)) for half in halves}  # fmt: skip


def split_files(path: Path) -> list[Path] | None:
    """The files of the released pair `path` belongs to, when it is one: a `NAME_encoder` or `NAME_decoder` file
    (`.safetensors` or `.pth`) and its other half where it exists, or a folder without config.json holding one pair
    (several: refused, naming them). Which is which half is then read from the tensors."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        names = sorted({m[1] for f in path.iterdir() if f.is_file() and (m := _PAIR.fullmatch(f.name))})
        if len(names) > 1:
            raise ValueError(f"{path} holds the files of {len(names)} tiny autoencoders ({', '.join(names)}): give one of their files")
        if not names:
            return None
        name, suffix = names[0], ".safetensors"
    else:
        m = _PAIR.fullmatch(path.name)
        if m is None:
            return None
        name, suffix, path = m[1], path.suffix, path.parent
    # per half: the file of the given suffix, else the other (a folder may hold both .pth and .safetensors of a pair)
    ordered = (suffix, ".pth" if suffix == ".safetensors" else ".safetensors")
    found = [next((f for s in ordered if (f := path / f"{name}_{half}{s}").is_file()), None) for half in ("encoder", "decoder")]
    return [f for f in found if f is not None]


# ---- configs ----------------------------------------------------------------------------------------


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    """AutoencoderTiny has no GroupNorm branch, no latent patches, no decoder-only, linear or linear-skip form."""
    return not (config.midblock_gn or config.latent_patches or config.decoder_only or config.linear or config.linear_skip)


def diffusers_config(c: AutoencoderConfig) -> dict[str, Any]:
    levels, width, blocks = len(c.block_channels), c.block_channels[0], c.layers_per_block
    return {
        "_class_name": DIFFUSERS_CLASSES[0], "_diffusers_version": "0.42.1", "in_channels": c.in_channels,
        "out_channels": c.out_channels, "encoder_block_out_channels": [width] * levels,
        "decoder_block_out_channels": [width] * levels, "act_fn": "relu", "upsample_fn": "nearest",
        "latent_channels": c.latent_channels // 4 if c.latent_patches else c.latent_channels, "upsampling_scaling_factor": 2,
        "num_encoder_blocks": [1] + [blocks] * (levels - 1), "num_decoder_blocks": [blocks] * (levels - 1) + [1],
        "latent_magnitude": 3, "latent_shift": 0.5, "force_upcast": False, "scaling_factor": 1.0, "shift_factor": 0.0,
    }  # fmt: skip


def config_from_diffusers(d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
    """AutoencoderTiny's config.json (keys missing: the class's defaults). It never states the teacher: (config, False)."""
    for key, default in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2)):
        if d.get(key, default) != default:
            raise NotImplementedError(f"{key} {d[key]!r}: vaekit implements {default!r} (taesd's, every release's)")
    if (float(d.get("scaling_factor", 1.0)), float(d.get("shift_factor", 0.0) or 0.0)) != (1.0, 0.0):
        raise NotImplementedError("scaling_factor/shift_factor other than 1/0: vaekit reads tiny autoencoders whose latents are "
                                  "their teacher's normalised ones, as every release's are")  # fmt: skip
    widths = [int(w) for w in d.get("encoder_block_out_channels", (64,) * 4)] + [int(w) for w in d.get("decoder_block_out_channels", (64,) * 4)]
    encoder_blocks = [int(n) for n in d.get("num_encoder_blocks", (1, 3, 3, 3))]
    decoder_blocks = [int(n) for n in d.get("num_decoder_blocks", (3, 3, 3, 1))]
    levels, blocks = len(encoder_blocks), encoder_blocks[-1]
    if (len(set(widths)) != 1 or encoder_blocks != [1] + [blocks] * (levels - 1) or decoder_blocks != encoder_blocks[::-1]
            or len(widths) != 2 * levels):
        raise NotImplementedError(f"widths {widths} and blocks {encoder_blocks} / {decoder_blocks}: vaekit implements taesd's "
                                  "pattern (one width; 1 block at full resolution, N per other level, the decoder mirrored)")  # fmt: skip
    config = AutoencoderConfig(
        arch=ARCH, kind="ae", in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
        block_channels=(widths[0],) * levels, layers_per_block=blocks, latent_channels=int(d.get("latent_channels", 4)),
        use_quant_conv=False, use_post_quant_conv=False, mid_attention=False,
    )  # fmt: skip
    return config, False


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    common = dict(arch=ARCH, kind="ae", use_quant_conv=False, use_post_quant_conv=False, mid_attention=False)
    if "decoder.conv_out.weight" in t:
        out, channels = t["decoder.conv_out.weight"].shape[:2]
        config = AutoencoderConfig(**common, in_channels=out, out_channels=out, block_channels=(out,) * 4, latent_channels=channels,
                                   linear=True, decoder_only=True)  # fmt: skip
        return config, "linear preview: its file does not say the factor; 8 assumed (vaekit's own files say it in their metadata)"
    decoder, encoder = _sequence(t, "decoder"), _sequence(t, "encoder")
    if not decoder:
        raise ValueError("these tensors are a tiny autoencoder's encoder alone, and vaekit needs the decoder: put NAME_decoder "
                         "beside NAME_encoder (a decoder alone loads as a decoder-only model)")  # fmt: skip
    convs = [i for i, kind in decoder if kind == "conv"]
    if len(convs) < 3:
        raise ValueError(f"tiny autoencoder decoder tensors with {len(convs)} convolutions outside its blocks: not taesd's network "
                         "(a conv in, one per upsampling, a conv out)")  # fmt: skip
    width, network = t[f"decoder.{convs[0]}.weight"].shape[:2]
    blocks = sum(1 for i, kind in decoder if kind == "block" and i < convs[1])
    widths = {tuple(v.shape) for k, v in t.items() if k.endswith("conv.0.weight") or k.endswith("conv.4.weight")}
    if widths != {(width, width, 3, 3)}:
        raise ValueError(f"tiny autoencoder tensors whose widths vary ({sorted(widths)}): vaekit reads taesd's one-width network, "
                         "not taesd.py's F32 or F16 variants (taesana, taeqi2_1)")  # fmt: skip
    gn = any(".pool." in k for k in t)
    patches = gn and network == 32  # taef2's (FLUX.2's) shapes: its 2x2 latent patches, as ComfyUI decides
    out = t[f"decoder.{convs[-1]}.weight"].shape[0]
    config = AutoencoderConfig(
        **common, in_channels=t["encoder.0.weight"].shape[1] if encoder else out, out_channels=out,
        block_channels=(width,) * (len(convs) - 1), layers_per_block=blocks, latent_channels=4 * network if patches else network,
        latent_patches=patches, midblock_gn=gn, decoder_only=not encoder, linear_skip="decoder.skip_weight" in t,
    )  # fmt: skip
    said = "config inferred from tensor shapes (taesd layout)" + ("; decoder only (no encoder tensors)" if not encoder else "")
    if patches:
        said += "; 32 channels with taef2's GroupNorm branch: FLUX.2's 2x2 latent patches (128 channels at 16x), unpacked inside"
    return config, said


def _sequence(t: dict[str, Tensor], half: str) -> list[tuple[int, str]]:
    """A half's layers with weights, in order: (index, "conv" or "block")."""
    indices = sorted({int(m[1]) for k in t if (m := re.match(rf"{half}\.(\d+)\.", k))})
    return [(i, "block" if f"{half}.{i}.conv.0.weight" in t else "conv") for i in indices]


def linear_tensors(factors: Any, bias: Any) -> dict[str, Tensor]:
    """ComfyUI's `latent_rgb_factors` (one row of out-channel weights per latent channel) and `latent_rgb_factors_bias`
    as the model's tensors."""
    factors, bias = torch.as_tensor(factors, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)
    if factors.ndim != 2 or bias.shape != (factors.shape[1],):
        raise ValueError(f"latent_rgb_factors are one row per latent channel of one value per image channel, and the bias one "
                         f"value per image channel; got shapes {list(factors.shape)} and {list(bias.shape)}")  # fmt: skip
    return to_native({"latent_rgb_factors": factors, "latent_rgb_factors_bias": bias})
