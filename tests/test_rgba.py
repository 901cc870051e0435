"""RGBA as a first-class input and output for 4-channel models (Qwen-Image 2.1's kind): images read with their
alpha kept, reconstructions and decodes written as RGBA PNGs, eval scoring colour and alpha apart, encoded datasets
keeping alpha. Three-channel models keep alpha composited on white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaekit
from conftest import perturb
from vaekit import AutoencoderConfig
from vaekit.cli import main
from vaekit.data import read_image, to_tensor, to_uint8, write_image
from vaekit.evaluate import evaluate
from vaekit.latents import LatentDataset, decode_latents
from vaekit.model import Autoencoder

SMALL = dict(block_channels=(8, 16, 16), layers_per_block=1, norm_groups=8, latent_channels=4)  # factor 4


def rgba_image(h: int, w: int, seed: int) -> np.ndarray:
    """Colour gradients with noise, and an alpha that is opaque, transparent and everything between."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(yy * 7 + xx * 3 + 60 * c + seed) % 256 for c in range(3)], -1) + rng.integers(-10, 10, (h, w, 3))
    alpha = np.clip((xx - w / 4) * 512 / w, 0, 255)  # transparent left quarter, a ramp, then opaque
    return np.clip(np.dstack([rgb, alpha]), 0, 255).astype(np.uint8)


@pytest.fixture
def rgba_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = perturb(Autoencoder(AutoencoderConfig(**SMALL, in_channels=4, out_channels=4)), scale=0.1).eval()
    model.save(str(tmp_path / "rgba-model"))
    return tmp_path / "rgba-model"


def test_read_image_keeps_alpha_only_when_asked(tmp_path):
    im = rgba_image(20, 24, 1)
    Image.fromarray(im, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png", alpha=True), im)
    composited = read_image(tmp_path / "a.png")  # 3 channels: on white, as before
    on_white = np.round(im[..., :3] * (im[..., 3:] / 255) + 255 * (1 - im[..., 3:] / 255))
    assert composited.shape == (20, 24, 3) and np.abs(composited - on_white).max() <= 1
    Image.fromarray(im[..., :3]).save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(im[..., 0]).convert("LA").save(tmp_path / "c.png")
    opaque = read_image(tmp_path / "b.jpg", alpha=True)
    assert opaque.shape == (20, 24, 4) and (opaque[..., 3] == 255).all()
    gray = read_image(tmp_path / "c.png", alpha=True)
    assert (gray[..., 0] == gray[..., 2]).all() and (gray[..., 3] == 255).all()
    palette = Image.fromarray(im[..., :3]).quantize(8)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "d.png", transparency=0)
    index = np.asarray(Image.open(tmp_path / "d.png"))
    assert np.array_equal(read_image(tmp_path / "d.png", alpha=True)[..., 3] == 0, index == 0)
    # An EXIF-rotated RGBA (WebP keeps both) comes upright with its alpha.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    Image.fromarray(im, "RGBA").save(tmp_path / "e.webp", lossless=True, exact=True, exif=exif)  # exact: keep colours under alpha 0
    assert np.array_equal(read_image(tmp_path / "e.webp", alpha=True), np.rot90(im, -1))


def test_write_image_writes_rgba_pngs_and_refuses_jpeg_alpha(tmp_path):
    im = rgba_image(16, 16, 2)
    write_image(tmp_path / "x.png", im)
    assert Image.open(tmp_path / "x.png").mode == "RGBA" and np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), im)
    with pytest.raises(ValueError, match=r"y.jpg: JPEG cannot hold the alpha channel.*\.png"):
        write_image(tmp_path / "y.jpg", im)
    assert not (tmp_path / "y.jpg").exists()


def test_reconstruct_of_an_rgba_model_writes_rgba_pngs(tmp_path, rgba_model):
    data = tmp_path / "data"
    data.mkdir()
    im = rgba_image(24, 32, 3)
    Image.fromarray(im, "RGBA").save(data / "logo.png")
    Image.fromarray(im[..., :3]).save(data / "photo.png")  # no alpha: read as opaque
    assert main(["reconstruct", str(rgba_model), str(data), str(tmp_path / "out")]) == 0
    model = vaekit.load(rgba_model)
    for name, source in (("logo.png", im), ("photo.png", np.dstack([im[..., :3], np.full(im.shape[:2], 255, np.uint8)]))):
        got = Image.open(tmp_path / "out" / name)
        with torch.inference_mode():
            want = to_uint8(model(to_tensor(source), pad=True)[0])[0]
        assert got.mode == "RGBA" and np.abs(np.asarray(got).astype(int) - want).max() <= 1, name


def test_encode_keeps_alpha_and_decode_writes_it_back(tmp_path, rgba_model):
    data = tmp_path / "data"
    data.mkdir()
    ims = [rgba_image(32, 32, s) for s in range(3)]
    for i, im in enumerate(ims):
        Image.fromarray(im, "RGBA").save(data / f"{i}.png")
    assert main(["encode", str(rgba_model), str(data), str(tmp_path / "lat"), "--resolution", "32", "--workers", "0", "--dtype", "fp32"]) == 0
    model = vaekit.load(rgba_model)
    dataset = LatentDataset(tmp_path / "lat")
    for i, item in enumerate(dataset.items):
        with torch.inference_mode():
            want = model.encode(to_tensor(ims[int(item["source"][0])])).mean[0]
        torch.testing.assert_close(dataset.raw_latent(i).float(), want, atol=1e-5, rtol=0)  # the alpha was encoded too
    written = decode_latents(model, tmp_path / "lat", tmp_path / "dec", progress=False)
    assert all(Image.open(p).mode == "RGBA" for p in written) and len(written) == 3
    # Padding an RGBA image to its bucket leaves the padding transparent.
    from vaekit.latents import fit

    canvas, _ = fit(ims[0][:, :16], (32, 32), "pad")
    assert canvas.shape == (32, 32, 4) and (canvas[:, :8, 3] == 0).all() and (canvas[:, 8:24, 3] > 0).any()


def test_eval_scores_colour_and_alpha_apart(tmp_path, rgba_model):
    data = tmp_path / "data"
    data.mkdir()
    im = rgba_image(32, 32, 4)
    Image.fromarray(im, "RGBA").save(data / "a.png")
    model = vaekit.load(rgba_model)
    result = evaluate(model, data, ["psnr"], progress=False)
    with torch.inference_mode():
        rec = to_uint8(model(to_tensor(im), pad=True)[0])[0].astype(float)
    alpha_mse = ((rec[..., 3] - im[..., 3]) ** 2).mean()
    colour_mse = ((rec[..., :3] - im[..., :3]) ** 2).mean()
    row = result["per_image"][0]
    assert row["alpha_psnr"] == pytest.approx(10 * np.log10(255**2 / alpha_mse), rel=1e-9)
    assert row["alpha_mae"] == pytest.approx(np.abs(rec[..., 3] - im[..., 3]).mean(), rel=1e-9)
    assert row["psnr"] == pytest.approx(10 * np.log10(255**2 / colour_mse), rel=1e-9)  # R, G, B only
    assert set(result["mean"]) == {"psnr", "alpha_psnr", "alpha_mae"}


def test_an_rgb_batch_for_an_rgba_model_says_how_to_read_alpha(rgba_model):
    model = vaekit.load(rgba_model)
    with pytest.raises(ValueError, match=r"3 channels, the model expects 4: the model takes RGBA; read images with vaekit.data.read_image\(alpha=True\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
