"""How far the fast convolutions move a trained model's outputs (docs/BENCHMARKS.md, "Accuracy on trained weights").

    python bench/conv_accuracy.py runs/qs4/model runs/qs16/model runs/ldm4/model     # ~1 min each on 2 cores

For each MODEL and each built-in held-out image (samples:val's photos at 256² and 512², the native-resolution crops,
the saturated colours), the direct path (PyTorch's convolutions) against "winograd" (NNPACK wherever it applies: the
worst case) and "auto" (the default: what this machine chose per layer shape):
- the largest latent difference (posterior mean), and the same relative to the latent's largest magnitude;
- the decoded images' PSNR against the direct path's decode of the same latent (pixels in [0, 1]), its lowest over
  the images, and the largest difference in 8-bit levels;
- the reconstruction PSNR against the original image, direct and fast: what a user's scores would see.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from vaekit import convolutions, load
from vaekit.data import center_crop, held_out_sets, sample_images


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) / 2).pow(2).mean())  # [-1, 1] -> [0, 1]
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def images(factor: int) -> list[tuple[str, torch.Tensor]]:
    sets = held_out_sets(256)
    found = [(f"{kind}/{name}", im) for kind, items in sets.items() for name, im in items]
    found += [(f"photos512/{name}", center_crop(im, 512)) for name, im in sample_images("val")]
    out = []
    for name, im in found:
        h, w = (s // factor * factor for s in im.shape[:2])
        out.append((name, torch.from_numpy(np.ascontiguousarray(im[:h, :w])).permute(2, 0, 1)[None].float() / 127.5 - 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--json", help="also write every number here")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    for path in args.models:
        model = load(path).eval()
        per = {"winograd": [], "auto": []}
        with torch.inference_mode():
            for name, x in images(model.factor):
                z = model.encode(x, conv="direct").mean
                y = model.decode(z, conv="direct").clamp(-1, 1)
                for fast in per:
                    zf = model.encode(x, conv=fast).mean
                    yf = model.decode(z, conv=fast).clamp(-1, 1)
                    per[fast].append({"image": name, "latent_max_diff": float((zf - z).abs().max()),
                                      "latent_max": float(z.abs().max()), "psnr_vs_direct": psnr(yf, y),
                                      "max_levels": float((yf - y).abs().max() * 127.5), "recon_psnr_direct": psnr(y, x),
                                      "recon_psnr_fast": psnr(model.decode(zf, conv=fast).clamp(-1, 1), x)})  # fmt: skip
        for fast, items in per.items():
            finite = [i["psnr_vs_direct"] for i in items if math.isfinite(i["psnr_vs_direct"])]
            rows.append({"model": path, "path": fast, "images": len(items),
                         "latent_max_diff": max(i["latent_max_diff"] for i in items),
                         "latent_rel": max(i["latent_max_diff"] / i["latent_max"] for i in items),
                         "psnr_vs_direct_mean": float(np.mean(finite)) if finite else math.inf,
                         "psnr_vs_direct_min": min(finite) if finite else math.inf,
                         "identical_images": len(items) - len(finite),
                         "max_levels": max(i["max_levels"] for i in items),
                         "recon_psnr_change_max": max(abs(i["recon_psnr_fast"] - i["recon_psnr_direct"]) for i in items),
                         "per_image": items})  # fmt: skip
            r = rows[-1]
            print(f"{path} {fast}: latent max diff {r['latent_max_diff']:.1e} ({r['latent_rel']:.1e} of its largest value), "
                  f"decode PSNR vs direct mean {r['psnr_vs_direct_mean']:.1f} min {r['psnr_vs_direct_min']:.1f} dB "
                  f"({r['identical_images']} of {r['images']} identical), max {r['max_levels']:.2f} levels, "
                  f"reconstruction PSNR moved {r['recon_psnr_change_max']:.4f} dB at most", flush=True)  # fmt: skip
    print("\n| model | path | images | max latent diff (relative) | decode PSNR vs direct, mean / min | max diff, 8-bit levels | "
          "reconstruction PSNR moved |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['path']} | {r['images']} | {r['latent_max_diff']:.1e} ({r['latent_rel']:.1e}) | "
              f"{r['psnr_vs_direct_mean']:.1f} / {r['psnr_vs_direct_min']:.1f} dB | {r['max_levels']:.2f} | "
              f"{r['recon_psnr_change_max']:.4f} dB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
