import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaekit import analysis
from vaekit.data import to_tensor
from vaekit.metrics import psnr


def photos(size: int = 32, n: int = 4) -> torch.Tensor:
    from skimage import data

    from vaekit.data import center_crop

    pictures = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()][:n]
    return torch.cat([to_tensor(center_crop(p, size)) for p in pictures])


def pink_noise(n: int, size: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """Noise whose power falls as 1/f**exponent, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    f = torch.fft.fftfreq(size)
    r = (f[:, None] ** 2 + f[None, :] ** 2).sqrt().clamp(min=1 / size)
    spectrum = torch.fft.fft2(torch.randn(n, 3, size, size, generator=g)) * r ** (-exponent / 2)
    x = torch.fft.ifft2(spectrum).real
    return (x / x.abs().amax() * 0.9).float()


class FakeModel:
    """Just what the analysis calls: from_latent/normalize/device, with a chosen decoder."""

    def __init__(self, fn, size: int = 16):
        self.fn, self.size, self.device = fn, size, torch.device("cpu")

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.fn(z), size=self.size, mode="nearest")

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return z


# ---- spectra ------------------------------------------------------------------------------


def test_spectrum_peaks_at_the_frequency_of_a_sinusoid():
    n = torch.arange(64, dtype=torch.float64)
    x = torch.sin(2 * math.pi * 0.125 * n)[None, None, None, :].expand(1, 3, 64, 64)
    freqs, power = analysis.radial_power_spectrum(x)
    assert freqs[power.argmax()] == pytest.approx(0.125)
    assert analysis.high_frequency_fraction(x) < 1e-3
    high = torch.sin(2 * math.pi * 0.375 * n)[None, None, None, :].expand(1, 3, 64, 64)
    assert analysis.high_frequency_fraction(high) > 0.999


def test_white_noise_is_flat_and_natural_spectra_fall_as_f_squared():
    white = pink_noise(8, 64, 0.0)
    # Share of the disc of radius 0.5 lying outside radius 0.25: 1 - 1/4.
    assert analysis.high_frequency_fraction(white) == pytest.approx(0.75, abs=0.03)
    assert analysis.spectrum_slope(white) == pytest.approx(0.0, abs=0.2)
    assert analysis.spectrum_slope(pink_noise(8, 64, 2.0)) == pytest.approx(-2.0, abs=0.25)
    assert -3.5 < analysis.spectrum_slope(photos(64)) < -1.5  # real photos


def test_blur_ratio_is_one_for_identity_below_one_for_blur_above_for_noise():
    x = photos(32)
    assert analysis.blur(x, x).numbers["high_frequency_ratio"] == pytest.approx(1.0)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    result = analysis.blur(x, blurred, worst=2)
    assert result.numbers["high_frequency_ratio"] < 0.5
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert analysis.blur(x, noisy).numbers["high_frequency_ratio"] > 1.5
    # Worst reconstructions: lowest PSNR first, with an original | reconstruction | error picture.
    scores = psnr(x, blurred)
    worst = result.numbers["worst"]
    assert [w["index"] for w in worst] == scores.argsort()[:2].tolist()
    assert worst[0]["psnr"] == pytest.approx(float(scores.min()))
    assert result.images["worst_0"].shape == (32, 96, 3)


def test_error_map_is_black_where_equal_and_white_at_the_ceiling():
    a = torch.zeros(3, 4, 4)
    b = a.clone()
    b[:, 0, 0] = 2 * analysis.ERROR_MAP_CEILING  # an error of exactly the ceiling (in [0, 1] units)
    heat = analysis.error_map(a, b)
    assert heat[1, 1].tolist() == [0, 0, 0]
    assert heat[0, 0].tolist() == [255, 255, 255]


# ---- image statistics -----------------------------------------------------------------------


def test_statistics_distance_is_zero_to_itself_and_large_for_noise():
    x = photos(32)
    real = analysis.image_statistics(x)
    assert analysis.statistics_distance(real, real) == {"color": 0.0, "spectrum_slope": 0.0, "gradient": 0.0}
    noise = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    far = analysis.statistics_distance(analysis.image_statistics(noise), real)
    assert far["gradient"] > 0.5
    assert far["spectrum_slope"] > 1.0
    gray = analysis.statistics_distance(analysis.image_statistics(torch.zeros_like(x)), real)
    assert gray["color"] > 0.1
    assert sum(real["gradient_histogram"]) == pytest.approx(1.0)


def test_path_smoothness():
    assert analysis.path_smoothness(np.full(7, 0.1)) == {"mean_step": pytest.approx(0.1), "worst_jump": pytest.approx(1.0)}
    snap = np.array([0, 0, 0, 0.7, 0, 0, 0])
    assert analysis.path_smoothness(snap)["worst_jump"] == pytest.approx(7.0)


# ---- continuity and completeness on decoders whose answer is known ----------------------------


def test_continuity_finds_the_snap_of_a_discontinuous_decoder():
    z = torch.stack([-torch.ones(4, 2, 2), torch.ones(4, 2, 2)])
    smooth = FakeModel(lambda z: z[:, :3].clamp(-1, 1))
    snapping = FakeModel(lambda z: torch.sign(z[:, :3]))  # jumps where the line crosses 0
    even = analysis.continuity(smooth, z, [(0, 1)], steps=8, noise_max=0.5)
    jump = analysis.continuity(snapping, z, [(0, 1)], steps=8, noise_max=0.5)
    assert even.numbers["interpolation"]["l2"]["worst_jump"] == pytest.approx(1.0, abs=0.05)
    assert jump.numbers["interpolation"]["l2"]["worst_jump"] > 6.5
    # Straight path of a linear decoder: the distance from the start grows linearly to |b - a|.
    dist = even.numbers["interpolation"]["l2"]["distance_from_start"]
    assert dist[-1] == pytest.approx(1.0, abs=0.01) and dist[4] == pytest.approx(4 / 7, abs=0.01)
    assert even.numbers["interpolation"]["l2"]["detour"] == pytest.approx(1.0, abs=0.01)
    # A path through garbage: the middle frames are unlike both ends, so the path is longer than its ends' distance.
    garbage = FakeModel(lambda z: torch.where(z[:, :3].abs() < 0.9, torch.sign(torch.sin(40 * z[:, :3])), z[:, :3]))
    detour = analysis.continuity(garbage, z, [(0, 1)], steps=8).numbers["interpolation"]["l2"]["detour"]
    assert detour > 2
    noise = even.numbers["perturbation"]
    assert noise["noise"][0] == 0 and noise["noise"][-1] == pytest.approx(0.5)
    assert noise["l2"]["distance_from_start"][0] == 0
    assert even.images["interpolation_0"].shape == (16, 16 * 8, 3)
    assert set(even.images) == {"interpolation_0", "perturbation_0"}


def test_continuity_reports_lpips_when_given_a_distance():
    z = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    model = FakeModel(lambda z: z[:, :3].clamp(-1, 1))
    fake_lpips = lambda a, b: 3 * analysis.l2_distance(a, b)  # noqa: E731
    result = analysis.continuity(model, z, [(0, 1)], steps=4, lpips=fake_lpips)
    l2, lp = result.numbers["interpolation"]["l2"], result.numbers["interpolation"]["lpips"]
    assert lp["mean_step"] == pytest.approx(3 * l2["mean_step"], rel=1e-5)


def test_completeness_scores_garbage_far_from_photos():
    x = photos(16)
    z = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    noise_decoder = FakeModel(lambda z: torch.rand(z.shape[0], 3, 16, 16) * 2 - 1)
    result = analysis.completeness(noise_decoder, x, z, reconstructions=x, samples=4)
    assert result.numbers["reconstructions"]["distance"]["gradient"] == 0.0
    assert result.numbers["prior"]["distance"]["gradient"] > 0.4
    assert result.numbers["fitted"]["distance"]["spectrum_slope"] > 1.0
    assert result.images["samples_prior"].shape == (16, 64, 3)


# ---- latent statistics ------------------------------------------------------------------------


def test_latent_statistics_kl_shows_an_unused_channel(tiny_config):
    from vaekit.model import Autoencoder

    model = Autoencoder(tiny_config.replace(scaling_factor=0.5, shift_factor=1.0))
    g = torch.Generator().manual_seed(0)
    mean = 1.0 + 3.0 * torch.randn(64, 4, 4, 4, generator=g)
    mean[:, 3] = 0.0  # channel 3 carries nothing: posterior = prior
    logvar = torch.full_like(mean, -4.0)
    logvar[:, 3] = 0.0
    stats = analysis.latent_statistics(model, mean, logvar)
    kl = [c["kl"] for c in stats["channels"]]
    assert kl[3] == pytest.approx(0.0, abs=1e-6)
    assert min(kl[:3]) > 3.0  # 0.5 * (mu² + e^-4 - 1 + 4) with mu² ~ 10
    assert stats["channels"][0]["std"] == pytest.approx(0.5 * 3.0, rel=0.05)  # normalised by the configured scale
    assert stats["configured_scaling_factor"] == 0.5
    expected_scale = 1 / float(mean.std())
    assert stats["suggested_scaling_factor"] == pytest.approx(expected_scale)
    assert stats["suggested_shift_factor"] == pytest.approx(float(mean.mean()))
    assert sum(stats["channels"][0]["histogram"]) == pytest.approx(1.0)
    # Posterior std: e^-2 on three channels and 1 on the unused one, over the spread of the means.
    assert stats["posterior_noise"] == pytest.approx((3 * math.exp(-2) + 1) / 4 / float(mean.std()), rel=1e-5)


def test_latent_statistics_of_a_plain_ae_have_no_kl(tiny_config):
    from vaekit.model import Autoencoder

    model = Autoencoder(tiny_config.replace(kind="ae"))
    stats = analysis.latent_statistics(model, torch.randn(8, 4, 4, 4), None)
    assert stats["kl_mean"] is None and all(c["kl"] is None for c in stats["channels"])
    assert stats["posterior_noise"] == 0.0


# ---- the whole analysis on a real (random) model ----------------------------------------------


def test_analyze_on_a_tiny_model(tiny_model):
    x = photos(32)
    result = analysis.analyze(tiny_model, x, pairs=2, steps=4, samples=4, progress=False)
    n = result.numbers
    assert n["n_images"] == 4 and n["resolution"] == [32, 32] and n["latent_channels"] == 4
    with torch.inference_mode():
        expected = analysis.quantise(tiny_model(x)[0])
    assert torch.equal(result.reconstructions, expected)
    assert n["reconstruction"]["psnr"] == pytest.approx(float(psnr(x, expected).mean()))
    assert len(n["reconstruction"]["per_image"]["ssim"]) == 4
    assert n["blur"]["high_frequency_ratio"] > 0
    assert len(n["continuity"]["interpolation"]["l2"]["steps"]) == 2
    assert len(n["latents"]["channels"]) == 4 and n["latents"]["kl_mean"] > 0
    assert {"interpolation_1", "perturbation_1", "samples_prior", "samples_fitted", "worst_0"} <= set(result.images)
    assert all(im.dtype == np.uint8 and im.ndim == 3 for im in result.images.values())


def test_analyze_needs_two_images(tiny_model):
    with pytest.raises(ValueError, match="at least 2 images"):
        analysis.analyze(tiny_model, photos(32, n=1), progress=False)


def test_detail_box_finds_the_textured_corner():
    image = torch.zeros(3, 64, 64)
    image[:, 40:56, 8:24] = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    top, left, h, w = analysis.detail_box(image, 16)
    assert (h, w) == (16, 16) and abs(top - 40) <= 4 and abs(left - 8) <= 4
    assert analysis.crop(image, (top, left, h, w)).shape == (16, 16, 3)


def test_three_photos_give_three_interpolation_lines(tiny_model):
    result = analysis.analyze(tiny_model, photos(16, n=3), pairs=5, steps=3, samples=2, progress=False)
    assert len(result.numbers["continuity"]["interpolation"]["l2"]["steps"]) == 3  # (0, 1), (1, 2), (2, 0)
    assert len(result.numbers["continuity"]["perturbation"]["l2"]["steps"]) == 3


def test_progress_bar_counts_every_image_through_the_model(tiny_model, monkeypatch):
    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def set_postfix_str(self, s, refresh=True):
            pass

        def close(self):
            pass

    monkeypatch.setattr(analysis, "progress_bar", lambda **kwargs: Recorder(**kwargs))
    analysis.analyze(tiny_model, photos(16, n=3), pairs=2, steps=3, samples=2)
    assert bars[0].total == 2 * 3 + 2 * 2 * 3 + 2 * 2 and bars[0].n == bars[0].total
