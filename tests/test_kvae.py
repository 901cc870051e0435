"""KVAE 2D (arch "kvae", diffusers' AutoencoderKLKVAE): a small random model through a diffusers folder both ways and
the authors' single file (KVAE2D's names, which are diffusers'), against diffusers; the preset's architecture against
the class's defaults (the release's), on the meta device; recognition from names and shapes; tiling refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderKLKVAE
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset
from vaekit.checkpoints import read_checkpoint, save
from vaekit.layouts import kvae as layout
from vaekit.model import Autoencoder
from vaekit.model.architectures import for_names

TOLERANCE = 1e-4
# 3 levels (4x), 2 blocks per level in the encoder (3 in the decoder), widths that change (nin shortcuts).
TINY = dict(channels=32, ch_mult=(1, 2, 2), num_enc_blocks=2, num_dec_blocks=2, z_channels=16)


def reference() -> AutoencoderKLKVAE:
    torch.manual_seed(0)
    return perturb(AutoencoderKLKVAE(**TINY), 0.02).eval()


@torch.no_grad()
def differences(ours: Autoencoder, ref: AutoencoderKLKVAE, size: tuple[int, int]) -> dict[str, float]:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    posterior, p = ours.encode(x), ref.encode(x).latent_dist
    z = p.mode()
    return {
        "mean": (posterior.mean - p.mean).abs().max().item(),
        "logvar": (posterior.logvar - p.logvar).abs().max().item(),
        "decode": (ours.decode(z) - ref.decode(z).sample).abs().max().item(),
        # No pipeline normalises KVAE 2D's latents (Kandinsky 5's image pipelines use FLUX.1's VAE): scale 1, shift 0.
        "to_latent": (ours.to_latent(x) - z).abs().max().item(),
        "from_latent": (ours.from_latent(z) - ref.decode(z).sample).abs().max().item(),
    }


@pytest.mark.parametrize("route", ["diffusers folder -> vaekit", "vaekit folder -> diffusers", "authors' single file"])
def test_kvae_matches_diffusers(route: str, tmp_path: Path) -> None:
    ref = reference()
    ref.save_pretrained(tmp_path / "d")
    with pytest.warns(UserWarning, match="latent normalisation unknown"):  # a custom size: nothing states it
        ours = vaekit.load(tmp_path / "d").eval()
    c = ours.config
    assert c.arch == "kvae" and c.kind == "vae" and c.block_channels == (32, 64, 64) and c.layers_per_block == 2
    assert ours.factor == 4 and c.latent_channels == 16 and (c.scaling_factor, c.shift_factor) == (1.0, 0.0)
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        ref = AutoencoderKLKVAE.from_pretrained(tmp_path / "v").eval()
        assert dict(ref.config)["ch_mult"] == [1, 2, 2]
    elif route == "authors' single file":
        save(ours, tmp_path / "model.safetensors", format="single-file")
        names = load_file(tmp_path / "model.safetensors")
        assert "encoder.down.0.downsample.spatial_conv.weight" in names and "decoder.up.0.block.0.norm1.conv_y.weight" in names
        ref = AutoencoderKLKVAE(**TINY)  # the authors' KVAE2D has diffusers' module tree: the file loads strictly
        ref.load_state_dict(dict(names), strict=True)
        ref.eval()
        save_file(names, tmp_path / "bare.safetensors")  # the authors' file has no vaekit config: the shapes tell it
        for file in ("model.safetensors", "bare.safetensors"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = vaekit.load(tmp_path / file)
            assert back.config.replace(family="") == c.replace(family="")
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
        assert "KVAE 2D naming" in read_checkpoint(tmp_path / "model.safetensors").format
    with torch.no_grad():
        assert ref.decode(ref.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latent_dist.mode()).sample.abs().mean() > 0.05
    for size in [(32, 48), (40, 32)]:
        diffs = differences(ours, ref, size)
        assert max(diffs.values()) <= TOLERANCE, (size, diffs)


def test_preset_is_the_released_architecture() -> None:
    cfg = preset("kvae")
    with torch.device("meta"):
        ref, ours = AutoencoderKLKVAE(), Autoencoder(cfg)  # the class's defaults: the authors' KVAE2D's
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    assert cfg.factor == 8 and cfg.latent_channels == 16 and (cfg.scaling_factor, cfg.shift_factor) == (1.0, 0.0)
    config, stated = layout.config_from_diffusers({"_class_name": "AutoencoderKLKVAE", **dict(ref.config)})
    assert config == cfg.replace(family="") and not stated
    assert layout.diffusers_can_load(cfg)
    # The release's file with no config: the names say KVAE, the shapes the preset, and its normalisation is assumed.
    from vaekit.checkpoints import _Found, _normalisation

    from_shapes, _ = layout.config_from_tensors(shapes_only := {k: torch.empty(s, device="meta") for k, s in shapes(ours).items()})
    assert from_shapes == cfg.replace(family="")
    assert for_names(shapes_only)[0] is layout
    named, source = _normalisation(from_shapes, _Found({}, "file", hint=(layout.FAMILY, "its key layout"), layout=layout), None)
    assert named == cfg and source == "kvae, from its key layout"
    with pytest.warns(UserWarning, match="assumed kvae"):  # the shapes alone: the one preset of this architecture
        assumed, _ = _normalisation(from_shapes, _Found({}, "file", layout=layout), None)
    assert assumed == cfg


def test_names_tell_kvae_from_16_channel_ldm_files() -> None:
    """A 16-channel KVAE file is never read as SD3/FLUX.1's (LDM names), nor theirs as KVAE's."""
    with torch.device("meta"):
        kvae_keys = list(Autoencoder(preset("kvae")).state_dict())
        for name in ("sd3", "flux1"):
            ldm = Autoencoder(preset(name))
            ldm_file = ldm.state_dict()
            from vaekit.layouts import ldm as ldm_layout

            single = ldm_layout.to_single_file(ldm_file, preset(name))
            assert for_names(single)[0] is ldm_layout and layout.recognise(single) is None
            assert layout.recognise(ldm_file) is None and layout.recognise(ldm_layout.to_diffusers(ldm_file, preset(name))) is None
    assert for_names(kvae_keys)[0] is layout


def test_tiling_is_refused_with_the_reason() -> None:
    ref = reference()
    model = Autoencoder(layout.config_from_diffusers(dict(ref.config))[0]).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.to_latent(x)
        for call in (lambda: model.encode(x, tile=16), lambda: model.decode(z, tile=16)):
            with pytest.raises(ValueError, match="conditions every normalisation on the latent"):
                call()
        assert model.from_latent(z).shape == x.shape


def test_kvae_options_are_checked() -> None:
    with pytest.raises(ValueError, match="a kvae model has no quant convs"):
        preset("kvae").replace(use_quant_conv=True)
    with pytest.raises(NotImplementedError, match="num_enc_blocks"):
        layout.config_from_diffusers({"num_enc_blocks": 2, "num_dec_blocks": 3})
    with pytest.raises(NotImplementedError, match="ch_mult"):
        layout.config_from_diffusers({"ch_mult": [2, 4]})


def test_bench_times_it_against_autoencoder_kl_kvae() -> None:
    from vaekit.speed import bench, diffusers_peer

    ref = reference()
    model = Autoencoder(layout.config_from_diffusers(dict(ref.config))[0]).eval()
    model.load_state_dict(ref.state_dict())
    assert type(diffusers_peer(model, torch.float32)).__name__ == "AutoencoderKLKVAE"
    rows, _ = bench(model, [32], [1], ["fp32"], repeats=1)
    assert [r.op for r in rows] == ["encode", "decode"]


def test_commands_work_for_kvae(tmp_path: Path, capsys) -> None:
    """inspect, convert, reconstruct and eval on a small random KVAE saved as the authors' single file."""
    import json

    import numpy as np
    from PIL import Image

    from vaekit.cli import main

    (tmp_path / "photos").mkdir()
    g = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{name}.png")
    config = preset("kvae").replace(block_channels=(32, 64, 64, 64), layers_per_block=1)
    torch.manual_seed(0)
    path = tmp_path / "kvae.safetensors"
    save(Autoencoder(config).eval(), path, format="single-file")
    assert main(["inspect", str(path)]) == 0
    assert "family         kvae" in capsys.readouterr().out
    assert main(["convert", str(path), str(tmp_path / "kvae-diffusers")]) == 0
    assert json.loads((tmp_path / "kvae-diffusers" / "config.json").read_text())["_class_name"] == "AutoencoderKLKVAE"
    again = vaekit.load(tmp_path / "kvae-diffusers")
    assert again.config == config and again.factor == 8
    assert main(["reconstruct", str(path), str(tmp_path / "photos"), str(tmp_path / "recon")]) == 0
    assert np.asarray(Image.open(tmp_path / "recon" / "a.png")).shape == (64, 64, 3)
    assert main(["eval", str(path), str(tmp_path / "photos"), "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 2
