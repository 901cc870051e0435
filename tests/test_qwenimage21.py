"""Qwen-Image 2.1's VAE (diffusers' AutoencoderKLQwenImage21): RGBA in and out, 64 latent channels at 16x, per-channel
mean/std. Wan 2.2's residual network (the wan22 architecture) with its convolutions stored as 2D ones (`image_convs`),
against diffusers' class on one frame through every file route, with random weights at small widths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderKLQwenImage21
from PIL import Image
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset
from vaekit.checkpoints import _Found, _same_architecture, _settle, read_checkpoint, save
from vaekit.cli import main
from vaekit.config import PRESETS
from vaekit.data import to_tensor, to_uint8
from vaekit.layouts import wan22 as wan22_layout
from vaekit.model import Autoencoder

TOLERANCE = 1e-4
QWEN21 = preset("qwenimage2.1")
SMALL = dict(block_channels=(8, 16, 32, 32, 32), decoder_block_channels=(12, 24, 48, 48, 48), layers_per_block=1)


def reference(base: int = 8, decoder: int = 12, layers: int = 1, **kw) -> AutoencoderKLQwenImage21:
    """AutoencoderKLQwenImage21 with its defaults (the release's levels, RGBA, 64 channels and latent statistics) at
    smaller widths, perturbed weights."""
    torch.manual_seed(0)
    ref = AutoencoderKLQwenImage21(base_dim=base, decoder_base_dim=decoder, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=layers, **kw)
    return perturb(ref, 0.02).eval()


@torch.no_grad()
def differences(ours: Autoencoder, ref: AutoencoderKLQwenImage21, size: tuple[int, int] = (32, 48)) -> dict[str, float]:
    """One RGBA image as a one-frame video in diffusers; QwenImage21Pipeline's normalisation ((z - latents_mean) /
    latents_std of the posterior's mode on encode, z * std + mean before decode)."""
    x = torch.rand(2, 4, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    q = ref.encode(x[:, :, None]).latent_dist
    p = ours.encode(x)
    c = ref.config.z_dim
    mean, std = torch.tensor(ref.config.latents_mean).view(1, c, 1, 1), torch.tensor(ref.config.latents_std).view(1, c, 1, 1)
    z = (q.mode()[:, :, 0] - mean) / std
    return {
        "mean": (p.mean - q.mean[:, :, 0]).abs().max().item(),
        "logvar": (p.logvar - q.logvar[:, :, 0]).abs().max().item(),
        "decode": (ours.decode(q.mean[:, :, 0]) - ref.decode(q.mean).sample[:, :, 0]).abs().max().item(),
        "to_latent": (ours.to_latent(x) - z).abs().max().item(),
        "from_latent": (ours.from_latent(z) - ref.decode((z * std + mean)[:, :, None]).sample[:, :, 0]).abs().max().item(),
    }


ROUTES = ["diffusers folder -> vaekit", "vaekit folder -> diffusers", "vaekit single file -> diffusers' class",
          "vaekit single file -> vaekit"]  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
def test_qwenimage21_matches_diffusers_through_every_route(route: str, tmp_path: Path) -> None:
    ref = reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config == QWEN21.replace(**SMALL)  # the class's defaults are the preset's layout and statistics
    assert ours.config.arch == "wan22" and ours.config.rgba and ours.factor == 16 and ours.config.family == "qwenimage2.1"
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        written = json.loads((tmp_path / "v" / "config.json").read_text())
        assert written["_class_name"] == "AutoencoderKLQwenImage21" and written["in_channels"] == 4 and written["z_dim"] == 64
        ref = AutoencoderKLQwenImage21.from_pretrained(tmp_path / "v").eval()
    elif route.startswith("vaekit single file"):
        save(ours, tmp_path / "vae.safetensors", format="single-file")
        tensors = load_file(tmp_path / "vae.safetensors")
        assert tensors["encoder.conv_in.weight"].shape == (8, 4, 3, 3)  # diffusers' names and 2D shapes
        if route.endswith("vaekit"):
            back = vaekit.load(tmp_path / "vae.safetensors")
            assert back.config == ours.config
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
            return
        ref = reference()
        ref.load_state_dict(tensors)
    diffs = differences(ours, ref)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_qwenimage21_published_config_is_the_preset() -> None:
    """AutoencoderKLQwenImage21's default config (what QwenImage21Pipeline reads its latent statistics from) is the
    qwenimage2.1 preset, module for module and shape for shape with diffusers' class at full size (meta device)."""
    with torch.device("meta"):
        ref = AutoencoderKLQwenImage21()
        ours = Autoencoder(QWEN21)
    config, stated = wan22_layout.config_from_diffusers({**ref.config, "_class_name": "AutoencoderKLQwenImage21"})
    assert stated and config == QWEN21 and QWEN21.factor == 16 and QWEN21.rgba and QWEN21.latent_channels == 64
    assert wan22_layout.config_from_diffusers({"_class_name": "AutoencoderKLQwenImage21"}) == (QWEN21, True)  # its defaults
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert wan22_layout.diffusers_config(QWEN21)["_class_name"] == "AutoencoderKLQwenImage21"
    # A bare file of the full-size network (its shapes, in diffusers' names) is read as this architecture, which
    # only the qwenimage2.1 preset has: the family a file without a config is assumed to be (and said so).
    config, note = wan22_layout.config_from_tensors(ref.state_dict())
    assert "2D weights" in note and [n for n, p in PRESETS.items() if _same_architecture(p.config, config)] == ["qwenimage2.1"]
    with pytest.warns(UserWarning, match=r"assumed qwenimage2.1: \(z - mean\[c\]\) \* 1 / std\[c\]"):
        ck = _settle(_Found(wan22_layout.to_native(ref.state_dict()), "bare file", layout=wan22_layout), None)
    assert ck.config == QWEN21 and ck.normalisation_source.startswith("assumed qwenimage2.1")
    # Wan 2.2's preset keeps its video weights and its class.
    assert not preset("wan2.2").image_convs and "image_convs" not in preset("wan2.2").to_dict()


def test_a_64_channel_rgba_file_is_never_taken_for_wan22_or_qwenimage(tmp_path: Path) -> None:
    """The variant comes from the tensors' shapes (2D weights, a 4-channel input conv, 64 latent channels), never a
    file name; a bare file of a smaller network has no published statistics, and says so."""
    ref = reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    save(ours, tmp_path / "vae.safetensors", format="single-file")
    bare = load_file(tmp_path / "vae.safetensors")  # no vaekit metadata
    save_file(bare, tmp_path / "wan2.2_vae.safetensors")  # misleading names change nothing
    wan_names = {wan22_layout._wan_name(k, 1): v for k, v in bare.items()}  # in Wan 2.2's names, 2D weights
    assert "encoder.downsamples.1.downsamples.1.time_conv.weight" in wan_names
    torch.save(wan_names, tmp_path / "qwen_image_vae.pth")
    small = QWEN21.replace(**SMALL)
    for path in (tmp_path / "wan2.2_vae.safetensors", tmp_path / "qwen_image_vae.pth"):
        with pytest.warns(UserWarning, match="latent normalisation unknown"):
            ck = read_checkpoint(path)
        assert ck.config.arch == "wan22" and ck.config.image_convs and ck.config.in_channels == 4 and ck.config.patch_size == 1
        assert ck.config.latent_channels == 64 and ck.config.family == "" and "2D weights" in " ".join(ck.notes)
        assert ck.config.replace(latent_norm="channel", latents_mean=small.latents_mean, latents_std=small.latents_std,
                                 family="qwenimage2.1") == small  # fmt: skip
        told = vaekit.load(path, family="qwen-image-2.1")
        assert told.config == small and max(differences(told, ref).values()) <= TOLERANCE
        for other, channels in (("wan2.2", 48), ("qwenimage", 16)):
            with pytest.raises(ValueError, match=rf"family '{other}' has {channels}-channel latents .*; this checkpoint has 64-channel"):
                read_checkpoint(path, family=other)


def test_qwenimage21_reconstructs_rgba_pngs_and_tiles_like_it_does_untiled(tmp_path: Path) -> None:
    ref = reference()
    ref.save_pretrained(tmp_path / "d")
    model = vaekit.load(tmp_path / "d")
    x = torch.rand(1, 4, 96, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = model.to_latent(x)
        assert tuple(z.shape) == (1, 64, 6, 4)
        assert (model.to_latent(x, tile=32) - z).abs().max() < 1e-5
        assert (model.from_latent(z, tile=32) - model.from_latent(z)).abs().max() < 1e-5
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (32, 48, 4), dtype=np.uint8)
    im[:, :12, 3] = 0  # a transparent band
    Image.fromarray(im, "RGBA").save(data / "logo.png")
    assert main(["reconstruct", str(tmp_path / "d"), str(data), str(tmp_path / "out")]) == 0
    got = Image.open(tmp_path / "out" / "logo.png")
    with torch.inference_mode():
        want = to_uint8(model(to_tensor(im), pad=True)[0])[0]
    assert got.mode == "RGBA" and got.size == (48, 32) and np.abs(np.asarray(got).astype(int) - want).max() <= 1


def test_presets_list_qwenimage21(capsys) -> None:
    assert main(["presets"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["qwenimage2.1"][2:4] == ["16x", "64"]
    assert preset("Qwen-Image-2.1") == preset("qwenimage21") == QWEN21


# ---- the rows of docs/CHECKPOINTS.md: python tests/test_qwenimage21.py -----------------------------------------


def parity_table() -> None:
    """Print the per-route differences these tests bound, 1 thread, fp32."""
    import tempfile

    torch.set_num_threads(1)
    print("| family | route | mean | logvar | decode | to_latent | from_latent |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ref = reference()
        ref.save_pretrained(t / "d")
        ours = vaekit.load(t / "d")
        save(ours, t / "v", format="diffusers")
        save(ours, t / "file.safetensors", format="single-file")
        from_file = reference()
        from_file.load_state_dict(load_file(t / "file.safetensors"))
        wide = reference(base=24, decoder=36)
        full = Autoencoder(QWEN21.replace(block_channels=(24, 48, 96, 96, 96), decoder_block_channels=(36, 72, 144, 144, 144),
                                          layers_per_block=1)).eval()  # fmt: skip
        full.load_state_dict(wide.state_dict())
        routes = {"diffusers folder -> vaekit": (ours, ref),
                  "vaekit folder -> diffusers": (ours, AutoencoderKLQwenImage21.from_pretrained(t / "v").eval()),
                  "vaekit single file -> vaekit": (vaekit.load(t / "file.safetensors"), ref),
                  "vaekit single file -> diffusers' class": (ours, from_file),
                  "base and decoder widths a quarter of the release's (24, 36), diffusers weights -> vaekit": (full, wide)}  # fmt: skip
        for route, (a, b) in routes.items():
            d = differences(a, b)
            print(f"| Qwen-Image 2.1 | {route} | " + " | ".join(f"{d[k]:.1e}" for k in ("mean", "logvar", "decode", "to_latent", "from_latent")) + " |")


if __name__ == "__main__":
    parity_table()
