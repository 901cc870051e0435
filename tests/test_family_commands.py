"""The 2026 families (issue 27: Wan 2.1/2.2, FLUX.2's small decoder, DC-AE, KVAE, Qwen-Image 2.1, Hunyuan Image 2.1's refiner,
Hunyuan Image 3.0) through every command a latent-diffusion user runs, on small random models with
values checked: encode a dataset, decode it back, calibrate on it, score diffusability, bench against the family's
diffusers class (where diffusers has one), train a few steps; inspect, convert, reconstruct, eval and analyze. Qwen-Image
2.1 (RGBA) gets images whose alpha varies, through every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaekit
from vaekit import preset, save
from vaekit.cli import main
from vaekit.model import ARCHITECTURES, Autoencoder

SMALL = {
    "wan2.1": lambda: preset("wan2.1").replace(block_channels=(8, 16, 16, 16), layers_per_block=1),
    "wan2.2": lambda: preset("wan2.2").replace(block_channels=(8, 16, 16), decoder_block_channels=(16, 32, 32),
                                               temporal_downsample=(False, True), layers_per_block=1),
    "flux2-small-decoder": lambda: preset("flux2-small-decoder").replace(block_channels=(16, 32, 32, 32),
                                                                         decoder_block_channels=(8, 16, 16, 16),
                                                                         layers_per_block=1, norm_groups=8),
    "dc-ae-f32c32": lambda: preset("dc-ae-f32c32").replace(
        block_channels=(16, 32, 32, 64), block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_layers=(1, 1, 1, 1), decoder_layers=(1, 1, 1, 1), decoder_norms=("rms_norm",) * 4, attention_head_dim=16,
        latent_channels=8),
    "kvae": lambda: preset("kvae").replace(block_channels=(32, 64, 64), layers_per_block=1),
    "qwenimage2.1": lambda: preset("qwenimage2.1").replace(block_channels=(8, 16, 32, 32, 32),
                                                           decoder_block_channels=(12, 24, 48, 48, 48), layers_per_block=1),
    "hunyuanimage-refiner": lambda: preset("hunyuanimage-refiner").replace(block_channels=(8, 16, 32, 64, 64), layers_per_block=1,
                                                                           latent_channels=8),
    "hunyuanimage3": lambda: preset("hunyuanimage3").replace(block_channels=(32, 32, 32, 64, 64), layers_per_block=1),
}  # fmt: skip


def single_file_only(config) -> bool:
    """diffusers has no class for the architecture (Hunyuan Image 3.0's): its models are .safetensors files."""
    return not ARCHITECTURES[config.arch].layout.DIFFUSERS_CLASSES


@pytest.mark.parametrize("family", list(SMALL))
def test_latent_dataset_calibrate_diffusability_bench_and_train(family: str, tmp_path: Path, capsys) -> None:
    from vaekit.diffusability import Protocol, score
    from vaekit.latents import LatentDataset
    from vaekit.speed import bench

    config = SMALL[family]()
    torch.manual_seed(0)
    model = Autoencoder(config).eval()
    single = single_file_only(config)
    path = tmp_path / ("model.safetensors" if single else "model")
    save(model, path, format="single-file" if single else "diffusers")
    f = model.factor
    side = max(32, 2 * f)
    (tmp_path / "photos").mkdir()
    g = np.random.default_rng(0)
    for i in range(3):  # RGBA for an RGBA model: alpha random too
        Image.fromarray(g.integers(0, 255, (side, side + f, config.in_channels), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")

    # encode: the stored latents are the model's, and the dataset gives the family's normalised latents
    assert main(["encode", str(path), str(tmp_path / "photos"), str(tmp_path / "lat"), "--resolution", str(side),
                 "--workers", "0", "--dtype", "fp32"]) == 0  # fmt: skip
    data = LatentDataset(tmp_path / "lat", model=vaekit.load(path))
    assert len(data) == 3
    item = data.items[0]
    from vaekit.data import read_image
    from vaekit.latents import fit

    pixels, _ = fit(read_image(tmp_path / "photos" / item["source"], alpha=config.rgba), tuple(item["bucket"]), "center-crop")
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        torch.testing.assert_close(data[0]["latent"][None].float(), model.to_latent(x), atol=1e-4, rtol=0)
    # decode: PNGs named after the sources, equal to the model's decode of the stored latents
    assert main(["decode", str(path), str(tmp_path / "lat"), str(tmp_path / "dec")]) == 0
    decoded = np.asarray(Image.open(tmp_path / "dec" / item["source"]))
    with torch.inference_mode():
        want = vaekit.data.to_uint8(model.decode(data.raw_latent(0)[None].float()))[0]
    assert np.abs(decoded.astype(int) - want).max() <= 1
    # calibrate on the dataset: the calibrated model's normalisation makes these latents unit-variance
    capsys.readouterr()
    cal = tmp_path / ("cal.safetensors" if single else "cal")
    assert main(["calibrate", str(path), str(tmp_path / "lat"), "--write", str(cal), "--per-channel", "--mode"]) == 0
    assert "calibrated normalisation" in capsys.readouterr().out
    z = torch.stack([LatentDataset(tmp_path / "lat", model=vaekit.load(cal))[i]["latent"] for i in range(3)])
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 0.1  # per channel: each channel 0 and 1
    # bench: timed against its own diffusers class, on the same weights (alone where diffusers has none)
    rows, _ = bench(model, [side], [1], ["fp32"], repeats=1)
    assert {r.op for r in rows} == {"encode", "decode"} and all(r.seconds > 0 for r in rows)
    assert all(r.peer_seconds is None if single else r.peer_seconds > 0 and r.max_abs_diff < 1e-4 for r in rows)
    # diffusability: scored on the family's normalised latents (of the RGBA photos for an RGBA model)
    numbers, _ = score(model, str(tmp_path / "photos"), Protocol(resolution=side, steps=2, train_crops=16, val_crops=8, samples=2),
                       progress=False)  # fmt: skip
    assert numbers["latents"]["shape"][0] == model.config.normalised_shape[0] and np.isfinite(numbers["score"])
    assert numbers["images"]["channels"] == config.in_channels
    # train: a few steps from scratch (a deterministic AE with the AE recipe), and the result loads
    assert main(["train", "--data", str(tmp_path / "photos"), "--val", str(tmp_path / "photos"), "--out", str(tmp_path / "run"),
                 "--config", str(_config_file(config, tmp_path)), "--steps", "2", "--warmup", "1", "--batch-size", "2",
                 "--resolution", str(side), "--val-resolution", str(side), "--sample-every", "0"]) == 0  # fmt: skip
    trained = vaekit.load(tmp_path / "run" / ("model.safetensors" if single else "model"))
    assert trained.config.arch == config.arch and trained.config.kind == config.kind
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 2 and ("alpha_psnr" in metrics["final"]) == config.rgba  # an RGBA model validated on alpha too


def _config_file(config, tmp_path: Path) -> Path:
    file = tmp_path / "config.json"
    file.write_text(config.to_json())
    return file


NOT_TILED = {"dc-ae-f32c32": "linear attention spans the whole image", "kvae": ""}  # refused, each with its reason


@pytest.mark.parametrize("family", list(SMALL))
def test_inspect_convert_reconstruct_eval_and_analyze(family: str, tmp_path: Path, capsys) -> None:
    config = SMALL[family]()
    torch.manual_seed(0)
    model = Autoencoder(config).eval()
    path = tmp_path / "model.safetensors"
    save(model, path, format="single-file")
    f, channels = model.factor, config.in_channels
    side = max(64, 4 * f)
    (tmp_path / "photos").mkdir()
    g = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(g.integers(0, 255, (side, side, channels), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    assert main(["inspect", str(path)]) == 0
    assert f"family         {config.family}" in capsys.readouterr().out
    if single_file_only(config):  # a diffusers folder is refused in one line; a single file converts
        assert main(["convert", str(path), str(tmp_path / "diffusers")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no diffusers class" in err and not (tmp_path / "diffusers").exists()
        assert main(["convert", str(path), str(tmp_path / "converted.safetensors"), "--dtype", "fp16"]) == 0
        assert vaekit.load(tmp_path / "converted.safetensors").config == config
    else:
        assert main(["convert", str(path), str(tmp_path / "diffusers")]) == 0
        assert vaekit.load(tmp_path / "diffusers").config == config
    # reconstruct: the model's output, RGBA PNGs for an RGBA model; tiled equal to untiled, or refused in one line
    assert main(["reconstruct", str(path), str(tmp_path / "photos"), str(tmp_path / "recon")]) == 0
    image = np.asarray(Image.open(tmp_path / "photos" / "0.png"))
    got = np.asarray(Image.open(tmp_path / "recon" / "0.png"))
    with torch.inference_mode():
        want = vaekit.data.to_uint8(model(vaekit.data.to_tensor(image))[0])[0]
    assert got.shape == (side, side, channels) and np.abs(got.astype(int) - want).max() <= 1
    code = main(["reconstruct", str(path), str(tmp_path / "photos"), str(tmp_path / "tiled"), "--tile", str(side // 2)])
    if family in NOT_TILED:
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "til" in err and NOT_TILED[family] in err
    else:
        assert code == 0 and np.abs(np.asarray(Image.open(tmp_path / "tiled" / "0.png")).astype(int) - got).max() <= 1
    # eval: colour (and alpha) scores of exactly those reconstructions
    assert main(["eval", str(path), str(tmp_path / "photos"), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    rgb = got[..., :3].astype(float) - image[..., :3]
    assert result["n"] == 2 and result["per_image"][0]["psnr"] == pytest.approx(10 * np.log10(255**2 / (rgb**2).mean()), rel=1e-9)
    assert ("alpha_psnr" in result["mean"]) == config.rgba
    # analyze: the images as the model takes them (RGBA with their alpha), scored as eval scores them
    assert main(["analyze", str(path), str(tmp_path / "photos"), "--report", str(tmp_path / "analysis"), "--resolution",
                 str(side), "--lpips", "off", "--samples", "2", "--steps", "3", "--pairs", "1"]) == 0  # fmt: skip
    numbers = json.loads((tmp_path / "analysis" / "report.json").read_text())
    assert len(numbers["latents"]["channels"]) == model.config.normalised_shape[0] and numbers["channels"] == channels
    analysed = numbers["reconstruction"]["per_image"]
    for name in result["mean"]:  # psnr, and for RGBA alpha_psnr and alpha_mae: eval's, at the same size (a level here and there)
        assert analysed[name] == pytest.approx([row[name] for row in result["per_image"]], abs=0.05), name
