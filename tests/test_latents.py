"""Latent datasets (issue 13): `vaekit encode` / `decode` / `calibrate` and `LatentDataset`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb
from PIL import Image
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import AutoencoderConfig
from vaekit.cli import main
from vaekit.data import read_image, to_tensor, to_uint8
from vaekit.latents import BucketBatchSampler, LatentDataset, buckets_for, fit, model_hash
from vaekit.model import Autoencoder

SMALL = dict(block_channels=(8, 16, 16), layers_per_block=1, norm_groups=8, latent_channels=4)  # factor 4
SIZES = [(20, 24), (24, 20), (16, 16), (32, 40), (28, 28), (40, 24), (20, 40), (36, 20)]


def save_model(path: Path, seed: int = 0, **changes) -> Path:
    torch.manual_seed(seed)
    model = perturb(Autoencoder(AutoencoderConfig(**{**SMALL, **changes})), scale=0.1, seed=seed)
    model.save(str(path))
    return path


def photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(yy * 5 + xx * 3 + 40 * c + seed * 17) % 256 for c in range(3)], -1)
    return np.clip(smooth + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Good images of several sizes, plus every kind of bad file, and images in modes a user may have."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(photo(h, w, i)).save(root / ("sub" if i % 3 == 0 else ".") / f"img{i}.png")
    good = photo(24, 24, 99)
    Image.fromarray(good).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    Image.fromarray(good).convert("RGBA").save(root / "alpha.png")
    Image.fromarray((good[..., 0].astype(np.uint16) * 257)).save(root / "sixteen.png")
    (root / "empty.png").write_bytes(b"")
    (root / "notimage.jpg").write_bytes(b"this is text, not a JPEG")
    buf = root / "truncated.jpg"
    Image.fromarray(photo(64, 64, 5)).save(buf, quality=90)
    buf.write_bytes(buf.read_bytes()[:300])
    Image.fromarray(photo(6, 6, 7)).save(root / "tiny.png")
    Image.fromarray(photo(120, 120, 8)).save(root / "bomb.png")  # above --max-pixels 10000 below
    return root


BAD = {"empty.png": "unreadable", "notimage.jpg": "unreadable", "truncated.jpg": "unreadable", "tiny.png": "too small",
       "bomb.png": "decompression bomb"}  # fmt: skip
ARGS = ["--resolution", "16", "--shard-size", "3", "--workers", "0", "--batch-size", "2", "--max-pixels", "10000", "--dtype", "fp32"]


def encode(model: Path, data: Path, out: Path, *extra: str) -> None:
    assert main(["encode", str(model), str(data), str(out), *ARGS, *extra]) == 0


def tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted(out.glob("shard-*.safetensors"))}


def same_dataset(a: Path, b: Path) -> None:
    assert (a / "manifest.jsonl").read_text() == (b / "manifest.jsonl").read_text()
    assert (a / "errors.jsonl").read_text() == (b / "errors.jsonl").read_text()
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(ta[f].keys() == tb[f].keys() for f in ta)
    assert all(torch.equal(ta[f][k], tb[f][k]) for f in ta for k in ta[f])


def test_encode_writes_shards_manifest_errors_and_the_latents_of_encode(tmp_path, images, capsys):
    model_dir = save_model(tmp_path / "m")
    out = tmp_path / "lat"
    encode(model_dir, images, out)
    assert "11 latents, 5 skipped (errors.jsonl), complete" in capsys.readouterr().out
    items = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    errors = {json.loads(line)["source"]: json.loads(line)["reason"] for line in (out / "errors.jsonl").read_text().splitlines()}
    good = sorted(str(p.relative_to(images)) for p in images.rglob("*") if p.is_file() and p.name not in BAD)
    assert sorted(i["source"] for i in items) == good and len(good) == 11  # CMYK, RGBA and 16-bit are read as RGB
    assert [i["source"] for i in items] == sorted(i["source"] for i in items)  # sorted source order
    assert {k: v.split(":")[0] for k, v in errors.items()} == BAD
    info = json.loads((out / "info.json").read_text())
    model = vaekit.load(model_dir)
    assert info["model_hash"] == model_hash(model) and info["items"] == 11 and info["errors"] == 5 and info["complete"]
    assert info["sources"] == 16 and len(list(out.glob("shard-*.safetensors"))) == 6  # ceil(16 / 3)
    # Every item's stored mean/logvar are encode()'s for its centre crop, and the manifest says where the crop came from.
    for item in items:
        original = read_image(images / item["source"])  # CMYK, RGBA and 16-bit as vaekit reads them
        assert item["size"] == list(original.shape[:2])
        pixels, box = fit(original, (16, 16), "center-crop")
        assert item["crop"] == [round(v, 1) for v in box] and item["bucket"] == [16, 16]  # the target, also without --buckets
        stored = load_file(str(out / f"shard-{item['shard']:05d}.safetensors"))
        with torch.no_grad():
            posterior = model.encode(to_tensor(pixels))
        torch.testing.assert_close(stored[f"mean.{item['index']}"], posterior.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored[f"logvar.{item['index']}"], posterior.logvar[0], atol=1e-5, rtol=1e-5)


def test_large_jpegs_are_decoded_at_a_reduced_scale_and_the_crop_box_stays_in_file_pixels(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    yy, xx = np.mgrid[0:200, 0:320]
    smooth = np.stack([xx * 0.7, yy * 1.2, (xx + yy) * 0.4], -1).astype(np.uint8)
    Image.fromarray(smooth).save(root / "wide.jpg", quality=95)
    model_dir = save_model(tmp_path / "m")
    encode(model_dir, root, tmp_path / "lat", "--max-pixels", "1000000")
    item = json.loads((tmp_path / "lat" / "manifest.jsonl").read_text())
    assert item["size"] == [200, 320] and item["crop"] == [60.0, 0.0, 260.0, 200.0]  # the centre 200x200 of the file
    full, _ = fit(read_image(root / "wide.jpg"), (16, 16), "center-crop")  # decoded whole, then resized
    with torch.no_grad():
        want = vaekit.load(model_dir).encode(to_tensor(full)).mean[0]
    got = LatentDataset(tmp_path / "lat").raw_latent(0)
    assert (got - want).abs().mean() < 0.05 * want.abs().mean()  # DCT scaling: the same picture, not the same bits


def test_fit_covers_the_target_inside_the_image_for_any_size():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(9, 400, 2))
        target = tuple(int(v) for v in rng.integers(8, 64, 2))
        image = np.zeros((h, w, 3), np.uint8)
        for mode in ("center-crop", "resize", "pad"):
            pixels, (x0, y0, x1, y1) = fit(image, target, mode)
            assert pixels.shape == (*target, 3) and 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, (h, w, target, mode)


def test_tar_shards_encode_like_the_same_images_in_a_folder(tmp_path, images):
    import tarfile

    model_dir = save_model(tmp_path / "m")
    names = ["img1.png", "img2.png", "notimage.jpg", "img4.png"]
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name in names:
            tar.add(images / name, arcname=name)
    encode(model_dir, tmp_path / "a.tar", tmp_path / "from_tar")
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes((images / name).read_bytes())
    encode(model_dir, folder, tmp_path / "from_folder")
    items = [json.loads(line) for line in (tmp_path / "from_tar" / "manifest.jsonl").read_text().splitlines()]
    assert [i["source"] for i in items] == ["a.tar/img1.png", "a.tar/img2.png", "a.tar/img4.png"]
    assert "a.tar/notimage.jpg" in (tmp_path / "from_tar" / "errors.jsonl").read_text()
    a, b = LatentDataset(tmp_path / "from_tar"), LatentDataset(tmp_path / "from_folder")  # tar: in archive order
    by_source = {item["source"]: b.raw(i) for i, item in enumerate(b.items)}
    for i, item in enumerate(a.items):
        got, want = a.raw(i), by_source[item["source"].split("/", 1)[1]]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_different_model_or_option_is_refused_never_mixed(tmp_path, images, capsys):
    model_dir = save_model(tmp_path / "m")
    out = tmp_path / "lat"
    encode(model_dir, images, out)
    before = tensors(out)
    for extra, named in ((["--resolution", "24"], "resolution"), (["--store", "mean"], "store"),
                         (["--resize-mode", "pad"], "resize_mode"), (["--shard-size", "4"], "shard_size")):  # fmt: skip
        args = ARGS + extra  # the later flag wins in argparse
        assert main(["encode", str(model_dir), str(images), str(out), *args]) == 1
        err = capsys.readouterr().err
        assert named in err and "new OUT" in err and err.count("\n") == 1, err
    other = save_model(tmp_path / "other", latent_channels=8)
    assert main(["encode", str(other), str(images), str(out), *ARGS]) == 1
    assert "model_hash" in capsys.readouterr().err
    (images / "new.png").write_bytes((images / "img1.png").read_bytes())
    assert main(["encode", str(model_dir), str(images), str(out), *ARGS]) == 1
    err = capsys.readouterr().err
    assert "1 image(s) that" in err and "new.png" in err and "--add" in err, err
    after = tensors(out)
    assert after.keys() == before.keys() and all(torch.equal(after[f][k], before[f][k]) for f in after for k in after[f])


def test_rerun_after_lost_shards_equals_one_clean_run(tmp_path, images):
    model_dir = save_model(tmp_path / "m")
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    encode(model_dir, images, clean)
    encode(model_dir, images, broken)
    for name in ("shard-00001.safetensors", "shard-00004.safetensors", "manifest.jsonl"):
        (broken / name).unlink()
    (broken / ".shard-00002.safetensors.999.tmp").write_bytes(b"half a file")  # what a kill -9 mid-write leaves
    encode(model_dir, images, broken)
    same_dataset(clean, broken)
    assert not list(broken.glob(".*.tmp"))


# Runs `vaekit encode` and dies (SIGKILL, as `kill -9`) right after the second shard is complete.
KILLER = r"""
import json, os, signal, sys
import vaekit.latents as L
write, count = L._write_shard, [0]
def write_then_die(*a, **k):
    write(*a, **k)
    count[0] += 1
    if count[0] == int(os.environ.get("DIE_AFTER", "2")) and int(os.environ.get("RANK", "0")) == int(os.environ.get("DIE_RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
L._write_shard = write_then_die
from vaekit.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def run_python(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None, nproc: int = 0) -> subprocess.CompletedProcess:
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(vaekit.__file__).parents[1]), **(env or {})}
    head = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else [])
    return subprocess.run(head + [str(tmp_path / "killer.py"), json.dumps(argv)], env=env, capture_output=True, text=True, timeout=240)


def test_sigkill_mid_encode_then_rerun_equals_a_clean_run(tmp_path, images):
    model_dir = save_model(tmp_path / "m")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    encode(model_dir, images, clean)
    argv = ["encode", str(model_dir), str(images), str(killed), *ARGS]
    done = run_python(tmp_path, argv)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert len(list(killed.glob("shard-*.safetensors"))) == 2 and not (killed / "manifest.jsonl").exists()
    done = run_python(tmp_path, argv, env={"DIE_AFTER": "0"})  # the same command again, to the end
    assert done.returncode == 0, done.stderr[-2000:]
    assert "encoded 10 sources now" in done.stdout  # the 6 of the two complete shards are not encoded again
    same_dataset(clean, killed)


def test_torchrun_two_processes_equal_one_and_survive_a_killed_rank(tmp_path, images):
    model_dir = save_model(tmp_path / "m")
    single, two, rerun = tmp_path / "single", tmp_path / "two", tmp_path / "rerun"
    encode(model_dir, images, single)
    done = run_python(tmp_path, ["encode", str(model_dir), str(images), str(two), *ARGS], env={"DIE_AFTER": "0"}, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("encoded") == 1  # rank 0 reports
    same_dataset(single, two)
    # Rank 1 is killed after its first shard: torchrun stops the job; the same command again completes it.
    argv = ["encode", str(model_dir), str(images), str(rerun), *ARGS]
    done = run_python(tmp_path, argv, env={"DIE_AFTER": "1", "DIE_RANK": "1"}, nproc=2)
    assert done.returncode != 0
    assert 1 <= len(list(rerun.glob("shard-*.safetensors"))) < 6
    done = run_python(tmp_path, argv, env={"DIE_AFTER": "0"}, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    same_dataset(single, rerun)


@pytest.mark.parametrize("norm", ["affine", "channel", "patch_bn"])
def test_latent_dataset_gives_the_models_normalised_latents(tmp_path, images, norm):
    changes = {"affine": dict(scaling_factor=0.5, shift_factor=0.1),
               "channel": dict(latent_norm="channel", latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0)),
               "patch_bn": dict(latent_norm="patch_bn")}[norm]  # fmt: skip
    model_dir = tmp_path / "m"
    torch.manual_seed(0)
    model = perturb(Autoencoder(AutoencoderConfig(**{**SMALL, **changes})), scale=0.1).eval()
    if norm == "patch_bn":
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.save(str(model_dir))
    out = tmp_path / "lat"
    encode(model_dir, images, out)
    data = LatentDataset(out)
    assert len(data) == 11
    for i in (0, 5):
        item = data[i]
        pixels, _ = fit(read_image(images / item["source"]), (16, 16), "center-crop")
        with torch.no_grad():
            want = model.to_latent(to_tensor(pixels))[0]
        torch.testing.assert_close(item["latent"], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(data.denormalize(item["latent"][None])[0], data.raw_latent(i), atol=1e-5, rtol=1e-5)
    # Posterior draws: different per epoch, the same for the same (seed, epoch), with the posterior's spread.
    sampled = LatentDataset(out, sample=True, seed=3)
    a = sampled[2]["latent"]
    sampled.set_epoch(1)
    b = sampled[2]["latent"]
    sampled.set_epoch(0)
    assert torch.equal(sampled[2]["latent"], a) and not torch.equal(a, b)
    # In DataLoader workers (each opens its own shards).
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    assert [item["source"] for item in loader] == [item["source"] for item in data.items]


def test_buckets_group_aspect_ratios_and_batches_keep_one_bucket(tmp_path, images):
    model_dir = save_model(tmp_path / "m")
    out = tmp_path / "lat"
    encode(model_dir, images, out, "--buckets")
    data = LatentDataset(out)
    buckets = {tuple(i["bucket"]) for i in data.items}
    assert len(buckets) >= 3 and all(h % 4 == 0 and w % 4 == 0 and 0.25 <= h / w <= 4 for h, w in buckets)
    assert set(map(tuple, buckets_for(16, 4))) >= buckets
    for item in data.items:
        (h, w), (bh, bw) = item["size"], item["bucket"]
        assert data[data.items.index(item)]["latent"].shape == (4, bh // 4, bw // 4)
        if abs(h / w - 1) > 0.3:
            assert (bh > bw) == (h > w)  # tall images in tall buckets, wide ones in wide buckets
    sampler = BucketBatchSampler(data, batch_size=2, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(data)))
    assert all(len({tuple(data.items[i]["bucket"]) for i in b}) == 1 for b in batches)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    assert sum(len(batch["latent"]) for batch in loader) == len(data)


def test_decode_a_dataset_and_a_file_of_latents(tmp_path, images, capsys):
    model_dir = save_model(tmp_path / "m")
    out = tmp_path / "lat"
    encode(model_dir, images, out)
    model = vaekit.load(model_dir)
    assert main(["decode", str(model_dir), str(out), str(tmp_path / "dec")]) == 0
    data = LatentDataset(out)
    for i in (0, 7):
        with torch.no_grad():
            want = to_uint8(model.decode(data.raw_latent(i)[None]))[0]
        got = np.asarray(Image.open(tmp_path / "dec" / Path(data.items[i]["source"]).with_suffix(".png")))
        assert np.array_equal(got, want)
    other = save_model(tmp_path / "other", seed=1)  # same architecture, other weights
    assert main(["decode", str(other), str(out), str(tmp_path / "dec2")]) == 1
    assert "--force" in capsys.readouterr().err and not (tmp_path / "dec2").exists()
    assert main(["decode", str(other), str(out), str(tmp_path / "dec2"), "--force"]) == 0
    recalibrated = save_model(tmp_path / "recal", scaling_factor=0.7)  # the same weights, another normalisation
    assert main(["decode", str(recalibrated), str(out), str(tmp_path / "dec4")]) == 0
    # A file of normalised latents, as a diffusion model samples them.
    z = torch.randn(2, 4, 5, 6)
    save_file({"samples": z}, str(tmp_path / "z.safetensors"))
    assert main(["decode", str(model_dir), str(tmp_path / "z.safetensors"), str(tmp_path / "dec3")]) == 0
    with torch.no_grad():
        want = to_uint8(model.from_latent(z))
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "dec3" / f"samples_{i:05d}.png")), want[i])


def test_decode_latents_from_python_equals_from_latent_and_names_python_arguments(tmp_path):
    from vaekit.latents import decode_latents

    model = vaekit.load(save_model(tmp_path / "m"))
    z = torch.randn(2, 4, 5, 6)
    save_file({"samples": z, "../up": z[0].clone()}, str(tmp_path / "z.safetensors"))
    skipped: list[str] = []
    written = decode_latents(model, tmp_path / "z.safetensors", tmp_path / "dec", progress=False, skipped=skipped)
    assert [p.name for p in written] == ["samples_00000.png", "samples_00001.png"] and skipped[0].startswith("skipped '../up'")
    with torch.no_grad():
        want = to_uint8(model.from_latent(z))
    assert all(np.array_equal(np.asarray(Image.open(p)), want[i]) for i, p in enumerate(written))
    with pytest.raises(ValueError, match=r"already exists: pass overwrite=True"):
        decode_latents(model, tmp_path / "z.safetensors", tmp_path / "dec", progress=False)
    save_file({"z": torch.randn(7, 4, 4)}, str(tmp_path / "z7.safetensors"))
    with pytest.raises(ValueError, match=r"7-channel latents.*pass raw=True if they are raw"):
        decode_latents(model, tmp_path / "z7.safetensors", tmp_path / "dec7", progress=False)
    assert not (tmp_path / "dec7").exists()


def test_calibrate_measures_and_writes_unit_variance(tmp_path, images, capsys):
    model_dir = save_model(tmp_path / "m")
    for extra, norm in (([], "affine"), (["--per-channel"], "channel")):
        new = tmp_path / f"cal_{norm}"
        assert main(["calibrate", str(model_dir), str(images), "--resolution", "16", "--write", str(new), *extra]) == 0
        out = capsys.readouterr().out
        assert "raw latents: mean" in out and f"wrote {new}" in out
        calibrated = vaekit.load(new)
        assert calibrated.config.latent_norm == norm
        assert main(["calibrate", str(new), str(images), "--resolution", "16", *extra]) == 0
        line = next(s for s in capsys.readouterr().out.splitlines() if "with the configured normalisation" in s)
        assert "mean 0.0000 and std 1.0000" in line or "mean -0.0000 and std 1.0000" in line, line
