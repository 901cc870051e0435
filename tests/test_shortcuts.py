"""The fast-training architecture options: DC-AE shortcuts (`shortcuts=True`) and the patch stem (`patch_size`)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb
from diffusers import AutoencoderKL

import vaekit
from vaekit import AutoencoderConfig
from vaekit.config import PRESETS
from vaekit.model import Autoencoder
from vaekit.model.fast import Downsample, Upsample, channel_to_space, space_to_channel


def fast_config(latent_channels: int = 4, **changes) -> AutoencoderConfig:
    base = dict(block_channels=(16, 32, 32), layers_per_block=1, norm_groups=8, latent_channels=latent_channels,
                use_quant_conv=False, use_post_quant_conv=False, shortcuts=True, patch_size=2)  # fmt: skip
    return AutoencoderConfig(**{**base, **changes})


def test_space_to_channel_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    assert space_to_channel(x, 4).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]  # plain pixel unshuffle
    assert space_to_channel(x, 2).flatten().tolist() == [1.5, 3.5]  # means of channel pairs
    assert space_to_channel(x, 1).flatten().tolist() == [2.5]  # 2x2 average pooling
    y = channel_to_space(torch.tensor([5.0, 7.0]).reshape(1, 2, 1, 1), 1)
    assert y.tolist() == [[[[5.0, 5.0], [7.0, 7.0]]]]  # each channel repeated into 2 of the 4 pixels


@pytest.mark.parametrize("cin, cout", [(8, 32), (8, 16), (8, 8), (16, 8)])
def test_space_and_channel_ops_invert_each_other(cin, cout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, 6, 10, generator=g)
    up = channel_to_space(x, cout)
    assert up.shape == (2, cout, 12, 20)
    torch.testing.assert_close(space_to_channel(up, cin), x)  # exact: the averaged channels were copies
    # Without averaging (4x the channels) both are plain pixel (un)shuffles, inverse both ways.
    torch.testing.assert_close(channel_to_space(space_to_channel(up, 4 * cout), cout), up)


def test_resampling_with_zero_conv_is_the_shortcut():
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    down, up = Downsample(16, 32, shortcut=True), Upsample(32, 16, shortcut=True)
    for m in (down, up):
        torch.nn.init.zeros_(m.conv.weight)
        torch.nn.init.zeros_(m.conv.bias)
    h = down(x)
    torch.testing.assert_close(h, space_to_channel(x, 32))
    torch.testing.assert_close(up(h), channel_to_space(h, 16))
    assert up.conv.out_channels == 64  # DC-AE's upsampling conv runs at the low resolution, to 4x channels


@pytest.mark.parametrize("channels", [4, 16])
def test_shortcut_model_round_trips_shapes(channels):
    cfg = fast_config(channels)
    assert cfg.factor == 8  # 2 (patch) x 2 x 2 (two resamplings)
    torch.manual_seed(0)  # this test's own weights and images, whichever tests ran before it
    model = perturb(Autoencoder(cfg)).eval()
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == (2, channels, 8, 6) and posterior.logvar.shape == (2, channels, 8, 6)
        y = model.decode(posterior.mode())
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert model.encode(x[:, :, :40]).mean.shape == (2, channels, 5, 6)
        ae = Autoencoder(cfg.replace(kind="ae")).eval()
        assert ae.encode(x).mean.shape == (2, channels, 8, 6) and ae.decode(ae.encode(x).mean).shape == x.shape


def test_bottleneck_shortcut_feeds_the_mean_only():
    torch.manual_seed(0)
    model = Autoencoder(fast_config(4)).eval()
    torch.nn.init.zeros_(model.encoder.conv_out.weight)
    torch.nn.init.zeros_(model.encoder.conv_out.bias)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = model.encoder.mid(model.encoder.body(x))
        posterior = model.encode(x)
    torch.testing.assert_close(posterior.mean, h.unflatten(1, (4, -1)).mean(dim=2))
    assert posterior.logvar.abs().max() == 0  # the log-variance has no shortcut
    # The decoder's side repeats each latent channel across its group of 32 / 4 = 8 feature channels.
    torch.nn.init.zeros_(model.decoder.conv_in.weight)
    torch.nn.init.zeros_(model.decoder.conv_in.bias)
    z = torch.randn(1, 4, 4, 4)
    seen = {}
    model.decoder.mid.register_forward_hook(lambda m, inp, out: seen.setdefault("in", inp[0]))
    with torch.no_grad():
        model.decode(z)
    torch.testing.assert_close(seen["in"], z.repeat_interleave(8, dim=1))


def test_patch_stem_changes_only_the_full_resolution_layers():
    plain = Autoencoder(fast_config(4, patch_size=1))
    patched = Autoencoder(fast_config(4, patch_size=2))
    assert patched.encoder.conv_in.in_channels == 12 and patched.decoder.conv_out.out_channels == 12
    assert plain.config.factor == 4 and patched.config.factor == 8
    # Same module names (checkpoint keys) either way.
    assert plain.state_dict().keys() == patched.state_dict().keys()


# The quickstart's options instead of DC-AE's shortcuts: the thumbnail shortcut and the nearest-neighbour patch output.
THUMB = dict(shortcuts=False, thumbnail_shortcut=True, patch_out="nearest")


@pytest.mark.parametrize("options", [{}, THUMB], ids=["dc-ae", "thumbnail"])
def test_tiled_equals_untiled_with_shortcuts_and_patches(options):
    torch.manual_seed(0)
    model = perturb(Autoencoder(fast_config(4, **options))).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = model.encode(x).mean
        torch.testing.assert_close(model.encode(x, tile=16).mean, z, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode(z, tile=16), model.decode(z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{}, THUMB], ids=["dc-ae", "thumbnail"])
def test_checkpoints_round_trip_the_options(tmp_path, options):
    torch.manual_seed(0)
    model = perturb(Autoencoder(fast_config(16, **options))).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = model(x)[0]
    for path, fmt in ((tmp_path / "folder", "diffusers"), (tmp_path / "one.safetensors", "single-file")):
        model.save(str(path), format=fmt)
        loaded = vaekit.load(path).eval()
        assert loaded.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(x)[0], want)


def test_diffusers_refuses_a_shortcut_model_instead_of_misloading_it(tmp_path):
    Autoencoder(fast_config(4, patch_size=1, block_channels=(32, 32, 32))).save(str(tmp_path / "m"))
    with pytest.raises((RuntimeError, ValueError), match="size mismatch|shape"):
        AutoencoderKL.from_pretrained(tmp_path / "m")


def test_config_validation_and_real_presets_untouched():
    with pytest.raises(ValueError, match="divide 4x"):
        fast_config(block_channels=(8, 64, 64))  # 64 does not divide 4 * 8
    with pytest.raises(ValueError, match="latent_channels"):
        fast_config(latent_channels=12, block_channels=(16, 32, 32))
    with pytest.raises(ValueError, match="patch_size"):
        fast_config(patch_size=3)
    for name in ("sd1", "sdxl", "sd3", "flux1", "tiny-f8c4", "tiny-f8c16"):
        cfg = PRESETS[name].config
        assert not cfg.shortcuts and cfg.patch_size == 1 and cfg.diffusers_compatible
    assert not fast_config().diffusers_compatible and not fast_config(shortcuts=False).diffusers_compatible
    assert not PRESETS["sd1"].config.replace(kind="ae").diffusers_compatible
    for name, channels in (("tiny-fast-f8c4", 4), ("tiny-fast-f8c16", 16)):
        cfg = PRESETS[name].config
        assert cfg.shortcuts and cfg.factor == 8 and cfg.latent_channels == channels
    # Configs written before these options existed still load (the fields default to the LDM layout).
    old = {k: v for k, v in PRESETS["sd1"].config.to_dict().items() if k not in ("shortcuts", "patch_size")}
    assert AutoencoderConfig.from_dict(old) == PRESETS["sd1"].config


# ---- the thumbnail shortcut (issue 12) ---------------------------------------------------------

CUBE_CORNERS = [(r, g, b) for r in (0, 255) for g in (0, 255) for b in (0, 255)]


@pytest.mark.parametrize("channels", [4, 16])
def test_untrained_quickstart_model_reproduces_flat_colours_at_the_gamut_corners(channels):
    """A colour-fidelity regression fails here: the untrained quickstart model is the box thumbnail, exact on flat colours."""
    from vaekit.data import synthetic_colours, to_tensor, to_uint8
    from vaekit.train import QUICKSTART, build_model

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(QUICKSTART, latent_channels=channels)).eval()
    colours = CUBE_CORNERS + [(255, 128, 0), (0, 60, 200), (250, 95, 3)]
    flat = [np.broadcast_to(np.array(c, np.uint8), (64, 64, 3)) for c in colours]
    with torch.no_grad():
        for image in flat:
            recon = to_uint8(model(to_tensor(image))[0])[0].astype(int)
            assert np.abs(recon - image).max() <= 2, f"colour {image[0, 0]} came back as {recon[0, 0]}"
        # Side by side, as the synthetic test image has them: each block's inside (8 px from its edges) exact.
        patches = dict(synthetic_colours())["corners"]
        recon = to_uint8(model(to_tensor(patches))[0])[0].astype(int)
        inside = np.zeros(patches.shape[:2], bool)
        for y in range(0, 256, 128):
            for x in range(0, 256, 64):
                inside[y + 8 : y + 120, x + 8 : x + 56] = True
        assert np.abs(recon - patches)[inside].max() <= 2
    # The same model with the shortcut off is not a thumbnail coder: the test can fail.
    torch.manual_seed(0)
    plain = Autoencoder(model.config.replace(thumbnail_shortcut=False)).eval()
    with torch.no_grad():
        errors = [np.abs(to_uint8(plain(to_tensor(im))[0])[0].astype(int) - im).max() for im in flat]
    assert max(errors) > 20


def thumb_config(latent_channels: int = 4, **changes) -> AutoencoderConfig:
    return fast_config(latent_channels, **THUMB, **changes)


def test_thumbnail_shortcut_carries_box_means_in_the_first_latent_channels():
    torch.manual_seed(0)
    model = Autoencoder(thumb_config(8)).eval()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        torch.testing.assert_close(posterior.mean[:, :3], F.avg_pool2d(x, 8))  # the untrained encoder adds nothing
        assert posterior.mean[:, 3:].abs().max() == 0 and torch.allclose(posterior.logvar, torch.tensor(-6.0))
        z = torch.randn(2, 8, 4, 6)
        torch.testing.assert_close(model.decode(z), F.interpolate(z[:, :3], scale_factor=8, mode="bilinear"))
        ramp = torch.linspace(-0.9, 0.9, 64).expand(1, 3, 64, 64)  # a linear gradient comes back as it was
        torch.testing.assert_close(model(ramp)[0][..., 8:-8], ramp[..., 8:-8], atol=1e-5, rtol=0)
    # Trained weights add to it (tiling and checkpoints of such a model: the parametrized tests above).
    model = perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model.encode(x).mean[:, :3], F.avg_pool2d(x, 8))


def test_thumbnail_shortcut_is_validated(tmp_path):
    model = Autoencoder(thumb_config(4))
    model.save(str(tmp_path / "m"))
    loaded = vaekit.load(tmp_path / "m")
    assert loaded.config.thumbnail_shortcut and not loaded.config.diffusers_compatible
    with pytest.raises(ValueError, match="thumbnail_shortcut"):
        thumb_config(latent_channels=2, block_channels=(16, 32, 32))
    with pytest.raises(ValueError, match="thumbnail_shortcut"):
        AutoencoderConfig(arch="qwenimage", block_channels=(16, 32, 32, 32), latent_channels=4, thumbnail_shortcut=True)
    for name in ("sd1", "sdxl", "sd3", "flux1", "flux2", "tiny-f8c4", "tiny-fast-f8c4", "tiny-fast-f8c16"):
        assert not PRESETS[name].config.thumbnail_shortcut  # published and earlier presets are untouched


def decoder_border_reach(cfg: AutoencoderConfig) -> int:
    """How many output pixels in from each edge the zero padding of the decoder's convs changes a flat latent's decode.
    Each 3x3 conv reaches one pixel further in, at its resolution; each 2x upsampling doubles the reach. GroupNorm and
    attention are global, but give positions with equal inputs equal outputs, so they add no reach."""
    assert cfg.arch == "ldm" and cfg.patch_size == 2 and not (cfg.shortcuts or cfg.thumbnail_shortcut)
    reach = 1 + 2 * 2  # conv_in, then the mid block's two ResnetBlocks of two 3x3 convs each
    for level in reversed(range(len(cfg.block_channels))):
        reach += 2 * (cfg.layers_per_block + 1)  # the level's ResnetBlocks
        if level > 0:
            reach = 2 * reach + 1  # Upsample: nearest 2x, then a 3x3 conv
    # The patch output: nearest 2x then conv_out ("nearest"), or conv_out then its 2x2 pixels per position ("shuffle").
    return 2 * reach + 1 if cfg.patch_out == "nearest" else 2 * (reach + 1)


def test_patch_out_nearest_has_no_patch_periodic_grid():
    """A flat latent decodes flat with patch_out="nearest"; with "shuffle" each of the 2x2 positions has its own weights.

    Only out of the borders' reach (103 px with "nearest", 104 with "shuffle", for fast_config) is a flat latent's
    decode periodic at all: there each position of the 2x2 patch (phase) is constant, so the phases' spread is the grid
    alone: nothing but float rounding without one, the size of conv_out's per-position differences with one (0.13-0.61
    over 100 seeds). Nearer the edges the decode still varies, and any slope there spreads the phases as well."""
    z = torch.full((1, 4, 32, 32), 0.3)  # 256 px: the middle 48 px are out of the borders' reach
    for patch_out, grid in (("shuffle", True), ("nearest", False)):
        cfg = fast_config(4, shortcuts=False, patch_out=patch_out)
        torch.manual_seed(0)
        model = perturb(Autoencoder(cfg)).eval()
        with torch.no_grad():
            out = model.decode(z)
        edge = -(-decoder_border_reach(cfg) // 2) * 2  # in whole 2x2 cells, so the phases stay aligned
        cells = out[..., edge:-edge, edge:-edge].unflatten(-1, (-1, 2)).unflatten(-3, (-1, 2))  # n, c, y, 2, x, 2
        assert cells.shape[-4] >= 16, "the latent is too small for a middle out of the borders' reach"
        rounding = 1e-5 * out.abs().max()  # float32 rounding of the decode, with room for summation order
        within = cells.std(dim=(-4, -2)).max()  # each phase over the middle: constant unless the borders reach it
        between = cells.mean(dim=(-4, -2)).flatten(-2).std(dim=-1).max()  # the spread of the phases: the grid
        assert within <= rounding, f"{patch_out}: the borders reach the middle ({within:.2e} > {rounding:.2e})"
        assert (between > rounding) == grid, f"{patch_out}: the phases' std {between:.2e}, rounding {rounding:.2e}"
    with pytest.raises(ValueError, match="patch_out"):
        fast_config(patch_out="bicubic")
