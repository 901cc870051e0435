"""vaekit against diffusers' AutoencoderKL, the reference: same numbers through every file path.

Each case is a small diffusers-expressible architecture with perturbed random weights. Three
routes per case: diffusers folder -> vaekit, vaekit folder -> diffusers, and vaekit single file ->
diffusers' own single-file conversion (and back into vaekit). `python tests/test_parity.py`
prints the table of max abs differences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import perturb
from diffusers import AutoencoderKL

import vaekit
from vaekit import AutoencoderConfig
from vaekit.checkpoints import save
from vaekit.model import Autoencoder

TOLERANCE = 1e-4  # fp32, max abs difference (issue 3)

# name -> (diffusers AutoencoderKL arguments, image size). Small widths keep this fast on CPU.
CASES: dict[str, tuple[dict, tuple[int, int]]] = {
    "sd1-like (4ch, quant convs, 8x)": (dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                              scaling_factor=0.18215), (32, 48)),
    "sdxl-like (4ch, 2 layers, 8x)": (dict(block_out_channels=(16, 32, 32, 32), layers_per_block=2, latent_channels=4,
                                           scaling_factor=0.13025), (48, 32)),
    "flux-like (16ch, no quant convs, 8x)": (dict(block_out_channels=(16, 32, 32, 32), layers_per_block=2, latent_channels=16,
                                                  use_quant_conv=False, use_post_quant_conv=False,
                                                  scaling_factor=0.3611, shift_factor=0.1159), (32, 32)),
    "f16c32 (32ch, 5 levels, 16x)": (dict(block_out_channels=(16, 32, 32, 32, 32), layers_per_block=1, latent_channels=32),
                                     (64, 48)),
    "no mid attention (4ch, 8x)": (dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                        mid_block_add_attention=False), (32, 32)),
}
ROUTES = ("diffusers folder -> vaekit", "vaekit folder -> diffusers", "vaekit single file -> diffusers", "vaekit single file -> vaekit")


def diffusers_args(case: str) -> dict:
    args, _ = CASES[case]
    n = len(args["block_out_channels"])
    return dict(args, norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


def vaekit_config(case: str) -> AutoencoderConfig:
    a = diffusers_args(case)
    return AutoencoderConfig(
        block_channels=a["block_out_channels"], layers_per_block=a["layers_per_block"], latent_channels=a["latent_channels"],
        use_quant_conv=a.get("use_quant_conv", True), use_post_quant_conv=a.get("use_post_quant_conv", True),
        mid_attention=a.get("mid_block_add_attention", True), norm_groups=8,
        scaling_factor=a.get("scaling_factor", 1.0), shift_factor=a.get("shift_factor", 0.0),
    )


@torch.no_grad()
def differences(ours: Autoencoder, ref: AutoencoderKL | Autoencoder, size: tuple[int, int]) -> dict[str, float]:
    """Max abs differences of posterior mean, logvar and decoded image on the same inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    p = ours.encode(x)
    if isinstance(ref, AutoencoderKL):
        q = ref.encode(x).latent_dist
        decoded = ref.decode(q.mean).sample
    else:
        q = ref.encode(x)
        decoded = ref.decode(q.mean)
    return {
        "mean": (p.mean - q.mean).abs().max().item(),
        "logvar": (p.logvar - q.logvar).abs().max().item(),
        "decode": (ours.decode(q.mean) - decoded).abs().max().item(),
    }


def measure(case: str, route: str, tmp: Path) -> dict[str, float]:
    size = CASES[case][1]
    if route == "diffusers folder -> vaekit":
        torch.manual_seed(0)
        ref = perturb(AutoencoderKL(**diffusers_args(case))).eval()
        ref.save_pretrained(tmp / "diffusers")
        ours = vaekit.load(tmp / "diffusers")
        return differences(ours, ref, size)
    torch.manual_seed(0)
    ours = perturb(Autoencoder(vaekit_config(case))).eval()
    if route == "vaekit folder -> diffusers":
        save(ours, tmp / "vaekit", format="diffusers")
        return differences(ours, AutoencoderKL.from_pretrained(tmp / "vaekit").eval(), size)
    save(ours, tmp / "vae.safetensors", format="single-file")
    if route == "vaekit single file -> diffusers":
        # A local config folder keeps diffusers offline; it converts the LDM names itself.
        AutoencoderKL(**diffusers_args(case)).save_config(tmp / "config")
        ref = AutoencoderKL.from_single_file(str(tmp / "vae.safetensors"), config=str(tmp / "config")).eval()
        return differences(ours, ref, size)
    return differences(vaekit.load(tmp / "vae.safetensors"), ours, size)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(CASES))
def test_parity(case: str, route: str, tmp_path: Path) -> None:
    diffs = measure(case, route, tmp_path)
    assert max(diffs.values()) <= TOLERANCE, diffs
    if route == "vaekit single file -> vaekit":
        assert max(diffs.values()) == 0.0, "reading back our own file must be exact"


def test_normalisation_and_config_survive_every_route(tmp_path: Path) -> None:
    case = "flux-like (16ch, no quant convs, 8x)"
    torch.manual_seed(0)
    ref = perturb(AutoencoderKL(**diffusers_args(case)))
    ref.save_pretrained(tmp_path / "d")
    loaded = vaekit.load(tmp_path / "d")
    assert loaded.config == vaekit_config(case)  # scale 0.3611, shift 0.1159, no quant convs, norm groups 8
    save(loaded, tmp_path / "v", format="diffusers")
    again = AutoencoderKL.from_pretrained(tmp_path / "v")
    assert (again.config.scaling_factor, again.config.shift_factor) == (0.3611, 0.1159)
    assert again.config.use_quant_conv is False and again.config.norm_num_groups == 8


def main() -> None:
    import tempfile

    torch.set_num_threads(1)
    print(f"{'case':40s} {'route':34s} {'mean':>9s} {'logvar':>9s} {'decode':>9s}")
    for case in CASES:
        for route in ROUTES:
            with tempfile.TemporaryDirectory() as tmp:
                d = measure(case, route, Path(tmp))
            print(f"{case:40s} {route:34s} {d['mean']:9.2e} {d['logvar']:9.2e} {d['decode']:9.2e}")


if __name__ == "__main__":
    main()
