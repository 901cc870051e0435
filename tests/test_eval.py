"""`vaekit eval` / `vaekit.evaluate.evaluate` on a folder of real photos, with a tiny model."""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_metrics import PHOTOS, nchw, offline, photo, random_inception_weights

from vaekit import metrics as M
from vaekit.cli import main
from vaekit.data import center_crop, read_image, to_tensor, to_uint8
from vaekit.evaluate import evaluate, to_json

SOURCES = ["astronaut.png", "chelsea.png", "coffee.png", "more/rocket.png"]  # sorted, as find_images lists them


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three 64x64 photos and one of an odd size (60x52: padded to 64x56 inside the model)."""
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        Image.fromarray(photo(name, (64, 64))).save(root / f"{name}.png")
    (root / "more").mkdir()
    Image.fromarray(photo("rocket", (60, 52))).save(root / "more" / "rocket.png")
    return root


@pytest.fixture
def model_dir(tiny_model, tmp_path) -> Path:
    tiny_model.save(str(tmp_path / "model"))
    return tmp_path / "model"


def reconstruct(model, image: np.ndarray) -> np.ndarray:
    """The reconstruction computed independently: one image, posterior mode, pad, uint8."""
    with torch.no_grad():
        return to_uint8(model(to_tensor(image), pad=True)[0])[0]


def test_cli_json_shape_values_and_table(photos, model_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(model_dir), str(photos), "--json", str(out), "--device", "cpu"]) == 0
    r = json.loads(out.read_text())
    assert set(r) == {"model", "data", "n", "resolution", "mean", "per_image", "seconds", "protocol"}
    assert r["model"] == str(model_dir) and r["data"] == str(photos) and r["n"] == 4 and r["resolution"] is None
    assert [p["source"] for p in r["per_image"]] == SOURCES
    assert r["seconds"] > 0
    for row in r["per_image"]:
        image = read_image(photos / row["source"])
        recon = reconstruct(tiny_model, image)
        assert recon.shape == image.shape  # padded and cropped back
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(image, recon, data_range=255), rel=1e-9)
        assert row["ssim"] == pytest.approx(structural_similarity(image, recon, channel_axis=2, data_range=255), abs=1e-9)
    for k in ("psnr", "ssim"):
        assert r["mean"][k] == pytest.approx(np.mean([p[k] for p in r["per_image"]]), rel=1e-12)
    p = r["protocol"]
    assert "posterior mode" in p["reconstruction"]["latent"] and "multiple of 8" in p["reconstruction"]["padding"]
    assert p["images"]["view"] == "each image at its own size" and "to_uint8" in p["images"]["quantisation"]
    assert set(p["metrics"]) == {"psnr", "ssim"} and "skimage" in p["metrics"]["ssim"]["implementation"]
    assert p["versions"]["torch"] == version("torch") and p["versions"]["vaekit"] == version("vaekit")
    assert p["model_config"]["latent_channels"] == 4
    table = capsys.readouterr().out
    assert f"{r['mean']['psnr']:.4f}" in table and f"{r['mean']['ssim']:.4f}" in table and "4 images" in table


def test_eval_scores_exactly_what_reconstruct_writes(photos, model_dir, tmp_path):
    """The default (one image at a time) gives the PSNR of reconstruct's PNGs, bit for bit; batches
    of the three same-size photos differ only by float rounding (a pixel or two one level off)."""
    assert main(["reconstruct", str(model_dir), str(photos), str(tmp_path / "recon"), "--device", "cpu"]) == 0
    for b in ("1", "3"):
        assert main(["eval", str(model_dir), str(photos), "--json", str(tmp_path / f"{b}.json"), "--batch-size", b]) == 0
    exact, batched = (json.loads((tmp_path / f"{b}.json").read_text()) for b in ("1", "3"))
    assert exact["protocol"]["reconstruction"]["batch_size"] == 1 and batched["protocol"]["reconstruction"]["batch_size"] == 3
    for row, row_b in zip(exact["per_image"], batched["per_image"]):
        original = read_image(photos / row["source"])
        written = read_image((tmp_path / "recon" / row["source"]).with_suffix(".png"))
        assert row["psnr"] == peak_signal_noise_ratio(original, written, data_range=255)
        assert row_b["psnr"] == pytest.approx(row["psnr"], abs=1e-3)


def test_resolution_resizes_and_center_crops(photos, tiny_model):
    r = evaluate(tiny_model, photos, resolution=32, progress=False)
    assert r["resolution"] == 32 and r["n"] == 4 and "LANCZOS" in r["protocol"]["images"]["view"]
    image = np.array(center_crop(read_image(photos / "more" / "rocket.png"), 32))  # writable, for torch
    assert image.shape == (32, 32, 3)
    expected = peak_signal_noise_ratio(image, reconstruct(tiny_model, image), data_range=255)
    assert r["per_image"][3]["psnr"] == pytest.approx(expected, rel=1e-9)


def test_lpips_and_rfid_with_random_networks(photos, tiny_model, tmp_path):
    lpips = M.LPIPS(pretrained_backbone=False)
    originals = [read_image(photos / s) for s in SOURCES[:3]]
    fid = M.FID(weights=random_inception_weights(tmp_path / "inception.pth", nchw(originals)))
    with pytest.warns(RuntimeWarning, match="rFID on 4 images"):
        r = evaluate(tiny_model, photos, metrics=["psnr", lpips, fid], progress=False)
    assert set(r["mean"]) == {"psnr", "lpips", "rfid"}
    assert all("rfid" not in row for row in r["per_image"])  # a set-level score
    for row in r["per_image"]:
        image = read_image(photos / row["source"])
        assert row["lpips"] == pytest.approx(lpips(image, reconstruct(tiny_model, image)).item(), rel=1e-5)
    assert np.isfinite(r["mean"]["rfid"]) and r["mean"]["rfid"] > 0
    info = r["protocol"]["metrics"]
    assert info["rfid"]["images"] == 4 and "below 2048" in info["rfid"]["warning"]
    assert "torch-fidelity" in info["rfid"]["implementation"] and info["lpips"]["backbone"].startswith("alex")


def test_builtin_samples(tiny_model):
    r = evaluate(tiny_model, "samples:val", resolution=16, progress=False)
    assert [p["source"] for p in r["per_image"]] == ["chelsea", "coffee", "flower"] and r["data"] == "samples:val"
    assert all(8 < p["psnr"] < 40 for p in r["per_image"])


def test_unreadable_files_are_skipped_and_recorded(photos, tiny_model, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.open(photos / "coffee.png").save(folder / "coffee.png")
    (folder / "broken.png").write_text("not an image")
    with pytest.warns(RuntimeWarning, match="skipped 1 image"):
        r = evaluate(tiny_model, folder, progress=False)
    assert r["n"] == 1 and len(r["protocol"]["images"]["skipped"]) == 1 and "broken.png" in r["protocol"]["images"]["skipped"][0]


def test_images_too_small_for_a_metric_are_skipped_before_reconstruction(photos, tiny_model, tmp_path, monkeypatch, capsys):
    # A 5x5 image among good ones: SSIM needs 7 px a side. It is skipped by name, before the model sees it;
    # the others are scored, and the JSON lists it. (It used to end the run after the work, naming no file.)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.open(photos / "coffee.png").save(folder / "coffee.png")
    Image.fromarray(photo("chelsea", (5, 5))).save(folder / "tiny.png")
    seen = []
    forward = type(tiny_model).forward
    monkeypatch.setattr(type(tiny_model), "forward", lambda self, x, **kw: seen.append(tuple(x.shape[-2:])) or forward(self, x, **kw))
    tiny_model.save(str(tmp_path / "m"))
    assert main(["eval", str(tmp_path / "m"), str(folder), "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "tiny.png: 5x5 px, below the 7 px a side ssim needs" in captured.err and "1 image (own sizes)" in captured.out
    assert seen == [(64, 64)]
    result = json.loads((tmp_path / "r.json").read_text())
    assert [p["source"] for p in result["per_image"]] == ["coffee.png"] and "tiny.png" in result["protocol"]["images"]["skipped"][0]


def test_identical_images_give_null_psnr_in_strict_json(photos, tiny_model):
    r = evaluate(tiny_model, photos / "coffee.png", progress=False)
    r["per_image"][0]["psnr"] = r["mean"]["psnr"] = float("inf")
    assert json.loads(to_json(r))["mean"]["psnr"] is None


@pytest.mark.parametrize("metrics, expected", [
    ("lpips", "alexnet-owt-7be5be79.pth"),
    ("psnr,rfid", "weights-inception-2015-12-05-6726825d.pth"),
    ("ms-ssim", "64x64 px, below the 161 px a side ms-ssim needs (score at a larger --resolution, or leave ms-ssim out) (and 3 more)"),
    ("psnr,fid", "unknown metric(s) fid"),
])  # fmt: skip
def test_cli_errors_are_one_line(photos, model_dir, monkeypatch, tmp_path, capsys, metrics, expected):
    offline(monkeypatch, tmp_path)
    assert main(["eval", str(model_dir), str(photos), "--metrics", metrics, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaekit eval: error:") and "\n" not in err and expected in err


def test_no_images_is_an_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="no image in .* could be scored"):
        evaluate(tiny_model, tmp_path, progress=False)
