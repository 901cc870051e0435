import math
import urllib.error
import warnings

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import structural_similarity
from skimage.transform import resize

from conftest import perturb
from vaekit.data import to_tensor, to_uint8
from vaekit.losses import (
    AutoencoderLoss,
    LossConfig,
    LPIPSLoss,
    PatchGANDiscriminator,
    adaptive_gan_weight,
    check_lpips_available,
    discriminator_loss,
    gaussian_ssim as ssim,
    generator_loss,
    kl_loss,
    reconstruction_loss,
    ssim_loss,
)
from vaekit.model import Autoencoder, Posterior


def photo(size: int = 64) -> torch.Tensor:
    """A real photo (scikit-image's astronaut) as 1x3xSxS in [-1, 1]."""
    image = resize(skdata.astronaut(), (size, size), anti_aliasing=True, preserve_range=True)
    return to_tensor(image.round().astype(np.uint8))


def noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


# ---- reconstruction -------------------------------------------------------------------------------


def test_pixel_losses_match_their_formulas():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    y = torch.rand(2, 3, 8, 8) * 2 - 1
    d = (x - y).double()
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(d.abs().mean().item(), rel=1e-6)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx(d.pow(2).mean().item(), rel=1e-6)
    expected = torch.sqrt(d.pow(2) + 1e-4).mean().item()
    assert reconstruction_loss(x, y, "charbonnier", eps=1e-2).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l3'"):
        reconstruction_loss(x, y, "l3")
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_loss(x, y[:, :, :4])


def test_charbonnier_is_l1_for_large_errors_and_smooth_near_zero():
    y = torch.zeros(1, 1, 1, 1)
    for err in (-1.0, -0.3, 0.1, 0.5):
        x = torch.full((1, 1, 1, 1), err)
        gap = reconstruction_loss(x, y, "charbonnier") - reconstruction_loss(x, y, "l1")
        assert 0 < gap.item() < 1e-5  # sqrt(d^2 + eps^2) - |d| ~ eps^2 / (2|d|)

    def slope(kind: str, d: torch.Tensor) -> torch.Tensor:
        d = d.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(reconstruction_loss(d, torch.zeros_like(d), kind) * d.numel(), d)
        return g.flatten()

    d = (torch.arange(-100, 101) * 1e-4).view(1, 1, 1, -1)  # steps of 1e-4, through exactly 0
    charb, l1 = slope("charbonnier", d), slope("l1", d)
    assert charb[100].item() == 0.0  # zero error, zero gradient
    assert charb[101].item() == pytest.approx(1e-4 / math.sqrt(1e-8 + 1e-6), rel=1e-4)  # ~ d / eps: L2-like
    assert charb.diff().abs().max().item() < 0.11  # a continuous slope...
    assert (l1[101] - l1[99]).item() == 2.0  # ...where L1's jumps from -1 to 1 across zero


def test_ssim_matches_skimage_on_a_photo():
    x = photo(64)
    for std in (0.02, 0.1, 0.4):
        x8, y8 = to_uint8(x)[0], to_uint8(noisy(x, std))[0]  # the metric as uint8 tools compute it
        ours = ssim(to_tensor(x8), to_tensor(y8)).item()
        ref = structural_similarity(
            x8, y8, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=2
        )
        assert abs(ours - ref) < 1e-5, (std, ours, ref)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    per_image = ssim(torch.cat([x, x]), torch.cat([x, noisy(x, 0.1)]))
    assert per_image.shape == (2,) and per_image[0] > 0.999 > per_image[1]
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_ssim_ignores_bf16_autocast_and_its_loss_trains():
    x = photo(32)
    y = noisy(x, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = ssim_loss(x, y)
    assert in_autocast.dtype == torch.float32
    assert in_autocast.item() == pytest.approx(ssim_loss(x, y).item(), abs=1e-6)

    y = y.clone().requires_grad_(True)
    opt = torch.optim.Adam([y], lr=0.02)
    start = ssim_loss(x, y).item()
    for _ in range(20):
        opt.zero_grad()
        ssim_loss(x, y).backward()
        opt.step()
    assert ssim_loss(x, y).item() < 0.5 * start


def test_kl_loss_sums_latent_elements_and_averages_the_batch():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    per_image = 0.5 * (mean.double() ** 2 + logvar.double().exp() - 1 - logvar.double()).sum(dim=[1, 2, 3])
    assert kl_loss(Posterior(mean, logvar)).item() == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert kl_loss(Posterior(torch.zeros(3, 4, 5, 5), torch.zeros(3, 4, 5, 5))).item() == 0.0
    assert kl_loss(Posterior(mean)).item() == 0.0  # plain AE: point mass


# ---- LPIPS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_is_a_quiet_frozen_distance(net, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning while building fails the test
        loss = LPIPSLoss(net, pretrained=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()  # a parent's .train() must not switch its dropout on
    assert not loss.training and not any(m.training for m in loss.modules())
    x, y = photo(32), noisy(photo(32), 0.2)
    assert loss(x, x).item() == 0.0
    d = loss(x, y)
    assert d.item() > 0 and d.item() == loss(x, y).item()  # deterministic
    assert d.item() < loss(x, noisy(photo(32), 0.6)).item()  # more noise, farther


def test_lpips_loss_decreases_when_optimising_an_image():
    loss = LPIPSLoss("alex", pretrained=False)
    x = photo(64)
    y = noisy(x, 0.5).requires_grad_(True)
    opt = torch.optim.Adam([y], lr=0.02)
    start = loss(x, y).item()
    for _ in range(25):
        opt.zero_grad()
        loss(x, y).backward()
        opt.step()
    assert loss(x, y).item() < 0.5 * start, (start, loss(x, y).item())


@pytest.mark.parametrize(("net", "file"), [("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")])
def test_lpips_without_weights_fails_with_one_line_naming_file_and_folder(net, file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as e:
        LPIPSLoss(net, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"put {file} (from https://download.pytorch.org/models/{file}) into {tmp_path / 'hub' / 'checkpoints'}/" in msg
    assert "Name or service not known" in msg

    # With the file in place nothing is downloaded.
    (tmp_path / "hub" / "checkpoints" / file).write_bytes(b"")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    check_lpips_available(net)


# ---- discriminator and GAN losses ----------------------------------------------------------------


def test_discriminator_has_ldm_layout_and_init():
    torch.manual_seed(0)
    d = PatchGANDiscriminator()
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items() if not k.endswith("num_batches_tracked")}
    # The keys and shapes of `loss.discriminator.*` in LDM's kl-f8 training checkpoints.
    expected = {"main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,), "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,)}
    for i, (cin, cout) in zip((2, 5, 8), ((64, 128), (128, 256), (256, 512))):
        expected[f"main.{i}.weight"] = (cout, cin, 4, 4)
        for name in ("weight", "bias", "running_mean", "running_var"):
            expected[f"main.{i + 1}.{name}"] = (cout,)
    assert shapes == expected
    assert [m.stride for m in d.main if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3 + [(1, 1)] * 2
    assert abs(d.main[5].weight.std().item() - 0.02) < 0.001
    assert abs(d.main[6].weight.mean().item() - 1.0) < 0.005 and d.main[6].bias.abs().max().item() == 0
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # one logit per 70x70 patch

    for norm, norm_type in (("group", torch.nn.GroupNorm), ("none", type(None))):
        layers = PatchGANDiscriminator(norm=norm).main
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in layers)
        assert isinstance(layers[3], norm_type) or (norm == "none" and isinstance(layers[3], torch.nn.LeakyReLU))
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        PatchGANDiscriminator(norm="layer")


def test_gan_losses_match_hand_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (5 / 6 + 1))
    sp = torch.nn.functional.softplus
    assert discriminator_loss(real, fake, "vanilla").item() == pytest.approx(0.5 * (sp(-real).mean() + sp(fake).mean()).item())
    assert generator_loss(fake, "hinge").item() == pytest.approx(1 / 3)
    assert generator_loss(fake, "vanilla").item() == pytest.approx(sp(-fake).mean().item())
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(fake, "wgan")


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.randn(4, 5, requires_grad=True)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    weight = adaptive_gan_weight((a * w).sum(), (b * w).sum(), w)
    assert weight.item() == pytest.approx((a.norm() / (b.norm() + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad

    zero = adaptive_gan_weight(0 * w.sum(), 0 * w.sum(), w)
    assert zero.item() == 0.0  # 0 / (0 + 1e-4), not 0/0
    assert adaptive_gan_weight((a * w).sum(), 0 * w.sum(), w).item() == 1e4  # clamped

    # fp16 last layer with huge gradients: each norm is ~1e6, far past fp16's 65504.
    w16 = torch.ones(100, 100, dtype=torch.float16, requires_grad=True)
    a16 = torch.full((100, 100), 3e4, dtype=torch.float16)
    b16 = torch.full((100, 100), 1e4, dtype=torch.float16)
    assert not torch.isfinite(a16.norm())  # what a naive fp16 norm gives
    weight = adaptive_gan_weight((a16 * w16).sum(), (b16 * w16).sum(), w16)
    assert weight.item() == pytest.approx(3e6 / (1e6 + 1e-4), rel=1e-3)

    # A gradient that itself overflowed: no GAN term this step, rather than an arbitrary one.
    inf = torch.full((100, 100), float("inf"), dtype=torch.float16)
    assert adaptive_gan_weight((inf * w16).sum(), (b16 * w16).sum(), w16).item() == 0.0


# ---- the combined loss: where every term's gradient goes ----------------------------------------


def everything(**changes) -> LossConfig:
    """Every term on, with the random LPIPS backbone and a small discriminator."""
    settings = dict(
        pixel="l1", ssim_weight=0.5, kl_weight=1e-3, lpips_weight=1.0, lpips_net="alex", lpips_pretrained=False,
        gan_weight=0.5, gan_start=0, disc_channels=8,
    )
    return LossConfig(**{**settings, **changes})


@pytest.fixture
def setup(tiny_config):
    torch.manual_seed(0)
    model = perturb(Autoencoder(tiny_config))
    crit = AutoencoderLoss(everything())
    x = torch.cat([photo(32), noisy(photo(32), 0.3, seed=1)])
    recon, posterior = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    return model, crit, x, recon, posterior


def grad_norms(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[float]:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [0.0 if g is None else g.norm().item() for g in grads]


def test_every_active_term_sends_gradient_where_it_should(setup):
    model, crit, x, recon, posterior = setup
    encoder = list(model.encoder.parameters()) + list(model.quant_conv.parameters())
    decoder = list(model.decoder.parameters()) + list(model.post_quant_conv.parameters())
    disc = list(crit.discriminator.parameters())

    terms = crit.terms(x, recon, posterior, step=0)
    assert set(terms) == {"l1", "ssim", "lpips", "kl", "gan_g"}
    for name, term in terms.items():
        assert term.requires_grad, name  # e.g. LPIPS computed under no_grad would fail here
        enc, dec, dsc = grad_norms(term, encoder), grad_norms(term, decoder), grad_norms(term, disc)
        assert model.encoder.conv_in.weight in encoder and enc[0] > 0, name  # reaches the first encoder layer
        assert sum(dsc) == 0, name  # the generator's terms never train the discriminator
        if name == "kl":
            assert sum(dec) == 0  # the KL sees the encoder only
        else:
            assert sum(d > 0 for d in dec) > 0.9 * len(dec), (name, dec)  # nearly all decoder tensors
            assert grad_norms(term, [model.decoder.conv_out.weight])[0] > 0, name


def test_discriminator_loss_trains_the_discriminator_only(setup):
    model, crit, x, recon, posterior = setup
    # Every weight tensor; the last bias gets exactly 0 here: with all logits inside (-1, 1) the
    # hinge loss pushes it down for real and up for fake images equally.
    disc = [p for p in crit.discriminator.parameters() if p.ndim > 1]
    d_loss, logs = crit.discriminator_loss(x, recon)
    assert set(logs) == {"disc", "logits_real", "logits_fake"}
    assert all(g is None for g in torch.autograd.grad(d_loss, list(model.parameters()), retain_graph=True, allow_unused=True))
    assert all(n > 0 for n in grad_norms(d_loss, disc))

    before = [p.detach().clone() for p in disc]
    opt = torch.optim.Adam(disc, lr=1e-3)
    d_loss.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, disc))
    assert all(p.grad is None for p in model.parameters())


def test_generator_step_leaves_the_discriminator_alone(setup):
    model, crit, x, recon, posterior = setup
    crit.discriminator.main[0].bias.requires_grad_(False)  # a user's own freezing survives
    loss, _ = crit(x, recon, posterior, step=0, last_layer=model.decoder.conv_out.weight)
    loss.backward()
    assert all(p.grad is None for p in crit.discriminator.parameters())
    flags = [p.requires_grad for p in crit.discriminator.parameters()]
    assert flags[1] is False and sum(flags) == len(flags) - 1
    assert model.decoder.conv_out.weight.grad.norm() > 0 and model.encoder.conv_in.weight.grad.norm() > 0


def test_total_is_the_weighted_sum_of_its_logged_terms(setup):
    model, crit, x, recon, posterior = setup
    last = model.decoder.conv_out.weight
    loss, logs = crit(x, recon, posterior, step=0, last_layer=last)
    c = crit.config
    nll = logs["l1"] + c.ssim_weight * logs["ssim"] + c.lpips_weight * logs["lpips"]
    assert logs["nll"].item() == pytest.approx(nll.item(), rel=1e-6)
    terms = crit.terms(x, recon, posterior, step=0)
    nll_live = terms["l1"] + c.ssim_weight * terms["ssim"] + c.lpips_weight * terms["lpips"]
    pixels = x[0].numel()  # the weights are LDM's: its loss sums the pixel loss over C*H*W, vaekit's is that / C*H*W
    expected_weight = c.gan_weight * adaptive_gan_weight(nll_live, terms["gan_g"], last, scale=pixels)
    assert logs["gan_weight"].item() == pytest.approx(expected_weight.item(), rel=1e-5) and expected_weight > 0
    total = nll + (c.kl_weight * logs["kl"] + logs["gan_weight"] * logs["gan_g"]) / pixels
    assert loss.item() == pytest.approx(total.item(), rel=1e-5) and logs["loss"].item() == loss.item()
    assert all(not v.requires_grad and v.ndim == 0 for v in logs.values())

    with pytest.raises(ValueError, match="last_layer=model.decoder.conv_out.weight"):
        crit(x, recon, posterior, step=0)
    fixed = AutoencoderLoss(everything(adaptive_gan_weight=False))
    _, logs = fixed(x, recon, posterior, step=0)
    assert logs["gan_weight"].item() == 0.5


def ldm_autoencoder_loss(x, recon, posterior, kl_weight, perceptual_weight, lpips, disc, disc_weight, last_layer):
    """LDM's `LPIPSWithDiscriminator` autoencoder loss (optimizer_idx 0, logvar 0, disc_factor 1), transcribed:
    L1 plus the per-image LPIPS added to every pixel, summed over C*H*W and averaged over the batch."""
    rec = (x - recon).abs() + perceptual_weight * lpips.net(x, recon)
    nll = rec.sum() / rec.shape[0]
    kl = posterior.kl().sum() / posterior.mean.shape[0]
    g = -disc(recon).mean()
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight
    return nll + kl_weight * kl + d_weight * g


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("clamped", [False, True])
def test_every_weight_means_ldms_at_any_crop_size(tiny_config, size, clamped):
    # The same weights (KL 5, LPIPS 1, GAN 0.5) in vaekit and in LDM's loss: vaekit's loss and its gradient
    # are LDM's divided by C*H*W, so every term pulls with LDM's relative strength at every crop size.
    torch.manual_seed(0)
    model = perturb(Autoencoder(tiny_config))
    crit = AutoencoderLoss(everything(ssim_weight=0.0, kl_weight=5.0))
    with torch.no_grad():  # a discriminator with a tiny gradient: LDM's adaptive weight hits its 1e4 clamp
        crit.discriminator.main[-1].weight.mul_(1e-7 if clamped else 10.0)
    x = torch.cat([photo(size), noisy(photo(size), 0.3, seed=1)])
    params, last = list(model.parameters()), model.decoder.conv_out.weight

    def loss_and_gradient(loss_fn):
        recon, posterior = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        loss = loss_fn(recon, posterior)
        return loss.item(), torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    logs = {}
    ours, ours_grad = loss_and_gradient(lambda r, p: logs.update(crit(x, r, p, 0, last)[1]) or crit(x, r, p, 0, last)[0])
    ldm, ldm_grad = loss_and_gradient(lambda r, p: ldm_autoencoder_loss(x, r, p, 5.0, 1.0, crit.lpips, crit.discriminator, 0.5, last))
    no_kl = loss_and_gradient(lambda r, p: ldm_autoencoder_loss(x, r, p, 0.0, 1.0, crit.lpips, crit.discriminator, 0.5, last))[1]
    pixels = 3 * size * size
    assert ours * pixels == pytest.approx(ldm, rel=1e-5)
    assert ((ours_grad * pixels - ldm_grad).norm() / ldm_grad.norm()).item() < 1e-5
    assert ((no_kl - ldm_grad).norm() / ldm_grad.norm()).item() > 0.01  # the KL term is part of what was compared
    assert (logs["gan_weight"].item() == 0.5e4) == clamped  # logged in LDM's scale: its d_weight


def test_bf16_autocast_gives_finite_losses_close_to_fp32(setup):
    model, crit, x, _, _ = setup
    last = model.decoder.conv_out.weight
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            recon, posterior = model(x)
            loss, logs = crit(x, recon, posterior, step=0, last_layer=last)
            d_loss, _ = crit.discriminator_loss(x, recon)
        (grad,) = torch.autograd.grad(loss, last)
        assert loss.dtype == d_loss.dtype == torch.float32 and torch.isfinite(grad).all()
        results.append(logs)
    fp32, bf16 = results
    for name in ("l1", "ssim", "lpips", "kl", "gan_g", "gan_weight"):
        assert bf16[name].item() == pytest.approx(fp32[name].item(), rel=0.05, abs=1e-3), name


def test_zero_weights_build_nothing_and_gan_waits_for_its_start(setup):
    model, _, x, recon, posterior = setup
    plain = AutoencoderLoss(LossConfig(pixel="charbonnier", kl_weight=1e-6))
    assert plain.lpips is None and plain.discriminator is None
    _, logs = plain(x, recon, posterior, step=10**6)
    assert set(logs) == {"charbonnier", "kl", "nll", "loss"}
    kl_term = 1e-6 * logs["kl"].item() / x[0].numel()
    assert logs["loss"].item() == pytest.approx(logs["charbonnier"].item() + kl_term, rel=1e-6)
    with pytest.raises(ValueError, match="gan_weight is 0"):
        plain.discriminator_loss(x, recon)

    with pytest.raises(ValueError, match="kind must be 'vae' or 'ae'"):
        AutoencoderLoss(kind="VAE")
    ae = AutoencoderLoss(LossConfig(kl_weight=1.0), kind="ae")
    assert "kl" not in ae(x, recon, posterior, step=0)[1]

    late = AutoencoderLoss(everything(gan_start=100))
    assert not late.gan_active(99) and late.gan_active(100)
    assert "gan_g" not in late(x, recon, posterior, step=99, last_layer=model.decoder.conv_out.weight)[1]
    assert "gan_g" in late(x, recon, posterior, step=100, last_layer=model.decoder.conv_out.weight)[1]


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        LossConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="no reconstruction term"):
        LossConfig(pixel_weight=0.0)
    with pytest.raises(ValueError, match="unknown LPIPS network 'squeeze'"):
        LossConfig(lpips_net="squeeze")
    with pytest.raises(ValueError, match="unknown GAN loss 'wgan'"):
        LossConfig(gan_loss="wgan")
