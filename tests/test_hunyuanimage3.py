"""Hunyuan Image 3.0's VAE (the hunyuanimage3 architecture) against Tencent's own code. Tencent's
autoencoder_kl_3d.py is not a package and is not imported here: tests/fixtures/make_hunyuanimage3_reference.py ran it
on small random models and kept their outputs (tests/fixtures/hunyuanimage3_reference.safetensors) with the names
and shapes of their state dicts; the weights are remade here from their seed, written as the files Tencent's
release has, and read with vaekit.load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.make_hunyuanimage3_reference import FIXTURE, SCALE, images, tencent_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset
from vaekit.checkpoints import read_checkpoint, save
from vaekit.layouts import hunyuanimage3 as layout
from vaekit.model import Autoencoder
from vaekit.model.architectures import for_names

TOLERANCE = 1e-4
RELEASE = preset("hunyuanimage3")


def fixture() -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(FIXTURE, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["about"])


OUTPUTS, ABOUT = fixture()


def weights(case: str) -> dict[str, torch.Tensor]:
    """The case's weights in Tencent's names, as the generator made them."""
    c = ABOUT["cases"][case]
    return tencent_weights({k: tuple(v) for k, v in c["shapes"].items()}, c["seed"])


def write(case: str, route: str, folder: Path) -> Path:
    """The weights as the release ships them: under `vae.` in a shard of the whole model, beside the language model's
    tensors (`shard`); or a bare VAE state dict (`bare`, torch's .pt)."""
    if route == "shard":
        path = folder / "model-0031-of-0032.safetensors"
        save_file({"model.layers.0.mlp.gate.wg.weight": torch.zeros(4, 8), **{f"vae.{k}": v for k, v in weights(case).items()}}, path)
    else:
        path = folder / "pytorch_model.pt"
        torch.save(weights(case), path)
    return path


@torch.no_grad()
def differences(model: Autoencoder, case: str) -> dict[str, float]:
    """Against Tencent's outputs: its encode of two images (repeated to 4 frames) and its decode of that mean (the last
    of the frames it makes); its pipeline's normalisation, (z - shift) * scale with no shift."""
    x = images(ABOUT["cases"][case]["seed"] + 1)
    mean, logvar, decoded = (OUTPUTS[f"{case}.{k}"] for k in ("mean", "logvar", "decode"))
    p = model.encode(x)
    return {
        "mean": (p.mean - mean).abs().max().item(),
        "logvar": (p.logvar - logvar).abs().max().item(),
        "decode": (model.decode(mean) - decoded).abs().max().item(),
        "to_latent": (model.to_latent(x) - mean * SCALE).abs().max().item(),
        "from_latent": (model.from_latent(mean * SCALE) - decoded).abs().max().item(),
    }


@pytest.mark.parametrize("route", ["shard", "bare"])
@pytest.mark.parametrize("case", ["release", "fewer"])
def test_matches_tencent(case: str, route: str, tmp_path: Path) -> None:
    ck = read_checkpoint(write(case, route, tmp_path))
    kwargs = ABOUT["cases"][case]["kwargs"]
    assert "Tencent Hunyuan Image 3.0" in ck.format and ck.config.arch == "hunyuanimage3"
    assert ck.config == RELEASE.replace(block_channels=tuple(kwargs["block_out_channels"]), layers_per_block=1,
                                        downsample_levels=None if case == "release" else 3,
                                        temporal_downsample=(False, False, True, True) if case == "release" else (False, True, True))  # fmt: skip
    assert ck.config.factor == kwargs["ffactor_spatial"] and ck.normalisation_source.startswith("hunyuanimage3, from its key layout")
    model = vaekit.load(write(case, route, tmp_path))
    diffs = differences(model, case)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_the_release_is_the_preset() -> None:
    """Tencent's state dict at the release's config.json (names and shapes, recorded by the generator) is the preset's,
    and a file of that size is read as the preset, its scale said by the names."""
    from vaekit.checkpoints import _Found, _normalisation

    with torch.device("meta"):
        ours = Autoencoder(RELEASE).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v) for k, v in ABOUT["release_shapes"].items()}
    assert for_names({k: v.shape for k, v in ours.items()})[0] is layout
    config, _ = layout.config_from_tensors(ours)
    assert config == RELEASE.replace(scaling_factor=1.0, family="")
    said, source = _normalisation(config, _Found({}, "file", hint=(layout.FAMILY, "its key layout"), layout=layout), None)
    assert said == RELEASE and source == "hunyuanimage3, from its key layout"
    assert (RELEASE.factor, RELEASE.latent_channels, RELEASE.scaling_factor, RELEASE.shift_factor) == (16, 32, SCALE, 0.0)
    assert preset("hunyuanimage-3.0") == RELEASE


def test_saves_tencent_names_and_loads_them_back_bit_exactly(tmp_path: Path) -> None:
    model = vaekit.load(write("release", "shard", tmp_path))
    save(model, tmp_path / "vae.safetensors", format="single-file")
    assert set(load_file(tmp_path / "vae.safetensors")) == set(weights("release"))  # Tencent's names, no prefix
    back = vaekit.load(tmp_path / "vae.safetensors")
    assert back.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    with pytest.raises(ValueError, match=r"no diffusers class, so no diffusers folder: save it as one \.safetensors") as e:
        save(model, tmp_path / "folder")
    assert "\n" not in str(e.value) and not (tmp_path / "folder").exists()


def test_read_from_the_shards_that_hold_it(tmp_path: Path) -> None:
    """The release's VAE is under `vae.` across its last shards: read through model.safetensors.index.json (or its
    folder), opening only the shards that hold it."""
    tensors = {f"vae.{k}": v for k, v in weights("release").items()}
    names = sorted(tensors)
    parts = {"model-0031-of-0032.safetensors": names[: len(names) // 2], "model-0032-of-0032.safetensors": names[len(names) // 2 :]}
    save_file({"model.layers.0.mlp.gate.wg.weight": torch.zeros(4, 8)}, tmp_path / "model-0001-of-0032.safetensors")
    for shard, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard)
    weight_map = {"model.layers.0.mlp.gate.wg.weight": "model-0001-of-0032.safetensors"}
    weight_map.update({k: shard for shard, keys in parts.items() for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hunyuan_image_3_moe"}))  # transformers', not diffusers'
    (tmp_path / "model-0001-of-0032.safetensors").write_bytes(b"")  # never opened: it holds no VAE tensor
    for source in (tmp_path / "model.safetensors.index.json", tmp_path):
        ck = read_checkpoint(source)
        assert ck.config.family == "hunyuanimage3" and "model-0031-of-0032.safetensors, model-0032" in ck.format
    assert max(differences(vaekit.load(tmp_path), "release").values()) <= TOLERANCE
    (tmp_path / "model-0032-of-0032.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="which is not in .*: download it too"):
        read_checkpoint(tmp_path)


def test_inspect_from_the_command_line(tmp_path: Path, capsys) -> None:
    """(encode, decode, calibrate, bench, reconstruct, eval, train: tests/test_family_commands.py.)"""
    from vaekit.cli import main

    assert main(["inspect", str(write("release", "bare", tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "family         hunyuanimage3" in out and "z * 0.562679" in out and "Tencent Hunyuan Image 3.0 VAE layout" in out


def test_never_taken_for_hunyuan_image_2_1_or_its_refiner(tmp_path: Path) -> None:
    """The same names as Hunyuan Image 2.1's Tencent files, told apart by shape (3D against 2D convolutions), in both
    directions; and never the refiner's (HunyuanVideo-1.5's) names."""
    from vaekit.layouts import hunyuanimage as layout21
    from vaekit.layouts import hunyuanvideo15 as refiner_layout

    ours = weights("release")
    assert layout.recognise({k: v.shape for k, v in ours.items()}) and layout.recognise(list(ours)) is None  # shapes needed
    assert refiner_layout.recognise(ours) is None
    with torch.device("meta"):
        h21 = preset("hunyuanimage")
        tencent21 = layout21.to_single_file(Autoencoder(h21).state_dict(), h21)
        refiner = preset("hunyuanimage-refiner")
        tencent_refiner = refiner_layout.to_single_file(Autoencoder(refiner).state_dict(), refiner)
    assert set(tencent21) & {"encoder.down.0.block.0.conv1.weight", "decoder.up.0.upsample.conv.weight", "encoder.mid.attn_1.q.weight"}
    assert layout.recognise(tencent21) is None and layout.recognise(tencent_refiner) is None
    assert for_names({k: v.shape for k, v in tencent21.items()})[0] is layout21
    assert for_names({k: v.shape for k, v in tencent_refiner.items()})[0] is refiner_layout
    small21 = h21.replace(block_channels=(32, 64, 128), layers_per_block=1)  # 64 channels, as the release: its family
    small = layout21.to_single_file(Autoencoder(small21).state_dict(), small21)
    save_file(small, tmp_path / "hunyuanimage3_vae.safetensors")  # a misleading name
    ck = read_checkpoint(tmp_path / "hunyuanimage3_vae.safetensors")
    assert ck.config.arch == "hunyuanimage" and ck.config.family == "hunyuanimage" and "Tencent Hunyuan Image layout" in ck.format
    with pytest.raises(ValueError, match="family 'hunyuanimage' has 64-channel latents"):
        read_checkpoint(write("release", "bare", tmp_path), family="hunyuanimage")


def test_tiles_like_it_does_untiled(tmp_path: Path) -> None:
    """Tiles split rows and columns with all 4 frames whole; GroupNorm's statistics span the frames and the image."""
    model = vaekit.load(write("release", "bare", tmp_path))
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = model.to_latent(x)
        assert tuple(z.shape) == (1, 32, 4, 3)
        assert (model.to_latent(x, tile=32) - z).abs().max() < 1e-5
        assert (model.from_latent(z, tile=32) - model.from_latent(z)).abs().max() < 1e-5


def test_the_clip_frames_are_carried_because_they_differ() -> None:
    """conv_in computed from the image equals Tencent's 3D conv over 4 copies of it; those frames are not all equal
    (the first and last lose a tap to the zero padding), and after one ResNet block no two are."""
    model = Autoencoder(RELEASE.replace(block_channels=(32, 32, 32, 64, 64), layers_per_block=1)).eval()
    model.load_state_dict(weights("release"))
    x = images(1)
    conv = model.encoder.conv_in
    with torch.no_grad():
        clip = conv(x)
        torch.testing.assert_close(clip, torch.nn.functional.conv3d(x[:, :, None].expand(-1, -1, 4, -1, -1), conv.weight, conv.bias, padding=1))
        assert torch.equal(clip[:, :, 1], clip[:, :, 2]) and not torch.allclose(clip[:, :, 0], clip[:, :, 1])
        h = model.encoder.down[0].block[0](clip)
    assert all(not torch.allclose(h[:, :, i], h[:, :, j], atol=1e-3) for i in range(4) for j in range(i + 1, 4))


# ---- the rows of docs/CHECKPOINTS.md: python tests/test_hunyuanimage3.py --------------------------------------


def parity_table() -> None:
    """Print the differences these tests bound, 1 thread, fp32."""
    import tempfile

    torch.set_num_threads(1)
    print("| route | mean | logvar | decode | to_latent | from_latent |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("release", "fewer"):
            for route in ("shard", "bare"):
                d = differences(vaekit.load(write(case, route, Path(tmp))), case)
                print(f"| {case}, {route} | " + " | ".join(f"{d[k]:.1e}" for k in ("mean", "logvar", "decode", "to_latent", "from_latent")) + " |")


if __name__ == "__main__":
    parity_table()
