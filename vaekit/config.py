"""One dataclass that describes an autoencoder, and the presets of the real families.

Everything a model needs to be rebuilt lives here: the architecture (so a checkpoint plus this
config is the whole model) and the latent normalisation (so a diffusion model sees unit-variance
latents). Real families keep their exact published architecture; training-speed options added
for new models are fields with defaults that leave those presets untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Literal


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    # One entry per resolution level; n levels downsample by 2**(n-1).
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    # The decoder's own widths, one per level like block_channels (FLUX.2's small decoder: a narrower decoder behind
    # FLUX.2's encoder, diffusers' AutoencoderKLFlux2 `decoder_block_out_channels`; Wan 2.2's wider one, 256 base
    # channels against 160). None: the encoder's, which is every
    # other model; a tuple equal to block_channels is stored as None, so both spell one config, and to_dict leaves
    # None out. `decoder_channels` is the widths the decoder has either way.
    decoder_block_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 4
    kind: Literal["vae", "ae"] = "vae"  # Gaussian posterior, or a deterministic latent
    use_quant_conv: bool = True  # 1x1 conv after the encoder (SD1/SDXL have it, SD3/Flux.1 do not)
    use_post_quant_conv: bool = True  # 1x1 conv before the decoder
    mid_attention: bool = True
    norm_groups: int = 32
    # Latent normalisation, what a diffusion model sees (applied by Autoencoder.normalize only):
    # "affine": (z - shift_factor) * scaling_factor (SD, SDXL, SD3, FLUX.1);
    # "channel": (z - latents_mean[c]) * scaling_factor / latents_std[c] per latent channel (Qwen-Image,
    #   Wan 2.1 and Wan 2.2 with scale 1; Playground v2.5's AutoencoderKL config);
    # "patch_bn": 2x2 latent patches (4x the channels at half the side) normalised by the model's
    #   BatchNorm running statistics, eps PATCH_BN_EPS (FLUX.2); the statistics are weights (`bn.*`).
    latent_norm: Literal["affine", "channel", "patch_bn"] = "affine"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    # Architecture: "ldm" is the SD/SDXL/SD3/FLUX.1/FLUX.2 encoder-decoder (vaekit.model.ldm); "pixel"
    # no network at all, pixels folded into channels by patch_size (vaekit.model.pixel); "qwenimage"
    # Qwen-Image's (Wan 2.1's) causal video VAE run on one frame (vaekit.model.qwenimage); "hunyuanimage"
    # Hunyuan Image 2.1's DC-AE-style VAE (vaekit.model.hunyuanimage); "wan22" Wan 2.2's residual video VAE
    # (2x2 patches, avg shortcuts) run on one frame (vaekit.model.wan22); "dcae" MIT Han Lab's deep compression
    # autoencoder of SANA (vaekit.model.dcae; always kind "ae", no quant convs); "kvae" Kandinsky Lab's KVAE 2D
    # (vaekit.model.kvae; no quant convs, no attention, latent-conditioned decoder norms); "hunyuanvideo15"
    # HunyuanVideo-1.5's causal video VAE (Hunyuan Image 2.1's refiner) run on one frame (vaekit.model.hunyuanvideo15);
    # "hunyuanimage3" Hunyuan Image 3.0's GroupNorm 3D-conv VAE on an image's clip of frames (vaekit.model.hunyuanimage3);
    # "taesd" madebyollin's tiny preview autoencoder, or the linear preview (vaekit.model.taesd; options below).
    arch: Literal["ldm", "pixel", "qwenimage", "hunyuanimage", "wan22", "dcae", "kvae", "hunyuanvideo15", "hunyuanimage3", "taesd"] = "ldm"
    # How many of the first levels halve the resolution; None: every level but the last (Hunyuan Image's
    # releases differ only in this: 5 of 6 levels for 32x, 4 for 16x).
    downsample_levels: int | None = None
    # Video VAEs: which downsamplings also halve time. One frame never runs those layers, but their
    # weights exist, so the architecture needs to know where they are (hunyuanimage3 does run them: an image
    # enters as 2**sum(temporal_downsample) frames that they fold into one).
    temporal_downsample: tuple[bool, ...] = ()
    # wan22 only: the causal convolutions stored as the 2D ones they are on one frame (kernel k x k, the time
    # convolutions 1x1), as Qwen-Image 2.1's image-only AutoencoderKLQwenImage21 has them; False: Wan's 5D video weights.
    image_convs: bool = False
    # Which published model this is ("sd1", "flux1", ...), or "" for a custom one.
    family: str = ""
    # Options for fast-training new models (docs/TRAINING.md); the defaults are the LDM architecture.
    # shortcuts: DC-AE's residual autoencoding. Each resampling also changes the channel count and
    # adds a parameter-free path (2x2 pixels into channels, averaged; or channels repeated into 2x2
    # pixels), and so does the latent bottleneck, so even the untrained model passes a thumbnail.
    shortcuts: bool = False
    # patch_size: pixels per side folded into channels before the first conv and unfolded after the
    # last, so the full-resolution convolutions (most of the compute) run at 1/patch_size.
    patch_size: int = 1
    # patch_out: how the decoder gets back to full resolution after a patch stem. "shuffle": its last conv
    # makes patch_size^2 pixels per position (each position of the patch has its own weights, which can
    # show as a patch_size-periodic grid); "nearest": the features are upsampled and the last conv runs at
    # full resolution (one set of weights for every pixel: no grid; the conv is cheap at 3 outputs).
    patch_out: Literal["shuffle", "nearest"] = "shuffle"
    # thumbnail_shortcut: the first in_channels latent channels carry the image's factor x factor box
    # means (added to the encoder's mean) and the decoder adds their bilinear upsampling to its output;
    # the convs around the latent start at zero, so the untrained model is a thumbnail coder, exact on
    # flat colours and linear gradients, and training learns only the detail on top (docs/TRAINING.md).
    thumbnail_shortcut: bool = False
    # DC-AE (arch "dcae") only; diffusers' AutoencoderDC options, with its names for the values. Per level:
    # block_types: "ResBlock" (conv, conv, norm) or "EfficientViTBlock" (ReLU linear attention + GLU
    #   MBConv), the same in the encoder and the decoder;
    # encoder_layers / decoder_layers: blocks per level (a level of 0 blocks: the stem/last conv resamples);
    # decoder_norms: the decoder ResBlocks' norm, "rms_norm" (with SiLU) or "batch_norm" (with ReLU); the
    #   encoder's are all "rms_norm", every EfficientViT block's too.
    # resample: "shuffle" (3x3 conv + pixel (un)shuffle: the in/mix releases) or "conv" (stride-2 conv down,
    #   nearest x2 + conv up: SANA's f32c32); both with DC-AE's parameter-free channel shortcuts.
    # attention_head_dim: channels per linear-attention head; attention_scales: kernel sizes of the
    #   multi-scale q/k/v aggregation (SANA's f32c32: (5,); the in/mix releases: none).
    block_types: tuple[str, ...] = ()
    encoder_layers: tuple[int, ...] = ()
    decoder_layers: tuple[int, ...] = ()
    decoder_norms: tuple[str, ...] = ()
    resample: Literal["shuffle", "conv"] = "shuffle"
    attention_head_dim: int = 32
    attention_scales: tuple[int, ...] = ()
    # Preview models (arch "taesd", vaekit.model.taesd, docs/PREVIEWS.md). Their latents are their teacher's normalised
    # ones (its `to_latent`, what its diffusion model sees), so their own normalisation is the identity, and they say whose:
    # teacher: the teacher's family ("flux1"), or "weights:<hash>" for a model without one (`vaekit.latents.weights_hash`);
    # teacher_normalisation: its `latent_space`, so a recalibrated teacher's latents are told apart;
    # latent_patches: the latent is 2x2 patches of the network's (4x the channels at half the side: FLUX.2's `to_latent`
    #   layout), unpacked inside, so the network sees 32 channels at 8x, as madebyollin's taef2 does;
    # midblock_gn: taef2's GroupNorm branch in the blocks at latent resolution (taesd.py's `use_midblock_gn`);
    # decoder_only: no encoder (a released decoder file alone, every linear preview): `encode` refuses;
    # linear: the linear preview (ComfyUI's latent_rgb_factors and _bias): a 1x1 conv at latent resolution, bilinearly
    #   upsampled; its block_channels are out_channels per level (no features: the levels fix the factor, as everywhere);
    # linear_skip: a tiny decoder plus a linear preview beside it (`vaekit distill`'s default: it starts from the fitted
    #   linear preview and learns what that misses); vaekit's files only, not taesd.py's or AutoencoderTiny's.
    teacher: str = ""
    teacher_normalisation: str = ""
    latent_patches: bool = False
    midblock_gn: bool = False
    decoder_only: bool = False
    linear: bool = False
    linear_skip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_channels", tuple(int(c) for c in self.block_channels))
        if self.decoder_block_channels is not None:
            widths = tuple(int(c) for c in self.decoder_block_channels)
            object.__setattr__(self, "decoder_block_channels", None if widths == self.block_channels else widths)
        for name in ("latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        object.__setattr__(self, "temporal_downsample", tuple(bool(v) for v in self.temporal_downsample))
        for name, kind in (("block_types", str), ("encoder_layers", int), ("decoder_layers", int), ("decoder_norms", str),
                           ("attention_scales", int)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        if self.kind not in ("vae", "ae"):
            raise ValueError(f"kind must be 'vae' or 'ae', got {self.kind!r}")
        if self.arch not in ARCHS and ARCHS:  # none yet: the presets below, checked when they are registered
            raise ValueError(f"unknown architecture {self.arch!r}; this vaekit knows {', '.join(ARCHS)}")
        if self.latent_norm not in ("affine", "channel", "patch_bn"):
            raise ValueError(f"unknown latent_norm {self.latent_norm!r}; use 'affine', 'channel' or 'patch_bn'")
        if self.latent_norm == "channel" and not (len(self.latents_mean) == len(self.latents_std) == self.latent_channels):
            raise ValueError(f"latent_norm 'channel' needs latents_mean and latents_std of {self.latent_channels} values each")
        if self.arch == "pixel":
            if self.kind != "ae" or self.latent_channels != self.in_channels * self.patch_size**2 or self.use_quant_conv or self.use_post_quant_conv:
                raise ValueError(f"a pixel-space model is kind 'ae' with latent_channels = in_channels x patch_size^2 "
                                 f"({self.in_channels * self.patch_size ** 2}) and no quant convs")  # fmt: skip
            return
        if not self.block_channels:
            raise ValueError("block_channels needs at least one level")
        bad = [c for c in self.block_channels if c % self.norm_groups] if self.arch in ("ldm", "hunyuanimage", "kvae", "hunyuanimage3") else []
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} must divide every block channel count; {bad} do not")
        if self.decoder_block_channels is not None:
            if self.arch not in ("ldm", "wan22") or self.shortcuts:
                raise ValueError("decoder_block_channels is an option of the ldm architecture (without shortcuts) and of wan22")
            if len(self.decoder_block_channels) != len(self.block_channels):
                raise ValueError(f"decoder_block_channels needs one width per level, as block_channels "
                                 f"({len(self.block_channels)}), got {len(self.decoder_block_channels)}")  # fmt: skip
            bad = [c for c in self.decoder_block_channels if c <= 0 or (self.arch == "ldm" and c % self.norm_groups)]
            if bad:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every decoder block channel count; {bad} do not")
        if self.arch == "dcae":
            self._check_dcae()
        elif self.resample != "shuffle" or any((self.block_types, self.encoder_layers, self.decoder_layers, self.decoder_norms,
                                                self.attention_scales)):
            raise ValueError("block_types, encoder_layers, decoder_layers, decoder_norms, resample and attention_scales are options "
                             "of the dcae architecture")  # fmt: skip
        if self.arch == "kvae" and (self.use_quant_conv or self.use_post_quant_conv or self.mid_attention or self.norm_groups != 32
                                    or self.downsample_levels is not None):
            raise ValueError("a kvae model has no quant convs (use_quant_conv=use_post_quant_conv=False), no mid attention "
                             "(mid_attention=False), norm_groups 32 and every level but the last downsampling "
                             "(downsample_levels None)")  # fmt: skip
        if self.arch == "taesd":
            self._check_taesd()
        elif any((self.teacher, self.teacher_normalisation, self.latent_patches, self.midblock_gn, self.decoder_only, self.linear,
                  self.linear_skip)):
            raise ValueError("teacher, teacher_normalisation, latent_patches, midblock_gn, decoder_only, linear and linear_skip are options of "
                             "the taesd architecture (preview models)")  # fmt: skip
        if self.image_convs and self.arch != "wan22":
            raise ValueError("image_convs is an option of the wan22 architecture (Qwen-Image 2.1's 2D weights)")
        if self.arch != "ldm" and self.shortcuts:
            raise ValueError("shortcuts are an option of the ldm architecture")
        if self.thumbnail_shortcut and (self.arch != "ldm" or not self.in_channels == self.out_channels <= self.latent_channels):
            raise ValueError("thumbnail_shortcut is an option of the ldm architecture with out_channels = in_channels <= latent_channels")
        if self.patch_out not in ("shuffle", "nearest"):
            raise ValueError(f"patch_out must be 'shuffle' or 'nearest', got {self.patch_out!r}")
        if self.patch_size not in (1, 2) or (self.patch_size != 1 and self.arch not in ("ldm", "wan22")):
            raise ValueError(f"patch_size must be 1 (or 2 for the ldm and wan22 architectures), got {self.patch_size}")
        if self.downsample_levels is not None and not 0 <= self.downsample_levels < len(self.block_channels):
            raise ValueError(f"downsample_levels must be in 0..{len(self.block_channels) - 1}, got {self.downsample_levels}")
        downsamplings = self.downsample_levels if self.downsample_levels is not None else len(self.block_channels) - 1
        if self.temporal_downsample and len(self.temporal_downsample) != downsamplings:
            raise ValueError(f"temporal_downsample needs one flag per downsampling ({downsamplings})")
        if self.shortcuts:
            ch = self.block_channels
            bad = [(a, b) for a, b in zip(ch, ch[1:]) if (4 * a) % b]
            if bad:
                raise ValueError(f"shortcuts need each level's channels to divide 4x the level before; {bad} do not")
            if ch[-1] % self.latent_channels:
                raise ValueError(f"shortcuts need latent_channels ({self.latent_channels}) to divide block_channels[-1] ({ch[-1]})")

    def _check_dcae(self) -> None:
        n = len(self.block_channels)
        if self.kind != "ae" or self.use_quant_conv or self.use_post_quant_conv or self.downsample_levels is not None:
            raise ValueError("a dcae model is kind 'ae' with no quant convs (use_quant_conv=use_post_quant_conv=False) "
                             "and every level resampling (downsample_levels None)")  # fmt: skip
        if self.in_channels != self.out_channels:
            raise ValueError("a dcae model has out_channels = in_channels (diffusers' AutoencoderDC has one in_channels)")
        for name in ("block_types", "encoder_layers", "decoder_layers", "decoder_norms"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"dcae: {name} needs one entry per level ({n}), got {list(getattr(self, name))}")
        if bad := sorted(set(self.block_types) - {"ResBlock", "EfficientViTBlock"}):
            raise ValueError(f"dcae block_types are 'ResBlock' or 'EfficientViTBlock', got {bad}")
        if bad := sorted(set(self.decoder_norms) - {"rms_norm", "batch_norm"}):
            raise ValueError(f"dcae decoder_norms are 'rms_norm' or 'batch_norm', got {bad}")
        if self.resample not in ("shuffle", "conv"):
            raise ValueError(f"dcae resample is 'shuffle' or 'conv', got {self.resample!r}")
        if any(v < 0 for v in self.encoder_layers + self.decoder_layers) or n < 2 or 0 in self.encoder_layers[1:] + self.decoder_layers[1:]:
            raise ValueError("dcae: at least 2 levels, and only the first level may have 0 blocks")
        if (self.encoder_layers[0] == 0) != (self.decoder_layers[0] == 0):
            raise ValueError("dcae: the first level has 0 blocks in both the encoder and the decoder, or in neither")
        attention = [c for c, t in zip(self.block_channels, self.block_types) if t == "EfficientViTBlock"]
        if self.attention_head_dim < 1 or any(c % self.attention_head_dim for c in attention):
            raise ValueError(f"dcae: attention_head_dim {self.attention_head_dim} must divide the channels of every "
                             f"EfficientViT level {attention}")  # fmt: skip
        ch = self.block_channels
        if any((4 * a) % b for a, b in zip(ch, ch[1:])) or ch[-1] % self.latent_channels:
            raise ValueError(f"dcae shortcuts need each level's channels to divide 4x the level before's, and latent_channels "
                             f"to divide {ch[-1]}")  # fmt: skip
        if self.resample == "shuffle" and any(c % 4 for c in ch[1:]):
            raise ValueError(f"dcae resample 'shuffle' needs the channels of every level after the first to be multiples "
                             f"of 4, got {list(ch)}")  # fmt: skip

    def _check_taesd(self) -> None:
        if (self.kind != "ae" or self.use_quant_conv or self.use_post_quant_conv or self.mid_attention or self.patch_size != 1
                or self.downsample_levels is not None):
            raise ValueError("a taesd model is kind 'ae' with no quant convs (use_quant_conv=use_post_quant_conv=False), no mid "
                             "attention (mid_attention=False), patch_size 1 and every level but the last downsampling")  # fmt: skip
        if (self.latent_norm, self.scaling_factor, self.shift_factor) != ("affine", 1.0, 0.0):
            raise ValueError("a preview's latents are its teacher's normalised ones: its own normalisation is the identity "
                             "(latent_norm 'affine', scale 1, shift 0); the teacher's is `teacher_normalisation`")  # fmt: skip
        if len(self.block_channels) < 2 or len(set(self.block_channels)) != 1 or self.layers_per_block < 1:
            raise ValueError(f"a taesd model has one width at every level, at least 2 levels and at least one block per level "
                             f"(the released files and diffusers' AutoencoderTiny), got block_channels {list(self.block_channels)} "
                             f"and layers_per_block {self.layers_per_block}")  # fmt: skip
        if self.latent_patches and self.latent_channels % 4:
            raise ValueError(f"latent_patches: the latent is 2x2 patches, so latent_channels ({self.latent_channels}) is 4x the network's")
        if self.linear and not (self.decoder_only and not self.midblock_gn and self.block_channels[0] == self.out_channels):
            raise ValueError(f"a linear preview is decoder_only, has no midblock_gn, and its block_channels are its out_channels "
                             f"({self.out_channels}) at every level")  # fmt: skip
        if self.linear and self.linear_skip:
            raise ValueError("linear_skip adds a linear preview to a tiny decoder; a linear preview (linear) has none to add")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor: image side / latent side (of `encode`'s latents)."""
        if self.arch == "pixel":
            return self.patch_size
        levels = self.downsample_levels if self.downsample_levels is not None else len(self.block_channels) - 1
        return self.patch_size * 2**levels * (2 if self.latent_patches else 1)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The decoder's widths per level (from the image side, as block_channels): its own, or the encoder's."""
        return self.decoder_block_channels if self.decoder_block_channels is not None else self.block_channels

    @property
    def rgba(self) -> bool:
        """Whether images are RGBA (4 channels, e.g. Qwen-Image 2.1): read with their alpha kept, written as RGBA PNGs."""
        return self.in_channels == 4

    @property
    def moment_channels(self) -> int:
        """Channels of the encoder's output: a VAE's mean and log-variance, an AE's latent alone."""
        return 2 * self.latent_channels if self.kind == "vae" else self.latent_channels

    @property
    def normalised_shape(self) -> tuple[int, int]:
        """(channels, factor) of the normalised latents `to_latent` returns (FLUX.2: 4x the channels at 2x the factor)."""
        if self.latent_norm == "patch_bn":
            return 4 * self.latent_channels, 2 * self.factor
        return self.latent_channels, self.factor

    @property
    def normalisation(self) -> str:
        """The latent normalisation as one short formula, for people."""
        if self.latent_norm == "patch_bn":
            ch, f = self.normalised_shape
            return f"2x2 patches ({ch} ch at {f}x), BatchNorm stats"
        if self.latent_norm == "channel":
            return f"(z - mean[c]) * {self.scaling_factor:g} / std[c]"
        if self.scaling_factor == 1 and self.shift_factor == 0:
            return "none (scale 1)"
        return f"(z - {self.shift_factor:g}) * {self.scaling_factor:g}" if self.shift_factor else f"z * {self.scaling_factor:g}"

    @property
    def diffusers_compatible(self) -> bool:
        """LDM: whether diffusers' AutoencoderKL (AutoencoderKLFlux2) expresses this config, so it loads vaekit's
        diffusers folder. Every architecture's answer: its layout's `diffusers_can_load`. A decoder of its own widths:
        only AutoencoderKLFlux2 (FLUX.2's patch_bn latents) has `decoder_block_out_channels`."""
        own_decoder = self.decoder_block_channels is not None and self.latent_norm != "patch_bn"
        return (self.arch == "ldm" and self.kind == "vae" and not (self.shortcuts or self.thumbnail_shortcut or own_decoder)
                and self.patch_size == 1)  # fmt: skip

    def replace(self, **changes: Any) -> "AutoencoderConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # Options added after configs were first saved are written only when set: every other model's dict (its
        # saved config, its latent datasets' model hash) stays as it was before the option existed.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in LATER_OPTIONS:
            if d[name] == defaults[name]:
                del d[name]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AutoencoderConfig":
        check_fields(cls, d, "config fields")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# AutoencoderConfig fields that to_dict leaves out at their defaults (see there).
LATER_OPTIONS = ("decoder_block_channels", "block_types", "encoder_layers", "decoder_layers", "decoder_norms", "resample",
                 "attention_head_dim", "attention_scales", "image_convs", "teacher", "teacher_normalisation", "latent_patches",
                 "midblock_gn", "decoder_only", "linear", "linear_skip")  # fmt: skip


def check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """A dataclass read from JSON: name unknown keys (typos, newer versions) instead of a TypeError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(names)}")


# The architectures (`arch`) this vaekit knows: the names of the registry vaekit.model.architectures, which
# registers them on import (`import vaekit` does). It imports every architecture's modules, and they this one.
ARCHS: tuple[str, ...] = ()
PATCH_BN_EPS = 1e-4  # FLUX.2's BatchNorm eps (BFL's AutoEncoder.bn_eps, diffusers' batch_norm_eps)


@dataclass(frozen=True)
class Preset:
    config: AutoencoderConfig
    description: str


_SD = AutoencoderConfig()  # the LDM kl-f8 architecture shared by SD1/SD2/SDXL/PixArt
_F16 = _SD.replace(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
_TINY = AutoencoderConfig(block_channels=(32, 64, 128, 128), layers_per_block=1, norm_groups=8)
# About as big as _TINY, but it trains in minutes on a CPU (docs/TRAINING.md).
_FAST = AutoencoderConfig(
    block_channels=(32, 64, 128), layers_per_block=1, norm_groups=8, patch_size=2, shortcuts=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_attention=False,
)  # fmt: skip
# The quickstart's model: _FAST's size and stem, but it starts as a thumbnail coder and has no pixel shuffles.
_THUMB = _FAST.replace(shortcuts=False, patch_out="nearest", thumbnail_shortcut=True)

# Qwen-Image's per-channel latent statistics (diffusers' AutoencoderKLQwenImage defaults, the release's config).
_QWEN_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
_QWEN_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip

# Wan 2.2's (TI2V-5B) per-channel latent statistics: diffusers' scripts/convert_wan_to_diffusers.py
# (vae22_diffusers_config, the config of Wan-AI/Wan2.2-TI2V-5B-Diffusers' vae/), the same numbers as Wan 2.2's own
# wan/modules/vae2_2.py (Wan2_2_VAE). Wan 2.1's are Qwen-Image's above: AutoencoderKLWan's defaults, which the same
# script's convert_vae() keeps for every Wan 2.1 model, as Wan 2.1's wan/modules/vae.py (WanVAE) has them.
_WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
               0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
               -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
               -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)  # fmt: skip
_WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
              0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
              0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
              0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)  # fmt: skip
# Qwen-Image 2.1's (diffusers' AutoencoderKLQwenImage21 defaults, diffusers 0.42.1, which QwenImage21Pipeline reads
# from vae.config: (z - latents_mean) / latents_std on encode, z * std + mean before decode). The Hub's
# Qwen/Qwen-Image-2.1 vae/config.json was not read here: these are the class's defaults, not checked against it.
_QWEN21_MEAN = (0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732,
                0.7562, -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
                -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555,
                0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
                -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632,
                0.5547, -1.7121, -0.1562, 0.0304)  # fmt: skip
_QWEN21_STD = (3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904, 2.8778,
               3.7675, 3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513,
               3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467, 3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063,
               5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.0550,
               5.5614, 4.2963, 4.4080, 3.4959, 3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161)  # fmt: skip
_QWEN = AutoencoderConfig(
    arch="qwenimage", block_channels=(96, 192, 384, 384), layers_per_block=2, latent_channels=16,
    temporal_downsample=(False, True, True), latent_norm="channel", latents_mean=_QWEN_MEAN, latents_std=_QWEN_STD,
)  # fmt: skip

# DC-AE (arch "dcae"): diffusers' scripts/convert_dcae_to_diffusers.py, get_ae_config. SANA 1.0's f32c32
# ("dc-ae-f32c32-sana-1.0": stride-2 conv / nearest+conv resampling, multi-scale (5,) attention); the in/mix
# releases' f64c128 and f128c512 (a stem that halves the side, BatchNorm+ReLU decoder ResBlocks, no multi-scale).
_DCAE = dict(arch="dcae", kind="ae", use_quant_conv=False, use_post_quant_conv=False, mid_attention=False)  # no mid block
_DCAE_SANA = AutoencoderConfig(
    **_DCAE, block_channels=(128, 256, 512, 512, 1024, 1024), latent_channels=32,
    block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_layers=(2, 2, 2, 3, 3, 3), decoder_layers=(3, 3, 3, 3, 3, 3), decoder_norms=("rms_norm",) * 6, resample="conv",
    attention_scales=(5,),
)  # fmt: skip


def _dcae_mix(levels: int, latent_channels: int) -> AutoencoderConfig:
    return AutoencoderConfig(
        **_DCAE, latent_channels=latent_channels, block_channels=(128, 256, 512, 512, 1024, 1024, 2048, 2048)[:levels],
        block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * (levels - 3),
        encoder_layers=(0, 4, 8) + (2,) * (levels - 3), decoder_layers=(0, 5, 10) + (2,) * (levels - 3),
        decoder_norms=("batch_norm",) * 3 + ("rms_norm",) * (levels - 3), resample="shuffle",
    )  # fmt: skip


PRESETS: dict[str, Preset] = {
    "sd1": Preset(_SD.replace(scaling_factor=0.18215, family="sd1"), "Stable Diffusion 1.x/2.x VAE (kl-f8)"),
    "sdxl": Preset(_SD.replace(scaling_factor=0.13025, family="sdxl"), "SDXL VAE (same architecture, retrained)"),
    "pixart": Preset(
        _SD.replace(scaling_factor=0.18215, family="pixart"),
        "PixArt-alpha (SD's ft-EMA VAE); PixArt-Sigma uses the sdxl preset",
    ),
    "sd3": Preset(_F16.replace(scaling_factor=1.5305, shift_factor=0.0609, family="sd3"), "Stable Diffusion 3/3.5 VAE"),
    "flux1": Preset(_F16.replace(scaling_factor=0.3611, shift_factor=0.1159, family="flux1"), "FLUX.1 VAE (ae.safetensors)"),
    "lumina2": Preset(_F16.replace(scaling_factor=0.3611, shift_factor=0.1159, family="lumina2"), "Lumina Image 2.0 (FLUX.1's VAE)"),
    "flux2": Preset(
        _SD.replace(latent_channels=32, latent_norm="patch_bn", family="flux2"),
        "FLUX.2 VAE (32 channels; its transformer sees 2x2 patches, 128 channels at 16x, BatchNorm-normalised)",
    ),
    # The widths of black-forest-labs/FLUX.2-small-decoder (diffusers PR #13428 added decoder_block_out_channels for
    # it), as its config.json states them according to third-party ports (VincentGourbin/flux-2-swift-mlx PR #76): not
    # read from the Hub here. Its encoder is FLUX.2's, so are the latents: FLUX.2's BatchNorm states them.
    "flux2-small-decoder": Preset(
        _SD.replace(latent_channels=32, latent_norm="patch_bn", decoder_block_channels=(96, 192, 384, 384), family="flux2-small-decoder"),
        "FLUX.2 VAE with BFL's distilled small decoder (widths 96-384 instead of 128-512; FLUX.2's encoder and latents)",
    ),
    "qwenimage": Preset(
        _QWEN.replace(family="qwenimage"), "Qwen-Image VAE (Wan 2.1's causal video VAE on one frame; per-channel mean/std)"
    ),
    "wan2.1": Preset(
        _QWEN.replace(family="wan2.1"),
        "Wan 2.1 VAE, also Wan 2.2 A14B's (diffusers AutoencoderKLWan; Qwen-Image's architecture and statistics) on one frame",
    ),
    "wan2.2": Preset(
        AutoencoderConfig(
            arch="wan22", patch_size=2, block_channels=(160, 320, 640, 640), decoder_block_channels=(256, 512, 1024, 1024),
            layers_per_block=2, latent_channels=48, temporal_downsample=(False, True, True), latent_norm="channel",
            latents_mean=_WAN22_MEAN, latents_std=_WAN22_STD, family="wan2.2",
        ),
        "Wan 2.2 VAE (TI2V-5B; 48 channels at 16x: 2x2 patches, residual blocks, wider decoder) on one frame",
    ),  # fmt: skip
    # AutoencoderKLQwenImage21's defaults (base_dim 96, decoder_base_dim 144, dim_mult [1, 2, 4, 8, 8], z_dim 64,
    # temperal_downsample [False, True, True, True], in/out_channels 4, no patches): Wan 2.2's residual network, 2D weights.
    "qwenimage2.1": Preset(
        AutoencoderConfig(
            arch="wan22", image_convs=True, in_channels=4, out_channels=4, block_channels=(96, 192, 384, 768, 768),
            decoder_block_channels=(144, 288, 576, 1152, 1152), layers_per_block=2, latent_channels=64,
            temporal_downsample=(False, True, True, True), latent_norm="channel", latents_mean=_QWEN21_MEAN,
            latents_std=_QWEN21_STD, family="qwenimage2.1",
        ),
        "Qwen-Image 2.1 VAE (RGBA in and out; 64 channels at 16x; Wan 2.2's residual network with 2D weights; per-channel mean/std)",
    ),  # fmt: skip
    "hunyuanimage": Preset(
        AutoencoderConfig(arch="hunyuanimage", block_channels=(128, 256, 512, 512, 1024, 1024), layers_per_block=2,
                          latent_channels=64, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.75289,
                          family="hunyuanimage"),
        "Hunyuan Image 2.1 VAE (64 channels at 32x; DC-AE-style; its authors run it in fp32)",
    ),  # fmt: skip
    # diffusers' AutoencoderKLHunyuanImageRefiner defaults (scripts/convert_hunyuan_image_to_diffusers.py builds the
    # refiner's VAE with them): latents * 1.03682, no shift (HunyuanImageRefinerPipeline).
    "hunyuanimage-refiner": Preset(
        AutoencoderConfig(arch="hunyuanvideo15", block_channels=(128, 256, 512, 1024, 1024), layers_per_block=2,
                          latent_channels=32, temporal_downsample=(False, False, True, True), use_quant_conv=False,
                          use_post_quant_conv=False, scaling_factor=1.03682, family="hunyuanimage-refiner"),
        "Hunyuan Image 2.1's refiner VAE (HunyuanVideo-1.5's causal video VAE: 32 channels at 16x) on one frame",
    ),
    # Hunyuan Image 3.0's VAE (Tencent's hunyuan_image_3/autoencoder_kl_3d.py, AutoencoderKLConv3D): the `vae` entry of
    # tencent/HunyuanImage-3.0's config.json, as loaders that read it repeat it (block_out_channels [128, 256, 512,
    # 1024, 1024], layers_per_block 2, latent_channels 32, ffactor_spatial 16, ffactor_temporal 4, scaling_factor
    # 0.562679178327931, no shift_factor; the config.json itself was not read here). ffactor_temporal 4: the last two
    # of the four downsamplings halve time (Tencent's Encoder). Its pipeline: (z - shift) * scale when a shift is set.
    "hunyuanimage3": Preset(
        AutoencoderConfig(arch="hunyuanimage3", block_channels=(128, 256, 512, 1024, 1024), layers_per_block=2,
                          latent_channels=32, temporal_downsample=(False, False, True, True), use_quant_conv=False,
                          use_post_quant_conv=False, scaling_factor=0.562679178327931, family="hunyuanimage3"),
        "Hunyuan Image 3.0 VAE (32 channels at 16x; GroupNorm 3D convs: an image enters as 4 frames, folded to one)",
    ),
    "dc-ae-f32c32": Preset(
        _DCAE_SANA.replace(scaling_factor=0.41407, family="dc-ae-f32c32"),
        "SANA's DC-AE f32c32 (mit-han-lab/dc-ae-f32c32-sana-1.0; deterministic, 32 channels at 32x)",
    ),
    "dc-ae-f64c128": Preset(
        _dcae_mix(7, 128).replace(scaling_factor=0.4538, family="dc-ae-f64c128"),
        "DC-AE f64c128 (mit-han-lab/dc-ae-f64c128-mix-1.0; the -in-1.0 release: same network, scale 0.2889)",
    ),
    "dc-ae-f128c512": Preset(
        _dcae_mix(8, 512).replace(scaling_factor=0.3620, family="dc-ae-f128c512"),
        "DC-AE f128c512 (mit-han-lab/dc-ae-f128c512-mix-1.0; the -in-1.0 release: same network, scale 0.4883)",
    ),
    # KVAE 2D (kandinskylab/KVAE-2D-1.0): the defaults of diffusers' AutoencoderKLKVAE and of the authors' KVAE2D
    # (kandinskylab/kvae, kvae/models/kvae_2d.py), which both load it. No pipeline normalises its latents: Kandinsky 5's
    # image pipelines use FLUX.1's AutoencoderKL, and neither the class nor the authors' code has a scale or shift.
    "kvae": Preset(
        AutoencoderConfig(arch="kvae", block_channels=(128, 256, 512, 1024), layers_per_block=2, latent_channels=16,
                          use_quant_conv=False, use_post_quant_conv=False, mid_attention=False, family="kvae"),
        "Kandinsky Lab's KVAE 2D 1.0 (16 channels at 8x; latent-conditioned decoder norms; no published latent scale: 1)",
    ),  # fmt: skip
    "pixel": Preset(
        AutoencoderConfig(arch="pixel", kind="ae", patch_size=1, latent_channels=3, block_channels=(),
                          use_quant_conv=False, use_post_quant_conv=False, family="pixel"),
        "no autoencoder: the pixels themselves (pixel-space diffusion; lossless)",
    ),  # fmt: skip
    "pixel-p2": Preset(
        AutoencoderConfig(arch="pixel", kind="ae", patch_size=2, latent_channels=12, block_channels=(),
                          use_quant_conv=False, use_post_quant_conv=False, family="pixel-p2"),
        "pixels folded 2x2 into 12 channels (lossless)",
    ),  # fmt: skip
    "pixel-p16": Preset(
        AutoencoderConfig(arch="pixel", kind="ae", patch_size=16, latent_channels=768, block_channels=(),
                          use_quant_conv=False, use_post_quant_conv=False, family="pixel-p16"),
        "pixels folded 16x16 into 768 channels, as pixel-space transformers patchify (lossless)",
    ),  # fmt: skip
    "tiny-f8c4": Preset(_TINY.replace(family="tiny-f8c4"), "small 8x/4-channel VAE for tests and demos"),
    "tiny-f8c16": Preset(
        _TINY.replace(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, family="tiny-f8c16"),
        "small 8x/16-channel VAE (Flux.1 layout) for tests and demos",
    ),
    "tiny-fast-f8c4": Preset(
        _FAST.replace(family="tiny-fast-f8c4"),
        "small 8x/4-channel VAE that trains in minutes on a CPU (DC-AE shortcuts, 2x2 patch stem); the quickstart's before tiny-thumb",
    ),
    "tiny-fast-f8c16": Preset(
        _FAST.replace(latent_channels=16, family="tiny-fast-f8c16"), "tiny-fast-f8c4 with 16 latent channels"
    ),
    "tiny-thumb-f8c4": Preset(
        _THUMB.replace(family="tiny-thumb-f8c4"),
        "small 8x/4-channel VAE that starts as a thumbnail coder and trains in minutes on a CPU; the quickstart's",
    ),
    "tiny-thumb-f8c16": Preset(
        _THUMB.replace(latent_channels=16, family="tiny-thumb-f8c16"), "tiny-thumb-f8c4 with 16 latent channels"
    ),
}

# Which published families use a latent channel count: for error messages a user can act on.
FAMILIES_BY_CHANNELS: dict[int, str] = {
    4: "SD1/SDXL family",
    16: "SD3/Flux.1 family",
    32: "Flux.2 family, SANA's DC-AE f32c32, Hunyuan Image 2.1's refiner, or Hunyuan Image 3.0",
    48: "Wan 2.2 family",
    64: "Hunyuan Image 2.1 family, or Qwen-Image 2.1 (RGBA)",
    128: "DC-AE f64c128",
    512: "DC-AE f128c512",
}


def describe_channels(n: int, noun: str) -> str:
    """'16-channel latent (SD3/Flux.1 family)': what a user needs to see to pick the right model."""
    family = FAMILIES_BY_CHANNELS.get(n)
    return f"{n}-channel {noun}" + (f" ({family})" if family else "")


# ---- preview models: a tiny autoencoder (or a linear map) that speaks a teacher's normalised latents ---------------


def latent_space(config: AutoencoderConfig) -> str:
    """What `to_latent` gives, in one line: the normalisation, the shape, and a digest of per-channel statistics (the
    formula alone does not tell two sets apart). A preview records its teacher's (`teacher_normalisation`)."""
    channels, factor = config.normalised_shape
    if config.latent_norm == "patch_bn":
        return config.normalisation  # which says the shape
    space = f"{config.normalisation}; {channels} ch at {factor}x"
    if config.latent_norm == "channel":
        stats = json.dumps([config.latents_mean, config.latents_std, config.scaling_factor]).encode()
        space += f"; statistics {hashlib.sha256(stats).hexdigest()[:8]}"
    return space


def same_latents(a: str, b: str) -> bool:
    """Whether families `a` and `b` share one latent space: the same name, or presets with the same encoder and
    normalisation (FLUX.1 and Lumina 2, Qwen-Image and Wan 2.1, SD1 and PixArt, FLUX.2 and its small decoder)."""
    if a == b:
        return True
    if a not in PRESETS or b not in PRESETS:
        return False
    space = lambda name: PRESETS[name].config.replace(family="", decoder_block_channels=None)  # noqa: E731
    return space(a) == space(b)


def preview_config(teacher: AutoencoderConfig, teacher_name: str | None = None, decoder_only: bool = False,
                   linear: bool = False, width: int = 64, blocks: int = 3, midblock_gn: bool | None = None,
                   linear_skip: bool = False) -> AutoencoderConfig:  # fmt: skip
    """The preview model (arch "taesd") of `teacher`'s latent space: madebyollin's tiny autoencoder (`width` channels,
    `blocks` blocks per level: 1.2M parameters a half at 8x; `linear_skip`: with a linear preview beside its decoder)
    or, with `linear`, the linear preview; its latents are what
    `teacher.to_latent` gives (FLUX.2: 128 channels at 16x, unpacked inside), its images the teacher's (RGBA too).
    `teacher_name`: whose latents they are (default the teacher's family; `vaekit.previews.teacher_name` names a
    model without one by its weights). `midblock_gn`: taef2's GroupNorm branch, by default for FLUX.2's patches."""
    if teacher.arch in ("pixel", "taesd"):
        raise ValueError(f"a {teacher.arch} model has no latent space of its own to preview: give the autoencoder it stands for")
    channels, factor = teacher.normalised_shape
    patches = teacher.latent_norm == "patch_bn"
    network_factor = factor // 2 if patches else factor
    if network_factor < 2 or network_factor & (network_factor - 1):
        raise ValueError(f"a preview upsamples by powers of two from 2; this teacher's latents are at 1/{factor}")
    config = AutoencoderConfig(
        arch="taesd", kind="ae", in_channels=teacher.in_channels, out_channels=teacher.out_channels,
        block_channels=(teacher.out_channels if linear else width,) * network_factor.bit_length(), layers_per_block=blocks,
        latent_channels=channels, use_quant_conv=False, use_post_quant_conv=False, mid_attention=False, latent_patches=patches,
        midblock_gn=not linear and (patches if midblock_gn is None else midblock_gn), decoder_only=decoder_only or linear,
        linear=linear, linear_skip=linear_skip,
    )  # fmt: skip
    return speaking(config, teacher, teacher_name)


def speaking(preview: AutoencoderConfig, teacher: AutoencoderConfig, name: str | None = None) -> AutoencoderConfig:
    """`preview` (a taesd config) as the preview of `teacher`'s latents, named `name` (default its family): the teacher
    recorded, and the family `tae-NAME` for a published teacher's tiny autoencoder. Refused when the shapes differ."""
    if (teacher.normalised_shape, teacher.out_channels) != ((preview.latent_channels, preview.factor), preview.out_channels):
        channels, factor = teacher.normalised_shape
        raise ValueError(f"{name or teacher.family or 'the teacher'} has {describe_channels(channels, 'latents')} at {factor}x "
                         f"and {teacher.out_channels}-channel images; this preview decodes {preview.latent_channels}-channel "
                         f"latents at {preview.factor}x into {preview.out_channels}-channel images")  # fmt: skip
    name = teacher.family if name is None else name
    family = f"tae-{name}" if name in PRESETS and not preview.linear else ""
    return preview.replace(teacher=name, teacher_normalisation=latent_space(teacher), family=family)


def preview_refusal(preview: AutoencoderConfig, latents: AutoencoderConfig, weights: str | None = None) -> str | None:
    """Why `preview` cannot decode the normalised latents of the model `latents` describes (whose weights hash is
    `weights`, `vaekit.latents.weights_hash`), in words for an error; None when it speaks them: the same teacher (a
    family, one sharing its latent space, or the same weights) and the same normalisation."""
    if not preview.teacher:
        return "the preview does not say whose latents it speaks: load it with family=... (--family) naming its teacher"
    if latents.arch == "taesd":  # latents a preview encoded: its teacher's
        name, space = latents.teacher, latents.teacher_normalisation
    else:
        name, space = latents.family or (f"weights:{weights}" if weights else ""), latent_space(latents)
    if name and same_latents(preview.teacher, name) and preview.teacher_normalisation == space:
        return None
    return (f"the preview speaks {preview.teacher}'s latents ({preview.teacher_normalisation}), these are "
            f"{name or 'an unnamed model'}'s ({space})")  # fmt: skip


# One preview preset per published latent space (random weights, as every preset); madebyollin's releases have these
# architectures (the aliases below) and load into them. Qwen-Image's also previews Wan 2.1's (the same latent space).
_RELEASED_PREVIEWS = {"sd1": "taesd", "sdxl": "taesdxl", "sd3": "taesd3", "flux1": "taef1", "flux2": "taef2"}


def _preview_preset(teacher: str) -> tuple[str, Preset]:
    config = preview_config(PRESETS[teacher].config)
    released = f"; madebyollin's {_RELEASED_PREVIEWS[teacher]} has this architecture" if teacher in _RELEASED_PREVIEWS else ""
    return config.family, Preset(config, f"tiny preview autoencoder of {teacher}'s latents{released}")


PRESETS.update(_preview_preset(t) for t in ("sd1", "sdxl", "sd3", "flux1", "flux2", "qwenimage", "wan2.2", "qwenimage2.1", "hunyuanimage"))

# Other names people use for the same families (matched after lower-casing).
ALIASES = {
    "flux": "flux1", "flux.1": "flux1", "flux-1": "flux1", "sd15": "sd1", "sd1.5": "sd1", "sd14": "sd1", "sd1.4": "sd1",
    "sd2": "sd1", "sd21": "sd1", "sd2.1": "sd1", "sd35": "sd3", "sd3.5": "sd3", "lumina": "lumina2", "pixart-alpha": "pixart",
    "flux.2": "flux2", "flux-2": "flux2", "flux.2-small-decoder": "flux2-small-decoder", "qwen": "qwenimage", "qwen-image": "qwenimage",
    "qwen-image-2.1": "qwenimage2.1", "qwenimage21": "qwenimage2.1", "qwen-image2.1": "qwenimage2.1", "qwenimage-2.1": "qwenimage2.1",
    "hunyuan": "hunyuanimage", "hunyuan-image": "hunyuanimage", "hunyuanimage2.1": "hunyuanimage",
    "hunyuanimage2.1-refiner": "hunyuanimage-refiner", "hunyuan-refiner": "hunyuanimage-refiner",
    "hunyuanimage3.0": "hunyuanimage3", "hunyuanimage-3.0": "hunyuanimage3", "hunyuan-image-3": "hunyuanimage3",
    "wan21": "wan2.1", "wan-2.1": "wan2.1", "wan22": "wan2.2", "wan-2.2": "wan2.2", "wan2.2-ti2v-5b": "wan2.2",
    "dcae": "dc-ae-f32c32", "dc-ae": "dc-ae-f32c32", "sana": "dc-ae-f32c32", "dc-ae-f32c32-sana-1.0": "dc-ae-f32c32",
    "dc-ae-f64c128-mix-1.0": "dc-ae-f64c128", "kvae-2d": "kvae", "kvae-2d-1.0": "kvae", "kvae2d": "kvae", "dc-ae-f128c512-mix-1.0": "dc-ae-f128c512",
    **{release: f"tae-{teacher}" for teacher, release in _RELEASED_PREVIEWS.items()}, "tae-wan2.1": "tae-qwenimage",
}  # fmt: skip


def preset_name(name: str) -> str:
    """The preset a family or preset name means: case-insensitive, with the common aliases (flux, sd15, sd2, ...)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown preset or family {name!r}; choose one of {', '.join(PRESETS)} "
                         f"(or an alias: {', '.join(ALIASES)}); `vaekit presets` describes them")  # fmt: skip
    return key


def preset(name: str) -> AutoencoderConfig:
    return PRESETS[preset_name(name)].config


def register_architectures(names: Iterable[str]) -> None:
    """Called by the registry (vaekit.model.architectures) with its names: from then on `arch` must be one."""
    global ARCHS
    ARCHS = tuple(names)
    unknown = sorted({p.config.arch for p in PRESETS.values()} - set(ARCHS))
    if unknown:
        raise ValueError(f"presets of unregistered architectures {unknown}; registered: {', '.join(ARCHS)}")
