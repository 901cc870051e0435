"""Reduced-scale JPEG decoding (read_image's reduce_to) against a full decode, both then resized by
`vaekit.latents.fit(image, (t, t), "center-crop")` (Lanczos), as `vaekit encode` does.

    python bench/jpeg_decode.py                 # every kind, q90 and q95, targets 64-512 (2 CPU cores: ~30 min)
    python bench/jpeg_decode.py --short 1024 --qualities 90 --kinds photos-tiled drawn --latent-targets 64

Rules (rows): "old" is the former read_image: PIL's draft at the smallest DCT scale (1/2, 1/4, 1/8) that
still covers the resize's size, whatever the file's size; "draft Mx" the same keeping M times that size;
"vaekit Mx" read_image now with REDUCE_MARGIN = M: M times, and only a scale that divides both sides (a
partial last block would decode as a whole pixel and stretch the picture).

Images (kinds), saved as JPEG (PIL's default 4:2:0) at each of --qualities, 3:2 with the shorter side
--short (2048: for every target and M = 2 or 4 the decode keeps exactly M x, the worst case): the built-in
photos (vaekit.data.sample_images("all")), the native crops and the synthetic saturated colours and
gradients (native_crops, synthetic_colours), each upscaled (Lanczos, centre-cut) and tiled (mirrored
copies: native detail); "drawn": random saturated rectangles, black text on white; "photos-odd": the
photos upscaled to odd sides (web-resized files: vaekit decodes them whole).

Pixel differences are in 0-255 levels over every pixel and channel: the max over the kind's images and
the mean of their means. ms: read_image's wall time per image, one thread, mean over the kind (the full
decode's is on the kind's header line). Latents: max abs difference of the posterior mean of a
random-weight preset:tiny-f8c4 (`model.encode(to_tensor(pixels)).mean`), on the two images of the kind
with the largest "old" pixel difference, first quality only.
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

import vaekit
import vaekit.data
from vaekit.data import native_crops, read_image, sample_images, synthetic_colours, to_tensor
from vaekit.latents import fit


def large(image: np.ndarray, short: int, how: str, odd: bool = False) -> np.ndarray:
    """The image at 3:2 (portrait or landscape as it is), shorter side `short` (odd: one less, and the
    longer side odd too): upscaled (Lanczos, the centre cut) or tiled (mirrored copies: native detail)."""
    h, w = image.shape[:2]
    th, tw = (short, short * 3 // 2) if w >= h else (short * 3 // 2, short)
    th, tw = (th - 1 + th % 2, tw - 1 + tw % 2) if odd else (th, tw)
    if how == "upscaled":
        return fit(image, (th, tw), "center-crop")[0]
    rows = [np.concatenate([image[:: (-1) ** i, :: (-1) ** j] for j in range(math.ceil(tw / w))], 1)
            for i in range(math.ceil(th / h))]  # fmt: skip
    return np.ascontiguousarray(np.concatenate(rows, 0)[:th, :tw])


def drawn(short: int) -> list[tuple[str, np.ndarray]]:
    """Sharp edges: random saturated rectangles, and lines of black text on white."""
    rng = np.random.default_rng(0)
    size = (short * 3 // 2, short)
    rects, text = Image.new("RGB", size, "white"), Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(rects)
    for _ in range(size[0] * size[1] // 15000):
        x, y, dx, dy = (int(v) for v in rng.integers(0, [size[0], size[1], 200, 200]))
        draw.rectangle([x, y, x + dx + 4, y + dy + 4], fill=tuple(int(c) for c in rng.choice([0, 255], 3)))
    draw = ImageDraw.Draw(text)
    for y in range(0, size[1], 14):
        draw.text((int(rng.integers(0, 20)), y), "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz ABC0123"), 400)), fill="black")
    return [("rectangles", np.asarray(rects)), ("text", np.asarray(text))]


def kinds(short: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    sets = {"photos": sample_images("all"), "crops": native_crops(), "synthetic": synthetic_colours()}
    out = {f"{kind}-{how}": [(n, large(im, short, how)) for n, im in images]
           for kind, images in sets.items() for how in ("upscaled", "tiled")}  # fmt: skip
    out["drawn"] = drawn(short)
    out["photos-odd"] = [(n, large(im, short, "upscaled", odd=True)) for n, im in sets["photos"]]
    return out


def cover(h: int, w: int, t: int) -> tuple[int, int]:
    """(width, height) the center-crop resize to t x t covers: what `vaekit encode` passes as reduce_to."""
    s = t / min(h, w)
    return math.ceil(w * s), math.ceil(h * s)


def pil_draft(margin: int) -> Callable[[bytes, tuple[int, int]], np.ndarray]:
    """The former read_image on an RGB JPEG, asking PIL's draft for margin x reduce_to."""

    def decode(raw: bytes, reduce_to: tuple[int, int]) -> np.ndarray:
        with Image.open(io.BytesIO(raw)) as im:
            im.draft(im.mode, (reduce_to[0] * margin, reduce_to[1] * margin))
            return np.asarray(im.convert("RGB"))

    return decode


def vaekit_margin(margin: int) -> Callable[[bytes, tuple[int, int]], np.ndarray]:
    def decode(raw: bytes, reduce_to: tuple[int, int]) -> np.ndarray:
        vaekit.data.REDUCE_MARGIN = margin
        return read_image(io.BytesIO(raw), reduce_to=reduce_to)

    return decode


def timed(decode: Callable, *args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = decode(*args)
    return out, time.perf_counter() - start


def cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", type=int, default=2048, help="shorter side of the images, 3:2 (default 2048)")
    p.add_argument("--qualities", type=int, nargs="+", default=[90, 95])
    p.add_argument("--targets", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--draft", type=int, nargs="*", default=[2], help="M of the 'draft Mx' rules (default 2)")
    p.add_argument("--margins", type=int, nargs="+", default=[2, 3, 4], help="M of the 'vaekit Mx' rules")
    p.add_argument("--kinds", nargs="*", help="only these kinds (default all)")
    p.add_argument("--latent-targets", type=int, nargs="*", default=[64, 128, 256],
                   help="targets whose latents are compared (one CPU thread: ~4 s an encode at 512)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(1)
    default_margin = vaekit.data.REDUCE_MARGIN
    rules = {"old": pil_draft(1)} | {f"draft {m}x": pil_draft(m) for m in args.draft}
    rules |= {f"vaekit {m}x": vaekit_margin(m) for m in args.margins}
    model = vaekit.load("preset:tiny-f8c4").eval()
    print(f"{cpu()}, 1 thread; vaekit.data.REDUCE_MARGIN = {default_margin}; qualities {args.qualities}")
    overall: dict[tuple[str, int], list[int]] = {}
    for kind, images in kinds(args.short).items():
        if args.kinds and kind not in args.kinds:
            continue
        stats: dict[tuple[str, int], list[tuple[int, float, float]]] = {}  # (rule, t): per image (max, mean, s)
        full_s: list[float] = []
        scored: list[tuple[int, str, bytes]] = []  # (old rule's max over targets, name, file)
        for q in args.qualities:
            for name, image in images:
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, "JPEG", quality=q)
                raw = buf.getvalue()
                whole, seconds = timed(read_image, io.BytesIO(raw))
                full_s.append(seconds)
                worst = 0
                for t in args.targets:
                    want = fit(whole, (t, t), "center-crop")[0].astype(int)
                    for rule, decode in rules.items():
                        got, seconds = timed(decode, raw, cover(*whole.shape[:2], t))
                        d = np.abs(fit(got, (t, t), "center-crop")[0].astype(int) - want)
                        stats.setdefault((rule, t), []).append((int(d.max()), float(d.mean()), seconds))
                        overall.setdefault((rule, t), []).append(int(d.max()))
                        worst = max(worst, int(d.max())) if rule == "old" else worst
                if q == args.qualities[0]:
                    scored.append((worst, name, raw))
        h, w = images[0][1].shape[:2]
        print(f"\n{kind}: {len(images)} images x {len(args.qualities)} qualities, e.g. {w}x{h}; "
              f"full decode {1000 * np.mean(full_s):.0f} ms")  # fmt: skip
        print(f"  {'rule':10} " + "".join(f"| t={t:<3}  max  mean    ms " for t in args.targets))
        for rule in rules:
            cells = []
            for t in args.targets:
                s = stats[(rule, t)]
                cells.append(f"|     {max(x[0] for x in s):7d} {np.mean([x[1] for x in s]):5.2f} {1000 * np.mean([x[2] for x in s]):5.0f} ")
            print(f"  {rule:10} " + "".join(cells))
        if args.latent_targets:
            picked = sorted(scored, key=lambda x: -x[0])[:2]
            print(f"  latent max |diff| on {', '.join(n for _, n, _ in picked)} (q{args.qualities[0]}):")
            for t in args.latent_targets:
                diffs, scale = {rule: 0.0 for rule in rules}, 0.0
                with torch.no_grad():
                    for _, _, raw in picked:
                        whole = read_image(io.BytesIO(raw))
                        want = model.encode(to_tensor(fit(whole, (t, t), "center-crop")[0])).mean
                        scale = max(scale, float(want.abs().mean()))
                        for rule, decode in rules.items():
                            got = fit(decode(raw, cover(*whole.shape[:2], t)), (t, t), "center-crop")[0]
                            diffs[rule] = max(diffs[rule], float((model.encode(to_tensor(got)).mean - want).abs().max()))
                print(f"    t={t:<4}" + "".join(f"| {rule} {diffs[rule]:.4f} " for rule in rules) + f"(mean |latent| {scale:.3f})")
    vaekit.data.REDUCE_MARGIN = default_margin
    print("\nevery kind: max |diff| in levels (share of images over 4 levels)")
    for rule in rules:
        print(f"  {rule:10} " + "".join(f"| t={t:<3} {max(overall[(rule, t)]):3d} ({np.mean(np.array(overall[(rule, t)]) > 4):4.0%}) "
                                       for t in args.targets))  # fmt: skip


if __name__ == "__main__":
    main()
