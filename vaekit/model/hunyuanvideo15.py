"""Hunyuan Image 2.1's refiner VAE (HunyuanVideo-1.5's causal video VAE: 32 latent channels at 16x), for single
images. (Hunyuan Image 3.0's VAE, also 32 channels at 16x, is another network, GroupNorm and non-causal 3D convs:
vaekit.model.hunyuanimage3.)

diffusers has it twice, `AutoencoderKLHunyuanImageRefiner` and `AutoencoderKLHunyuanVideo15`: the same modules,
names and config; they differ only in how frames after the first are resampled in time (the refiner's class folds
no time at all) and in a causal attention mask, which on one frame is empty. On one frame both are this network.

A picture is a one-frame video. The causal 3D convolutions pad time by repeating the first frame (replicate
padding, in space too), so on one frame each is a 2D convolution, replicate-padded, with its kernel summed over
time. The weights keep their 5D video shapes and diffusers' names, so checkpoints load and save unchanged.
Resampling is Hunyuan Image's DC-AE style (`hunyuanimage.fold` / `unfold`: 2x2 pixels to channels and back, plus
the same fold of the input averaged or repeated to the new width); a downsampling that also halves time
(`temporal_downsample`) makes half the channels and repeats them on one frame, its upsampling twice the channels
and keeps the first half. Norms are RMS over channels at each position (`qwenimage.RMSNorm`, the same formula), so
the convolutional body tiles exactly; the middle blocks' attention runs on the whole latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from .hunyuanimage import fold, unfold
from .convchoice import conv2d
from .lean import Staged
from .qwenimage import OutStage, RMSNorm


class CausalConv3d(nn.Module):
    """diffusers' causal conv (a `conv` Conv3d inside, replicate padding); on one frame a 2D conv with the
    kernel summed over time (the padding repeats the frame for every temporal tap)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel)
        self.pad = kernel // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="replicate")
        return conv2d(x, self.conv.weight.sum(dim=2), self.conv.bias)


class Conv1x1(nn.Conv3d):
    """A 1x1x1 video conv (shortcuts, attention projections); on one frame a 1x1 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.weight[:, :, 0], self.bias)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.conv_shortcut = Conv1x1(cin, cout) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of the latent."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels)
        self.to_q, self.to_k, self.to_v = (Conv1x1(channels, channels) for _ in range(3))
        self.proj_out = Conv1x1(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t(y).reshape(n, c, h * w).transpose(1, 2).unsqueeze(1).contiguous() for t in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(y)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels), ResnetBlock(channels, channels)])
        self.attentions = nn.ModuleList([AttentionBlock(channels)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        factor = 8 if temporal else 4
        if cout % factor or (factor * cin) % cout:
            raise ValueError(f"a {'temporal ' if temporal else ''}downsampling from {cin} to {cout} channels needs "
                             f"{cout} divisible by {factor} and dividing {factor * cin}")  # fmt: skip
        self.conv = CausalConv3d(cin, cout // factor)
        self.temporal = temporal
        self.group = 4 * cin // cout  # the shortcut's mean, the same either way on one frame

    def forward(self, x: Tensor) -> Tensor:
        h = fold(self.conv(x))
        if self.temporal:  # the first frame: its half of the channels, twice
            h = torch.cat([h, h], dim=1)
        shortcut = fold(x)
        return h + shortcut.view(h.shape[0], h.shape[1], self.group, *h.shape[-2:]).mean(dim=2)


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        factor = 8 if temporal else 4
        self.conv = CausalConv3d(cin, cout * factor)
        self.temporal = temporal
        self.repeats = 4 * cout // cin

    def forward(self, x: Tensor) -> Tensor:
        h = unfold(self.conv(x))
        if self.temporal:  # the first frame: the first half of the channels; the shortcut repeats after unfolding
            return h[:, : h.shape[1] // 2] + unfold(x).repeat_interleave(self.repeats, dim=1)
        return h + unfold(x.repeat_interleave(self.repeats, dim=1))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, down: Downsample | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(layers)])
        self.downsamplers = nn.ModuleList([down]) if down is not None else None


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, up: Upsample | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(layers)])
        self.upsamplers = nn.ModuleList([up]) if up is not None else None


def resamplings(cfg: AutoencoderConfig) -> int:
    return cfg.downsample_levels if cfg.downsample_levels is not None else len(cfg.block_channels) - 1


def temporal(cfg: AutoencoderConfig) -> tuple[bool, ...]:
    """Which downsamplings (from the image side) also halve time: the last ones (diffusers' temporal_compression_ratio)."""
    return cfg.temporal_downsample or (False,) * resamplings(cfg)


def _stages(blocks: nn.ModuleList, resample: str) -> list[nn.Module]:
    return [m for b in blocks for m in (*b.resnets, *(getattr(b, resample) or []))]


class Encoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, levels, times = cfg.block_channels, resamplings(cfg), temporal(cfg)
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        blocks, width = [], ch[0]
        for i, out in enumerate(ch):
            down = Downsample(out, ch[i + 1], times[i]) if i < levels else None
            blocks.append(DownBlock(width, out, cfg.layers_per_block, down))
            width = ch[i + 1] if down is not None else out
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ch[-1])
        self.norm_out = RMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.moment_channels)
        self.group = ch[-1] // cfg.moment_channels

    def body_stages(self) -> list[nn.Module]:
        """The full-resolution layers in order (all local: they tile exactly)."""
        return [self.conv_in, *_stages(self.down_blocks, "downsamplers")]

    def head(self, h: Tensor) -> Tensor:
        """Latent resolution, with global attention. The moments get the features' group means."""
        h = self.mid_block(h)
        shortcut = h.view(h.shape[0], -1, self.group, *h.shape[-2:]).mean(dim=2)
        return self.conv_out(F.silu(self.norm_out(h))) + shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Decoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, levels = tuple(reversed(cfg.block_channels)), resamplings(cfg)
        times = tuple(reversed(temporal(cfg)))
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        self.repeats = ch[0] // cfg.latent_channels
        self.mid_block = MidBlock(ch[0])
        blocks, width = [], ch[0]
        for i, out in enumerate(ch):
            up = Upsample(out, ch[i + 1], times[i]) if i < levels else None
            blocks.append(UpBlock(width, out, cfg.layers_per_block + 1, up))
            width = ch[i + 1] if up is not None else out
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def head(self, z: Tensor) -> Tensor:
        return self.mid_block(self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1))

    def body_stages(self) -> list[nn.Module]:
        """The upsampling layers in order, one block at a time (all local: they tile exactly)."""
        return [*_stages(self.up_blocks, "upsamplers"), OutStage(self.norm_out, self.conv_out, clamp=False)]

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))
