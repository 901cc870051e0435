"""Wan 2.2's VAE (diffusers' AutoencoderKLWan with is_residual=True; Wan 2.2 TI2V-5B), for single images.

What differs from Wan 2.1's network (`vaekit.model.qwenimage`, whose blocks this reuses: the causal
convolutions, RMS norms, residual and attention blocks, resamplings): the image enters as 2x2 patches
(12 channels) and leaves the same way; each encoder level is one block whose output adds a parameter-free
shortcut, the level's input averaged over 2x2 pixels (and channel groups) to the output's shape; each
decoder level adds the opposite, its input's channels repeated into 2x2 pixels; the decoder has its own,
wider channels (`decoder_block_channels`), and its upsampling keeps the channel count.

On one frame, as in `qwenimage`: the causal convolutions are 2D convolutions with their last temporal
slice of weights, and the time convolutions never run. Where a shortcut also halves time, the causal
padding puts a zero frame before the image, which the average counts (so it is half the 2D one) and the
repetition's first frame is dropped (diffusers' `first_chunk`); both are written out below.
Every level is local (RMS norms, convolutions, 2x2 shortcuts), so the body tiles exactly.

Qwen-Image 2.1's VAE (diffusers' AutoencoderKLQwenImage21: RGBA, 5 levels, 64 latent channels at 16x, no patches)
is this network; its class stores every causal convolution as the 2D one it is on one frame (`QwenImage21CausalConv3d`
is an nn.Conv2d, the time convolutions 1x1), which `AutoencoderConfig.image_convs` builds (`qwenimage.causal_conv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from .lean import Staged
from .qwenimage import MidBlock, Resample, ResidualBlock, OutStage, RMSNorm, _temporal, causal_conv, quant_convs

__all__ = ["Encoder", "Decoder", "quant_convs"]


def patchify(x: Tensor, p: int) -> Tensor:
    """(N, C, H, W) -> (N, C*p*p, H/p, W/p), channel c*p*p + dx*p + dy (diffusers' `patchify`: x offset first)."""
    if p == 1:
        return x
    n, c, h, w = x.shape
    return x.view(n, c, h // p, p, w // p, p).permute(0, 1, 5, 3, 2, 4).reshape(n, c * p * p, h // p, w // p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """`patchify` inverted."""
    if p == 1:
        return x
    n, c, h, w = x.shape
    return x.view(n, c // (p * p), p, p, h, w).permute(0, 1, 4, 3, 5, 2).reshape(n, c // (p * p), h * p, w * p)


class AvgDown(nn.Module):
    """The encoder level's shortcut (diffusers' AvgDown3D) on one frame: fs x fs pixels (and, with time
    halved, a zero frame before them) into channels, then the mean of each group of them per output channel."""

    def __init__(self, cin: int, cout: int, factor_t: int, factor_s: int):
        super().__init__()
        if cin * factor_t * factor_s**2 % cout:
            raise ValueError(f"the shortcut from {cin} to {cout} channels needs {cout} to divide {cin * factor_t * factor_s**2}")
        self.cout, self.factor_t, self.factor_s = cout, factor_t, factor_s

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        s = self.factor_s
        x = x.view(n, c, h // s, s, w // s, s).permute(0, 1, 3, 5, 2, 4)  # (n, c, dy, dx, h', w')
        if self.factor_t == 2:  # the causal zero frame comes first in each channel's group
            x = torch.stack([torch.zeros_like(x), x], dim=2)
        return x.reshape(n, self.cout, -1, h // s, w // s).mean(dim=2)


class DupUp(nn.Module):
    """The decoder level's shortcut (diffusers' DupUp3D) on one frame: each channel repeated, the copies laid
    out as 2x2 pixels (with time doubled, the second frame's: the first is dropped on the first chunk)."""

    def __init__(self, cin: int, cout: int, factor_t: int, factor_s: int):
        super().__init__()
        self.cout, self.factor_t, self.factor_s = cout, factor_t, factor_s
        self.repeats = cout * factor_t * factor_s**2 // cin

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        s = self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1).view(n, self.cout, self.factor_t, s, s, h, w)[:, :, -1]
        return x.permute(0, 1, 4, 2, 5, 3).reshape(n, self.cout, h * s, w * s)


class DownBlock(nn.Module):
    """One encoder level: residual blocks and a 2x downsampling (all but the last level), plus the average shortcut."""

    def __init__(self, cin: int, cout: int, layers: int, temporal: bool, down: bool, image: bool = False):
        super().__init__()
        self.avg_shortcut = AvgDown(cin, cout, 2 if temporal else 1, 2 if down else 1)
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout, image) for i in range(layers)])
        self.downsampler = Resample(cout, up=False, temporal=temporal, image=image) if down else None

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for resnet in self.resnets:
            h = resnet(h)
        if self.downsampler is not None:
            h = self.downsampler(h)
        return h + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """One decoder level: residual blocks and a 2x upsampling that keeps the channels (all but the last level),
    plus the repeating shortcut."""

    def __init__(self, cin: int, cout: int, layers: int, temporal: bool, up: bool, image: bool = False):
        super().__init__()
        self.avg_shortcut = DupUp(cin, cout, 2 if temporal else 1, 2) if up else None
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout, image) for i in range(layers + 1)])
        self.upsampler = Resample(cout, up=True, temporal=temporal, out=cout, image=image) if up else None

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for resnet in self.resnets:
            h = resnet(h)
        if self.upsampler is not None:
            h = self.upsampler(h)
        return h + self.avg_shortcut(x) if self.avg_shortcut is not None else h


class _Patches(nn.Module):
    """The encoder's first stage, built on the fly (no weights): the image as 2x2 patches."""

    def __init__(self, p: int):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return patchify(x, self.p)


class _OutPatches(OutStage):
    """The decoder's last stage: qwenimage's (norm, SiLU, conv, clamp to [-1, 1]), then the patches back to pixels."""

    def __init__(self, norm: nn.Module, conv: nn.Module, p: int):
        super().__init__(norm, conv)
        self.p = p

    def forward(self, h: Tensor) -> Tensor:
        return unpatchify(super().forward(h), self.p)


class Encoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        dims = (cfg.block_channels[0], *cfg.block_channels)
        levels = len(cfg.block_channels)
        temporal, image = _temporal(cfg), cfg.image_convs
        self.conv_in = causal_conv(cfg.in_channels * cfg.patch_size**2, dims[0], 3, padding=1, image=image)
        self.down_blocks = nn.ModuleList(
            [DownBlock(cin, cout, cfg.layers_per_block, i < levels - 1 and temporal[i], i < levels - 1, image)
             for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))]
        )  # fmt: skip
        self.mid_block = MidBlock(dims[-1], image)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = causal_conv(dims[-1], cfg.moment_channels, 3, padding=1, image=image)

    def body_stages(self) -> list[nn.Module]:
        """The full-resolution layers in order, a level at a time (its shortcut needs its input): all local."""
        return [_Patches(self.patch_size), self.conv_in, *self.down_blocks]

    def head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.mid_block(h))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Decoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.decoder_channels
        dims = (ch[-1], *reversed(ch))
        levels = len(ch)
        temporal = tuple(reversed(_temporal(cfg)))
        self.patch_size, image = cfg.patch_size, cfg.image_convs
        self.conv_in = causal_conv(cfg.latent_channels, dims[0], 3, padding=1, image=image)
        self.mid_block = MidBlock(dims[0], image)
        self.up_blocks = nn.ModuleList(
            [UpBlock(cin, cout, cfg.layers_per_block, i < levels - 1 and temporal[i], i < levels - 1, image)
             for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))]
        )  # fmt: skip
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = causal_conv(dims[-1], cfg.out_channels * cfg.patch_size**2, 3, padding=1, image=image)

    def head(self, z: Tensor) -> Tensor:
        return self.mid_block(self.conv_in(z))

    def body_stages(self) -> list[nn.Module]:
        """The upsampling levels in order (each with its shortcut), then the output layers: all local."""
        return [*self.up_blocks, _OutPatches(self.norm_out, self.conv_out, self.patch_size)]

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))
