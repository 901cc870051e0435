"""DC-AE's files: diffusers' AutoencoderDC folders (whose names are the model's) and MIT Han Lab's single
`model.safetensors` (mit-han-lab/dc-ae-*: efficientvit's `encoder.stages.{level}.op_list.{i}.main...`,
`context_module` / `local_module`, one `qkv` 1x1 conv). The renaming is the inverse of diffusers'
scripts/convert_dcae_to_diffusers.py (and of its single-file loader, `convert_autoencoder_dc_checkpoint_to_diffusers`),
with the wrappers that conversion drops (`main.`, `op_list.`) put back where efficientvit's dc_ae.py has them.

The variant (f32c32, f64c128, f128c512; SANA's or the in/mix releases') is read off config.json or the
tensor shapes, never a name."""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import Tensor

from ..config import AutoencoderConfig

ARCH = "dcae"
DIFFUSERS_CLASSES = ("AutoencoderDC",)
FAMILY = None  # three published families share the names: the shapes pick the preset (checkpoints' rule, said)
LOAD_DTYPE = None
NO_WEIGHTS = None
DIFFUSERS_FRAMES = False

_ACTS = {"rms_norm": "silu", "batch_norm": "relu"}  # a decoder ResBlock's norm and its activation, as released

# ---- config.json -----------------------------------------------------------------------------------


def _per_level(value: Any, n: int) -> tuple:
    return (value,) * n if isinstance(value, str) else tuple(value)


def config_from_diffusers(d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
    default_ch = (128, 256, 512, 512, 1024, 1024)
    ch = tuple(d.get("encoder_block_out_channels", default_ch))
    n = len(ch)
    if tuple(d.get("decoder_block_out_channels", default_ch)) != ch:
        raise NotImplementedError("encoder and decoder block_out_channels that differ are not implemented (no release has them)")
    types = _per_level(d.get("encoder_block_types", "ResBlock"), n)
    if _per_level(d.get("decoder_block_types", "ResBlock"), n) != types:
        raise NotImplementedError("encoder and decoder block types that differ are not implemented (no release has them)")
    norms = _per_level(d.get("decoder_norm_types", "rms_norm"), n)
    acts = _per_level(d.get("decoder_act_fns", "silu"), n)
    for t, norm, act in zip(types, norms, acts):
        if norm not in _ACTS or (t == "ResBlock" and act != _ACTS[norm]):
            raise NotImplementedError(f"decoder norm {norm!r} with activation {act!r}: vaekit implements rms_norm + silu "
                                      "and batch_norm + relu")  # fmt: skip
    default_scales = ((), (), (), (5,), (5,), (5,))
    scales = {tuple(s) for key in ("encoder_qkv_multiscales", "decoder_qkv_multiscales")
              for t, s in zip(types, d.get(key, default_scales)) if t == "EfficientViTBlock"}  # fmt: skip
    if len(scales) > 1:
        raise NotImplementedError(f"qkv_multiscales that differ between EfficientViT levels are not implemented: {sorted(scales)}")
    if not (d.get("encoder_out_shortcut", True) and d.get("decoder_in_shortcut", True)) or d.get("decoder_conv_act_fn", "relu") != "relu":
        raise NotImplementedError("encoder_out_shortcut / decoder_in_shortcut false or decoder_conv_act_fn other than relu: "
                                  "not implemented (no release has them)")  # fmt: skip
    down, up = d.get("downsample_block_type", "pixel_unshuffle"), d.get("upsample_block_type", "pixel_shuffle")
    resample = {(True, True): "shuffle", (False, False): "conv"}.get((down == "pixel_unshuffle", up != "interpolate"))
    if resample is None:
        raise NotImplementedError(f"downsample_block_type {down!r} with upsample_block_type {up!r}: vaekit implements "
                                  "pixel_unshuffle + pixel_shuffle and conv + interpolate")  # fmt: skip
    in_channels = d.get("in_channels", 3)
    config = AutoencoderConfig(
        arch=ARCH, kind="ae", in_channels=in_channels, out_channels=in_channels, block_channels=ch,
        latent_channels=d.get("latent_channels", 32), use_quant_conv=False, use_post_quant_conv=False, mid_attention=False,
        block_types=types,
        encoder_layers=tuple(d.get("encoder_layers_per_block", (2, 2, 2, 3, 3, 3))),
        decoder_layers=tuple(d.get("decoder_layers_per_block", (3, 3, 3, 3, 3, 3))), decoder_norms=norms, resample=resample,
        attention_head_dim=d.get("attention_head_dim", 32), attention_scales=next(iter(scales), ()),
        scaling_factor=float(d.get("scaling_factor") or 1.0),
    )  # fmt: skip
    return config, True


def diffusers_config(c: AutoencoderConfig) -> dict[str, Any]:
    scales = [list(c.attention_scales) if t == "EfficientViTBlock" else [] for t in c.block_types]
    return {
        "_class_name": DIFFUSERS_CLASSES[0], "_diffusers_version": "0.32.0", "in_channels": c.in_channels,
        "latent_channels": c.latent_channels, "attention_head_dim": c.attention_head_dim,
        "encoder_block_types": list(c.block_types), "decoder_block_types": list(c.block_types),
        "encoder_block_out_channels": list(c.block_channels), "decoder_block_out_channels": list(c.block_channels),
        "encoder_layers_per_block": list(c.encoder_layers), "decoder_layers_per_block": list(c.decoder_layers),
        "encoder_qkv_multiscales": scales, "decoder_qkv_multiscales": scales,
        "upsample_block_type": "pixel_shuffle" if c.resample == "shuffle" else "interpolate",
        "downsample_block_type": "pixel_unshuffle" if c.resample == "shuffle" else "conv",
        "decoder_norm_types": list(c.decoder_norms), "decoder_act_fns": [_ACTS[n] for n in c.decoder_norms],
        "encoder_out_shortcut": True, "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu",
        "scaling_factor": c.scaling_factor,
    }  # fmt: skip


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    return config.arch == ARCH  # every dcae config is one of AutoencoderDC's


# ---- names -----------------------------------------------------------------------------------------

# The model's (diffusers') prefix outside the levels -> MIT Han Lab's.
_ENDS = (("encoder.conv_in.", "encoder.project_in.conv."), ("encoder.conv_out.", "encoder.project_out.main.op_list.0.conv."),
         ("decoder.conv_in.", "decoder.project_in.main.conv."), ("decoder.norm_out.", "decoder.project_out.op_list.0."),
         ("decoder.conv_out.", "decoder.project_out.op_list.2.conv."))  # fmt: skip
# Inside a level's block (after `{level}.{i}.`): the model's -> MIT Han Lab's. ResBlock, EfficientViT block, resampling.
_BLOCK = (("conv1.", "main.conv1.conv."), ("conv2.", "main.conv2.conv."), ("norm.", "main.conv2.norm."),
          ("attn.to_out.", "context_module.main.proj.conv."), ("attn.norm_out.", "context_module.main.proj.norm."),
          ("conv_out.conv_inverted.", "local_module.main.inverted_conv.conv."),
          ("conv_out.conv_depth.", "local_module.main.depth_conv.conv."),
          ("conv_out.conv_point.", "local_module.main.point_conv.conv."),
          ("conv_out.norm.", "local_module.main.point_conv.norm."))  # fmt: skip
_LEVELS = (("encoder.down_blocks.", "encoder.stages."), ("decoder.up_blocks.", "decoder.stages."))
_QKV = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")


def recognise(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if any(k.startswith(("encoder.stages.", "decoder.project_in.main.")) for k in keys):
        return "MIT Han Lab DC-AE layout (efficientvit)"
    if "decoder.norm_out.bias" in keys and any(re.match(r"(encoder\.down|decoder\.up)_blocks\.\d+\.\d+\.", k) for k in keys):
        return "diffusers AutoencoderDC naming"
    return None


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    return dict(tensors)  # the model's names are diffusers'


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        m = re.match(r"(encoder\.down_blocks\.|decoder\.up_blocks\.)(\d+)\.(\d+)\.(.*)", key)
        if m is None:
            prefix, theirs = next((p, q) for p, q in _ENDS if key.startswith(p))
            out[theirs + key[len(prefix):]] = t
            continue
        part, level, i, rest = m.groups()
        head = f"{dict(_LEVELS)[part]}{level}.op_list.{i}."
        if rest in _QKV:
            if rest == _QKV[0]:  # q, k and v are one 1x1 conv in MIT's files
                base = key[: -len(rest)]
                out[head + "context_module.main.qkv.conv.weight"] = _cat([tensors[base + n] for n in _QKV])
        elif s := re.match(r"attn\.to_qkv_multiscale\.(\d+)\.proj_(in|out)\.weight", rest):
            out[f"{head}context_module.main.aggreg.{s[1]}.{0 if s[2] == 'in' else 1}.weight"] = t
        elif rest.startswith("conv."):  # a resampling: a ConvLayer inside its layer, except SANA's stride-2 conv
            inner = "main.conv." if part.startswith("encoder") and config.resample == "conv" else "main.conv.conv."
            out[head + inner + rest[len("conv."):]] = t
        else:
            prefix, theirs = next((p, q) for p, q in _BLOCK if rest.startswith(p))
            out[head + theirs + rest[len(prefix):]] = t[:, :, None, None] if rest == "attn.to_out.weight" else t
    return out


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    if not recognise(tensors) or recognise(tensors).startswith("diffusers"):
        return dict(tensors)
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        m = re.match(r"(encoder\.stages\.|decoder\.stages\.)(\d+)\.op_list\.(\d+)\.(.*)", key)
        if m is None:
            prefix, ours = next((q, p) for p, q in _ENDS if key.startswith(q))
            out[ours + key[len(prefix):]] = t
            continue
        part, level, i, rest = m.groups()
        head = f"{next(p for p, q in _LEVELS if q == part)}{level}.{i}."
        if rest == "context_module.main.qkv.conv.weight":
            for name, w in zip(_QKV, t.flatten(1).chunk(3, dim=0)):
                out[head + name] = w
        elif s := re.match(r"context_module\.main\.aggreg\.(\d+)\.([01])\.weight", rest):
            out[f"{head}attn.to_qkv_multiscale.{s[1]}.proj_{'in' if s[2] == '0' else 'out'}.weight"] = t
        elif rest.startswith("main.conv."):  # a resampling
            inner = rest[len("main.conv."):]
            out[head + "conv." + inner.removeprefix("conv.")] = t
        else:
            prefix, ours = next((q, p) for p, q in _BLOCK if rest.startswith(q))
            out[head + ours + rest[len(prefix):]] = t.flatten(1) if ours == "attn.to_out." else t
    return out


def _cat(ts: list[Tensor]) -> Tensor:
    return torch.cat(ts)[:, :, None, None]


# ---- config from shapes ----------------------------------------------------------------------------


def config_from_tensors(t: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
    """The architecture from native-named tensor shapes. A first level with no blocks (the in/mix releases,
    whose stem halves the side) has no weights of its own: its width, unused, is taken as half the next."""
    notes = []

    def blocks(part: str, level: int) -> list[int]:
        return sorted({int(m[1]) for k in t if (m := re.match(rf"{part}\.{level}\.(\d+)\.(conv1|attn)\.", k))})

    levels = 1 + max(int(m[1]) for k in t if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    enc = [len(blocks("encoder.down_blocks", i)) for i in range(levels)]
    dec = [len(blocks("decoder.up_blocks", i)) for i in range(levels)]
    types, widths, norms = [], [], []
    for i in range(levels):
        first = f"encoder.down_blocks.{i}.0."
        attention = f"{first}attn.to_q.weight" in t
        types.append("EfficientViTBlock" if attention else "ResBlock")
        widths.append(t[f"{first}attn.to_q.weight"].shape[1] if attention else t[f"{first}conv1.weight"].shape[0] if enc[i] else 0)
        batch = any(k.startswith(f"decoder.up_blocks.{i}.") and k.endswith(("norm.running_mean", "norm_out.running_mean")) for k in t)
        norms.append("batch_norm" if batch else "rms_norm")
    if not enc[0]:
        widths[0], norms[0] = widths[1] // 2, norms[1]
        notes.append(f"its first level has no blocks: width {widths[0]} (unused) assumed")
    stem = t.get("encoder.conv_in.weight", t.get("encoder.conv_in.conv.weight"))
    down = next(t[f"encoder.down_blocks.{i}.{enc[i]}.conv.weight"] for i in range(levels - 1) if enc[i])
    i = next(i for i in range(levels - 1) if enc[i])
    resample = "shuffle" if down.shape[0] * 4 == widths[i + 1] else "conv"
    scales = sorted({int(m[1]) for k in t if (m := re.match(r"encoder\.down_blocks\.\d+\.\d+\.attn\.to_qkv_multiscale\.(\d+)\.", k))})
    first = next((k[: -len("to_q.weight")] for k in t if k.startswith("encoder.") and k.endswith("attn.to_q.weight")), None)
    kernels = tuple(t[f"{first}to_qkv_multiscale.{s}.proj_in.weight"].shape[-1] for s in scales) if first else ()
    if kernels:
        head_dim = t[f"{first}to_qkv_multiscale.0.proj_out.weight"].shape[1]
    else:
        head_dim = 32
        notes.append("attention_head_dim 32 assumed (every release's; no multi-scale weights show it)")
    config = AutoencoderConfig(
        arch=ARCH, kind="ae", in_channels=stem.shape[1], out_channels=stem.shape[1], block_channels=tuple(widths),
        latent_channels=t["decoder.conv_in.weight"].shape[1], use_quant_conv=False, use_post_quant_conv=False, mid_attention=False,
        block_types=tuple(types), encoder_layers=tuple(enc), decoder_layers=tuple(dec), decoder_norms=tuple(norms),
        resample=resample, attention_head_dim=head_dim, attention_scales=kernels,
    )  # fmt: skip
    return config, f"config inferred from tensor shapes ({ARCH} layout" + "".join(f"; {n}" for n in notes) + ")"
