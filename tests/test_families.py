"""The latent spaces beyond SD's scalar scale: FLUX.2 (2x2 patches normalised by a BatchNorm), per-channel
mean/std, and pixel space, each against its reference and through every file route."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset
from vaekit.checkpoints import read_checkpoint, save
from vaekit.cli import main
from vaekit.model import Autoencoder

TOLERANCE = 1e-4


def flux2_reference(widths: tuple[int, ...] = (16, 32, 32, 32), layers: int = 1, groups: int = 8) -> AutoencoderKLFlux2:
    """diffusers' AutoencoderKLFlux2 with perturbed weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    n = len(widths)
    ref = AutoencoderKLFlux2(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers, latent_channels=32,
                             norm_num_groups=groups)  # fmt: skip
    perturb(ref, 0.02)
    with torch.no_grad():
        ref.bn.running_mean.normal_(0, 0.5)
        ref.bn.running_var.uniform_(0.3, 3.0)
    return ref.eval()


def flux2_pipeline_latent(ref: AutoencoderKLFlux2, mean: torch.Tensor) -> torch.Tensor:
    """What the FLUX.2 pipeline feeds its transformer: diffusers' Flux2Pipeline._patchify_latents, then the
    BatchNorm statistics (transcribed: the pipeline module needs transformers, which is not installed)."""
    b, c, h, w = mean.shape
    patches = mean.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return (patches - ref.bn.running_mean.view(1, -1, 1, 1)) / std


def flux2_pipeline_decode(ref: AutoencoderKLFlux2, z: torch.Tensor) -> torch.Tensor:
    """The pipeline's way back: undo the BatchNorm, _unpatchify_latents, decode."""
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    z = z * std + ref.bn.running_mean.view(1, -1, 1, 1)
    b, c, h, w = z.shape
    z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
    return ref.decode(z).sample


@torch.no_grad()
def flux2_differences(ours: Autoencoder, ref: AutoencoderKLFlux2, size: tuple[int, int] = (32, 48)) -> dict[str, float]:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    q = ref.encode(x).latent_dist
    p = ours.encode(x)
    z = flux2_pipeline_latent(ref, q.mean)
    return {
        "mean": (p.mean - q.mean).abs().max().item(),
        "logvar": (p.logvar - q.logvar).abs().max().item(),
        "decode": (ours.decode(q.mean) - ref.decode(q.mean).sample).abs().max().item(),
        "to_latent": (ours.to_latent(x) - z).abs().max().item(),
        "from_latent": (ours.from_latent(z) - flux2_pipeline_decode(ref, z)).abs().max().item(),
    }


@pytest.mark.parametrize("route", ["diffusers folder -> vaekit", "vaekit folder -> diffusers"])
def test_flux2_matches_diffusers_and_its_pipeline(route: str, tmp_path: Path) -> None:
    ref = flux2_reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config.latent_norm == "patch_bn" and ours.config.latent_channels == 32
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        ref = AutoencoderKLFlux2.from_pretrained(tmp_path / "v").eval()
        assert json.loads((tmp_path / "v" / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"
    diffs = flux2_differences(ours, ref)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_flux2_full_width_matches_diffusers(tmp_path: Path) -> None:
    ref = flux2_reference(widths=(128, 256, 512, 512), layers=2, groups=32)  # the published architecture
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config == preset("flux2") and ours.config.family == "flux2"
    diffs = flux2_differences(ours, ref, size=(32, 32))
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert tuple(ours.to_latent(torch.zeros(1, 3, 64, 32)).shape) == (1, 128, 4, 2)  # 128 channels at 1/16


def test_flux2_single_file_has_bfl_names_and_round_trips(tmp_path: Path) -> None:
    ref = flux2_reference(widths=(32, 32, 64, 64), groups=32)  # a file alone does not say its GroupNorm groups: 32
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    save(ours, tmp_path / "ae.safetensors", format="single-file")
    keys = set(load_file(tmp_path / "ae.safetensors"))
    # BFL's flux2/autoencoder.py: the encoder and decoder own the quant convs; the BatchNorm sits at the top.
    expected = {"encoder.quant_conv.weight", "decoder.post_quant_conv.bias", "bn.running_mean", "bn.running_var",
                "encoder.down.0.block.0.norm1.weight", "decoder.up.3.upsample.conv.weight", "encoder.mid.attn_1.q.weight"}
    assert expected <= keys and not any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys)
    back = vaekit.load(tmp_path / "ae.safetensors")
    assert back.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
    # A BFL file as BFL writes it: no vaekit metadata, no num_batches_tracked counter.
    bare = {k: v for k, v in load_file(tmp_path / "ae.safetensors").items() if k != "bn.num_batches_tracked"}
    save_file(bare, tmp_path / "bfl.safetensors")
    ck = read_checkpoint(tmp_path / "bfl.safetensors")
    assert ck.config.latent_norm == "patch_bn" and "BFL FLUX.2" in ck.format
    assert ck.normalisation_source == "the checkpoint's latent BatchNorm statistics (bn.running_mean/var)"
    assert max(flux2_differences(vaekit.load(tmp_path / "bfl.safetensors"), ref).values()) <= TOLERANCE
    with pytest.warns(UserWarning, match=r"family='flux1' ignored: .*BatchNorm statistics .* states the normalisation 2x2 patches"):
        read_checkpoint(tmp_path / "bfl.safetensors", family="flux1")


def test_flux2_cli_inspect_and_convert(tmp_path: Path, capsys) -> None:
    assert main(["convert", "preset:flux2", str(tmp_path / "ae.safetensors")]) == 0
    assert main(["inspect", str(tmp_path / "ae.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "family         flux2" in out and "normalisation  2x2 patches (128 ch at 16x), BatchNorm stats" in out


def test_per_channel_mean_and_std_are_applied_as_diffusers_pipelines_do(tmp_path: Path) -> None:
    # An AutoencoderKL whose config carries latents_mean/latents_std (Playground v2.5's layout): pipelines
    # compute (z - mean) * scaling_factor / std. vaekit used to apply only scaling_factor and say so.
    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.5, 1.0]
    ref = perturb(AutoencoderKL(block_out_channels=(16, 32), down_block_types=["DownEncoderBlock2D"] * 2,
                                up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, latent_channels=4,
                                latents_mean=mean, latents_std=std, scaling_factor=0.5)).eval()  # fmt: skip
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config.latent_norm == "channel" and ours.config.latents_std == tuple(std)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mean
        expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) * 0.5 / torch.tensor(std).view(1, 4, 1, 1)
        assert (ours.to_latent(x) - expected).abs().max() < 1e-5
        assert (ours.denormalize(expected) - z).abs().max() < 1e-5
    save(ours, tmp_path / "v", format="diffusers")
    again = AutoencoderKL.from_pretrained(tmp_path / "v")
    assert list(again.config.latents_mean) == mean and list(again.config.latents_std) == std


@pytest.mark.parametrize("name, factor, channels", [("pixel", 1, 3), ("pixel-p2", 2, 12), ("pixel-p16", 16, 768)])
def test_pixel_space_is_lossless_behind_the_same_interface(name: str, factor: int, channels: int) -> None:
    model = vaekit.load(f"preset:{name}")
    assert model.num_parameters() == 0 and model.factor == factor and model.config.kind == "ae"
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = model.to_latent(x)
    assert tuple(z.shape) == (2, channels, 32 // factor, 48 // factor)
    assert torch.equal(model.from_latent(z), x) and torch.equal(model(x)[0], x)
    assert model.encode(x).kl().abs().max() == 0
    # Odd sizes go through the same padding as every model: reconstructed exactly, cropped back.
    odd = torch.rand(1, 3, 35, 21) * 2 - 1
    assert torch.equal(model(odd, pad=True)[0], odd)


def test_pixel_space_in_eval_and_compare(tmp_path: Path, capsys) -> None:
    from PIL import Image
    from skimage import data as skdata

    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skdata, name)()[:256:8, :256:8]).save(tmp_path / "photos" / f"{name}.png")
    assert main(["eval", "preset:pixel-p2", str(tmp_path / "photos"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    psnr_row = next(line for line in out.splitlines() if line.startswith("psnr"))
    assert psnr_row.split() == ["psnr", "inf", "-", "inf", "inf"]  # lossless: infinite PSNR, printed as inf, no spread
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["mean"]["psnr"] is None and result["mean"]["ssim"] == 1.0  # strict JSON: inf -> null
    code = main(["compare", "preset:pixel", "preset:tiny-f8c4", str(tmp_path / "photos"), "--report", str(tmp_path / "cmp"),
                 "--resolution", "32", "--lpips", "off", "--samples", "2", "--steps", "3", "--pairs", "1"])  # fmt: skip
    assert code == 0
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "<td>∞</td>" in html and "nan" not in html.lower()
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["models"]["preset:pixel"]["reconstruction"]["psnr"] is None


def test_flux2_layout_trains_and_fits_its_latent_batchnorm(tmp_path: Path) -> None:
    from vaekit.train import TrainConfig, train

    small = preset("flux2").replace(block_channels=(16, 32), layers_per_block=1, norm_groups=8, family="").to_dict()
    result = train(TrainConfig(data="samples", out=str(tmp_path / "run"), config=small, steps=2, batch_size=2, resolution=32,
                               val_resolution=32, warmup=1, sample_every=0), progress=False)  # fmt: skip
    fitted = result.metrics["latent_bn"]
    assert fitted["images"] >= 512 and fitted["channels"] == 128 and fitted["crop"] == [32, 32]
    model = vaekit.load(result.model)
    assert model.config.latent_norm == "patch_bn" and not torch.equal(model.bn.running_var, torch.ones(128))
    # Its normalised latents of training crops are centred with unit spread, per channel.
    from vaekit.data import Crops, sample_images

    crops = torch.stack([Crops(32)(im, (9, i)) for i, (_, im) in enumerate(sample_images("train") * 4)]).float() / 127.5 - 1
    with torch.no_grad():
        z = model.to_latent(crops)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.5 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.5


def test_flux2_tiles_like_it_does_untiled(tmp_path: Path) -> None:
    ref = flux2_reference(widths=(16, 32, 32, 32))
    ref.save_pretrained(tmp_path / "d")
    model = vaekit.load(tmp_path / "d")
    x = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z, tiled = model.to_latent(x), model.to_latent(x, tile=32)
        assert (z - tiled).abs().max() < 1e-4
        assert (model.from_latent(z) - model.from_latent(z, tile=32)).abs().max() < 1e-4


# ---- Qwen-Image -----------------------------------------------------------------------------------

QWEN_MEAN, QWEN_STD = [0.1 * i - 0.7 for i in range(16)], [0.5 + 0.15 * i for i in range(16)]


def qwen_reference(base: int = 16) -> "AutoencoderKLQwenImage":
    """diffusers' AutoencoderKLQwenImage with the release's layout (dim_mult 1, 2, 4, 4; 2 blocks; time
    downsampling in the last two levels) at `base` width, perturbed weights."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    ref = AutoencoderKLQwenImage(base_dim=base, z_dim=16, latents_mean=QWEN_MEAN, latents_std=QWEN_STD)
    return perturb(ref, 0.02).eval()


@torch.no_grad()
def qwen_differences(ours: Autoencoder, ref, size: tuple[int, int] = (32, 48)) -> dict[str, float]:
    """One image as a one-frame video in diffusers; the pipeline's normalisation (QwenImageImg2ImgPipeline:
    (z - latents_mean) / latents_std, and back)."""
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    q = ref.encode(x[:, :, None]).latent_dist
    p = ours.encode(x)
    mean, std = torch.tensor(QWEN_MEAN).view(1, 16, 1, 1), torch.tensor(QWEN_STD).view(1, 16, 1, 1)
    z = (q.mean[:, :, 0] - mean) / std
    return {
        "mean": (p.mean - q.mean[:, :, 0]).abs().max().item(),
        "logvar": (p.logvar - q.logvar[:, :, 0]).abs().max().item(),
        "decode": (ours.decode(q.mean[:, :, 0]) - ref.decode(q.mean).sample[:, :, 0]).abs().max().item(),
        "to_latent": (ours.to_latent(x) - z).abs().max().item(),
        "from_latent": (ours.from_latent(z) - ref.decode((z * std + mean)[:, :, None]).sample[:, :, 0]).abs().max().item(),
    }


QWEN_ROUTES = ["diffusers folder -> vaekit", "vaekit folder -> diffusers", "vaekit single file (Wan names) -> diffusers' converter",
               "vaekit single file -> vaekit"]  # fmt: skip


@pytest.mark.parametrize("route", QWEN_ROUTES)
def test_qwenimage_matches_diffusers_through_every_route(route: str, tmp_path: Path) -> None:
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref = qwen_reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config.arch == "qwenimage" and ours.config.latent_norm == "channel" and ours.factor == 8
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        ref = AutoencoderKLQwenImage.from_pretrained(tmp_path / "v").eval()
    elif route.startswith("vaekit single file"):
        save(ours, tmp_path / "vae.safetensors", format="single-file")
        wan = load_file(tmp_path / "vae.safetensors")
        assert "encoder.downsamples.0.residual.0.gamma" in wan and "conv1.weight" in wan and "decoder.head.2.weight" in wan
        if route.endswith("vaekit"):
            back = vaekit.load(tmp_path / "vae.safetensors")
            assert back.config == ours.config
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
            return
        ref = AutoencoderKLQwenImage(base_dim=16, z_dim=16, latents_mean=QWEN_MEAN, latents_std=QWEN_STD).eval()
        ref.load_state_dict(convert_wan_vae_to_diffusers(wan))  # diffusers' own reading of the Wan layout
    diffs = qwen_differences(ours, ref)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_qwenimage_full_width_matches_diffusers(tmp_path: Path) -> None:
    ref = qwen_reference(base=96)
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config == preset("qwenimage").replace(latents_mean=tuple(QWEN_MEAN), latents_std=tuple(QWEN_STD), family="")
    assert max(qwen_differences(ours, ref, size=(32, 32)).values()) <= TOLERANCE


def test_qwenimage_comfyui_file_is_recognised_and_tiles_exactly(tmp_path: Path, capsys) -> None:
    ref = qwen_reference()
    ref.save_pretrained(tmp_path / "d")
    model = vaekit.load(tmp_path / "d")
    save(model, tmp_path / "vae.safetensors", format="single-file")
    bare = load_file(tmp_path / "vae.safetensors")  # as ComfyUI users have it: no vaekit metadata
    save_file(bare, tmp_path / "qwen_image_vae.safetensors")
    ck = read_checkpoint(tmp_path / "qwen_image_vae.safetensors")
    assert ck.config.arch == "qwenimage" and ck.config.family == "qwenimage" and "Wan 2.1 / Qwen-Image layout" in ck.format
    assert ck.normalisation_source.startswith("qwenimage, from its key layout")
    assert ck.config.latents_std == preset("qwenimage").latents_std  # the release's statistics, stated as assumed
    assert main(["inspect", str(tmp_path / "qwen_image_vae.safetensors")]) == 0
    assert "normalisation  (z - mean[c]) * 1 / std[c]" in capsys.readouterr().out
    x = torch.rand(1, 3, 80, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = model.to_latent(x)
        assert (model.to_latent(x, tile=32) - z).abs().max() < 1e-5
        assert (model.from_latent(z, tile=32) - model.from_latent(z)).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["qwenimage", "hunyuanimage"])
def test_other_architectures_train(arch: str, tmp_path: Path) -> None:
    from vaekit.train import TrainConfig, train

    small = {"qwenimage": preset("qwenimage").replace(block_channels=(8, 16, 16), temporal_downsample=(False, True)),
             "hunyuanimage": preset("hunyuanimage").replace(block_channels=(32, 64, 64), latent_channels=16)}[arch]  # fmt: skip
    result = train(TrainConfig(data="samples", out=str(tmp_path / "run"), config=small.replace(layers_per_block=1).to_dict(),
                               steps=3, batch_size=2, resolution=32, val_resolution=32, lr=1e-3, warmup=1, sample_every=0),
                   progress=False)  # fmt: skip
    assert result.metrics["final"]["psnr"] > result.metrics["initial"]["psnr"]
    assert vaekit.load(result.model).config.arch == arch


# ---- Hunyuan Image ---------------------------------------------------------------------------------


def hunyuan_reference(widths=(32, 64, 64, 128), layers: int = 1, latent: int = 8, ratio: int = 8):
    from diffusers import AutoencoderKLHunyuanImage

    torch.manual_seed(0)
    ref = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=widths,
                                    layers_per_block=layers, spatial_compression_ratio=ratio, sample_size=64,
                                    scaling_factor=0.75289)  # fmt: skip
    return perturb(ref, 0.02).eval()


@torch.no_grad()
def hunyuan_differences(ours: Autoencoder, ref, size: tuple[int, int] = (32, 48)) -> dict[str, float]:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    q, p = ref.encode(x).latent_dist, ours.encode(x)
    z = q.mean * ref.config.scaling_factor  # the pipeline's scaling (HunyuanImagePipeline)
    return {
        "mean": (p.mean - q.mean).abs().max().item(),
        "logvar": (p.logvar - q.logvar).abs().max().item(),
        "decode": (ours.decode(q.mean) - ref.decode(q.mean).sample).abs().max().item(),
        "to_latent": (ours.to_latent(x) - z).abs().max().item(),
        "from_latent": (ours.from_latent(z) - ref.decode(z / ref.config.scaling_factor).sample).abs().max().item(),
    }


@pytest.mark.parametrize("route", ["diffusers folder -> vaekit", "vaekit folder -> diffusers", "fewer resamplings than levels"])
def test_hunyuanimage_matches_diffusers(route: str, tmp_path: Path) -> None:
    from diffusers import AutoencoderKLHunyuanImage

    ref = hunyuan_reference(widths=(64, 64, 128, 128, 128), ratio=8) if route.startswith("fewer") else hunyuan_reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config.arch == "hunyuanimage" and ours.factor == 8 and ours.config.scaling_factor == 0.75289
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        ref = AutoencoderKLHunyuanImage.from_pretrained(tmp_path / "v").eval()
    diffs = hunyuan_differences(ours, ref)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_hunyuanimage_full_width_matches_diffusers() -> None:
    # The 2.1 release's widths (one block per level instead of two, to keep the test light), module for module.
    ref = hunyuan_reference(widths=(128, 256, 512, 512, 1024, 1024), layers=1, latent=64, ratio=32)
    ours = Autoencoder(preset("hunyuanimage").replace(layers_per_block=1)).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.factor == 32
    assert max(hunyuan_differences(ours, ref, size=(64, 96)).values()) <= TOLERANCE


def test_hunyuanimage_tencent_file_round_trips_and_tiles(tmp_path: Path) -> None:
    ref = hunyuan_reference(layers=2, latent=64)  # 64 channels: the released family, whose scale a bare file assumes
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    save(ours, tmp_path / "vae.safetensors", format="single-file")
    names = set(load_file(tmp_path / "vae.safetensors"))
    # Tencent's hyimage/models/vae/hunyuanimage_vae.py names (its decoder's up.0 is the latent-side level).
    assert {"encoder.down.0.block.1.conv2.weight", "encoder.down.0.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight",
            "decoder.up.0.block.2.norm1.weight", "decoder.up.0.upsample.conv.weight", "decoder.mid.block_2.conv1.bias"} <= names
    # Tencent ships it inside a state dict under "vae." (pytorch_model.ckpt); ComfyUI's file has the bare names.
    torch.save({"state_dict": {f"vae.{k}": v for k, v in load_file(tmp_path / "vae.safetensors").items()}}, tmp_path / "pytorch_model.ckpt")
    for path in (tmp_path / "vae.safetensors", tmp_path / "pytorch_model.ckpt"):
        back = vaekit.load(path)
        assert back.config.arch == "hunyuanimage" and back.dtype == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
    ck = read_checkpoint(tmp_path / "pytorch_model.ckpt")
    assert "Tencent Hunyuan Image layout" in ck.format and ck.config.scaling_factor == 0.75289  # the family's, said
    assert ck.normalisation_source.startswith("hunyuanimage, from its key layout")
    # The authors run it in fp32: loading an fp16 copy computes in fp32 unless told otherwise.
    save(ours, tmp_path / "half.safetensors", format="single-file", dtype=torch.float16)
    assert vaekit.load(tmp_path / "half.safetensors").dtype == torch.float32
    assert vaekit.load(tmp_path / "half.safetensors", dtype=torch.float16).dtype == torch.float16
    # Tiled encode and decode give the untiled result (diffusers' tiled encode of this model is reported broken).
    x = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        z = ours.to_latent(x)
        assert (ours.to_latent(x, tile=32) - z).abs().max() < 1e-4
        assert (ours.from_latent(z, tile=32) - ours.from_latent(z)).abs().max() < 1e-4


# ---- every command for every family ----------------------------------------------------------------


def test_every_command_works_for_every_family(tmp_path: Path, capsys) -> None:
    """inspect, convert, reconstruct, eval, analyze and compare on a small random model of each family (saved
    as the single file its users have) and on pixel space, with values checked, not only exit codes."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skdata, name)()[:320:5, :320:5]).save(tmp_path / "photos" / f"{name}.png")  # 64x64
    small = {"flux2": preset("flux2").replace(block_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8),
             "qwenimage": preset("qwenimage").replace(block_channels=(8, 16, 16, 16), layers_per_block=1),
             "hunyuanimage": preset("hunyuanimage").replace(block_channels=(32, 64, 64, 64), latent_channels=16, layers_per_block=1)}  # fmt: skip
    models = []
    for family, config in small.items():
        torch.manual_seed(0)
        path = tmp_path / f"{family}.safetensors"
        save(Autoencoder(config).eval(), path, format="single-file")
        models.append(str(path))
        assert main(["inspect", str(path)]) == 0
        assert f"family         {family}" in capsys.readouterr().out
        assert main(["convert", str(path), str(tmp_path / f"{family}-diffusers")]) == 0
        again = vaekit.load(tmp_path / f"{family}-diffusers")
        assert again.config.arch == config.arch and again.factor == 8
        assert main(["reconstruct", str(path), str(tmp_path / "photos"), str(tmp_path / f"{family}-recon")]) == 0
        recon = np.asarray(Image.open(tmp_path / f"{family}-recon" / "coffee.png"))
        assert recon.shape == (64, 64, 3) and recon.std() > 0
        assert main(["eval", str(path), str(tmp_path / "photos"), "--json", str(tmp_path / f"{family}.json")]) == 0
        result = json.loads((tmp_path / f"{family}.json").read_text())
        assert result["n"] == 2 and 0 < result["mean"]["psnr"] < 40
        assert main(["analyze", str(path), str(tmp_path / "photos"), "--report", str(tmp_path / f"{family}-analysis"),
                     "--resolution", "64", "--lpips", "off", "--samples", "2", "--steps", "3", "--pairs", "1"]) == 0  # fmt: skip
        numbers = json.loads((tmp_path / f"{family}-analysis" / "report.json").read_text())
        channels = {"flux2": 128, "qwenimage": 16, "hunyuanimage": 16}[family]  # what each family's diffusion model sees
        assert len(numbers["latents"]["channels"]) == channels and numbers["latents"]["kl_mean"] > 0
    capsys.readouterr()
    assert main(["compare", *models, "preset:pixel-p2", str(tmp_path / "photos"), "--report", str(tmp_path / "cmp"),
                 "--resolution", "64", "--lpips", "off", "--samples", "2", "--steps", "3", "--pairs", "1"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert set(report["models"]) == {*models, "preset:pixel-p2"}
    assert report["models"]["preset:pixel-p2"]["reconstruction"]["psnr"] is None  # lossless


# ---- the table in docs/CHECKPOINTS.md: python tests/test_families.py --------------------------------


def parity_table() -> None:
    """Print the per-route differences these tests bound (docs/CHECKPOINTS.md), 1 thread, fp32."""
    import tempfile

    from diffusers import AutoencoderKLHunyuanImage, AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    torch.set_num_threads(1)
    families = {  # name: (reference builder, differences, diffusers class, single-file name)
        "FLUX.2": (flux2_reference, flux2_differences, AutoencoderKLFlux2, "BFL"),
        "Qwen-Image": (qwen_reference, qwen_differences, AutoencoderKLQwenImage, "Wan"),
        "Hunyuan Image": (hunyuan_reference, hunyuan_differences, AutoencoderKLHunyuanImage, "Tencent"),
    }
    full = {"FLUX.2": lambda: flux2_reference(widths=(128, 256, 512, 512), layers=2, groups=32),
            "Qwen-Image": lambda: qwen_reference(base=96)}  # fmt: skip
    print("| family | route | mean | logvar | decode | to_latent | from_latent |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family, (build, differences, cls, layout) in families.items():
            t = Path(tmp) / family
            ref = build()
            ref.save_pretrained(t / "d")
            ours = vaekit.load(t / "d")
            save(ours, t / "v", format="diffusers")
            save(ours, t / "file.safetensors", format="single-file")
            routes = {"diffusers folder -> vaekit": (ours, ref), "vaekit folder -> diffusers": (ours, cls.from_pretrained(t / "v").eval()),
                      f"vaekit {layout}-layout file -> vaekit": (vaekit.load(t / "file.safetensors"), ref)}  # fmt: skip
            if family == "Qwen-Image":
                converted = AutoencoderKLQwenImage(base_dim=16, z_dim=16, latents_mean=QWEN_MEAN, latents_std=QWEN_STD).eval()
                converted.load_state_dict(convert_wan_vae_to_diffusers(load_file(t / "file.safetensors")))
                routes["vaekit Wan-layout file -> diffusers' convert_wan_vae_to_diffusers"] = (ours, converted)
            if family in full:
                ref = full[family]()
                ref.save_pretrained(t / "full")
                routes["release width, diffusers folder -> vaekit"] = (vaekit.load(t / "full"), ref)
            if family == "Hunyuan Image":
                ref = hunyuan_reference(widths=(128, 256, 512, 512, 1024, 1024), layers=1, latent=64, ratio=32)
                full_width = Autoencoder(preset("hunyuanimage").replace(layers_per_block=1)).eval()
                full_width.load_state_dict(ref.state_dict())
                routes["release widths (1 block per level), diffusers weights -> vaekit"] = (full_width, ref)
            for route, (a, b) in routes.items():
                d = differences(a, b, size=(64, 96) if a.factor == 32 else (32, 32) if "release" in route else (32, 48))
                print(f"| {family} | {route} | " + " | ".join(f"{d[k]:.1e}" for k in ("mean", "logvar", "decode", "to_latent", "from_latent")) + " |")


if __name__ == "__main__":
    parity_table()
