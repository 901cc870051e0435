"""DC-AE (arch "dcae", diffusers' AutoencoderDC): small random models of SANA's f32c32 shape (stride-2 conv /
nearest resampling, multi-scale attention) and of the in/mix releases' (a stem that halves the side,
BatchNorm decoder ResBlocks), through a diffusers folder both ways and MIT Han Lab's single file, against
diffusers; the published presets' architecture against diffusers' conversion configs, on the meta device."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderDC
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers, infer_diffusers_model_type
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset
from vaekit.checkpoints import read_checkpoint, save
from vaekit.layouts import dcae as layout
from vaekit.model import Autoencoder

TOLERANCE = 1e-4

# diffusers' AutoencoderDC kwargs of two small models, one per released shape.
TINY = {
    "sana": dict(
        latent_channels=8, attention_head_dim=16, encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        encoder_block_out_channels=[16, 32, 32, 64], decoder_block_out_channels=[16, 32, 32, 64],
        encoder_layers_per_block=[1, 1, 2, 2], decoder_layers_per_block=[1, 2, 2, 2],
        encoder_qkv_multiscales=[[], [], [5], [5]], decoder_qkv_multiscales=[[], [], [5], [5]],
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    ),
    "mix": dict(
        latent_channels=16, attention_head_dim=32, encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 2,
        decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 2,
        encoder_block_out_channels=[8, 16, 32, 32, 64], decoder_block_out_channels=[8, 16, 32, 32, 64],
        encoder_layers_per_block=[0, 1, 2, 1, 1], decoder_layers_per_block=[0, 1, 2, 1, 1],
        encoder_qkv_multiscales=[[]] * 5, decoder_qkv_multiscales=[[]] * 5,
        decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 2, decoder_act_fns=["relu"] * 3 + ["silu"] * 2,
        scaling_factor=0.4538,
    ),
}  # fmt: skip


def reference(kind: str) -> AutoencoderDC:
    torch.manual_seed(0)
    ref = perturb(AutoencoderDC(**TINY[kind]), 0.02)
    g = torch.Generator().manual_seed(1)
    for m in ref.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return ref.eval()


@torch.no_grad()
def differences(ours: Autoencoder, ref: AutoencoderDC, size: tuple[int, int]) -> dict[str, float]:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latent = ref.encode(x).latent
    z = latent * ref.config.scaling_factor  # SanaPipeline's scaling
    return {
        "encode": (ours.encode(x).mean - latent).abs().max().item(),
        "decode": (ours.decode(latent) - ref.decode(latent).sample).abs().max().item(),
        "to_latent": (ours.to_latent(x) - z).abs().max().item(),
        "from_latent": (ours.from_latent(z) - ref.decode(z / ref.config.scaling_factor).sample).abs().max().item(),
    }


# Latent sides: 4x6 and 4x4 positions at 8x (SANA-like; 16 <= head_dim is diffusers' quadratic branch), 2x3 at 16x
# (quadratic too, 6 <= 32) and 4x6 one level up (linear).
SIZES = {"sana": [(32, 48), (32, 32)], "mix": [(32, 48)]}


@pytest.mark.parametrize("kind", ["sana", "mix"])
@pytest.mark.parametrize("route", ["diffusers folder -> vaekit", "vaekit folder -> diffusers", "MIT single file"])
def test_dcae_matches_diffusers(kind: str, route: str, tmp_path: Path) -> None:
    ref = reference(kind)
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d").eval()
    c = ours.config
    assert c.arch == "dcae" and c.kind == "ae" and c.scaling_factor == TINY[kind]["scaling_factor"]
    assert ours.factor == {"sana": 8, "mix": 16}[kind] and c.resample == {"sana": "conv", "mix": "shuffle"}[kind]
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        ref = AutoencoderDC.from_pretrained(tmp_path / "v").eval()
    elif route == "MIT single file":
        save(ours, tmp_path / "model.safetensors", format="single-file")
        names = load_file(tmp_path / "model.safetensors")
        assert any(k.endswith("context_module.main.qkv.conv.weight") for k in names) and "decoder.project_in.main.conv.weight" in names
        # diffusers' own loader of MIT's files reads ours back into its class, strictly.
        ref = AutoencoderDC(**TINY[kind])
        ref.load_state_dict(convert_autoencoder_dc_checkpoint_to_diffusers(dict(names)), strict=True)
        ref.eval()
        save_file(names, tmp_path / "bare.safetensors")  # MIT's file has no vaekit config: the shapes tell it
        for file in ("model.safetensors", "bare.safetensors"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the bare file's normalisation is assumed (a custom size: scale 1), said
                back = vaekit.load(tmp_path / file)
            assert _architecture(back.config) == _architecture(c), (back.config, c)
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
        assert "MIT Han Lab DC-AE layout" in read_checkpoint(tmp_path / "model.safetensors").format
        if kind == "mix":  # no multi-scale weights: the head width is not in the shapes; the released 32 is assumed, said
            with pytest.warns(UserWarning, match="latent normalisation unknown"):
                notes = read_checkpoint(tmp_path / "bare.safetensors").notes
            assert any("attention_head_dim 32 assumed" in n for n in notes)
    with torch.no_grad():
        assert ref.decode(ref.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latent).sample.abs().mean() > 0.05  # not trivially zero
    for size in SIZES[kind]:
        diffs = differences(ours, ref, size)
        assert max(diffs.values()) <= TOLERANCE, (size, diffs)


def _architecture(c) -> dict:
    return {k: v for k, v in c.to_dict().items() if k not in ("scaling_factor", "shift_factor", "family")}


# diffusers' scripts/convert_dcae_to_diffusers.py, get_ae_config, for the released variants of each preset.
def _converter_config(levels: int, latent: int) -> dict:
    if levels == 6:
        return dict(latent_channels=32, encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
                    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
                    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024), decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
                    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
                    decoder_act_fns="silu", scaling_factor=0.41407)  # fmt: skip
    return dict(latent_channels=latent, encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * (levels - 3),
                decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * (levels - 3),
                encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024, 2048, 2048][:levels],
                decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024, 2048, 2048][:levels],
                encoder_layers_per_block=[0, 4, 8] + [2] * (levels - 3), decoder_layers_per_block=[0, 5, 10] + [2] * (levels - 3),
                encoder_qkv_multiscales=((),) * levels, decoder_qkv_multiscales=((),) * levels,
                decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * (levels - 3), decoder_act_fns=["relu"] * 3 + ["silu"] * (levels - 3),
                scaling_factor={7: 0.4538, 8: 0.3620}[levels])  # fmt: skip


@pytest.mark.parametrize("name,levels,latent,diffusers_type", [("dc-ae-f32c32", 6, 32, "autoencoder-dc-f32c32-sana"),
                                                                  ("dc-ae-f64c128", 7, 128, "autoencoder-dc-f64c128"),
                                                                  ("dc-ae-f128c512", 8, 512, "autoencoder-dc-f128c512")])  # fmt: skip
def test_presets_are_the_released_architectures(name: str, levels: int, latent: int, diffusers_type: str) -> None:
    d = _converter_config(levels, latent)
    with torch.device("meta"):
        ref, ours = AutoencoderDC(**d), Autoencoder(preset(name))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    cfg = preset(name)
    assert cfg.factor == 2 ** (levels - 1) and cfg.latent_channels == latent and cfg.scaling_factor == d["scaling_factor"]
    config, _ = layout.config_from_diffusers({"_class_name": "AutoencoderDC", **d})
    assert config == cfg.replace(family="")
    # MIT's file of it: diffusers recognises the variant from our names, and vaekit reads the preset off the shapes.
    mit = layout.to_single_file(ours.state_dict(), cfg)
    assert infer_diffusers_model_type(mit) == diffusers_type
    from_shapes, _ = layout.config_from_tensors(layout.to_native(mit))
    assert _architecture(from_shapes) == _architecture(cfg)
    # With no config, the normalisation rule assumes the preset of that architecture, and says so.
    from vaekit.checkpoints import _Found, _normalisation

    with pytest.warns(UserWarning, match=f"assumed {name}"):
        assumed, _ = _normalisation(from_shapes, _Found({}, "file", layout=layout), None)
    assert assumed == cfg


def test_tiling_is_refused_with_the_reason() -> None:
    ref = reference("sana")
    model = Autoencoder(layout.config_from_diffusers(dict(ref.config))[0]).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.to_latent(x)
        for call in (lambda: model.encode(x, tile=16), lambda: model.to_latent(x, tile="auto"), lambda: model.decode(z, tile=16)):
            with pytest.raises(ValueError, match="linear attention spans the whole image"):
                call()
        assert model.from_latent(z, tile=None).shape == x.shape  # untiled runs as before


def test_dcae_options_are_checked() -> None:
    cfg = preset("dc-ae-f32c32")
    with pytest.raises(ValueError, match="one entry per level"):
        cfg.replace(encoder_layers=(2, 2))
    with pytest.raises(ValueError, match="kind 'ae'"):
        cfg.replace(kind="vae")
    with pytest.raises(ValueError, match="options of the dcae architecture"):
        preset("sd1").replace(block_types=("ResBlock",) * 4)
    with pytest.raises(NotImplementedError, match="pixel_unshuffle"):
        layout.config_from_diffusers({"downsample_block_type": "conv"})


def test_bench_times_it_against_autoencoder_dc() -> None:
    from vaekit.speed import bench, diffusers_peer

    ref = reference("sana")
    model = Autoencoder(layout.config_from_diffusers(dict(ref.config))[0]).eval()
    model.load_state_dict(ref.state_dict())
    assert type(diffusers_peer(model, torch.float32)).__name__ == "AutoencoderDC"
    rows, _ = bench(model, [32], [1], ["fp32"], repeats=1)
    assert [r.op for r in rows] == ["encode", "decode"]
    assert all(r.peer_seconds > 0 and r.max_abs_diff < TOLERANCE for r in rows), rows


def test_commands_work_for_dcae(tmp_path: Path, capsys) -> None:
    """inspect, convert, reconstruct, eval and analyze on a small random DC-AE saved as MIT's single file."""
    import json

    import numpy as np
    from PIL import Image

    from vaekit.cli import main

    (tmp_path / "photos").mkdir()
    g = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{name}.png")
    config = preset("dc-ae-f32c32").replace(
        block_channels=(16, 32, 32, 64), block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_layers=(1, 1, 1, 1), decoder_layers=(1, 1, 1, 1), decoder_norms=("rms_norm",) * 4, attention_head_dim=16,
        latent_channels=8,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path / "dcae.safetensors"
    save(Autoencoder(config).eval(), path, format="single-file")
    assert main(["inspect", str(path)]) == 0
    assert "family         dc-ae-f32c32" in capsys.readouterr().out
    assert main(["convert", str(path), str(tmp_path / "diffusers")]) == 0
    assert AutoencoderDC.from_pretrained(tmp_path / "diffusers").config.latent_channels == 8
    assert main(["reconstruct", str(path), str(tmp_path / "photos"), str(tmp_path / "recon")]) == 0
    assert np.asarray(Image.open(tmp_path / "recon" / "a.png")).shape == (64, 64, 3)
    assert main(["reconstruct", str(path), str(tmp_path / "photos"), str(tmp_path / "tiled"), "--tile", "32"]) != 0
    assert "linear attention spans the whole image" in capsys.readouterr().err
    assert main(["eval", str(path), str(tmp_path / "photos"), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 2
    assert main(["analyze", str(path), str(tmp_path / "photos"), "--report", str(tmp_path / "analysis"),
                 "--resolution", "64", "--lpips", "off", "--samples", "2", "--steps", "3", "--pairs", "1"]) == 0  # fmt: skip
    assert len(json.loads((tmp_path / "analysis" / "report.json").read_text())["latents"]["channels"]) == 8


# ---- the DC-AE rows of docs/CHECKPOINTS.md: python tests/test_dcae.py ---------------------------------


def release_width_reference() -> tuple[Autoencoder, AutoencoderDC]:
    """SANA's f32c32 widths and block types, one block per level (to stay light), diffusers' weights in vaekit."""
    d = {**_converter_config(6, 32), "encoder_layers_per_block": [1] * 6, "decoder_layers_per_block": [1] * 6}
    torch.manual_seed(0)
    ref = perturb(AutoencoderDC(**d), 0.02).eval()
    ours = Autoencoder(preset("dc-ae-f32c32").replace(encoder_layers=(1,) * 6, decoder_layers=(1,) * 6)).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def parity_table() -> None:
    """Print the per-route differences the tests above bound, 1 thread, fp32."""
    import tempfile

    torch.set_num_threads(1)
    print("| family | route | encode | decode | to_latent | from_latent |\n|---|---|---|---|---|---|")
    for kind, label in (("sana", "DC-AE f32c32-like (SANA)"), ("mix", "DC-AE in/mix-like")):
        for route in ("diffusers folder -> vaekit", "vaekit folder -> diffusers", "vaekit MIT-layout file -> diffusers' converter"):
            with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tmp = Path(folder)
                ref = reference(kind)
                ref.save_pretrained(tmp / "d")
                ours = vaekit.load(tmp / "d").eval()
                if route.startswith("vaekit folder"):
                    save(ours, tmp / "v", format="diffusers")
                    ref = AutoencoderDC.from_pretrained(tmp / "v").eval()
                elif route.startswith("vaekit MIT"):
                    save(ours, tmp / "m.safetensors", format="single-file")
                    ref = AutoencoderDC(**TINY[kind])
                    ref.load_state_dict(convert_autoencoder_dc_checkpoint_to_diffusers(load_file(tmp / "m.safetensors")))
                    ref.eval()
                    ours = vaekit.load(tmp / "m.safetensors").eval()
                diffs = {}
                for size in SIZES[kind]:
                    for k, v in differences(ours, ref, size).items():
                        diffs[k] = max(diffs.get(k, 0.0), v)
                print(f"| {label} | {route} | " + " | ".join(f"{diffs[k]:.1e}" for k in ("encode", "decode", "to_latent", "from_latent")) + " |")
    ours, ref = release_width_reference()
    diffs = differences(ours, ref, (64, 96))
    print("| DC-AE f32c32 (SANA) | release widths (1 block per level), diffusers weights -> vaekit | "
          + " | ".join(f"{diffs[k]:.1e}" for k in ("encode", "decode", "to_latent", "from_latent")) + " |")


if __name__ == "__main__":
    parity_table()
