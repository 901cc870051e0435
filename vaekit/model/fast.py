"""The LDM architecture's fast-training options (AutoencoderConfig; docs/TRAINING.md), as a variant of its encoder
and decoder built from the same blocks, with the same module names (checkpoint keys):

- `patch_size`: a patch stem. The encoder sees each p x p patch of pixels as p² x the channels at 1/p of the side;
  the decoder makes them back by a pixel shuffle of its last conv (`patch_out="shuffle"`), or upsamples its features
  and runs that conv at full resolution (`"nearest"`).
- `shortcuts`: DC-AE's residual autoencoding. Each resampling also moves to the next level's width and adds a
  parameter-free path (`space_to_channel` / `channel_to_space`); so does the latent bottleneck.
- `thumbnail_shortcut`: the first latent channels carry the image's factor x factor box means, the decoder adds
  their bilinear upsampling to its output, and the convs around the latent start at zero: the untrained model is a
  thumbnail coder. These paths go around the whole coder, quant convs included (`bypass`, which `Autoencoder` calls).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from . import ldm
from .ldm import Level, ResnetBlock


def varies(cfg: AutoencoderConfig) -> bool:
    """Whether the config sets any of these options (patch_out matters only with a patch stem)."""
    return cfg.patch_size > 1 or cfg.shortcuts or cfg.thumbnail_shortcut


def space_to_channel(x: Tensor, channels: int) -> Tensor:
    """Half the resolution without parameters: each 2x2 block of pixels into channels, then the
    means of consecutive channel groups down to `channels` (DC-AE's downsampling shortcut)."""
    return F.pixel_unshuffle(x, 2).unflatten(1, (channels, -1)).mean(dim=2)


def channel_to_space(x: Tensor, channels: int) -> Tensor:
    """Twice the resolution without parameters: each channel repeated, then spread over 2x2 pixels
    (DC-AE's upsampling shortcut). `space_to_channel` undoes it exactly."""
    return F.pixel_shuffle(x.repeat_interleave(4 * channels // x.shape[1], dim=1), 2)


class Downsample(ldm.Downsample):
    """LDM's downsampling, to `out` channels; with `shortcut`, plus `space_to_channel` (DC-AE's)."""

    def __init__(self, channels: int, out: int, shortcut: bool = True):
        super().__init__(channels, out)
        self.out, self.shortcut = out, shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y + space_to_channel(x, self.out) if self.shortcut else y


class Upsample(ldm.Upsample):
    """With `shortcut`, DC-AE's upsampling: a conv at the low resolution to 4x the output channels, put into 2x2
    pixels (cheaper than a conv after the upsampling), plus `channel_to_space`. Without, LDM's to `out` channels."""

    def __init__(self, channels: int, out: int, shortcut: bool = True):
        super().__init__(channels, out * (4 if shortcut else 1))
        self.out, self.shortcut = out, shortcut

    def forward(self, x: Tensor) -> Tensor:
        if not self.shortcut:
            return super().forward(x)
        return F.pixel_shuffle(self.conv(x), 2) + channel_to_space(x, self.out)


def _start_at_zero(conv: nn.Conv2d) -> None:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)


class Encoder(ldm.Encoder):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__(cfg)
        self.patch_size, self.shortcuts, self.latent_channels = cfg.patch_size, cfg.shortcuts, cfg.latent_channels
        self.factor, self.thumbnail = cfg.factor, cfg.thumbnail_shortcut
        if self.thumbnail:  # start as the thumbnail coder: nothing but the shortcut reaches the output
            _start_at_zero(self.conv_out)
            if cfg.kind == "vae":  # and a nearly deterministic posterior (std e^-3), so noise does not drown the colours
                nn.init.constant_(self.conv_out.bias[cfg.latent_channels :], -6.0)

    def image_channels(self, cfg: AutoencoderConfig) -> int:
        return cfg.in_channels * cfg.patch_size**2

    def levels(self, cfg: AutoencoderConfig) -> Iterator[Level]:
        """With shortcuts, each level keeps its width and the downsampling moves to the next one's."""
        if not cfg.shortcuts:
            return super().levels(cfg)
        ch = cfg.block_channels
        return (Level([ResnetBlock(width, width, cfg.norm_groups) for _ in range(cfg.layers_per_block)],
                      Downsample(width, ch[i + 1]) if i < len(ch) - 1 else None, "downsample")
                for i, width in enumerate(ch))  # fmt: skip

    def body_stages(self) -> list[nn.Module]:
        stages = super().body_stages()
        if self.patch_size > 1:  # not registered as a submodule: the checkpoint key stays `encoder.conv_in`
            stages[0] = nn.Sequential(nn.PixelUnshuffle(self.patch_size), self.conv_in)
        return stages

    def head(self, h: Tensor) -> Tensor:
        h = self.mid(h)
        moments = self.conv_out(F.silu(self.norm_out(h)))
        if not self.shortcuts:
            return moments
        # The latent (the mean of a VAE's posterior, not its log-variance) gets the channel-group
        # means of the features: the bottleneck's shortcut.
        c = self.latent_channels
        return torch.cat([moments[:, :c] + h.unflatten(1, (c, -1)).mean(dim=2), moments[:, c:]], dim=1)

    def bypass(self, x: Tensor, moments: Tensor) -> Tensor:
        """The moments after the quant conv, plus the thumbnail shortcut: the image's box means into the first
        channels of the mean (not of the log-variance)."""
        if not self.thumbnail:
            return moments
        thumb = F.avg_pool2d(x, self.factor)
        return torch.cat([moments[:, : thumb.shape[1]] + thumb, moments[:, thumb.shape[1] :]], dim=1)


class Decoder(ldm.Decoder):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__(cfg)
        self.patch_size, self.patch_out, self.shortcuts = cfg.patch_size, cfg.patch_out, cfg.shortcuts
        self.factor, self.thumbnail = cfg.factor, cfg.thumbnail_shortcut
        if self.thumbnail:
            _start_at_zero(self.conv_out)

    def image_channels(self, cfg: AutoencoderConfig) -> int:
        return cfg.out_channels * (cfg.patch_size**2 if cfg.patch_out == "shuffle" else 1)

    def levels(self, cfg: AutoencoderConfig) -> Iterator[Level]:
        """With shortcuts, each level keeps its width and the upsampling moves to the next one's."""
        if not cfg.shortcuts:
            return super().levels(cfg)
        ch = cfg.block_channels
        return (Level([ResnetBlock(ch[i], ch[i], cfg.norm_groups) for _ in range(cfg.layers_per_block + 1)],
                      Upsample(ch[i], ch[i - 1]) if i > 0 else None, "upsample")
                for i in reversed(range(len(ch))))  # fmt: skip

    def head(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        if self.shortcuts:  # the bottleneck's shortcut: each latent channel repeated
            h = h + z.repeat_interleave(h.shape[1] // z.shape[1], dim=1)
        return self.mid(h, overwrite=True)  # h is the head's own

    def body_stages(self) -> list[nn.Module]:
        stages = super().body_stages()  # the last: norm_out, SiLU, conv_out (not registered: the keys stay)
        if self.patch_size > 1 and self.patch_out == "nearest":
            stages[-1] = nn.Sequential(self.norm_out, nn.SiLU(), nn.Upsample(scale_factor=self.patch_size), self.conv_out)
        elif self.patch_size > 1:
            stages[-1] = nn.Sequential(stages[-1], nn.PixelShuffle(self.patch_size))
        return stages

    def bypass(self, z: Tensor, x: Tensor) -> Tensor:
        """The image, plus the thumbnail shortcut: the latent's first channels, upsampled bilinearly."""
        if not self.thumbnail:
            return x
        return x + F.interpolate(z[:, : x.shape[1]], scale_factor=self.factor, mode="bilinear", align_corners=False)
