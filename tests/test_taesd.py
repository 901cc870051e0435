"""Preview models (arch "taesd", docs/PREVIEWS.md): madebyollin's tiny autoencoder and the linear preview, against
diffusers' AutoencoderTiny, through every file form people have (the released encoder/decoder pairs, FLUX.2's one file,
diffusers folders), with their teacher's latent space recorded and checked before a latent dataset is decoded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb
from diffusers import AutoencoderTiny
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset, save
from vaekit.checkpoints import read_checkpoint
from vaekit.cli import main
from vaekit.config import preview_config
from vaekit.layouts import pair_file
from vaekit.model import Autoencoder
from vaekit.previews import comfyui_factors, linear_preview, parse_comfyui_factors, preview_model

TOLERANCE = 1e-4


def reference(latent_channels: int = 4, levels: int = 4, seed: int = 0) -> AutoencoderTiny:
    """diffusers' AutoencoderTiny (taesd's widths and blocks; `levels` - 1 downsamplings) with perturbed weights."""
    torch.manual_seed(seed)
    ref = AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(64,) * levels,
                          decoder_block_out_channels=(64,) * levels, num_encoder_blocks=(1,) + (3,) * (levels - 1),
                          num_decoder_blocks=(3,) * (levels - 1) + (1,))  # fmt: skip
    return perturb(ref, 0.02).eval()


def released_pair(ref: AutoencoderTiny) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The encoder and decoder files madebyollin releases for these weights: the inverse of diffusers'
    scripts/convert_tiny_autoencoder_to_diffusers.py (encoder.layers.N <- N; decoder.layers.N <- N + 1)."""
    sd = ref.state_dict()
    encoder = {k.removeprefix("encoder.layers."): v for k, v in sd.items() if k.startswith("encoder.")}
    decoder = {}
    for k, v in sd.items():
        if k.startswith("decoder."):
            index, rest = k.removeprefix("decoder.layers.").split(".", 1)
            decoder[f"{int(index) + 1}.{rest}"] = v
    return encoder, decoder


@torch.no_grad()
def differences(ours: Autoencoder, ref: AutoencoderTiny, side: int = 64) -> dict[str, float]:
    """Max abs differences of encode and decode against AutoencoderTiny, whose `encode` is the teacher's normalised
    latent (scaling_factor 1): vaekit's `to_latent` and `from_latent` are the same calls."""
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z_ref = ref.encode(x).latents
    z = ours.to_latent(x)
    assert torch.equal(z, ours.encode(x).mean)  # the identity normalisation
    return {"encode": float((z - z_ref).abs().max()), "decode": float((ours.from_latent(z_ref) - ref.decode(z_ref).sample).abs().max())}


def write_pair(folder: Path, name: str, encoder: dict | None, decoder: dict | None, suffix: str = ".pth") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for half, tensors in (("encoder", encoder), ("decoder", decoder)):
        if tensors is not None:
            path = folder / f"{name}_{half}{suffix}"
            if suffix == ".pth":
                torch.save(tensors, path)
            else:
                save_file({k: v.contiguous() for k, v in tensors.items()}, path)


# ---- parity with diffusers' AutoencoderTiny, through every route ------------------------------------------------------


ROUTES = ("diffusers folder", "vaekit folder -> diffusers", "released pair .pth", "released pair .safetensors", "one file")


def route(name: str, ref: AutoencoderTiny, tmp: Path) -> tuple[Autoencoder, AutoencoderTiny]:
    """(vaekit's model, diffusers') for one route of the same weights."""
    if name == "diffusers folder":
        ref.save_pretrained(tmp / "d")
        return vaekit.load(tmp / "d", family="sd1" if ref.config.latent_channels == 4 else None), ref
    if name == "vaekit folder -> diffusers":
        ours = route("diffusers folder", ref, tmp)[0]
        save(ours, tmp / "ours")
        return ours, AutoencoderTiny.from_pretrained(tmp / "ours").eval()
    if name.startswith("released pair"):
        write_pair(tmp / "pair", "taesd", *released_pair(ref), suffix=name.split()[-1])
        return vaekit.load(tmp / "pair"), ref
    save_file(ref.state_dict(), tmp / "tiny.safetensors")  # diffusers' names in one file (taef2.safetensors' form)
    return vaekit.load(tmp / "tiny.safetensors"), ref


@pytest.mark.filterwarnings("ignore:.*assumed it previews")
@pytest.mark.parametrize("name, channels, levels", [(name, 16, 4) for name in ROUTES]  # taef1's and taesd3's shapes
                         + [(name, c, n) for c, n in ((4, 4), (64, 6)) for name in ROUTES[:3]])  # SD's; 32x (6 levels)
def test_matches_autoencoder_tiny(name: str, channels: int, levels: int, tmp_path: Path) -> None:
    ref = reference(channels, levels)
    ours, theirs = route(name, ref, tmp_path)
    assert ours.config.arch == "taesd" and ours.factor == 2 ** (levels - 1) and ours.config.latent_channels == channels
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    diffs = differences(ours, theirs)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_parameters_are_taesd_s_and_earlier_configs_unchanged() -> None:
    with torch.device("meta"):
        model = Autoencoder(preset("taesd"))
    assert (sum(p.numel() for p in model.encoder.parameters()), sum(p.numel() for p in model.decoder.parameters())) == (1_222_532, 1_222_531)
    assert not {"teacher", "latent_patches", "midblock_gn", "decoder_only", "linear"} & set(preset("sd1").to_dict())
    assert preset("taef1").teacher == "flux1" and preset("tae-hunyuanimage").factor == 32 and preset("tae-qwenimage2.1").in_channels == 4


# ---- the released files: either file, the folder, misleading names, a decoder alone -------------------------------------


def test_pair_found_from_either_file_or_the_folder_and_names_never_decide(tmp_path: Path) -> None:
    ref = reference(16)
    encoder, decoder = released_pair(ref)
    # a 16-channel pair named like SD1's taesd, with each file holding the other half: shapes decide, not names
    write_pair(tmp_path / "swapped", "taesd", encoder=decoder, decoder=encoder)
    for source in ("swapped", "swapped/taesd_encoder.pth", "swapped/taesd_decoder.pth"):
        with pytest.warns(UserWarning, match="assumed it previews flux1's latents.*sd3"):
            ours = vaekit.load(tmp_path / source)
        assert ours.config.latent_channels == 16 and ours.config.teacher == "flux1" and not ours.config.decoder_only
        assert max(differences(ours, ref).values()) < TOLERANCE
    # the teacher given: a preset of previews or the teacher's family; metadata-less files never say it
    assert vaekit.load(tmp_path / "swapped", family="taesd3").config.teacher == "sd3"
    assert vaekit.load(tmp_path / "swapped", family="sd3").config.family == "tae-sd3"
    with pytest.raises(ValueError, match="sd1 has 4-channel latents"):
        vaekit.load(tmp_path / "swapped", family="sd1")
    write_pair(tmp_path / "two", "taesd", encoder, decoder)
    write_pair(tmp_path / "two", "taesdxl", encoder, decoder)
    with pytest.raises(ValueError, match=r"holds the files of 2 tiny autoencoders \(taesd, taesdxl\): give one"):
        vaekit.load(tmp_path / "two")
    write_pair(tmp_path / "same", "x", encoder=decoder, decoder=decoder)
    with pytest.raises(ValueError, match="are both a tiny autoencoder's decoder"):
        vaekit.load(tmp_path / "same")


def test_decoder_alone_is_decoder_only_and_encoder_alone_is_refused(tmp_path: Path, capsys) -> None:
    ref = reference(4)
    encoder, decoder = released_pair(ref)
    write_pair(tmp_path / "dec", "taesdxl", None, decoder, suffix=".safetensors")
    ours = vaekit.load(tmp_path / "dec" / "taesdxl_decoder.safetensors", family="sdxl")
    assert ours.config.decoder_only and ours.config.teacher == "sdxl" and not list(ours.encoder.parameters())
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="decoder-only"):
        ours.encode(torch.zeros(1, 3, 64, 64))
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    assert main(["reconstruct", str(tmp_path / "dec"), str(tmp_path / "photos"), str(tmp_path / "out"), "--family", "sdxl"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "decoder-only" in err
    # written as a pair, the decoder's file alone says it is decoder-only; both files make the whole model again
    full = route("released pair .pth", ref, tmp_path)[0]
    save(full, tmp_path / "w" / "mine", format="pair")
    assert json.loads(safe_open(pair_file(tmp_path / "w" / "mine", "decoder"), "pt").metadata()["vaekit_config"])["decoder_only"]
    assert vaekit.load(tmp_path / "w").config == full.config
    pair_file(tmp_path / "w" / "mine", "decoder").unlink()
    with pytest.raises(ValueError, match=r"mine_encoder.safetensors is a tiny autoencoder's encoder alone.*decoder"):
        vaekit.load(tmp_path / "w")


# ---- every format both ways, FLUX.2's included -----------------------------------------------------------------------


def flux2_preview() -> Autoencoder:
    torch.manual_seed(0)
    return perturb(Autoencoder(preset("taef2")), 0.02).eval()


@pytest.mark.parametrize("kind", ["taef2", "tae-qwenimage2.1", "decoder-only", "linear"])
def test_every_format_round_trips(kind: str, tmp_path: Path) -> None:
    if kind == "taef2":
        model = flux2_preview()
    else:
        torch.manual_seed(0)
        teacher = preset("qwenimage2.1") if kind == "tae-qwenimage2.1" else preset("sd3")  # RGBA, 16x
        model = perturb(Autoencoder(preview_config(teacher, decoder_only=kind == "decoder-only", linear=kind == "linear")), 0.02).eval()
    formats = ["diffusers", "single-file"] + (["pair"] if kind != "linear" else [])
    for fmt in formats:
        target = tmp_path / {"diffusers": "folder", "single-file": "one.safetensors", "pair": f"{fmt}-files/m"}[fmt]
        save(model, target, format=fmt)
        again = vaekit.load(target.parent if fmt == "pair" else target)
        assert again.config == model.config, fmt
        assert all(torch.equal(again.state_dict()[k], t) for k, t in model.state_dict().items()), fmt


def test_flux2_one_file_form_is_recognised_and_speaks_flux2_s_patches(tmp_path: Path) -> None:
    model = flux2_preview()
    save(model, tmp_path / "vaekit.safetensors", format="single-file")
    tensors = load_file(tmp_path / "vaekit.safetensors")
    # taef2.safetensors' names: diffusers' (the decoder's indices one less than taesd.py's), with the GroupNorm branch in
    # the encoder's last 3 blocks and the decoder's first 3, 32 channels in the network
    assert tensors["decoder.layers.0.weight"].shape == (64, 32, 3, 3) and tensors["encoder.layers.14.weight"].shape == (32, 64, 3, 3)
    pools = sorted({k.split(".pool.")[0] for k in tensors if ".pool." in k})
    assert pools == [f"decoder.layers.{i}" for i in (2, 3, 4)] + [f"encoder.layers.{i}" for i in (11, 12, 13)]
    assert tensors["decoder.layers.2.pool.0.weight"].shape == (256, 64, 1, 1) and tensors["decoder.layers.2.pool.1.bias"].shape == (256,)
    save_file(tensors, tmp_path / "taef2.safetensors")  # as released: no vaekit metadata
    with pytest.warns(UserWarning, match="assumed it previews flux2's latents"):
        ck = read_checkpoint(tmp_path / "taef2.safetensors")
    assert ck.config == model.config and "2x2 latent patches" in " ".join(ck.notes)
    assert "diffusers AutoencoderTiny naming" in ck.format
    # the latents are FLUX.2's to_latent layout: 128 channels at 1/16, the network's 32 at 1/8 in 2x2 patches
    teacher = Autoencoder(preset("flux2").replace(block_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8)).eval()
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        z = teacher.to_latent(x)
        assert model.to_latent(x).shape == z.shape == (1, 128, 4, 6)
        network = torch.nn.Sequential(*model.decoder)  # taesd.py's decoder on the unpacked latent, [0, 1] out
        torch.testing.assert_close(model.from_latent(z), network(F.pixel_shuffle(z, 2)) * 2 - 1, atol=1e-6, rtol=0)


def test_files_that_are_not_tiny_autoencoders_say_so(tmp_path: Path) -> None:
    ref = reference(4)
    encoder, decoder = released_pair(ref)
    wide = {k: torch.zeros(256, *v.shape[1:]) if k == "1.weight" else v for k, v in decoder.items()}  # taesd.py's F32/F16 decoders widen
    torch.save(wide, tmp_path / "x_decoder.pth")
    with pytest.raises(ValueError, match="widths vary.*F32 or F16 variants"):
        vaekit.load(tmp_path / "x_decoder.pth")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "scaling_factor": 0.5}))
    save_file(ref.state_dict(), tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="scaling_factor/shift_factor other than 1/0"):
        vaekit.load(tmp_path / "d")
    # a file named like a pair but of another architecture is read as what it is
    torch.manual_seed(0)
    save(Autoencoder(preset("tiny-f8c4")), tmp_path / "vae_decoder.safetensors", format="single-file")
    assert vaekit.load(tmp_path / "vae_decoder.safetensors").config.arch == "ldm"


# ---- the linear preview ------------------------------------------------------------------------------------------------


def test_linear_preview_from_comfyui_factors_saves_loads_and_prints(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    factors, bias = torch.randn(16, 3, generator=g) * 0.2, torch.randn(3, generator=g) * 0.1
    model = linear_preview(factors.tolist(), bias.tolist(), preset("flux1"))
    z = torch.randn(1, 16, 5, 7, generator=g)
    want = F.interpolate(torch.einsum("nchw,cr->nrhw", z, factors) + bias.view(1, 3, 1, 1), scale_factor=8, mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(model.from_latent(z), want, atol=1e-5, rtol=0)
    save(model, tmp_path / "linear.safetensors", format="single-file")
    assert set(load_file(tmp_path / "linear.safetensors")) == {"latent_rgb_factors", "latent_rgb_factors_bias"}
    again = vaekit.load(tmp_path / "linear.safetensors")
    assert again.config == model.config and again.config.teacher == "flux1" and again.num_parameters() == 16 * 3 + 3
    text = comfyui_factors(again)
    assert text.startswith("latent_rgb_factors = [\n    #        R        G        B\n")
    f2, b2 = parse_comfyui_factors(text)
    assert np.abs(np.array(f2) - factors.numpy()).max() <= 5e-5 and np.abs(np.array(b2) - bias.numpy()).max() <= 5e-5
    # FLUX.2's, as ComfyUI's: 32 rows, applied to the unpacked 2x2 patches (128 channels at 1/16 in)
    flux2 = linear_preview(torch.randn(32, 3, generator=g), torch.zeros(3), preset("flux2"))
    assert flux2.config.factor == 16 and flux2.decode(torch.randn(1, 128, 2, 3)).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="takes 32 rows of 3 factors"):
        linear_preview(factors, bias, preset("flux2"))
    save_file(load_file(tmp_path / "linear.safetensors"), tmp_path / "bare.safetensors")  # ComfyUI's numbers, no metadata
    with pytest.warns(UserWarning, match="assumed it previews flux1's latents"):
        ck = read_checkpoint(tmp_path / "bare.safetensors")
    assert ck.config.linear and ck.config.factor == 8 and "8 assumed" in " ".join(ck.notes)


# ---- through the commands, and a latent dataset's space checked ----------------------------------------------------


def test_inspect_convert_and_decode_a_teacher_s_latent_dataset(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    save(Autoencoder(preset("tiny-f8c4")).eval(), tmp_path / "teacher")
    save(Autoencoder(preset("tiny-fast-f8c4")).eval(), tmp_path / "other")  # 4 channels at 8x too, another space
    preview = perturb(Autoencoder(preview_config(preset("tiny-f8c4"))), 0.02).eval()
    save(preview, tmp_path / "preview", format="pair")
    (tmp_path / "photos").mkdir()
    g = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(g.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")

    assert main(["inspect", str(tmp_path / "preview_decoder.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "family         tae-tiny-f8c4" in out and "teacher                tiny-f8c4" in out and "normalisation  none (scale 1)" in out
    assert main(["convert", str(tmp_path / "preview_encoder.safetensors"), str(tmp_path / "diffusers")]) == 0
    assert vaekit.load(tmp_path / "diffusers").config == preview.config
    for teacher in ("teacher", "other"):
        assert main(["encode", str(tmp_path / teacher), str(tmp_path / "photos"), str(tmp_path / f"lat-{teacher}"),
                     "--resolution", "32", "--workers", "0", "--dtype", "fp32"]) == 0  # fmt: skip
    # the teacher's dataset: decoded from its normalised latents, as the preview's own decode of them
    assert main(["decode", str(tmp_path / "preview_encoder.safetensors"), str(tmp_path / "lat-teacher"), str(tmp_path / "dec")]) == 0
    data = vaekit.LatentDataset(tmp_path / "lat-teacher")
    name = data.items[0]["source"]
    with torch.no_grad():
        want = vaekit.data.to_uint8(preview.from_latent(data[0]["latent"][None]))[0]
    assert np.abs(np.asarray(Image.open(tmp_path / "dec" / name)).astype(int) - want).max() <= 1
    # another space: refused in one line naming both, unless --force
    capsys.readouterr()
    assert main(["decode", str(tmp_path / "preview_encoder.safetensors"), str(tmp_path / "lat-other"), str(tmp_path / "dec2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "speaks tiny-f8c4's latents" in err and "these are tiny-fast-f8c4's" in err and "--force" in err
    assert main(["decode", str(tmp_path / "preview_encoder.safetensors"), str(tmp_path / "lat-other"), str(tmp_path / "dec2"), "--force"]) == 0
    # latents the preview itself encoded are its teacher's too
    assert main(["encode", str(tmp_path / "preview_decoder.safetensors"), str(tmp_path / "photos"), str(tmp_path / "lat-preview"),
                 "--resolution", "32", "--workers", "0", "--dtype", "fp32"]) == 0  # fmt: skip
    assert main(["decode", str(tmp_path / "preview_decoder.safetensors"), str(tmp_path / "lat-preview"), str(tmp_path / "dec5")]) == 0
    # a teacher without a family (one trained here) is named by its weights, which its datasets record
    unnamed = vaekit.load(tmp_path / "teacher")
    unnamed.config = unnamed.config.replace(family="", scaling_factor=0.5)  # no preset's: nothing names it
    save(unnamed, tmp_path / "unnamed")
    assert main(["encode", str(tmp_path / "unnamed"), str(tmp_path / "photos"), str(tmp_path / "lat-unnamed"), "--resolution", "32",
                 "--workers", "0", "--dtype", "fp32"]) == 0  # fmt: skip
    mine = preview_model(vaekit.load(tmp_path / "unnamed"))
    assert mine.config.teacher.startswith("weights:") and mine.config.family == ""
    save(mine, tmp_path / "mine.safetensors", format="single-file")
    assert main(["decode", str(tmp_path / "mine.safetensors"), str(tmp_path / "lat-unnamed"), str(tmp_path / "dec3")]) == 0
    assert main(["decode", str(tmp_path / "mine.safetensors"), str(tmp_path / "lat-teacher"), str(tmp_path / "dec4")]) == 1
    assert main(["decode", str(tmp_path / "mine.safetensors"), str(tmp_path / "lat-teacher"), str(tmp_path / "dec4"), "--raw"]) == 1
    assert "not raw ones" in capsys.readouterr().err


# ---- the table in docs/PREVIEWS.md: python tests/test_taesd.py ----------------------------------------------------------


def parity_table() -> None:
    """Print the per-route differences test_matches_autoencoder_tiny bounds (docs/PREVIEWS.md), 1 thread, fp32."""
    import tempfile
    import warnings

    torch.set_num_threads(1)
    print("| shapes | route | encode | decode |\n|---|---|---|---|")
    for channels, levels in ((4, 4), (16, 4), (64, 6)):
        for name in ROUTES:
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                diffs = differences(*route(name, reference(channels, levels), Path(tmp)))
            print(f"| {channels} ch at {2 ** (levels - 1)}x | {name} | {diffs['encode']:.1e} | {diffs['decode']:.1e} |")


if __name__ == "__main__":
    parity_table()
