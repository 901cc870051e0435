"""Diffusability: how easy a latent space is for a diffusion model, scored by training a small one on it.

One fixed protocol (`Protocol`, docs/DIFFUSABILITY.md), the same for every model vaekit loads, pixel
space included:

1. **Crops.** `train_crops` random crops of DATA's training images and `val_crops` of its held-out
   ones (the trainer's split, `vaekit.data.training_data`), `resolution` pixels a side, fixed seeds;
   RGBA with their alpha for a 4-channel model, as the trainer reads them.
2. **Latents.** `model.to_latent` (the normalised posterior mode a diffusion model sees), then one
   global shift and scale so the training latents have mean 0 and variance 1: the score must not
   depend on a scaling factor a user can set, only on the latents' structure.
3. **Denoiser.** A small conv UNet (`Denoiser`; its size follows the latent's shape by `denoiser_shape`),
   trained with rectified flow (x_t = (1 - t) z + t e, predict v = e - z, t uniform) for `steps` AdamW
   steps of `batch` latents, seed fixed.
4. **Score.** On the held-out latents, with the same noise for every model, the relative denoising
   error at each noise level t in `levels`: E|z_hat - z|² / E|z|² with z_hat = x_t - t v_hat (0 is
   perfect, 1 knows nothing); `score` is their mean. Lower is easier to diffuse.
5. **Samples.** `samples` latents drawn by `sample_steps` Euler steps from noise, decoded: their
   image-statistics distance to the held-out crops (`vaekit.analysis.statistics_distance`), and their
   KID (Inception features, when torch-fidelity's weights are there; RGBA composited on white, as
   reports show it) with its std over subsets.
6. **Spectra.** The latents' high-frequency share and spectrum slope, beside the images' own.

A latent space whose neighbouring values predict each other (smooth, photo-like spectra) gives the
denoiser less to learn; `shuffle_positions` destroys exactly that and must score worse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .advice import option
from .analysis import high_frequency_fraction, image_statistics, spectrum_slope, statistics_distance
from .data import on_white_tensor
from .model import Autoencoder
from .progress import progress as progress_bar


@dataclass(frozen=True)
class Protocol:
    """Every setting of the score; change one and scores are no longer comparable."""

    resolution: int = 64
    train_crops: int = 2048
    val_crops: int = 256
    min_scale: float = 0.25  # random down-scale of each photo before cropping, as the quickstart trains
    steps: int = 600
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 30
    levels: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    samples: int = 64
    sample_steps: int = 32
    kid_subset: int = 32
    kid_subsets: int = 50
    seed: int = 0


# ---- the denoiser ----------------------------------------------------------------------------


def denoiser_shape(channels: int, side: int, image_side: int) -> dict[str, int]:
    """The size rule. The denoiser sees one position per 8x8 image pixels (or coarser, for latents
    that are): `patch` = 8 / (image side / latent side), at least 1, folds patch x patch latent pixels
    into one position. Its width is twice the values per position (channels x patch²), at least 64,
    rounded up to 32. It downsamples once where the grid has 8 or more positions a side."""
    factor = image_side // side
    patch = max(1, 8 // factor)
    if side % patch:
        raise ValueError(f"latent side {side} is not a multiple of the denoiser's patch {patch}")
    width = max(64, math.ceil(2 * channels * patch * patch / 32) * 32)
    return {"patch": patch, "width": width, "levels": 1 if side // patch >= 8 else 0}


class _Block(nn.Module):
    """Pre-norm residual block with the time embedding added between its two convolutions."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, width), nn.Conv2d(width, width, 3, padding=1)
        self.time = nn.Linear(width, width)
        self.norm2, self.conv2 = nn.GroupNorm(8, width), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class Denoiser(nn.Module):
    """A small UNet: patch stem, two blocks, (down, two blocks, up, skip add,) two blocks, patch head."""

    def __init__(self, channels: int, patch: int, width: int, levels: int):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, patch, stride=patch) if patch > 1 else nn.Conv2d(channels, width, 3, padding=1)
        self.embed = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.first = nn.ModuleList([_Block(width), _Block(width)])
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1) if levels else None
        self.inner = nn.ModuleList([_Block(width), _Block(width)] if levels else [])
        self.up = nn.Conv2d(width, width, 3, padding=1) if levels else None
        self.last = nn.ModuleList([_Block(width), _Block(width)])
        self.norm = nn.GroupNorm(8, width)
        self.head = nn.ConvTranspose2d(width, channels, patch, stride=patch) if patch > 1 else nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        freqs = torch.exp(-math.log(10_000) * torch.arange(32, device=x.device) / 32)
        angles = 1000 * t[:, None] * freqs[None]
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.stem(x)
        for block in self.first:
            h = block(h, emb)
        if self.down is not None:
            skip, h = h, self.down(h)
            for block in self.inner:
                h = block(h, emb)
            h = skip + self.up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
        for block in self.last:
            h = block(h, emb)
        return self.head(F.silu(self.norm(h)))


# ---- the protocol ----------------------------------------------------------------------------


def shuffle_positions(z: Tensor, seed: int = 0) -> Tensor:
    """The same fixed random permutation of spatial positions for every latent: an orthogonal map that
    keeps every value and statistic but destroys which values are neighbours (the known-worse case)."""
    n, c, h, w = z.shape
    order = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
    return z.flatten(2)[:, :, order].reshape(n, c, h, w)


def denoise_errors(net: Denoiser, z: Tensor, levels: tuple[float, ...], seed: int, batch: int = 64) -> list[float]:
    """Relative error E|z_hat - z|² / E|z|² of the one-step estimate at each noise level, with noise
    fixed by `seed` (the same for every model)."""
    g = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    errors = []
    with torch.no_grad():
        for t in levels:
            num = den = 0.0
            for i in range(0, len(z), batch):
                z0 = z[i : i + batch]
                e = torch.randn(z0.shape, generator=g)
                xt = (1 - t) * z0 + t * e
                z_hat = xt - t * net(xt.to(device), torch.full((len(z0),), t, device=device)).cpu()
                num += float((z_hat - z0).pow(2).sum())
                den += float(z0.pow(2).sum())
            errors.append(num / den)
    return errors


def train_denoiser(train: Tensor, val: Tensor, protocol: Protocol, image_side: int, progress: bool = True,
                   device: str | torch.device = "cpu") -> tuple[Denoiser, dict[str, Any]]:  # fmt: skip
    """Steps 3 and 4 on given latents (already standardised): the trained denoiser and its numbers."""
    p = protocol
    torch.manual_seed(p.seed)
    shape = denoiser_shape(train.shape[1], train.shape[-1], image_side)
    net = Denoiser(train.shape[1], **shape).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(p.seed + 1)
    losses = []
    bar = progress_bar(range(p.steps), desc="diffusability", unit="step", enabled=progress)
    for step in bar:
        lr = p.lr * min(1.0, (step + 1) / p.warmup) * 0.5 * (1 + math.cos(math.pi * step / p.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(train), (p.batch,), generator=g)
        z0, e, t = train[idx], torch.randn((p.batch, *train.shape[1:]), generator=g), torch.rand(p.batch, generator=g)
        xt = (1 - t)[:, None, None, None] * z0 + t[:, None, None, None] * e
        loss = F.mse_loss(net(xt.to(device), t.to(device)), (e - z0).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    errors = denoise_errors(net, val, p.levels, p.seed + 2)
    tail = losses[-max(1, p.steps // 10) :]
    numbers = {
        "score": float(np.mean(errors)),
        "levels": list(p.levels),
        "errors": errors,
        "train_loss_end": float(np.mean(tail)),
        "denoiser": shape | {"parameters": sum(q.numel() for q in net.parameters())},
    }
    return net, numbers


@torch.no_grad()
def sample(net: Denoiser, shape: tuple[int, ...], n: int, steps: int, seed: int) -> Tensor:
    """Euler steps of the learned flow from t = 1 (noise) to t = 0."""
    device = next(net.parameters()).device
    z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        z = z + (t1 - t0) * net(z, torch.full((n,), t0, device=device))
    return z.cpu()


def crops(data: str, protocol: Protocol, val: str | None = None, alpha: bool = False) -> tuple[Tensor, Tensor, str]:
    """Step 1: training and held-out crops in [-1, 1] (RGBA with `alpha`), and a description of where they came from."""
    from .data import CropDataset, Crops, training_data

    p = protocol
    split = training_data(data, p.resolution, val=val, val_images=64, val_resolution=4 * p.resolution, min_scale=p.min_scale,
                          alpha=alpha)  # fmt: skip
    if not split.val:
        raise ValueError(f"{data} left no held-out images: pass {option('val', 'DATA')} naming other images")
    loader = iter(split.loader(p.batch, seed=p.seed))
    train = []
    while sum(len(b) for b in train) < p.train_crops:
        train.append(next(loader).images)
    held = CropDataset([image for _, image in split.val], Crops(p.resolution, p.min_scale))
    val_crops = [held[(i % len(held), (p.seed, 99, i))][0] for i in range(p.val_crops)]
    as_float = lambda u8: u8.float() / 127.5 - 1.0  # noqa: E731
    return as_float(torch.cat(train)[: p.train_crops]), as_float(torch.stack(val_crops)), split.description


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, device: torch.device, batch: int = 64) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def score(model: Autoencoder, data: str, protocol: Protocol | None = None, val: str | None = None, kid: Any = None,
          progress: bool = True, transform: Callable[[Tensor], Tensor] | None = None,
          device: str | torch.device = "cpu") -> tuple[dict[str, Any], Tensor]:  # fmt: skip
    """The whole protocol for one model: its numbers (JSON-ready) and the decoded samples.

    `kid`: a `vaekit.metrics.FID`-like object with `features(images)` (Inception), or None to leave KID
    out. `transform`: applied to the latents before standardising (tests use `shuffle_positions`)."""
    p = protocol or Protocol()
    device = torch.device(device)
    model = model.eval().float().to(device)
    if p.resolution % model.factor:
        r, f = p.resolution, model.factor
        raise ValueError(f"{option('resolution', r)} is not a multiple of the model's factor {f}: use {option('resolution', r - r % f + f)}")
    x_train, x_val, description = crops(data, p, val, alpha=model.config.rgba)
    z_train, z_val = _batched(model.to_latent, x_train, device), _batched(model.to_latent, x_val, device)
    if transform is not None:
        z_train, z_val = transform(z_train), transform(z_val)
    shift, scale = float(z_train.mean()), float(z_train.std())
    z_train, z_val = (z_train - shift) / scale, (z_val - shift) / scale
    net, numbers = train_denoiser(z_train, z_val, p, p.resolution, progress, device)
    z = sample(net, tuple(z_train.shape[1:]), p.samples, p.sample_steps, p.seed + 3) * scale + shift
    images = _batched(lambda t: model.from_latent(t).clamp(-1, 1), z, device)  # (with a transform, samples of the transformed latents: only the losses mean anything)
    stats = statistics_distance(image_statistics(images), image_statistics(x_val))
    numbers |= {
        "samples": {"n": p.samples, "distance": stats, "kid": None},
        "latents": {"shape": list(z_train.shape[1:]), "shift": shift, "scale": scale,
                    "high_frequency_fraction": high_frequency_fraction(z_val), "spectrum_slope": spectrum_slope(z_val)},
        "images": {"high_frequency_fraction": high_frequency_fraction(x_val), "spectrum_slope": spectrum_slope(x_val),
                   "channels": x_val.shape[1]},
        "data": description, "protocol": asdict(p),
    }  # fmt: skip
    if kid is not None:
        from .metrics import kid_from_features

        real, fake = kid.features(on_white_tensor(x_val)).numpy(), kid.features(on_white_tensor(images)).numpy()
        size = min(p.kid_subset, len(real), len(fake))
        mean, std = kid_from_features(real, fake, subsets=p.kid_subsets, subset_size=size, seed=p.seed)
        numbers["samples"]["kid"] = {"mean": mean, "std": std, "subset_size": size, "subsets": p.kid_subsets}
    return numbers, images
