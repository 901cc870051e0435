import math

import pytest
import torch

from vaekit import AutoencoderConfig, preset
from vaekit.model import Autoencoder, Posterior


def test_preset_architectures_have_published_sizes():
    with torch.device("meta"):
        assert Autoencoder(preset("sd1")).num_parameters() == 83_653_863  # SD kl-f8
        assert Autoencoder(preset("flux1")).num_parameters() == 83_819_683  # FLUX.1 ae.safetensors
    assert preset("sd3").factor == 8 and preset("sd3").latent_channels == 16
    assert (preset("flux1").scaling_factor, preset("flux1").shift_factor) == (0.3611, 0.1159)
    assert preset("sdxl").scaling_factor == 0.13025


def test_shapes_and_factor(tiny_model):
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    post = tiny_model.encode(x)
    assert post.mean.shape == (2, 4, 6, 8) and post.logvar.shape == (2, 4, 6, 8)
    recon, post2 = tiny_model(x)
    assert recon.shape == x.shape
    assert torch.equal(post2.mean, post.mean)


def test_sixteen_x_config():
    cfg = AutoencoderConfig(block_channels=(8, 8, 16, 16, 16), layers_per_block=1, norm_groups=4, latent_channels=32)
    m = Autoencoder(cfg)
    assert m.factor == 16
    assert m.encode(torch.zeros(1, 3, 32, 48)).mean.shape == (1, 32, 2, 3)


def test_posterior_math():
    mean = torch.tensor([[[[0.5]], [[-1.0]]]])
    logvar = torch.tensor([[[[0.0]], [[math.log(4.0)]]]])
    p = Posterior(mean, logvar)
    assert torch.allclose(p.std, torch.tensor([[[[1.0]], [[2.0]]]]))
    # KL(N(m, s^2) || N(0,1)) = 0.5 * (m^2 + s^2 - 1 - log s^2), summed
    expected = 0.5 * (0.25 + 1 - 1 - 0) + 0.5 * (1 + 4 - 1 - math.log(4.0))
    assert p.kl().item() == pytest.approx(expected, rel=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(p.sample(g1), p.sample(g2))
    samples = Posterior(torch.zeros(1, 1, 200, 200), torch.full((1, 1, 200, 200), math.log(9.0))).sample()
    assert samples.std().item() == pytest.approx(3.0, rel=0.03)


def test_ae_kind_is_deterministic(tiny_config):
    m = Autoencoder(tiny_config.replace(kind="ae")).eval()
    assert m.encoder.conv_out.out_channels == 4
    post = m.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert torch.equal(post.sample(), post.mean)
    assert torch.equal(post.kl(), torch.zeros(1))
    assert torch.equal(post.std, torch.zeros_like(post.mean))


def test_normalisation_round_trip_and_values(tiny_model):
    m = tiny_model
    m.config = m.config.replace(scaling_factor=0.5, shift_factor=0.25)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = m.encode(x).mean
    assert torch.allclose(m.to_latent(x), (z - 0.25) * 0.5)
    assert torch.allclose(m.denormalize(m.normalize(z)), z, atol=1e-6)
    assert torch.allclose(m.from_latent(m.to_latent(x)), m.decode(z), atol=1e-5)


def test_non_multiple_size_error_names_valid_sizes(tiny_model):
    with pytest.raises(ValueError, match=r"250 .* use 248 or 256, or pad=True"):
        tiny_model.encode(torch.zeros(1, 3, 64, 250))


def test_pad_gives_input_size_back(tiny_model):
    x = torch.rand(1, 3, 37, 50) * 2 - 1
    recon, post = tiny_model(x, pad=True)
    assert recon.shape == x.shape
    assert post.image_size == (37, 50)
    assert post.mean.shape[-2:] == (5, 7)
    # the padded part is a reflection: encoding the explicitly reflect-padded image gives the same latent
    padded = torch.nn.functional.pad(x, (0, 6, 0, 3), mode="reflect")
    assert torch.allclose(tiny_model.encode(padded).mean, post.mean, atol=1e-6)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(1, 4, 32, 32), ValueError, r"4 channels, the model expects 3 \(images are NCHW\)$"),
        (torch.zeros(1, 32, 32, 3), ValueError, r"32 channels, the model expects 3: this looks like NHWC; x.permute\(0, 3, 1, 2\)"),
        (torch.zeros(1, 1, 32, 32), ValueError, r"1 channel, the model expects 3: for grey images repeat the channel"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN or Inf"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, r"x.float\(\) / 127.5 - 1"),
        (torch.zeros(3, 32, 32), ValueError, r"x\[None\]"),
    ],
)
def test_bad_images_raise_clear_errors(tiny_model, x, error, match):
    with pytest.raises(error, match=match):
        tiny_model.encode(x)


def test_wrong_latent_channels_names_families(tiny_model):
    with pytest.raises(ValueError, match=r"16-channel latent \(SD3/Flux.1 family\) given to a 4-channel model \(SD1/SDXL family\)"):
        tiny_model.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiny_model.decode(torch.full((1, 4, 4, 4), float("inf")))


def test_warns_on_0_255_images(tiny_model):
    with pytest.warns(RuntimeWarning, match="outside"):
        tiny_model.encode(torch.full((1, 3, 32, 32), 200.0))


def test_config_round_trip_and_validation():
    c = preset("flux1")
    assert AutoencoderConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown config fields"):
        AutoencoderConfig.from_dict({"blocks": [1]})
    with pytest.raises(ValueError, match="must divide"):
        AutoencoderConfig(block_channels=(30, 64), norm_groups=32)
    with pytest.raises(ValueError, match="kind"):
        AutoencoderConfig(kind="vqgan")
    with pytest.raises(ValueError, match="vaekit presets"):
        preset("sd4")


def test_kl_is_summed_in_fp32_for_half_posteriors():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g) * 0.3
    exact = Posterior(mean, logvar).kl()
    for dtype in (torch.bfloat16, torch.float16):
        kl = Posterior(mean.to(dtype), logvar.to(dtype)).kl()
        assert kl.dtype == torch.float32
        # only the inputs' rounding remains, not a half-precision sum over 1024 elements
        assert torch.allclose(kl, exact, rtol=1e-3)  # a bf16 sum is off by ~2e-3 here
