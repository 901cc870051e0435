"""RGBA as a first-class input and output for 4-channel models (Qwen-Image 2.1's kind): images read with their
alpha kept, reconstructions and decodes written as RGBA PNGs, eval, analyze and compare scoring colour and alpha apart,
encoded datasets, diffusability and training keeping alpha. Three-channel models keep alpha composited on white."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaekit
from conftest import perturb
from test_resume import assert_identical
from vaekit import AutoencoderConfig
from vaekit.cli import main
from vaekit.data import center_crop, on_white, on_white_tensor, read_image, to_tensor, to_uint8, write_image
from vaekit.evaluate import evaluate
from vaekit.latents import LatentDataset, decode_latents
from vaekit.model import Autoencoder
from vaekit.report import slug

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


@pytest.fixture
def rgba_folder(tmp_path: Path) -> Path:
    """Two RGBA images whose alpha runs from transparent to opaque, and a PNG without alpha (opaque)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(rgba_image(40, 48, 10 + i), "RGBA").save(folder / f"{i}.png")
    Image.fromarray(rgba_image(40, 48, 12)[..., :3]).save(folder / "2.png")
    return folder


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


def test_on_white_is_what_a_3_channel_model_reads(tmp_path):
    im = rgba_image(20, 24, 5)
    Image.fromarray(im, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(im, "RGBA").convert("LA").save(tmp_path / "b.png")
    Image.fromarray(im[..., :3]).save(tmp_path / "c.jpg")
    palette = Image.fromarray(im[..., :3]).quantize(8)
    palette.save(tmp_path / "d.png", transparency=0)
    for name in ("a.png", "b.png", "c.jpg", "d.png"):  # one read with alpha serves both kinds of model, exactly
        assert np.array_equal(on_white(read_image(tmp_path / name, alpha=True)), read_image(tmp_path / name)), name
    # The differentiable form agrees with it to a level, and leaves RGB alone.
    composite = to_uint8(on_white_tensor(to_tensor(im)))[0].astype(int)
    assert np.abs(composite - on_white(im)).max() <= 1 and (composite[:, :6] == 255).all()  # the transparent quarter is white
    x = to_tensor(im[..., :3])
    assert on_white_tensor(x) is x


def test_compare_puts_an_rgba_and_an_rgb_model_side_by_side(tmp_path, rgba_model, rgba_folder):
    torch.manual_seed(0)
    perturb(Autoencoder(AutoencoderConfig(**SMALL)), scale=0.1).eval().save(str(tmp_path / "rgb-model"))
    report = tmp_path / "cmp"
    assert main(["compare", str(rgba_model), str(tmp_path / "rgb-model"), str(rgba_folder), "--report", str(report),
                 "--resolution", "32", "--lpips", "off", "--samples", "2", "--steps", "3", "--pairs", "1", "--crops", "1"]) == 0  # fmt: skip
    models = json.loads((report / "report.json").read_text())["models"]
    rgba, rgb = models[str(rgba_model)], models[str(tmp_path / "rgb-model")]
    # Each model is scored on the images as it takes them, as eval scores it: the RGBA model on R, G, B and alpha,
    # the RGB model on the images composited on white.
    for numbers, model in ((rgba, rgba_model), (rgb, tmp_path / "rgb-model")):
        want = evaluate(vaekit.load(model), rgba_folder, ["psnr"], resolution=32, progress=False)["per_image"]
        got = numbers["reconstruction"]["per_image"]
        for name in want[0].keys() - {"source"}:
            assert got[name] == pytest.approx([row[name] for row in want], abs=0.05), (model, name)  # batched: a level here and there
    assert rgba["channels"] == 4 and rgb["channels"] == 3 and "alpha_psnr" not in rgb["reconstruction"]
    assert rgba["reconstruction"]["alpha_psnr"] < 40  # a random model does not keep alpha: it is really scored
    assert len(rgba["completeness"]["real"]["color_mean"]) == 4  # colour statistics include alpha
    # Pictures are RGB: the RGBA images composited on white (the transparent left quarter is white), and say so.
    worst = rgba["blur"]["worst"][0]["index"]
    original = center_crop(read_image(sorted(rgba_folder.iterdir())[worst], alpha=True), 32)
    picture = np.asarray(Image.open(report / "models" / f"1_{slug(str(rgba_model))}" / "worst_0.png"))
    assert picture.shape == (32, 96, 3) and np.abs(picture[:, :32].astype(int) - on_white(original)).max() <= 1
    assert Image.open(report / "crop_0_original.png").mode == "RGB" and Image.open(report / "crop_0_model0.png").mode == "RGB"
    assert "composited on white" in (report / "report.html").read_text()


def test_analysis_gives_lpips_the_colour_channels_and_rmse_all_four(rgba_model, rgba_folder):
    from vaekit.analysis import analyze, decode

    seen: list[int] = []

    def lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a stand-in distance that records what it gets
        seen.append(a.shape[1])
        return (a - b).abs().mean(dim=(1, 2, 3))

    x = torch.cat([to_tensor(center_crop(im, 32)) for im in [read_image(p, alpha=True) for p in sorted(rgba_folder.iterdir())]])
    model = vaekit.load(rgba_model)
    result = analyze(model, x, pairs=1, steps=3, samples=2, lpips=lpips, progress=False)
    assert seen and set(seen) == {3}
    rec = result.reconstructions
    assert rec.shape == x.shape and result.numbers["reconstruction"]["lpips"] == pytest.approx(float((x[:, :3] - rec[:, :3]).abs().mean()))
    interpolation = result.numbers["continuity"]["interpolation"]
    assert {"l2", "lpips"} <= interpolation.keys() and all(p.shape[-1] == 3 for p in result.images.values())
    # RMSE steps along the line from image 0 to image 1 count every channel, alpha too.
    with torch.inference_mode():
        z = model.normalize(model.encode(x).mean)
        frames = decode(model, z[0] + torch.linspace(0, 1, 3).view(-1, 1, 1, 1) * (z[1] - z[0]))
    rmse = ((frames[1:] - frames[:-1]) / 2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert frames.shape[1] == 4 and interpolation["l2"]["steps"][0] == pytest.approx(rmse.tolist(), rel=1e-5)


def test_diffusability_of_an_rgba_model_reads_alpha(tmp_path, rgba_model, rgba_folder):
    from vaekit.diffusability import Protocol, crops

    out = tmp_path / "diff"
    assert main(["diffusability", str(rgba_model), str(rgba_folder), "--out", str(out), "--resolution", "32", "--steps", "3",
                 "--train-crops", "16", "--val-crops", "8", "--samples", "4", "--kid", "off"]) == 0  # fmt: skip
    numbers = json.loads((out / "report.json").read_text())
    assert np.isfinite(numbers["score"]) and all(np.isfinite(numbers["errors"]))
    assert numbers["images"]["channels"] == 4 and numbers["latents"]["shape"][0] == 4
    assert Image.open(out / "diffusability_samples.png").mode == "RGB"
    # The crops it encodes keep alpha: transparent, opaque and everything between.
    x_train, x_val, _ = crops(str(rgba_folder), Protocol(resolution=32, train_crops=16, val_crops=8), alpha=True)
    assert x_train.shape[1] == x_val.shape[1] == 4 and x_train[:, 3].min() == -1 and x_train[:, 3].max() == 1
    assert ((x_train[:, 3] > -0.9) & (x_train[:, 3] < 0.9)).any()


def test_an_rgba_loss_scores_alpha_and_lpips_sees_the_colours_on_white():
    from vaekit.losses import AutoencoderLoss, LossConfig

    crit = AutoencoderLoss(LossConfig(ssim_weight=1, lpips_weight=1, lpips_net="alex", lpips_pretrained=False, gan_weight=0.5),
                           kind="ae", channels=4)  # fmt: skip
    x = to_tensor(rgba_image(32, 32, 6))
    posterior = vaekit.model.Posterior(torch.zeros(1, 4, 8, 8), None)
    alpha_off = x.clone()
    alpha_off[:, 3] = (alpha_off[:, 3] - 0.5).clamp(-1, 1)
    terms = crit.terms(x, alpha_off, posterior, step=0)
    assert terms["l1"] == pytest.approx(float((x[:, 3] - alpha_off[:, 3]).abs().mean()) / 4, rel=1e-6)  # alpha is a quarter of L1
    assert terms["ssim"] > 0 and terms["lpips"] > 0 and "gan_g" in terms
    want = crit.lpips.net(on_white_tensor(x), on_white_tensor(alpha_off)).mean()
    assert terms["lpips"] == pytest.approx(float(want), rel=1e-6)
    # Colours under zero alpha: part of L1 (eval scores them as stored), invisible to LPIPS.
    hidden = x.clone()
    hidden[:, :3, :, :4] = -hidden[:, :3, :, :4]  # the left quarter is transparent
    terms = crit.terms(x, hidden, posterior, step=0)
    assert terms["l1"] > 0.01 and float(terms["lpips"]) == pytest.approx(0, abs=1e-6)
    assert crit.discriminator.main[0].in_channels == 4 and torch.isfinite(crit.discriminator_loss(x, alpha_off)[0])


def test_train_an_rgba_model_on_images_with_and_without_alpha(tmp_path, rgba_folder):
    from vaekit.data import training_data
    from vaekit.losses import LossConfig
    from vaekit.train import TrainConfig, train

    data = training_data(str(rgba_folder), 32, val_fraction=0, alpha=True)
    crops = {name: data.dataset[(i, (0, 0, i))][0] for i, name in enumerate(["0.png", "1.png", "2.png"])}
    assert all(c.shape == (4, 32, 32) for c in crops.values()) and (crops["2.png"][3] == 255).all()  # no alpha: opaque
    (tmp_path / "val").mkdir()
    Image.fromarray(rgba_image(32, 32, 20), "RGBA").save(tmp_path / "val" / "v.png")
    (rgba_folder / "2.png").unlink()  # the opaque image teaches a tiny model that alpha is mostly 1: train on the two others
    settings = dict(data=str(rgba_folder), val=str(tmp_path / "val"), config=dict(SMALL, in_channels=4, out_channels=4), steps=30,
                    batch_size=4, resolution=32, val_resolution=32, lr=5e-3, warmup=2, log_every=5, sample_every=0, save_every=15,
                    loss=LossConfig(pixel="l2", ssim_weight=0.2, gan_weight=0.5, gan_start=25, disc_channels=8, disc_layers=2))  # fmt: skip
    result = train(TrainConfig(out=str(tmp_path / "run"), **settings), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[4]["l2"] < 0.75 * log[0]["l2"] and "disc" in log[-1]  # L2 over all four channels falls; the 4-channel GAN ran
    before, after = result.metrics["initial"], result.metrics["final"]
    assert after["alpha_psnr"] > before["alpha_psnr"] + 2 and after["psnr"] > before["psnr"] + 2  # alpha is learned too
    assert Image.open(sorted((tmp_path / "run" / "samples").glob("*.png"))[-1]).mode == "RGBA"
    assert vaekit.load(result.model).config.in_channels == 4
    # Resume continues bit for bit, the 4-channel discriminator included.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "step_0000015.pt", tmp_path / "resumed" / "checkpoints")
    train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **settings), progress=False)
    a, b = (torch.load(tmp_path / run / "checkpoints" / "step_0000030.pt", weights_only=True) for run in ("run", "resumed"))
    assert sum(assert_identical(a[k], b[k], k) for k in ("model", "ema", "optimizer", "discriminator", "disc_optimizer", "rng")) > 50
