"""Checkpoint formats, the family/normalisation rule, the pickle rule, strict keys, dtypes."""

from __future__ import annotations

import json
import pathlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import AutoencoderConfig, preset
from vaekit.checkpoints import read_checkpoint, save
from vaekit.files import write_atomic
from vaekit.layouts.ldm import diffusers_key_map
from vaekit.model import Autoencoder


def same_weights(a: Autoencoder, b: Autoencoder) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def zeros_like_model(config: AutoencoderConfig, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A full-size state dict without the cost of random init (values do not matter for reading)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Autoencoder(config).state_dict().items()}
    return {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}


@pytest.fixture
def tiny_file(tiny_model, tmp_path) -> Path:
    path = tmp_path / "vae.safetensors"
    save_file(tiny_model.state_dict(), path)  # LDM names, no metadata: like sdxl_vae.safetensors
    return path


# ---- the one name mapping ----------------------------------------------------------------------


def test_key_map_matches_diffusers_names_exactly():
    config = AutoencoderConfig(block_channels=(16, 32, 32, 64), layers_per_block=2, norm_groups=8)
    names = diffusers_key_map(4, 2)
    with torch.device("meta"):
        ours = Autoencoder(config).state_dict().keys()
    ref = AutoencoderKL(block_out_channels=(16, 32, 32, 64), layers_per_block=2, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    assert {names[k] for k in ours} == set(ref.state_dict())
    assert len(set(names.values())) == len(names)  # one-to-one, so it inverts
    assert names["decoder.up.3.block.0.conv1.weight"] == "decoder.up_blocks.0.resnets.0.conv1.weight"
    assert names["decoder.up.1.upsample.conv.bias"] == "decoder.up_blocks.2.upsamplers.0.conv.bias"
    assert names["encoder.mid.attn_1.proj_out.weight"] == "encoder.mid_block.attentions.0.to_out.0.weight"
    assert names["encoder.down.1.block.0.nin_shortcut.weight"] == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert names["decoder.norm_out.weight"] == "decoder.conv_norm_out.weight"


def test_diffusers_folder_has_linear_attention_and_a_clean_config(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "d")
    weights = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    assert weights["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["_vaekit"] == tiny_model.config.to_dict()
    # diffusers drops "_" keys without a word: nothing unused means no "unexpected config" warning.
    _, unused, _ = AutoencoderKL.extract_init_dict(config)
    assert unused == {}


# ---- formats -----------------------------------------------------------------------------------


def test_single_file_without_metadata_infers_the_config(tmp_path):
    config = AutoencoderConfig(block_channels=(32, 64, 64), layers_per_block=2, latent_channels=8)
    torch.manual_seed(0)
    model = perturb(Autoencoder(config))
    save_file(model.state_dict(), tmp_path / "v.safetensors")
    with pytest.warns(UserWarning, match="unknown"):
        ck = read_checkpoint(tmp_path / "v.safetensors")
    assert ck.config == config
    assert ck.format == "single-file (LDM naming)"
    assert any("norm_groups=32 assumed" in n for n in ck.notes)
    with pytest.warns(UserWarning, match="unknown"):
        assert same_weights(vaekit.load(tmp_path / "v.safetensors"), model)


@pytest.mark.parametrize("changes", [
    dict(kind="ae", use_quant_conv=False, use_post_quant_conv=False, mid_attention=False),
    dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, in_channels=4, out_channels=1),
])
def test_inference_from_shapes(tmp_path, changes):
    config = AutoencoderConfig(block_channels=(32, 64, 64), layers_per_block=1, **changes)
    torch.save(Autoencoder(config).state_dict(), tmp_path / "v.pt")
    with pytest.warns(UserWarning):
        assert read_checkpoint(tmp_path / "v.pt").config == config


def test_full_sdxl_checkpoint_takes_first_stage_model_and_names_the_family(tiny_model, tmp_path):
    sd = {f"first_stage_model.{k}": v for k, v in tiny_model.state_dict().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    sd["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(8)
    save_file(sd, tmp_path / "sdxl.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evidence, not a guess: no warning
        ck = read_checkpoint(tmp_path / "sdxl.safetensors")
    assert ck.format == "full checkpoint (first_stage_model. part, LDM naming)"
    assert (ck.config.family, ck.config.scaling_factor, ck.config.shift_factor) == ("sdxl", 0.13025, 0.0)
    assert "conditioner.embedders." in ck.normalisation_source
    assert "ignored 2 tensors outside first_stage_model." in ck.notes[0]
    assert same_weights(vaekit.load(tmp_path / "sdxl.safetensors"), tiny_model)


def test_ldm_ckpt_with_state_dict_and_training_tensors(tiny_model, tmp_path):
    sd = {f"first_stage_model.{k}": v for k, v in tiny_model.state_dict().items()}
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(8)
    sd["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    torch.save({"state_dict": sd, "global_step": 840000}, tmp_path / "sd15.ckpt")
    ck = read_checkpoint(tmp_path / "sd15.ckpt")
    assert (ck.config.family, ck.config.scaling_factor) == ("sd1", 0.18215)
    assert any("ignored 1 training-only tensors" in n for n in ck.notes)
    assert same_weights(vaekit.load(tmp_path / "sd15.ckpt"), tiny_model)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_torch_state_dict_files(tiny_model, tmp_path, suffix):
    torch.save(tiny_model.state_dict(), tmp_path / f"vae{suffix}")
    with pytest.warns(UserWarning):
        loaded = vaekit.load(tmp_path / f"vae{suffix}")
    assert same_weights(loaded, tiny_model.float())


def test_diffusers_named_bin_and_old_attention_names(tiny_model, tmp_path):
    """diffusers < 0.14 called the attention projections query/key/value/proj_attn."""
    save(tiny_model, tmp_path / "d")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    for new, name in old.items():
        for part in ("encoder", "decoder"):
            for p in ("weight", "bias"):
                sd[f"{part}.mid_block.attentions.0.{name}.{p}"] = sd.pop(f"{part}.mid_block.attentions.0.{new}.{p}")
    (tmp_path / "d" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(sd, tmp_path / "d" / "diffusion_pytorch_model.bin")
    assert same_weights(vaekit.load(tmp_path / "d"), tiny_model)
    torch.save(sd, tmp_path / "bare.bin")  # the same tensors without config.json
    ck = read_checkpoint(tmp_path / "bare.bin", family="tiny-f8c4")
    assert ck.format == "torch .bin file (diffusers naming)"


def test_pipeline_folder_uses_vae_subfolder(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    ck = read_checkpoint(tmp_path / "pipe")
    assert ck.format == "diffusers folder (vae/ of a pipeline)"
    assert ck.config == tiny_model.config


def test_linear_shaped_attention_in_ldm_naming_loads(tiny_model, tmp_path):
    sd = {k: v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v for k, v in tiny_model.state_dict().items()}
    save_file(sd, tmp_path / "v.safetensors")
    assert same_weights(vaekit.load(tmp_path / "v.safetensors", family="tiny-f8c4"), tiny_model)


def test_preset_source():
    ck = read_checkpoint("preset:tiny-f8c16")
    assert ck.config == preset("tiny-f8c16") and ck.normalisation_source == "preset"
    assert vaekit.load("preset:tiny-f8c16").config == preset("tiny-f8c16")
    with pytest.raises(ValueError, match="unknown preset or family 'nope'; choose one of sd1, sdxl, .* flux1"):
        read_checkpoint("preset:nope")
    # Random weights are seeded: the same seed gives the same model, another seed another one,
    # and the caller's random state is left alone.
    state = torch.get_rng_state()
    a, b, c = (read_checkpoint("preset:tiny-f8c4", seed=s).state_dict for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "v.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint type '.onnx'"):
        read_checkpoint(tmp_path / "v.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs config.json"):
        read_checkpoint(tmp_path / "empty")
    save_file({"model.diffusion_model.x": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="no autoencoder tensors found.*model.diffusion_model.x"):
        read_checkpoint(tmp_path / "unet.safetensors")


# ---- round trips and dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("format", ["diffusers", "single-file"])
def test_round_trip_keeps_config_exactly(tmp_path, format):
    config = preset("tiny-f8c16").replace(kind="ae", scaling_factor=0.5, shift_factor=0.25, family="mine")
    torch.manual_seed(0)
    model = perturb(Autoencoder(config))
    dest = tmp_path / ("m" if format == "diffusers" else "m.safetensors")
    model.save(dest, format=format)
    ck = read_checkpoint(dest)
    assert ck.config == config
    assert ck.normalisation_source == ("config.json" if format == "diffusers" else "file metadata")
    assert same_weights(vaekit.load(dest), model)


def test_dtype_stored_and_kept(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "h.safetensors", format="single-file", dtype=torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "h.safetensors").values()} == {torch.float16}
    assert read_checkpoint(tmp_path / "h.safetensors").dtype == "float16"
    half = vaekit.load(tmp_path / "h.safetensors")
    assert half.dtype == torch.float16 and all(p.requires_grad for p in half.parameters())
    assert vaekit.load(tmp_path / "h.safetensors", dtype=torch.float32).dtype == torch.float32
    assert same_weights(vaekit.load(tmp_path / "h.safetensors", dtype=torch.bfloat16), tiny_model.to(torch.float16).to(torch.bfloat16))


def test_mixed_dtype_file_loads_in_fp32(tiny_model, tmp_path):
    sd = {k: v.half() if k.endswith("conv1.weight") else v for k, v in tiny_model.state_dict().items()}
    save_file(sd, tmp_path / "m.safetensors")
    ck = read_checkpoint(tmp_path / "m.safetensors", family="tiny-f8c4")
    assert ck.dtype.startswith("mixed: float32") and "float16" in ck.dtype
    assert vaekit.load(tmp_path / "m.safetensors", family="tiny-f8c4").dtype == torch.float32


def test_save_rejects_bad_targets(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors file"):
        save(tiny_model, tmp_path / "v.ckpt", format="single-file")
    with pytest.raises(ValueError, match="format must be"):
        save(tiny_model, tmp_path / "v", format="onnx")


def test_write_atomic_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    write_atomic(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


# ---- never execute pickles -----------------------------------------------------------------------


class Payload:
    """Unpickling this would create a file: proof of code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_needing_code_execution_is_refused(tiny_model, tmp_path):
    marker = tmp_path / "executed"
    torch.save({"state_dict": tiny_model.state_dict(), "callback": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="never executes pickles .nothing was executed") as e:
        vaekit.load(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert "weights_only=False" in str(e.value) and "evil.safetensors" in str(e.value)


# ---- strict keys and shapes ---------------------------------------------------------------------


def test_missing_and_unexpected_tensors_are_named(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    del sd["decoder.conv_out.bias"], sd["encoder.mid.attn_1.k.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "v.safetensors")
    with pytest.raises(ValueError) as e:
        read_checkpoint(tmp_path / "v.safetensors", family="tiny-f8c4")
    msg = str(e.value)
    assert "2 missing (decoder.conv_out.bias, encoder.mid.attn_1.k.weight)" in msg
    assert "1 unexpected (decoder.extra.weight)" in msg


def test_shape_mismatch_against_metadata_config(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "v.safetensors", format="single-file")
    sd = load_file(tmp_path / "v.safetensors")
    sd["decoder.conv_out.weight"] = torch.zeros(3, 8, 3, 3)
    save_file(sd, tmp_path / "v.safetensors", metadata={"vaekit_config": tiny_model.config.to_json()})
    with pytest.raises(ValueError, match=r"1 tensors have the wrong shape.*decoder.conv_out.weight \[3, 8, 3, 3\] \(needs \[3, 16, 3, 3\]\)"):
        vaekit.load(tmp_path / "v.safetensors")


# ---- the family / normalisation rule -----------------------------------------------------------


@pytest.fixture(scope="module")
def flux_sized_file(tmp_path_factory) -> Path:
    """FLUX.1's ae.safetensors layout at full size, no metadata (zeros: only shapes matter here)."""
    path = tmp_path_factory.mktemp("flux") / "ae.safetensors"
    save_file(zeros_like_model(preset("flux1")), path)
    return path


def test_16ch_file_without_metadata_states_its_assumption(flux_sized_file):
    with pytest.warns(UserWarning, match=r"assumed flux1.*sd3 has the same architecture.*family=") as record:
        ck = read_checkpoint(flux_sized_file)
    assert len(record) == 1
    assert ck.format == "single-file (LDM naming, no quant convs: the FLUX.1 ae.safetensors layout)"
    assert ck.normalisation_source.startswith("assumed flux1: (z - 0.1159) * 0.3611")
    assert "pass family=... / --family to override" in ck.normalisation_source
    assert (ck.config.family, ck.config.scaling_factor, ck.config.shift_factor) == ("flux1", 0.3611, 0.1159)
    assert ck.config == preset("flux1")


def test_family_argument_sets_the_normalisation(flux_sized_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck = read_checkpoint(flux_sized_file, family="sd3")
    assert ck.normalisation_source == "family='sd3' argument"
    assert ck.config == preset("sd3")
    with pytest.raises(ValueError, match=r"family 'sd1' has 4-channel latents \(SD1/SDXL family\); this checkpoint has 16-channel latents"):
        read_checkpoint(flux_sized_file, family="sd1")
    # Family names are case-insensitive and take the common aliases; the config records the canonical name.
    for alias in ("flux", "FLUX.1", "Flux1"):
        assert read_checkpoint(flux_sized_file, family=alias).config == preset("flux1")
    assert read_checkpoint(flux_sized_file, family="SD3.5").normalisation_source == "family='sd3' argument"
    with pytest.raises(ValueError, match="unknown preset or family 'flux9'; .*alias: flux, "):
        read_checkpoint(flux_sized_file, family="flux9")


def test_4ch_assumption_is_sd1(tmp_path):
    save_file(zeros_like_model(preset("sdxl")), tmp_path / "sdxl_vae.safetensors")
    with pytest.warns(UserWarning, match=r"assumed sd1: \(z - 0\) \* 0.18215; sdxl has the same architecture but \(z - 0\) \* 0.13025"):
        ck = read_checkpoint(tmp_path / "sdxl_vae.safetensors")
    assert ck.config == preset("sd1")
    assert read_checkpoint(tmp_path / "sdxl_vae.safetensors", family="sdxl").config == preset("sdxl")


def test_metadata_wins_over_family_argument(tmp_path):
    model = vaekit.load("preset:tiny-f8c16").float()
    model.config = model.config.replace(scaling_factor=0.3611, shift_factor=0.1159, family="flux1")
    save(model, tmp_path / "v.safetensors", format="single-file")
    with pytest.warns(UserWarning, match="family='sd3' ignored: the file metadata states"):
        ck = read_checkpoint(tmp_path / "v.safetensors", family="sd3")
    assert (ck.config.scaling_factor, ck.config.shift_factor, ck.normalisation_source) == (0.3611, 0.1159, "file metadata")
    assert any("family='sd3' ignored" in n for n in ck.notes)


def test_diffusers_config_names_a_matching_family(tmp_path):
    config = preset("sdxl")
    with torch.device("meta"):  # only its config.json is needed
        AutoencoderKL(scaling_factor=config.scaling_factor, block_out_channels=config.block_channels,
                      down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                      layers_per_block=2).save_config(tmp_path / "d")
    save_file(load_file_like(config), tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    ck = read_checkpoint(tmp_path / "d")
    assert ck.config == config and ck.normalisation_source == "config.json"


def load_file_like(config: AutoencoderConfig) -> dict[str, torch.Tensor]:
    names = diffusers_key_map(len(config.block_channels), config.layers_per_block)
    return {names[k]: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v) for k, v in zeros_like_model(config).items()}


def test_other_autoencoder_classes_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"_class_name": "ConsistencyDecoderVAE", "block_out_channels": [8]}))
    save_file({"x": torch.zeros(1)}, tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="describes a ConsistencyDecoderVAE; vaekit reads AutoencoderKL"):
        read_checkpoint(tmp_path / "d")


# ---- Hugging Face Hub ids --------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time


def test_hub_id_offline_names_the_files_to_fetch(offline):
    with pytest.raises(FileNotFoundError) as e:
        read_checkpoint("vaekit-test/no-such-vae")
    msg = str(e.value)
    assert "\n" not in msg and "OfflineModeIsEnabled; not in the local cache either" in msg
    assert ("download config.json and diffusion_pytorch_model.safetensors from "
            "https://huggingface.co/vaekit-test/no-such-vae/tree/main into one folder and pass that folder's path") in msg


def test_hub_id_offline_for_pipelines_and_flux(offline):
    with pytest.raises(FileNotFoundError, match="download vae/config.json and vae/diffusion_pytorch_model.safetensors"):
        read_checkpoint("vaekit-test/some-pipeline")
    with pytest.raises(FileNotFoundError, match="https://huggingface.co/vaekit-test/FLUX.1-dev/resolve/main/ae.safetensors"):
        read_checkpoint("vaekit-test/FLUX.1-dev")


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed"):
        read_checkpoint("stabilityai/sdxl-vae")


def test_hub_id_picks_the_layout_the_repo_has(tiny_model, tmp_path, monkeypatch):
    """The Hub replaced by a local folder: a pipeline repo (vae/ subfolder) and a FLUX.1-style repo."""
    import shutil
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    remote = tmp_path / "remote"
    save(tiny_model, remote / "someone" / "pipe" / "vae")
    save(tiny_model, remote / "someone" / "FLUX.1-x" / "ae.safetensors", format="single-file")
    requests = []

    def model_info(self, repo):
        requests.append(repo)
        root = remote / repo
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=str(p.relative_to(root))) for p in root.rglob("*") if p.is_file()])

    def hf_hub_download(repo, filename, local_files_only=False):
        cached = tmp_path / "cache" / repo / filename
        if not cached.exists():
            if local_files_only:
                raise LocalEntryNotFoundError(f"{filename} not cached")
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / repo / filename, cached)
        return str(cached)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    ck = read_checkpoint("someone/pipe")
    assert ck.format == "Hugging Face Hub someone/pipe: diffusers folder"
    assert ck.config == tiny_model.config
    assert same_weights(vaekit.load("someone/pipe"), tiny_model)  # the second time from the cache
    assert requests == ["someone/pipe"]
    ck = read_checkpoint("someone/FLUX.1-x")
    assert ck.format.startswith("Hugging Face Hub someone/FLUX.1-x: single-file") and ck.normalisation_source == "file metadata"
