"""Wan 2.1's VAE (diffusers' AutoencoderKLWan, is_residual=False: Qwen-Image's network, the qwenimage architecture)
and Wan 2.2's (is_residual=True: 2x2 patches, residual levels with parameter-free shortcuts, a wider decoder; the
wan22 architecture), on one frame, against diffusers' class through every file route, with random weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset
from vaekit.checkpoints import read_checkpoint, save
from vaekit.cli import main
from vaekit.layouts import wan22 as wan22_layout
from vaekit.model import Autoencoder

TOLERANCE = 1e-4
WAN21 = preset("wan2.1")
WAN22 = preset("wan2.2")


def wan21_reference(base: int = 8, **kw) -> AutoencoderKLWan:
    """diffusers' AutoencoderKLWan as Wan 2.1 ships it (its defaults: the release's layout and latent statistics) at
    `base` width, perturbed weights."""
    torch.manual_seed(0)
    return perturb(AutoencoderKLWan(base_dim=base, **kw), 0.02).eval()


def wan22_reference(base: int = 8, decoder: int = 12, layers: int = 2, z: int = 48, stats=WAN22, **kw) -> AutoencoderKLWan:
    """AutoencoderKLWan as Wan 2.2 ships it (scripts/convert_wan_to_diffusers.py's vae22_diffusers_config), smaller."""
    torch.manual_seed(0)
    mean, std = (list(stats.latents_mean), list(stats.latents_std)) if stats else ([0.1 * i for i in range(z)], [1 + 0.01 * i for i in range(z)])
    ref = AutoencoderKLWan(base_dim=base, decoder_base_dim=decoder, z_dim=z, is_residual=True, in_channels=12, out_channels=12,
                           patch_size=2, num_res_blocks=layers, scale_factor_spatial=16, latents_mean=mean, latents_std=std, **kw)  # fmt: skip
    return perturb(ref, 0.02).eval()


@torch.no_grad()
def wan_differences(ours: Autoencoder, ref: AutoencoderKLWan, size: tuple[int, int] = (32, 48)) -> dict[str, float]:
    """One image as a one-frame video in diffusers; the pipelines' normalisation (WanPipeline, WanImageToVideoPipeline:
    (z - latents_mean) / latents_std, and back)."""
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    q = ref.encode(x[:, :, None]).latent_dist
    p = ours.encode(x)
    c = ref.config.z_dim
    mean, std = torch.tensor(ref.config.latents_mean).view(1, c, 1, 1), torch.tensor(ref.config.latents_std).view(1, c, 1, 1)
    z = (q.mean[:, :, 0] - mean) / std
    return {
        "mean": (p.mean - q.mean[:, :, 0]).abs().max().item(),
        "logvar": (p.logvar - q.logvar[:, :, 0]).abs().max().item(),
        "decode": (ours.decode(q.mean[:, :, 0]) - ref.decode(q.mean).sample[:, :, 0]).abs().max().item(),
        "to_latent": (ours.to_latent(x) - z).abs().max().item(),
        "from_latent": (ours.from_latent(z) - ref.decode((z * std + mean)[:, :, None]).sample[:, :, 0]).abs().max().item(),
    }


def convert_vae_22(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' scripts/convert_wan_to_diffusers.py `convert_vae_22` renaming, transcribed (the script is not
    part of the package and imports transformers): Wan 2.2's names -> AutoencoderKLWan's."""
    middle = {"residual.0.gamma": "norm1.gamma", "residual.2.bias": "conv1.bias", "residual.2.weight": "conv1.weight",
              "residual.3.gamma": "norm2.gamma", "residual.6.bias": "conv2.bias", "residual.6.weight": "conv2.weight"}  # fmt: skip
    head = {"head.0.gamma": "norm_out.gamma", "head.2.bias": "conv_out.bias", "head.2.weight": "conv_out.weight"}
    quant = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias", "conv2.weight": "post_quant_conv.weight",
             "conv2.bias": "post_quant_conv.bias"}  # fmt: skip
    new = {}
    for key, value in old.items():
        coder, _, rest = key.partition(".")
        if re.match(r"(encoder|decoder)\.middle\.[02]\.", key):
            i = int(key.split(".")[2]) // 2
            new[f"{coder}.mid_block.resnets.{i}.{middle[key.split('.', 3)[3]]}"] = value
        elif re.match(r"(encoder|decoder)\.middle\.1\.", key):
            new[key.replace(".middle.1.", ".mid_block.attentions.0.")] = value
        elif rest in head:
            new[f"{coder}.{head[rest]}"] = value
        elif key in quant:
            new[quant[key]] = value
        elif rest.startswith("conv1."):
            new[f"{coder}.conv_in.{rest[6:]}"] = value
        elif key.startswith(("encoder.downsamples.", "decoder.upsamples.")):
            kind = "downsamples" if coder == "encoder" else "upsamples"
            new_key = key.replace(f"{coder}.{kind}.", f"{coder}.{'down_blocks' if coder == 'encoder' else 'up_blocks'}.")
            if "residual" in new_key or "shortcut" in new_key:
                new_key = new_key.replace(f".{kind}.", ".resnets.")
                for wan, ours in {**{f".{k}": f".{v}" for k, v in middle.items()}, ".shortcut.": ".conv_shortcut."}.items():
                    if wan in new_key:
                        new_key = new_key.replace(wan, ours)
                        break
            elif "resample" in new_key or "time_conv" in new_key:
                parts = new_key.split(".")
                if parts[3] == kind:
                    new_key = ".".join(parts[:3] + [kind[:-1] + "r"] + parts[5:])  # downsamples.N -> downsampler
            new[new_key] = value
        else:
            new[key] = value
    return new


# ---- Wan 2.1 -------------------------------------------------------------------------------------------------

WAN21_ROUTES = ["diffusers folder -> vaekit", "vaekit folder -> diffusers", "vaekit single file (Wan names) -> diffusers' converter",
                "vaekit single file -> vaekit"]  # fmt: skip


@pytest.mark.parametrize("route", WAN21_ROUTES)
def test_wan21_matches_diffusers_through_every_route(route: str, tmp_path: Path) -> None:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref = wan21_reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config.arch == "qwenimage" and ours.config.family == "wan2.1" and ours.factor == 8
    assert ours.config == WAN21.replace(block_channels=(8, 16, 32, 32))  # the class's defaults are the preset's statistics
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        assert json.loads((tmp_path / "v" / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"
        ref = AutoencoderKLWan.from_pretrained(tmp_path / "v").eval()
        assert not ref.config.is_residual
    elif route.startswith("vaekit single file"):
        save(ours, tmp_path / "vae.safetensors", format="single-file")
        wan = load_file(tmp_path / "vae.safetensors")
        assert "encoder.downsamples.0.residual.0.gamma" in wan and "conv1.weight" in wan and "decoder.head.2.weight" in wan
        if route.endswith("vaekit"):
            back = vaekit.load(tmp_path / "vae.safetensors")
            assert back.config == ours.config  # vaekit's metadata keeps the family
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
            return
        ref = AutoencoderKLWan(base_dim=8).eval()
        ref.load_state_dict(convert_wan_vae_to_diffusers(wan))  # diffusers' own reading of the Wan layout
    diffs = wan_differences(ours, ref)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_wan21_family_rule(tmp_path: Path) -> None:
    """AutoencoderKLWan with Wan 2.1's statistics is wan2.1 and is written back as AutoencoderKLWan; Qwen-Image's class
    stays qwenimage; a file in Wan's names is qwenimage (the same statistics) unless family= says wan2.1."""
    assert WAN21.latents_mean == preset("qwenimage").latents_mean and WAN21.latents_std == preset("qwenimage").latents_std
    # Qwen-Image's folder: qwenimage, written back as its own class.
    torch.manual_seed(0)
    AutoencoderKLQwenImage(base_dim=8).save_pretrained(tmp_path / "q")
    qwen = vaekit.load(tmp_path / "q")
    assert qwen.config.arch == "qwenimage" and qwen.config.family == ""  # a smaller network than the preset's
    save(qwen, tmp_path / "qv")
    assert json.loads((tmp_path / "qv" / "config.json").read_text())["_class_name"] == "AutoencoderKLQwenImage"
    # AutoencoderKLWan with other statistics: no published family (same network; written as AutoencoderKLQwenImage).
    wan21_reference(latents_mean=[0.0] * 16, latents_std=[2.0] * 16).save_pretrained(tmp_path / "c")
    custom = vaekit.load(tmp_path / "c")
    assert custom.config.family == "" and custom.config.latents_std == (2.0,) * 16
    # A bare file in Wan's names (Wan2.1_VAE.pth as Wan ships it, a pickled state dict): qwenimage, or wan2.1 when told.
    ref = wan21_reference()
    ref.save_pretrained(tmp_path / "d")
    save(vaekit.load(tmp_path / "d"), tmp_path / "vae.safetensors", format="single-file")
    torch.save(load_file(tmp_path / "vae.safetensors"), tmp_path / "Wan2.1_VAE.pth")
    ck = read_checkpoint(tmp_path / "Wan2.1_VAE.pth")
    assert ck.config.family == "qwenimage" and ck.normalisation_source.startswith("qwenimage, from its key layout")
    assert ck.config.latents_mean == WAN21.latents_mean
    told = vaekit.load(tmp_path / "Wan2.1_VAE.pth", family="wan2.1")
    assert told.config.family == "wan2.1" and max(wan_differences(told, ref).values()) <= TOLERANCE
    assert main(["convert", str(tmp_path / "Wan2.1_VAE.pth"), str(tmp_path / "w"), "--family", "wan2.1"]) == 0
    assert json.loads((tmp_path / "w" / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"


def test_wan21_published_config_is_the_preset() -> None:
    """AutoencoderKLWan's default config (Wan 2.1's release, Wan-AI/Wan2.1-*-Diffusers) is the wan2.1 preset, module for module."""
    with torch.device("meta"):
        ref = AutoencoderKLWan()
        ours = Autoencoder(WAN21)
    config, stated = wan22_layout.config_from_diffusers({**ref.config, "_class_name": "AutoencoderKLWan"})  # as config.json has it
    assert stated and config == WAN21
    bare = {k: v for k, v in ref.config.items() if not k.startswith("latents_")}  # diffusers' defaults are Wan 2.1's
    assert wan22_layout.config_from_diffusers({**bare, "_class_name": "AutoencoderKLWan"}) == (WAN21, True)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


# ---- Wan 2.2 -------------------------------------------------------------------------------------------------

WAN22_ROUTES = ["diffusers folder -> vaekit", "vaekit folder -> diffusers", "vaekit single file (Wan 2.2 names) -> convert_vae_22",
                "vaekit single file -> vaekit"]  # fmt: skip


@pytest.mark.parametrize("route", WAN22_ROUTES)
def test_wan22_matches_diffusers_through_every_route(route: str, tmp_path: Path) -> None:
    ref = wan22_reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config.arch == "wan22" and ours.config.family == "wan2.2" and ours.factor == 16
    assert ours.config == WAN22.replace(block_channels=(8, 16, 32, 32), decoder_block_channels=(12, 24, 48, 48))
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        written = json.loads((tmp_path / "v" / "config.json").read_text())
        assert written["_class_name"] == "AutoencoderKLWan" and written["is_residual"] and written["patch_size"] == 2
        ref = AutoencoderKLWan.from_pretrained(tmp_path / "v").eval()
    elif route.startswith("vaekit single file"):
        save(ours, tmp_path / "vae.safetensors", format="single-file")
        wan = load_file(tmp_path / "vae.safetensors")
        # Wan 2.2's vae2_2.py: a level's Sequential holds its residual blocks, then its resample.
        assert {"encoder.conv1.weight", "encoder.downsamples.0.downsamples.1.residual.2.weight", "encoder.downsamples.1.downsamples.2.resample.1.weight",
                "encoder.downsamples.1.downsamples.2.time_conv.weight", "encoder.downsamples.1.downsamples.0.shortcut.weight",
                "decoder.upsamples.0.upsamples.3.time_conv.weight", "decoder.upsamples.2.upsamples.3.resample.1.bias",
                "encoder.middle.1.to_qkv.weight", "decoder.middle.2.residual.3.gamma", "decoder.head.2.weight", "conv2.bias"} <= set(wan)  # fmt: skip
        if route.endswith("vaekit"):
            back = vaekit.load(tmp_path / "vae.safetensors")
            assert back.config == ours.config
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
            return
        converted = convert_vae_22(wan)  # diffusers' renaming of Wan 2.2's names
        assert set(converted) == set(ref.state_dict())
        ref = wan22_reference()
        ref.load_state_dict(converted)
    diffs = wan_differences(ours, ref)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_wan22_published_config_is_the_preset() -> None:
    """scripts/convert_wan_to_diffusers.py's vae22_diffusers_config (its clip_output is no option of diffusers'
    class) is the wan2.2 preset, module for module with diffusers' class at full size (on the meta device)."""
    published = {"_class_name": "AutoencoderKLWan", "base_dim": 160, "z_dim": 48, "is_residual": True, "in_channels": 12,
                 "out_channels": 12, "decoder_base_dim": 256, "scale_factor_temporal": 4, "scale_factor_spatial": 16,
                 "patch_size": 2, "latents_mean": list(WAN22.latents_mean), "latents_std": list(WAN22.latents_std),
                 "clip_output": False}  # fmt: skip
    config, stated = wan22_layout.config_from_diffusers(published)
    assert stated and config == WAN22 and WAN22.factor == 16 and len(WAN22.latents_mean) == len(WAN22.latents_std) == 48
    with torch.device("meta"):
        ref = AutoencoderKLWan(**{k: v for k, v in published.items() if not k.startswith("_") and k != "clip_output"})
        ours = Autoencoder(WAN22)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_wan22_wider_matches_diffusers() -> None:
    """Wider levels and the release's 1:1.6 encoder:decoder ratio (base 40 and 64, a quarter of the release's)."""
    ref = wan22_reference(base=40, decoder=64, layers=1)
    ours = Autoencoder(WAN22.replace(block_channels=(40, 80, 160, 160), decoder_block_channels=(64, 128, 256, 256), layers_per_block=1)).eval()
    ours.load_state_dict(ref.state_dict())
    assert max(wan_differences(ours, ref, size=(32, 32)).values()) <= TOLERANCE


def test_48_channels_are_never_taken_for_16(tmp_path: Path) -> None:
    """The variant comes from config.json's is_residual or the tensors' names and shapes, never from a file name."""
    ref = wan22_reference()
    ref.save_pretrained(tmp_path / "d")
    save(vaekit.load(tmp_path / "d"), tmp_path / "vae.safetensors", format="single-file")
    bare = load_file(tmp_path / "vae.safetensors")  # as Wan ships it: no vaekit metadata
    save_file(bare, tmp_path / "wan_2.1_vae.safetensors")  # a misleading name changes nothing
    torch.save(bare, tmp_path / "Wan2.2_VAE.pth")
    for path in (tmp_path / "wan_2.1_vae.safetensors", tmp_path / "Wan2.2_VAE.pth"):
        ck = read_checkpoint(path)
        assert ck.config.arch == "wan22" and ck.config.latent_channels == 48 and ck.config.family == "wan2.2"
        assert "Wan 2.2 layout" in ck.format and ck.normalisation_source.startswith("wan2.2, from its key layout")
        assert ck.config == WAN22.replace(block_channels=(8, 16, 32, 32), decoder_block_channels=(12, 24, 48, 48))
    assert max(wan_differences(vaekit.load(tmp_path / "Wan2.2_VAE.pth"), ref).values()) <= TOLERANCE
    with pytest.raises(ValueError, match=r"family 'wan2.1' has 16-channel latents .*; this checkpoint has 48-channel latents \(Wan 2.2 family\)"):
        read_checkpoint(tmp_path / "Wan2.2_VAE.pth", family="wan2.1")
    # A residual AutoencoderKLWan with 16 channels is Wan 2.2's network with no published statistics: not wan2.1's.
    wan22_reference(z=16, stats=None).save_pretrained(tmp_path / "d16")
    small = vaekit.load(tmp_path / "d16")
    assert small.config.arch == "wan22" and small.config.latent_channels == 16 and small.config.family == ""
    save(small, tmp_path / "16.safetensors", format="single-file")
    save_file(load_file(tmp_path / "16.safetensors"), tmp_path / "bare16.safetensors")
    with pytest.warns(UserWarning, match="latent normalisation unknown"):
        ck = read_checkpoint(tmp_path / "bare16.safetensors")
    assert ck.config.arch == "wan22" and ck.config.family == "" and ck.config.latent_norm == "affine"
    # And the 16-channel Wan 2.1 layout stays Wan 2.1's.
    wan21_reference().save_pretrained(tmp_path / "d21")
    assert vaekit.load(tmp_path / "d21").config.arch == "qwenimage"


def test_wan22_tiles_like_it_does_untiled(tmp_path: Path, capsys) -> None:
    ref = wan22_reference(layers=1)
    ref.save_pretrained(tmp_path / "d")
    model = vaekit.load(tmp_path / "d")
    x = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = model.to_latent(x)
        assert tuple(z.shape) == (1, 48, 6, 4)
        assert (model.to_latent(x, tile=32) - z).abs().max() < 1e-5
        assert (model.from_latent(z, tile=32) - model.from_latent(z)).abs().max() < 1e-5
    save(model, tmp_path / "vae.safetensors", format="single-file")
    assert main(["inspect", str(tmp_path / "vae.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "family         wan2.2" in out and "normalisation  (z - mean[c]) * 1 / std[c]" in out


def test_wan22_trains(tmp_path: Path) -> None:
    from vaekit.train import TrainConfig, train

    small = WAN22.replace(block_channels=(8, 16, 16), decoder_block_channels=(8, 16, 32), temporal_downsample=(False, True),
                          layers_per_block=1)  # 3 levels: 8x with the 2x2 patches  # fmt: skip
    result = train(TrainConfig(data="samples", out=str(tmp_path / "run"), config=small.to_dict(), steps=8, batch_size=2,
                               resolution=32, val_resolution=32, lr=3e-4, warmup=1, sample_every=0), progress=False)  # fmt: skip
    assert result.metrics["final"]["psnr"] > result.metrics["initial"]["psnr"]  # 10.35 -> 11.07 dB as measured
    back = vaekit.load(result.model)
    assert back.config.arch == "wan22" and back.factor == 8 and back.config.decoder_block_channels == (8, 16, 32)


def test_presets_lists_the_wan_families(capsys) -> None:
    assert main(["presets"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["wan2.1"][2:4] == ["8x", "16"] and rows["wan2.2"][2:4] == ["16x", "48"]
    assert preset("wan22") == WAN22 and preset("Wan2.1") == WAN21


# ---- the rows of docs/CHECKPOINTS.md: python tests/test_wan.py ---------------------------------------------


def parity_table() -> None:
    """Print the per-route differences these tests bound, 1 thread, fp32."""
    import tempfile

    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    torch.set_num_threads(1)
    print("| family | route | mean | logvar | decode | to_latent | from_latent |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family, build in (("Wan 2.1", wan21_reference), ("Wan 2.2", wan22_reference)):
            t = Path(tmp) / family
            ref = build()
            ref.save_pretrained(t / "d")
            ours = vaekit.load(t / "d")
            save(ours, t / "v", format="diffusers")
            save(ours, t / "file.safetensors", format="single-file")
            wan = load_file(t / "file.safetensors")
            converted = build()
            converted.load_state_dict(convert_wan_vae_to_diffusers(wan) if family == "Wan 2.1" else convert_vae_22(wan))
            routes = {"diffusers folder -> vaekit": (ours, ref),
                      "vaekit folder -> diffusers": (ours, AutoencoderKLWan.from_pretrained(t / "v").eval()),
                      "vaekit Wan-layout file -> vaekit": (vaekit.load(t / "file.safetensors"), ref),
                      "vaekit Wan-layout file -> " + ("diffusers' convert_wan_vae_to_diffusers" if family == "Wan 2.1" else "convert_vae_22's renaming (transcribed)"): (ours, converted)}  # fmt: skip
            if family == "Wan 2.2":
                wide = wan22_reference(base=40, decoder=64, layers=1)
                full = Autoencoder(WAN22.replace(block_channels=(40, 80, 160, 160), decoder_block_channels=(64, 128, 256, 256),
                                                 layers_per_block=1)).eval()  # fmt: skip
                full.load_state_dict(wide.state_dict())
                routes["a quarter of the release's widths, diffusers weights -> vaekit"] = (full, wide)
            for route, (a, b) in routes.items():
                d = wan_differences(a, b, size=(32, 32) if "widths" in route else (32, 48))
                print(f"| {family} | {route} | " + " | ".join(f"{d[k]:.1e}" for k in ("mean", "logvar", "decode", "to_latent", "from_latent")) + " |")


if __name__ == "__main__":
    parity_table()
