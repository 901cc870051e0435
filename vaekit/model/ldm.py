"""The LDM/SD encoder and decoder (SD1, SDXL, PixArt, SD3, FLUX.1, FLUX.2, Lumina 2), written once.

Module names follow the original LDM checkpoints (`encoder.down.0.block.1.norm1`, `mid.attn_1`,
...), so single-file checkpoints load as they are and the diffusers layout is one key mapping
away (see `vaekit.checkpoints`). `body` (full resolution, convolutions only) and `head` (latent
resolution, global attention) are split so `vaekit.model.tiling` can tile the body. Without autograd
the blocks hand their work to `vaekit.model.lean`: the same values in less memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from . import lean
from .lean import Conv2d, GroupNorm, NormSiluConv, Staged


def _norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, *, overwrite: bool = False) -> Tensor:
        """`overwrite`: x is the caller's own temporary, which inference may write the result into."""
        if not torch.is_grad_enabled():
            return lean.resnet_block(self, x, overwrite=overwrite)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; used only at latent resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, *, overwrite: bool = False) -> Tensor:
        """`overwrite`: x is the caller's own temporary, which inference may write the result into."""
        if not torch.is_grad_enabled():
            return lean.attention(self, x, overwrite=overwrite)
        n, c, h, w = x.shape
        # Tokens-major (n, 1, tokens, channels) straight out of the projections, contiguous: with a transposed
        # view SDPA falls back to its math kernel, which holds the whole tokens x tokens matrix (16 GiB for the
        # latent of a 2048x2048 image). A 1x1 conv is a matmul over channels: no copies to change the layout.
        y = self.norm(x).flatten(2).transpose(1, 2).unsqueeze(1)
        q, k, v = (F.linear(y, p.weight.flatten(1), p.bias) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = F.linear(y, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + y.view(n, h * w, c).transpose(1, 2).view(n, c, h, w)

def space_to_channel(x: Tensor, channels: int) -> Tensor:
    """Half the resolution without parameters: each 2x2 block of pixels into channels, then the
    means of consecutive channel groups down to `channels` (DC-AE's downsampling shortcut)."""
    return F.pixel_unshuffle(x, 2).unflatten(1, (channels, -1)).mean(dim=2)


def channel_to_space(x: Tensor, channels: int) -> Tensor:
    """Twice the resolution without parameters: each channel repeated, then spread over 2x2 pixels
    (DC-AE's upsampling shortcut). `space_to_channel` undoes it exactly."""
    return F.pixel_shuffle(x.repeat_interleave(4 * channels // x.shape[1], dim=1), 2)


class Downsample(nn.Module):
    """LDM's stride-2 conv; with `shortcut`, it also changes channels and adds `space_to_channel`."""

    def __init__(self, channels: int, out: int | None = None, shortcut: bool = False):
        super().__init__()
        self.out, self.shortcut = out or channels, shortcut
        self.conv = Conv2d(channels, self.out, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads right/bottom only; checkpoints depend on this exact alignment.
        y = self.conv(F.pad(x, (0, 1, 0, 1)))
        return y + space_to_channel(x, self.out) if self.shortcut else y


class Upsample(nn.Module):
    """LDM's nearest-neighbour 2x then conv; with `shortcut`, DC-AE's: a conv at the low resolution to
    4x the output channels, put into 2x2 pixels (cheaper), plus `channel_to_space`."""

    def __init__(self, channels: int, out: int | None = None, shortcut: bool = False):
        super().__init__()
        self.out, self.shortcut = out or channels, shortcut
        self.conv = Conv2d(channels, self.out * (4 if shortcut else 1), 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut:
            return F.pixel_shuffle(self.conv(x), 2) + channel_to_space(x, self.out)
        if not torch.is_grad_enabled():  # inference: never the whole 2x image, a band of it at a time
            return lean.upsample_conv_banded(x, self.conv)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor, *, overwrite: bool = False) -> Tensor:
        """`overwrite`: x is the caller's temporary, and inference may write into it. Either way every later
        step writes over the running tensor (block_1's result is this block's own), so the mid block holds
        one activation besides its input (none with `overwrite`), plus attention's keys and values."""
        h = self.block_1(x, overwrite=overwrite)
        if isinstance(self.attn_1, AttnBlock):
            h = self.attn_1(h, overwrite=True)
        return self.block_2(h, overwrite=True)


class Level(nn.Module):
    """The ResNet blocks of one resolution, then the resampling to the next (if any)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self._resample_name = name  # "downsample" or "upsample", as in the checkpoints
        if resample is not None:
            self.add_module(name, resample)

    @property
    def resample(self) -> nn.Module | None:
        return self._modules.get(self._resample_name)


class Encoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.patch_size, self.shortcuts, self.latent_channels = cfg.patch_size, cfg.shortcuts, cfg.latent_channels
        self.conv_in = Conv2d(cfg.in_channels * cfg.patch_size**2, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.layers_per_block)]
            last = i == len(ch) - 1
            # With shortcuts the resampling itself moves to the next level's channel count.
            nxt = ch[i + 1] if cfg.shortcuts and not last else cout
            self.down.append(Level(blocks, None if last else Downsample(cout, nxt, cfg.shortcuts), "downsample"))
            cin = nxt
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        self.norm_out = _norm(ch[-1], g)
        moments = 2 * cfg.latent_channels if cfg.kind == "vae" else cfg.latent_channels
        self.conv_out = Conv2d(ch[-1], moments, 3, padding=1)

    def body_stages(self) -> list[nn.Module]:
        """The full-resolution layers in order; `vaekit.model.tiling` runs them one at a time."""
        # Not registered as a submodule: the checkpoint key stays `encoder.conv_in`.
        stem = nn.Sequential(nn.PixelUnshuffle(self.patch_size), self.conv_in) if self.patch_size > 1 else self.conv_in
        stages: list[nn.Module] = [stem]
        for level in self.down:
            stages += list(level.block)
            if level.resample is not None:
                stages.append(level.resample)
        return stages

    def head(self, h: Tensor) -> Tensor:
        """Latent-resolution part, with global attention: always runs on the whole image."""
        h = self.mid(h)
        moments = self.conv_out(F.silu(self.norm_out(h)))
        if not self.shortcuts:
            return moments
        # The latent (the mean of a VAE's posterior, not its log-variance) gets the channel-group
        # means of the features: the bottleneck's shortcut.
        c = self.latent_channels
        return torch.cat([moments[:, :c] + h.unflatten(1, (c, -1)).mean(dim=2), moments[:, c:]], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Decoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.patch_size, self.shortcuts, self.patch_out = cfg.patch_size, cfg.shortcuts, cfg.patch_out
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        # Indexed like LDM: up[i] works at the resolution of encoder level i; runs from the top.
        levels: list[Level] = []
        cin = ch[-1]
        for i in reversed(range(len(ch))):
            cout = ch[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.layers_per_block + 1)]
            nxt = ch[i - 1] if cfg.shortcuts and i > 0 else cout
            levels.insert(0, Level(blocks, Upsample(cout, nxt, cfg.shortcuts) if i > 0 else None, "upsample"))
            cin = nxt
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch[0], g)
        per_position = cfg.patch_size**2 if cfg.patch_out == "shuffle" else 1
        self.conv_out = Conv2d(ch[0], cfg.out_channels * per_position, 3, padding=1)

    def head(self, z: Tensor) -> Tensor:
        """Latent-resolution part, with global attention: always runs on the whole latent."""
        h = self.conv_in(z)
        if self.shortcuts:  # the bottleneck's shortcut: each latent channel repeated
            h = h + z.repeat_interleave(h.shape[1] // z.shape[1], dim=1)
        return self.mid(h, overwrite=True)  # h is the head's own

    def body_stages(self) -> list[nn.Module]:
        """The upsampling layers in order; `vaekit.model.tiling` runs them one at a time."""
        stages: list[nn.Module] = []
        for level in reversed(self.up):
            stages += list(level.block)
            if level.resample is not None:
                stages.append(level.resample)
        # Not registered as a submodule: checkpoint keys stay `decoder.norm_out` / `decoder.conv_out`.
        if self.patch_size == 1:
            stages.append(NormSiluConv(self.norm_out, self.conv_out))
        elif self.patch_out == "nearest":
            stages.append(nn.Sequential(self.norm_out, nn.SiLU(), nn.Upsample(scale_factor=self.patch_size), self.conv_out))
        else:
            stages.append(nn.Sequential(NormSiluConv(self.norm_out, self.conv_out), nn.PixelShuffle(self.patch_size)))
        return stages

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))
