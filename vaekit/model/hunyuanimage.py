"""Hunyuan Image 2.1's VAE: 64 latent channels at 32x (its other releases 16x), a DC-AE-style
autoencoder. Every resampling folds 2x2 pixels into channels (or unfolds them) around a 3x3 conv and
adds the same fold of its input, averaged or repeated to the new width; the encoder's output adds the
group means of its features, the decoder's input its latent repeated. Module names are diffusers'
(`AutoencoderKLHunyuanImage`); Tencent's own layout is one key table away (vaekit.layouts). The
folds order channels as (row offset, column offset, channel), as Tencent's `rearrange` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from .convchoice import Conv2d
from .lean import NormSiluConv, Staged
from .ldm import ResnetBlock, _norm


def fold(x: Tensor) -> Tensor:
    """b c (h 2) (w 2) -> b (2 2 c) h w: each 2x2 block into channels, offsets first."""
    n, c, h, w = x.shape
    return F.pixel_unshuffle(x, 2).view(n, c, 4, h // 2, w // 2).transpose(1, 2).reshape(n, 4 * c, h // 2, w // 2)


def unfold(x: Tensor) -> Tensor:
    """The inverse of `fold`."""
    n, c, h, w = x.shape
    return F.pixel_shuffle(x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w), 2)


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = Conv2d(cin, cout // 4, 3, padding=1)
        self.group = 4 * cin // cout

    def forward(self, x: Tensor) -> Tensor:
        h = fold(self.conv(x))
        shortcut = fold(x)
        return h + shortcut.view(h.shape[0], h.shape[1], self.group, *h.shape[-2:]).mean(dim=2)


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = Conv2d(cin, cout * 4, 3, padding=1)
        self.repeats = 4 * cout // cin

    def forward(self, x: Tensor) -> Tensor:
        return unfold(self.conv(x)) + unfold(x.repeat_interleave(self.repeats, dim=1))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels, 32)
        self.to_q, self.to_k, self.to_v = (Conv2d(channels, channels, 1) for _ in range(3))
        self.proj = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t(y).permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous() for t in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj(y)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, 32), ResnetBlock(channels, channels, 32)])
        self.attentions = nn.ModuleList([AttentionBlock(channels)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


def _downsamples(cfg: AutoencoderConfig) -> int:
    return cfg.downsample_levels if cfg.downsample_levels is not None else len(cfg.block_channels) - 1


class Encoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.block_channels
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, width in enumerate(ch):
            layers += [ResnetBlock(width, width, 32) for _ in range(cfg.layers_per_block)]
            if i < _downsamples(cfg):
                layers.append(Downsample(width, ch[i + 1]))
        self.down_blocks = nn.ModuleList(layers)
        self.mid_block = MidBlock(ch[-1])
        self.norm_out = _norm(ch[-1], 32)
        moments = cfg.moment_channels
        self.conv_out = Conv2d(ch[-1], moments, 3, padding=1)
        self.group = ch[-1] // moments

    def body_stages(self) -> list[nn.Module]:
        return [self.conv_in, *self.down_blocks]

    def head(self, h: Tensor) -> Tensor:
        """Latent resolution, with global attention. Both moments get the features' group means."""
        h = self.mid_block(h)
        shortcut = h.view(h.shape[0], -1, self.group, *h.shape[-2:]).mean(dim=2)
        return self.conv_out(F.silu(self.norm_out(h))) + shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Decoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_channels))
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.repeats = ch[0] // cfg.latent_channels
        self.mid_block = MidBlock(ch[0])
        layers: list[nn.Module] = []
        for i, width in enumerate(ch):
            layers += [ResnetBlock(width, width, 32) for _ in range(cfg.layers_per_block + 1)]
            if i < _downsamples(cfg):
                layers.append(Upsample(width, ch[i + 1]))
        self.up_blocks = nn.ModuleList(layers)
        self.norm_out = _norm(ch[-1], 32)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def head(self, z: Tensor) -> Tensor:
        return self.mid_block(self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1))

    def body_stages(self) -> list[nn.Module]:
        # Built on the fly (not registered): the names stay decoder.norm_out / decoder.conv_out.
        return [*self.up_blocks, NormSiluConv(self.norm_out, self.conv_out)]

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))
