"""Preview models: madebyollin's Tiny AutoEncoder (taesd, github.com/madebyollin/taesd `taesd.py`), and the linear
preview (ComfyUI's `latent_rgb_factors`), both behind the usual `Autoencoder`.

The tiny autoencoder is 64-channel conv+ReLU residual blocks, one width throughout: the encoder a conv, one block at
full resolution, then per level a stride-2 conv and 3 blocks, and a conv to the latent; the decoder the mirror image,
nearest x2 upsampling and a conv per level, after a soft clamp of the latent to (-3, 3) (3 tanh(z/3)). At 8x that is
1,222,532 parameters in the encoder and 1,222,531 in the decoder (4 latent channels), ~1/40 of SD's VAE; a 16x (32x)
space adds a level each (`block_channels`), as diffusers' `AutoencoderTiny` with longer `num_*_blocks` does. taef2
(FLUX.2) adds a branch to the blocks at latent resolution: x + conv1x1(ReLU(GroupNorm(4, conv1x1(x)))), widening 4x.

Module names are taesd.py's: `TinyEncoder` and `TinyDecoder` are `nn.Sequential`s, so the released files' keys (`1.conv.0.weight`,
the decoder's `1.weight` after its clamp at index 0) are the model's under `encoder.` / `decoder.`. Images are [-1, 1]
here, [0, 1] in taesd.py: the encoder's input and the decoder's output are mapped as diffusers' EncoderTiny/DecoderTiny
map them. Latents are the teacher's normalised ones (`AutoencoderConfig.teacher`), which is what taesd's encoders
output and its decoders take (diffusers' `AutoencoderTiny` has scaling_factor 1 for that reason).

Not tiled (`NOT_TILED`): the network is small enough to run whole; vaekit's tiling is not ported to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from .convchoice import Conv2d

NOT_TILED = "a preview model is not ported to vaekit's tiling (it is small enough to run whole)"


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return Conv2d(n_in, n_out, 3, padding=1, **kwargs)  # nn.Conv2d's keys; on a CPU, the faster algorithm (convchoice)


class Clamp(nn.Module):
    """The decoder's soft clamp of the latent to (-3, 3), where taesd's latents live."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x), one width in and out (taesd.py's `skip` is then the identity); with
    `midblock_gn` the input first gets taef2's global branch (`pool`, GroupNorm over 4 groups: the image's statistics
    reach every position)."""

    def __init__(self, width: int, midblock_gn: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(width, width), nn.ReLU(), conv(width, width), nn.ReLU(), conv(width, width))
        self.fuse = nn.ReLU()
        self.pool = None
        if midblock_gn:
            wide = 4 * width
            self.pool = nn.Sequential(nn.Conv2d(width, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(),
                                      nn.Conv2d(wide, width, 1, bias=False))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def network_channels(cfg: AutoencoderConfig) -> int:
    """The latent channels the network computes: FLUX.2's patches unpacked (128 -> 32)."""
    return cfg.latent_channels // 4 if cfg.latent_patches else cfg.latent_channels


class TinyEncoder(nn.Sequential):
    """Image in [-1, 1] -> latent: conv, block, then per level a stride-2 conv and `layers_per_block` blocks, conv."""

    NOT_TILED = NOT_TILED

    def __init__(self, cfg: AutoencoderConfig):
        width, levels, gn = cfg.block_channels[0], len(cfg.block_channels), cfg.midblock_gn
        layers: list[nn.Module] = [conv(cfg.in_channels, width), Block(width)]
        for level in range(1, levels):
            layers.append(conv(width, width, stride=2, bias=False))
            layers += [Block(width, gn and level == levels - 1) for _ in range(cfg.layers_per_block)]
        layers.append(conv(width, network_channels(cfg)))
        super().__init__(*layers)
        self.latent_patches = cfg.latent_patches

    def forward(self, x: Tensor) -> Tensor:
        z = super().forward(x.add(1).div(2))
        return F.pixel_unshuffle(z, 2) if self.latent_patches else z


class TinyDecoder(nn.Sequential):
    """Latent -> image in [-1, 1]: clamp, conv, ReLU, then per level `layers_per_block` blocks, x2 and a conv; a block
    and a conv at full resolution. With `linear_skip`, a linear preview (`skip_weight`, `skip_bias`: parameters, not a
    layer, so the Sequential's indices stay taesd.py's) is added to the output: the network learns what it misses."""

    NOT_TILED = NOT_TILED

    def __init__(self, cfg: AutoencoderConfig):
        width, levels, gn = cfg.block_channels[0], len(cfg.block_channels), cfg.midblock_gn
        layers: list[nn.Module] = [Clamp(), conv(network_channels(cfg), width), nn.ReLU()]
        for level in reversed(range(1, levels)):
            layers += [Block(width, gn and level == levels - 1) for _ in range(cfg.layers_per_block)]
            layers += [nn.Upsample(scale_factor=2), conv(width, width, bias=False)]
        layers += [Block(width), conv(width, cfg.out_channels)]
        super().__init__(*layers)
        self.latent_patches = cfg.latent_patches
        self.skip_weight = self.skip_bias = None
        if cfg.linear_skip:
            self.skip_weight = nn.Parameter(torch.zeros(cfg.out_channels, network_channels(cfg), 1, 1))
            self.skip_bias = nn.Parameter(torch.zeros(cfg.out_channels))
            self.upsample = 2 ** (levels - 1)

    @property
    def conv_out(self) -> nn.Conv2d:
        """The last conv, where the trainer's adaptive GAN weight compares gradients."""
        return self[-1]

    def forward(self, z: Tensor) -> Tensor:
        z = F.pixel_shuffle(z, 2) if self.latent_patches else z
        image = super().forward(z).mul(2)
        if self.skip_weight is None:
            return image.sub(1)
        linear = F.interpolate(F.conv2d(z, self.skip_weight, self.skip_bias), scale_factor=self.upsample, mode="bilinear",
                               align_corners=False)  # fmt: skip
        return image + linear


class LinearDecoder(nn.Module):
    """The linear preview: each latent pixel's channels times a C x out_channels matrix plus a bias (ComfyUI's
    `latent_rgb_factors` transposed and `latent_rgb_factors_bias`, `conv_out` here: a 1x1 conv), upsampled to the image
    bilinearly. Bilinear rather than nearest: the map is a colour thumbnail, and a smooth one is closer to the teacher's
    decode than factor x factor blocks (and still linear in the latent, so least squares fits it exactly)."""

    NOT_TILED = NOT_TILED

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.conv_out = nn.Conv2d(network_channels(cfg), cfg.out_channels, 1)
        self.upsample = 2 ** (len(cfg.block_channels) - 1)
        self.latent_patches = cfg.latent_patches

    def forward(self, z: Tensor) -> Tensor:
        z = F.pixel_shuffle(z, 2) if self.latent_patches else z
        return F.interpolate(self.conv_out(z), scale_factor=self.upsample, mode="bilinear", align_corners=False)


class NoEncoder(nn.Module):
    """The encoder of a decoder-only preview: refuses, in one line."""

    def forward(self, x: Tensor) -> Tensor:
        raise ValueError("this preview model is decoder-only (no encoder): encode with its teacher, whose normalised latents "
                         "(to_latent) it decodes, or load a file that has the encoder too")  # fmt: skip


def Encoder(cfg: AutoencoderConfig) -> nn.Module:  # noqa: N802 (the Model protocol's name)
    return NoEncoder() if cfg.decoder_only else TinyEncoder(cfg)


def Decoder(cfg: AutoencoderConfig) -> nn.Module:  # noqa: N802
    return LinearDecoder(cfg) if cfg.linear else TinyDecoder(cfg)


def quant_convs(cfg: AutoencoderConfig) -> tuple[None, None]:
    return None, None  # none: the latent is the network's output (and the config says so)
