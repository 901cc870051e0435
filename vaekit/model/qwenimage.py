"""Qwen-Image's VAE (Wan 2.1's causal video VAE), for single images.

A picture is a one-frame video. The causal 3D convolutions pad time with zeros before the first
frame, so on one frame only their last temporal slice of weights ever meets data: each is a 2D
convolution with `weight[:, :, -1]`, and the temporal convolutions of the 3D resampling layers,
which only run from the second frame on, never run. The weights keep their 5D video shapes and
diffusers' names (`AutoencoderKLQwenImage`), so checkpoints load and save unchanged; `image` blocks hold the
image-only form of the same layers, 2D weights (Qwen-Image 2.1's AutoencoderKLQwenImage21, `causal_conv`). Normalisation
is RMS over channels at each position (no batch or image statistics), so the convolutional body
tiles exactly; only the middle block's attention needs the whole latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoencoderConfig
from .convchoice import Conv2d, conv2d
from .lean import Staged


class CausalConv3d(nn.Conv3d):
    """A video layer's weights; on one frame, a 2D convolution with the last temporal slice."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int], stride: int = 1, padding: int = 0):
        super().__init__(cin, cout, kernel, stride=stride)
        self.spatial_padding = padding

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.weight[:, :, -1], self.bias, self.stride[1:], self.spatial_padding)


def causal_conv(cin: int, cout: int, kernel: int | tuple[int, ...], stride: int | tuple[int, ...] = 1, padding: int = 0,
                image: bool = False) -> nn.Module:
    """A causal video convolution (5D weights), or with `image` its one-frame form stored as one: a 2D convolution
    with the spatial part of the kernel and stride (Qwen-Image 2.1's `QwenImage21CausalConv3d`, an nn.Conv2d)."""
    if not image:
        return CausalConv3d(cin, cout, kernel, stride=stride, padding=padding)  # type: ignore[arg-type]
    spatial = lambda v: v if isinstance(v, int) else tuple(v[1:])  # noqa: E731
    return Conv2d(cin, cout, spatial(kernel), stride=spatial(stride), padding=padding)


class RMSNorm(nn.Module):
    """x / |x| over channels, times sqrt(C) and a learned gain; computed in fp32 for half inputs."""

    def __init__(self, dim: int, video: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        normalised = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1).to(x.dtype)
        return normalised * self.scale * self.gamma.view(-1, 1, 1)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, image: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = causal_conv(cin, cout, 3, padding=1, image=image)
        self.norm2 = RMSNorm(cout)
        self.conv2 = causal_conv(cout, cout, 3, padding=1, image=image)
        self.conv_shortcut = causal_conv(cin, cout, 1, image=image) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.conv_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of the (per-frame) latent."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = Conv2d(dim, dim * 3, 1)
        self.proj = Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return x + self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))


class MidBlock(nn.Module):
    def __init__(self, dim: int, image: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, image), ResidualBlock(dim, dim, image)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Resample(nn.Module):
    """2x down (zero-pad right/bottom, stride-2 conv) or up (nearest, conv to `out` channels: half by default,
    Wan 2.2's keep them); `temporal` layers also hold the time convolution video needs, which one frame never runs."""

    def __init__(self, dim: int, up: bool, temporal: bool, out: int | None = None, image: bool = False):
        super().__init__()
        self.up = up
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"), Conv2d(dim, out or dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = (causal_conv(dim, dim * 2, (3, 1, 1), image=image) if up
                              else causal_conv(dim, dim, (3, 1, 1), stride=(2, 1, 1), image=image))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if self.up:  # upsample in fp32 as diffusers does, then back
            return self.resample[1](self.resample[0](x.float()).type_as(x))
        return self.resample(x)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, upsample: Resample | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(layers + 1)])
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


def _temporal(cfg: AutoencoderConfig) -> tuple[bool, ...]:
    return cfg.temporal_downsample or (False,) * (len(cfg.block_channels) - 1)


class Encoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        dims = (cfg.block_channels[0], *cfg.block_channels)
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.layers_per_block):
                layers.append(ResidualBlock(cin if j == 0 else cout, cout))
            if i < len(cfg.block_channels) - 1:
                layers.append(Resample(cout, up=False, temporal=_temporal(cfg)[i]))
        self.down_blocks = nn.ModuleList(layers)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.moment_channels, 3, padding=1)

    def body_stages(self) -> list[nn.Module]:
        """The full-resolution layers in order (all local: they tile exactly)."""
        return [self.conv_in, *self.down_blocks]

    def head(self, h: Tensor) -> Tensor:
        """Latent resolution, with global attention: always the whole image."""
        return self.conv_out(F.silu(self.norm_out(self.mid_block(h))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Decoder(Staged):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.block_channels
        dims = (ch[-1], *reversed(ch))
        temporal = tuple(reversed(_temporal(cfg)))
        self.conv_in = CausalConv3d(cfg.latent_channels, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(ch) - 1
            up = None if last else Resample(cout, up=True, temporal=temporal[i])
            blocks.append(UpBlock(cin // 2 if i > 0 else cin, cout, cfg.layers_per_block, up))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def head(self, z: Tensor) -> Tensor:
        return self.mid_block(self.conv_in(z))

    def body_stages(self) -> list[nn.Module]:
        """The upsampling layers in order, one block at a time (all local: they tile exactly)."""
        stages: list[nn.Module] = []
        for block in self.up_blocks:
            stages += [*block.resnets, *(block.upsamplers or [])]
        return [*stages, OutStage(self.norm_out, self.conv_out)]

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z))


class OutStage(nn.Module):
    """A decoder's last stage, conv(SiLU(norm(h))), built on the fly (the decoder does not register it, so the names
    stay `decoder.norm_out` / `decoder.conv_out`). `clamp`: to [-1, 1], as diffusers' AutoencoderKLQwenImage (Wan's and
    Qwen-Image's decoders; HunyuanVideo-1.5's and Hunyuan Image 3.0's, which share this stage, do not clamp)."""

    def __init__(self, norm: nn.Module, conv: nn.Module, clamp: bool = True):
        super().__init__()
        self.norm, self.conv, self.clamp = norm, conv, clamp

    def forward(self, h: Tensor) -> Tensor:
        out = self.conv(F.silu(self.norm(h), inplace=not torch.is_grad_enabled()))
        return out.clamp(-1.0, 1.0) if self.clamp else out


def quant_convs(cfg: AutoencoderConfig) -> tuple[nn.Module, nn.Module]:
    """The 1x1x1 video convolutions around the latent (diffusers' `quant_conv` / `post_quant_conv`); 1x1 2D ones
    with `image_convs`."""
    moments, image = cfg.moment_channels, cfg.image_convs
    return causal_conv(moments, moments, 1, image=image), causal_conv(cfg.latent_channels, cfg.latent_channels, 1, image=image)
