"""The LDM/SD encoder and decoder (SD1, SDXL, PixArt, SD3, FLUX.1, FLUX.2, Lumina 2), written once.

Module names follow the original LDM checkpoints (`encoder.down.0.block.1.norm1`, `mid.attn_1`,
...), so single-file checkpoints load as they are and the diffusers layout is one key mapping
away (see `vaekit.layouts.ldm`). `body` (full resolution, convolutions only) and `head` (latent
resolution, global attention) are split so `vaekit.model.tiling` can tile the body. Without autograd
the blocks hand their work to `vaekit.model.lean`: the same values in less memory. The quickstart's
fast-training options are a variant of these classes in `vaekit.model.fast`, so this file stays the
published architecture.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from . import lean
from .convchoice import Conv2d
from .lean import GroupNorm, NormSiluConv, Staged


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


class Downsample(nn.Module):
    """A stride-2 3x3 conv, to `out` channels (LDM: as many as it gets)."""

    def __init__(self, channels: int, out: int | None = None):
        super().__init__()
        self.conv = Conv2d(channels, out or channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads right/bottom only; checkpoints depend on this exact alignment.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv to `out` channels (LDM: as many as it gets)."""

    def __init__(self, channels: int, out: int | None = None):
        super().__init__()
        self.conv = Conv2d(channels, out or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
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


def _stages(levels: Iterable[Level]) -> list[nn.Module]:
    """Each level's blocks, then its resampling: the body's stages."""
    stages: list[nn.Module] = []
    for level in levels:
        stages += list(level.block)
        if level.resample is not None:
            stages.append(level.resample)
    return stages


class Encoder(Staged):
    """conv_in; at each level ResNet blocks, then (but at the last) a downsampling; the mid block (ResNet,
    attention, ResNet); GroupNorm, SiLU and conv_out to the posterior's moments (or an AE's latent)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.conv_in = Conv2d(self.image_channels(cfg), ch[0], 3, padding=1)
        self.down = nn.ModuleList(self.levels(cfg))
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        self.norm_out = _norm(ch[-1], g)
        moments = cfg.moment_channels
        self.conv_out = Conv2d(ch[-1], moments, 3, padding=1)

    def image_channels(self, cfg: AutoencoderConfig) -> int:
        """The channels conv_in reads (vaekit.model.fast's patch stem: a patch's pixels)."""
        return cfg.in_channels

    def levels(self, cfg: AutoencoderConfig) -> Iterator[Level]:
        """The levels, built in order: each level's first block changes to its width (vaekit.model.fast's shortcuts
        change it in the resampling)."""
        ch, cin = cfg.block_channels, cfg.block_channels[0]
        for i, cout in enumerate(ch):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, cfg.norm_groups) for j in range(cfg.layers_per_block)]
            yield Level(blocks, Downsample(cout) if i < len(ch) - 1 else None, "downsample")
            cin = cout

    def body_stages(self) -> list[nn.Module]:
        """The full-resolution layers in order; `vaekit.model.tiling` runs them one at a time."""
        return [self.conv_in, *_stages(self.down)]

    def head(self, h: Tensor) -> Tensor:
        """Latent-resolution part, with global attention: always runs on the whole image."""
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Decoder(Staged):
    """conv_in; the mid block; from the top level down ResNet blocks, then (but at the last) an upsampling;
    GroupNorm, SiLU and conv_out to the image."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.decoder_channels, cfg.norm_groups  # its own widths (FLUX.2's small decoder), else the encoder's
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], g, cfg.mid_attention)
        # Indexed like LDM: up[i] works at the resolution of encoder level i; built and run from the top.
        self.up = nn.ModuleList(reversed(list(self.levels(cfg))))
        self.norm_out = _norm(ch[0], g)
        self.conv_out = Conv2d(ch[0], self.image_channels(cfg), 3, padding=1)

    def image_channels(self, cfg: AutoencoderConfig) -> int:
        """The channels conv_out writes (vaekit.model.fast's patch output: a patch's pixels)."""
        return cfg.out_channels

    def levels(self, cfg: AutoencoderConfig) -> Iterator[Level]:
        """The levels from the top, built in that order: each level's first block changes to its width
        (vaekit.model.fast's shortcuts change it in the resampling)."""
        ch = cfg.decoder_channels
        cin = ch[-1]
        for i in reversed(range(len(ch))):
            cout = ch[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, cfg.norm_groups) for j in range(cfg.layers_per_block + 1)]
            yield Level(blocks, Upsample(cout) if i > 0 else None, "upsample")
            cin = cout

    def head(self, z: Tensor) -> Tensor:
        """Latent-resolution part, with global attention: always runs on the whole latent."""
        return self.mid(self.conv_in(z), overwrite=True)  # conv_in's output is the head's own

    def body_stages(self) -> list[nn.Module]:
        """The upsampling layers in order; `vaekit.model.tiling` runs them one at a time."""
        # Not registered as a submodule: checkpoint keys stay `decoder.norm_out` / `decoder.conv_out`.
        return [*_stages(reversed(self.up)), NormSiluConv(self.norm_out, self.conv_out)]

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))
