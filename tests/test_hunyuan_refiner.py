"""Hunyuan Image 2.1's refiner VAE (HunyuanVideo-1.5's causal VAE: the hunyuanvideo15 architecture) on one frame, against diffusers' AutoencoderKLHunyuanImageRefiner and AutoencoderKLHunyuanVideo15
through every file route, with random weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderKLHunyuanImageRefiner, AutoencoderKLHunyuanVideo15
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset
from vaekit.checkpoints import read_checkpoint, save
from vaekit.layouts import hunyuanvideo15 as layout
from vaekit.model import Autoencoder

TOLERANCE = 1e-4
REFINER = preset("hunyuanimage-refiner")
SMALL = (8, 16, 32, 64, 64)  # the release's 5 levels and 16x (128-1024), an eighth as wide


def reference(cls=AutoencoderKLHunyuanImageRefiner, widths=SMALL, layers: int = 1, latent: int = 8, ratio: int = 16, **kw):
    torch.manual_seed(0)
    ref = cls(block_out_channels=widths, layers_per_block=layers, latent_channels=latent, spatial_compression_ratio=ratio, **kw)
    return perturb(ref, 0.02).eval()


@torch.no_grad()
def differences(ours: Autoencoder, ref, size: tuple[int, int] = (32, 48), batch: int = 2) -> dict[str, float]:
    """One image as a one-frame video in diffusers; the refiner pipeline's scaling (HunyuanImageRefinerPipeline:
    latents * scaling_factor, and / scaling_factor before decoding). AutoencoderKLHunyuanVideo15 only runs batch 1:
    its causal attention mask (batch, N, N) does not broadcast against (batch, 1, N, N) queries (diffusers 0.42.1)."""
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    q = ref.encode(x[:, :, None]).latent_dist
    p = ours.encode(x)
    s = ref.config.scaling_factor
    z = q.mean[:, :, 0] * s
    return {
        "mean": (p.mean - q.mean[:, :, 0]).abs().max().item(),
        "logvar": (p.logvar - q.logvar[:, :, 0]).abs().max().item(),
        "decode": (ours.decode(q.mean[:, :, 0]) - ref.decode(q.mean).sample[:, :, 0]).abs().max().item(),
        "to_latent": (ours.to_latent(x) - z).abs().max().item(),
        "from_latent": (ours.from_latent(z) - ref.decode((z / s)[:, :, None]).sample[:, :, 0]).abs().max().item(),
    }


def convert_refiner_vae(old: dict[str, torch.Tensor], widths, layers: int) -> dict[str, torch.Tensor]:
    """diffusers' scripts/convert_hunyuan_image_to_diffusers.py `convert_hunyuan_image_refiner_vae_checkpoint_to_diffusers`,
    transcribed loop for loop (the script is not part of the package): Tencent's refiner names -> diffusers'. Like the
    script it pops every name it knows; what is left over is returned too."""
    old, new = dict(old), {}
    for part, blocks, block, sample, n in (("encoder", "down_blocks", "down", "downsample", layers), ("decoder", "up_blocks", "up", "upsample", layers + 1)):
        for name in ("conv_in.conv.weight", "conv_in.conv.bias", "norm_out.gamma", "conv_out.conv.weight", "conv_out.conv.bias"):
            new[f"{part}.{name}"] = old.pop(f"{part}.{name}")
        for i in range(len(widths)):
            for j in range(n):
                for name in ("norm1.gamma", "conv1.conv.weight", "conv1.conv.bias", "norm2.gamma", "conv2.conv.weight", "conv2.conv.bias"):
                    new[f"{part}.{blocks}.{i}.resnets.{j}.{name}"] = old.pop(f"{part}.{block}.{i}.block.{j}.{name}")
            if f"{part}.{block}.{i}.{sample}.conv.conv.weight" in old:
                for name in ("weight", "bias"):
                    new[f"{part}.{blocks}.{i}.{sample}rs.0.conv.conv.{name}"] = old.pop(f"{part}.{block}.{i}.{sample}.conv.conv.{name}")
        for k in (1, 2):
            for name in ("norm1.gamma", "conv1.conv.weight", "conv1.conv.bias", "norm2.gamma", "conv2.conv.weight", "conv2.conv.bias"):
                new[f"{part}.mid_block.resnets.{k - 1}.{name}"] = old.pop(f"{part}.mid.block_{k}.{name}")
        new[f"{part}.mid_block.attentions.0.norm.gamma"] = old.pop(f"{part}.mid.attn_1.norm.gamma")
        for theirs, ours in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "proj_out")):
            for name in ("weight", "bias"):
                new[f"{part}.mid_block.attentions.0.{ours}.{name}"] = old.pop(f"{part}.mid.attn_1.{theirs}.{name}")
    return {**new, **old}


ROUTES = ["diffusers refiner folder -> vaekit", "diffusers HunyuanVideo15 folder -> vaekit", "vaekit folder -> diffusers",
          "vaekit single file (Tencent names) -> diffusers' conversion", "vaekit single file -> vaekit"]  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
def test_matches_diffusers_through_every_route(route: str, tmp_path: Path) -> None:
    cls = AutoencoderKLHunyuanVideo15 if "HunyuanVideo15" in route else AutoencoderKLHunyuanImageRefiner
    ref = reference(cls)
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config.arch == "hunyuanvideo15" and ours.factor == 16 and ours.config.latent_channels == 8
    assert ours.config == REFINER.replace(block_channels=SMALL, layers_per_block=1, latent_channels=8,
                                          family="hunyuanimage-refiner" if cls is AutoencoderKLHunyuanImageRefiner else "")  # fmt: skip
    batch = 1 if cls is AutoencoderKLHunyuanVideo15 else 2
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        assert json.loads((tmp_path / "v" / "config.json").read_text())["_class_name"] == "AutoencoderKLHunyuanImageRefiner"
        ref = AutoencoderKLHunyuanImageRefiner.from_pretrained(tmp_path / "v").eval()
    elif route.startswith("vaekit single file"):
        save(ours, tmp_path / "vae.safetensors", format="single-file")
        tencent = load_file(tmp_path / "vae.safetensors")
        assert {"encoder.down.0.block.0.norm1.gamma", "encoder.down.3.downsample.conv.conv.weight", "decoder.up.0.block.1.conv2.conv.bias",
                "decoder.up.3.upsample.conv.conv.weight", "encoder.mid.attn_1.q.weight", "decoder.mid.block_2.norm2.gamma",
                "decoder.conv_out.conv.weight"} <= set(tencent)  # fmt: skip
        if route.endswith("vaekit"):
            back = vaekit.load(tmp_path / "vae.safetensors")
            assert back.config == ours.config
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
            return
        converted = convert_refiner_vae(tencent, SMALL, 1)
        assert set(converted) == set(ref.state_dict())
        ref = reference()
        ref.load_state_dict(converted)
    diffs = differences(ours, ref, batch=batch)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_fewer_resamplings_and_width_changes_match_diffusers(tmp_path: Path) -> None:
    """8x over 5 levels (the last two without resampling, one changing width: ResNet shortcut convs), time halved
    twice: every branch of diffusers' constructor; the shortcut's Tencent name round-trips."""
    ref = reference(widths=(8, 16, 32, 32, 64), ratio=8)
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.factor == 8 and ours.config.downsample_levels == 3 and ours.config.temporal_downsample == (False, True, True)
    assert "encoder.down_blocks.4.resnets.0.conv_shortcut.weight" in ours.state_dict()
    assert max(differences(ours, ref).values()) <= TOLERANCE
    save(ours, tmp_path / "vae.safetensors", format="single-file")
    save_file(load_file(tmp_path / "vae.safetensors"), tmp_path / "bare.safetensors")  # no vaekit metadata
    assert "encoder.down.4.block.0.nin_shortcut.weight" in load_file(tmp_path / "bare.safetensors")
    with pytest.warns(UserWarning, match="latent normalisation unknown"):  # no published network: nothing states it
        back = vaekit.load(tmp_path / "bare.safetensors")
    assert back.config.replace(scaling_factor=1.03682, family="") == ours.config.replace(family="")  # shapes say all but the scale
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


def test_quarter_release_width_matches_diffusers() -> None:
    """A quarter of the release's widths (32-256) with its 32 latent channels: the encoder's group-mean shortcut over 8
    channels per latent channel, the decoder's input repeated 8 times."""
    ref = reference(widths=(32, 64, 128, 256, 256), latent=32)
    ours = Autoencoder(REFINER.replace(block_channels=(32, 64, 128, 256, 256), layers_per_block=1)).eval()
    ours.load_state_dict(ref.state_dict())
    assert max(differences(ours, ref, size=(32, 32)).values()) <= TOLERANCE


@pytest.mark.parametrize("cls", [AutoencoderKLHunyuanImageRefiner, AutoencoderKLHunyuanVideo15])
def test_published_config_is_the_preset(cls) -> None:
    """The classes' defaults (the refiner's conversion script builds its VAE with them) are the preset, module for
    module at full size (on the meta device); only the refiner's class names the family."""
    with torch.device("meta"):
        ref = cls()
        ours = Autoencoder(REFINER)
    config, stated = layout.config_from_diffusers({**ref.config, "_class_name": cls.__name__})
    assert stated and config == (REFINER if cls is AutoencoderKLHunyuanImageRefiner else REFINER.replace(family=""))
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert REFINER.factor == 16 and REFINER.latent_channels == 32 and REFINER.scaling_factor == 1.03682


def test_32_channels_at_16x_are_never_taken_for_hunyuan_image_or_flux2(tmp_path: Path) -> None:
    """The variant comes from config.json or the tensors' names and shapes, never from a file name: a 32-channel
    16x file is neither Hunyuan Image 2.1's 64-channel 32x VAE nor FLUX.2's 32-channel one."""
    ref = reference(latent=32, widths=(8, 16, 32, 64, 64))
    ref.save_pretrained(tmp_path / "d")
    save(vaekit.load(tmp_path / "d"), tmp_path / "vae.safetensors", format="single-file")
    bare = load_file(tmp_path / "vae.safetensors")  # as Tencent ships it, under `vae.` in a training checkpoint
    torch.save({"state_dict": {f"vae.{k}": v for k, v in bare.items()}}, tmp_path / "pytorch_model.pt")
    save_file(bare, tmp_path / "hunyuanimage2.1_vae.safetensors")
    save_file(bare, tmp_path / "flux2-vae.safetensors")
    for path in (tmp_path / "pytorch_model.pt", tmp_path / "hunyuanimage2.1_vae.safetensors", tmp_path / "flux2-vae.safetensors"):
        with pytest.warns(UserWarning, match="latent normalisation unknown"):  # a smaller network than either release
            ck = read_checkpoint(path)
        assert ck.config.arch == "hunyuanvideo15" and ck.config.latent_channels == 32 and ck.config.factor == 16
        assert "Tencent Hunyuan Image refiner" in ck.format and ck.config.temporal_downsample == (False, False, True, True)
    told = vaekit.load(tmp_path / "flux2-vae.safetensors", family="hunyuanimage-refiner")
    assert told.config.family == "hunyuanimage-refiner" and told.config.scaling_factor == 1.03682
    assert max(differences(vaekit.load(tmp_path / "pytorch_model.pt", family="hunyuanimage-refiner"), ref).values()) <= TOLERANCE
    with pytest.raises(ValueError, match="family 'hunyuanimage' has 64-channel latents"):
        read_checkpoint(tmp_path / "pytorch_model.pt", family="hunyuanimage")
    with pytest.raises(ValueError, match="family 'flux2' needs the latent BatchNorm"):
        read_checkpoint(tmp_path / "pytorch_model.pt", family="flux2")
    # And the other layouts stay theirs.
    from diffusers import AutoencoderKLHunyuanImage

    AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, sample_size=64, block_out_channels=(32, 64, 64), latent_channels=16, layers_per_block=1,
                              spatial_compression_ratio=4).save_pretrained(tmp_path / "h21")  # fmt: skip
    assert vaekit.load(tmp_path / "h21").config.arch == "hunyuanimage"


def test_full_size_file_is_read_as_the_refiner() -> None:
    """A bare file of the released size (shapes only, on the meta device): the tensors give the preset's network, and
    with nothing stating the scale the refiner's is assumed, and said so."""
    from vaekit.checkpoints import _Found, _normalisation

    with torch.device("meta"):
        native = Autoencoder(REFINER).state_dict()
    tencent = layout.to_single_file(native, REFINER)
    assert "encoder.down.2.downsample.conv.conv.weight" in tencent and layout.recognise(tencent).startswith("Tencent")
    config, _ = layout.config_from_tensors(layout.to_native(tencent))
    assert config == REFINER.replace(scaling_factor=1.0, family="")
    found = _Found(tensors={}, format="file", notes=[])
    with pytest.warns(UserWarning, match=r"assumed hunyuanimage-refiner: \(z - 0\) \* 1.03682; pass family"):
        said, _ = _normalisation(config, found, None)
    assert said == REFINER


def test_tiles_like_it_does_untiled(tmp_path: Path) -> None:
    ref = reference()
    ref.save_pretrained(tmp_path / "d")
    model = vaekit.load(tmp_path / "d")
    x = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = model.to_latent(x)
        assert tuple(z.shape) == (1, 8, 6, 4)
        assert (model.to_latent(x, tile=32) - z).abs().max() < 1e-5
        assert (model.from_latent(z, tile=32) - model.from_latent(z)).abs().max() < 1e-5


def test_presets_and_aliases() -> None:
    assert preset("hunyuanimage2.1-refiner") == REFINER
    assert preset("hunyuanimage3").arch == "hunyuanimage3"  # Hunyuan Image 3.0's VAE is another network (module docstring)
    assert re.search(r"Hunyuan Image 2\.1's refiner", vaekit.config.describe_channels(32, "latent"))


# ---- the rows of docs/CHECKPOINTS.md: python tests/test_hunyuan_refiner.py ---------------------------------


def parity_table() -> None:
    """Print the per-route differences these tests bound, 1 thread, fp32."""
    import tempfile

    torch.set_num_threads(1)
    print("| route | mean | logvar | decode | to_latent | from_latent |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ref = reference()
        ref.save_pretrained(t / "d")
        ours = vaekit.load(t / "d")
        video = reference(AutoencoderKLHunyuanVideo15)
        video.save_pretrained(t / "dv")
        save(ours, t / "v", format="diffusers")
        save(ours, t / "file.safetensors", format="single-file")
        converted = reference()
        converted.load_state_dict(convert_refiner_vae(load_file(t / "file.safetensors"), SMALL, 1))
        fewer = reference(widths=(8, 16, 32, 32, 64), ratio=8)
        fewer.save_pretrained(t / "f")
        routes = {"AutoencoderKLHunyuanImageRefiner folder -> vaekit": (ours, ref, 2),
                  "AutoencoderKLHunyuanVideo15 folder -> vaekit (batch 1)": (vaekit.load(t / "dv"), video, 1),
                  "vaekit folder -> AutoencoderKLHunyuanImageRefiner": (ours, AutoencoderKLHunyuanImageRefiner.from_pretrained(t / "v").eval(), 2),
                  "vaekit Tencent-layout file -> vaekit": (vaekit.load(t / "file.safetensors"), ref, 2),
                  "vaekit Tencent-layout file -> the conversion script's renaming (transcribed)": (ours, converted, 2),
                  "8x over 5 levels, shortcut convs": (vaekit.load(t / "f"), fewer, 2)}  # fmt: skip
        wide = reference(widths=(32, 64, 128, 256, 256), latent=32)
        quarter = Autoencoder(REFINER.replace(block_channels=(32, 64, 128, 256, 256), layers_per_block=1)).eval()
        quarter.load_state_dict(wide.state_dict())
        routes["a quarter of the release's widths, 32 channels, diffusers weights -> vaekit"] = (quarter, wide, 2)
        for route, (a, b, batch) in routes.items():
            d = differences(a, b, batch=batch, size=(32, 32) if "quarter" in route else (32, 48))
            print(f"| {route} | " + " | ".join(f"{d[k]:.1e}" for k in ("mean", "logvar", "decode", "to_latent", "from_latent")) + " |")


if __name__ == "__main__":
    parity_table()
