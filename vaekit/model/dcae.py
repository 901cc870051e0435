"""DC-AE, MIT Han Lab's deep compression autoencoder (SANA's; Chen et al. 2024, arXiv 2410.10733): a
deterministic autoencoder of 32x to 128x. Its first levels are ResBlocks (conv, conv, norm), the deeper
ones EfficientViT blocks (ReLU linear attention over the whole image, with multi-scale q/k/v, then a GLU
MBConv); every norm is an RMSNorm over channels (the in/mix releases' decoder ResBlocks: BatchNorm).
Residual autoencoding: each resampling, the encoder's output and the decoder's input add a parameter-free
path (2x2 pixels into channels, averaged; or channels repeated into 2x2 pixels).

Module names are diffusers' (`AutoencoderDC`); MIT Han Lab's own files are one renaming away
(vaekit.layouts.dcae). The linear attention sees the whole image, so the coders are not `Staged`: they
are not tiled (`Autoencoder` refuses `tile=`, saying why: `NOT_TILED`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from .convchoice import Conv2d

NOT_TILED = "DC-AE's linear attention spans the whole image, so tiles cannot give the untiled result; run it untiled"


class RMSNorm(nn.Module):
    """RMSNorm over the channels of an NCHW tensor, with a bias (diffusers' RMSNorm on channels-last)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + self.eps)
        return (y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]).to(x.dtype)


def _norm(kind: str, channels: int) -> nn.Module:
    return RMSNorm(channels) if kind == "rms_norm" else nn.BatchNorm2d(channels)


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm: str = "rms_norm"):
        super().__init__()
        self.conv1 = Conv2d(channels, channels, 3, padding=1)
        self.conv2 = Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = _norm(norm, channels)
        self.act = nn.SiLU() if norm == "rms_norm" else nn.ReLU()  # the pairs DC-AE's releases use

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm(self.conv2(self.act(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """q, k and v blurred by a depthwise k x k conv, then mixed within each head's 3 * head_dim channels."""

    def __init__(self, channels: int, heads: int, kernel: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(self.proj_in(x))


class LinearAttention(nn.Module):
    """EfficientViT's ReLU linear attention: out = V relu(K)^T relu(Q) / (1^T relu(K)^T relu(Q)), per head,
    over every position; once on q/k/v themselves and once per multi-scale projection of them."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], norm: str = "rms_norm"):
        super().__init__()
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, inner, bias=False) for _ in range(3))
        self.to_qkv_multiscale = nn.ModuleList([MultiscaleProjection(3 * inner, heads, k) for k in scales])
        self.to_out = nn.Linear(inner * (1 + len(scales)), channels, bias=False)
        self.norm_out = _norm(norm, channels)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        y = x.movedim(1, -1)
        qkv = torch.cat([self.to_q(y), self.to_k(y), self.to_v(y)], dim=-1).movedim(-1, 1)
        qkv = torch.cat([qkv] + [m(qkv) for m in self.to_qkv_multiscale], dim=1)
        # Each head is 3 * head_dim consecutive channels: its q, k and v (the layout the weights were trained in).
        q, k, v = qkv.float().reshape(n, -1, 3 * self.head_dim, h * w).chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # a row of ones: the last row of the result is the normaliser
        out = (v @ k.transpose(-1, -2)) @ q
        out = (out[:, :, :-1] / (out[:, :, -1:] + 1e-15)).to(x.dtype).reshape(n, -1, h, w)
        return x + self.norm_out(self.to_out(out.movedim(1, -1)).movedim(-1, 1))


class GLUMBConv(nn.Module):
    """Inverted bottleneck (4x) with a depthwise 3x3 conv and a SiLU gate, RMSNorm, residual."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = expand * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)
        return x + self.norm(self.conv_point(h * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], norm: str = "rms_norm"):
        super().__init__()
        self.attn = LinearAttention(channels, head_dim, scales, norm)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.attn(x))


def _block(cfg: AutoencoderConfig, level: int, norm: str) -> nn.Module:
    width = cfg.block_channels[level]
    if cfg.block_types[level] == "ResBlock":
        return ResBlock(width, norm)
    return EfficientViTBlock(width, cfg.attention_head_dim, cfg.attention_scales, norm)


class Downsample(nn.Module):
    """Half the side: a 3x3 conv to a quarter of the channels and pixel-unshuffle ("shuffle"), or a
    stride-2 conv ("conv"); plus (shortcut) the input pixel-unshuffled, its channel groups averaged."""

    def __init__(self, cin: int, cout: int, resample: str, shortcut: bool = True):
        super().__init__()
        self.shuffle = resample == "shuffle"
        self.conv = Conv2d(cin, cout // 4 if self.shuffle else cout, 3, stride=1 if self.shuffle else 2, padding=1)
        self.group = 4 * cin // cout if shortcut else 0

    def forward(self, x: Tensor) -> Tensor:
        h = F.pixel_unshuffle(self.conv(x), 2) if self.shuffle else self.conv(x)
        if not self.group:
            return h
        return h + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group)).mean(dim=2)


class Upsample(nn.Module):
    """Double the side: a 3x3 conv to 4x the channels and pixel-shuffle ("shuffle"), or nearest x2 and a
    3x3 conv ("conv"); plus (shortcut) the input's channels repeated and pixel-shuffled."""

    def __init__(self, cin: int, cout: int, resample: str, shortcut: bool = True):
        super().__init__()
        self.shuffle = resample == "shuffle"
        self.conv = Conv2d(cin, 4 * cout if self.shuffle else cout, 3, padding=1)
        self.repeats = 4 * cout // cin if shortcut else 0

    def forward(self, x: Tensor) -> Tensor:
        h = F.pixel_shuffle(self.conv(x), 2) if self.shuffle else self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        if not self.repeats:
            return h
        return h + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)


class Encoder(nn.Module):
    NOT_TILED = NOT_TILED

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, layers = cfg.block_channels, cfg.encoder_layers
        # A first level of no blocks (the in/mix releases): the stem itself halves the side.
        if layers[0]:
            self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        else:
            self.conv_in = Downsample(cfg.in_channels, ch[1], cfg.resample, shortcut=False)
        self.down_blocks = nn.ModuleList()
        for i, n in enumerate(layers):
            blocks = [_block(cfg, i, "rms_norm") for _ in range(n)]
            if i < len(ch) - 1 and n:
                blocks.append(Downsample(ch[i], ch[i + 1], cfg.resample))
            self.down_blocks.append(nn.Sequential(*blocks))
        self.conv_out = Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)
        self.group = ch[-1] // cfg.latent_channels

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for blocks in self.down_blocks:
            h = blocks(h)
        return self.conv_out(h) + h.unflatten(1, (-1, self.group)).mean(dim=2)


class Decoder(nn.Module):
    NOT_TILED = NOT_TILED

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, layers = cfg.block_channels, cfg.decoder_layers
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.repeats = ch[-1] // cfg.latent_channels
        # up_blocks[i] is level i (run from the last level to the first), as in the encoder.
        self.up_blocks = nn.ModuleList()
        for i, n in enumerate(layers):
            blocks = [Upsample(ch[i + 1], ch[i], cfg.resample)] if i < len(ch) - 1 and n else []
            blocks += [_block(cfg, i, cfg.decoder_norms[i]) for _ in range(n)]
            self.up_blocks.append(nn.Sequential(*blocks))
        width = ch[0] if layers[0] else ch[1]
        self.norm_out = RMSNorm(width)
        if layers[0]:
            self.conv_out = Conv2d(width, cfg.out_channels, 3, padding=1)
        else:  # a first level of no blocks: the last conv doubles the side
            self.conv_out = Upsample(width, cfg.out_channels, cfg.resample, shortcut=False)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1)
        for blocks in reversed(self.up_blocks):
            h = blocks(h)
        return self.conv_out(F.relu(self.norm_out(h)))


def quant_convs(cfg: AutoencoderConfig) -> tuple[None, None]:
    return None, None  # DC-AE has none (and the config says so)
