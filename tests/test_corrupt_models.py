"""A model file that is empty, truncated or corrupt is refused in one line naming it, by every command."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vaekit import AutoencoderConfig
from vaekit import checkpoints as ckpt
from vaekit.checkpoints import UnreadableFile, read_checkpoint
from vaekit.cli import main
from vaekit.model import Autoencoder

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """One tiny model in every format: single file, diffusers folder (.safetensors and .bin), .pt."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=8, latent_channels=4))
    model.save(root / "vae.safetensors", format="single-file")
    model.save(root / "folder")
    shutil.copytree(root / "folder", root / "binfolder")
    (root / "binfolder" / WEIGHTS).unlink()
    torch.save(ckpt.read_checkpoint(root / "folder").state_dict, root / "vae.pt")  # native names: read as is
    torch.save(load_file(root / "folder" / WEIGHTS), root / "binfolder" / "diffusion_pytorch_model.bin")
    return root


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def cut(path: Path, keep: Callable[[bytes], bytes]) -> None:
    path.write_bytes(keep(path.read_bytes()))


# name -> (what to copy from `good`, how to break the copy, which file the error must name: relative to the copy)
def _variants() -> dict[str, tuple[str, Callable[[Path], None], str]]:
    noise = random.Random(0).randbytes
    sf = "vae.safetensors"
    return {
        "st-empty": (sf, lambda p: p.write_bytes(b""), ""),
        "st-cut-in-length": (sf, lambda p: cut(p, lambda b: b[:5]), ""),
        "st-cut-after-length": (sf, lambda p: cut(p, lambda b: b[:8]), ""),
        "st-cut-in-header": (sf, lambda p: cut(p, lambda b: b[: 8 + header_length(b) // 2]), ""),
        "st-cut-in-data": (sf, lambda p: cut(p, lambda b: b[: 8 + header_length(b) + 1000]), ""),
        "st-cut-last-bytes": (sf, lambda p: cut(p, lambda b: b[:-3]), ""),
        "st-random-bytes": (sf, lambda p: p.write_bytes(noise(4000)), ""),
        "st-length-claims-too-much": (sf, lambda p: cut(p, lambda b: struct.pack("<Q", header_length(b) + 10**6) + b[8:]), ""),
        "st-length-absurd": (sf, lambda p: cut(p, lambda b: struct.pack("<Q", 2**63) + b[8:]), ""),
        "st-header-not-json": (sf, lambda p: cut(p, lambda b: b[:8] + b"{" * header_length(b) + b[8 + header_length(b):]), ""),
        "st-metadata-not-json": (sf, lambda p: save_file(load_file(p), p, metadata={ckpt.METADATA_KEY: "{'kind': 'vae'"}), ""),
        "pt-empty": ("vae.pt", lambda p: p.write_bytes(b""), ""),
        "pt-cut": ("vae.pt", lambda p: cut(p, lambda b: b[: len(b) // 2]), ""),
        "pt-text": ("vae.pt", lambda p: p.write_bytes(b"<html>404 Not Found</html>\n"), ""),
        "pt-list": ("vae.pt", lambda p: torch.save([torch.zeros(1)], p), ""),
        "folder-weights-cut": ("folder", lambda p: cut(p / WEIGHTS, lambda b: b[: len(b) // 3]), WEIGHTS),
        "folder-weights-empty": ("folder", lambda p: (p / WEIGHTS).write_bytes(b""), WEIGHTS),
        "folder-bin-cut": ("binfolder", lambda p: cut(p / "diffusion_pytorch_model.bin", lambda b: b[:-100]),
                           "diffusion_pytorch_model.bin"),
        "folder-config-empty": ("folder", lambda p: (p / "config.json").write_text(""), "config.json"),
        "folder-config-not-json": ("folder", lambda p: (p / "config.json").write_text("{'block_out_channels': [8, 16]}"), "config.json"),
        "folder-config-cut": ("folder", lambda p: cut(p / "config.json", lambda b: b[: len(b) // 2]), "config.json"),
        "folder-config-list": ("folder", lambda p: (p / "config.json").write_text("[8, 16]"), "config.json"),
        "folder-config-binary": ("folder", lambda p: (p / "config.json").write_bytes(noise(300)), "config.json"),
        "folder-config-wrong-type": ("folder", lambda p: (p / "config.json").write_text('{"block_out_channels": "8, 16"}'), "config.json"),
    }


VARIANTS = _variants()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Tiny valid inputs, so any failure is the model file's."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    save_file({"samples": torch.randn(1, 4, 4, 4)}, root / "latents.safetensors")
    return root


@pytest.fixture(scope="module")
def broken(good, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every variant: (the model path to pass, the broken file the error must name)."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, (source, damage, bad) in VARIANTS.items():
        model = root / name / source
        model.parent.mkdir()
        (shutil.copytree if (good / source).is_dir() else shutil.copy)(good / source, model)
        damage(model)
        out[name] = (model, model / bad if bad else model)
    return out


COMMANDS = {
    "inspect": lambda m, i, o: ["inspect", m],
    "convert": lambda m, i, o: ["convert", m, o / "out.safetensors"],
    "reconstruct": lambda m, i, o: ["reconstruct", m, i / "photos", o / "recon", "--device", "cpu"],
    "encode": lambda m, i, o: ["encode", m, i / "photos", o / "lat", "--resolution", "16", "--workers", "0", "--device", "cpu"],
    "eval": lambda m, i, o: ["eval", m, i / "photos", "--device", "cpu"],
    "calibrate": lambda m, i, o: ["calibrate", m, i / "photos", "--resolution", "16", "--device", "cpu"],
    "decode": lambda m, i, o: ["decode", m, i / "latents.safetensors", o / "dec", "--device", "cpu"],
}


def refused(capsys, command: str, argv: list, bad: Path) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith(f"vaekit {command}: error: ") and str(bad) in err, err
    assert "Traceback" not in err and "SafetensorError" not in err, err
    return err


@pytest.mark.filterwarnings("ignore:.*latent normalisation")
def test_the_good_files_load(good):
    for source in ("vae.safetensors", "folder", "binfolder", "vae.pt"):
        read_checkpoint(good / source)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_command_refuses_every_broken_file_in_one_line(command, variant, broken, inputs, tmp_path, capsys):
    model, bad = broken[variant]
    err = refused(capsys, command, COMMANDS[command](model, inputs, tmp_path), bad)
    assert "again" in err  # what to do: download, convert or fix it again
    assert not any(tmp_path.iterdir())  # nothing written


def test_messages_say_what_is_wrong(broken, capsys):
    expect = {
        "st-empty": "is not a valid .safetensors file (empty: 0 bytes): download or convert it again",
        "st-cut-in-length": "(truncated: 5 bytes, less than its 8-byte header length)",
        "st-cut-in-header": "(truncated or corrupt: its header length says",
        "st-cut-in-data": "(truncated: its tensors need",
        "st-length-absurd": "not a .safetensors file",
        "st-metadata-not-json": "(its vaekit_config metadata is not JSON: ",
        "pt-empty": "is not a valid torch checkpoint (empty: 0 bytes)",
        "pt-cut": "is not a valid torch checkpoint (truncated or corrupt, ",
        "pt-list": "(it holds a list, not a state dict of tensors)",
        "folder-config-empty": "config.json is not a valid config.json (empty): download it again or fix it",
        "folder-config-not-json": "(not JSON: Expecting property name enclosed in double quotes at line 1 column 2)",
        "folder-config-list": "(a JSON list, not an object of settings {...})",
        "folder-config-binary": "(not text: byte ",
        "folder-config-wrong-type": "(settings vaekit cannot use: ",
    }
    for variant, words in expect.items():
        model, bad = broken[variant]
        with pytest.raises(UnreadableFile) as e:
            read_checkpoint(model)
        assert e.value.path == bad and words in str(e.value), (variant, str(e.value))


def test_a_failure_at_get_tensor_names_the_file_too(good, monkeypatch):
    """safetensors may fail lazily, reading a tensor, after the open succeeded."""
    real = ckpt.safe_open

    class Lazy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_tensor(self, name):
            raise SafetensorError("Error while deserializing header: boom")

    monkeypatch.setattr(ckpt, "safe_open", Lazy)
    for path in (good / "vae.safetensors", good / "folder"):
        with pytest.raises(UnreadableFile, match="is not a valid .safetensors file .corrupt: boom"):
            read_checkpoint(path)


def test_a_damaged_hub_download_says_to_clear_the_cache(broken, tmp_path, monkeypatch, capsys):
    cached = tmp_path / "hub" / "models--someone--vae"
    file = cached / "snapshots" / "abc123" / "ae.safetensors"
    file.parent.mkdir(parents=True)
    shutil.copy(broken["st-cut-in-data"][0], file)
    monkeypatch.setattr(ckpt, "_download", lambda repo: file)
    err = refused(capsys, "inspect", ["inspect", "someone/vae"], file)
    assert f"remove it (rm -r {cached}) and run again" in err


def test_pickles_that_would_run_code_are_still_refused_as_such(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    err = refused(capsys, "inspect", ["inspect", tmp_path / "evil.pt"], tmp_path / "evil.pt")
    assert "never executes pickles (nothing was executed" in err and "executed\n" not in capsys.readouterr().out


def test_inspect_pixel_space_has_no_dtype_to_show(capsys):
    assert main(["inspect", "preset:pixel"]) == 0
    out = capsys.readouterr().out
    dtype = next(line for line in out.splitlines() if line.startswith("dtype"))
    assert dtype.split(None, 1)[1] == "none (pixel space has no weights)"
    assert "mixed" not in out
