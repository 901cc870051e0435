"""Checkpoint key layouts of the architectures other than LDM's, as data: one module per family.

LDM's own layouts (the native LDM names, diffusers' AutoencoderKL / AutoencoderKLFlux2, BFL's FLUX.2
file) live in `vaekit.checkpoints`, which grew up with them. A family here provides:

    ARCH                      the AutoencoderConfig.arch it reads and writes
    DIFFUSERS_CLASS           the diffusers class whose folders it reads and writes
    config_from_diffusers(d)  AutoencoderConfig from that class's config.json (ValueError if unsupported)
    diffusers_config(c)       that class's config.json for an AutoencoderConfig
    recognise(keys)           a description of the single-file layout these tensor names are, or None
    to_native(tensors)        tensors of any of its layouts -> the model's own names (diffusers')
    to_single_file(tensors)   the model's names -> the single-file layout people download (ComfyUI's)
    config_from_tensors(t)    the architecture from native-named tensor shapes (a file with no config)
    FAMILY                    the preset whose normalisation a file in this layout is assumed to have

so a new family is one model file (vaekit/model/), one layout module here and one preset.
"""

from __future__ import annotations

from types import ModuleType

from . import hunyuanimage, qwenimage

LAYOUTS: dict[str, ModuleType] = {m.ARCH: m for m in (qwenimage, hunyuanimage)}


def by_diffusers_class(name: str) -> ModuleType | None:
    return next((m for m in LAYOUTS.values() if m.DIFFUSERS_CLASS == name), None)
