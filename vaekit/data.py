"""Images in and out (files <-> uint8 RGB or RGBA arrays <-> NCHW float tensors in [-1, 1]), the DATA strings
every command accepts, and the deterministic, resumable training data."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import os
import signal
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from .extras import MissingPackage
from .files import OUTPUT_MARKER, write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS: vaekit's one decompression-bomb limit
# A JPEG read with reduce_to=(w, h) is decoded at 1/2, 1/4 or 1/8 scale only where that keeps at least
# REDUCE_MARGIN x (w, h) and divides both sides, so that the caller's Lanczos resize, not the DCT scaling,
# does the last 4x or more of the shrinking. bench/jpeg_decode.py, each rule at its worst (the decode keeping
# exactly M x), against a full decode plus the same resize, in levels of 0-255: keeping 1x (the former rule)
# changed photos by up to 41 (a kind's mean up to 2.5), 58 on sides the scale does not divide; 2x by up to
# 16 (mean up to 0.9); 4x by at most 7 on photos and 5 on smooth and flat saturated colours (means 0.3 or
# less). Drawn sharp edges between saturated colours still differ by up to 20 at single pixels (mean 0.8).
REDUCE_MARGIN = 4
REDUCE_BOUND = 8  # levels of 0-255: what read_image promises for photos and smooth or flat colours

_ORIENTATION = 0x0112  # the EXIF tag; 1 is upright, 2-8 are the transposes below (5-8 swap width and height)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip
_HEADER_LOCK = threading.Lock()


class ImageTooLarge(ValueError):
    """More pixels than the decompression-bomb limit: refused from the header, before any decoding."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"{width}x{height} is {width * height:,} pixels, above the decompression-bomb limit of {limit:,}")


def _orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) orientation in the header, 1 when absent or unreadable: a broken EXIF block must not
    make a readable image unreadable. Image.Image.getexif, not im.getexif: PNG's own decodes the whole image
    to look for an eXIf chunk after the pixel data, which image_size must not (and read_image then agrees)."""
    try:
        value = Image.Image.getexif(im).get(_ORIENTATION, 1)
        return value if value in _UPRIGHT else 1
    except Exception:  # noqa: BLE001 — any malformed EXIF/XMP: keep the stored orientation
        return 1


@contextlib.contextmanager
def _open(file: str | Path | io.BytesIO, max_pixels: int | None) -> Iterator[tuple[Image.Image, int, tuple[int, int]]]:
    """The opened image, the orientation still to apply to its pixels, and its upright (height, width), read
    from the header: refused (ImageTooLarge) above max_pixels before anything is decoded.

    PIL's own check in Image.open (a warning above Image.MAX_IMAGE_PIXELS, its own error above twice that)
    is switched off for the header read only, so vaekit's limit is the one limit, with one message. The
    global is restored at once, and the lock keeps concurrent vaekit reads from restoring each other's value."""
    with _HEADER_LOCK:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(file)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    with im:
        orientation = _orientation(im)
        # PIL's TIFF reader turns the image itself when it loads it (and, from Pillow 11, reports the turned
        # size already): the stored size is in its tags.
        tiff = im.format == "TIFF"
        w, h = (im.tag_v2.get(256, im.width), im.tag_v2.get(257, im.height)) if tiff else im.size
        w, h = (h, w) if orientation >= 5 else (w, h)
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(w, h, max_pixels)
        yield im, 1 if tiff else orientation, (h, w)


def _dct_scale(size: tuple[int, int], want: tuple[int, int]) -> int:
    """The JPEG DCT scale (8, 4, 2, or 1: none) for a (width, height) file the caller shrinks to `want`, in
    the file's orientation: the largest that keeps REDUCE_MARGIN x want and divides both sides. Not dividing,
    the last row and column of blocks would decode as whole pixels and the picture come out up to scale - 1
    file pixels larger than it is, shifting what the caller's centre crop shows (8 levels even where 12x kept)."""
    (w, h), (tw, th) = size, want
    m = REDUCE_MARGIN
    return next((s for s in (8, 4, 2) if w % s == 0 and h % s == 0 and w >= s * m * tw and h >= s * m * th), 1)


def image_size(file: str | Path | io.BytesIO, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the image upright, as read_image returns it, from the header only: for callers
    that pick a size or bucket before decoding. Raises ImageTooLarge above max_pixels (None: no limit)."""
    with _open(file, max_pixels) as (_, _, size):
        return size


def read_image(
    path: str | Path | io.BytesIO, reduce_to: tuple[int, int] | None = None, max_pixels: int | None = MAX_PIXELS,
    alpha: bool = False,
) -> np.ndarray:
    """Any PIL-readable image as HxWx3 uint8 RGB (grayscale, palette, RGBA and 16-bit converted), upright:
    its EXIF orientation applied, as phone cameras store portrait photos sideways (ImageOps.exif_transpose).
    Transparent pixels are composited on white, unless `alpha`: then HxWx4 RGBA with the alpha kept as stored
    (colours unpremultiplied, as PNG holds them; an image without alpha is opaque), for models with 4 channels.

    reduce_to=(w, h), the upright size the caller will resize to: a JPEG may be decoded at 1/2, 1/4 or 1/8
    of its size (DCT scaling: several times faster than decoding it whole), keeping at least REDUCE_MARGIN x
    (w, h), so the caller's resize gives the full decode's result within REDUCE_BOUND levels.

    Images above max_pixels (None: no limit) raise ImageTooLarge before decoding. A max_pixels above PIL's
    Image.MAX_IMAGE_PIXELS needs that raised too for TIFFs: PIL checks their size again while decoding."""
    with _open(path, max_pixels) as (im, orientation, _):
        if reduce_to is not None and im.format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures after it
            scale = _dct_scale(im.size, reduce_to if orientation < 5 else reduce_to[::-1])
            if scale > 1:
                im.draft(im.mode, (im.width // scale, im.height // scale))  # PIL picks exactly `scale` from this
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64)
            a = np.clip(a / (65535.0 if a.max() > 255 else 255.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            im = Image.fromarray(a, mode="L")
        if alpha:
            im = im.convert("RGBA")
        elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = _on_white(im.convert("RGBA"))
        im = im if alpha else im.convert("RGB")
        return np.asarray(im.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else im, dtype=np.uint8).copy()


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite on white: transparent regions of logos and renders are usually meant as paper."""
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def on_white(image: np.ndarray) -> np.ndarray:
    """HxWx4 RGBA uint8 -> HxWx3 RGB composited on white: exactly what `read_image` gives a 3-channel model for
    the same file, so one read with alpha serves models of both kinds (an HxWx3 image is returned as it is)."""
    return image if image.shape[2] == 3 else np.asarray(_on_white(Image.fromarray(image, "RGBA")))


def on_white_tensor(x: Tensor) -> Tensor:
    """(N)CHW RGBA in [-1, 1] -> RGB in [-1, 1] composited on white (alpha clamped to [0, 1]), differentiable:
    what a person sees of an RGBA image on a page, for the networks that take 3 channels (LPIPS, Inception)
    and for pictures. A 3-channel tensor is returned as it is."""
    if x.shape[-3] == 3:
        return x
    alpha = ((x[..., 3:, :, :] + 1) / 2).clamp(0, 1)
    return alpha * (x[..., :3, :, :] - 1) + 1  # colour * alpha + white * (1 - alpha), in [-1, 1]


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write HxWx3 (RGB) or HxWx4 (RGBA) uint8 in the format the suffix names (atomically: a crash leaves no
    half file)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell an image format from the name {path.name}: end it in .png (or .jpg, .webp, ...)")
    if image.ndim == 3 and image.shape[2] == 4 and fmt in ("JPEG", "BMP", "PPM"):
        raise ValueError(f"{path.name}: {fmt} cannot hold the alpha channel of an RGBA image: end the name in .png (or .webp, .tif)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format=fmt))


def to_tensor(image: np.ndarray) -> Tensor:
    """HxWxC uint8 (RGB or RGBA) -> 1xCxHxW float in [-1, 1]."""
    # np.array copies: torch warns on (and must not alias) read-only arrays such as skimage.data's.
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> np.ndarray:
    """NCHW (or CHW) float in [-1, 1] -> NxHxWxC (or HxWxC) uint8, rounded as the metrics expect."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def find_images(root: str | Path) -> list[Path]:
    """Image files under root (recursive, sorted), or [root] itself if it is a file. Folders below
    root that vaekit wrote outputs into (they hold `files.OUTPUT_MARKER`) are skipped, so earlier
    reconstructions, run folders and reports never come back as inputs."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no such file or folder: {root}")
    found = []
    for folder, subfolders, names in os.walk(root):  # like rglob: symlinked folders are not entered
        if OUTPUT_MARKER in names and Path(folder) != root:
            subfolders.clear()
            continue
        found += [Path(folder, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


# ---- what a DATA argument names ------------------------------------------------------------
#
# Every command that takes images (train, eval, analyze, compare) accepts the same DATA strings:
# a folder (searched recursively), one image file, tar shards ("shards/{000..099}.tar"), or the
# built-in photos "samples", "samples:train", "samples:val" and "samples:native".

# Photos that ship inside scikit-image and scikit-learn, so demos and tests need no download.
# Held out for validation: three of different content that never enter training: a cat's fur
# (chelsea), an indoor still life with smooth shading and highlights (coffee), a saturated
# nature close-up (flower).
SAMPLE_TRAIN = (
    "astronaut", "rocket", "motorcycle", "hubble_deep_field", "immunohistochemistry", "retina", "china",
    "camera", "brick", "grass", "gravel", "coins", "moon",
)  # fmt: skip
SAMPLE_VAL = ("chelsea", "coffee", "flower")
# A second held-out set of another kind, "samples:native": 256x256 crops at the photos' own resolution
# (not whole photos scaled down) and synthetic saturated colours. Photo -> (strip width, crop boxes
# (x, y) of 256x256): the training photos lose that right-hand strip, so its crops stay unseen; the
# held-out photos give their crops as they are.
NATIVE_SIDE = 256
NATIVE_CROPS = {
    "motorcycle": (256, ((485, 122),)),
    "hubble_deep_field": (256, ((744, 180), (744, 436))),
    "retina": (256, ((1155, 450), (1155, 706))),
    "chelsea": (0, ((97, 22),)),
    "coffee": (0, ((44, 72), (300, 72))),
    "flower": (0, ((64, 85), (320, 85))),
}
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_shards(data: str) -> bool:
    return str(data).endswith(SHARD_SUFFIXES)


@functools.lru_cache(maxsize=None)
def _sample_photo(name: str) -> np.ndarray:
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            image = load_sample_image(f"{name}.jpg")
        else:
            import skimage.data

            image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    except ImportError:
        raise MissingPackage(
            "the built-in photos come from scikit-image and scikit-learn: pip install 'vaekit[train]'"
        ) from None
    image = np.asarray(image, dtype=np.uint8)
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    image.setflags(write=False)  # cached and shared: nobody may change it in place
    return image


def sample_images(split: str = "all") -> list[tuple[str, np.ndarray]]:
    """The built-in photos as (name, HxWx3 uint8): split "train" (without the strips NATIVE_CROPS keeps
    out), "val" (the fixed held-out three), "all" (both), or "native" (the second held-out set)."""
    if split == "native":
        return native_crops() + synthetic_colours()
    names = {"train": SAMPLE_TRAIN, "val": SAMPLE_VAL, "all": SAMPLE_TRAIN + SAMPLE_VAL}.get(split)
    if names is None:
        raise ValueError(f"unknown samples split {split!r}; use samples, samples:train, samples:val or samples:native")
    return [(name, _without_strip(name)) for name in names]


def _without_strip(name: str) -> np.ndarray:
    strip = NATIVE_CROPS.get(name, (0, ()))[0] if name in SAMPLE_TRAIN else 0
    photo = _sample_photo(name)
    return photo[:, : photo.shape[1] - strip] if strip else photo


def held_out_sets(resolution: int = 256) -> dict[str, list[tuple[str, np.ndarray]]]:
    """The built-in held-out images by kind: "photos" (samples:val as the trainer validates them, shorter
    side to `resolution`, centre crop), "crops" and "synthetic" (the two halves of samples:native)."""
    return {"photos": [(n, center_crop(im, resolution)) for n, im in sample_images("val")], "crops": native_crops(),
            "synthetic": synthetic_colours()}  # fmt: skip


def native_crops() -> list[tuple[str, np.ndarray]]:
    """256x256 crops at native resolution from the held-out photos and the training photos' held-out strips."""
    s = NATIVE_SIDE
    return [(f"{name}@{x},{y}", _sample_photo(name)[y : y + s, x : x + s]) for name, (_, boxes) in NATIVE_CROPS.items()
            for x, y in boxes]  # fmt: skip


def synthetic_colours(side: int = NATIVE_SIDE) -> list[tuple[str, np.ndarray]]:
    """Saturated colours as real images are full of and small photo sets lack: flat patches at and near
    the RGB cube's corners, full-saturation hue and two-colour gradients, a saturated petal-like shading."""
    v, u = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")  # v: down, u: across

    def patches(colours: list[tuple[int, int, int]]) -> np.ndarray:
        rows = [np.concatenate([np.broadcast_to(np.array(c, np.uint8), (side // 2, side // 4, 3)) for c in colours[r::2]], 1)
                for r in range(2)]  # fmt: skip
        return np.concatenate(rows, 0)

    corners = [(r, g, b) for r in (0, 255) for g in (0, 255) for b in (0, 255)]
    near = [(255, 128, 0), (0, 128, 255), (128, 0, 255), (255, 0, 128), (0, 255, 128), (128, 255, 0), (255, 200, 0), (0, 60, 200)]
    hue = (u[..., None] * 6 - np.array([0, 2, 4])) % 6  # full-saturation hue sweep across, darker downwards
    hues = np.clip(np.abs(hue - 3) - 1, 0, 1)[..., [0, 1, 2]] * (1 - 0.6 * v[..., None])
    r2 = (u - 0.45) ** 2 + (v - 0.55) ** 2
    petal = np.stack([0.8 + 0.2 * np.exp(-r2 * 4), 0.15 + 0.55 * np.exp(-r2 * 6), 0.012 * np.ones_like(u)], -1)
    red_yellow = np.stack([np.ones_like(u), u, np.zeros_like(u)], -1) * (1 - 0.3 * v[..., None])
    blue_cyan_green = np.stack([np.zeros_like(u), np.clip(u * 1.5, 0, 1), np.clip(1.5 - u * 1.5, 0, 1) * (1 - 0.5 * v)], -1)
    magenta_radial = np.stack([np.ones_like(u), 0.9 * np.sqrt(r2), 1 - np.sqrt(r2)], -1).clip(0, 1)
    smooth = {"hues": hues, "petal": petal, "red_yellow": red_yellow, "blue_cyan_green": blue_cyan_green,
              "magenta_radial": magenta_radial}  # fmt: skip
    out = [("corners", patches(corners)), ("near_corners", patches(near))]
    return out + [(name, np.round(a * 255).astype(np.uint8)) for name, a in smooth.items()]


def _webdataset() -> ModuleType:
    try:
        import webdataset
    except ImportError:
        raise MissingPackage("reading tar shards needs the webdataset package: pip install 'vaekit[train]'") from None
    return webdataset


def shard_urls(pattern: str) -> list[str]:
    """'dir/{000..099}.tar' -> the shard paths it names (brace expansion as in webdataset)."""
    return list(_webdataset().shardlists.expand_urls(pattern))


def iter_shard_samples(urls: list[str], skipped: list[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(key, encoded image bytes) of every sample in the shards, in order; samples without an image are skipped."""
    wds = _webdataset()
    for url in urls:
        if not Path(url).exists():
            raise FileNotFoundError(f"no such shard: {url}")
        for sample in wds.tarfile_samples([{"url": url}]):
            ext = next((e for e in sample if "." + e in IMAGE_SUFFIXES), None)
            if ext is None:
                if skipped is not None:
                    skipped.append(f"{url}:{sample['__key__']}: no image file in sample")
                continue
            yield sample["__key__"], sample[ext]


def iter_images(data: str, skipped: list[str] | None = None, alpha: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Every image a DATA string names, as (name, HxWx3 uint8), or HxWx4 RGBA with `alpha` (`read_image`).

    Unreadable files are skipped, never fatal: each is appended to `skipped` ("name: reason"), or,
    when no list is given, reported in one warning at the end.
    """
    own = skipped is None
    skipped = [] if own else skipped
    data = str(data)
    if data == "samples" or data.startswith("samples:"):
        for name, image in sample_images(data.partition(":")[2] or "all"):
            yield name, with_alpha(image) if alpha else image
    elif is_shards(data):
        for key, raw in iter_shard_samples(shard_urls(data), skipped):
            try:
                yield key, read_image(io.BytesIO(raw), alpha=alpha)
            except Exception as e:
                skipped.append(f"{key}: {e}")
    else:
        root = Path(data)
        for path in find_images(root):
            try:
                image = read_image(path, alpha=alpha)
            except Exception as e:
                skipped.append(f"{path}: {e}")
                continue
            yield (str(path.relative_to(root)) if root.is_dir() else path.name), image
    if own and skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): " + "; ".join(skipped), RuntimeWarning, stacklevel=2)


def sources(data: str) -> set[str]:
    """What a DATA string reads, by identity: 'samples:NAME' for built-in photos, the resolved path of
    each image file or tar shard. Two DATA strings overlap when their sources do (a copy of a file
    under another path is another source)."""
    data = str(data)
    if data == "samples" or data.startswith("samples:"):
        split = data.partition(":")[2] or "all"
        if split == "native":
            return {f"samples:native/{name}" for name, _ in sample_images("native")}
        names = {"train": SAMPLE_TRAIN, "val": SAMPLE_VAL, "all": SAMPLE_TRAIN + SAMPLE_VAL}.get(split, ())
        return {f"samples:{name}" for name in names}
    paths = shard_urls(data) if is_shards(data) else find_images(data)
    return {str(Path(p).resolve()) for p in paths}


def load_images(data: str, limit: int | None = None, skipped: list[str] | None = None,
                alpha: bool = False) -> list[tuple[str, np.ndarray]]:  # fmt: skip
    """`iter_images` as a list (the first `limit` images when given)."""
    return list(itertools.islice(iter_images(data, skipped, alpha), limit))


def with_alpha(image: np.ndarray) -> np.ndarray:
    """HxWx3 RGB -> HxWx4 RGBA, opaque (an HxWx4 image as it is)."""
    if image.shape[2] == 4:
        return image
    return np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)


# ---- crops ---------------------------------------------------------------------------------


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The evaluation view of an image: shorter side resized to `size` (Lanczos), centre square cut.

    Resizing first (the ImageNet-256 protocol of published VAE numbers) keeps the whole scene instead of
    a small patch of a large photo.
    """
    h, w = image.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.LANCZOS))
    y, x = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(image[y : y + size, x : x + size])


def random_crop(
    image: np.ndarray, size: int, rng: np.random.Generator, min_scale: float = 1.0, flip: bool = True,
    permute_colors: bool = False,
) -> np.ndarray:  # fmt: skip
    """A size x size training crop: the image scaled by a random factor in [min_scale, 1] (log-uniform,
    Lanczos, never so small that the crop would not fit), a random square cut, a random horizontal flip,
    and with `permute_colors` its R, G, B channels in a random order (RGBA keeps its alpha).

    Down-scaling shows the model whole objects at several sizes, not only the fine texture of large
    photos. Images smaller than the crop are scaled up just enough to fit. Only the cropped region is
    resampled (PIL's resize with a box), so large photos cost no more than small ones. Permuting the
    colours turns a few photos into many palettes: with little data (the 13 built-in photos) it is
    what teaches the model colours its training photos lack (docs/TRAINING.md).
    """
    h, w = image.shape[:2]
    fit = size / min(h, w)  # the scale at which the shorter side equals the crop
    lo = max(min_scale, fit)
    scale = fit if fit >= 1 else float(np.exp(rng.uniform(np.log(lo), 0.0))) if lo < 1 else 1.0
    if scale == 1.0:
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        crop = image[y : y + size, x : x + size]
    else:
        side = min(size / scale, h, w)  # the source square, in original pixels
        y, x = rng.uniform(0, h - side), rng.uniform(0, w - side)
        crop = np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS, box=(x, y, x + side, y + side)))
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if permute_colors:  # R, G and B only: an alpha channel stays last
        crop = crop[..., [*rng.permutation(3), *range(3, crop.shape[2])]]
    return crop.copy()  # contiguous, writable, and never a view of a cached image


# ---- training data -------------------------------------------------------------------------
#
# Determinism: every training sample is named by its position p in an endless stream (epoch after
# epoch of seeded permutations) and its crop comes from a generator seeded by (seed, rank, p). The
# batches therefore depend on the seed and the position only, never on worker count or timing, and
# a resumed run continues the stream from the number of batches already consumed.


def held_out(name: str, fraction: float) -> bool:
    """Whether an image belongs to the validation split: a stable hash of its name, so the split
    never changes when images are added, and does not depend on the seed."""
    return zlib.crc32(name.encode()) / 2**32 < fraction


@dataclass
class Batch:
    images: Tensor  # N x C x R x R uint8, C = 3 (RGB) or 4 (RGBA) (converted to [-1, 1] floats on the training device)
    skipped: list[str]  # unreadable files met while making it ("path: reason")


def collate(items: list[tuple[Tensor, list[str]]]) -> Batch:
    return Batch(torch.stack([t for t, _ in items]), [s for _, bad in items for s in bad])


@dataclass(frozen=True)
class Crops:
    """How every training dataset cuts its crops: `random_crop`'s options, in one place."""

    resolution: int
    min_scale: float = 1.0
    flip: bool = True
    permute_colors: bool = False

    def __call__(self, image: np.ndarray, seed: tuple[int, ...]) -> Tensor:
        """The crop of `image` that `seed` picks, as a CHW uint8 tensor."""
        crop = random_crop(image, self.resolution, np.random.default_rng(seed), self.min_scale, self.flip, self.permute_colors)
        return torch.from_numpy(crop).permute(2, 0, 1)


class CropDataset(Dataset):
    """Random crops of a fixed list of images (files read on access, or arrays in memory).

    Indexed by (index, seed) keys from `StreamSampler`. An unreadable file is replaced by the next
    readable one, and reported with the batch so the trainer can list it once. `alpha`: files are read
    as RGBA (`read_image(alpha=True)`), for 4-channel models; arrays are cropped as they are.
    """

    def __init__(self, items: Sequence[Path | np.ndarray], crops: Crops, alpha: bool = False):
        if not items:
            raise ValueError("no training images")
        self.items, self.crops, self.alpha = list(items), crops, alpha

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]) -> tuple[Tensor, list[str]]:
        index, seed = key
        bad: list[str] = []
        for i in range(index, index + len(self.items)):
            item = self.items[i % len(self.items)]
            try:
                image = item if isinstance(item, np.ndarray) else read_image(item, alpha=self.alpha)
            except Exception as e:
                bad.append(f"{item}: {e}")
                continue
            return self.crops(image, seed), bad
        raise ValueError("none of the training images could be read: " + "; ".join(bad[:3]))


class StreamSampler(Sampler):
    """Endless batches of (index, seed) keys for one rank, starting at batch `start`.

    Each epoch is a permutation of the dataset seeded by (seed, epoch); rank r of w takes every
    w-th element (DistributedSampler's split, wrapping around so all ranks get equal shares).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.per_rank = -(-n // world)
        self._perm: tuple[int, np.ndarray] | None = None

    def key(self, position: int) -> tuple[int, tuple[int, ...]]:
        epoch, i = divmod(position, self.per_rank)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n))
        return int(self._perm[1][(i * self.world + self.rank) % self.n]), (self.seed, self.rank, position)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
        for b in itertools.count(self.start):
            yield [self.key(p) for p in range(b * self.batch_size, (b + 1) * self.batch_size)]


class ShardStream(IterableDataset):
    """Batches of random crops from tar shards, endless and deterministic.

    The stream is split across (rank, worker): whole shards when there are enough, else every k-th
    sample. Each epoch reshuffles the shard order and, within a buffer, the samples (both seeded).
    Resuming skips the samples a stream already produced, before decoding them (exact, but the
    skipped part of the shards is read again). Samples whose key `held_out` (val_fraction) are left
    out of training. `alpha`: images are read as RGBA, for 4-channel models.
    """

    def __init__(
        self, pattern: str, crops: Crops, val_fraction: float = 0.0, buffer: int = 256, batch_size: int = 1,
        seed: int = 0, rank: int = 0, world: int = 1, start: int = 0, alpha: bool = False,
    ):  # fmt: skip
        self.urls = shard_urls(pattern)
        self.crops, self.val_fraction, self.buffer, self.alpha = crops, val_fraction, buffer, alpha
        self.batch_size, self.seed, self.rank, self.world, self.start = batch_size, seed, rank, world, start

    def _samples(self, stream: int, streams: int) -> Iterator[tuple[tuple[int, ...], str, bytes]]:
        for epoch in itertools.count():
            order = [self.urls[i] for i in np.random.default_rng((self.seed, epoch)).permutation(len(self.urls))]
            split_shards = len(order) >= streams
            mine = order[stream::streams] if split_shards else order
            rng = np.random.default_rng((self.seed, epoch, stream))
            buffer: list[tuple[str, bytes]] = []
            n = 0
            samples = (s for j, s in enumerate(iter_shard_samples(mine)) if split_shards or j % streams == stream)
            for key, raw in samples:
                if held_out(key, self.val_fraction):
                    continue
                buffer.append((key, raw))
                if len(buffer) >= self.buffer:
                    yield (self.seed, epoch, stream, n), *buffer.pop(int(rng.integers(len(buffer))))
                    n += 1
            for i in rng.permutation(len(buffer)):
                yield (self.seed, epoch, stream, n), *buffer[i]
                n += 1
            if n == 0:
                raise ValueError(f"training stream {stream} of {streams} got no images from {len(self.urls)} shard(s)")

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes batch b from worker b % workers; a resumed loader starts at `start`, so
        # this worker continues the stream that produced batches start + wid, start + wid + workers, ...
        slot = (self.start + wid) % workers
        done = len(range(slot, self.start, workers))
        samples = self._samples(self.rank * workers + slot, self.world * workers)
        samples = itertools.islice(samples, done * self.batch_size, None)
        # One batch per batch_size raw samples, so the skip above stays exact: an unreadable sample
        # makes its batch one smaller instead of pulling in the next sample.
        for chunk in iter(lambda: list(itertools.islice(samples, self.batch_size)), []):
            crops: list[Tensor] = []
            bad: list[str] = []
            for seed, key, raw in chunk:
                try:
                    image = read_image(io.BytesIO(raw), alpha=self.alpha)
                except Exception as e:
                    bad.append(f"{key}: {e}")
                    continue
                crops.append(self.crops(image, seed))
            if not crops:
                raise ValueError("a whole batch of shard samples was unreadable: " + "; ".join(bad[:3]))
            yield Batch(torch.stack(crops), bad)


@dataclass
class TrainingData:
    """What the trainer needs from a DATA string: crops to train on and fixed validation images."""

    dataset: CropDataset | ShardStream
    val: list[tuple[str, np.ndarray]]  # name, val_resolution x val_resolution x C uint8 (centre crops)
    description: str
    skipped: list[str] = field(default_factory=list)  # unreadable validation images ("path: reason")

    def loader(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0, workers: int = 0) -> DataLoader:
        """Endless batches for one rank, from batch `start` on (the batches a resumed run has not seen)."""
        # Its own generator: creating a loader iterator must not draw from the global torch RNG,
        # which the trainer checkpoints (the crops themselves are keyed, see above).
        common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), worker_init_fn=_ignore_sigint,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip
        if workers:
            common["prefetch_factor"] = 4
        if isinstance(self.dataset, ShardStream):
            stream = copy.copy(self.dataset)
            stream.batch_size, stream.seed, stream.rank, stream.world, stream.start = batch_size, seed, rank, world, start
            return DataLoader(stream, batch_size=None, **common)
        sampler = StreamSampler(len(self.dataset), batch_size, seed, rank, world, start)
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate, **common)


def _ignore_sigint(worker_id: int) -> None:
    """Loader processes leave Ctrl-C to the trainer, which finishes its step and saves a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_data(
    data: str, resolution: int, val: str | None = None, val_fraction: float = 0.05, val_images: int = 16,
    val_resolution: int = 256, min_scale: float = 1.0, flip: bool = True, permute_colors: bool = False,
    alpha: bool = False,
) -> TrainingData:  # fmt: skip
    """Split DATA into training crops and validation images; with `alpha`, RGBA for a 4-channel model (every image
    read with `read_image(alpha=True)`: alpha as stored, opaque where a file has none).

    Validation comes from `val` (any DATA string) when given; else "samples" uses its fixed held-out
    photos, and folders and shards hold out the images whose name `held_out(name, val_fraction)`; in a
    folder, an unreadable held-out image is replaced by the next readable one in hash order (taken out
    of training), so one bad file never leaves validation empty. A `val` that shares files with `data`
    gets a warning: it would score images the model trains on. Unreadable validation images are listed
    in the result's `skipped`.
    """
    data = str(data)
    held: list[tuple[str, np.ndarray]] = []
    skipped: list[str] = []
    crops = Crops(resolution, min_scale, flip, permute_colors)
    trained_on = data
    if data == "samples" or data.startswith("samples:"):
        split = data.partition(":")[2] or "train"
        trained_on = f"samples:{split}"
        if split == "all" and not val:
            raise ValueError(
                "samples:all includes chelsea, coffee and flower, the photos the built-in data validates on: "
                "train on 'samples' (they are held out), or pass --val with other images"
            )
        dataset: CropDataset | ShardStream = CropDataset([im for _, im in load_images(trained_on, alpha=alpha)], crops)
        held = [] if val else load_images("samples:val", alpha=alpha)
        description = f"{len(dataset)} built-in photos ({split})"
    elif is_shards(data):
        dataset = ShardStream(data, crops, val_fraction=0.0 if val else val_fraction, alpha=alpha)
        if not val and val_fraction > 0:
            for key, raw in (kr for kr in iter_shard_samples(dataset.urls) if held_out(kr[0], val_fraction)):
                if len(held) == val_images:
                    break
                try:
                    held.append((key, read_image(io.BytesIO(raw), alpha=alpha)))
                except Exception as e:
                    skipped.append(f"{key}: {e}")
        description = f"{len(dataset.urls)} tar shard(s)"
    else:
        root = Path(data)
        files = find_images(root)
        if not files:
            raise ValueError(f"no images (png/jpg/webp/bmp/tif) found under {root}")
        names = [str(p.relative_to(root)) if root.is_dir() else p.name for p in files]
        order = sorted(range(len(files)), key=lambda i: zlib.crc32(names[i].encode()))  # the held-out ones first
        queue = [] if val or val_fraction <= 0 else [i for i in order if held_out(names[i], val_fraction)]
        if not val and val_fraction > 0 and not queue and len(files) > 1:
            queue = order[:1]  # at least one
        out_of_training, wanted = set(queue), min(len(queue), val_images)
        spares = (i for i in order if i not in out_of_training)
        while queue and len(held) < wanted:
            i = queue.pop(0)
            try:
                held.append((names[i], read_image(files[i], alpha=alpha)))
            except Exception as e:
                skipped.append(f"{files[i]}: {e}")
                spare = next(spares, None) if len(files) - len(out_of_training) > 1 else None
                if spare is not None:  # the next readable image in hash order takes its place
                    out_of_training.add(spare)
                    queue.append(spare)
        dataset = CropDataset([p for i, p in enumerate(files) if i not in out_of_training], crops, alpha)
        description = f"{len(dataset)} training images from {root}"
    if val:
        held = load_images(val, limit=val_images, skipped=skipped, alpha=alpha)
        shared = sorted(sources(val) & sources(trained_on))
        if shared:
            warnings.warn(
                f"--val shares {len(shared)} image(s) with --data ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}): "
                "validation then scores images the model trains on; give --val images that are not in --data",
                RuntimeWarning, stacklevel=2,
            )  # fmt: skip
    crops = [(name, center_crop(image, val_resolution)) for name, image in held]
    return TrainingData(dataset, crops, description + f", {len(crops)} validation images", skipped)
