"""Each metric against its reference implementation, on real photos (skimage's), plus the offline errors."""

import sys
import warnings
from pathlib import Path
from unittest import mock
from urllib.error import URLError

import lpips
import numpy as np
import pytest
import pytorch_msssim
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fe
from PIL import Image, ImageFilter
from scipy.linalg import sqrtm
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch_fidelity.metric_fid import fid_statistics_to_metric

from vaekit import metrics as M
from vaekit.data import to_tensor, to_uint8

PHOTOS = ("astronaut", "coffee", "chelsea")


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """A real photo from scikit-image, resized to (height, width)."""
    return np.array(Image.fromarray(getattr(skdata, name)()).resize(size[::-1], Image.LANCZOS))


def distort(image: np.ndarray, seed: int, blur: float = 1.0, noise: float = 8.0) -> np.ndarray:
    """A plausible reconstruction: blurred, with noise."""
    rng = np.random.default_rng(seed)
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, noise, image.shape) + 0.5, 0, 255).astype(np.uint8)


def nchw(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def pairs() -> tuple[list[np.ndarray], list[np.ndarray]]:
    real = [photo(n, (64, 64)) for n in PHOTOS]
    return real, [distort(x, seed=i, blur=0.5 + i, noise=4.0 * (i + 1)) for i, x in enumerate(real)]


def random_inception_weights(path: Path, calibration: torch.Tensor) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved where FID expects a weights file.

    It cannot be built without loading a state dict, so the loading is stubbed out once; the batch
    norms then take their statistics from `calibration` images so the 2048 features are O(1) and
    differ between images (with default init they shrink to ~1e-8 through 90 layers)."""
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
         mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):  # fmt: skip
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats = this batch's
    net.train()
    with torch.no_grad():
        net(calibration)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


# ---- PSNR / SSIM / MS-SSIM ------------------------------------------------------------------


def test_psnr_matches_skimage_per_image(pairs):
    real, fake = pairs
    ours = M.psnr(nchw(real), nchw(fake))
    ref = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(real, fake)]
    assert ours.dtype == torch.float64 and ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)
    assert len(set(np.round(ref, 3))) == 3 and 20 < min(ref) < max(ref) < 45  # distinct, realistic values
    assert M.psnr(real[0], real[0]).item() == float("inf")  # as skimage: identical images


def test_float_images_are_quantised_like_the_pngs(pairs):
    """Float tensors are scored after the same rounding `to_uint8` (and so every PNG) applies."""
    real, _ = pairs
    x = to_tensor(real[0])
    y = x + 0.013 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y[0, 0, :4, :4] = 1.7  # out of range: clamped
    assert M.psnr(x, y).item() == pytest.approx(peak_signal_noise_ratio(real[0], to_uint8(y)[0], data_range=255), rel=1e-12)
    assert M.ssim(x, y).item() == pytest.approx(M.ssim(real[0], to_uint8(y)[0]).item(), rel=1e-12)


@pytest.mark.parametrize("size", [(64, 64), (60, 52), (7, 9)])
def test_ssim_matches_skimage(size):
    real = [photo(n, size) for n in PHOTOS]
    fake = [distort(x, seed=i, blur=1.0 + i) for i, x in enumerate(real)]
    ours = M.ssim(nchw(real), nchw(fake))
    ref = [structural_similarity(a, b, channel_axis=2, data_range=255) for a, b in zip(real, fake)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-9)
    assert len(set(np.round(ref, 4))) == 3
    assert M.ssim(real[0], real[0]).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_refuses_images_smaller_than_its_window():
    x = np.zeros((6, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 7x7"):
        M.ssim(x, x)


def test_pairs_must_match():
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8 or floats"):
        M.psnr(torch.zeros(1, 3, 8, 8, dtype=torch.int32), torch.zeros(1, 3, 8, 8, dtype=torch.int32))


def test_ms_ssim_is_pytorch_msssim_at_data_range_255():
    real = [photo(n, (176, 168)) for n in PHOTOS[:2]]
    fake = [distort(x, seed=i, blur=1.0 + 2 * i) for i, x in enumerate(real)]
    ours = M.ms_ssim(nchw(real), nchw(fake))
    ref = pytorch_msssim.ms_ssim(nchw(real).double(), nchw(fake).double(), data_range=255, size_average=False)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-12)
    assert 0.5 < ours[1] < ours[0] < 1.0  # more blur, lower score
    assert M.ms_ssim(real[0], real[0]).item() == pytest.approx(1.0, abs=1e-9)


def test_ms_ssim_refuses_small_images_with_advice():
    x = photo("astronaut", (160, 200))
    with pytest.raises(ValueError, match=r"at least 161 px.*160x200.*--resolution 256"):
        M.ms_ssim(x, x)


# ---- LPIPS ---------------------------------------------------------------------------------


def test_lpips_matches_the_lpips_package(pairs):
    real, fake = pairs
    net = "alex"  # vgg is the same code path with another name (and 5x slower here)
    torch.manual_seed(0)
    ours = M.LPIPS(net, pretrained_backbone=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation notices
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()  # calibrated linear layers, random backbone
    x, y = nchw(real).float() / 127.5 - 1, nchw(fake).float() / 127.5 - 1
    with torch.no_grad():
        expected = ref(x, y).flatten().double()
    got = ours(nchw(real), nchw(fake))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert got.shape == (3,) and bool((got > 0).all()) and len(set(got.tolist())) == 3
    assert ours(real[0], real[0]).item() == pytest.approx(0.0, abs=1e-7)
    assert "RANDOM" in ours.info["backbone"] and net in ours.info["implementation"]


@pytest.mark.parametrize("net, file", [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")])
def test_lpips_offline_error_is_one_line_naming_file_and_folder(monkeypatch, tmp_path, net, file):
    folder = offline(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        M.LPIPS(net)
    msg = str(e.value)
    assert "\n" not in msg and file in msg and str(folder) in msg
    with pytest.raises(ValueError, match="unknown LPIPS backbone 'squeeze'"):
        M.LPIPS("squeeze")


# ---- rFID ----------------------------------------------------------------------------------


def random_stats(n: int, d: int, seed: int, scale: float, shift: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return shift + scale * rng.normal(size=(n, d)) @ mix


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm(s1 @ s2).real))


@pytest.mark.parametrize("n", [300, 20])  # full-rank covariances, and fewer images than dimensions
def test_frechet_distance_matches_scipy_sqrtm(n):
    f1, f2 = random_stats(n, 32, 1, 1.0, 0.0), random_stats(n, 32, 2, 1.4, 0.3)
    ref = scipy_fid(f1, f2)
    ours = M.frechet_distance(*M.feature_statistics(f1), *M.feature_statistics(f2))
    assert ours == pytest.approx(ref, rel=1e-7)
    tf = fid_statistics_to_metric(*({"mu": m, "sigma": s} for m, s in (M.feature_statistics(f1), M.feature_statistics(f2))), False)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-7)
    assert ref > 1.0  # a real difference, not a degenerate case


@pytest.mark.parametrize("n, m", [(20, 25), (40, 40), (300, 200)])
def test_fid_from_features_both_routes_agree(n, m):
    """Few images: the n x m nuclear-norm route; many: the covariance route. Same number."""
    f1, f2 = random_stats(n, 16, 3, 1.0, 0.0), random_stats(m, 16, 4, 0.7, -0.2)
    ref = M.frechet_distance(*M.feature_statistics(f1), *M.feature_statistics(f2))
    assert M.fid_from_features(f1, f2) == pytest.approx(ref, rel=1e-9)
    assert M.fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2 images"):
        M.fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))


def test_rfid_uses_torch_fidelity_features_and_warns_on_few_images(pairs, tmp_path):
    real, fake = pairs
    weights = random_inception_weights(tmp_path / "inception.pth", nchw(real))
    fid = M.FID(weights=weights)
    fid.update(nchw(real[:2]), nchw(fake[:2]))  # two batches, as evaluate() feeds it
    fid.update(real[2], fake[2])
    assert fid.count == 3
    with pytest.warns(RuntimeWarning, match="3 images: below 2048"):
        got = fid.compute()

    ref_net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        f_real, f_fake = (ref_net(nchw(x))[0].double().numpy() for x in (real, fake))
    assert f_real.shape == (3, 2048) and f_real.std(axis=0).mean() > 1e-3  # the random features are not degenerate
    assert got == pytest.approx(M.fid_from_features(f_real, f_fake), rel=1e-6)
    assert got > 0
    assert fid.info["images"] == 3 and fid.info["weights"] == "inception.pth"


def test_rfid_offline_error_is_one_line_naming_file_and_folder(monkeypatch, tmp_path):
    folder = offline(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        M.FID()
    msg = str(e.value)
    assert "\n" not in msg and "weights-inception-2015-12-05-6726825d.pth" in msg and str(folder) in msg


def test_rfid_refuses_weights_that_need_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": mock.sentinel.code}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        M.FID(weights=path)


def test_metrics_by_name():
    assert M.build_metric("psnr").name == "psnr" and M.build_metric("ms-ssim").fn is M.ms_ssim
    with pytest.raises(ValueError, match="unknown metric 'fid'.*psnr, ssim, ms-ssim, lpips, rfid"):
        M.build_metric("fid")


def test_missing_optional_package_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    with pytest.raises(RuntimeError, match=r"needs the lpips package: pip install 'vaekit\[eval\]'"):
        M.LPIPS(pretrained_backbone=False)


def test_bicubic_thumbnail_keeps_flat_colours_and_loses_detail_that_is_finer_than_its_factor():
    from vaekit.metrics import bicubic_thumbnail

    flat = np.full((48, 40, 3), (250, 3, 128), np.uint8)
    assert np.array_equal(bicubic_thumbnail(flat, 8), flat)  # any size, not only squares
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    for factor in (2, 8):
        back = bicubic_thumbnail(checker, factor)
        assert back.shape == checker.shape and abs(float(back.mean()) - 127.5) < 2 and back.std() < 10  # detail gone


def test_colour_error_is_the_largest_mean_channel_shift_in_levels():
    a = np.full((2, 16, 16, 3), (250, 100, 3), np.uint8)
    b = a.copy()
    b[0, ..., 2] += 24  # the lifted blue
    b[1, :8, :, 1] -= 10  # half the image 10 levels darker in green: mean shift 5
    assert M.colour_error(b, a).tolist() == [24.0, 5.0]


def test_periodic_energy_finds_grids_in_the_error_and_not_in_smooth_errors():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, (4, 64, 64, 3)).astype(np.uint8)
    noisy = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    plain = M.periodic_energy(noisy, image)
    assert all(0.5 < v < 2 for v in plain.values())  # white error: flat spectrum
    yy, xx = np.indices((64, 64))
    for period in (2, 4, 8):
        grid = ((yy % period == 0) | (xx % period == 0)) * 6
        gridded = np.clip(noisy.astype(int) + grid[None, ..., None], 0, 255).astype(np.uint8)
        e = M.periodic_energy(gridded, image)
        assert e[period] > 20 * plain[period], (period, e)
    checker = np.clip(noisy.astype(int) + ((yy + xx) % 2 * 6)[None, ..., None], 0, 255).astype(np.uint8)
    e = M.periodic_energy(checker, image)
    assert e[2] > 20 and e[4] < 2 and e[8] < 2  # a checkerboard is a 2-px pattern only
