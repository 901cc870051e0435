"""The registry of architectures: each is a model module and a layout module behind their protocols, with
a preset, and what AutoencoderConfig accepts, Autoencoder builds and checkpoints reads are its entries."""

from __future__ import annotations

from pathlib import Path

import torch

import vaekit
from vaekit import AutoencoderConfig
from vaekit.config import PRESETS
from vaekit.layouts import Layout
from vaekit.layouts.ldm import _native_keys
from vaekit.model import ARCHITECTURES, Autoencoder
from vaekit.model.architectures import Model

ROOT = Path(vaekit.__file__).parent


def test_every_architecture_is_a_model_and_a_layout_module_with_a_preset():
    assert vaekit.config.ARCHS == tuple(ARCHITECTURES)  # what AutoencoderConfig accepts is the registry
    for name, a in ARCHITECTURES.items():
        assert isinstance(a.model, Model) and isinstance(a.layout, Layout), name
        assert a.layout.ARCH == name and a.layout.__name__ == f"vaekit.layouts.{name}"
        # the model is its module, or (LDM) a chooser between its module's coders and their fast-training variant
        assert (ROOT / "model" / f"{name}.py").exists() and a.model.Encoder.__module__ in (f"vaekit.model.{name}", "vaekit.model.architectures")
    assert {p.stem for p in (ROOT / "layouts").glob("*.py")} - {"__init__"} == set(ARCHITECTURES)  # none left out
    assert {p.config.arch for p in PRESETS.values()} == set(ARCHITECTURES)


def test_a_module_missing_a_protocol_name_is_not_a_layout():
    from vaekit.layouts import pixel

    assert not isinstance(type("Partial", (), {n: getattr(pixel, n) for n in ("ARCH", "recognise", "to_native")})(), Layout)


def test_ldm_key_names_are_the_model_s():
    """The LDM layout lists its tensor names without building a model (it sits below the model)."""
    for levels, layers in ((1, 1), (2, 1), (3, 2), (4, 2)):
        widest = AutoencoderConfig(block_channels=tuple(range(1, levels + 1)), layers_per_block=layers, latent_channels=1, norm_groups=1)
        with torch.device("meta"):
            assert _native_keys(levels, layers) == list(Autoencoder(widest).state_dict()), (levels, layers)


def test_each_layout_says_which_configs_its_diffusers_class_loads():
    can = {name: ARCHITECTURES[p.config.arch].layout.diffusers_can_load(p.config) for name, p in PRESETS.items()}
    # AutoencoderTiny has no GroupNorm branch and no latent patches: FLUX.2's tiny autoencoder (taef2) is not one
    assert [n for n, ok in can.items() if not ok] == [n for n, p in PRESETS.items() if p.config.arch in ("pixel", "hunyuanimage3")
                                                      or n.startswith(("tiny-fast", "tiny-thumb")) or n == "tae-flux2"]
    for name in ("sd1", "flux2", "qwenimage", "hunyuanimage", "wan2.1", "wan2.2", "kvae", "hunyuanimage-refiner"):  # a deterministic AE is no diffusers VAE
        config = PRESETS[name].config
        assert not ARCHITECTURES[config.arch].layout.diffusers_can_load(config.replace(kind="ae")), name
    # Qwen-Image's, Wan's, HunyuanVideo-1.5's classes are video VAEs (Hunyuan Image 3.0's has no class)
    assert [a.layout.DIFFUSERS_FRAMES for a in ARCHITECTURES.values()] == [False, False, True, False, True, False, False, True, False, False]
