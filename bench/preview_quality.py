"""How close previews draw to their teacher (docs/PREVIEWS.md): a distilled preview (`vaekit distill`'s RUN), the linear
preview fitted by least squares and the hand-set one (the first three latent channels as R, G, B), each decoding the
teacher's normalised latents of the built-in held-out sets (photos, native-resolution crops, saturated colours).

    python bench/preview_quality.py TEACHER --preview RUN/model.safetensors --pictures previews.jpg
    python bench/preview_quality.py preset:sd1 preset:flux2 --fit-images 8 --side 128      # linear vs hand-set only

Scores (vaekit.distill.against_teacher): PSNR and SSIM against the teacher's own decode, PSNR against the originals,
and the worst mean-colour shift from the teacher's decode (levels). The linear preview is fitted on the built-in
training photos (`samples`), which none of the held-out sets share.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

import vaekit
from vaekit.data import held_out_sets, to_tensor, to_uint8
from vaekit.distill import against_teacher, fit_linear_preview, hand_set_preview, teacher_image


def row(teacher: str, kind: str, name: str, s: dict) -> str:
    return (f"| {teacher} | {kind} | {name} | {s['psnr_teacher']:.2f} | {s['ssim_teacher']:.3f} | {s['psnr']:.2f} | "
            f"{s['colour_shift']:.1f} | {s['psnr_teacher_small']:.2f} |")  # fmt: skip


def pictures(path: str, teacher: vaekit.Autoencoder, previews: dict[str, vaekit.Autoencoder], side: int) -> None:
    """One row per held-out kind (its first image): original, the teacher's decode, then each preview's."""
    rows = []
    for images in held_out_sets(side).values():
        image = images[0][1]
        with torch.no_grad():
            z = teacher.to_latent(to_tensor(teacher_image(image, teacher)))
            tiles = [image[..., :3]] + [to_uint8(m.from_latent(z))[0][..., :3] for m in (teacher, *previews.values())]
        rows.append(np.concatenate([np.asarray(Image.fromarray(t).resize((side, side))) for t in tiles], 1))
    Image.fromarray(np.concatenate(rows, 0)).save(path, quality=90)
    print(f"wrote {path}: columns original, teacher, {', '.join(previews)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teachers", nargs="+", help="models vaekit.load reads (preset:NAME: random weights)")
    p.add_argument("--preview", help="a distilled preview of the (one) teacher")
    p.add_argument("--fit-images", type=int, default=32)
    p.add_argument("--side", type=int, default=256, help="fit and held-out photo side")
    p.add_argument("--pictures", help="write a side-by-side JPEG here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| teacher | held-out set | preview | PSNR vs teacher (dB) | SSIM vs teacher | PSNR vs images (dB) | worst colour shift (levels) | PSNR vs teacher at latent resolution (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    for source in args.teachers:
        started = time.perf_counter()
        teacher = vaekit.load(source, dtype=torch.float32)
        linear, _ = fit_linear_preview(teacher, "samples", limit=args.fit_images, side=args.side, progress=False)
        fitted = time.perf_counter() - started
        previews = {"linear (fitted)": linear, "hand-set": hand_set_preview(teacher)}
        if args.preview:
            previews = {"distilled": vaekit.load(args.preview, dtype=torch.float32), **previews}
        for kind, images in held_out_sets(args.side).items():
            for name, scores in against_teacher(previews, teacher, images).items():
                print(row(source, kind, name, scores), flush=True)
        print(f"<!-- {source}: linear fit {fitted:.1f} s -->")
        if args.pictures:
            pictures(args.pictures, teacher, previews, args.side)


if __name__ == "__main__":
    main()
