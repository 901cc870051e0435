"""Images in and out: files <-> uint8 RGB arrays <-> NCHW float tensors in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """Any PIL-readable image as HxWx3 uint8 RGB (grayscale, palette, RGBA and 16-bit converted)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64)
            a = np.clip(a / (65535.0 if a.max() > 255 else 255.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            im = Image.fromarray(a, mode="L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # Composite on white: transparent regions of logos and renders are usually meant as paper.
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, rgba)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def write_image(path: str | Path, image: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def to_tensor(image: np.ndarray) -> Tensor:
    """HxWx3 uint8 -> 1x3xHxW float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> np.ndarray:
    """NCHW (or CHW) float in [-1, 1] -> NxHxWx3 (or HxWx3) uint8, rounded as the metrics expect."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def find_images(root: str | Path) -> list[Path]:
    """Image files under root (recursive, sorted), or [root] itself if it is a file."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no such file or folder: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
