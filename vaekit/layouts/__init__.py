"""Checkpoint layouts: what each architecture's files look like, as data and pure functions of tensors and
configs. One module per architecture (`ldm`, `pixel`, `qwenimage`, `hunyuanimage`, `wan22`, `dcae`, `kvae`,
`hunyuanvideo15`, `hunyuanimage3`), each a `Layout`; the
registry `vaekit.model.architectures` pairs each with its model module. `vaekit.checkpoints` keeps what is
common to every architecture (finding the files, the Hub, the safetensors and pickle rules, metadata, strict
keys, the normalisation rule) and asks the layout for the rest.

`write` puts a state dict into files in a layout. It lives here, below the model, so `Autoencoder.save` and
`vaekit.save` share it without the model importing `vaekit.checkpoints` (which imports the model)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..config import AutoencoderConfig
from ..files import write_atomic

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
METADATA_KEY = "vaekit_config"  # safetensors metadata entry holding AutoencoderConfig.to_json()
CONFIG_KEY = "_vaekit"  # the same config inside a diffusers config.json (diffusers skips "_" keys silently)


@runtime_checkable
class Layout(Protocol):
    """The files of one architecture. A module is one by having these names (`typing.Protocol` is
    structural); tests/test_architectures.py checks every registered one. Tensors are keyed by the model's
    own ("native") names unless said otherwise; `config` is always the model's full `AutoencoderConfig`."""

    ARCH: str  # the AutoencoderConfig.arch it reads and writes
    DIFFUSERS_CLASSES: tuple[str, ...]  # the diffusers classes (config.json `_class_name`) whose folders it reads
    # The preset whose normalisation a file recognised in this layout is taken to have (said so), or None
    # when its names are shared by several families (then the normalisation rule decides: checkpoints.py).
    FAMILY: str | None
    LOAD_DTYPE: torch.dtype | None  # what `load` computes in when no dtype is asked (None: the stored dtype)
    NO_WEIGHTS: str | None  # why models of this architecture have no weights (pixel space), or None
    DIFFUSERS_FRAMES: bool  # its diffusers class takes videos (N, C, T, H, W): an image is one frame

    def diffusers_can_load(self, config: AutoencoderConfig) -> bool:
        """Whether its diffusers class expresses this config, so diffusers loads the folder `write` makes (and
        `vaekit bench` has a peer to time against)."""

    def recognise(self, keys: Iterable[str] | Mapping[str, Any]) -> str | None:
        """What naming these tensor names are ("LDM naming", "Wan 2.1 / Qwen-Image layout (ComfyUI)"), or None
        if they are not this layout's. Layouts are asked newest first (see the registry). `vaekit.checkpoints` gives
        a mapping of the names to their shapes: a layout whose names another shares (Hunyuan Image 3.0's are 2.1's
        with 3D convolutions) reads them; the others iterate the names."""

    def to_native(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors in any naming it recognises (a single file's, its diffusers folder's) -> the model's names."""

    def to_single_file(self, tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
        """The model's names -> the single-file layout people download."""

    def to_diffusers(self, tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
        """The model's names -> its diffusers class's."""

    def diffusers_config(self, config: AutoencoderConfig) -> dict[str, Any]:
        """That class's config.json (without vaekit's own `_vaekit` entry, which `write` adds)."""

    def config_from_diffusers(self, d: dict[str, Any]) -> tuple[AutoencoderConfig, bool]:
        """(config, whether it states the latent normalisation) from a config.json of one of its classes.
        An option vaekit does not implement is a NotImplementedError; a malformed value a ValueError."""

    def config_from_tensors(self, tensors: dict[str, Tensor]) -> tuple[AutoencoderConfig, str]:
        """(config, a note on how it was inferred) from native-named tensor shapes: a file with no config."""


def write(tensors: dict[str, Tensor], config: AutoencoderConfig, layout: Layout, path: str | Path,
          format: str = "diffusers", dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """A model's state dict as a diffusers folder or one single-file `.safetensors`, in `layout`, atomically (a tiny
    autoencoder also as the `pair` of files madebyollin releases: `pair_file(path, "encoder")` and "decoder").

    All carry vaekit's full config (config.json key `_vaekit`, or safetensors metadata), so family,
    scale/shift, `kind="ae"` and every vaekit-only option round-trip exactly."""
    path = Path(path)
    tensors = {k: _stored(v, dtype) for k, v in tensors.items()}
    if format == "single-file":
        tensors = layout.to_single_file(tensors, config)
        if path.suffix != ".safetensors":
            raise ValueError(f"a single-file checkpoint is a .safetensors file; got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: config.to_json()}))
    elif format == "pair":  # the tiny autoencoders' released form: PATH_encoder.safetensors + PATH_decoder.safetensors
        if not hasattr(layout, "to_pair"):
            raise ValueError(f"format='pair' writes a tiny autoencoder's encoder and decoder files; a {config.arch} model has one "
                             "file (format='single-file') or a diffusers folder")  # fmt: skip
        if path.suffix in (".safetensors", ".pth") or path.name.endswith(("_encoder", "_decoder")):
            raise ValueError(f"format='pair' takes the files' common name, e.g. out/taef1 for out/taef1_encoder.safetensors and "
                             f"out/taef1_decoder.safetensors; got {path}")  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        for half, (part, described) in layout.to_pair(tensors, config).items():
            metadata = {"format": "pt", METADATA_KEY: described.to_json()}
            write_atomic(pair_file(path, half), lambda tmp, part=part, metadata=metadata: save_file(part, tmp, metadata=metadata))
    elif format == "diffusers":
        renamed, described = layout.to_diffusers(tensors, config), {**layout.diffusers_config(config), CONFIG_KEY: config.to_dict()}
        if path.is_file():
            raise ValueError(f"{path} is a file; format='diffusers' writes a folder")
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / DIFFUSERS_WEIGHTS[0], lambda tmp: save_file(renamed, tmp, metadata={"format": "pt"}))
        text = json.dumps(described, indent=2) + "\n"
        write_atomic(path / "config.json", lambda tmp: tmp.write_text(text))
    else:
        raise ValueError(f"format must be 'diffusers', 'single-file' or (tiny autoencoders) 'pair', got {format!r}")
    return path


def pair_file(path: str | Path, half: str) -> Path:
    """The file of one half of a pair `write(format="pair")` writes to `path`: PATH_encoder.safetensors, PATH_decoder.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.name}_{half}.safetensors")


def not_an_autoencoder(names: Iterable[str]) -> ValueError:
    """The error for tensors no layout knows."""
    sample = ", ".join(list(names)[:3]) or "none"
    return ValueError(f"no autoencoder tensors found (expected names like encoder.down.0.block.0.conv1.weight "
                      f"or encoder.down_blocks.0.resnets.0.conv1.weight); first names: {sample}")


def _stored(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    t = t.detach().to("cpu")
    return (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
