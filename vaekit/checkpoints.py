"""Reading and writing the checkpoint files people actually have.

Every source ends up as one `Checkpoint`: tensors under the model's native (original LDM) names,
a complete `AutoencoderConfig`, and a record of where each part came from. Three rules:

- Never execute pickled code: `.ckpt/.pt/.bin/.pth` go through `torch.load(weights_only=True)`.
- Strict keys: a tensor the model lacks, or lacks a tensor for, is an error naming it.
- Never guess the latent normalisation silently. Shapes fix the architecture but not the family
  (SD1 and SDXL share one, so do SD3 and FLUX.1), so scale/shift come from the file's own config
  or metadata, else from an explicit `family=`, else from a full checkpoint's other parts (its UNet
  says which model it is), else they are assumed, and the assumption is stated and warned about.

A model file that cannot be read (empty, truncated, corrupt, a config.json that is not a JSON object)
is one `UnreadableFile` (a ValueError) that names the file and says what to do, whatever the command.

Everything that differs between architectures (the names in their files, their diffusers classes and
config.json, the config from tensor shapes) is asked of their `vaekit.layouts` module, found through the
registry `vaekit.model.architectures`; writing (`save`) is `vaekit.layouts.write`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import sys
import warnings
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import PRESETS, AutoencoderConfig, describe_channels, preset, preset_name, same_latents, speaking
from .layouts import CONFIG_KEY, DIFFUSERS_WEIGHTS, METADATA_KEY, Layout, not_an_autoencoder, write
from .model import ARCHITECTURES, Autoencoder
from .model.architectures import diffusers_classes, for_diffusers_class, for_names

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The files of an autoencoder in a Hub repo, in order of preference (the first file locates it).
HUB_LAYOUTS = tuple((f"{sub}config.json", f"{sub}{w}") for sub in ("", "vae/") for w in DIFFUSERS_WEIGHTS[:2]) + (("ae.safetensors",),)
# Where the VAE sits inside a full checkpoint: SD/SDXL/SD3 use the first, ComfyUI's FLUX.1 files the second.
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Tensors LDM training leaves in autoencoder files (LPIPS + discriminator, EMA copies): not part of the model.
TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")
# A full checkpoint's other parts name the model; the VAE's normalisation follows from it.
FAMILY_MARKERS = (
    ("model.diffusion_model.joint_blocks.", "sd3"),
    ("model.diffusion_model.double_blocks.", "flux1"),
    ("conditioner.embedders.", "sdxl"),
    ("cond_stage_model.", "sd1"),  # SD 1.x and 2.x share the VAE and its 0.18215
)
# With nothing else to go on, the family most files of an architecture belong to. 4 channels:
# sd1's 0.18215 is also the LDM and diffusers default. 16 channels: a standalone file is almost
# always FLUX.1's ae.safetensors (SD3 ships its VAE as a diffusers folder whose config.json says).
ASSUMED_FAMILIES = ("sd1", "flux1")


@dataclass
class Checkpoint:
    """A checkpoint as read: native-named tensors, the full config, and where things came from."""

    state_dict: dict[str, Tensor]
    config: AutoencoderConfig
    format: str
    dtype: str
    normalisation_source: str
    notes: list[str] = field(default_factory=list)


# ---- public API ----------------------------------------------------------------------------


def load(
    source: str | os.PathLike,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> Autoencoder:
    """Any supported checkpoint (see `read_checkpoint`) -> an `Autoencoder` in eval mode.

    Weights keep their stored dtype unless `dtype` is given (mixed storage: fp32; or the layout's LOAD_DTYPE)."""
    ck = read_checkpoint(source, family=family, seed=seed)
    with torch.device("meta"):  # no random init: the checkpoint's tensors become the parameters
        model = Autoencoder(ck.config)
    stored = {t.dtype for t in ck.state_dict.values() if t.is_floating_point()}
    model.load_state_dict(ck.state_dict, strict=True, assign=True)
    if dtype is None:  # mixed storage (e.g. fp16 convs, fp32 norms): compute in one dtype
        dtype = torch.float32 if len(stored) > 1 else ARCHITECTURES[ck.config.arch].layout.LOAD_DTYPE
    return model.to(device=device, dtype=dtype).eval()


def read_checkpoint(source: str | os.PathLike, family: str | None = None, seed: int = 0) -> Checkpoint:
    """Read `source` without building a model.

    `source`: a diffusers folder (or a pipeline folder with `vae/`), a `.safetensors` file (VAE-only
    in LDM/FLUX.1 or diffusers naming, or a full SD/SDXL/SD3 checkpoint), a `.ckpt/.pt/.pth/.bin`
    file, a model sharded over `.safetensors` files (its `model.safetensors.index.json`, or the folder
    holding it: Hunyuan Image 3.0's VAE is under `vae.` in its shards), a Hugging Face repo id, or
    `preset:NAME` (random weights, the same for the same `seed`).
    `family` (a preset name) gives the latent normalisation when the source does not state it."""
    text = os.fspath(source)
    family = preset_name(family) if family else None
    if text.startswith("preset:"):
        found = _from_preset(text.removeprefix("preset:"), seed)
    else:
        path = Path(text).expanduser()
        if path.exists():
            found = _from_path(path)
        elif re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.endswith((".safetensors",) + TORCH_SUFFIXES):
            try:
                found = _from_path(_download(text))
            except UnreadableFile as e:  # a download cut short stays in the cache, and the cache is read first
                raise UnreadableFile(e.path, e.kind, e.reason, _hub_cache_advice(e.path, text)) from None
            found.format = f"Hugging Face Hub {text}: {found.format}"
        else:
            raise FileNotFoundError(f"no such file or folder: {text}")
    return _settle(found, family)


def save(model: Autoencoder, path: str | os.PathLike, format: str = "diffusers", dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a diffusers folder or as one single-file `.safetensors` in its architecture's layout
    (LDM's names; BFL's for FLUX.2; Wan's, Tencent's for Qwen-Image and Wan 2.1, Hunyuan Image; Wan 2.2's for Wan 2.2;
    diffusers' for a preview model, which `format="pair"` also writes as madebyollin's PATH_encoder/PATH_decoder files).

    Both carry vaekit's full config (config.json key `_vaekit`, or safetensors metadata), so family,
    scale/shift, `kind="ae"` and every vaekit-only option round-trip exactly. diffusers loads the
    folder whenever it can express the architecture (not `kind="ae"`). Files are written atomically."""
    return write(model.state_dict(), model.config, ARCHITECTURES[model.config.arch].layout, path, format, dtype)


# ---- diffusers config.json -------------------------------------------------------------------


def _config_from_diffusers(d: dict[str, Any], where: str) -> tuple[AutoencoderConfig, bool]:
    """-> (config, whether it states the normalisation)."""
    if CONFIG_KEY in d:
        return AutoencoderConfig.from_dict(d[CONFIG_KEY]), True
    cls = d.get("_class_name", "AutoencoderKL")
    layout = for_diffusers_class(cls)
    if layout is None:
        raise ValueError(f"{where} describes a {cls}; vaekit reads {', '.join(diffusers_classes())}")
    try:
        return layout.config_from_diffusers(d)
    except NotImplementedError as e:
        raise ValueError(f"{where}: {e}") from None


# ---- sources -----------------------------------------------------------------------------------


@dataclass
class _Found:
    """What a source says before the config and normalisation are settled."""

    tensors: dict[str, Tensor]  # native names
    format: str
    config: AutoencoderConfig | None = None  # when the source states the architecture
    normalisation: str | None = None  # where the stated config's scale/shift come from, if it states them
    hint: tuple[str, str] | None = None  # (family, what says so): a full checkpoint's other parts, a key layout
    notes: list[str] = field(default_factory=list)
    layout: Layout | None = None  # the layout a file's names are in (a file without config: its shapes tell it)
    path: Path | None = None  # the file read (the first of a split model's), named when its shapes make no config


def _from_preset(name: str, seed: int) -> _Found:
    config = preset(name)
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
        torch.manual_seed(seed)
        tensors = Autoencoder(config).state_dict()
    return _Found(tensors, f"preset {config.family} (random init, seed {seed})", config, "preset")


SHARD_INDEX = "model.safetensors.index.json"  # a sharded model's map of tensor names to files (transformers' name)


def _from_path(path: Path) -> _Found:
    split = next((files for a in ARCHITECTURES.values() if hasattr(a.layout, "split_files") and (files := a.layout.split_files(path))), None)
    if split:
        return _from_split(split)
    if path.is_dir():
        return _from_folder(path)
    if path.name.endswith(".safetensors.index.json"):
        return _from_shards(path)
    return _from_file(path)


def _from_split(files: list[Path]) -> _Found:
    """A model stored as several files (a released tiny autoencoder's NAME_encoder and NAME_decoder, `split_files` of its
    layout): each read as a file of its own, their tensors together. A config a file states is its own half's: the
    encoder's file states the whole model, the decoder's a decoder-only one (vaekit writes them so)."""
    parts = [_from_file(f) for f in files]
    if any(not hasattr(p.layout, "split_files") for p in parts):  # a file named like a pair but of another architecture
        return parts[0]
    halves = [{k.split(".", 1)[0] for k in p.tensors} for p in parts]
    if len(parts) == 2 and halves[0] & halves[1]:
        raise ValueError(f"{files[0]} and {files[1]} are both a tiny autoencoder's {' and '.join(sorted(halves[0] & halves[1]))}: "
                         "give one encoder file and one decoder file")  # fmt: skip
    if not any("decoder" in h for h in halves):
        raise ValueError(f"{files[0]} is a tiny autoencoder's encoder alone, and vaekit needs its decoder: put its NAME_decoder "
                         "file beside it (a decoder alone loads as a decoder-only model)")  # fmt: skip
    found = _Found({k: t for p in parts for k, t in p.tensors.items()}, " + ".join(f"{f.name}: {p.format}" for f, p in zip(files, parts)),
                   notes=[n for p in parts for n in p.notes], layout=parts[0].layout, path=files[0])  # fmt: skip
    stated = [p for p in parts if p.config is not None]
    if stated:
        whole = max(stated, key=lambda p: not p.config.decoder_only)
        found.config, found.normalisation = whole.config, whole.normalisation
        if whole.config.decoder_only and len(parts) == 2:
            found.config = whole.config.replace(decoder_only=False)
    return found


def _from_file(path: Path) -> _Found:
    if path.suffix == ".safetensors":
        with _safetensors(path) as f:
            metadata = f.metadata() or {}
            found = _select(list(f.keys()), "single-file", f.get_tensor, lambda k: tuple(f.get_slice(k).get_shape()))
        if METADATA_KEY in metadata:
            part = f"its {METADATA_KEY} metadata is "
            with _settings_of(path, ".safetensors file", part):
                found.config = AutoencoderConfig.from_dict(_json_object(metadata[METADATA_KEY], path, ".safetensors file", part))
            found.normalisation = "file metadata"
        found.path = path
        return found
    if path.suffix in TORCH_SUFFIXES:
        tensors = _torch_tensors(path)
        found = _select(list(tensors), f"torch {path.suffix} file", tensors.__getitem__, lambda k: tuple(tensors[k].shape))
        found.path = path
        return found
    raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; vaekit reads .safetensors, "
                     f"{', '.join(TORCH_SUFFIXES)}, {SHARD_INDEX} and diffusers folders")


def _from_shards(index: Path) -> _Found:
    """The autoencoder in a model sharded over .safetensors files: only the shards holding its tensors are opened."""
    with _settings_of(index, "shard index"):
        weight_map = dict(_read_json(index, "shard index")["weight_map"])
    with ExitStack() as stack:
        shards: dict[str, Any] = {}

        def shard(key: str) -> Any:
            name = weight_map[key]
            if name not in shards:
                if not (index.parent / name).is_file():
                    raise FileNotFoundError(f"{index} puts {key} in {name}, which is not in {index.parent}: download it too")
                shards[name] = stack.enter_context(_safetensors(index.parent / name))
            return shards[name]

        found = _select(list(weight_map), f"sharded .safetensors ({index.name})", lambda k: shard(k).get_tensor(k),
                        lambda k: tuple(shard(k).get_slice(k).get_shape()))  # fmt: skip
        found.format += f", read from {', '.join(sorted(shards))}"
    return found


def _select(keys: list[str], kind: str, get: Callable[[str], Tensor], shape: Callable[[str], tuple[int, ...]]) -> _Found:
    """The autoencoder's tensors out of a file's keys, under native names. Only those are read,
    so a 7 GB SDXL checkpoint costs only its VAE; the layouts are shown their names with their shapes."""
    notes = []
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), "")
    hint, others = None, []
    if prefix:
        others = [k for k in keys if not k.startswith(prefix)]
        notes.append(f"ignored {len(others)} tensors outside {prefix} (UNet, text encoders, ...)")
        hint = next(((fam, f"the checkpoint's other parts (its {marker}* tensors)") for marker, fam in FAMILY_MARKERS
                     if any(k.startswith(marker) for k in others)), None)
    ours = [k for k in keys if k.startswith(prefix)]
    training = [k for k in ours if k[len(prefix):].startswith(TRAINING_ONLY_PREFIXES)]
    if training:
        notes.append(f"ignored {len(training)} training-only tensors (loss.* = LPIPS/discriminator, model_ema.*)")
    ours = [k for k in ours if k not in training]
    names = {k[len(prefix):]: shape(k) for k in ours}
    found = for_names(names)
    if found is None:
        raise not_an_autoencoder(names)
    layout, naming = found
    if layout.FAMILY:  # the names say the family
        hint = hint or (layout.FAMILY, f"its key layout ({naming})")
    tensors = layout.to_native({k[len(prefix):]: get(k) for k in ours})
    kind = f"full checkpoint ({prefix} part, {naming})" if others else f"{kind} ({naming})"
    return _Found(tensors, kind, hint=hint, notes=notes, layout=layout)


# ---- reading model files: a file that cannot be read is one error naming it ---------------------


class UnreadableFile(ValueError):
    """A model file that is empty, truncated, corrupt or of the wrong kind: names it and says what to do."""

    def __init__(self, path: Path, kind: str, reason: str, advice: str = "download or convert it again"):
        self.path, self.kind, self.reason = path, kind, reason
        super().__init__(f"{path} is not a valid {kind} ({reason}): {advice}")


@contextmanager
def _safetensors(path: Path) -> Iterator[Any]:
    """`safe_open(path)`. safetensors' errors, at the open or later, lazily, at `get_tensor`, become
    `UnreadableFile`; other errors raised inside (vaekit's own) pass through."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise UnreadableFile(path, ".safetensors file", _safetensors_damage(path, e)) from None


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    with _safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _safetensors_damage(path: Path, error: Exception) -> str:
    """What is wrong with a .safetensors file safetensors refused, measured where possible: a file
    cut short (an interrupted download or copy) is told by its sizes."""
    size = path.stat().st_size
    said = str(error).removeprefix("Error while deserializing header: ")
    if size == 0:
        return "empty: 0 bytes"
    if size < 8:
        return f"truncated: {size} bytes, less than its 8-byte header length"
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
        if 8 + header > size:
            if header > 100_000_000:  # safetensors' own limit: not a header length at all
                return f"corrupt, or not a .safetensors file: its first 8 bytes claim a {header:,}-byte header"
            return f"truncated or corrupt: its header length says {header:,} bytes, the whole file has {size:,}"
        try:
            entries = json.loads(f.read(header))
            end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"corrupt: {said}"
    if 8 + header + end > size:
        return f"truncated: its tensors need {8 + header + end:,} bytes, the file has {size:,}"
    return f"corrupt: {said}"


# torch's weights-only refusals of a pickle that would run code (any other is a damaged file).
_CODE_PICKLE = re.compile(r"GLOBAL \S+ (was not an allowed global|whose module \S+ is blocked)"
                          r"|reduce for unrecognized function|Can only (build|create new object)")


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`: a pickle that would run code is refused (nothing is executed);
    any other failure, bar the OS's (a missing or unreadable file), is a damaged file: `UnreadableFile`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        said = _unpickler_said(str(e))
        if not _CODE_PICKLE.search(said):
            raise UnreadableFile(path, "torch checkpoint", _torch_damage(path, f"unreadable pickle data ({said})")) from None
        raise ValueError(
            f"refused {path}: it holds pickled objects that would run code when loaded, and vaekit never "
            f"executes pickles (nothing was executed; torch says: {said}). If you trust the file, convert it "
            f"once: python -c \"import torch, safetensors.torch as s; c = torch.load('{path}', weights_only=False); "
            f"s.save_file(c.get('state_dict', c), '{path.with_suffix('.safetensors')}')\" and load the .safetensors"
        ) from None
    except OSError as e:
        if e.errno is not None:  # missing, a folder, no permission: the CLI says what to do about those
            raise
        raise UnreadableFile(path, "torch checkpoint", _torch_damage(path, e)) from None
    except Exception as e:  # EOFError, RuntimeError (a broken zip), KeyError, ...: torch met bytes it cannot parse
        raise UnreadableFile(path, "torch checkpoint", _torch_damage(path, e)) from None


def _unpickler_said(message: str) -> str:
    """The unpickler's own words out of torch's weights-only message (which wraps them in advice)."""
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in message.splitlines()]
    boilerplate = ("Weights only load failed", "Check the documentation", "(1) ", "(2) ")
    return next((line for line in lines if line and not line.startswith(boilerplate)), message.split("\n")[0])


def _torch_damage(path: Path, said: str | Exception) -> str:
    size = path.stat().st_size
    if size == 0:
        return "empty: 0 bytes"
    if isinstance(said, RuntimeError) and str(said).strip():  # torch's own words: their first sentence
        said = re.split(r"(?<=\.)\s", str(said).strip(), maxsplit=1)[0].rstrip(".")
    elif isinstance(said, Exception):  # EOFError, KeyError, ...: the unpickler met bytes it cannot parse
        said = f"unreadable data ({type(said).__name__}{': ' + str(said) if str(said) else ''})"
    return f"truncated or corrupt, {size:,} bytes: {said}"


def _torch_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a `.ckpt/.pt/.pth/.bin` file: a state dict, or an LDM/Lightning checkpoint's."""
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # LDM/Lightning .ckpt
    if not isinstance(obj, dict):
        raise UnreadableFile(path, "checkpoint", f"it holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


CONFIG_ADVICE = "download it again or fix it"


def _read_json(path: Path, kind: str = "config.json") -> dict[str, Any]:
    """A JSON file's settings (a config.json, a shard index)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableFile(path, kind, f"not text: byte {e.start} is not UTF-8", CONFIG_ADVICE) from None
    return _json_object(text, path, kind)


def _json_object(text: str, path: Path, kind: str, part: str = "") -> dict[str, Any]:
    """`text` (all of `path`, or the `part` of it named) as a JSON object of settings, or `UnreadableFile`."""
    advice = CONFIG_ADVICE if not part else "download or convert it again"
    if not text.strip():
        raise UnreadableFile(path, kind, f"{part}empty", advice)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnreadableFile(path, kind, f"{part}not JSON: {e.msg} at line {e.lineno} column {e.colno}", advice) from None
    if not isinstance(d, dict):
        what = {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean", type(None): "JSON null"}.get(type(d), "a JSON number")
        raise UnreadableFile(path, kind, f"{part}{what}, not an object of settings {{...}}", advice)
    return d


@contextmanager
def _settings_of(path: Path, kind: str, part: str = "") -> Iterator[None]:
    """Settings in `path` (or the `part` of it named) that make no config (a wrong type or value, an
    unknown key): the error names the file."""
    try:
        yield
    except UnreadableFile:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        if str(path) in str(e):  # already names it
            raise
        reason = f"{part}settings vaekit cannot use: " + (f"no {e}" if isinstance(e, KeyError) else str(e) or type(e).__name__)
        raise UnreadableFile(path, kind, reason, "fix it, or download or convert it again") from None


def _from_folder(path: Path) -> _Found:
    folder = path
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        folder = path / "vae"  # a diffusers pipeline
    config_file = folder / "config.json"
    weights = next((folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).is_file()), None)
    if weights is None and (path / SHARD_INDEX).is_file():  # a sharded model (its config.json is not a diffusers one)
        return _from_shards(path / SHARD_INDEX)
    if not config_file.is_file() or weights is None:
        raise FileNotFoundError(f"{path} is not a diffusers autoencoder folder: it needs config.json and "
                                f"{DIFFUSERS_WEIGHTS[0]} (or .bin), directly or under vae/")
    found = _Found({}, "diffusers folder" + (" (vae/ of a pipeline)" if folder != path else ""))
    with _settings_of(config_file, "config.json"):
        config, stated = _config_from_diffusers(_read_json(config_file), str(config_file))
    found.config, found.normalisation = config, ("config.json" if stated else None)
    tensors = _load_safetensors(weights) if weights.suffix == ".safetensors" else _torch_tensors(weights)
    found.tensors = ARCHITECTURES[config.arch].layout.to_native(tensors)
    return found


def _download(repo: str) -> Path:
    """A Hub repo's autoencoder: its diffusers folder or ae.safetensors, from the local cache or the Hub."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise FileNotFoundError(_hub_hint(repo, "huggingface_hub is not installed; pip install huggingface_hub")) from None

    def fetch(files: tuple[str, ...], local: bool) -> Path:
        paths = [Path(hf_hub_download(repo, f, local_files_only=local)) for f in files]
        return paths[0] if len(files) == 1 else paths[0].parent

    for files in HUB_LAYOUTS:  # the cache first: works offline, costs no request
        try:
            return fetch(files, local=True)
        except LocalEntryNotFoundError:
            continue
    try:
        # One request lists the repo's files; failing fast here avoids the client's retries per file.
        present = {s.rfilename for s in HfApi().model_info(repo).siblings or []}
        files = next((f for f in HUB_LAYOUTS if set(f) <= present), None)
        path = fetch(files, local=False) if files else None
    except GatedRepoError:
        raise FileNotFoundError(f"{repo} is gated: accept its licence at https://huggingface.co/{repo} and log in "
                                f"(`hf auth login`), or {_hub_fetch(repo)}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo} is neither a local file or folder nor a Hugging Face repo "
                                "(private repos need `hf auth login`)") from None
    except Exception as e:  # offline mode, no network, proxy or server errors: all end the same way
        raise FileNotFoundError(_hub_hint(repo, f"{type(e).__name__}; not in the local cache either")) from None
    if path is None:
        raise FileNotFoundError(f"{repo} has no autoencoder vaekit knows: no config.json + {DIFFUSERS_WEIGHTS[0]} "
                                "(or .bin) at the top or under vae/, and no ae.safetensors")
    return path


def _hub_fetch(repo: str) -> str:
    """Which files to fetch by hand: a guess from the repo's name, right for the usual repos."""
    name = repo.split("/")[-1].lower()
    if "flux" in name:
        return f"download https://huggingface.co/{repo}/resolve/main/ae.safetensors and pass that file's path"
    sub = "" if "vae" in name else "vae/"
    return (f"download {sub}config.json and {sub}{DIFFUSERS_WEIGHTS[0]} from https://huggingface.co/{repo}/tree/main "
            f"into one folder and pass that folder's path")


def _hub_hint(repo: str, why: str) -> str:
    return f"no local file or folder {repo!r}, and the Hugging Face Hub cannot be used ({why}): {_hub_fetch(repo)}"


def _hub_cache_advice(path: Path, repo: str) -> str:
    """What to do about a damaged file in the Hub cache: the cache is read first and its blob is reused,
    so only removing the repo's cached copy brings a fresh download."""
    cached = next((p for p in path.parents if p.name.startswith("models--")), None)
    where = f"rm -r {cached}" if cached else f"hf cache delete, choosing {repo}"
    return f"the Hugging Face cache holds a damaged copy of {repo}: remove it ({where}) and run again to download it anew"


# ---- settling config and normalisation --------------------------------------------------------


def _settle(found: _Found, family: str | None) -> Checkpoint:
    notes = found.notes
    stored = Counter(str(t.dtype).removeprefix("torch.") for t in found.tensors.values())
    dtype = next(iter(stored)) if len(stored) == 1 else "mixed: " + ", ".join(f"{d} ({n})" for d, n in stored.most_common())
    if not stored:
        weightless = found.config is not None and ARCHITECTURES[found.config.arch].layout.NO_WEIGHTS
        dtype = f"none ({weightless or 'no tensors'})"
    if found.config is not None:
        config = found.config
    else:  # a file with no config: its layout reads the architecture off the tensor shapes
        assert found.layout is not None
        try:
            config, note = found.layout.config_from_tensors(found.tensors)
        except ValueError as e:  # tensors in a layout's names whose shapes make no model of it
            raise ValueError(f"{found.path}: {e}" if found.path else str(e)) from None
        notes.append(note)
        if found.layout.FAMILY and preset(found.layout.FAMILY).latent_channels != config.latent_channels:
            found.hint = None  # the layout's family, but not its published model: nothing states the normalisation
    config, source = _normalisation(config, found, family)
    return Checkpoint(_checked(found.tensors, config), config, found.format, dtype, source, notes)


def _same_architecture(a: AutoencoderConfig, b: AutoencoderConfig) -> bool:
    """The same network: the normalisation aside (a per-channel family's statistics are not in its weights, so a
    file without a config has none), except FLUX.2's latent BatchNorm, whose statistics are weights."""
    ignore = ("scaling_factor", "shift_factor", "family", "latent_norm", "latents_mean", "latents_std")
    return ((a.latent_norm == "patch_bn") == (b.latent_norm == "patch_bn")
            and {k: v for k, v in a.to_dict().items() if k not in ignore} == {k: v for k, v in b.to_dict().items() if k not in ignore})  # fmt: skip


def _with_family(config: AutoencoderConfig, name: str) -> AutoencoderConfig:
    p = preset(name)
    if p.latent_channels != config.latent_channels:
        raise ValueError(f"family {name!r} has {describe_channels(p.latent_channels, 'latents')}; this checkpoint has "
                         f"{describe_channels(config.latent_channels, 'latents')}")
    if (p.latent_norm == "patch_bn") != (config.latent_norm == "patch_bn"):
        raise ValueError(f"family {name!r} {'needs' if p.latent_norm == 'patch_bn' else 'has no'} the latent BatchNorm "
                         f"statistics (bn.running_mean/var) that this checkpoint {'lacks' if p.latent_norm == 'patch_bn' else 'has'}")
    return config.replace(scaling_factor=p.scaling_factor, shift_factor=p.shift_factor, latent_norm=p.latent_norm,
                          latents_mean=p.latents_mean, latents_std=p.latents_std, family=p.family)  # fmt: skip


def _normalisation(config: AutoencoderConfig, found: _Found, family: str | None) -> tuple[AutoencoderConfig, str]:
    """Scale/shift and family name, by the module's rule: stated > family= > other parts > assumed (said)."""
    if config.arch == "taesd":
        return _teacher(config, found, family)
    if config.latent_norm == "patch_bn" and not found.normalisation:  # FLUX.2: its BatchNorm states it
        found.normalisation = "the checkpoint's latent BatchNorm statistics (bn.running_mean/var)"
    if found.normalisation:
        if not config.family:  # name a diffusers config's family when it is exactly a preset
            config = config.replace(family=next((n for n, p in PRESETS.items() if p.config == config.replace(family=n)), ""))
        said = lambda c: (c.latent_norm, c.scaling_factor, c.shift_factor, c.latents_mean, c.latents_std)  # noqa: E731
        if family and said(preset(family)) != said(config):
            _warn(found.notes, f"family={family!r} ignored: the {found.normalisation} states the normalisation "
                               f"{config.normalisation}")
        return config, found.normalisation
    if family:
        return _with_family(config, family), f"family={family!r} argument"
    if found.hint:
        name, evidence = found.hint
        return _with_family(config, name), f"{name}, from {evidence}"
    candidates = [n for n, p in PRESETS.items() if _same_architecture(p.config, config)]
    name = next((n for n in ASSUMED_FAMILIES if n in candidates), candidates[0] if candidates else None)
    if name is None:
        config = config.replace(scaling_factor=1.0, shift_factor=0.0, family="")
        message = "unknown (custom architecture, nothing states it): scale 1, shift 0; pass family=... / --family to set it"
    else:
        config = _with_family(config, name)
        others = [n for n in candidates if (preset(n).scaling_factor, preset(n).shift_factor) != (config.scaling_factor, config.shift_factor)]
        formula = config.normalisation if config.latent_norm == "channel" else f"(z - {config.shift_factor:g}) * {config.scaling_factor:g}"
        message = (f"assumed {name}: {formula}"
                   + "".join(f"; {n} has the same architecture but (z - {preset(n).shift_factor:g}) * {preset(n).scaling_factor:g}" for n in others)
                   + "; pass family=... / --family to override")
    _warn(found.notes, f"{found.format}: latent normalisation {message}", note=False)
    return config, message


def _teacher(config: AutoencoderConfig, found: _Found, family: str | None) -> tuple[AutoencoderConfig, str]:
    """A preview's own normalisation is the identity (its latents are its teacher's normalised ones); the module's rule
    then decides whose latents they are: stated (vaekit's files) > family= (the teacher, or a tae-* preset) > assumed
    from the shapes (said), never from a file name."""
    if config.teacher:
        if family and not same_latents(config.teacher, preset(family).teacher or family):
            _warn(found.notes, f"family={family!r} ignored: the {found.normalisation} says it previews {config.teacher}'s latents")
        return config, f"identity: its latents are {config.teacher}'s normalised ones ({found.normalisation})"
    if family:
        teacher = preset(family).teacher or family
        return speaking(config, preset(teacher), teacher), f"identity: its latents are {teacher}'s normalised ones (family={family!r} argument)"
    shape = ((config.latent_channels, config.factor), config.out_channels)
    candidates = [n for n, p in PRESETS.items() if p.config.arch not in ("taesd", "pixel") and (p.config.normalised_shape, p.config.out_channels) == shape]
    name = next((n for n in ASSUMED_FAMILIES if n in candidates), candidates[0] if candidates else None)
    what = f"{describe_channels(config.latent_channels, 'latents')} at {config.factor}x"
    if name is None:
        message = f"identity; whose latents it speaks is unknown (no family has {what}): pass family=... / --family naming its teacher"
    else:
        config = speaking(config, preset(name), name)
        others = [n for n in candidates if not same_latents(n, name) and not n.startswith("tiny-")]
        message = (f"identity; assumed it previews {name}'s latents ({config.teacher_normalisation})"
                   + (f"; {', '.join(others)} {'has' if len(others) == 1 else 'have'} {what} too" if others else "")
                   + "; pass family=... / --family to say whose")
    _warn(found.notes, f"{found.format}: {message}", note=False)
    return config, message


def _checked(tensors: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Strict keys and shapes against the model `config` builds."""
    with torch.device("meta"):
        want = {k: v.shape for k, v in Autoencoder(config).state_dict().items()}
    if "bn.num_batches_tracked" in want and "bn.running_mean" in tensors:  # a counter files may leave out
        tensors = {"bn.num_batches_tracked": torch.tensor(0), **tensors}
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        parts = [f"{len(names)} {what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                 for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
        raise ValueError(f"checkpoint tensors do not match the architecture: {'; '.join(parts)}")
    wrong = [f"{k} {list(t.shape)} (needs {list(want[k])})" for k, t in tensors.items() if t.shape != want[k]]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors have the wrong shape for the config: {', '.join(wrong[:4])}")
    return tensors


def _warn(notes: list[str], message: str, note: bool = True) -> None:
    if note:
        notes.append(message)
    # Point the warning at the first caller outside vaekit: the line the user can change.
    package, frame, level = os.path.dirname(__file__) + os.sep, sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
