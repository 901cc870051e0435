"""No command loses a user's file, and errors speak the command line's words (issue 10)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata

import vaekit
from vaekit import progress as progress_module
from vaekit.cli import main
from vaekit.data import find_images, read_image, write_image


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_dir(tmp_path, tiny_model) -> Path:
    tiny_model.save(str(tmp_path / "model"))
    return tmp_path / "model"


@pytest.fixture
def photos(tmp_path) -> Path:
    """x.jpg and x.png (same stem), a nested photo, all 32x32."""
    root = tmp_path / "photos"
    write_image(root / "x.jpg", skdata.astronaut()[::16, ::16])
    write_image(root / "x.png", skdata.chelsea()[:256:8, :256:8])
    write_image(root / "sub" / "y.png", skdata.coffee()[:256:8, :256:8])
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reconstruct_into_its_own_input_is_refused_and_touches_nothing(photos, model_dir, capsys):
    before = snapshot(photos)
    code, _, err = run(capsys, "reconstruct", model_dir, photos, photos)
    assert code == 1 and err.count("\n") == 1 and "OUTDIR is INPUT" in err
    # One image onto itself: refused, whatever --overwrite says.
    code, _, err = run(capsys, "reconstruct", model_dir, photos / "x.png", photos / "x.png", "--overwrite")
    assert code == 1 and "is one of the inputs" in err
    # A folder that holds files vaekit did not write (here: the photos' parent) is no OUTDIR either.
    code, _, err = run(capsys, "reconstruct", model_dir, photos, photos.parent, "--overwrite")
    assert code == 1 and "already holds files that vaekit did not write" in err
    assert snapshot(photos) == before


def test_same_stem_inputs_keep_apart_and_the_count_is_what_was_written(photos, model_dir, tmp_path, capsys):
    out = tmp_path / "recon"
    code, stdout, _ = run(capsys, "reconstruct", model_dir, photos, out)
    assert code == 0 and stdout.strip() == f"wrote 3 reconstructions to {out}"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["sub/y.png", "x.jpg.png", "x.png"]
    assert read_image(out / "x.png").mean() != read_image(out / "x.jpg.png").mean()  # two different photos
    # An existing output is never replaced without --overwrite, and the refusal comes before any work.
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    code, _, err = run(capsys, "reconstruct", model_dir, photos, out)
    assert code == 1 and "recon/sub/y.png (and 2 more of the 3 files to write) already exists: pass --overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamp
    code, stdout, _ = run(capsys, "reconstruct", model_dir, photos / "sub", out / "sub", "--overwrite")
    assert code == 0 and stdout.startswith("wrote 1 reconstruction to")  # singular


def test_outputs_inside_the_input_are_never_read_back(photos, model_dir, capsys):
    for _ in range(2):
        code, stdout, _ = run(capsys, "reconstruct", model_dir, photos, photos / "recon", "--overwrite")
        assert code == 0 and "wrote 3 reconstructions" in stdout
    assert not (photos / "recon" / "recon").exists()
    assert (photos / "recon" / ".vaekit-output").is_file()
    # Every image search skips vaekit's output folders below the searched one (not the searched folder itself).
    assert [p.relative_to(photos).as_posix() for p in find_images(photos)] == ["sub/y.png", "x.jpg", "x.png"]
    assert len(find_images(photos / "recon")) == 3


def test_one_image_to_a_file_name_writes_that_file(photos, model_dir, tmp_path, capsys):
    code, stdout, _ = run(capsys, "reconstruct", model_dir, photos / "x.jpg", tmp_path / "out.png")
    assert code == 0 and (tmp_path / "out.png").is_file() and read_image(tmp_path / "out.png").shape == (32, 32, 3)
    assert stdout.strip() == f"wrote 1 reconstruction to {tmp_path / 'out.png'}"
    code, _, err = run(capsys, "reconstruct", model_dir, photos, tmp_path / "out.png")
    assert code == 1 and "is a file" in err


def test_convert_takes_the_format_from_the_destination_and_never_replaces_silently(tmp_path, capsys):
    dest = tmp_path / "out.safetensors"
    code, stdout, _ = run(capsys, "convert", "preset:tiny-f8c4", dest)
    assert code == 0 and dest.is_file() and stdout.strip() == f"wrote {dest} (single-file)"
    code, _, err = run(capsys, "convert", "preset:tiny-f8c4", tmp_path / "x.safetensors", "--format", "diffusers")
    assert code == 1 and "--format diffusers writes a folder" in err and not (tmp_path / "x.safetensors").exists()
    code, _, err = run(capsys, "convert", "preset:tiny-f8c4", dest)
    assert code == 1 and "already exists: pass --overwrite" in err
    code, _, err = run(capsys, "convert", dest, dest, "--overwrite")
    assert code == 1 and "is one of the inputs" in err
    # preset:NAME weights are seeded: two converts agree, another --seed differs.
    assert run(capsys, "convert", "preset:tiny-f8c4", tmp_path / "b.safetensors")[0] == 0
    assert run(capsys, "convert", "preset:tiny-f8c4", tmp_path / "c.safetensors", "--seed", "1")[0] == 0
    a, b, c = (load_file(tmp_path / f"{n}.safetensors") for n in ("out", "b", "c"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_family_names_are_forgiving_and_errors_list_the_valid_ones(tmp_path, capsys):
    code, out, _ = run(capsys, "inspect", "preset:FLUX1")
    assert code == 0 and "family         flux1" in out
    code, _, err = run(capsys, "inspect", "preset:sdx")
    assert code == 1 and "choose one of sd1, sdxl" in err and "alias: flux" in err


def test_reconstruct_defaults_to_fp32_whatever_the_file_stores(tiny_model, photos, tmp_path, capsys):
    tiny_model.save(str(tmp_path / "half"), dtype=torch.float16)
    tiny_model.save(str(tmp_path / "full"))
    for name in ("half", "full"):
        assert run(capsys, "reconstruct", tmp_path / name, photos / "x.png", tmp_path / f"{name}.png")[0] == 0
    # fp16 weights computed in fp32 differ from fp32 weights by the weights' rounding only.
    half, full = (read_image(tmp_path / f"{n}.png").astype(int) for n in ("half", "full"))
    assert np.abs(half - full).max() <= 1
    assert run(capsys, "reconstruct", tmp_path / "half", photos / "x.png", tmp_path / "h16.png", "--dtype", "fp16")[0] == 0


def test_os_errors_name_the_path_and_what_to_do(photos, model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = run(capsys, "reconstruct", model_dir, photos, tmp_path / "file" / "recon")
    assert code == 1 and err == f"vaekit reconstruct: error: {tmp_path / 'file'}: part of this path is a file, not a folder\n"
    code, _, err = run(capsys, "eval", model_dir, photos, "--json", tmp_path / "file" / "r.json")
    assert code == 1 and "part of this path is a file" in err


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["presets"]) == 0
    assert capsys.readouterr().err == ""


def test_report_folders_must_be_new_empty_or_vaekits(photos, model_dir, capsys):
    code, _, err = run(capsys, "analyze", model_dir, photos, "--report", photos, "--lpips", "off", "--resolution", "32")
    assert code == 1 and "already holds files that vaekit did not write" in err


def test_progress_goes_to_logs_as_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LOG_EVERY", 0.0)
    for _ in progress_module.progress(range(3), "reconstruct", "img"):
        pass
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and lines and lines[-1].startswith("reconstruct: 3/3 img (100%)")
    monkeypatch.setattr(progress_module, "LOG_EVERY", 60.0)  # work shorter than the interval prints nothing
    for _ in progress_module.progress(range(3), "reconstruct", "img"):
        pass
    assert capsys.readouterr().err == ""


def test_eval_scores_in_fp32_by_default_and_records_the_dtype(tiny_model, photos, tmp_path, capsys):
    tiny_model.save(str(tmp_path / "half"), dtype=torch.float16)
    for extra, dtype in (([], "float32"), (["--dtype", "fp16"], "float16")):
        assert run(capsys, "eval", tmp_path / "half", photos / "sub", "--json", tmp_path / "r.json", *extra)[0] == 0
        assert json.loads((tmp_path / "r.json").read_text())["protocol"]["reconstruction"]["dtype"] == dtype


# ---- every command that writes: never over its inputs (issue 25) -------------------------------------


WRITERS = {  # command line -> what it would have written over
    "reconstruct into its input": ["reconstruct", "{model}", "{data}", "{data}"],
    "convert over its source": ["convert", "{model}", "{model}", "--overwrite"],
    "calibrate --write over its model": ["calibrate", "{model}", "{data}", "--resolution", "16", "--write", "{model}", "--overwrite"],
    "eval --json over the model": ["eval", "{model}", "{data}", "--json", "{model}"],
    "eval --json over an image": ["eval", "{model}", "{data}", "--json", "{data}/x.png"],
    "bench --json over the model": ["bench", "{model}", "--size", "16", "--repeats", "1", "--against", "none", "--json", "{model}"],
    "encode into the data folder": ["encode", "{model}", "{data}", "{data}", "--resolution", "16"],
    "decode into the data folder": ["decode", "{model}", "{latents}", "{data}"],
    "decode over its latents file": ["decode", "{model}", "{latents}", "{latents_dir}"],
    "analyze --report into the data folder": ["analyze", "{model}", "{data}", "--report", "{data}", "--resolution", "16"],
    "compare --report into the data folder": ["compare", "{model}", "{model}", "{data}", "--report", "{data}", "--resolution", "16"],
    "diffusability --out into the data folder": ["diffusability", "{model}", "{data}", "--out", "{data}"],
    "train --out into the data folder": ["train", "--data", "{data}", "--out", "{data}", "--preset", "tiny-f8c4", "--steps", "1"],
}


@pytest.mark.parametrize("case", list(WRITERS))
def test_no_command_writes_over_its_inputs(case, photos, tiny_model, tmp_path, capsys):
    from safetensors.torch import save_file

    model = tmp_path / "model.safetensors"
    tiny_model.save(str(model), format="single-file")
    latents_dir = tmp_path / "z"
    latents_dir.mkdir()
    save_file({"z": torch.randn(4, 4, 4)}, str(latents_dir / "z.safetensors"))
    names = {"model": model, "data": photos, "latents": latents_dir / "z.safetensors", "latents_dir": latents_dir}
    before = {**snapshot(photos), "model": model.read_bytes(), "latents": snapshot(latents_dir)}
    code, _, err = run(capsys, *(a.format(**names) for a in WRITERS[case]))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert {**snapshot(photos), "model": model.read_bytes(), "latents": snapshot(latents_dir)} == before
