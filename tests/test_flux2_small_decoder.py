"""FLUX.2's small decoder: FLUX.2's encoder and latent space with a narrower decoder (diffusers'
AutoencoderKLFlux2(decoder_block_out_channels=...), black-forest-labs/FLUX.2-small-decoder). Against diffusers
through every file route, tiled, timed; and the option leaves every other config as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderKLFlux2
from safetensors.torch import load_file, save_file
from test_families import flux2_differences

import vaekit
from vaekit import AutoencoderConfig, preset
from vaekit.checkpoints import read_checkpoint, save
from vaekit.config import PRESETS
from vaekit.layouts import ldm as ldm_layout
from vaekit.model import Autoencoder

TOLERANCE = 1e-4
ENCODER, DECODER = (16, 32, 64, 64), (8, 16, 32, 32)  # a decoder half as wide, as FLUX.2's small one is narrower
# GroupNorm groups 8: also what a file alone implies for these widths (gcd(32, widths)), so a bare file reads back exactly.
SMALL = AutoencoderConfig(block_channels=ENCODER, decoder_block_channels=DECODER, layers_per_block=1, latent_channels=32,
                          norm_groups=8, latent_norm="patch_bn")  # fmt: skip


def reference(decoder: tuple[int, ...] | None = DECODER, release: bool = False) -> AutoencoderKLFlux2:
    """diffusers' AutoencoderKLFlux2 with a narrow decoder, perturbed weights and non-trivial BatchNorm statistics;
    `release`: at the published widths (diffusers' defaults, 2 layers per block, 32 groups) with `decoder`'s."""
    torch.manual_seed(0)
    n = len(ENCODER)
    small = dict(block_out_channels=ENCODER, layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)  # fmt: skip
    ref = AutoencoderKLFlux2(decoder_block_out_channels=decoder, latent_channels=32, **({} if release else small))
    perturb(ref, 0.02)
    with torch.no_grad():
        ref.bn.running_mean.normal_(0, 0.5)
        ref.bn.running_var.uniform_(0.3, 3.0)
    return ref.eval()


def test_the_option_changes_nothing_else() -> None:
    for name, p in PRESETS.items():  # every preset but the new one has the encoder's decoder
        assert p.config.decoder_channels == p.config.block_channels or name in ("flux2-small-decoder", "wan2.2", "qwenimage2.1")
    # Configs without it (saved before it existed) load as before, and every other model's dict is what it was, so
    # its saved config.json / metadata and the model hash of its latent datasets do not change.
    assert "decoder_block_channels" not in preset("flux2").to_dict()
    assert AutoencoderConfig.from_dict(preset("flux2").to_dict()) == preset("flux2")
    # The encoder's widths spelt out are the same config as None.
    assert preset("flux2").replace(decoder_block_channels=(128, 256, 512, 512)) == preset("flux2")
    assert AutoencoderConfig.from_dict(SMALL.to_dict()) == SMALL and SMALL.to_dict()["decoder_block_channels"] == list(DECODER)
    with pytest.raises(ValueError, match="one width per level"):
        SMALL.replace(decoder_block_channels=(8, 16, 32))
    with pytest.raises(ValueError, match="norm_groups=8 must divide every decoder block"):
        SMALL.replace(decoder_block_channels=(12, 16, 32, 32))
    with pytest.raises(ValueError, match="option of the ldm architecture"):
        AutoencoderConfig(block_channels=(32, 64, 128), norm_groups=8, shortcuts=True, decoder_block_channels=(16, 32, 64))
    # Only AutoencoderKLFlux2 has decoder widths of its own: an affine-latent model with them has no diffusers class.
    assert SMALL.diffusers_compatible and not SMALL.replace(latent_norm="affine").diffusers_compatible
    # The decoder is built with its widths; the encoder keeps its own.
    with torch.device("meta"):
        model = Autoencoder(SMALL)
    assert model.decoder.conv_in.weight.shape[0] == 32 and model.decoder.norm_out.weight.shape[0] == 8
    assert model.encoder.conv_out.weight.shape[1] == 64 and model.encoder.conv_in.weight.shape[0] == 16


@pytest.mark.parametrize("route", ["diffusers folder -> vaekit", "vaekit folder -> diffusers"])
def test_matches_diffusers(route: str, tmp_path: Path) -> None:
    ref = reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config == SMALL
    if route == "vaekit folder -> diffusers":
        save(ours, tmp_path / "v", format="diffusers")
        written = json.loads((tmp_path / "v" / "config.json").read_text())
        assert written["_class_name"] == "AutoencoderKLFlux2" and written["decoder_block_out_channels"] == list(DECODER)
        ref = AutoencoderKLFlux2.from_pretrained(tmp_path / "v").eval()
        assert tuple(ref.config.decoder_block_out_channels) == DECODER
        # diffusers' own config.json alone (without vaekit's `_vaekit` entry) gives the same config
        del written["_vaekit"]
        assert ldm_layout.config_from_diffusers(written) == (SMALL, True)
    diffs = flux2_differences(ours, ref)
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("naming", ["BFL FLUX.2", "LDM"])
def test_single_file_is_recognised_from_its_decoder_tensors(naming: str, tmp_path: Path) -> None:
    ref = reference()
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    save(ours, tmp_path / "ae.safetensors", format="single-file")
    back = vaekit.load(tmp_path / "ae.safetensors")  # vaekit's own file (its config in the metadata): exact
    assert back.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
    # A bare file as others write it: no metadata, no BatchNorm counter; BFL's names, or the native LDM ones. The
    # name says nothing (a full-width model in a file called "small decoder" is read as full width below).
    bare = {k: v for k, v in load_file(tmp_path / "ae.safetensors").items() if k != "bn.num_batches_tracked"}
    if naming == "LDM":
        native = {v: k for k, v in ldm_layout.BFL_NAMES.items()}
        bare = {ldm_layout._renamed(k, native): v for k, v in bare.items()}
        assert "quant_conv.weight" in bare and "post_quant_conv.weight" in bare
    save_file(bare, tmp_path / "flux2_ae.safetensors")
    ck = read_checkpoint(tmp_path / "flux2_ae.safetensors")
    assert naming in ck.format and ck.config == SMALL  # the decoder's widths read off the decoder's tensors
    assert max(flux2_differences(vaekit.load(tmp_path / "flux2_ae.safetensors"), ref).values()) <= TOLERANCE
    # The same names at full width: the decoder is the encoder's, whatever the file is called.
    full = reference(decoder=None)
    full.save_pretrained(tmp_path / "full")
    save(vaekit.load(tmp_path / "full"), tmp_path / "f.safetensors", format="single-file")
    save_file(load_file(tmp_path / "f.safetensors"), tmp_path / "full_encoder_small_decoder.safetensors")  # no metadata
    assert read_checkpoint(tmp_path / "full_encoder_small_decoder.safetensors").config.decoder_block_channels is None


def test_published_widths_match_diffusers(tmp_path: Path) -> None:
    """At the release's widths: diffusers' folder of AutoencoderKLFlux2(decoder_block_out_channels=(96, 192, 384,
    384)) is the preset, named as its family."""
    ref = reference(decoder=(96, 192, 384, 384), release=True)
    ref.save_pretrained(tmp_path / "d")
    ours = vaekit.load(tmp_path / "d")
    assert ours.config == preset("flux2-small-decoder") and ours.config.family == "flux2-small-decoder"
    diffs = flux2_differences(ours, ref, size=(32, 32))
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_mismatched_decoder_levels_are_an_error() -> None:
    with torch.device("meta"):
        tensors = Autoencoder(SMALL).state_dict()
    tensors = {k: v for k, v in tensors.items() if not k.startswith("decoder.up.3.")}
    with pytest.raises(ValueError, match=r"decoder levels \[0, 1, 2\] do not match the encoder's \[0, 1, 2, 3\]"):
        ldm_layout.config_from_tensors(tensors)


def test_published_preset_has_the_diffusers_shapes() -> None:
    """flux2-small-decoder's tensors are those of AutoencoderKLFlux2(decoder_block_out_channels=(96, 192, 384, 384))
    (meta device: no weights), its config.json reads back as the preset, and its decoder is ~44% smaller than FLUX.2's."""
    config = preset("flux2-small-decoder")
    assert config.block_channels == (128, 256, 512, 512) and config.decoder_block_channels == (96, 192, 384, 384)
    assert config.normalised_shape == preset("flux2").normalised_shape == (128, 16)  # FLUX.2's latent space
    d = ldm_layout.diffusers_config(config)
    assert ldm_layout.config_from_diffusers(d) == (config.replace(family=""), True)
    with torch.device("meta"):
        ours = Autoencoder(config)
        theirs = AutoencoderKLFlux2.from_config({k: v for k, v in d.items() if not k.startswith("_")})
        full = Autoencoder(preset("flux2"))
    mapped = {k: tuple(v.shape) for k, v in ldm_layout.to_diffusers(ours.state_dict(), config).items()}
    assert mapped == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    # BFL's full_encoder_small_decoder.safetensors names: read back as the preset from the shapes alone.
    bfl = ldm_layout.to_single_file(ours.state_dict(), config)
    assert "decoder.post_quant_conv.weight" in bfl and ldm_layout.recognise(bfl) == "BFL FLUX.2 naming"
    assert ldm_layout.config_from_tensors(ldm_layout.to_native(bfl))[0] == config.replace(family="")
    ratio = sum(p.numel() for p in ours.decoder.parameters()) / sum(p.numel() for p in full.decoder.parameters())
    assert 0.55 < ratio < 0.58, ratio  # "~44% fewer decoder params" (the port that states the widths)
    assert sum(p.numel() for p in ours.encoder.parameters()) == sum(p.numel() for p in full.encoder.parameters())


def test_tiled_decode_matches_untiled() -> None:
    torch.manual_seed(0)
    model = perturb(Autoencoder(SMALL), 0.02).eval()
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = model.encode(x).mean
        untiled, tiled = model.decode(z), model.decode(z, tile=32)  # 2x3 tiles of 4x4 latent pixels
        assert (model.encode(x, tile=32).mean - z).abs().max() <= TOLERANCE
    assert tiled.shape == untiled.shape == (1, 3, 64, 96) and untiled.std() > 0.01
    assert (tiled - untiled).abs().max() <= TOLERANCE
    # The tile planner traces the decoder at its own widths.
    from vaekit.model.tiling import tile_memory

    assert tile_memory(SMALL, 64) < tile_memory(SMALL.replace(decoder_block_channels=None), 64)


def test_bench_times_it_against_autoencoderklflux2() -> None:
    from vaekit.speed import bench, diffusers_peer

    torch.manual_seed(0)
    model = perturb(Autoencoder(SMALL), 0.02).eval()
    peer = diffusers_peer(model, torch.float32)
    assert type(peer).__name__ == "AutoencoderKLFlux2" and tuple(peer.config.decoder_block_out_channels) == DECODER
    rows, _ = bench(model, [32], [1], ["fp32"], repeats=1)
    assert {r.op for r in rows} == {"encode", "decode"}
    for r in rows:
        assert r.peer_seconds > 0 and r.max_abs_diff < TOLERANCE, (r.op, r.max_abs_diff)
    # An affine-latent model with a decoder of its own widths has no diffusers class to be timed against.
    assert diffusers_peer(Autoencoder(SMALL.replace(latent_norm="affine")), torch.float32) is None


def parity_table() -> None:
    """Print the rows of docs/CHECKPOINTS.md's parity table for this model (1 thread, fp32): python tests/test_flux2_small_decoder.py"""
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ref = reference()
        ref.save_pretrained(t / "d")
        ours = vaekit.load(t / "d")
        save(ours, t / "v", format="diffusers")
        save(ours, t / "ae.safetensors", format="single-file")
        bare = {k: v for k, v in load_file(t / "ae.safetensors").items() if k != "bn.num_batches_tracked"}
        save_file(bare, t / "bfl.safetensors")  # no metadata: the config from the shapes
        native = {v: k for k, v in ldm_layout.BFL_NAMES.items()}
        save_file({ldm_layout._renamed(k, native): v for k, v in bare.items()}, t / "ldm.safetensors")
        full = reference(decoder=(96, 192, 384, 384), release=True)
        full.save_pretrained(t / "full")
        routes = {
            "diffusers folder -> vaekit": (ours, ref, (32, 48)),
            "vaekit folder -> diffusers": (ours, AutoencoderKLFlux2.from_pretrained(t / "v").eval(), (32, 48)),
            "bare BFL-layout file (config from shapes) -> vaekit": (vaekit.load(t / "bfl.safetensors"), ref, (32, 48)),
            "bare LDM-named file (config from shapes) -> vaekit": (vaekit.load(t / "ldm.safetensors"), ref, (32, 48)),
            "release widths, diffusers folder -> vaekit": (vaekit.load(t / "full"), full, (32, 32)),
        }
        for route, (a, b, size) in routes.items():
            d = flux2_differences(a, b, size=size)
            print(f"| FLUX.2 small decoder | {route} | " + " | ".join(f"{d[k]:.1e}" for k in ("mean", "logvar", "decode", "to_latent", "from_latent")) + " |")


if __name__ == "__main__":
    parity_table()
