"""`vaekit inspect` and `vaekit convert`."""

from __future__ import annotations

import pathlib

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import preset
from vaekit.checkpoints import read_checkpoint
from vaekit.cli import main
from vaekit.layouts.ldm import diffusers_key_map
from vaekit.model import Autoencoder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def field(out: str, name: str) -> str:
    return next(line[len(name):].strip() for line in out.splitlines() if line.startswith(name))


def test_inspect_diffusers_folder(tiny_model, tmp_path, capsys):
    model = tiny_model
    model.config = model.config.replace(scaling_factor=0.3611, shift_factor=0.1159)
    model.save(tmp_path / "d")
    code, out, err = run(capsys, "inspect", str(tmp_path / "d"))
    assert code == 0 and err == ""
    assert field(out, "format") == "diffusers folder"
    assert field(out, "parameters") == f"{model.num_parameters():,} ({model.num_parameters() / 1e6:.1f}M)"
    assert field(out, "factor") == "8x" and field(out, "latent ch") == "4"
    assert field(out, "normalisation") == "(z - 0.1159) * 0.3611   [config.json]"
    assert field(out, "dtype") == "float32"
    assert field(out, "  norm_groups") == "8"


@pytest.fixture
def flux_sized_file(tmp_path) -> pathlib.Path:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Autoencoder(preset("flux1")).state_dict().items()}
    path = tmp_path / "ae.safetensors"
    save_file({k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}, path)
    return path


def test_inspect_says_what_it_assumed_and_family_overrides(flux_sized_file, capsys):
    code, out, err = run(capsys, "inspect", str(flux_sized_file))
    assert code == 0
    assert field(out, "normalisation").startswith("(z - 0.1159) * 0.3611   [assumed flux1:")
    assert field(out, "dtype") == "bfloat16" and field(out, "family") == "flux1"
    assert len(err.splitlines()) == 1 and err.startswith("vaekit inspect: warning: ") and "assumed flux1" in err
    assert any(line.startswith("note: config inferred from tensor shapes") for line in out.splitlines())
    code, out, err = run(capsys, "inspect", str(flux_sized_file), "--family", "sd3")
    assert code == 0 and err == ""
    assert field(out, "normalisation") == "(z - 0.0609) * 1.5305   [family='sd3' argument]"
    assert field(out, "family") == "sd3"


def test_convert_preset_to_single_file_then_to_diffusers(tmp_path, capsys):
    code, out, _ = run(capsys, "convert", "preset:tiny-f8c16", str(tmp_path / "t.safetensors"), "--format", "single-file", "--dtype", "fp16")
    assert code == 0 and out.strip() == f"wrote {tmp_path / 't.safetensors'} (single-file, fp16)"
    stored = load_file(tmp_path / "t.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert read_checkpoint(tmp_path / "t.safetensors").config == preset("tiny-f8c16")

    code, _, _ = run(capsys, "convert", str(tmp_path / "t.safetensors"), str(tmp_path / "d"), "--dtype", "fp32")
    assert code == 0
    ref = AutoencoderKL.from_pretrained(tmp_path / "d")  # diffusers reads the converted folder
    names = diffusers_key_map(4, 1)
    ref_sd = ref.state_dict()
    for k, t in stored.items():
        assert torch.equal(ref_sd[names[k]].reshape(t.shape), t.float()), k
    assert (ref.config.latent_channels, ref.config.use_quant_conv) == (16, False)
    assert vaekit.load(tmp_path / "d").config == preset("tiny-f8c16")


class Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path("never-created"),))


def test_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "out"))
    assert code == 1 and err == f"vaekit convert: error: no such file or folder: {tmp_path / 'missing.safetensors'}\n"
    code, _, err = run(capsys, "convert", "preset:tiny-f8c4", str(tmp_path / "out.ckpt"), "--format", "single-file")
    assert code == 1 and "a single-file checkpoint is a .safetensors file" in err and len(err.splitlines()) == 1
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    code, _, err = run(capsys, "inspect", str(tmp_path / "evil.pt"))
    assert code == 1 and len(err.splitlines()) == 1 and "nothing was executed" in err
    assert not pathlib.Path("never-created").exists()
