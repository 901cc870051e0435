"""Hunyuan Image 3.0's VAE (Tencent's `hunyuan_image_3/autoencoder_kl_3d.py`, `AutoencoderKLConv3D`: 32 latent
channels at 16x), on one image. No diffusers class has it; module names are Tencent's (LDM's nesting, `decoder.up.0`
on the latent side as in Hunyuan Image 2.1's files), so its checkpoints load and save without renaming.

It is a video VAE that takes an image as a clip. Tencent's `encode` repeats the image to `frames` frames (4 in the
release: 2 ** the number of downsamplings that also halve time), its 3x3x3 convolutions pad time with zeros, and
its GroupNorms take statistics over all frames. The frames do not stay copies: conv_in gives the first frame taps
1-2 of its kernel, the last taps 0-1 and the others all three; the next conv mixes each frame with unequal
neighbours, so after one ResNet block no two frames are equal. The exact one-image computation therefore carries
the frames, (N, C, T, H, W), until the temporal downsamplings (DC-AE-style folds of frame pairs into channels) leave
one frame; from there tensors are (N, C, H, W). On one zero-padded frame a 3x3x3 conv is a 2D conv with the middle
time slice of its kernel, so everything at one frame runs as 2D convolutions, a third of the multiply-adds of the
3D convs Tencent runs there. The work done differently from Tencent's, with the same values up to float order:

- conv_in reads the image once: one 2D conv per time tap, each frame the sum of the taps inside the clip;
- at one frame (the encoder's last level and mid block, the decoder's mid block and first level) 2D convs;
- the decoder makes frames and Tencent keeps the last: conv_out computes that frame only (its two taps on the
  last two frames; the third reads the padding).

That saves little (at 1024x1024 encode 57.6 against 58.9 TFLOP, decode 101.7 against 104.6): most of the work is
the 4 full-resolution frames, which the exact result needs.

Resampling is Hunyuan Image 2.1's fold (`hunyuanimage.fold` / `unfold`, Tencent's `rearrange` order), per frame,
with frame pairs folded into channels ahead of the pixel offsets when it also halves time. Norms are GroupNorm over
channels, frames and pixels (`lean.GroupNorm`): tiling gives them whole-image statistics, so the body tiles exactly
in space; the mid blocks' attention (LDM's, on one frame) runs on the whole latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from .hunyuanimage import fold, unfold
from .ldm import AttnBlock as _LDMAttention
from .ldm import Level, _norm, _stages
from .convchoice import conv2d
from .lean import Staged
from .qwenimage import OutStage


class Conv(nn.Conv3d):
    """Tencent's Conv3d: kernel 1 or 3, zero padding of half the kernel in time and space. On frames
    (N, C, T, H, W) the 3D conv; on one frame (N, C, H, W) the 2D conv with the kernel's middle time slice."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__(cin, cout, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            middle = self.kernel_size[0] // 2
            return conv2d(x, self.weight[:, :, middle], self.bias, padding=self.padding[1])
        return super().forward(x)


class ClipConv(Conv):
    """The encoder's conv_in, on Tencent's clip of `frames` copies of the image, computed from the image itself:
    one 2D conv per time tap, and frame t the sum of the taps that land inside the clip (the first and last
    frames lose one to the zero padding; the frames between are equal)."""

    def __init__(self, cin: int, cout: int, frames: int):
        super().__init__(cin, cout)
        self.frames = frames

    def forward(self, x: Tensor) -> Tensor:
        if self.frames == 1:
            return super().forward(x)
        n, _, h, w = x.shape
        taps = self.weight.permute(2, 0, 1, 3, 4).reshape(-1, self.in_channels, 3, 3)  # rows: (time tap, output)
        y = conv2d(x, taps, None, padding=1).view(n, 3, self.out_channels, h, w)
        first, middle, last = y[:, 1] + y[:, 2], y.sum(dim=1), y[:, 0] + y[:, 1]
        clip = torch.stack([first, *[middle] * (self.frames - 2), last], dim=2)
        return clip + self.bias.view(-1, 1, 1, 1)


class LastFrameConv(Conv):
    """The decoder's conv_out: Tencent decodes frames and keeps the last, so only that frame is computed."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            return super().forward(x)
        return F.conv3d(x[:, :, -2:], self.weight[:, :, :2], self.bias, padding=(0, 1, 1))[:, :, 0]


def fold_frames(x: Tensor, time: bool) -> Tensor:
    """Tencent's `b c (f r1) (h 2) (w 2) -> b (r1 2 2 c) f h w`, r1 = 2 when it halves time (frame pairs into
    channels, ahead of the pixel offsets), else 1; one frame left is (N, C, H, W)."""
    if x.ndim == 4:
        return fold(x)
    n, c, t, h, w = x.shape
    r = 2 if time else 1
    y = fold(x.transpose(1, 2).reshape(n * t, c, h, w))  # frames into the batch: (n f r1) (2 2 c) h w
    y = y.view(n, t // r, r * 4 * c, h // 2, w // 2).transpose(1, 2)
    return y[:, :, 0] if t == r else y


def unfold_frames(x: Tensor, time: bool) -> Tensor:
    """The inverse, Tencent's `b (r1 2 2 c) f h w -> b c (f r1) (h 2) (w 2)`; on one frame without time, `unfold`."""
    if x.ndim == 4 and not time:
        return unfold(x)
    x = x if x.ndim == 5 else x[:, :, None]
    n, c, f, h, w = x.shape
    r = 2 if time else 1
    y = unfold(x.transpose(1, 2).reshape(n * f * r, c // r, h, w))  # (n f r1) c (h 2) (w 2)
    return y.view(n, f * r, c // (4 * r), 2 * h, 2 * w).transpose(1, 2)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, twice, plus the input (through a 1x1 conv where the width changes); on frames or one."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = Conv(cin, cout)
        self.norm2 = _norm(cout, groups)
        self.conv2 = Conv(cout, cout)
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        inference = not torch.is_grad_enabled()  # no autograd: SiLU and the sum in place (frames are large)
        h = self.conv1(F.silu(self.norm1(x), inplace=inference))
        h = self.conv2(F.silu(self.norm2(h), inplace=inference))
        return h.add_(self.nin_shortcut(x)) if inference else h + self.nin_shortcut(x)


class AttnBlock(_LDMAttention):
    """LDM's single-head attention (Tencent's over (frame, row, column) tokens: on one frame the same), with
    Tencent's 1x1x1 3D-conv projections, which it reads only as `weight.flatten(1)` and `bias`."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, groups)
        self.q, self.k, self.v, self.proj_out = (Conv(channels, channels, 1) for _ in range(4))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    """Tencent's DownsampleDCAE: a conv to 1/4 of the new width (1/8 when it also halves time), folded; plus the
    input folded the same way and averaged in groups to the new width."""

    def __init__(self, cin: int, cout: int, time: bool):
        super().__init__()
        factor = 8 if time else 4
        if cout % factor or (factor * cin) % cout:
            raise ValueError(f"a {'temporal ' if time else ''}downsampling from {cin} to {cout} channels needs {cout} "
                             f"divisible by {factor} and dividing {factor * cin}")  # fmt: skip
        self.conv = Conv(cin, cout // factor)
        self.time = time
        self.group = factor * cin // cout

    def forward(self, x: Tensor) -> Tensor:
        h = fold_frames(self.conv(x), self.time)
        shortcut = fold_frames(x, self.time)
        return h + shortcut.view(h.shape[0], h.shape[1], self.group, *h.shape[2:]).mean(dim=2)


class Upsample(nn.Module):
    """Tencent's UpsampleDCAE: a conv to 4x the new width (8x when it also doubles time), unfolded; plus the input
    repeated to that many channels and unfolded the same way."""

    def __init__(self, cin: int, cout: int, time: bool):
        super().__init__()
        factor = 8 if time else 4
        if (factor * cout) % cin:
            raise ValueError(f"a {'temporal ' if time else ''}upsampling from {cin} to {cout} channels needs {cin} "
                             f"to divide {factor * cout}")  # fmt: skip
        self.conv = Conv(cin, cout * factor)
        self.time = time
        self.repeats = factor * cout // cin

    def forward(self, x: Tensor) -> Tensor:
        shortcut = unfold_frames(x.repeat_interleave(self.repeats, dim=1), self.time)
        return unfold_frames(self.conv(x), self.time) + shortcut


def temporal(cfg: AutoencoderConfig) -> tuple[bool, ...]:
    """Which downsamplings (from the image side) also halve time (the release: the last two)."""
    levels = cfg.downsample_levels if cfg.downsample_levels is not None else len(cfg.block_channels) - 1
    return cfg.temporal_downsample or (False,) * levels


def frames(cfg: AutoencoderConfig) -> int:
    """The frames Tencent's encode makes of an image (its `ffactor_temporal`), folded to one latent frame."""
    return 2 ** sum(temporal(cfg))


class Encoder(Staged):
    """conv_in on the clip; per level ResNet blocks, then (the first `downsample_levels`) a downsampling; the mid
    block; GroupNorm, SiLU, conv_out, plus the features' group means (Tencent's shortcut to the moments)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g, times = cfg.block_channels, cfg.norm_groups, temporal(cfg)
        self.conv_in = ClipConv(cfg.in_channels, ch[0], frames(cfg))
        levels, width = [], ch[0]
        for i, out in enumerate(ch):
            blocks = [ResnetBlock(width if j == 0 else out, out, g) for j in range(cfg.layers_per_block)]
            down = Downsample(out, ch[i + 1], times[i]) if i < len(times) else None
            levels.append(Level(blocks, down, "downsample"))
            width = ch[i + 1] if down is not None else out
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(ch[-1], g)
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = Conv(ch[-1], cfg.moment_channels)
        self.group = ch[-1] // cfg.moment_channels

    def body_stages(self) -> list[nn.Module]:
        """The full-resolution layers in order (local in space: they tile exactly)."""
        return [self.conv_in, *_stages(self.down)]

    def head(self, h: Tensor) -> Tensor:
        """Latent resolution, one frame, with global attention."""
        h = self.mid(h)
        shortcut = h.view(h.shape[0], -1, self.group, *h.shape[-2:]).mean(dim=2)
        return self.conv_out(F.silu(self.norm_out(h))) + shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Decoder(Staged):
    """conv_in plus the latent repeated to its width; the mid block; per level from the latent side ResNet blocks,
    then an upsampling (the first ones also double time); GroupNorm, SiLU and conv_out on the last frame."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g, times = tuple(reversed(cfg.block_channels)), cfg.norm_groups, tuple(reversed(temporal(cfg)))
        self.conv_in = Conv(cfg.latent_channels, ch[0])
        self.repeats = ch[0] // cfg.latent_channels
        self.mid = MidBlock(ch[0], g)
        levels, width = [], ch[0]
        for i, out in enumerate(ch):
            blocks = [ResnetBlock(width if j == 0 else out, out, g) for j in range(cfg.layers_per_block + 1)]
            up = Upsample(out, ch[i + 1], times[i]) if i < len(times) else None
            levels.append(Level(blocks, up, "upsample"))
            width = ch[i + 1] if up is not None else out
        self.up = nn.ModuleList(levels)  # up[0] on the latent side, as Tencent counts
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = LastFrameConv(ch[-1], cfg.out_channels)

    def head(self, z: Tensor) -> Tensor:
        return self.mid(self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1))

    def body_stages(self) -> list[nn.Module]:
        """The upsampling layers in order (local in space: they tile exactly)."""
        return [*_stages(self.up), OutStage(self.norm_out, self.conv_out, clamp=False)]

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))
