"""`vaekit encode`, `vaekit decode`, `vaekit calibrate`: latent datasets for diffusion training."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

from ..data import MAX_PIXELS
from ..latents import DTYPES as STORED_DTYPES
from ..latents import RESIZE_MODES, STORES
from .common import (DTYPES, CLIError, add_command, add_conv_flag, conv_path, add_device_flag, add_dtype_flag, add_model_flags, add_tile_flag,
                     check_model_dest, command_line, plural)  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    _add_encode(sub)
    _add_decode(sub)
    _add_calibrate(sub)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "encode", cmd_encode,
                    "encode images once into a sharded latent dataset for diffusion training (resumable, torchrun)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("data", metavar="DATA")
    p.add_argument("out", metavar="OUT", help="the latent dataset folder (new, or one this command started)")
    p.add_argument("--resolution", type=int, required=True, metavar="R",
                   help="image side in pixels (a multiple of the model's factor); with --buckets, about R*R pixels")
    p.add_argument("--resize-mode", choices=list(RESIZE_MODES), default="center-crop",
                   help="center-crop: shorter side to R, centre cut (default); resize: stretch to RxR; pad: longer side "
                        "to R, centred on black")
    p.add_argument("--buckets", action="store_true",
                   help="aspect-ratio buckets as SDXL's and kohya's: at most R*R pixels, sides multiples of 64 (of the "
                        "factor below R=256), aspect 1:4 to 4:1, each with its mirror; each image goes to the bucket "
                        "nearest its aspect ratio, then covers it and is centre-cut")
    p.add_argument("--flip", action="store_true",
                   help="also store each image's mirror image's latents (kohya's --flip_aug): two items per image, "
                        "each with flipped true/false")
    p.add_argument("--add", action="store_true",
                   help="append the images DATA names that OUT does not hold yet, as new shards (the existing shards "
                        "stay as they are); names are relative to DATA, so give the same DATA")
    p.add_argument("--store", choices=list(STORES), default="both",
                   help="both: posterior mean and logvar (default; LatentDataset(sample=True) draws per access); mean; "
                        "sample: one seeded draw per image")
    p.add_argument("--dtype", choices=list(STORED_DTYPES), default="fp16", help="storage dtype (default fp16)")
    add_dtype_flag(p, "the model's compute dtype (default fp32)", flag="--precision")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="sources per shard (default 1000)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="sources per encoder call, with --flip their mirrors too (default: 8 on a GPU, 1 on a CPU, where larger batches are slower per image)")
    p.add_argument("--workers", type=int, default=2, metavar="W",
                   help="DataLoader processes that read and resize images while the model runs (default 2; 0: in the main process)")
    p.add_argument("--min-side", type=int, metavar="PX", help="skip images whose shorter side is below PX (default R/2)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"images above N pixels are refused as decompression bombs, from their header (default {MAX_PIXELS:,}, PIL's limit)")
    p.add_argument("--reduced-jpeg", action=argparse.BooleanOptionalAction, default=True,
                   help="decode large JPEGs at 1/2, 1/4 or 1/8 scale where that keeps 4x the target size: up to 2x "
                        "faster, within 7 levels of a full decode on photos (docs/LATENTS.md); --no-reduced-jpeg "
                        "decodes every image whole")
    p.add_argument("--commit-seconds", type=float, default=60.0, metavar="S",
                   help="keep an unfinished shard's encoded images on disk every S seconds (and on Ctrl-C), so an "
                        "interruption loses at most S seconds of work (default 60)")
    add_tile_flag(p, "encode the full-resolution layers in N-pixel tiles (large images, bounded GPU memory)")
    add_conv_flag(p)
    p.add_argument("--sample-seed", type=int, default=0, metavar="S", help="seed of --store sample's draws (default 0)")
    add_device_flag(p)
    add_model_flags(p)


def cmd_encode(args: argparse.Namespace) -> None:
    """Encode every image of DATA (a folder searched recursively in sorted order, an image, tar shards, or
    'samples') with MODEL into OUT: shard-NNNNN.safetensors of --shard-size items (raw posterior mean and logvar, or
    --store mean|sample), manifest.jsonl (one line per item: source relative to DATA, caption, flipped, SDXL's
    original_size / crop_coords_top_left / target_size, shard, index, crop box, bucket), errors.jsonl (every skipped
    file and why: unreadable, truncated, not an image, a decompression bomb, too small, an unsafe name in a tar
    shard) and info.json (the model's weights hash and every option that shapes a latent). Captions come from a
    .txt, .caption or .json file beside each image (in tar shards: members of the same key), or a folder's
    metadata.jsonl. Photos are read upright (EXIF orientation). Running the same command again continues an
    interrupted run (Ctrl-C, a crash, kill -9: at most --commit-seconds of work is lost) with the result of one
    clean run; any other model or option is refused; --add appends images DATA gained as new shards. Under `torchrun
    --nproc_per_node K -m vaekit.cli encode ...` the ranks share the shards. Read it with vaekit.LatentDataset; see
    docs/LATENTS.md (also: feeding it to kohya, SimpleTuner and diffusers' training scripts)."""
    from ..checkpoints import load
    from ..latents import EncodeOptions, encode_dataset
    from ..model import convolutions

    conv = conv_path(args)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    device = args.device
    if distributed and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        model = load(args.model, family=args.family, device=device, dtype=DTYPES[args.precision], seed=args.seed)
        options = EncodeOptions(
            resolution=args.resolution, resize_mode=args.resize_mode, buckets=args.buckets, store=args.store, dtype=args.dtype,
            precision=args.precision, shard_size=args.shard_size, batch_size=args.batch_size, min_side=args.min_side,
            max_pixels=args.max_pixels, tile=args.tile, workers=args.workers, seed=args.sample_seed, flip=args.flip,
            reduced_jpeg=args.reduced_jpeg, commit_seconds=args.commit_seconds,
        )  # fmt: skip
        with convolutions(conv):
            result = encode_dataset(model, args.data, args.out, options, add=args.add, command=command_line(args))
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0 and Path(args.out, "info.json").is_file():
            print(f"vaekit encode: interrupted; what was encoded is kept in {args.out}: the same command continues it", file=sys.stderr)
        raise
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        state = "complete" if result["shards"] == result["of"] else f"{result['shards']} of {result['of']} shards"
        added = f"added {plural(result['added'], 'new source')} as new shards; " if result["added"] else ""
        print(f"{added}encoded {plural(result['encoded_now'], 'source')} now in {result['seconds']:.0f} s; {args.out}: "
              f"{plural(result['items'], 'latent')}, {result['errors']} skipped (errors.jsonl), {state}")  # fmt: skip


def _add_decode(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "decode", cmd_decode, "decode a latent dataset (or a file of latents) back to PNGs")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("latents", metavar="LATENTS")
    p.add_argument("outdir", metavar="OUTDIR")
    p.add_argument("--raw", action="store_true", help="a file's latents are raw (as `encode` returns), not normalised")
    p.add_argument("--force", action="store_true", help="decode a dataset with a model other than the one that encoded it")
    p.add_argument("--overwrite", action="store_true", help="replace images that already exist in OUTDIR")
    add_tile_flag(p, "decode in N-pixel tiles")
    add_conv_flag(p)
    add_device_flag(p)
    add_dtype_flag(p, "compute dtype (default fp32)")
    add_model_flags(p)


def cmd_decode(args: argparse.Namespace) -> None:
    """Decode LATENTS, a folder `vaekit encode` wrote or one .safetensors / weights-only .pt file of latents
    (normalised, as a diffusion model makes them, unless --raw), with MODEL into OUTDIR. A dataset's items are named
    after their sources (suffix .png; x.jpg and x.png become x.jpg.png and x.png; a tar shard's shard-000.tar/
    becomes shard-000/; a mirrored item x.flipped.png) and decoded from the stored posterior mean; a file's tensors
    after their keys (a batch: KEY_00000.png, ...). Names that would leave OUTDIR (absolute, '..') are skipped.
    MODEL must have the weights that encoded the dataset (any normalisation: a recalibrated copy is fine), unless
    --force. Python: vaekit.latents.decode_latents."""
    from ..checkpoints import load
    from ..files import check_output_folder
    from ..latents import decode_latents
    from ..model import convolutions

    out, conv = Path(args.outdir), conv_path(args)
    model = load(args.model, family=args.family, device=args.device, dtype=DTYPES[args.dtype], seed=args.seed)
    check_output_folder(out, "OUTDIR")
    skipped: list[str] = []
    with convolutions(conv):
        written = decode_latents(model, args.latents, out, raw=args.raw, force=args.force, overwrite=args.overwrite,
                                 tile=args.tile, skipped=skipped)  # fmt: skip
    for line in skipped:
        print(line, file=sys.stderr)
    print(f"wrote {plural(len(written), 'image')} to {out}" + (f" ({len(skipped)} skipped)" if skipped else ""))


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "calibrate", cmd_calibrate,
                    "measure the latent scale/shift (or per-channel mean/std) that gives unit variance on your data")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("data", metavar="DATA", help="images (any DATA), or a latent dataset folder `vaekit encode` wrote with MODEL")
    p.add_argument("--resolution", type=int, default=256, metavar="R", help="images: centre-crop side (default 256)")
    p.add_argument("--per-channel", action="store_true", help="per-channel mean/std instead of one scale and shift")
    p.add_argument("--mode", action="store_true", help="measure the posterior mode instead of posterior samples (SD's scale was measured on samples)")
    p.add_argument("--limit", type=int, metavar="N", help="use the first N usable images (or latents)")
    p.add_argument("--min-side", type=int, metavar="PX", help="images: skip those whose shorter side is below PX (default R/2, as encode)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"images: refuse those above N pixels as decompression bombs (default {MAX_PIXELS:,}, as encode)")
    p.add_argument("--write", metavar="NEWMODEL", help="save the model with the calibrated normalisation (a diffusers folder, or a .safetensors file)")
    p.add_argument("--overwrite", action="store_true", help="replace NEWMODEL's files if they exist (never MODEL's)")
    add_device_flag(p)
    add_model_flags(p)


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Measure MODEL's raw latents' mean and std on DATA, globally (SD/FLUX.1-style scaling_factor and shift_factor)
    or per channel (--per-channel: latents_mean/latents_std; FLUX.2-style models always: their BatchNorm
    statistics). DATA is images (read, resized and skipped as `vaekit encode` does: centre crops of --resolution) or
    a latent dataset MODEL encoded, whose stored latents are measured without re-encoding. Prints them beside the
    configured normalisation; --write saves the same weights with the calibrated normalisation (never over MODEL's
    files; over an existing file only with --overwrite), which LatentDataset(OUT, model=NEWMODEL) and `vaekit
    decode` then use for that dataset."""
    from ..checkpoints import load
    from ..latents import (EncodeOptions, LatentDataset, calibrate, calibrated_model, encoded_by, is_latent_dataset,
                          latent_statistics, prepared_images, stored_latents)  # fmt: skip

    fmt = "single-file" if args.write and args.write.endswith(".safetensors") else "diffusers"
    if args.write:  # refused before any work, as `convert` refuses
        check_model_dest(args.model, Path(args.write), fmt, args.overwrite)
    model = load(args.model, family=args.family, device=args.device, dtype=torch.float32, seed=args.seed)
    per_channel = args.per_channel or model.config.latent_norm == "patch_bn"
    skipped: list[str] = []
    if is_latent_dataset(args.data):  # the stored raw latents: no re-encoding
        dataset = LatentDataset(args.data)
        if not encoded_by(model, dataset.info):
            raise CLIError(f"{args.data} was encoded by another model (its info.json records other weights): calibrate the "
                           "model that encoded it, or calibrate on images")  # fmt: skip
        sample = not args.mode and dataset.info["store"] == "both"
        what = {"both": "posterior samples" if sample else "posterior mode", "mean": "posterior mode (the dataset stores the mean)",
                "sample": "the dataset's stored posterior samples"}[dataset.info["store"]]  # fmt: skip
        where = f"the latent dataset {args.data} ({dataset.info['resolution']} px, {dataset.info['resize_mode']})"

        def measure(per: bool, normalised: bool) -> dict:
            return latent_statistics(model, stored_latents(dataset, sample, args.seed, args.limit), per, normalised)
    else:
        if args.resolution % model.factor:
            raise CLIError(f"--resolution {args.resolution} is not a multiple of the model's factor {model.factor}")
        options = EncodeOptions(resolution=args.resolution, min_side=args.min_side, max_pixels=args.max_pixels)
        images = [x for _, x in itertools.islice(prepared_images(args.data, options, skipped, model.config.rgba), args.limit)]
        for line in skipped:  # encode's limits and skips: unreadable, decompression bombs, too small
            print(f"skipped {line}", file=sys.stderr)
        if not images:
            raise CLIError(f"no usable images in {args.data}" + (f" ({len(skipped)} skipped)" if skipped else ""))
        what = "posterior mode" if args.mode else "posterior samples"
        where = f"{plural(len(images), 'image')} at {args.resolution}x{args.resolution}"

        def measure(per: bool, normalised: bool) -> dict:
            return calibrate(model, images, per, sample=not args.mode, seed=args.seed, normalised=normalised)
    stats, now = measure(per_channel, False), measure(False, True)
    show = lambda v: ", ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else f"{v:.4f}"  # noqa: E731
    print(f"measured on {plural(stats['images'], 'latent')} of {where} ({what}; {len(skipped)} skipped):")
    print(f"  raw latents: mean {show(stats['mean'])}; std {show(stats['std'])}")
    new = calibrated_model(model, stats)
    print(f"  configured normalisation: {model.config.normalisation}")
    print(f"  calibrated normalisation: {new.config.normalisation}" + ("" if per_channel else
          f"  (scaling_factor {new.config.scaling_factor:.5f}, shift_factor {new.config.shift_factor:.5f})"))  # fmt: skip
    print(f"  with the configured normalisation these latents have mean {now['mean']:.4f} and std {now['std']:.4f} "
          "(a diffusion model expects 0 and 1)")  # fmt: skip
    if args.write:
        new.save(args.write, format=fmt)
        print(f"wrote {args.write} (the same weights with the calibrated normalisation; LatentDataset(..., model=...) "
              "and `vaekit decode` take it for latents the original encoded)")  # fmt: skip
