"""Pixel space behind the autoencoder interface: no network, each patch_size x patch_size block of
pixels folded into channels (as pixel-space diffusion transformers patchify), exactly invertible.
It lets `eval`, `analyze` and `compare` put a pixel-space pipeline beside a VAE on the same terms."""

from __future__ import annotations

from torch import Tensor, nn

from ..config import AutoencoderConfig


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.patch_size = cfg.patch_size

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.pixel_unshuffle(x, self.patch_size)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.patch_size = cfg.patch_size

    def forward(self, z: Tensor) -> Tensor:
        return nn.functional.pixel_shuffle(z, self.patch_size)
