"""Reconstruction metrics, each pinned to a reference implementation (see docs/EVALUATION.md).

Every metric scores uint8 RGB, the pixels a user actually gets back from `vaekit reconstruct`.
Inputs may be uint8 NCHW tensors, float NCHW tensors in [-1, 1] (quantised first, exactly as the
PNGs are), or uint8 HxWx3 / NxHxWx3 arrays. Per-image metrics return a float64 tensor of shape (N,).

- psnr: skimage.metrics.peak_signal_noise_ratio(data_range=255), per image.
- ssim: skimage.metrics.structural_similarity(channel_axis=2, data_range=255) with its defaults,
  re-implemented in torch so batches run in one go on any device (tested equal to skimage).
- ms-ssim: pytorch_msssim.ms_ssim(data_range=255), i.e. Wang et al. 2003, 5 scales, 11-px Gaussian window.
- lpips: the `lpips` package, AlexNet (default) or VGG backbone, linear calibration v0.1.
- rfid: torch-fidelity's Inception-v3 2048-d pool features (the TF FID network), Fréchet distance here.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import to_uint8
from .extras import MissingPackage
from .losses import check_lpips_available
from .weights import fetch_weights

METRICS = ("psnr", "ssim", "ms-ssim", "lpips", "rfid")
DEFAULT_METRICS = ("psnr", "ssim")  # need no downloaded weights, so `vaekit eval` works offline

SSIM_WIN = 7  # skimage's default uniform window
MS_SSIM_WIN = 11
MS_SSIM_MIN_SIDE = (MS_SSIM_WIN - 1) * 2**4 + 1  # 5 scales: the coarsest must still hold a window
FID_FEATURES = 2048
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
LPIPS_BACKBONES = ("alex", "vgg")
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16}  # below these the backbones' pooling leaves no feature map


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _require(module: str, package: str) -> None:
    """A missing optional package becomes one line saying what to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"this metric needs the {package} package: pip install 'vaekit[eval]' (or pip install {package})") from None


def as_uint8_images(x: Tensor | np.ndarray) -> Tensor:
    """Any accepted image form -> uint8 NCHW tensor (on the input's device)."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.shape[-1] != 3 or x.ndim not in (3, 4):
            raise ValueError(f"image arrays must be uint8 HxWx3 or NxHxWx3, got {x.dtype} {x.shape}")
        x = torch.from_numpy(np.array(x)).movedim(-1, -3)  # a copy: arrays may be read-only
    if not isinstance(x, Tensor):
        raise TypeError(f"expected images as a tensor or uint8 array, got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be NCHW RGB, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floats in [-1, 1], got {x.dtype}")
    return torch.from_numpy(to_uint8(x)).movedim(-1, -3).to(x.device)  # the rounding of the PNGs


def _pair(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    x, y = as_uint8_images(x), as_uint8_images(y)
    if x.shape != y.shape:
        raise ValueError(f"image pairs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y.to(x.device)


# ---- the baseline every learned codec must beat ------------------------------------------------


def bicubic_thumbnail(image: np.ndarray, factor: int) -> np.ndarray:
    """HxWx3 uint8 down-scaled by `factor` and back up, both bicubic (PIL): no learning, 3 numbers per
    factor x factor patch (at 8x, 3 per 8x8 patch against a 4-channel VAE's 4), so a VAE's PSNR is read
    against it."""
    from PIL import Image

    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, w // factor), max(1, h // factor)), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def colour_error(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor:
    """The largest per-channel shift of the mean colour, in levels (0-255), per image: a reconstruction
    that lifts a saturated petal's blue by 24 levels scores 24 however sharp it is."""
    x, y = _pair(x, y)
    return (x.double().mean(dim=(2, 3)) - y.double().mean(dim=(2, 3))).abs().amax(dim=1)


def periodic_energy(x: Tensor | np.ndarray, y: Tensor | np.ndarray, periods: tuple[int, ...] = (2, 4, 8)) -> dict[int, float]:
    """How strongly the reconstruction error repeats with each period (pixels): the error's power at the
    period's frequencies (horizontal, vertical and diagonal, summed over images and channels) divided by
    the mean power of the neighbouring frequencies (within 3 bins). 1 means no grid; a checkerboard or
    an 8-pixel block pattern shows as a peak far above 1. Read it against the bicubic thumbnail's."""
    x, y = _pair(x, y)
    power = torch.fft.fft2(x.double() - y.double()).abs().pow(2).sum(dim=(0, 1))  # H x W
    h, w = power.shape
    out = {}
    for p in periods:
        peaks = {((h // p * a) % h, (w // p * b) % w) for a, b in ((0, 1), (1, 0), (1, 1), (1, -1))}
        near = {((ky + dy) % h, (kx + dx) % w) for ky, kx in peaks for dy in range(-3, 4) for dx in range(-3, 4)}
        near -= {((ky + dy) % h, (kx + dx) % w) for ky, kx in peaks for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        at = lambda bins: float(power[tuple(zip(*bins))].mean())  # noqa: E731
        out[p] = at(peaks) / max(at(near), 1e-12)
    return out


# ---- PSNR / SSIM / MS-SSIM -----------------------------------------------------------------


def psnr(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor:
    """PSNR in dB per image (data range 255); inf for identical images, as skimage."""
    x, y = _pair(x, y)
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)


def ssim(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor:
    """skimage's SSIM defaults: 7x7 uniform window, K1=0.01, K2=0.03, sample covariance, mean over
    the map with a 3-px border cropped, averaged over R, G, B. The crop means only windows fully
    inside the image count, which is a 'valid' box filter: skimage's reflect padding never matters."""
    x, y = _pair(x, y)
    if min(x.shape[-2:]) < SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {SSIM_WIN}x{SSIM_WIN} pixels, got {x.shape[-2]}x{x.shape[-1]}")
    x, y = x.double(), y.double()
    box = lambda t: F.avg_pool2d(t, SSIM_WIN, stride=1)  # noqa: E731
    ux, uy = box(x), box(y)
    cov_norm = SSIM_WIN**2 / (SSIM_WIN**2 - 1)
    vx = cov_norm * (box(x * x) - ux * ux)
    vy = cov_norm * (box(y * y) - uy * uy)
    vxy = cov_norm * (box(x * y) - ux * uy)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def ms_ssim(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor:
    """pytorch_msssim.ms_ssim with its defaults (5 scales, weights of Wang et al. 2003, 11-px
    Gaussian window sigma 1.5) at data range 255. Images below 161 px are refused rather than scored
    with fewer scales, which would give numbers no one else can compare with."""
    _require("pytorch_msssim", "pytorch-msssim")
    from pytorch_msssim import ms_ssim as reference

    x, y = _pair(x, y)
    h, w = x.shape[-2:]
    if min(h, w) < MS_SSIM_MIN_SIDE:
        raise ValueError(
            f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} px on the shorter side (5 scales, {MS_SSIM_WIN}-px window), "
            f"got {h}x{w}: use --resolution 256 or leave out ms-ssim"
        )
    return reference(x.double(), y.double(), data_range=255, size_average=False).double()


@dataclass(frozen=True)
class PerImageMetric:
    """A metric with one value per image pair; `info` goes into the evaluation protocol.
    (Set-level metrics such as FID have per_image = False and reset/update/compute instead.)"""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    info: dict = field(default_factory=dict)
    min_side: int = 1  # smaller images cannot be scored (checked by `vaekit eval` before reconstructing)
    per_image: ClassVar[bool] = True

    def __call__(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor:
        return self.fn(x, y)


# ---- LPIPS ---------------------------------------------------------------------------------


class LPIPS:
    """LPIPS v0.1 from the `lpips` package on the uint8-quantised images, no resizing.
    `pretrained_backbone=False` uses the package's random backbone (tests, offline experiments)."""

    name = "lpips"
    per_image = True

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu", pretrained_backbone: bool = True):
        _require("lpips", "lpips")
        import lpips

        if net not in LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {', '.join(LPIPS_BACKBONES)}")
        if pretrained_backbone:
            check_lpips_available(net)  # the training loss's check: one message for both
        self.net = net
        self.min_side = LPIPS_MIN_SIDE[net]
        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation notices
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
        self.model.to(device).eval().requires_grad_(False)
        self.info = {
            "implementation": f"lpips {package_version('lpips')} LPIPS(net={net!r}, version='0.1')",
            "backbone": net + ("" if pretrained_backbone else " (RANDOM weights: not comparable)"),
            "input": "the uint8 images mapped to [-1, 1], each at its evaluated size (no resize)",
            "averaging": "per image, then mean",
        }

    def __call__(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor:
        x, y = _pair(x, y)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            d = self.model(_to_unit(x.to(device)), _to_unit(y.to(device)))
        return d.flatten().double().cpu()


def _to_unit(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1.0


# ---- rFID ----------------------------------------------------------------------------------


def check_inception_available() -> Path:
    """Torch-fidelity's Inception weights in the torch hub cache (where torch-fidelity itself keeps
    them), downloaded if missing; offline, one line saying which file to put where."""
    return fetch_weights(INCEPTION_URL, "rFID's Inception-v3", "leave out rfid")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½). Tr (S1 S2)^½ is taken as Tr (A S2 A)^½ with
    A = S1^½: the same eigenvalues, but a symmetric PSD matrix, so eigh is exact and stable even for
    the rank-deficient covariances of small image sets (where sqrtm can turn complex)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a @ sigma2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (np.cov), as torch-fidelity and pytorch-fid compute them."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between two sets of features (rows), as from `feature_statistics`.

    With fewer images than feature dimensions squared it works on the centred features instead of
    the d x d covariances: S1 = AᵀA, S2 = BᵀB (A = centred real / sqrt(n-1)), the nonzero
    eigenvalues of S1 S2 are those of (ABᵀ)(ABᵀ)ᵀ, so Tr (S1 S2)^½ is the sum of singular values
    of the n x m matrix ABᵀ. Same number, milliseconds instead of seconds for a few hundred images."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    (n, d), m = real.shape, len(fake)
    if fake.ndim != 2 or fake.shape[1] != d:
        raise ValueError(f"feature sets differ in shape: {real.shape} and {fake.shape}")
    if min(n, m) < 2:
        raise ValueError(f"FID needs at least 2 images per set (a covariance), got {n} and {m}")
    if n * m > d * d:
        return frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    a = (real - real.mean(axis=0)) / np.sqrt(n - 1)
    b = (fake - fake.mean(axis=0)) / np.sqrt(m - 1)
    diff = real.mean(axis=0) - fake.mean(axis=0)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr_covmean)


def kid_from_features(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance (mean and std over random subsets), as torch-fidelity's
    `kid_features_to_metric`: the unbiased MMD² with the cubic polynomial kernel (x·y / d + 1)³, the
    subsets drawn in the same order from `np.random.RandomState(seed)`. Unlike FID it is unbiased at
    small sample sizes, so it suits the few hundred images a CPU run makes."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) < subset_size:
        raise ValueError(f"KID subsets of {subset_size} need at least that many images per set, got {len(real)} and {len(fake)}")
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3  # noqa: E731
    rng = np.random.RandomState(seed)
    m = subset_size
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        mmds[i] = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


class FID:
    """rFID: Fréchet distance between Inception features of originals and of reconstructions.

    The features are torch-fidelity's `FeatureExtractorInceptionV3` ('2048' pool layer): the TF
    Inception graph of the original FID (the same network torchmetrics wraps), uint8 input resized
    to 299² by its TF1-compatible bilinear. `weights` defaults to torch-fidelity's own file in the
    torch hub cache, so it is shared with torch-fidelity."""

    name = "rfid"
    per_image = False
    min_images = FID_FEATURES  # below the feature dimension the covariances are singular
    min_side = 1  # any size: Inception sees every image resized to 299x299

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None):
        _require("torch_fidelity", "torch-fidelity")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = Path(weights) if weights is not None else check_inception_available()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file {path} does not exist")
        # torch-fidelity unpickles with weights_only=False; a file that needs code execution is refused first.
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a plain tensor file ({type(e).__name__}); refusing to unpickle it") from None
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", [str(FID_FEATURES)], feature_extractor_weights_path=str(path))
        self.model.to(device)
        self.weights = path
        self.reset()

    def reset(self) -> None:
        self._real: list[Tensor] = []
        self._fake: list[Tensor] = []

    def features(self, x: Tensor | np.ndarray) -> Tensor:
        x = as_uint8_images(x).to(next(self.model.parameters()).device)
        with torch.inference_mode():
            return self.model(x)[0].double().cpu()

    def update(self, real: Tensor | np.ndarray, fake: Tensor | np.ndarray) -> None:
        real, fake = _pair(real, fake)
        self._real.append(self.features(real))
        self._fake.append(self.features(fake))

    @property
    def count(self) -> int:
        return sum(len(f) for f in self._real)

    def compute(self) -> float:
        n = self.count
        if n < 2:
            raise ValueError(f"rFID needs at least 2 images (a covariance), got {n}")
        if n < self.min_images:
            warnings.warn(self.small_sample_note(n), RuntimeWarning, stacklevel=2)
        return fid_from_features(torch.cat(self._real).numpy(), torch.cat(self._fake).numpy())

    def small_sample_note(self, n: int) -> str:
        return (
            f"rFID on {n} images: below {FID_FEATURES} (the feature dimension) the covariances are singular and "
            f"FID is biased upward; compare it only with rFID of the same images (published numbers use 50k)"
        )

    @property
    def info(self) -> dict:
        return {
            "implementation": f"torch-fidelity {package_version('torch-fidelity')} FeatureExtractorInceptionV3, "
            f"'{FID_FEATURES}' pool features; Fréchet distance by vaekit.metrics.fid_from_features (float64, "
            "unbiased covariances as np.cov)",
            "weights": self.weights.name,
            "input": "uint8 originals vs uint8 reconstructions, resized to 299x299 inside the extractor (TF1 bilinear)",
            "images": self.count,
        } | ({"warning": self.small_sample_note(self.count)} if self.count < self.min_images else {})


# ---- by name -------------------------------------------------------------------------------


def build_metric(name: str, device: str | torch.device = "cpu", lpips_net: str = "alex") -> PerImageMetric | LPIPS | FID:
    """The metric called `name` in `vaekit eval --metrics`, ready to score."""
    if name == "psnr":
        return PerImageMetric("psnr", psnr, {
            "implementation": "vaekit.metrics.psnr, float64; equals skimage.metrics.peak_signal_noise_ratio",
            "data_range": 255, "averaging": "per image, then mean; identical images give inf (null in JSON)"})
    if name == "ssim":
        return PerImageMetric("ssim", ssim, {
            "implementation": "vaekit.metrics.ssim, float64 torch; equals skimage.metrics.structural_similarity",
            "settings": "channel_axis=2, data_range=255, 7x7 uniform window, K1=0.01, K2=0.03, sample covariance, "
            "3-px border cropped, mean over R,G,B", "averaging": "per image, then mean"}, min_side=SSIM_WIN)
    if name == "ms-ssim":
        return PerImageMetric("ms-ssim", ms_ssim, {
            "implementation": f"pytorch_msssim {package_version('pytorch-msssim')} ms_ssim, float64",
            "settings": f"data_range=255, win_size={MS_SSIM_WIN}, sigma 1.5, 5 scales, weights "
            "(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), K=(0.01, 0.03)", "averaging": "per image, then mean"},
            min_side=MS_SSIM_MIN_SIDE)
    if name == "lpips":
        return LPIPS(lpips_net, device=device)
    if name == "rfid":
        return FID(device=device)
    raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
