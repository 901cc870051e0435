"""Reconstruct image files: encode and decode each image of a file or folder into a PNG of the same size
and relative name, as `vaekit reconstruct` does.

    from vaekit.reconstruct import reconstruct
    done = reconstruct("stabilityai/sd-vae-ft-mse", "photos/", "recon/")   # or an Autoencoder
    done.written, done.skipped

Safe as every vaekit writer (see vaekit.files): the output may not be the input folder, no input is ever
written over, an existing file only with overwrite=True, and a folder of outputs is marked so that image
searches never read it back as input."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import torch

from .checkpoints import load
from .data import IMAGE_SUFFIXES, find_images, read_image, to_tensor, to_uint8, write_image
from .files import check_output_folder, check_targets, output_folder, output_names
from .model import Autoencoder
from .progress import progress as progress_bar

# How a refusal names reconstruct()'s arguments; a caller with names of its own (the CLI's INPUT and OUTDIR)
# passes its words to Refused.say.
PYTHON_WORDS = {"input": "input", "output": "output", "pad": "pass pad=True"}


class Refused(ValueError):
    """An image or an argument reconstruct() refuses. `str()` names the arguments as Python does;
    `say(words)` names them as a caller does, with the keys of PYTHON_WORDS."""

    def __init__(self, template: str, **facts: Any):
        self.template, self.facts = template, facts
        super().__init__(self.say(PYTHON_WORDS))

    def say(self, words: Mapping[str, str]) -> str:
        facts = {k: v.say(words) if isinstance(v, Refused) else v for k, v in self.facts.items()}
        return self.template.format(**{**PYTHON_WORDS, **words}, **facts)


@dataclass
class Reconstructed:
    output: Path  # the folder (or, for one image, the file) written
    written: list[Path] = field(default_factory=list)
    skipped: list[Refused] = field(default_factory=list)  # unreadable images, and with pad=False odd-sized ones


def reconstruct(
    model: Autoencoder | str | Path,
    input: str | Path,
    output: str | Path,
    overwrite: bool = False,
    pad: bool = True,
    tile: int | str | None = None,
    progress: bool = True,
    *,
    family: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.float32,
    seed: int = 0,
) -> Reconstructed:
    """Reconstruct `input` (an image, or a folder searched recursively) into the folder `output` as PNGs with
    the same relative names (suffix .png; of x.jpg and x.png, x.jpg becomes x.jpg.png) and pixel size; for one
    image, `output` may be a file name with an image suffix. Each image is encoded to its posterior mode and
    decoded. `pad` reflect-pads sides that are not a multiple of the model's factor and crops back (False:
    such images are refused); `tile` (pixels or "auto") bounds GPU memory with the untiled result. Unreadable
    images are skipped and listed; `Refused` (a ValueError) if no image could be reconstructed.

    model: an Autoencoder (used on its own device) or anything `vaekit.load` accepts, loaded after the
    arguments are checked, on `device` with `family`, `dtype` (None: as stored) and `seed` (preset:NAME)."""
    src, out = Path(input), Path(output)
    files, targets, to_file = _plan(src, out, overwrite)
    if isinstance(model, (str, Path)):
        model = load(str(model), family=family, device=str(device) if device is not None else None, dtype=dtype, seed=seed)
    done = Reconstructed(out)
    was_training = model.training
    model.eval()
    try:
        with contextlib.nullcontext() if to_file else output_folder(out, "vaekit reconstruct"):
            for path, target in progress_bar(list(zip(files, targets)), "reconstruct", "img", enabled=progress):
                why = _reconstruct_file(model, path, target, pad, tile, single=src.is_file())
                if why is None:
                    done.written.append(target)
                else:
                    done.skipped.append(why)
            if not done.written:  # inside the block: a folder made for nothing is removed again
                more = f"; {len(done.skipped) - 1} more" if len(done.skipped) > 1 else ""
                raise Refused("no image under {src} could be reconstructed (skipped {first}{more})", src=src,
                              first=done.skipped[0], more=more)  # fmt: skip
    finally:
        model.train(was_training)
    return done


def _plan(src: Path, out: Path, overwrite: bool) -> tuple[list[Path], list[Path], bool]:
    """The images under `src`, the file each is written to, and whether `out` is one image file; refused
    before any work (and before a model is loaded) if the outputs could meet the inputs or existing files."""
    to_file = src.is_file() and out.suffix.lower() in IMAGE_SUFFIXES  # photo.jpg -> recon.png
    if src.is_dir() and out.resolve() == src.resolve():
        raise Refused("{output} is {input} ({src}): the reconstructions would land among the originals; choose another folder",
                      src=src)  # fmt: skip
    if out.is_file() and not to_file:
        raise Refused("{output} {out} is a file: give a folder (or, for one input image, a file name ending in .png)", out=out)
    if not to_file:  # a new or empty folder, or one vaekit wrote: then it is marked, and never searched as input
        try:
            check_output_folder(out, "")
        except ValueError as e:  # it names the folder after the flag it is given: here, the caller's word for output
            raise Refused("{output} {said}", said=str(e).strip()) from None
    files = find_images(src)
    if not files:
        raise Refused("no images (png/jpg/webp/bmp/tif) found under {src}", src=src)
    rel = [PurePosixPath((f.relative_to(src) if src.is_dir() else Path(f.name)).as_posix()) for f in files]
    targets = [out] if to_file else [out / name for name in output_names(rel)]
    check_targets(targets, files, overwrite, inside=None if to_file else out)
    return files, targets, to_file


def _reconstruct_file(model: Autoencoder, path: Path, target: Path, pad: bool, tile: int | str | None,
                      single: bool) -> Refused | None:  # fmt: skip
    """Write `path`'s reconstruction to `target`; or why it is skipped: unreadable, or (pad=False) not a
    multiple of the model's factor, which is refused outright when it is the `single` image asked for."""
    try:
        image = read_image(path, alpha=model.config.rgba)
    except Exception as e:  # an unreadable file is skipped and listed, not a failure of the rest
        return Refused("unreadable {path}: {error}", path=path, error=e)
    h, w = image.shape[:2]
    f = model.factor
    if not pad and (h % f or w % f):
        fits = " or ".join(dict.fromkeys(f"{a}x{b}" for a, b in ((h - h % f or f, w - w % f or f), (h - h % f + f, w - w % f + f))))
        odd = Refused("{path} is {h}x{w}, not a multiple of the model's factor {f}: crop or resize it to {fits}, or {pad}",
                      path=path, h=h, w=w, f=f, fits=fits)  # fmt: skip
        if single:
            raise odd
        return odd
    x = to_tensor(image).to(model.device)
    with torch.inference_mode():
        if tile:
            posterior = model.encode(x, pad=pad, tile=tile)
            recon = model.decode(posterior.mode(), size=posterior.image_size, tile=tile)
        else:
            recon, _ = model(x, pad=pad)
    write_image(target, to_uint8(recon)[0])
    return None
