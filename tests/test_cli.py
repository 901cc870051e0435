import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage import data as skdata

from vaekit import load
from vaekit.cli import build_parser, main
from vaekit.data import read_image, to_tensor, to_uint8, write_image


def _subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: vaekit {command}" in out and len(out) > 100


def test_presets_lists_families(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, norm in [("sd1", "z * 0.18215"), ("sdxl", "z * 0.13025"), ("sd3", "(z - 0.0609) * 1.5305"),
                       ("flux1", "(z - 0.1159) * 0.3611"), ("tiny-f8c16", "none (scale 1)"),
                       ("flux2", "2x2 patches (128 ch at 16x), BatchNorm stats"), ("pixel-p16", "none (scale 1)")]:
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert f"  {norm}  " in line, line
    assert next(l for l in out.splitlines() if l.startswith("pixel-p16 ")).split()[1:4] == ["0.0M", "16x", "768"]


@pytest.fixture
def photo_tree(tmp_path):
    """A folder of real photos: nested, one odd size, one grayscale, one unreadable file."""
    root = tmp_path / "photos"
    write_image(root / "a.png", skdata.astronaut()[::8, ::8])  # 64x64
    write_image(root / "sub" / "cat.jpg", skdata.chelsea()[:60, 100:150])  # 60x50: not a multiple of 8
    write_image(root / "sub" / "deep" / "camera.png", skdata.camera()[::16, ::16])  # grayscale 32x32
    (root / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    path = tmp_path / "model"
    tiny_model.save(str(path))
    return path


def test_reconstruct_folder_keeps_names_sizes_and_values(photo_tree, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reconstruct", str(model_dir), str(photo_tree), str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped unreadable" in captured.err and "broken.png" in captured.err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a.png", "sub/cat.png", "sub/deep/camera.png"]
    model = load(str(model_dir))
    for src, dst in [("a.png", "a.png"), ("sub/cat.jpg", "sub/cat.png"), ("sub/deep/camera.png", "sub/deep/camera.png")]:
        image = read_image(photo_tree / src)
        got = read_image(out / dst)
        assert got.shape == image.shape
        with torch.inference_mode():
            expected = to_uint8(model(to_tensor(image), pad=True)[0])[0]
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_reconstruct_single_file_tiled(photo_tree, model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["reconstruct", str(model_dir), str(photo_tree / "a.png"), str(out), "--tile", "32"]) == 0
    assert read_image(out / "a.png").shape == (64, 64, 3)


def test_reconstruct_no_pad_rejects_odd_sizes(photo_tree, model_dir, tmp_path, capsys):
    code = main(["reconstruct", str(model_dir), str(photo_tree / "sub" / "cat.jpg"), str(tmp_path / "o"), "--no-pad"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "cat.jpg is 60x50, not a multiple of the model's factor 8: crop or resize it to 56x48 or 64x56, or drop --no-pad" in err


def test_reconstruct_fails_when_nothing_is_readable(tmp_path, model_dir, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"garbage")
    code = main(["reconstruct", str(model_dir), str(tmp_path / "in"), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1 and "no image under" in err and "skipped unreadable" in err and "x.png" in err


def test_console_script_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vaekit.cli", "inspect", str(tmp_path / "missing.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("vaekit inspect: error:")


def test_advice_names_the_python_argument_from_python_and_the_flag_from_the_cli(photo_tree, model_dir, tmp_path, capsys):
    from vaekit.reconstruct import reconstruct

    out = tmp_path / "out"
    assert main(["reconstruct", str(model_dir), str(photo_tree / "a.png"), str(out / "a.png")]) == 0
    assert main(["reconstruct", str(model_dir), str(photo_tree / "a.png"), str(out / "a.png")]) == 1
    assert "already exists: pass --overwrite to replace it" in capsys.readouterr().err
    # From Python, after the command line has run in this process: the argument's name.
    with pytest.raises(ValueError, match=r"already exists: pass overwrite=True to replace it"):
        reconstruct(load(str(model_dir)), photo_tree / "a.png", out / "a.png")
