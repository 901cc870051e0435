"""Latent datasets: encode an image collection once into sharded latents for diffusion training, read
them back (`LatentDataset`), decode them to images, and calibrate a model's latent scale.

    OUT/info.json                  what made the dataset (model hash and config, resolution, resize mode,
                                   buckets, store, dtype, shard size, the sources' hash, vaekit version)
    OUT/normalization.safetensors  FLUX.2 only: the BatchNorm statistics its normalisation needs
    OUT/shard-00000.safetensors    sources [0, S) in sorted order: per item `mean.J` and `logvar.J` (or
                                   `latent.J`), raw as `encode` returns them; its metadata holds the items'
                                   manifest lines and the errors of its range
    OUT/manifest.jsonl             one line per item, in source order, rebuilt from complete shards
    OUT/errors.jsonl               one line per skipped source: `source` and the reason

Crash safety: shard k holds the sources at positions [k*S, (k+1)*S) and is written under a temporary name,
then renamed when complete, so a shard file is always whole. A rerun encodes only the missing shards with
the same batches, so the result equals one clean run. Under torchrun, rank r encodes the shards k = r
(mod world) and rank 0 rebuilds the manifest when all ranks are done. Latents are stored raw and
normalised on read (`vaekit.model.autoencoder.normalize_latents`), so every family's normalisation,
FLUX.2's patch BatchNorm and Qwen-Image's per-channel statistics included, comes with the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import AutoencoderConfig
from .data import IMAGE_SUFFIXES, find_images, is_shards, read_image, sample_images, shard_urls
from .files import mark_output_folder, write_atomic
from .model import Autoencoder
from .model.autoencoder import denormalize_latents, normalize_latents
from .progress import progress as progress_bar

RESIZE_MODES = ("center-crop", "resize", "pad")
STORES = ("both", "mean", "sample")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The options that decide what a latent is: a dataset never mixes two settings of any of them.
KEY_FIELDS = ("model_hash", "resolution", "resize_mode", "buckets", "store", "dtype", "precision", "shard_size",
              "sources_hash", "min_side", "seed")  # fmt: skip


@dataclass(frozen=True)
class EncodeOptions:
    resolution: int
    resize_mode: str = "center-crop"
    buckets: bool = False
    store: str = "both"
    dtype: str = "fp16"
    precision: str = "fp32"  # the model's compute dtype
    shard_size: int = 1000
    # Images per encoder call; None: 8 on a GPU, 1 on a CPU, where larger batches run slower per image
    # (their activations leave the caches: -40% for tiny-f8c4, -8% for sd1 at 256², docs/LATENTS.md).
    batch_size: int | None = None
    min_side: int | None = None  # None: half the resolution; smaller images are skipped
    max_pixels: int = 89_478_485  # PIL's decompression-bomb limit
    tile: int | None = None
    workers: int = 2
    seed: int = 0  # posterior samples (--store sample)


# ---- sources: what DATA names, in a fixed order -----------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str  # relative to DATA: the manifest's `source`
    path: str  # a file, a tar shard, or "samples:SPLIT/NAME"
    span: tuple[int, int] | None = None  # in a tar shard: the member's data offset and size (read without a scan)


def list_sources(data: str) -> list[Source]:
    """Every image DATA names, sorted: folders recursively, tar shards member by member, built-in photos by name."""
    data = str(data)
    if data == "samples" or data.startswith("samples:"):
        return [Source(name, f"{data}/{name}") for name, _ in sample_images(data.partition(":")[2] or "all")]
    if is_shards(data):
        found = []
        for url in shard_urls(data):
            with tarfile.open(url) as tar:
                found += [Source(f"{Path(url).name}/{m.name}", url, (m.offset_data, m.size)) for m in tar.getmembers()
                          if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
        return found
    root = Path(data)
    return [Source(str(p.relative_to(root)) if root.is_dir() else p.name, str(p)) for p in find_images(root)]


class _Bomb(ValueError):
    """More pixels than --max-pixels: refused before it is decoded."""


def _read(source: Source, max_pixels: int, target: Callable[[tuple[int, int]], tuple[int, int]]) -> tuple[np.ndarray, tuple[int, int]]:
    """The source as HxWx3 uint8 RGB and its (height, width) in the file. A JPEG is decoded at the smallest
    DCT scale that still covers target(size) (width, height): what the resize needs. A decompression bomb
    (more than max_pixels) is an error, not a warning."""
    if source.path.startswith("samples"):
        split, _, name = source.path.partition("/")
        image = dict(sample_images(split.partition(":")[2] or "all"))[name]
        return image, image.shape[:2]
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            file: str | io.BytesIO = source.path
            if source.span is not None:
                with open(source.path, "rb") as f:
                    f.seek(source.span[0])
                    file = io.BytesIO(f.read(source.span[1]))
            with Image.open(file) as im:  # the header only: the size
                w, h = im.size
            return read_image(file, reduce_to=target((h, w))), (h, w)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise _Bomb(f"decompression bomb: {e} (--max-pixels)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


# ---- resizing --------------------------------------------------------------------------------


def buckets_for(resolution: int, factor: int) -> list[tuple[int, int]]:
    """SDXL-style aspect-ratio buckets: (height, width) of about resolution² pixels, sides multiples of the
    model's factor (of 64 when that is a multiple of it and the resolution is at least 256), aspect 1:4 to 4:1."""
    step = 64 if 64 % factor == 0 and resolution >= 256 else factor
    found = set()
    for h in range(step, 4 * resolution + 1, step):
        w = max(step, round(resolution * resolution / h / step) * step)
        if 0.25 <= h / w <= 4:
            found.add((h, w))
    return sorted(found)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    h, w = size
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(h / w)), -b[0] * b[1]))


def fit(image: np.ndarray, target: tuple[int, int], mode: str) -> tuple[np.ndarray, list[float]]:
    """Image -> target (height, width), and the box [x0, y0, x1, y1] of the original it shows.

    center-crop: scale to cover, cut the centre; resize: stretch to the target; pad: scale to fit inside,
    centre on black (the box is then the whole image)."""
    h, w = image.shape[:2]
    th, tw = target
    im = Image.fromarray(image)
    if mode == "resize":
        return np.asarray(im.resize((tw, th), Image.LANCZOS)), [0, 0, w, h]
    if mode == "pad":
        s = min(th / h, tw / w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        canvas = np.zeros((th, tw, 3), np.uint8)
        y, x = (th - nh) // 2, (tw - nw) // 2
        canvas[y : y + nh, x : x + nw] = np.asarray(im.resize((nw, nh), Image.LANCZOS))
        return canvas, [0, 0, w, h]
    s = max(th / h, tw / w)  # center-crop: the source box that covers the target at scale s
    bw, bh = min(w, tw / s), min(h, th / s)  # (min: float rounding must not push the box outside the image)
    x0, y0 = (w - bw) / 2, (h - bh) / 2
    out = im.resize((tw, th), Image.LANCZOS, box=(x0, y0, x0 + bw, y0 + bh))
    return np.asarray(out), [x0, y0, x0 + bw, y0 + bh]


class _Prepared(Dataset):
    """Sources loaded and resized in DataLoader workers: (position, CHW float tensor or None, manifest fields or error)."""

    def __init__(self, sources: Sequence[Source], positions: Sequence[int], options: EncodeOptions,
                 buckets: Sequence[tuple[int, int]]):  # fmt: skip
        self.sources, self.positions, self.o, self.buckets = sources, list(positions), options, list(buckets)

    def __len__(self) -> int:
        return len(self.positions)

    def _target(self, size: tuple[int, int]) -> tuple[int, int]:
        return nearest_bucket(size, self.buckets) if self.buckets else (self.o.resolution, self.o.resolution)

    def _decoded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) a JPEG must keep for `fit` to shrink it to the target: DCT scaling stays above it."""
        (h, w), (th, tw) = size, self._target(size)
        s = max(th / h, tw / w) if self.o.resize_mode == "center-crop" else min(th / h, tw / w)
        if self.o.resize_mode == "resize":
            return tw, th
        return math.ceil(w * s), math.ceil(h * s)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, dict[str, Any] | str]:
        p = self.positions[i]
        try:
            image, (h, w) = _read(self.sources[p], self.o.max_pixels, self._decoded_size)
        except _Bomb as e:
            return p, None, str(e)
        except Exception as e:  # noqa: BLE001 — any unreadable file is listed, never fatal
            return p, None, f"unreadable: {e}"
        smallest = self.o.min_side if self.o.min_side is not None else self.o.resolution // 2
        if min(h, w) < smallest:
            return p, None, f"too small: {w}x{h}, shorter side below {smallest} (--min-side)"
        pixels, box = fit(image, self._target((h, w)), self.o.resize_mode)
        # In the file's pixels (a JPEG may have been decoded at a reduced scale), rounded to whole pixels.
        box = [round(v * (w / image.shape[1] if k % 2 == 0 else h / image.shape[0]), 1) for k, v in enumerate(box)]
        bucket = self._target((h, w)) if self.buckets else None
        x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0  # a writable copy
        return p, x, {"source": self.sources[p].name, "size": [h, w], "crop": box, "bucket": list(bucket) if bucket else None}


# ---- keys: which model and options made a dataset --------------------------------------------


def model_hash(model: Autoencoder) -> str:
    """SHA-256 of the config and of every weight in fp32 (so the dtype a model is loaded in does not change it)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def sources_hash(sources: Sequence[Source]) -> str:
    return hashlib.sha256("\n".join(s.name for s in sources).encode()).hexdigest()[:32]


def _info(model: Autoencoder, sources: Sequence[Source], o: EncodeOptions) -> dict[str, Any]:
    from . import __version__

    return {
        "format": "vaekit-latents", "vaekit_version": __version__, "model_hash": model_hash(model),
        "model_config": model.config.to_dict(), "normalisation": model.config.normalisation,
        "latent_shape": list(model.config.normalised_shape), "resolution": o.resolution, "resize_mode": o.resize_mode,
        "buckets": buckets_for(o.resolution, model.factor) if o.buckets else False, "store": o.store, "dtype": o.dtype,
        "precision": o.precision, "shard_size": o.shard_size, "sources": len(sources), "sources_hash": sources_hash(sources),
        "min_side": o.min_side if o.min_side is not None else o.resolution // 2, "seed": o.seed,
    }  # fmt: skip


def _check_same(found: dict[str, Any], wanted: dict[str, Any], out: Path) -> None:
    diffs = [f"sources: DATA named {found.get('sources')} images then, {wanted['sources']} now" if k == "sources_hash"
             else f"{k}: {found.get(k)!r} there, {wanted[k]!r} now"
             for k in KEY_FIELDS if json.dumps(found.get(k)) != json.dumps(wanted[k])]  # fmt: skip
    if diffs:
        what = "the model (its weights or config)" if diffs[0].startswith("model_hash") else "the options"
        raise ValueError(f"{out} holds latents made with other settings ({'; '.join(diffs)}): {what} differ. "
                         "Encode into a new OUT, or rerun with the dataset's settings (its info.json) to continue it")  # fmt: skip


# ---- encoding --------------------------------------------------------------------------------


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.safetensors"


def encode_dataset(model: Autoencoder, data: str, out: str | Path, options: EncodeOptions, progress: bool = True) -> dict[str, Any]:
    """Encode DATA into the latent dataset OUT (see the module docstring); continue it if it exists.
    Returns a summary: items, errors, shards written now and in all, seconds."""
    import time

    started = time.time()
    o = options
    if o.resize_mode not in RESIZE_MODES or o.store not in STORES or o.dtype not in DTYPES:
        raise ValueError(f"resize mode, store and dtype must be one of {RESIZE_MODES}, {STORES}, {tuple(DTYPES)}")
    if o.resolution % model.factor or o.resolution < model.factor:
        raise ValueError(f"--resolution {o.resolution} is not a multiple of the model's factor {model.factor}")
    if o.batch_size is None:
        o = dataclasses.replace(o, batch_size=8 if model.device.type == "cuda" else 1)
    if o.shard_size < 1 or o.batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be at least 1")
    if o.store == "sample" and model.config.kind == "ae":
        raise ValueError("a plain autoencoder has no posterior to sample: use --store mean")
    out = Path(out)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    sources = list_sources(data)
    if not sources:
        raise ValueError(f"no images found in {data}")
    wanted = _info(model, sources, o)
    info_file = out / "info.json"
    if rank == 0:
        for leftover in out.glob(".shard-*.tmp"):  # a shard being written when a crash (kill -9) stopped the run
            leftover.unlink()
        if info_file.is_file():
            _check_same(json.loads(info_file.read_text()), wanted, out)
        else:
            if out.is_dir() and any(p.name != ".vaekit-output" for p in out.iterdir()):
                raise ValueError(f"OUT {out} holds files but no info.json: choose a new or empty folder")
            mark_output_folder(out, "vaekit encode")
            write_atomic(info_file, lambda tmp: tmp.write_text(json.dumps(wanted, indent=2) + "\n"))
            bn = model.bn_stats()
            if bn is not None:
                stats = {"running_mean": bn[0].detach().float().cpu(), "running_var": bn[1].detach().float().cpu()}
                write_atomic(out / "normalization.safetensors", lambda tmp: save_file(stats, str(tmp)))
    _barrier()
    if rank != 0:
        _check_same(json.loads(info_file.read_text()), wanted, out)

    n_shards = math.ceil(len(sources) / o.shard_size)
    mine = [k for k in range(n_shards) if k % world == rank and not shard_path(out, k).is_file()]
    positions = [p for k in mine for p in range(k * o.shard_size, min((k + 1) * o.shard_size, len(sources)))]
    buckets = [tuple(b) for b in wanted["buckets"]] if o.buckets else []
    loader = DataLoader(_Prepared(sources, positions, o, buckets), batch_size=None, num_workers=o.workers,
                        prefetch_factor=4 if o.workers else None)  # fmt: skip
    encoder = _Encoder(model, o)
    shard: dict[str, Any] = {"k": None}
    with progress_bar(desc=f"encode{f' rank {rank}' if world > 1 else ''}", unit="img", total=len(positions),
                      enabled=progress) as bar:  # fmt: skip
        for p, x, meta in loader:
            k = p // o.shard_size
            if shard["k"] != k:
                shard = {"k": k, "items": [], "errors": [], "todo": min(o.shard_size, len(sources) - k * o.shard_size)}
            if x is None:
                shard["errors"].append({"source": sources[p].name, "reason": meta})
            else:
                encoder.add(p, x, {**meta, "shard": k}, shard["items"])
            shard["todo"] -= 1
            if shard["todo"] == 0:
                encoder.flush(shard["items"])
                _write_shard(out, shard, encoder)
            bar.update(1)
    _barrier()
    if rank == 0:
        rebuild_manifest(out, n_shards)
    _barrier()
    done = sum(shard_path(out, k).is_file() for k in range(n_shards))
    items = sum(1 for _ in open(out / "manifest.jsonl")) if (out / "manifest.jsonl").is_file() else 0
    errors = sum(1 for _ in open(out / "errors.jsonl")) if (out / "errors.jsonl").is_file() else 0
    return {"items": items, "errors": errors, "shards": done, "of": n_shards, "encoded_now": len(positions),
            "seconds": time.time() - started, "out": str(out)}  # fmt: skip


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _Encoder:
    """Collects prepared images into batches of one size within one shard, encodes them, keeps the tensors."""

    def __init__(self, model: Autoencoder, o: EncodeOptions):
        self.model, self.o = model, o
        self.batch: list[tuple[int, Tensor, dict[str, Any], list]] = []
        self.tensors: dict[int, dict[str, Tensor]] = {}

    def add(self, p: int, x: Tensor, meta: dict[str, Any], items: list) -> None:
        if self.batch and (len(self.batch) == self.o.batch_size or self.batch[0][1].shape != x.shape):
            self.flush(items)
        self.batch.append((p, x, meta, items))

    @torch.inference_mode()
    def flush(self, items: list) -> None:
        if not self.batch:
            return
        x = torch.stack([b[1] for b in self.batch]).to(self.model.device, self.model.dtype)
        posterior = self.model.encode(x, tile=self.o.tile)
        store, dtype = self.o.store, DTYPES[self.o.dtype]
        if store == "sample":  # one generator per source position: the same draw whatever the batching
            gens = [torch.Generator(device="cpu").manual_seed(self.o.seed * 1_000_003 + p) for p, *_ in self.batch]
            sample = posterior.mean.float().cpu() + posterior.std.float().cpu() * torch.stack(
                [torch.randn(posterior.mean.shape[1:], generator=g) for g in gens])
        for i, (p, _, meta, _) in enumerate(self.batch):
            if store == "sample":
                t = {"latent": sample[i]}
            elif store == "mean" or posterior.deterministic:
                t = {"mean": posterior.mean[i]}
            else:
                t = {"mean": posterior.mean[i], "logvar": posterior.logvar[i]}
            self.tensors[p] = {k: v.detach().to("cpu", dtype).contiguous() for k, v in t.items()}
            items.append((p, meta))
        self.batch = []


def _write_shard(out: Path, shard: dict[str, Any], encoder: _Encoder) -> None:
    tensors, lines = {}, []
    for j, (p, meta) in enumerate(sorted(shard["items"], key=lambda pm: pm[0])):
        for name, t in encoder.tensors.pop(p).items():
            tensors[f"{name}.{j}"] = t
        lines.append({**meta, "index": j})
    metadata = {"items": json.dumps(lines), "errors": json.dumps(shard["errors"])}
    write_atomic(shard_path(out, shard["k"]), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def rebuild_manifest(out: Path, n_shards: int | None = None) -> None:
    """manifest.jsonl and errors.jsonl from the complete shards' metadata, in source order."""
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
    info = json.loads((out / "info.json").read_text())
    total = n_shards if n_shards is not None else math.ceil(info["sources"] / info["shard_size"])
    info.update(items=len(items), errors=len(errors), complete=len(files) == total)
    write_atomic(out / "info.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))


# ---- reading -------------------------------------------------------------------------------------


class LatentDataset(Dataset):
    """A latent dataset as a torch Dataset: items are dicts with `latent` (normalised with the model's
    normalisation: what a diffusion model trains on), `source`, `size`, `crop`, `bucket`, `shard`, `index`.

    sample=True draws from the stored posterior on each access, seeded by (seed, epoch, item): call
    `set_epoch` each epoch, and a resumed training run sees the same draws. Shards open lazily,
    memory-mapped, once per DataLoader worker."""

    def __init__(self, root: str | Path, sample: bool = False, seed: int = 0):
        self.root = Path(root)
        if not (self.root / "info.json").is_file():
            raise FileNotFoundError(f"{self.root} is not a latent dataset (no info.json): make one with `vaekit encode`")
        self.info = json.loads((self.root / "info.json").read_text())
        self.config = AutoencoderConfig.from_dict(self.info["model_config"])
        self.items = [json.loads(line) for line in (self.root / "manifest.jsonl").read_text().splitlines() if line.strip()]
        stats = self.root / "normalization.safetensors"
        bn = load_file(str(stats)) if stats.is_file() else None
        self.bn_stats = (bn["running_mean"], bn["running_var"]) if bn else None
        if sample and self.info["store"] != "both":
            raise ValueError(f"sample=True needs the posterior (--store both); this dataset stores {self.info['store']!r}")
        self.sample, self.seed, self.epoch = sample, seed, 0
        self._open: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own files
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        latent = normalize_latents(self.raw_latent(i)[None], self.config, self.bn_stats)[0]
        fields = {k: v for k, v in self.items[i].items() if v is not None}  # (no None: DataLoader batches collate)
        return {**fields, "latent": latent}

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised latents (NCHW) back to what the model decodes."""
        return denormalize_latents(z, self.config, self.bn_stats)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of items from one aspect-ratio bucket each (the latents of a batch then stack), shuffled
    per epoch with (seed, epoch); `drop_last` drops each bucket's incomplete batch."""

    def __init__(self, dataset: LatentDataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.groups: dict[str, list[int]] = {}
        for i, item in enumerate(dataset.items):
            self.groups.setdefault(str(item.get("bucket")), []).append(i)
        self.batch_size, self.shuffle, self.seed, self.drop_last, self.epoch = batch_size, shuffle, seed, drop_last, 0

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
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


# ---- decoding and calibration ---------------------------------------------------------------------


def read_latent_file(path: str | Path) -> list[tuple[str, Tensor]]:
    """A .safetensors or weights-only .pt file of latents -> (name, CHW tensor) pairs: each tensor named by its key,
    a batch (4D) split into `key_00000`, ... ."""
    path = Path(path)
    if path.suffix == ".safetensors":
        found = load_file(str(path))
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        found = loaded if isinstance(loaded, dict) else {path.stem: loaded}
    pairs = []
    for key, t in found.items():
        if not isinstance(t, Tensor) or t.ndim not in (3, 4):
            raise ValueError(f"{path}: {key!r} is not a latent (CHW or NCHW tensor)")
        pairs += [(key, t)] if t.ndim == 3 else [(f"{key}_{i:05d}", t[i]) for i in range(len(t))]
    return pairs


def calibrate(model: Autoencoder, images: Sequence[Tensor], per_channel: bool, sample: bool = True,
              seed: int = 0, normalised: bool = False) -> dict[str, Any]:  # fmt: skip
    """Mean and std of the model's raw latents (posterior samples, as SD's scale factor was measured; the mode with
    sample=False) on `images` (1xCxHxW each), globally or per channel of the normalised layout; with
    `normalised`, of the latents after the model's normalisation (what its diffusion model sees)."""
    g = torch.Generator().manual_seed(seed)
    sums, sq, n = None, None, 0
    with torch.inference_mode():
        for x in images:
            posterior = model.encode(x.to(model.device, model.dtype))
            z = posterior.mean.float().cpu()
            if sample and not posterior.deterministic:
                z = z + posterior.std.float().cpu() * torch.randn(z.shape, generator=g)
            z = (model.normalize(z) if normalised else model.normalised_layout(z)).double()
            dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
            s, q = z.sum(dim=dims), z.pow(2).sum(dim=dims)
            sums, sq = (s, q) if sums is None else (sums + s, sq + q)
            n += z.numel() // (z.shape[1] if per_channel else 1)
    mean = sums / n
    std = (sq / n - mean.pow(2)).clamp_min(0).sqrt()
    return {"mean": mean.tolist() if per_channel else float(mean), "std": std.tolist() if per_channel else float(std),
            "images": len(images), "per_channel": per_channel}  # fmt: skip


def calibrated_model(model: Autoencoder, stats: dict[str, Any]) -> Autoencoder:
    """A copy of `model` whose normalisation makes the measured latents zero-mean, unit-variance."""
    cfg = model.config
    if cfg.latent_norm == "patch_bn":  # FLUX.2: the statistics are its BatchNorm's running mean and variance
        if not stats["per_channel"]:
            raise ValueError("a FLUX.2-style model normalises per channel (its BatchNorm): calibrate with --per-channel")
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


