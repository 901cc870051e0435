"""The autoencoder training losses of the LDM recipe, each usable on its own, and `AutoencoderLoss`
that combines them for the trainer.

Scale convention: every weight means what it means in LDM's `LPIPSWithDiscriminator` and diffusers'
`train_autoencoderkl.py`, so numbers copy from published configs. Those sum the pixel loss over the
C*H*W values of an image (mean over the batch) and add `kl_weight * KL` with the KL summed over latent
elements. `AutoencoderLoss` is exactly that loss divided by C*H*W, so its pixel, SSIM and LPIPS terms
are means (LDM adds LPIPS to every pixel before summing, so `lpips_weight` is its perceptual_weight),
the KL enters as `kl_weight * KL / (C*H*W)`, and the GAN term as `weight * g / (C*H*W)` with LDM's
weight (its adaptive weight, clamp at 1e4 included). The relative strength of every term is then
LDM's at any crop size and channel count. LDM's learned output log-variance is left out: LDM never
gives it to an optimizer, so it stays 0 and `rec / exp(0) + 0 = rec`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import on_white_tensor
from .model import Posterior
from .weights import fetch_weights

PixelLoss = Literal["l1", "l2", "charbonnier"]
GanLoss = Literal["hinge", "vanilla"]  # "vanilla" = the non-saturating GAN loss
DiscNorm = Literal["batch", "group", "none"]


# ---- reconstruction -----------------------------------------------------------------------------


def reconstruction_loss(x: Tensor, y: Tensor, kind: PixelLoss = "l1", eps: float = 1e-3) -> Tensor:
    """Mean per-element pixel loss, in fp32. Charbonnier is sqrt(d^2 + eps^2): L1 for |d| >> eps,
    but smooth (quadratic) near 0, so its gradient does not flip sign at zero error."""
    _check_pair(x, y)
    d = x.float() - y.float()
    if kind == "l1":
        return d.abs().mean()
    if kind == "l2":
        return d.pow(2).mean()
    if kind == "charbonnier":
        return torch.sqrt(d.pow(2) + eps * eps).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}; use 'l1', 'l2' or 'charbonnier'")


def gaussian_ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [-1, 1], differentiable, for the loss. (The metric
    `vaekit.metrics.ssim` is skimage's default, a 7-px uniform window on uint8 images: another number.)

    The standard metric: computed on the [0, 1] images (SSIM is not shift invariant, so this is
    what uint8 tools report), Gaussian window 11 / sigma 1.5, population (co)variances,
    statistics only where the window fits, averaged over channels (an RGBA image's alpha too) and
    positions. It equals `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=-1)` on the same images. Computed in fp32 with
    autocast off: the variance differences cancel catastrophically in bf16.
    """
    _check_pair(x, y)
    window, sigma = 11, 1.5
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {tuple(x.shape[-2:])}")
    with torch.autocast(x.device.type, enabled=False):
        x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
        n, c = x.shape[:2]
        k = torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2
        g = torch.exp(-(k**2) / (2 * sigma**2))
        g = (g / g.sum()).repeat(c, 1, 1)
        stats = torch.cat([x, y, x * x, y * y, x * y])  # one separable blur for all five maps
        stats = F.conv2d(stats, g[:, :, None, :], groups=c)
        stats = F.conv2d(stats, g[:, :, :, None], groups=c)
        mx, my, xx, yy, xy = stats.split(n)
        vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
        c1, c2 = 0.01**2, 0.03**2  # (K * data_range)^2 with data_range 1
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        return s.mean(dim=[1, 2, 3])


def ssim_loss(x: Tensor, y: Tensor) -> Tensor:
    """1 - mean SSIM over the batch (images in [-1, 1])."""
    return 1.0 - gaussian_ssim(x, y).mean()


def kl_loss(posterior: Posterior) -> Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements, mean over the batch (LDM's normalisation).
    Zero for a plain autoencoder's point-mass posterior."""
    return posterior.kl().float().mean()


# ---- LPIPS ----------------------------------------------------------------------------------------

_LPIPS_BACKBONES = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights"}


def check_lpips_available(net: str = "vgg") -> None:
    """Make sure `LPIPSLoss(net, pretrained=True)` can be built: download torchvision's ImageNet
    backbone into the torch hub cache if it is missing, else raise a one-line FileNotFoundError
    naming the file and the folder to put it in. Call it before training starts."""
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS network {net!r}; use 'vgg' or 'alex'")
    import lpips
    import torchvision.models

    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not linear.is_file():
        raise FileNotFoundError(
            f"the lpips package lacks its linear-layer weights {linear.name}: put lpips/weights/v0.1/{net}.pth "
            f"(from github.com/richzhang/PerceptualSimilarity) at {linear}, or reinstall lpips"
        )
    url = getattr(torchvision.models, _LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    fetch_weights(url, f"LPIPS ({net})", "leave LPIPS out (weight 0 / drop it from --metrics)")


class LPIPSLoss(nn.Module):
    """LPIPS distance (mean over the batch) for images in [-1, 1], through the `lpips` package. RGBA images
    (4 channels) are composited on white first (`vaekit.data.on_white_tensor`): the network takes 3 channels,
    and on white it scores what a 3-channel model trained on the same files sees (`read_image` puts their
    transparency on white), while colours under zero alpha, which nobody sees, do not steer it.

    The network is frozen (no parameter requires grad, always in eval mode, so its dropout stays
    off even under `.train()`), but it is not run under no_grad: gradients flow into the images and
    from there into the decoder. `pretrained=False` builds a random backbone with non-negative
    random linear weights (still a distance); it is for tests without the ImageNet weights.
    """

    def __init__(self, net: Literal["vgg", "alex"] = "vgg", pretrained: bool = True):
        super().__init__()
        if pretrained:
            check_lpips_available(net)
        elif net not in _LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS network {net!r}; use 'vgg' or 'alex'")
        import lpips

        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation notices
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.net = lpips.LPIPS(net=net, pretrained=pretrained, pnet_rand=not pretrained, verbose=False)
        if not pretrained:
            with torch.no_grad():
                for lin in self.net.lins:
                    lin.model[-1].weight.abs_()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPSLoss":
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        return self.net(on_white_tensor(x), on_white_tensor(y)).float().mean()


# ---- PatchGAN discriminator and GAN losses ------------------------------------------------------


class PatchGANDiscriminator(nn.Module):
    """The LDM/taming-transformers `NLayerDiscriminator` (pix2pix PatchGAN): 4x4 convs, stride 2
    then 1, LeakyReLU 0.2, one logit per patch. Same module names (`main.*`), so an LDM
    `loss.discriminator.*` state dict loads into it.

    `norm="batch"` is LDM's choice and the default. Under DDP it works as it is (each rank
    normalises its own batch, as LDM did under Lightning); `nn.SyncBatchNorm` would share the
    statistics, but only on GPUs. `"group"` (GroupNorm) and `"none"` depend on no batch and hold
    no buffers, for small per-rank batches.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: DiscNorm = "batch"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"unknown discriminator norm {norm!r}; use 'batch', 'group' or 'none'")

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=norm == "none")
            layers: list[nn.Module] = [conv]
            if norm == "batch":
                layers.append(nn.BatchNorm2d(cout))
            elif norm == "group":
                layers.append(nn.GroupNorm(math.gcd(32, cout), cout))
            return layers + [nn.LeakyReLU(0.2, True)]

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            layers += block(channels * prev, channels * mult, stride=2 if i < n_layers else 1)
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _init_discriminator(m: nn.Module) -> None:
    # taming's weights_init: conv weights N(0, 0.02) (biases keep their default), norm scales N(1, 0.02).
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: GanLoss = "hinge") -> Tensor:
    """LDM's discriminator losses: hinge, or vanilla (the non-saturating / BCE one), both halved."""
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind == "vanilla":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise ValueError(f"unknown GAN loss {kind!r}; use 'hinge' or 'vanilla'")


def generator_loss(logits_fake: Tensor, kind: GanLoss = "hinge") -> Tensor:
    """The autoencoder's GAN term: -mean(logits) for hinge (LDM), softplus(-logits) for vanilla."""
    fake = logits_fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "vanilla":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; use 'hinge' or 'vanilla'")


def adaptive_gan_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, scale: float = 1.0) -> Tensor:
    """LDM's adaptive GAN weight of one batch: `gan_weight_from_grads` of the gradients of the
    reconstruction loss and the generator loss with respect to `last_layer` (the decoder's last conv
    weight). Both graphs are retained for the caller's backward."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return gan_weight_from_grads(nll_grad, g_grad, scale)


def gan_weight_from_grads(nll_grad: Tensor, g_grad: Tensor, scale: float = 1.0, max_weight: float = 1e4) -> Tensor:
    """LDM's adaptive weight `scale * ||nll_grad|| / (||g_grad|| + 1e-4)`, clamped to [0, max_weight] and
    detached, so the GAN term pushes the decoder's last layer about as hard as the reconstruction does.
    `scale` = C*H*W turns the gradient of a mean pixel loss into that of LDM's summed one.

    Norms are taken in fp32 (an fp16 gradient norm overflows long before the gradients do). If either
    gradient is non-finite the weight is 0: that step trains without the GAN term rather than with an
    arbitrary one. Zero gradients give 0 / 1e-4 = 0, never 0/0.
    """
    nll_norm, g_norm = nll_grad.float().norm(), g_grad.float().norm()
    weight = (scale * nll_norm / (g_norm + 1e-4)).clamp(0.0, max_weight)
    finite = torch.isfinite(nll_norm) & torch.isfinite(g_norm)  # inf/nan gradients (or norms past fp32)
    return torch.where(finite, weight, torch.zeros_like(weight)).detach()  # no host sync


# ---- scale equivariance ----------------------------------------------------------------------------

ScalePair = tuple[Tensor, Tensor]  # (decoded downsampled latent, downsampled image)


def downsample(x: Tensor, factor: int) -> Tensor:
    """Bilinear downsampling (antialiased) by an integer factor, the same for images and latents: scale
    equivariance asks that decode(downsample(z)) = downsample(x)."""
    return F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)


def scale_factors(latent_side: int) -> list[int]:
    """The downsampling factors scale equivariance alternates between (2 and 4, as the paper), those
    that divide the latent side."""
    factors = [f for f in (2, 4) if latent_side % f == 0 and latent_side // f >= 1]
    if not factors:
        raise ValueError(f"scale equivariance downsamples the latents 2x or 4x; latents of side {latent_side} allow neither: "
                         "train on crops whose latent side is even")
    return factors


# ---- the combined loss ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """Every knob of the autoencoder loss. A weight of 0 switches its term off entirely. Every weight
    is LDM's (see the module docstring): copy `kl_weight`, `lpips_weight` (perceptual_weight),
    `gan_weight` (disc_weight) and `gan_start` (disc_start) from an LDM config as they are."""

    # A field with a "help" in its metadata is a `vaekit train` flag (see TrainConfig).
    pixel: PixelLoss = field(default="l1", metadata={"help": "reconstruction loss"})
    pixel_weight: float = 1.0
    charbonnier_eps: float = 1e-3
    ssim_weight: float = field(default=0.0, metadata={"help": "weight of the 1 - SSIM loss"})
    kl_weight: float = field(default=1e-6, metadata={"help":
                             "LDM's kl_weight, as in published configs (SD's VAE: 1e-6): it multiplies the KL summed over "
                             "latent elements against the pixel loss summed over an image's C*R*R values (C = 3, 4 for "
                             "RGBA), at any crop size; ignored for --kind ae"})
    lpips_weight: float = field(default=0.0, metadata={"help":
                                "weight of the LPIPS loss: LDM's perceptual_weight (LDM: 1.0; needs the backbone weights); an RGBA "
                                "model's colours are scored composited on white"})
    lpips_net: Literal["vgg", "alex"] = field(default="vgg", metadata={"help": "LPIPS backbone"})
    lpips_pretrained: bool = True  # False: random backbone, for tests only
    gan_weight: float = field(default=0.0, metadata={"help":  # LDM's disc_weight (0.5 in its kl-f8 config)
                              "PatchGAN weight (LDM: 0.5), scaled by the adaptive weight"})
    gan_loss: GanLoss = field(default="hinge", metadata={"help": "discriminator loss"})
    gan_start: int = field(default=0, metadata={"help":  # LDM's disc_start
                           "first step with the GAN term and discriminator updates (LDM: 50001)"})
    adaptive_gan_weight: bool = True  # False: gan_weight is the fixed weight (LDM's scale, like the rest)
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: DiscNorm = field(default="batch", metadata={"help":
                                "discriminator normalisation: LDM's batch norm, or group/none, which do not depend on the "
                                "batch (with --grad-accum, only they make accumulation equal a larger batch)"})
    # Skorokhodov et al. 2025 ("Improving the Diffusability of Autoencoders"): decoding the latent
    # downsampled 2x or 4x must give the image downsampled alike; this weights that reconstruction loss.
    scale_equivariance: float = field(default=0.0, metadata={"metavar": "W", "help":
                                      "weight W of scale equivariance (Skorokhodov et al. 2025): decoding the latent downsampled "
                                      "2x or 4x must give the image downsampled alike (reconstruction loss x W). With --init it is "
                                      "the paper's short fine-tune that takes high frequencies out of the latents "
                                      "(docs/DIFFUSABILITY.md; the paper fine-tunes 10-20k steps)"})

    def __post_init__(self) -> None:
        for name in ("pixel_weight", "ssim_weight", "kl_weight", "lpips_weight", "gan_weight", "scale_equivariance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.pixel not in ("l1", "l2", "charbonnier"):
            raise ValueError(f"unknown reconstruction loss {self.pixel!r}; use 'l1', 'l2' or 'charbonnier'")
        if self.pixel_weight == self.ssim_weight == self.lpips_weight == 0:
            raise ValueError("no reconstruction term: set pixel_weight, ssim_weight or lpips_weight above 0")
        if self.lpips_net not in _LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS network {self.lpips_net!r}; use 'vgg' or 'alex'")
        if self.gan_loss not in ("hinge", "vanilla"):
            raise ValueError(f"unknown GAN loss {self.gan_loss!r}; use 'hinge' or 'vanilla'")
        if self.gan_start < 0 or self.disc_layers < 1 or self.disc_channels < 1:
            raise ValueError("gan_start must be >= 0, disc_layers and disc_channels >= 1")


class AutoencoderLoss(nn.Module):
    """The trainer's loss, LDM's divided by C*H*W: reconstruction (+ SSIM, LPIPS)
    + kl_weight * KL / (C*H*W) + GAN weight * g / (C*H*W), and the discriminator it trains against.

    Per step: `loss, logs = crit(x, recon, posterior, step, last_layer)` for the autoencoder, then,
    if `crit.gan_active(step)`, `d_loss, d_logs = crit.discriminator_loss(x, recon)` for the
    discriminator (it detaches `recon`). Terms with weight 0 are never computed, and their networks
    never built. Checkpoint `crit.discriminator`, not this module: its state dict also holds the
    frozen LPIPS network. Under DDP, replace `crit.discriminator` with its DDP wrapper; the
    autoencoder step runs the module inside it, so only `discriminator_loss` syncs its gradients.
    """

    def __init__(self, config: LossConfig | None = None, kind: Literal["vae", "ae"] = "vae", channels: int = 3):
        super().__init__()
        if kind not in ("vae", "ae"):
            raise ValueError(f"kind must be 'vae' or 'ae', got {kind!r}")
        self.config = config = config or LossConfig()
        self.use_kl = kind == "vae" and config.kl_weight > 0
        self.lpips = LPIPSLoss(config.lpips_net, config.lpips_pretrained) if config.lpips_weight > 0 else None
        self.discriminator = (  # it sees every channel the model makes: RGBA's alpha too
            PatchGANDiscriminator(channels, config.disc_channels, config.disc_layers, config.disc_norm)
            if config.gan_weight > 0
            else None
        )

    def gan_active(self, step: int) -> bool:
        """True from `gan_start` on (LDM's convention: no GAN term and no discriminator step before)."""
        return self.discriminator is not None and step >= self.config.gan_start

    def terms(self, x: Tensor, recon: Tensor, posterior: Posterior, step: int, se: ScalePair | None = None) -> dict[str, Tensor]:
        """The active terms, unweighted and still attached to the graph, keyed as they are logged.
        `se`: (decoded downsampled latent, downsampled image), see `downsample`."""
        c = self.config
        out: dict[str, Tensor] = {}
        if se is not None and c.scale_equivariance > 0:
            out["se"] = reconstruction_loss(se[0].float(), se[1], c.pixel, c.charbonnier_eps)
        if c.pixel_weight > 0:
            out[c.pixel] = reconstruction_loss(recon, x, c.pixel, c.charbonnier_eps)
        if c.ssim_weight > 0:
            out["ssim"] = ssim_loss(recon, x)
        if self.lpips is not None:
            out["lpips"] = self.lpips(recon, x)
        if self.use_kl:
            out["kl"] = kl_loss(posterior)
        if self.gan_active(step):
            with _frozen(_unwrap(self.discriminator)) as disc:  # its grads come from discriminator_loss only
                out["gan_g"] = generator_loss(disc(recon), c.gan_loss)
        return out

    def without_gan(
        self, x: Tensor, recon: Tensor, posterior: Posterior, step: int, se: ScalePair | None = None
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """The loss before its GAN term (weighted reconstruction terms + KL term), the unweighted
        generator loss (None before `gan_start`) and the logged parts (detached fp32 scalars). The
        trainer uses it when gradient accumulation decides the GAN weight once per optimizer step."""
        c = self.config
        terms = self.terms(x, recon, posterior, step, se)
        weights = {c.pixel: c.pixel_weight, "ssim": c.ssim_weight, "lpips": c.lpips_weight}
        nll = sum(weights[k] * v for k, v in terms.items() if k in weights)
        loss = nll + c.kl_weight / x[0].numel() * terms["kl"] if "kl" in terms else nll  # LDM's kl_weight
        if "se" in terms:  # outside nll: the adaptive GAN weight balances the reconstruction terms only, as LDM's
            loss = loss + c.scale_equivariance * terms["se"]
        logs = {k: v.detach() for k, v in terms.items()}
        logs["nll"], logs["loss"] = nll.detach(), loss.detach()
        return loss, terms.get("gan_g"), logs

    def forward(
        self, x: Tensor, recon: Tensor, posterior: Posterior, step: int, last_layer: Tensor | None = None,
        se: ScalePair | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder loss and its logged parts (detached fp32 scalars; `gan_weight` in LDM's scale,
        its d_weight). `last_layer` is the decoder's last weight (`model.decoder.conv_out.weight`),
        needed by the adaptive GAN weight."""
        c = self.config
        loss, gan_g, logs = self.without_gan(x, recon, posterior, step, se)
        if gan_g is None:
            return loss, logs
        pixels = x[0].numel()
        if not c.adaptive_gan_weight:
            weight = torch.full((), c.gan_weight, device=x.device)
        elif not torch.is_grad_enabled():  # validation: no gradients to compare
            weight = torch.zeros((), device=x.device)
        elif last_layer is None:
            raise ValueError("the adaptive GAN weight needs last_layer=model.decoder.conv_out.weight")
        else:  # the KL term has no path to the decoder, so this is the gradient of the reconstruction terms
            weight = c.gan_weight * adaptive_gan_weight(loss, gan_g, last_layer, scale=pixels)
        total = loss + weight / pixels * gan_g
        logs["gan_weight"], logs["loss"] = weight, total.detach()
        return total, logs

    def discriminator_loss(self, x: Tensor, recon: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on real images and detached reconstructions. Real and fake run as two
        batches, as in LDM: with batch norm, the fakes are then normalised the same way here as in
        the autoencoder's step."""
        if self.discriminator is None:
            raise ValueError("no discriminator: gan_weight is 0")
        _check_pair(x, recon)
        real, fake = self.discriminator(x.detach()), self.discriminator(recon.detach())
        loss = discriminator_loss(real, fake, self.config.gan_loss)
        logs = {"disc": loss.detach(), "logits_real": real.detach().float().mean(),
                "logits_fake": fake.detach().float().mean()}  # fmt: skip
        return loss, logs


# ---- helpers ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` without accumulating gradients into its parameters; inputs still get them."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper: the generator step must not run DDP's
    gradient sync for the discriminator."""
    return getattr(module, "module", module)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images and reconstructions differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"images must be NCHW, got shape {tuple(x.shape)}")
