"""Latent datasets as a trainer's cache (issue 25): captions, flips, SDXL conditioning, upright photos, symmetric
buckets, ranks, appending, interrupted encodes, recalibration without re-encoding, and nothing ever written over."""

import io
import json
import math
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_latents import ARGS, encode, images, photo, run_python, same_dataset, save_model, tensors  # noqa: F401 (images: a fixture)

import vaekit
from vaekit.cli import main
from vaekit.data import to_tensor
from vaekit.files import safe_name
from vaekit.latents import (BucketBatchSampler, EncodeOptions, LatentDataset, buckets_for, conditioning, encode_dataset,
                            fit, nearest_bucket, placement)  # fmt: skip


def save_png(path: Path, image: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **kw)
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_model(tmp_path / "m")


def items_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# ---- captions -------------------------------------------------------------------------------------


def test_captions_from_files_beside_images_metadata_jsonl_and_tar_members(tmp_path, model_dir):
    root = tmp_path / "data"
    for name in ("a", "b", "c", "d", "e", "sub/f"):
        save_png(root / f"{name}.png", photo(20, 20, len(name)))
    (root / "a.txt").write_text("a red cat\n")
    (root / "b.caption").write_text("kohya's caption")
    (root / "c.json").write_text(json.dumps({"caption": "from json", "width": 20}))
    (root / "d.txt").write_text("txt wins")
    (root / "d.caption").write_text("caption loses")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "e.png", "text": "hugging face"}) + "\n"
                                         + json.dumps({"file_name": "a.png", "text": "the .txt file wins"}) + "\n")  # fmt: skip
    encode(model_dir, root, tmp_path / "lat")
    got = {item["source"]: item["caption"] for item in items_of(tmp_path / "lat")}
    assert got == {"a.png": "a red cat", "b.png": "kohya's caption", "c.png": "from json", "d.png": "txt wins",
                   "e.png": "hugging face", "sub/f.png": ""}  # fmt: skip
    data = LatentDataset(tmp_path / "lat")
    assert [data[i]["caption"] for i in range(len(data))] == list(got.values())
    # Tar shards: members of the same webdataset key (the name up to its first dot).
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, payload in (("x/0001.jpg", None), ("x/0001.txt", b"tar caption"), ("x/0002.jpg", None),
                              ("x/0002.json", json.dumps({"text": "tar json"}).encode()), ("x/0003.jpg", None)):  # fmt: skip
            if payload is None:
                buf = io.BytesIO()
                Image.fromarray(photo(20, 20, len(tar.getmembers()))).save(buf, format="JPEG")
                payload = buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    encode(model_dir, tmp_path / "s.tar", tmp_path / "lat_tar")
    got = {item["source"]: item["caption"] for item in items_of(tmp_path / "lat_tar")}
    assert got == {"s.tar/x/0001.jpg": "tar caption", "s.tar/x/0002.jpg": "tar json", "s.tar/x/0003.jpg": ""}


def test_a_broken_caption_file_skips_its_image_by_name(tmp_path, model_dir):
    root = tmp_path / "data"
    save_png(root / "a.png", photo(20, 20, 1))
    save_png(root / "b.png", photo(20, 20, 2))
    (root / "b.json").write_text("{not json")
    encode(model_dir, root, tmp_path / "lat")
    assert [i["source"] for i in items_of(tmp_path / "lat")] == ["a.png"]
    assert "unreadable caption" in (tmp_path / "lat" / "errors.jsonl").read_text()


# ---- flips and SDXL conditioning ------------------------------------------------------------------


def test_flip_stores_the_mirrored_images_latents_as_items_of_their_own(tmp_path, model_dir):
    root = tmp_path / "data"
    save_png(root / "wide.png", photo(20, 36, 1))
    save_png(root / "tall.png", photo(32, 20, 2))
    encode(model_dir, root, tmp_path / "lat", "--flip")
    data = LatentDataset(tmp_path / "lat")
    assert [(i["source"], i["flipped"]) for i in data.items] == [("tall.png", False), ("tall.png", True),
                                                                  ("wide.png", False), ("wide.png", True)]  # fmt: skip
    model = vaekit.load(model_dir)
    for i, item in enumerate(data.items):
        pixels, _ = fit(np.asarray(Image.open(root / item["source"])), (16, 16), "center-crop")
        pixels = pixels[:, ::-1] if item["flipped"] else pixels
        with torch.no_grad():
            want = model.encode(to_tensor(np.ascontiguousarray(pixels))).mean[0]
        torch.testing.assert_close(data.raw_latent(i), want, atol=1e-5, rtol=1e-5)
        assert data[i]["flipped"] is item["flipped"]
    assert json.loads((tmp_path / "lat" / "info.json").read_text())["flip"] is True
    assert main(["decode", str(model_dir), str(tmp_path / "lat"), str(tmp_path / "dec")]) == 0
    assert sorted(p.name for p in (tmp_path / "dec").glob("*.png")) == ["tall.flipped.png", "tall.png", "wide.flipped.png", "wide.png"]


def sdxl_script_conditioning(image: Image.Image, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """diffusers' examples/text_to_image/train_text_to_image_sdxl.py, preprocess_train with --center_crop."""
    from torchvision import transforms

    original_size = (image.height, image.width)
    image = transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR)(image)
    y1 = max(0, int(round((image.height - resolution) / 2.0)))
    x1 = max(0, int(round((image.width - resolution) / 2.0)))
    return original_size, (y1, x1)


def test_sdxl_conditioning_is_the_diffusers_scripts_and_items_carry_it(tmp_path, model_dir):
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(64, 3000, 2))
        r = int(rng.choice([64, 256, 512, 1024]))
        original, top_left = sdxl_script_conditioning(Image.new("RGB", (w, h)), r)
        for flipped in (False, True):  # the script flips before its centre crop: the same offsets
            c = conditioning((h, w), (r, r), "center-crop", flipped)
            assert (tuple(c["original_size"]), tuple(c["crop_coords_top_left"]), c["target_size"]) == (original, top_left, [r, r])
    # pad: the image's place on the canvas, mirrored for the flipped item
    c, f = conditioning((100, 50), (64, 64), "pad"), conditioning((100, 50), (64, 64), "pad", flipped=True)
    assert c["content_box"] == [16, 0, 48, 64] and f["content_box"] == [16, 0, 48, 64] and c["crop_coords_top_left"] == [0, 0]
    c = conditioning((100, 40), (64, 64), "pad")
    assert c["content_box"] == [19, 0, 45, 64] and conditioning((100, 40), (64, 64), "pad", True)["content_box"] == [19, 0, 45, 64]
    assert conditioning((90, 41), (64, 64), "pad")["content_box"] == [17, 0, 46, 64]  # 29 px wide: (64 - 29) // 2 = 17
    assert conditioning((90, 41), (64, 64), "pad", True)["content_box"] == [18, 0, 47, 64]  # its mirror
    # Items: tensors of 2 that a DataLoader stacks to Bx2.
    root = tmp_path / "data"
    save_png(root / "a.png", photo(30, 50, 1))
    save_png(root / "b.png", photo(40, 24, 2))
    encode(model_dir, root, tmp_path / "lat", "--buckets")
    data = LatentDataset(tmp_path / "lat")
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=1)))
    assert batch["original_size"].tolist() == [[30, 50]] and batch["target_size"].tolist() == [data.items[0]["bucket"]]
    for i, item in enumerate(data.items):
        assert item["original_size"] == item["size"] and item["target_size"] == item["bucket"]
        assert data[i]["crop_coords_top_left"].tolist() == conditioning(item["size"], item["bucket"], "center-crop")["crop_coords_top_left"]


# ---- upright photos and JPEG decoding ---------------------------------------------------------------


def test_exif_orientation_is_applied_so_a_portrait_photo_is_encoded_upright(tmp_path, model_dir):
    upright = photo(40, 24, 3)  # a portrait photo as the phone showed it
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # orientation 6: stored rotated, to be turned 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    root = tmp_path / "data"
    save_png(root / "phone.png", stored, exif=exif.tobytes())
    encode(model_dir, root, tmp_path / "lat", "--buckets")
    item = items_of(tmp_path / "lat")[0]
    assert item["size"] == [40, 24] and item["bucket"][0] > item["bucket"][1]  # tall, in a tall bucket
    pixels, box = fit(upright, tuple(item["bucket"]), "center-crop")
    assert item["crop"] == [round(v, 1) for v in box]  # in the upright photo's pixels
    with torch.no_grad():
        want = vaekit.load(model_dir).encode(to_tensor(pixels)).mean[0]
    torch.testing.assert_close(LatentDataset(tmp_path / "lat").raw_latent(0), want, atol=1e-5, rtol=1e-5)
    # reconstruct reads it upright too (every command reads through data.read_image)
    assert main(["reconstruct", str(model_dir), str(root), str(tmp_path / "rec")]) == 0
    assert np.asarray(Image.open(tmp_path / "rec" / "phone.png")).shape == (40, 24, 3)


def test_reduced_jpeg_decoding_stays_close_to_a_full_decode_and_can_be_turned_off(tmp_path, model_dir):
    from vaekit.data import REDUCE_BOUND, read_image

    root = tmp_path / "data"
    yy, xx = np.mgrid[0:200, 0:280]  # decoded at 1/2: 140x100 keeps 4x the 16x22 the crop needs, 1/4 would not
    image = np.stack([xx * 0.8, yy * 1.1, (xx + yy) * 0.3 + 40 * np.sin(xx / 5.0)], -1).clip(0, 255).astype(np.uint8)
    save_png(root / "big.jpg", image, quality=92)
    encode(model_dir, root, tmp_path / "fast", "--max-pixels", "1000000")
    encode(model_dir, root, tmp_path / "full", "--max-pixels", "1000000", "--no-reduced-jpeg")
    model = vaekit.load(model_dir)
    full_pixels, _ = fit(np.asarray(Image.open(root / "big.jpg").convert("RGB")), (16, 16), "center-crop")
    fast_pixels, _ = fit(read_image(root / "big.jpg", reduce_to=(16, 16)), (16, 16), "center-crop")
    assert np.abs(fast_pixels.astype(int) - full_pixels).max() <= REDUCE_BOUND
    assert np.abs(fast_pixels.astype(int) - full_pixels).mean() < 1
    with torch.no_grad():
        for name, pixels in (("full", full_pixels), ("fast", fast_pixels)):  # each dataset holds its pixels' latents
            torch.testing.assert_close(LatentDataset(tmp_path / name).raw_latent(0), model.encode(to_tensor(pixels)).mean[0],
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
    assert json.loads((tmp_path / "full" / "info.json").read_text())["reduced_jpeg"] is False
    assert main(["encode", str(model_dir), str(root), str(tmp_path / "full"), *ARGS, "--max-pixels", "1000000"]) == 1  # another key


# ---- buckets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,factor", [(1024, 8), (512, 8), (256, 16), (1024, 32), (16, 4), (64, 8)])
def test_buckets_are_symmetric_and_both_orientations_keep_the_same_share(resolution, factor):
    buckets = buckets_for(resolution, factor)
    assert {(w, h) for h, w in buckets} == set(buckets)
    assert all(h * w <= resolution * resolution and h % factor == 0 and w % factor == 0 for h, w in buckets)
    assert (resolution, resolution) in buckets or resolution % 64
    rng = np.random.default_rng(resolution)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(100, 4000, 2))
        b = nearest_bucket((h, w), buckets)
        assert nearest_bucket((w, h), buckets) == b[::-1]
        kept = lambda size, bucket: (lambda x0, y0, x1, y1: (x1 - x0) * (y1 - y0))(*placement(size, bucket, "center-crop").box) / (size[0] * size[1])  # noqa: E731
        assert math.isclose(kept((h, w), b), kept((w, h), b[::-1]))
    if (resolution, factor) == (1024, 8):  # SDXL's own buckets are among them, both ways
        assert {(832, 1216), (1216, 832), (768, 1344), (1344, 768), (640, 1536), (1536, 640), (896, 1152)} <= set(buckets)


# ---- sampling: ranks and epochs --------------------------------------------------------------------


@pytest.fixture
def bucketed(tmp_path, model_dir) -> Path:
    root = tmp_path / "data"
    sizes = [(20, 36), (36, 20), (24, 24), (20, 40), (40, 20), (28, 28), (20, 30), (16, 16), (30, 20), (24, 40), (22, 22)]
    for i, (h, w) in enumerate(sizes):
        save_png(root / f"{i:02d}.png", photo(h, w, i))
    encode(model_dir, root, tmp_path / "lat", "--buckets")
    return tmp_path / "lat"


@pytest.mark.parametrize("world,drop_last", [(2, False), (3, False), (3, True), (4, False)])
def test_bucket_batches_split_over_ranks_evenly_one_bucket_each(bucketed, world, drop_last):
    data = LatentDataset(bucketed)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            sampler = BucketBatchSampler(data, batch_size=2, seed=5, drop_last=drop_last, rank=rank, world_size=world)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
            assert len(sampler) == len(per_rank[-1])
        assert len({len(b) for b in per_rank}) == 1  # every rank as many batches
        everything = [b for batches in per_rank for b in batches]
        assert all(len({tuple(data.items[i]["bucket"]) for i in b}) == 1 for b in everything)
        alone = BucketBatchSampler(data, batch_size=2, seed=5, drop_last=drop_last)
        alone.set_epoch(epoch)
        seen = {i for b in everything for i in b}
        if drop_last:  # at most world - 1 of the epoch's batches are left out, so that every rank has as many
            assert seen <= {i for b in alone for i in b} and len(list(alone)) - len(everything) < world
        else:  # the ranks together cover the single-process epoch (a few batches twice, to even them out)
            assert seen == {i for b in alone for i in b} == set(range(len(data)))


def test_posterior_draws_change_per_epoch_in_persistent_workers(bucketed):
    data = LatentDataset(bucketed, sample=True, seed=7)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(3):
        data.set_epoch(epoch)
        epochs.append([item["latent"] for item in loader])
    for epoch, got in enumerate(epochs):
        data.set_epoch(epoch)
        assert all(torch.equal(a, data[i]["latent"]) for i, a in enumerate(got))  # the main process's draws
    assert not torch.equal(epochs[0][0], epochs[1][0]) and not torch.equal(epochs[1][0], epochs[2][0])


# ---- appending ------------------------------------------------------------------------------------


def test_add_appends_new_images_as_new_shards_and_leaves_the_old_ones_alone(tmp_path, model_dir, capsys):
    root = tmp_path / "data"
    for i in range(5):
        save_png(root / f"a{i}.png", photo(20, 20, i))
    out = tmp_path / "lat"
    encode(model_dir, root, out)  # shard size 3: shards 0, 1
    old = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.glob("shard-*.safetensors")}
    old_items = items_of(out)
    for i in range(4):
        save_png(root / f"b{i}.png", photo(24, 20, 10 + i))
    (root / "tiny.png").write_bytes(b"not an image")
    assert main(["encode", str(model_dir), str(root), str(out), *ARGS]) == 1  # never without --add
    assert "--add" in capsys.readouterr().err
    assert main(["encode", str(model_dir), str(root), str(out), *ARGS, "--add"]) == 0
    assert "added 5 new sources as new shards; encoded 5 sources now" in capsys.readouterr().out
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.glob("shard-*.safetensors") if f.name in old} == old
    assert sorted(f.name for f in out.glob("shard-*.safetensors")) == [f"shard-{k:05d}.safetensors" for k in range(4)]
    items = items_of(out)
    assert items[: len(old_items)] == old_items and [i["source"] for i in items[len(old_items):]] == [f"b{i}.png" for i in range(4)]
    assert {i["shard"] for i in items[len(old_items):]} == {2, 3} and "tiny.png" in (out / "errors.jsonl").read_text()
    # The new items are what a fresh encode of them gives.
    fresh_root = tmp_path / "fresh"
    for i in range(4):
        save_png(fresh_root / f"b{i}.png", photo(24, 20, 10 + i))
    encode(model_dir, fresh_root, tmp_path / "fresh_lat")
    data, fresh = LatentDataset(out), LatentDataset(tmp_path / "fresh_lat")
    for j in range(4):
        assert torch.equal(data.raw_latent(len(old_items) + j), fresh.raw_latent(j))
    # Running it again has nothing to do; the dataset is complete and reads as one.
    assert main(["encode", str(model_dir), str(root), str(out), *ARGS, "--add"]) == 0
    assert "encoded 0 sources now" in capsys.readouterr().out and len(data) == 9
    info = json.loads((out / "info.json").read_text())
    assert info["complete"] and [p["first_shard"] for p in info["parts"]] == [0, 2] and info["sources"] == 10


# ---- interrupted encodes keep their work ------------------------------------------------------------


PARTIAL_KILLER = r"""
import json, os, signal, sys
import vaekit.latents as L
write, count = L._write_partial, [0]
def write_then_die(*a, **k):
    write(*a, **k)
    count[0] += 1
    if count[0] == int(os.environ["DIE_AFTER_PARTIALS"]):
        os.kill(os.getpid(), signal.SIGKILL)
L._write_partial = write_then_die
from vaekit.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def test_sigkill_inside_a_shard_keeps_the_encoded_items_and_the_rerun_equals_a_clean_run(tmp_path, images):
    model_dir = save_model(tmp_path / "m")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    big = ["--shard-size", "10", "--commit-seconds", "0"]
    encode(model_dir, images, clean, *big)
    argv = ["encode", str(model_dir), str(images), str(killed), *ARGS, *big]
    (tmp_path / "pk.py").write_text(PARTIAL_KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(vaekit.__file__).parents[1]), "DIE_AFTER_PARTIALS": "4"}
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(tmp_path / "pk.py"), json.dumps(argv)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not list(killed.glob("shard-*.safetensors")) and len(list(killed.glob("partial-00000-*.safetensors"))) == 4
    with pytest.raises(ValueError, match=r"unfinished latent dataset .*rerun `vaekit encode .* --commit-seconds 0` to finish it"):
        LatentDataset(killed)
    done = run_python(tmp_path, argv, env={"DIE_AFTER": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    kept = int(done.stdout.split("encoded ")[1].split()[0])
    assert kept < 16 and kept <= 16 - 4  # at least the 4 kept sources are not encoded again
    same_dataset(clean, killed)
    assert not list(killed.glob("partial-*"))


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_ctrl_c_keeps_what_was_encoded_and_the_rerun_equals_a_clean_run(tmp_path, images, monkeypatch, capsys, batch_size):
    import vaekit.latents as L

    model_dir = save_model(tmp_path / "m")
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    big = ["--shard-size", "10", "--batch-size", batch_size]
    encode(model_dir, images, clean, *big)
    calls, flush = [0], L._Encoder.flush

    def flush_then_ctrl_c(self):
        flush(self)
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(L._Encoder, "flush", flush_then_ctrl_c)
    assert main(["encode", str(model_dir), str(images), str(stopped), *ARGS, *big]) == 130
    assert "the same command continues it" in capsys.readouterr().err
    assert len(list(stopped.glob("partial-00000-*.safetensors"))) == 1  # the default 60 s had not passed: kept on Ctrl-C
    monkeypatch.setattr(L._Encoder, "flush", flush)
    encode(model_dir, images, stopped, *big)
    encoded_again = int(capsys.readouterr().out.split("encoded ")[1].split()[0])
    assert encoded_again < 16  # the kept start of shard 0 is not encoded again
    same_dataset(clean, stopped)


# ---- recalibration without re-encoding ---------------------------------------------------------------


def test_calibrate_reads_a_latent_dataset_and_its_model_normalises_the_stored_latents(tmp_path, images, monkeypatch, capsys):
    model_dir = save_model(tmp_path / "m")
    out = tmp_path / "lat"
    encode(model_dir, images, out, "--dtype", "fp32")
    # On images, as encode reads them, the same crops: the same statistics.
    assert main(["calibrate", str(model_dir), str(images), "--resolution", "16", "--mode", "--max-pixels", "10000"]) == 0
    from_images = [line for line in capsys.readouterr().out.splitlines() if "raw latents" in line]

    def no_encoding(*a, **k):
        raise AssertionError("the dataset must not be encoded again")

    monkeypatch.setattr(vaekit.Autoencoder, "encode", no_encoding)
    recal = tmp_path / "recal"
    assert main(["calibrate", str(model_dir), str(out), "--mode", "--per-channel", "--write", str(recal)]) == 0
    printed = capsys.readouterr().out
    assert "11 latents of the latent dataset" in printed
    assert main(["calibrate", str(model_dir), str(out), "--mode"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "raw latents" in line] == from_images
    monkeypatch.undo()
    data = LatentDataset(out, model=recal)  # another normalisation for the same stored latents
    z = torch.stack([data[i]["latent"] for i in range(len(data))])
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (z.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    assert main(["decode", str(recal), str(out), str(tmp_path / "dec")]) == 0  # the same weights: no --force needed
    with pytest.raises(ValueError, match="does not have the weights"):
        LatentDataset(out, model=save_model(tmp_path / "other", seed=1))


def test_calibrate_skips_bad_files_as_encode_does(tmp_path, images, capsys):
    model_dir = save_model(tmp_path / "m")
    assert main(["calibrate", str(model_dir), str(images), "--resolution", "16", "--max-pixels", "10000"]) == 0
    captured = capsys.readouterr()
    for name, reason in (("bomb.png", "decompression bomb"), ("tiny.png", "too small"), ("empty.png", "unreadable")):
        assert f"skipped {name}: {reason}" in captured.err
    assert "11 latents of 11 images at 16x16" in captured.out and "5 skipped" in captured.out


# ---- nothing written over, nothing written outside -----------------------------------------------------


def test_calibrate_write_never_replaces_the_model_or_another_without_overwrite(tmp_path, images, capsys):
    model_dir = save_model(tmp_path / "m")
    config = (model_dir / "config.json").read_bytes()
    args = ["calibrate", str(model_dir), str(images), "--resolution", "16", "--max-pixels", "10000"]
    assert main([*args, "--write", str(model_dir)]) == 1
    assert "is one of the inputs" in capsys.readouterr().err and (model_dir / "config.json").read_bytes() == config
    assert main([*args, "--write", str(model_dir), "--overwrite"]) == 1  # never, whatever the flags
    other = save_model(tmp_path / "other", seed=1)
    weights = (other / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main([*args, "--write", str(other)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (other / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert main([*args, "--write", str(other), "--overwrite"]) == 0
    assert (other / "diffusion_pytorch_model.safetensors").read_bytes() != weights


def test_decode_keeps_same_stem_sources_apart_and_a_failure_leaves_no_folder(tmp_path, model_dir, capsys):
    root = tmp_path / "data"
    save_png(root / "a.jpg", photo(20, 20, 1))
    save_png(root / "a.png", photo(20, 20, 2))
    encode(model_dir, root, tmp_path / "lat")
    assert main(["decode", str(model_dir), str(tmp_path / "lat"), str(tmp_path / "dec")]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == [".vaekit-output", "a.jpg.png", "a.png"]
    save_file({"z": torch.randn(1, 7, 4, 4)}, str(tmp_path / "z7.safetensors"))  # 7 channels for a 4-channel model
    assert main(["decode", str(model_dir), str(tmp_path / "z7.safetensors"), str(tmp_path / "dec7")]) == 1
    err = capsys.readouterr().err
    assert "7-channel" in err and err.count("\n") == 1 and not (tmp_path / "dec7").exists()


def test_names_from_sources_never_leave_the_output_folder(tmp_path, model_dir, capsys):
    payload = io.BytesIO()
    Image.fromarray(photo(20, 20, 1)).save(payload, format="PNG")
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        for name in ("../../../x/y.png", "/abs/z.png", "ok/./good.png"):
            info = tarfile.TarInfo(name)
            info.size = len(payload.getvalue())
            tar.addfile(info, io.BytesIO(payload.getvalue()))
    work = tmp_path / "deep" / "er" / "work"
    work.mkdir(parents=True)
    encode(model_dir, tmp_path / "evil.tar", work / "lat")
    assert [i["source"] for i in items_of(work / "lat")] == ["evil.tar/ok/./good.png"]
    errors = (work / "lat" / "errors.jsonl").read_text()
    assert errors.count("unsafe name") == 2
    assert main(["decode", str(model_dir), str(work / "lat"), str(work / "dec")]) == 0
    assert [str(p.relative_to(work / "dec")) for p in (work / "dec").rglob("*.png")] == ["evil/ok/good.png"]  # no evil.tar/ folder
    # A manifest written by anyone (an older vaekit, a hand edit) is checked again when decoding.
    manifest = work / "lat" / "manifest.jsonl"
    item = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**item, "source": "../../../x/y.png"}) + "\n")
    assert main(["decode", str(model_dir), str(work / "lat"), str(work / "dec2")]) == 1
    assert "../../../x/y.png" in capsys.readouterr().err
    save_file({"../../escape": torch.randn(4, 4, 4), "fine": torch.randn(4, 4, 4)}, str(tmp_path / "z.safetensors"))
    assert main(["decode", str(model_dir), str(tmp_path / "z.safetensors"), str(work / "dec3")]) == 0
    assert "skipped '../../escape'" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escape*")) and not (tmp_path / "x").exists() and not list(tmp_path.rglob("y.png"))
    for bad in ("../a", "/etc/passwd", "a/../../b", "", "C:/x", "\\\\server\\x"):
        with pytest.raises(ValueError):
            safe_name(bad)
    assert str(safe_name("./a/./b.png")) == "a/b.png"


def test_files_vaekit_writes_follow_the_umask(tmp_path, model_dir):
    old = os.umask(0o027)
    try:
        root = tmp_path / "data"
        save_png(root / "a.png", photo(20, 20, 1))
        encode(model_dir, root, tmp_path / "lat")
        vaekit.load(model_dir).save(str(tmp_path / "m.safetensors"), format="single-file")
        written = [*tmp_path.joinpath("lat").iterdir(), tmp_path / "m.safetensors"]
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
        assert set(modes.values()) == {"0o640"}, modes
    finally:
        os.umask(old)


def test_torchrun_summary_counts_every_ranks_images(tmp_path, images):
    model_dir = save_model(tmp_path / "m")
    done = run_python(tmp_path, ["encode", str(model_dir), str(images), str(tmp_path / "two"), *ARGS], env={"DIE_AFTER": "0"}, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoded 16 sources now" in done.stdout


def test_encode_dataset_python_api_takes_the_new_options(tmp_path, model_dir):
    root = tmp_path / "data"
    save_png(root / "a.png", photo(20, 30, 1))
    model = vaekit.load(model_dir)
    result = encode_dataset(model, str(root), tmp_path / "lat", EncodeOptions(16, flip=True, workers=0, dtype="fp32"), progress=False)
    assert result["items"] == 2 and result["encoded_now"] == 1 and tensors(tmp_path / "lat")


def test_every_command_refuses_a_decompression_bomb_with_the_same_limit(tmp_path, model_dir, capsys):
    from test_image_reading import png_header

    root = tmp_path / "data"
    save_png(root / "fine.png", photo(20, 20, 1))
    (root / "huge.png").write_bytes(png_header(20000, 20000))  # above PIL's own error limit too
    limit = "above the decompression-bomb limit of 89,478,485"
    encode(model_dir, root, tmp_path / "lat", "--max-pixels", "89478485")
    assert limit in (tmp_path / "lat" / "errors.jsonl").read_text()
    for argv in (["reconstruct", model_dir, root, tmp_path / "rec"], ["eval", model_dir, root],
                 ["calibrate", model_dir, root, "--resolution", "16"]):  # fmt: skip
        assert main([str(a) for a in argv]) == 0
        err = capsys.readouterr().err
        assert "huge.png" in err and limit in err and "178,956,970" not in err and "178956970" not in err, err
