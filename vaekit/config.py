"""One dataclass that describes an autoencoder, and the presets of the real families.

Everything a model needs to be rebuilt lives here: the architecture (so a checkpoint plus this
config is the whole model) and the latent normalisation (so a diffusion model sees unit-variance
latents). Real families keep their exact published architecture; training-speed options added
for new models are fields with defaults that leave those presets untouched.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    # One entry per resolution level; n levels downsample by 2**(n-1).
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    kind: Literal["vae", "ae"] = "vae"  # Gaussian posterior, or a deterministic latent
    use_quant_conv: bool = True  # 1x1 conv after the encoder (SD1/SDXL have it, SD3/Flux.1 do not)
    use_post_quant_conv: bool = True  # 1x1 conv before the decoder
    mid_attention: bool = True
    norm_groups: int = 32
    # Latent normalisation: a diffusion model sees (z - shift_factor) * scaling_factor.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # Architecture family: "ldm" is the SD/SDXL/SD3/Flux.1 encoder-decoder. Later families
    # (Flux.2 patches, Qwen-Image causal 3D convs) get their own value here.
    arch: str = "ldm"
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_channels", tuple(int(c) for c in self.block_channels))
        if self.kind not in ("vae", "ae"):
            raise ValueError(f"kind must be 'vae' or 'ae', got {self.kind!r}")
        if self.arch != "ldm":
            raise ValueError(f"unknown architecture {self.arch!r}; this vaekit knows 'ldm'")
        if not self.block_channels:
            raise ValueError("block_channels needs at least one level")
        bad = [c for c in self.block_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} must divide every block channel count; {bad} do not")
        if self.patch_size not in (1, 2):
            raise ValueError(f"patch_size must be 1 or 2, got {self.patch_size}")
        if self.shortcuts:
            ch = self.block_channels
            bad = [(a, b) for a, b in zip(ch, ch[1:]) if (4 * a) % b]
            if bad:
                raise ValueError(f"shortcuts need each level's channels to divide 4x the level before; {bad} do not")
            if ch[-1] % self.latent_channels:
                raise ValueError(f"shortcuts need latent_channels ({self.latent_channels}) to divide block_channels[-1] ({ch[-1]})")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor: image side / latent side."""
        return self.patch_size * 2 ** (len(self.block_channels) - 1)

    @property
    def diffusers_compatible(self) -> bool:
        """Whether diffusers' AutoencoderKL has this architecture, so it can load vaekit's diffusers folder."""
        return self.kind == "vae" and not self.shortcuts and self.patch_size == 1

    def replace(self, **changes: Any) -> "AutoencoderConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_channels"] = list(self.block_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AutoencoderConfig":
        check_fields(cls, d, "config fields")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """A dataclass read from JSON: name unknown keys (typos, newer versions) instead of a TypeError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(names)}")


@dataclass(frozen=True)
class Preset:
    config: AutoencoderConfig
    description: str


_SD = AutoencoderConfig()  # the LDM kl-f8 architecture shared by SD1/SD2/SDXL/PixArt
_F16 = _SD.replace(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
_TINY = AutoencoderConfig(block_channels=(32, 64, 128, 128), layers_per_block=1, norm_groups=8)
# The quickstart's model: about as big as _TINY, but it trains in minutes on a CPU (docs/TRAINING.md).
_FAST = AutoencoderConfig(
    block_channels=(32, 64, 128), layers_per_block=1, norm_groups=8, patch_size=2, shortcuts=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_attention=False,
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
    "tiny-f8c4": Preset(_TINY.replace(family="tiny-f8c4"), "small 8x/4-channel VAE for tests and demos"),
    "tiny-f8c16": Preset(
        _TINY.replace(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, family="tiny-f8c16"),
        "small 8x/16-channel VAE (Flux.1 layout) for tests and demos",
    ),
    "tiny-fast-f8c4": Preset(
        _FAST.replace(family="tiny-fast-f8c4"),
        "small 8x/4-channel VAE that trains in minutes on a CPU (DC-AE shortcuts, 2x2 patch stem); the quickstart's",
    ),
    "tiny-fast-f8c16": Preset(
        _FAST.replace(latent_channels=16, family="tiny-fast-f8c16"), "tiny-fast-f8c4 with 16 latent channels"
    ),
}

# Which published families use a latent channel count: for error messages a user can act on.
FAMILIES_BY_CHANNELS: dict[int, str] = {
    4: "SD1/SDXL family",
    16: "SD3/Flux.1 family",
    32: "Flux.2 family",
    64: "Hunyuan Image family",
}


def describe_channels(n: int, noun: str) -> str:
    """'16-channel latent (SD3/Flux.1 family)': what a user needs to see to pick the right model."""
    family = FAMILIES_BY_CHANNELS.get(n)
    return f"{n}-channel {noun}" + (f" ({family})" if family else "")


# Other names people use for the same families (matched after lower-casing).
ALIASES = {
    "flux": "flux1", "flux.1": "flux1", "flux-1": "flux1", "sd15": "sd1", "sd1.5": "sd1", "sd14": "sd1", "sd1.4": "sd1",
    "sd2": "sd1", "sd21": "sd1", "sd2.1": "sd1", "sd35": "sd3", "sd3.5": "sd3", "lumina": "lumina2", "pixart-alpha": "pixart",
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
