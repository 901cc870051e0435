"""Pixel space has no weights, so no files: nothing recognises it and nothing is written. It is only ever
built from its presets (`preset:pixel`, `pixel-p2`, `pixel-p16`)."""

from __future__ import annotations

from typing import Any, Iterable, NoReturn

from torch import Tensor

from ..config import AutoencoderConfig

ARCH = "pixel"
DIFFUSERS_CLASSES: tuple[str, ...] = ()
FAMILY = None
LOAD_DTYPE = None
NO_WEIGHTS = "pixel space has no weights"
DIFFUSERS_FRAMES = False

_NOTHING_TO_SAVE = "a pixel-space model has no weights to save: use preset:pixel (or pixel-p2, pixel-p16) wherever a MODEL is asked"


def diffusers_can_load(config: AutoencoderConfig) -> bool:
    return False


def recognise(keys: Iterable[str]) -> None:
    return None


def to_native(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return dict(tensors)


def to_single_file(tensors: dict[str, Tensor], config: AutoencoderConfig) -> NoReturn:
    raise ValueError(_NOTHING_TO_SAVE)


def to_diffusers(tensors: dict[str, Tensor], config: AutoencoderConfig) -> NoReturn:
    raise ValueError(_NOTHING_TO_SAVE)


def diffusers_config(config: AutoencoderConfig) -> NoReturn:
    raise ValueError(_NOTHING_TO_SAVE)


def config_from_diffusers(d: dict[str, Any]) -> NoReturn:
    raise NotImplementedError("diffusers has no pixel-space autoencoder")


def config_from_tensors(tensors: dict[str, Tensor]) -> NoReturn:
    raise ValueError("pixel space has no tensors to infer an architecture from")
