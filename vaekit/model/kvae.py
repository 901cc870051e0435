"""Kandinsky Lab's KVAE 2D (KVAE-2D-1.0: 8x, 16 latent channels), diffusers' AutoencoderKLKVAE, whose module
names (the authors' `KVAE2D` in kandinskylab/kvae, kvae/models/kvae_2d.py) are the model's here.

An LDM-like encoder/decoder without attention or quant convs, with three differences:
- resampling ("PXS"): down = reflect-padded stride-2 3x3 conv plus the 2x2 pixel mean, then a 1x1 conv; up =
  nearest 2x then a reflect-padded 3x3 conv, plus each channel repeated into its 2x2 pixels, then a 1x1 conv;
- the ResNet blocks' 3x3 convs (and the decoder's first and last) pad by replicating the edges;
- every decoder norm is a spatial norm: GroupNorm scaled and shifted by 1x1 convs of the latent (nearest-resized).

Not tiled (`NOT_TILED`): the decoder's every norm reads the latent, so its stages are not functions of their
input features alone, as `vaekit.model.tiling` needs; the encoder is not ported to tiling either."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig

NOT_TILED = ("KVAE's decoder conditions every normalisation on the latent and its encoder is not ported to vaekit's "
             "tiling; run it untiled")  # fmt: skip


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class SpatialNorm(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq the latent resized (nearest) to f's side."""

    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = _group_norm(channels)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, f: Tensor, zq: Tensor) -> Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock(nn.Module):
    """norm, SiLU, conv, norm, SiLU, conv (replicate padding) plus the input (a 1x1 conv when widths change).
    With `zq_channels` the norms are spatial norms of the latent (the decoder's)."""

    def __init__(self, cin: int, cout: int, zq_channels: int | None = None):
        super().__init__()
        self.spatial = zq_channels is not None
        self.norm1 = SpatialNorm(cin, zq_channels) if self.spatial else _group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="replicate")
        self.norm2 = SpatialNorm(cout, zq_channels) if self.spatial else _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, padding_mode="replicate")
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def _norm(self, norm: nn.Module, h: Tensor, zq: Tensor | None) -> Tensor:
        return norm(h, zq) if self.spatial else norm(h)

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, zq)))
        h = self.conv2(F.silu(self._norm(self.norm2, h, zq)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.spatial_conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, padding_mode="reflect")
        self.linear = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        means = F.pixel_unshuffle(x, 2).view(n, c, 4, h // 2, w // 2).mean(dim=2)
        return self.linear(self.spatial_conv(x) + means)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.spatial_conv = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.linear = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        repeated = F.pixel_shuffle(x.repeat_interleave(4, dim=1), 2)
        return self.linear(self.spatial_conv(F.interpolate(x, scale_factor=2.0, mode="nearest")) + repeated)


def _level(blocks: list[nn.Module], resample: nn.Module | None) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        level.downsample = resample  # renamed by the decoder
    return level


class Encoder(nn.Module):
    NOT_TILED = NOT_TILED

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.block_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        width = ch[0]
        for i, out in enumerate(ch):
            blocks = []
            for _ in range(cfg.layers_per_block):
                blocks.append(ResnetBlock(width, out))
                width = out
            self.down.append(_level(blocks, Downsample(width) if i < len(ch) - 1 else None))
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width)
        self.mid.block_2 = ResnetBlock(width, width)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, cfg.moment_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    NOT_TILED = NOT_TILED

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, zq = cfg.block_channels, cfg.latent_channels
        width = ch[-1]
        self.conv_in = nn.Conv2d(zq, width, 3, padding=1, padding_mode="replicate")
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width, zq)
        self.mid.block_2 = ResnetBlock(width, width, zq)
        levels: list[nn.Module] = []
        for i in reversed(range(len(ch))):  # up[i] is level i, run from the last level to the first
            blocks = []
            for _ in range(cfg.layers_per_block + 1):
                blocks.append(ResnetBlock(width, ch[i], zq))
                width = ch[i]
            level = _level(blocks, None)
            if i:
                level.upsample = Upsample(width)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = SpatialNorm(width, zq)
        self.conv_out = nn.Conv2d(width, cfg.out_channels, 3, padding=1, padding_mode="replicate")

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.block_1(h, z), z)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, z)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h, z)))


def quant_convs(cfg: AutoencoderConfig) -> tuple[None, None]:
    return None, None  # KVAE has none (and the config says so)
