"""The one registry of architectures: each is a model module under `vaekit/model/` and a layout module
under `vaekit/layouts/`. `Autoencoder` builds from the model module, `vaekit.checkpoints` and
`Autoencoder.save` read and write through the layout, and `AutoencoderConfig` accepts exactly these names
for `arch` (registered below: config.py sits under every module here, so it is told rather than importing).

It lives in `vaekit.model` because `Autoencoder` reads it: a registry outside this package would import
the model modules, which imports this package's `__init__`, hence `Autoencoder`, hence the registry.

A new architecture is its model file, its layout module and a preset in `config.PRESETS`, entered here
in one line. Layouts are asked about a file's tensor names newest first (`for_names`): LDM's names are
the oldest and the most general (Tencent's Hunyuan Image names look like them), so LDM comes first here.
Hunyuan Image 3.0's names are 2.1's with 3D convolutions: its layout, asked before, reads the shapes too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from torch import nn

from ..config import AutoencoderConfig, register_architectures
from ..layouts import Layout
from ..layouts import dcae as dcae_layout
from ..layouts import hunyuanimage as hunyuanimage_layout
from ..layouts import hunyuanimage3 as hunyuanimage3_layout
from ..layouts import kvae as kvae_layout
from ..layouts import hunyuanvideo15 as hunyuanvideo15_layout
from ..layouts import ldm as ldm_layout
from ..layouts import pixel as pixel_layout
from ..layouts import qwenimage as qwenimage_layout
from ..layouts import taesd as taesd_layout
from ..layouts import wan22 as wan22_layout
from . import dcae, fast, hunyuanimage, hunyuanimage3, hunyuanvideo15, kvae, ldm, pixel, qwenimage, taesd, wan22


@runtime_checkable
class Model(Protocol):
    """An architecture's model module. `Autoencoder` puts the convs around the latent (LDM's 1x1 quant convs)
    between them unless the module also has `quant_convs(config) -> (quant_conv, post_quant_conv)`. An
    encoder (decoder) with `body_stages()`, `body` and `head` has its full-resolution part tiled on request
    (`vaekit.model.tiling`)."""

    Encoder: Callable[[AutoencoderConfig], nn.Module]
    Decoder: Callable[[AutoencoderConfig], nn.Module]


class _LDM:
    """config.arch "ldm": LDM's published coders (`ldm`), or their fast-training variants (`fast`) when a
    config sets any of those options. One name for both keeps every saved config and checkpoint readable."""

    @staticmethod
    def Encoder(config: AutoencoderConfig) -> nn.Module:
        return (fast if fast.varies(config) else ldm).Encoder(config)

    @staticmethod
    def Decoder(config: AutoencoderConfig) -> nn.Module:
        return (fast if fast.varies(config) else ldm).Decoder(config)


@dataclass(frozen=True)
class Architecture:
    name: str  # AutoencoderConfig.arch
    model: Model
    layout: Layout


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("ldm", _LDM, ldm_layout),
        Architecture("pixel", pixel, pixel_layout),
        Architecture("qwenimage", qwenimage, qwenimage_layout),
        Architecture("hunyuanimage", hunyuanimage, hunyuanimage_layout),
        Architecture("wan22", wan22, wan22_layout),
        Architecture("dcae", dcae, dcae_layout),
        Architecture("kvae", kvae, kvae_layout),
        Architecture("hunyuanvideo15", hunyuanvideo15, hunyuanvideo15_layout),
        Architecture("hunyuanimage3", hunyuanimage3, hunyuanimage3_layout),
        Architecture("taesd", taesd, taesd_layout),
    )
}
register_architectures(ARCHITECTURES)


def for_names(keys: Iterable[str] | Mapping[str, Any]) -> tuple[Layout, str] | None:
    """The layout a file's tensor names are in, and its description of them; None if no layout knows them. Given
    a mapping of the names to their tensors or shapes, a layout may read the shapes too."""
    keys = keys if isinstance(keys, Mapping) else list(keys)
    for a in reversed(ARCHITECTURES.values()):
        said = a.layout.recognise(keys)
        if said:
            return a.layout, said
    return None


def for_diffusers_class(name: str) -> Layout | None:
    return next((a.layout for a in ARCHITECTURES.values() if name in a.layout.DIFFUSERS_CLASSES), None)


def diffusers_classes() -> list[str]:
    return [c for a in ARCHITECTURES.values() for c in a.layout.DIFFUSERS_CLASSES]
