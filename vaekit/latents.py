"""Latent datasets: encode an image collection once into sharded latents for diffusion training, read
them back (`LatentDataset`), decode them to images, and calibrate a model's latent scale.

    OUT/info.json                  what made the dataset (model hash and config, resolution, resize mode,
                                   buckets, store, dtype, shard size, flips, vaekit version) and its parts:
                                   each `vaekit encode` that added sources (their count and hash, first shard)
    OUT/normalisation.safetensors  FLUX.2 only: the BatchNorm statistics its normalisation needs
    OUT/shard-00000.safetensors    a part's sources [0, S) in sorted order: per item `mean.J` and `logvar.J`
                                   (or `latent.J`), raw as `encode` returns them; its metadata holds the
                                   items' manifest lines and the errors of its range
    OUT/partial-00003-00000.safetensors  the encoded start of an unfinished shard (kept every
                                   `commit_seconds` and on Ctrl-C); gone once the shard is whole
    OUT/manifest.jsonl             one line per item, in shard order, rebuilt from complete shards
    OUT/errors.jsonl               one line per skipped source: `source` and the reason

Crash safety: shard k holds a part's sources at positions [k*S, (k+1)*S) and is written under a temporary
name, then renamed when complete, so a shard file is always whole. While a shard is encoded, its settled
start (items encoded or skipped, never a batch half done) goes into partial files, so an interrupted run
loses at most `commit_seconds` of work. A rerun encodes only what is missing, starting where a batch
started, so the result equals one clean run bit for bit. Under torchrun, rank r encodes the shards k = r
(mod world) and rank 0 rebuilds the manifest when all ranks are done. Sources added later (`add=True`)
become a new part: new shards after the old ones, which stay as they are. Latents are stored raw and
normalised on read (`vaekit.model.autoencoder.normalize_latents`), so every family's normalisation,
FLUX.2's patch BatchNorm and Qwen-Image's per-channel statistics included, comes with the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ._version import __version__
from .advice import option
from .config import AutoencoderConfig, preview_refusal
from .data import (IMAGE_SUFFIXES, MAX_PIXELS, SHARD_SUFFIXES, ImageTooLarge, find_images, image_size, is_shards, read_image,
                   sample_images, shard_urls, with_alpha)  # fmt: skip
from .files import mark_output_folder, safe_name, write_atomic
from .model import Autoencoder
from .model.autoencoder import denormalize_latents, normalize_latents
from .progress import progress as progress_bar

RESIZE_MODES = ("center-crop", "resize", "pad")
STORES = ("both", "mean", "sample")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The options that decide what a latent is: a dataset never mixes two settings of any of them.
KEY_FIELDS = ("model_hash", "resolution", "resize_mode", "buckets", "store", "dtype", "precision", "shard_size",
              "min_side", "seed", "flip", "reduced_jpeg")  # fmt: skip
# Caption files beside an image (kohya's .caption/.txt, webdataset's .txt/.json), in order of preference;
# a .json caption is its first field of CAPTION_FIELDS. A folder's metadata.jsonl (Hugging Face's
# ImageFolder: file_name + text) gives the captions of images that have no caption file.
CAPTION_SUFFIXES = (".txt", ".caption", ".json")
CAPTION_FIELDS = ("caption", "text", "prompt")


@dataclass(frozen=True)
class EncodeOptions:
    resolution: int
    resize_mode: str = "center-crop"
    buckets: bool = False
    store: str = "both"
    dtype: str = "fp16"
    precision: str = "fp32"  # the model's compute dtype
    shard_size: int = 1000
    # Sources per encoder call (with flip, their mirrors too); None: 8 on a GPU, 1 on a CPU, where larger
    # batches run slower per image (their activations leave the caches: -40% for tiny-f8c4, -8% for sd1 at
    # 256², docs/LATENTS.md).
    batch_size: int | None = None
    min_side: int | None = None  # None: half the resolution; smaller images are skipped
    max_pixels: int = MAX_PIXELS  # PIL's decompression-bomb limit
    tile: int | str | None = None  # pixels, or "auto" (Autoencoder.encode)
    workers: int = 2
    seed: int = 0  # posterior samples (--store sample)
    flip: bool = False  # also encode each image mirrored (kohya's --flip_aug); items say which they are
    reduced_jpeg: bool = True  # large JPEGs decoded at a DCT scale that keeps 4x the target (data.REDUCE_MARGIN)
    commit_seconds: float = 60.0  # how often an unfinished shard's encoded items are kept on disk (and on Ctrl-C)


# ---- sources: what DATA names, in a fixed order -----------------------------------------------


@dataclass(frozen=True)
class Caption:
    """Where a source's caption is: a file (or a tar member's span) read when the image is, or a text
    known when the sources were listed (metadata.jsonl)."""

    path: str = ""
    span: tuple[int, int] | None = None
    suffix: str = ".txt"
    text: str | None = None

    def read(self) -> str:
        if self.text is not None:
            return self.text
        text = _read_bytes(self.path, self.span).decode("utf-8-sig", errors="replace")
        if self.suffix != ".json":
            return text.strip()
        fields = json.loads(text)
        found = next((fields[k] for k in CAPTION_FIELDS if isinstance(fields, dict) and isinstance(fields.get(k), str)), None)
        if found is None:
            raise ValueError(f"no {'/'.join(CAPTION_FIELDS)} text in it")
        return found.strip()


@dataclass(frozen=True)
class Source:
    name: str  # relative to DATA: the manifest's `source`
    path: str  # a file, a tar shard, or "samples:SPLIT/NAME"
    span: tuple[int, int] | None = None  # in a tar shard: the member's data offset and size (read without a scan)
    caption: Caption | None = None
    problem: str | None = None  # why it cannot be used, known when listed (an unsafe name in a tar shard)


def list_sources(data: str) -> list[Source]:
    """Every image DATA names, sorted, with its caption file: folders recursively, tar shards member by
    member (captions: members of the same webdataset key), built-in photos by name."""
    data = str(data)
    if data == "samples" or data.startswith("samples:"):
        return [Source(name, f"{data}/{name}") for name, _ in sample_images(data.partition(":")[2] or "all")]
    if is_shards(data):
        return [s for url in shard_urls(data) for s in _tar_sources(url)]
    root = Path(data)
    listed = {}  # folder -> its metadata.jsonl captions by file name
    found = []
    for p in find_images(root):
        name = str(p.relative_to(root)) if root.is_dir() else p.name
        if p.parent not in listed:
            listed[p.parent] = _metadata_captions(p.parent)
        caption = next((Caption(str(p.with_suffix(s)), suffix=s) for s in CAPTION_SUFFIXES if p.with_suffix(s).is_file()), None)
        text = listed[p.parent].get(p.name)
        found.append(Source(name, str(p), caption=caption or (Caption(text=text) if text is not None else None)))
    return found


def _tar_sources(url: str) -> list[Source]:
    with tarfile.open(url) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    by_name = {m.name: m for m in members}
    found = []
    for m in members:
        if Path(m.name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        key = re.sub(r"^((?:.*/|)[^./]+)\..*$", r"\1", m.name)  # webdataset's key: the name up to its first dot
        caption = next((Caption(url, (c.offset_data, c.size), s) for s in CAPTION_SUFFIXES if (c := by_name.get(key + s))), None)
        try:
            safe_name(m.name)
            problem = None
        except ValueError as e:
            problem = f"unsafe name: {e}"
        found.append(Source(f"{Path(url).name}/{m.name}", url, (m.offset_data, m.size), caption, problem))
    return found


def _metadata_captions(folder: Path) -> dict[str, str]:
    """file_name -> caption from a Hugging Face ImageFolder `metadata.jsonl`, if the folder has one."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg}): fix or remove that line") from None
            text = next((row[k] for k in CAPTION_FIELDS if isinstance(row.get(k), str)), None)
            if isinstance(row.get("file_name"), str) and text is not None:
                captions[str(PurePosixPath(row["file_name"]))] = text.strip()
    return captions


def _read_bytes(path: str, span: tuple[int, int] | None) -> bytes:
    with open(path, "rb") as f:
        if span is None:
            return f.read()
        f.seek(span[0])
        return f.read(span[1])


def _read(source: Source, o: EncodeOptions, target: Callable[[tuple[int, int]], tuple[int, int]],
          alpha: bool = False) -> tuple[np.ndarray, tuple[int, int]]:  # fmt: skip
    """The source as upright HxWx3 uint8 RGB (HxWx4 RGBA with `alpha`) and its upright (height, width) in the file. A JPEG may be
    decoded at a reduced DCT scale that still covers the resize target well (data.read_image); more than
    max_pixels is refused from the header, before decoding."""
    if source.path.startswith("samples"):
        split, _, name = source.path.partition("/")
        image = dict(sample_images(split.partition(":")[2] or "all"))[name]
        return (with_alpha(image) if alpha else image), image.shape[:2]
    file: str | io.BytesIO = source.path if source.span is None else io.BytesIO(_read_bytes(source.path, source.span))
    h, w = image_size(file, max_pixels=o.max_pixels)
    if isinstance(file, io.BytesIO):
        file.seek(0)
    th, tw = target((h, w))
    return read_image(file, reduce_to=(tw, th) if o.reduced_jpeg else None, max_pixels=o.max_pixels, alpha=alpha), (h, w)


# ---- resizing --------------------------------------------------------------------------------


def buckets_for(resolution: int, factor: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as SDXL's and kohya's: (height, width) of at most resolution² pixels (as many
    as fit), sides multiples of the model's factor (of 64 when that is a multiple of it and the resolution
    is at least 256), aspect 1:4 to 4:1, and every bucket's mirror: portrait and landscape photos alike."""
    step = 64 if 64 % factor == 0 and resolution >= 256 else factor
    found = set()
    for h in range(step, 4 * resolution + 1, step):
        w = resolution * resolution // h // step * step
        if w >= step and 0.25 <= h / w <= 4:
            found |= {(h, w), (w, h)}
    return sorted(found)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in aspect ratio (then the largest); a tie between mirrors goes to the image's own orientation."""
    h, w = size
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - math.log(h / w)), 9), -b[0] * b[1], (b[0] > b[1]) != (h > w)))


@dataclass(frozen=True)
class Placement:
    """Where an image of some size goes on a target canvas."""

    box: tuple[float, float, float, float]  # the part of the image shown: x0, y0, x1, y1 in its pixels
    canvas: tuple[int, int, int, int]  # the part of the canvas it covers: x0, y0, x1, y1 (pad: not all of it)
    crop_top_left: tuple[int, int]  # SDXL's crops_coords_top_left (top, left), as diffusers' SDXL script computes it


def placement(size: tuple[int, int], target: tuple[int, int], mode: str) -> Placement:
    """center-crop: scale to cover, cut the centre; resize: stretch to the target; pad: scale to fit inside,
    centred on black."""
    (h, w), (th, tw) = size, target
    if mode == "resize":
        return Placement((0, 0, w, h), (0, 0, tw, th), (0, 0))
    if mode == "pad":
        s = min(th / h, tw / w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        y, x = (th - nh) // 2, (tw - nw) // 2
        return Placement((0, 0, w, h), (x, y, x + nw, y + nh), (0, 0))
    s = max(th / h, tw / w)  # center-crop: the source box that covers the target at scale s
    bw, bh = min(w, tw / s), min(h, th / s)  # (min: float rounding must not push the box outside the image)
    x0, y0 = (w - bw) / 2, (h - bh) / 2
    # diffusers' train_text_to_image_sdxl.py: Resize(resolution) gives the bound side exactly and truncates
    # the other (torchvision), then the centre crop's y1 = round((height - resolution) / 2), x1 alike.
    rh, rw = (th, int(th * w / h)) if th / h >= tw / w else (int(tw * h / w), tw)
    top_left = (max(0, round((rh - th) / 2)), max(0, round((rw - tw) / 2)))
    return Placement((x0, y0, x0 + bw, y0 + bh), (0, 0, tw, th), top_left)


def fit(image: np.ndarray, target: tuple[int, int], mode: str) -> tuple[np.ndarray, list[float]]:
    """Image -> target (height, width) by `placement`, and the box [x0, y0, x1, y1] of the image it shows."""
    th, tw = target
    p = placement(image.shape[:2], target, mode)
    im = Image.fromarray(image)
    if mode == "pad":
        x0, y0, x1, y1 = p.canvas
        canvas = np.zeros((th, tw, image.shape[2]), np.uint8)  # RGBA: the padding is transparent
        canvas[y0:y1, x0:x1] = np.asarray(im.resize((x1 - x0, y1 - y0), Image.LANCZOS))
        return canvas, list(p.box)
    return np.asarray(im.resize((tw, th), Image.LANCZOS, box=p.box)), list(p.box)


def conditioning(size: tuple[int, int], target: tuple[int, int], mode: str, flipped: bool = False) -> dict[str, list[int]]:
    """SDXL's size and crop conditioning of an item, and where the image sits on its canvas: `original_size`
    (height, width of the upright source), `crop_coords_top_left` (top, left in the resized image, as
    diffusers' SDXL script computes them; a centred crop of the mirrored image has the same offsets, as that
    script, which flips before it crops, and kohya's, which takes target width - right, both give),
    `target_size` (height, width), `content_box` (x0, y0, x1, y1 of the canvas the image covers)."""
    p = placement(size, target, mode)
    (top, left), (x0, y0, x1, y1) = p.crop_top_left, p.canvas
    if flipped:
        x0, x1 = target[1] - x1, target[1] - x0
    return {"original_size": list(size), "crop_coords_top_left": [top, left], "target_size": list(target),
            "content_box": [x0, y0, x1, y1]}  # fmt: skip


class _Prepared(Dataset):
    """Sources loaded and resized in DataLoader workers: (position, [(CHW float tensor, manifest fields)] for
    the image and, with flips, its mirror; or why it was skipped)."""

    def __init__(self, sources: Sequence[Source], positions: Sequence[int], options: EncodeOptions,
                 buckets: Sequence[tuple[int, int]], alpha: bool = False):  # fmt: skip
        self.sources, self.positions, self.o, self.buckets = sources, list(positions), options, list(buckets)
        self.alpha = alpha  # RGBA models: images keep their alpha

    def __len__(self) -> int:
        return len(self.positions)

    def _target(self, size: tuple[int, int]) -> tuple[int, int]:
        return nearest_bucket(size, self.buckets) if self.buckets else (self.o.resolution, self.o.resolution)

    def _decoded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) a JPEG must keep for `fit` to shrink it to the target."""
        (h, w), (th, tw) = size, self._target(size)
        if self.o.resize_mode == "resize":
            return th, tw
        s = max(th / h, tw / w) if self.o.resize_mode == "center-crop" else min(th / h, tw / w)
        return math.ceil(h * s), math.ceil(w * s)

    def __getitem__(self, i: int) -> tuple[int, list[tuple[Tensor, dict[str, Any]]] | str]:
        p = self.positions[i]
        source = self.sources[p]
        if source.problem:
            return p, source.problem
        try:
            image, (h, w) = _read(source, self.o, self._decoded_size, self.alpha)
        except ImageTooLarge as e:
            return p, f"decompression bomb: {e} (--max-pixels)"
        except Exception as e:  # noqa: BLE001 — any unreadable file is listed, never fatal
            return p, f"unreadable: {e}"
        smallest = self.o.min_side if self.o.min_side is not None else self.o.resolution // 2
        if min(h, w) < smallest:
            return p, f"too small: {w}x{h}, shorter side below {smallest} (--min-side)"
        try:
            caption = source.caption.read() if source.caption else ""
        except Exception as e:  # noqa: BLE001 — a broken caption must not become an empty one silently
            return p, f"unreadable caption {source.caption.path}: {e}"
        target = self._target((h, w))
        pixels, _ = fit(image, target, self.o.resize_mode)
        box = [round(v, 1) for v in placement((h, w), target, self.o.resize_mode).box]  # in the file's upright pixels
        meta = {"source": source.name, "size": [h, w], "crop": box, "bucket": list(target), "caption": caption}
        variants = [(pixels, False)] + ([(np.ascontiguousarray(pixels[:, ::-1]), True)] if self.o.flip else [])
        return p, [(torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0,  # a writable copy
                     {**meta, "flipped": flipped, **conditioning((h, w), target, self.o.resize_mode, flipped)})
                    for a, flipped in variants]  # fmt: skip


def prepared_images(data: str, options: EncodeOptions, skipped: list[str], alpha: bool = False) -> Iterator[tuple[str, Tensor]]:
    """DATA's images as `vaekit encode` reads and resizes them, (name, 1xCxHxW): the same limits, the same
    skips (each appended to `skipped` as "name: reason"); RGBA with `alpha`."""
    sources = list_sources(data)
    prepared = _Prepared(sources, range(len(sources)), options, [], alpha)
    for i in range(len(prepared)):
        p, got = prepared[i]
        if isinstance(got, str):
            skipped.append(f"{sources[p].name}: {got}")
            continue
        yield sources[p].name, got[0][0][None]


# ---- keys: which model and options made a dataset --------------------------------------------


def model_hash(model: Autoencoder) -> str:
    """SHA-256 of the config and of every weight in fp32 (so the dtype a model is loaded in does not change it)."""
    return _hash(model.config.to_dict(), model.state_dict())


# What a calibration changes: the normalisation (and FLUX.2's BatchNorm statistics, which are its normalisation).
BN_STATS_FILE = "normalisation.safetensors"  # FLUX.2-style models: the BatchNorm statistics
NORMALISATION_FIELDS = ("latent_norm", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "family")


def weights_hash(model: Autoencoder) -> str:
    """`model_hash` without the normalisation: the same for a model and its recalibrated copy, whose raw
    latents are the same."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in NORMALISATION_FIELDS}
    return _hash(config, {k: t for k, t in model.state_dict().items() if not k.startswith("bn.")})


def _hash(config: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def encoded_by(model: Autoencoder, info: dict[str, Any]) -> bool:
    """Whether `model` has the weights that encoded the dataset described by `info` (any normalisation)."""
    return weights_hash(model) == info["weights_hash"] if "weights_hash" in info else model_hash(model) == info["model_hash"]


def sources_hash(sources: Sequence[Source]) -> str:
    return hashlib.sha256("\n".join(s.name for s in sources).encode()).hexdigest()[:32]


def _info(model: Autoencoder, o: EncodeOptions) -> dict[str, Any]:
    return {
        "format": "vaekit-latents", "vaekit_version": __version__, "model_hash": model_hash(model),
        "weights_hash": weights_hash(model), "model_config": model.config.to_dict(),
        "normalisation": model.config.normalisation, "latent_shape": list(model.config.normalised_shape),
        "resolution": o.resolution, "resize_mode": o.resize_mode,
        "buckets": buckets_for(o.resolution, model.factor) if o.buckets else False, "store": o.store, "dtype": o.dtype,
        "precision": o.precision, "shard_size": o.shard_size,
        "min_side": o.min_side if o.min_side is not None else o.resolution // 2, "seed": o.seed, "flip": o.flip,
        "reduced_jpeg": o.reduced_jpeg,
    }  # fmt: skip


def _check_same(found: dict[str, Any], wanted: dict[str, Any], out: Path) -> None:
    shown = lambda v: "(not recorded: an older vaekit)" if v is None else repr(v)  # noqa: E731
    diffs = [f"{k}: {shown(found.get(k))} there, {wanted[k]!r} now" for k in KEY_FIELDS if json.dumps(found.get(k)) != json.dumps(wanted[k])]
    if diffs:
        what = "the model (its weights or config)" if diffs[0].startswith("model_hash") else "the options"
        raise ValueError(f"{out} holds latents made with other settings ({'; '.join(diffs)}): {what} differ. "
                         "Encode into a new OUT, or rerun with the dataset's settings (its info.json) to continue it")  # fmt: skip


def read_info(root: Path) -> dict[str, Any]:
    path = root / "info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a latent dataset (no info.json): make one with `vaekit encode`")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg}): this latent dataset is damaged; encode it again") from None
    if not isinstance(info, dict) or info.get("format") != "vaekit-latents":
        raise ValueError(f"{path} does not describe a vaekit latent dataset")
    return info


def is_latent_dataset(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "info.json").is_file()


# ---- parts: the sources each `vaekit encode` added --------------------------------------------


def parts(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The dataset's parts: {sources, sources_hash, first_shard}; a dataset from before parts is one part."""
    return info.get("parts") or [{"sources": info["sources"], "sources_hash": info["sources_hash"], "first_shard": 0}]


def _shards(part: dict[str, Any], shard_size: int) -> range:
    return range(part["first_shard"], part["first_shard"] + math.ceil(part["sources"] / shard_size))


def _names_in(out: Path, shards: Iterable[int]) -> set[str]:
    """The sources complete shards cover: their items and their errors."""
    names: set[str] = set()
    for k in shards:
        with safe_open(str(shard_path(out, k)), "pt") as f:
            meta = f.metadata() or {}
        names |= {row["source"] for key in ("items", "errors") for row in json.loads(meta.get(key, "[]"))}
    return names


def _last_part(out: Path, info: dict[str, Any], sources: Sequence[Source]) -> tuple[dict[str, Any], list[Source], set[str]]:
    """The last part, its sources (DATA's sources that no earlier part holds, in DATA's order), and the names
    the earlier parts hold. An unfinished last part must find the very sources it started with."""
    *earlier, last = parts(info)
    known = _names_in(out, (k for part in earlier for k in _shards(part, info["shard_size"])))
    todo = [s for s in sources if s.name not in known]
    if sources_hash(todo) != last["sources_hash"] and not _complete(out, last, info["shard_size"]):
        then = last["sources"] + (f" new ({len(earlier)} earlier parts hold {len(known)})" if earlier else "")
        raise ValueError(f"{out} is unfinished and DATA no longer names the images it started with (sources: DATA named "
                         f"{then} images then, {len(todo)} now): restore DATA as it was and rerun to finish it, or encode into a new OUT")  # fmt: skip
    return last, todo, known


def _complete(out: Path, part: dict[str, Any], shard_size: int) -> bool:
    return all(shard_path(out, k).is_file() for k in _shards(part, shard_size))


def _add_part(out: Path, info: dict[str, Any], sources: Sequence[Source], add: bool, command: str | None) -> dict[str, Any]:
    """With the last part complete: DATA's sources the dataset lacks become a new part (add=True), or a refusal."""
    last, todo, known = _last_part(out, info, sources)
    if not _complete(out, last, info["shard_size"]):
        return info
    known |= _names_in(out, _shards(last, info["shard_size"]))
    new = [s for s in todo if s.name not in known]
    if not new:
        return info
    if not add:
        shown = ", ".join(s.name for s in new[:3]) + (", ..." if len(new) > 3 else "")
        raise ValueError(f"DATA names {len(new)} image(s) that {out} does not hold ({shown}; sources: {len(known)} there): "
                         f"pass {option('add')} to append them as new shards (the existing ones stay as they are), or encode into a new OUT")  # fmt: skip
    part = {"sources": len(new), "sources_hash": sources_hash(new), "first_shard": _shards(last, info["shard_size"]).stop,
            "command": command}  # fmt: skip
    info = {**info, "parts": [*parts(info), part], "sources": info["sources"] + len(new), "complete": False}
    write_atomic(out / "info.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    return info


# ---- encoding --------------------------------------------------------------------------------


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.safetensors"


def encode_dataset(model: Autoencoder, data: str, out: str | Path, options: EncodeOptions, progress: bool = True,
                   add: bool = False, command: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Encode DATA into the latent dataset OUT (see the module docstring); continue it if it exists, and with
    `add`, append DATA's images it does not hold yet as a new part. `command` (the command line) is recorded,
    so an unfinished dataset can say how to finish it. Returns a summary: items, errors, shards written now
    and in all, images encoded now (every rank's), images added, seconds."""
    started = time.time()
    o = _checked(model, options)
    out = Path(out)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    sources = list_sources(data)
    if not sources:
        raise ValueError(f"no images found in {data}")
    wanted = _info(model, o)
    if rank == 0:
        if (out / "info.json").is_file():
            _check_same(read_info(out), wanted, out)
        else:
            if out.is_dir() and any(p.name != ".vaekit-output" for p in out.iterdir()):
                raise ValueError(f"OUT {out} holds files but no info.json: choose a new or empty folder")
            mark_output_folder(out, "vaekit encode")
            first = {"sources": len(sources), "sources_hash": sources_hash(sources), "first_shard": 0, "command": command}
            info = {**wanted, "sources": len(sources), "parts": [first], "complete": False}
            write_atomic(out / "info.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
            bn = model.bn_stats()
            if bn is not None:
                stats = {"running_mean": bn[0].detach().float().cpu(), "running_var": bn[1].detach().float().cpu()}
                write_atomic(out / BN_STATS_FILE, lambda tmp: save_file(stats, str(tmp)))
        for leftover in out.glob(".*.tmp"):  # a file being written when a crash (kill -9) stopped the run
            leftover.unlink()
        for partial in out.glob("partial-*.safetensors"):  # kept items of a shard that was finished after all
            if shard_path(out, int(partial.name.split("-")[1])).is_file():
                partial.unlink()
        before = read_info(out)["sources"]
        _add_part(out, read_info(out), sources, add, command)
    _barrier()
    info = read_info(out)
    if rank != 0:
        _check_same(info, wanted, out)
    part, todo, _ = _last_part(out, info, sources)
    offset = sum(p["sources"] for p in parts(info)[:-1])  # positions before this part: --store sample's seeds go on
    mine = [k for k in _shards(part, o.shard_size) if k % world == rank and not shard_path(out, k).is_file()]
    buckets = [tuple(b) for b in info["buckets"]] if o.buckets else []
    encoded = _encode_shards(model, out, todo, part["first_shard"], mine, o, buckets, offset, progress, world, rank)
    _barrier()
    if rank == 0:
        rebuild_manifest(out)
    _barrier()
    info = read_info(out)
    n_shards = sum(len(_shards(p, o.shard_size)) for p in parts(info))
    done = sum(shard_path(out, k).is_file() for p in parts(info) for k in _shards(p, o.shard_size))
    items = sum(1 for _ in open(out / "manifest.jsonl")) if (out / "manifest.jsonl").is_file() else 0
    errors = sum(1 for _ in open(out / "errors.jsonl")) if (out / "errors.jsonl").is_file() else 0
    return {"items": items, "errors": errors, "shards": done, "of": n_shards, "encoded_now": _sum_over_ranks(encoded, model),
            "added": info["sources"] - before if rank == 0 else 0, "seconds": time.time() - started, "out": str(out)}  # fmt: skip


def _checked(model: Autoencoder, o: EncodeOptions) -> EncodeOptions:
    if o.resize_mode not in RESIZE_MODES or o.store not in STORES or o.dtype not in DTYPES:
        raise ValueError(f"resize mode, store and dtype must be one of {RESIZE_MODES}, {STORES}, {tuple(DTYPES)}")
    if o.resolution % model.factor or o.resolution < model.factor:
        raise ValueError(f"resolution {o.resolution} is not a multiple of the model's factor {model.factor}")
    if o.batch_size is None:
        o = dataclasses.replace(o, batch_size=8 if model.device.type == "cuda" else 1)
    if o.shard_size < 1 or o.batch_size < 1:
        raise ValueError("the shard size and the batch size must be at least 1")
    if o.store == "sample" and model.config.kind == "ae":
        raise ValueError("a plain autoencoder has no posterior to sample: store its latents as the mean")
    return o


def _encode_shards(model: Autoencoder, out: Path, sources: Sequence[Source], first: int, mine: list[int], o: EncodeOptions,
                   buckets: list[tuple[int, int]], offset: int, progress: bool, world: int, rank: int) -> int:  # fmt: skip
    """Encode this rank's missing shards of one part (shard k: the part's positions [(k - first) * S, ...)),
    continuing from their partial files. Returns how many sources were read now."""
    shards = {k: _Shard.resume(out, k, range((k - first) * o.shard_size, min((k - first + 1) * o.shard_size, len(sources))))
              for k in mine}  # fmt: skip
    positions = [p for shard in shards.values() for p in range(shard.kept, shard.positions.stop)]
    of_position = {p: shard for shard in shards.values() for p in (shard.positions if shard.kept < shard.positions.stop else ())}
    for shard in shards.values():
        if shard.kept == shard.positions.stop:  # every item was in partial files: a crash came before the shard's write
            shard.write(out)
    loader = DataLoader(_Prepared(sources, positions, o, buckets, model.config.rgba), batch_size=None, num_workers=o.workers,
                        prefetch_factor=4 if o.workers else None)  # fmt: skip
    encoder = _Encoder(model, o, offset)
    shard = None
    with progress_bar(desc=f"encode{f' rank {rank}' if world > 1 else ''}", unit="img", total=len(positions), enabled=progress) as bar:
        try:
            for p, got in loader:
                shard = of_position[p]
                if isinstance(got, str):
                    shard.errors[p] = {"source": sources[p].name, "reason": got}
                else:
                    for x, meta in got:
                        encoder.add(shard, p, x, {**meta, "shard": shard.k})
                encoder.done_with(shard, p)
                shard.seen = p + 1
                if shard.seen == shard.positions.stop:
                    shard.write(out)
                elif time.monotonic() - shard.committed >= o.commit_seconds:
                    shard.commit(out, encoder.settled(shard))
                bar.update(1)
        except KeyboardInterrupt:  # keep what is encoded; the same command continues from there
            if shard is not None and not shard.written:
                shard.commit(out, encoder.settled(shard))
            raise
    return len(positions)


class _Shard:
    """One shard being encoded: its items and errors by position. Its settled start (positions below
    `kept`) is kept on disk in partial files, which a rerun reads back; `write` makes the shard file."""

    def __init__(self, k: int, positions: range):
        self.k, self.positions = k, positions
        self.items: dict[tuple[int, bool], tuple[dict[str, Any], dict[str, Tensor]]] = {}  # (position, flipped) ->
        self.errors: dict[int, dict[str, str]] = {}
        self.kept = self.seen = positions.start
        self.partials: list[Path] = []
        self.committed = time.monotonic()
        self.written = False

    @classmethod
    def resume(cls, out: Path, k: int, positions: range) -> "_Shard":
        """The shard with its partial files read back, if they chain from its start (else they are dropped)."""
        shard = cls(k, positions)
        files = sorted(out.glob(f"partial-{k:05d}-*.safetensors"))
        for f in files:
            with safe_open(str(f), "pt") as s:
                meta = json.loads((s.metadata() or {}).get("partial", "{}"))
            if meta.get("start") != shard.kept:
                for g in files:
                    g.unlink()
                return cls(k, positions)
            tensors = load_file(str(f))
            for p, flipped, fields in meta["items"]:
                shard.items[p, flipped] = fields, {name: tensors[f"{name}.{p}.{int(flipped)}"] for name in fields["tensors"]}
            shard.errors.update({int(p): e for p, e in meta["errors"]})
            shard.kept = shard.seen = meta["end"]
            shard.partials.append(f)
        return shard

    def commit(self, out: Path, end: int) -> None:
        """Keep positions [kept, end) in a new partial file."""
        self.committed = time.monotonic()
        if end <= self.kept:
            return
        rows = [(p, flipped, fields) for (p, flipped), (fields, _) in self.items.items() if self.kept <= p < end]
        tensors = {f"{name}.{p}.{int(flipped)}": t for p, flipped, _ in rows for name, t in self.items[p, flipped][1].items()}
        errors = [(p, e) for p, e in self.errors.items() if self.kept <= p < end]
        meta = {"partial": json.dumps({"start": self.kept, "end": end, "items": rows, "errors": errors})}
        path = out / f"partial-{self.k:05d}-{len(self.partials):05d}.safetensors"
        _write_partial(path, tensors, meta)
        self.partials.append(path)
        self.kept = end

    def write(self, out: Path) -> None:
        _write_shard(out, self)
        self.written = True
        for f in self.partials:
            f.unlink(missing_ok=True)


def _write_partial(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _write_shard(out: Path, shard: _Shard) -> None:
    tensors, lines = {}, []
    for j, key in enumerate(sorted(shard.items)):
        fields, stored = shard.items[key]
        tensors.update({f"{name}.{j}": t for name, t in stored.items()})
        lines.append({k: v for k, v in fields.items() if k != "tensors"} | {"index": j})
    metadata = {"items": json.dumps(lines), "errors": json.dumps([shard.errors[p] for p in sorted(shard.errors)])}
    write_atomic(shard_path(out, shard.k), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sum_over_ranks(n: int, model: Autoencoder) -> int:
    if not dist.is_initialized():
        return n
    t = torch.tensor([n], device=model.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return int(t.item())


class _Encoder:
    """Encodes a shard's images in windows of batch_size sources (their mirrors too): a window is one encoder
    call, split where the image size changes. Windows are fixed by position, so a shard continued from a
    window's start is batched, and so computed, exactly as a clean run; the tensors are filed in the shard."""

    def __init__(self, model: Autoencoder, o: EncodeOptions, offset: int):
        self.model, self.o, self.offset = model, o, offset
        self.batch: list[tuple[_Shard, int, Tensor, dict[str, Any]]] = []

    def _window(self, shard: _Shard, p: int) -> tuple[int, int]:
        return shard.k, (p - shard.positions.start) // self.o.batch_size

    def add(self, shard: _Shard, p: int, x: Tensor, meta: dict[str, Any]) -> None:
        if self.batch and (self._window(*self.batch[0][:2]) != self._window(shard, p) or self.batch[0][2].shape != x.shape):
            self.flush()
        self.batch.append((shard, p, x, meta))

    def done_with(self, shard: _Shard, p: int) -> None:
        """Position p is read (and added, or skipped): encode its window if that was the window's last position."""
        if (p - shard.positions.start + 1) % self.o.batch_size == 0 or p + 1 == shard.positions.stop:
            self.flush()

    def settled(self, shard: _Shard) -> int:
        """A window's start below which every position is encoded or skipped: where a continued run can start."""
        q = min((p for s, p, _, _ in self.batch if s is shard), default=shard.seen)
        return q - (q - shard.positions.start) % self.o.batch_size

    @torch.inference_mode()
    def flush(self) -> None:
        if not self.batch:
            return
        x = torch.stack([b[2] for b in self.batch]).to(self.model.device, self.model.dtype)
        posterior = self.model.encode(x, tile=self.o.tile)
        store, dtype = self.o.store, DTYPES[self.o.dtype]
        if store == "sample":  # one generator per source (and flip): the same draw whatever the batching
            gens = [torch.Generator(device="cpu").manual_seed(self.o.seed * 1_000_003 + 2 * (self.offset + p) + meta["flipped"])
                    for _, p, _, meta in self.batch]  # fmt: skip
            sample = posterior.mean.float().cpu() + posterior.std.float().cpu() * torch.stack(
                [torch.randn(posterior.mean.shape[1:], generator=g) for g in gens])
        filed = []
        for i, (shard, p, _, meta) in enumerate(self.batch):
            if store == "sample":
                t = {"latent": sample[i]}
            elif store == "mean" or posterior.deterministic:
                t = {"mean": posterior.mean[i]}
            else:
                t = {"mean": posterior.mean[i], "logvar": posterior.logvar[i]}
            t = {k: v.detach().to("cpu", dtype).contiguous() for k, v in t.items()}
            filed.append((shard, (p, meta["flipped"]), ({**meta, "tensors": list(t)}, t)))
        for shard, key, value in filed:  # all at once, after the encoder: a Ctrl-C leaves the batch whole or not at all
            shard.items[key] = value
        self.batch = []


def rebuild_manifest(out: Path) -> None:
    """manifest.jsonl and errors.jsonl from the complete shards' metadata, in shard order."""
    info = read_info(out)
    files = sorted(out.glob("shard-*.safetensors"))
    items, errors = [], []
    for f in files:
        with safe_open(str(f), "pt") as s:
            meta = s.metadata() or {}
        items += json.loads(meta.get("items", "[]"))
        errors += json.loads(meta.get("errors", "[]"))
    text = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    write_atomic(out / "manifest.jsonl", lambda tmp: tmp.write_text(text(items)))
    write_atomic(out / "errors.jsonl", lambda tmp: tmp.write_text(text(errors)))
    complete = all(_complete(out, part, info["shard_size"]) for part in parts(info))
    info.update(items=len(items), errors=len(errors), complete=complete)
    write_atomic(out / "info.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))


# ---- reading -------------------------------------------------------------------------------------


class LatentDataset(Dataset):
    """A latent dataset as a torch Dataset. Items are dicts: `latent` (normalised with the model's
    normalisation: what a diffusion model trains on), `caption`, `flipped`, SDXL's `original_size`,
    `crop_coords_top_left` and `target_size` (long tensors of 2: a batch holds Bx2), `content_box`,
    `source`, `size`, `crop`, `bucket`, `shard`, `index`.

    model: another normalisation for the stored raw latents (a recalibrated copy of the encoding model;
    anything `vaekit.load` reads); it must have the encoding model's weights. sample=True draws from the
    stored posterior on each access, seeded by (seed, epoch, item): call `set_epoch` each epoch (it reaches
    persistent DataLoader workers too), and a resumed training run sees the same draws. Shards open lazily,
    memory-mapped, once per DataLoader worker."""

    def __init__(self, root: str | Path, sample: bool = False, seed: int = 0, model: Autoencoder | str | None = None):
        self.root = Path(root)
        self.info = read_info(self.root)
        if not self.info.get("complete") or not (self.root / "manifest.jsonl").is_file():
            command = next((p.get("command") for p in reversed(parts(self.info)) if p.get("command")), None)
            rerun = f"`{command}`" if command else "the `vaekit encode` command that made it"
            raise ValueError(f"{self.root} is an unfinished latent dataset (its encode was interrupted): rerun {rerun} to finish it")
        self.config = AutoencoderConfig.from_dict(self.info["model_config"])
        self.items = [json.loads(line) for line in (self.root / "manifest.jsonl").read_text().splitlines() if line.strip()]
        stats = [self.root / name for name in (BN_STATS_FILE, "normalization.safetensors") if (self.root / name).is_file()]
        bn = load_file(str(stats[0])) if stats else None  # the old name, in datasets written before the spelling was one
        self.bn_stats = (bn["running_mean"], bn["running_var"]) if bn else None
        if model is not None:
            if not isinstance(model, Autoencoder):
                from .checkpoints import load

                model = load(model)
            if not encoded_by(model, self.info):
                raise ValueError(f"the model given for the normalisation does not have the weights that encoded {self.root} "
                                 "(another weights hash): give the encoding model or a recalibrated copy of it")  # fmt: skip
            bn_stats = model.bn_stats()
            self.config = model.config
            self.bn_stats = (bn_stats[0].detach().float().cpu(), bn_stats[1].detach().float().cpu()) if bn_stats else None
        if sample and self.info["store"] != "both":
            raise ValueError(f"sample=True needs the posterior; this dataset stores {self.info['store']!r}: encode it with "
                             f"{option('store', 'both')}")
        self.sample, self.seed = sample, seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # shared with DataLoader workers, persistent ones too
        self._open: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own files
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def raw(self, i: int) -> dict[str, Tensor]:
        """The stored tensors of item i (`mean`, `logvar`, or `latent`), as written."""
        item = self.items[i]
        k, j = item["shard"], item["index"]
        if k not in self._open:
            self._open[k] = safe_open(str(shard_path(self.root, k)), "pt")
        f = self._open[k]
        return {name: f.get_tensor(f"{name}.{j}") for name in ("mean", "logvar", "latent") if f"{name}.{j}" in f.keys()}

    def raw_latent(self, i: int) -> Tensor:
        """Item i's latent as `encode` gives it (fp32): the posterior mean, a draw from it, or the stored sample."""
        t = self.raw(i)
        if "latent" in t:
            return t["latent"].float()
        if self.sample:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
            mean, logvar = t["mean"].float(), t["logvar"].float()
            return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        return t["mean"].float()

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        latent = normalize_latents(self.raw_latent(i)[None], self.config, self.bn_stats)[0]
        # Items of datasets made before these fields: the square target, no caption, not mirrored.
        fields = {"bucket": [self.info["resolution"]] * 2, "caption": "", "flipped": False, **{k: v for k, v in item.items() if v is not None}}
        sdxl = {k: torch.tensor(fields[k]) for k in ("original_size", "crop_coords_top_left", "target_size") if k in fields}
        return {**fields, **sdxl, "latent": latent}

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised latents (NCHW) back to what the model decodes."""
        return denormalize_latents(z, self.config, self.bn_stats)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of items from one aspect-ratio bucket each (the latents of a batch then stack), shuffled per
    epoch with (seed, epoch); `drop_last` drops each bucket's incomplete batch. Under torchrun (or with rank
    and world_size given) each rank takes every world_size-th batch of the same epoch's list, which is
    padded by repeating its first batches (or cut, with drop_last) so every rank gets as many batches."""

    def __init__(self, dataset: LatentDataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None):  # fmt: skip
        self.groups: dict[str, list[int]] = {}
        for i, item in enumerate(dataset.items):
            self.groups.setdefault(str(item.get("bucket")), []).append(i)
        self.batch_size, self.shuffle, self.seed, self.drop_last, self.epoch = batch_size, shuffle, seed, drop_last, 0
        distributed = dist.is_available() and dist.is_initialized()
        self.world = world_size if world_size is not None else dist.get_world_size() if distributed else 1
        self.rank = rank if rank is not None else dist.get_rank() if distributed else 0
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, world_size {self.world})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        batches = []
        for key in sorted(self.groups):
            idx = list(self.groups[key])
            if self.shuffle:
                rng.shuffle(idx)
            batches += [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)
                        if not self.drop_last or i + self.batch_size <= len(idx)]  # fmt: skip
        if self.shuffle:
            rng.shuffle(batches)
        if self.world == 1 or not batches:
            return batches
        per_rank = len(batches) // self.world if self.drop_last else -(-len(batches) // self.world)
        padded = [batches[i % len(batches)] for i in range(per_rank * self.world)]
        return padded[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


# ---- decoding and calibration ---------------------------------------------------------------------


def output_name(source: str, flipped: bool = False) -> PurePosixPath:
    """Where `vaekit decode` writes a dataset item, relative to OUTDIR: its source's name with a tar shard's
    suffix dropped (shard-000.tar/x.jpg -> shard-000/x.jpg: no folder named like a file), a mirrored item as
    x.flipped.jpg; a name that would leave OUTDIR is refused (files.safe_name)."""
    name = safe_name(source)
    parts_ = [next((p[: -len(s)] for s in SHARD_SUFFIXES if p.endswith(s) and len(p) > len(s)), p) for p in name.parts[:-1]]
    name = PurePosixPath(*parts_, name.name)
    return name.with_name(f"{name.stem}.flipped{name.suffix}") if flipped else name


def decode_latents(model: Autoencoder, latents: str | Path, out: str | Path, raw: bool = False, force: bool = False,
                   overwrite: bool = False, tile: int | str | None = None, progress: bool = True,
                   skipped: list[str] | None = None) -> list[Path]:  # fmt: skip
    """Decode `latents`, a folder `vaekit encode` wrote or one .safetensors / weights-only .pt file of latents
    (normalised, as a diffusion model makes them, unless `raw`), into PNGs in `out`; returns the files written.

    A dataset's items are named after their sources (`output_name`, then `files.output_names`: x.jpg and x.png
    become x.jpg.png and x.png) and decoded from the stored posterior mean, with no round trip through the
    normalisation; `model` must have the weights that encoded it (any normalisation), unless `force`. A preview model
    (arch "taesd") instead must speak the dataset's latents (`vaekit.config.preview_refusal`: its teacher's family and
    normalisation), unless `force`, and gets them normalised, as its teacher's diffusion model sees them. A file's
    tensors are named after their keys. Names that would leave `out` are skipped and described in `skipped`.
    Everything is checked before `out` is made or any file written (the files.py rules)."""
    from .data import to_uint8, write_image
    from .files import check_output_folder, check_targets, output_folder, output_names

    src, out = Path(latents), Path(out)
    check_output_folder(out, "the output folder")
    skipped = [] if skipped is None else skipped
    preview = model.config.arch == "taesd"  # it decodes its teacher's normalised latents (vaekit.config.preview_config)
    if raw and preview:
        raise ValueError(f"a preview model decodes its teacher's normalised latents, not raw ones: drop {option('raw')}, or decode "
                         "raw latents with the teacher")  # fmt: skip
    if is_latent_dataset(src):
        dataset = LatentDataset(src)
        if preview and not force and (why := preview_refusal(model.config, dataset.config, dataset.info.get("weights_hash"))):
            raise ValueError(f"{src} holds latents this preview does not speak: {why}. Decode them with a preview of their model, "
                             f"or pass {option('force')} to decode anyway")  # fmt: skip
        if not preview and not force and not encoded_by(model, dataset.info):
            raise ValueError(f"the model is not the one that encoded {src} (its info.json records other weights): decode with "
                             f"that model (or a recalibrated copy of it), or pass {option('force')} to decode anyway")  # fmt: skip
        channels = dataset.config.normalised_shape[0] if preview else dataset.config.latent_channels
        _check_channels(model, channels, f"{src} holds", raw=not preview)
        kept = []
        for i, item in enumerate(dataset.items):
            try:
                kept.append((i, output_name(item["source"], item.get("flipped", False))))
            except ValueError as e:
                skipped.append(f"skipped {item['source']}: {e}")
        names = [name for _, name in kept]
        # a preview gets the dataset's latents normalised as its teacher's diffusion model sees them
        found = (dataset[i]["latent"] if preview else dataset.raw_latent(i) for i, _ in kept)
    elif src.is_dir():
        raise ValueError(f"{src} is a folder without info.json: give a latent dataset `vaekit encode` wrote, or a .safetensors or .pt file of latents")
    else:
        pairs = []
        for key, t in read_latent_file(src):
            _check_channels(model, t.shape[0], f"{src}: {key!r} has", raw=raw)
            try:
                pairs.append((safe_name(key), t))
            except ValueError as e:
                skipped.append(f"skipped {key!r}: {e}")
        names = [name for name, _ in pairs]
        bn = model.bn_stats()
        found = (t.float() if raw else denormalize_latents(t.float()[None], model.config, bn)[0] for _, t in pairs)
    if not names:
        raise ValueError(f"nothing to decode in {src}" + (f" ({skipped[0]})" if skipped else ""))
    targets = [out / name for name in output_names(names)]
    check_targets(targets, [], overwrite, inside=out)
    with output_folder(out, "vaekit decode"):
        for target, z in progress_bar(zip(targets, found), "decode", "img", total=len(targets), enabled=progress):
            with torch.inference_mode():
                x = model.decode(z[None].to(model.device), tile=tile)
            write_image(target, to_uint8(x)[0])
    return targets


def _check_channels(model: Autoencoder, channels: int, what: str, raw: bool) -> None:
    """Latents the model cannot decode are refused before any folder is made."""
    want = model.config.latent_channels if raw else model.config.normalised_shape[0]
    if channels != want:
        kind = "raw" if raw else "normalised"
        raise ValueError(f"{what} {channels}-channel latents; the model's {kind} latents have {want}: decode with the model "
                         f"that made them" + ("" if raw else f" (or pass {option('raw')} if they are raw, as `encode` returns them)"))  # fmt: skip


def read_latent_file(path: str | Path) -> list[tuple[str, Tensor]]:
    """A .safetensors or weights-only .pt file of latents -> (name, CHW tensor) pairs: each tensor named by its key,
    a batch (4D) split into `key_00000`, ... ."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            found = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            found = loaded if isinstance(loaded, dict) else {path.stem: loaded}
    except Exception as e:  # noqa: BLE001 — a corrupt, truncated or pickled file: one line naming it
        raise ValueError(f"{path} is not a readable file of latents ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    pairs = []
    for key, t in found.items():
        if not isinstance(t, Tensor) or t.ndim not in (3, 4):
            raise ValueError(f"{path}: {key!r} is not a latent (CHW or NCHW tensor)")
        pairs += [(key, t)] if t.ndim == 3 else [(f"{key}_{i:05d}", t[i]) for i in range(len(t))]
    return pairs


def latent_statistics(model: Autoencoder, latents: Iterable[Tensor], per_channel: bool, normalised: bool = False) -> dict[str, Any]:
    """Mean and std of raw latents (NCHW; each may have its own size), globally or per channel of the normalised
    layout; with `normalised`, of the latents after the model's normalisation (what its diffusion model sees)."""
    sums, sq, n, count = None, None, 0, 0
    for z in latents:
        z = (model.normalize(z.to(model.device)) if normalised else model.normalised_layout(z)).double().cpu()
        dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
        s, q = z.sum(dim=dims), z.pow(2).sum(dim=dims)
        sums, sq = (s, q) if sums is None else (sums + s, sq + q)
        n += z.numel() // (z.shape[1] if per_channel else 1)
        count += len(z)
    if sums is None:
        raise ValueError("no latents to measure")
    mean = sums / n
    std = (sq / n - mean.pow(2)).clamp_min(0).sqrt()
    return {"mean": mean.tolist() if per_channel else float(mean), "std": std.tolist() if per_channel else float(std),
            "images": count, "per_channel": per_channel}  # fmt: skip


def calibrate(model: Autoencoder, images: Iterable[Tensor], per_channel: bool, sample: bool = True,
              seed: int = 0, normalised: bool = False) -> dict[str, Any]:  # fmt: skip
    """Mean and std of the model's raw latents (posterior samples, as SD's scale factor was measured; the mode with
    sample=False) on `images` (1xCxHxW each), by `latent_statistics`."""
    g = torch.Generator().manual_seed(seed)

    def latents() -> Iterator[Tensor]:
        with torch.inference_mode():
            for x in images:
                posterior = model.encode(x.to(model.device, model.dtype))
                z = posterior.mean.float().cpu()
                yield z + posterior.std.float().cpu() * torch.randn(z.shape, generator=g) if sample and not posterior.deterministic else z

    with torch.inference_mode():
        return latent_statistics(model, latents(), per_channel, normalised)


def stored_latents(dataset: LatentDataset, sample: bool = True, seed: int = 0, limit: int | None = None) -> Iterator[Tensor]:
    """A latent dataset's raw latents (1xCxhxw each) as `calibrate` measures them, without re-encoding: posterior
    samples (seeded) where the dataset stores the posterior, else what it stores (the mean, or one sample)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        t = dataset.raw(i)
        z = t.get("latent", t.get("mean")).float()
        if sample and "logvar" in t:
            z = z + torch.exp(0.5 * t["logvar"].float()) * torch.randn(z.shape, generator=g)
        yield z[None]


def calibrated_model(model: Autoencoder, stats: dict[str, Any]) -> Autoencoder:
    """A copy of `model` whose normalisation makes the measured latents zero-mean, unit-variance."""
    cfg = model.config
    if cfg.latent_norm == "patch_bn":  # FLUX.2: the statistics are its BatchNorm's running mean and variance
        if not stats["per_channel"]:
            raise ValueError(f"a FLUX.2-style model normalises per channel (its BatchNorm): calibrate with {option('per_channel')}")
        new = Autoencoder(cfg)
        new.load_state_dict(model.state_dict())
        new.bn.running_mean.copy_(torch.tensor(stats["mean"]))
        new.bn.running_var.copy_(torch.tensor(stats["std"]).pow(2))
        return new
    if stats["per_channel"]:
        cfg = cfg.replace(latent_norm="channel", latents_mean=tuple(stats["mean"]), latents_std=tuple(stats["std"]),
                          scaling_factor=1.0, shift_factor=0.0)  # fmt: skip
    else:
        cfg = cfg.replace(latent_norm="affine", shift_factor=stats["mean"], scaling_factor=1.0 / stats["std"],
                          latents_mean=(), latents_std=())  # fmt: skip
    new = Autoencoder(cfg)
    new.load_state_dict(model.state_dict())
    return new.to(model.dtype).eval()
