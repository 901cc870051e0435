import os
import tempfile

import pytest
import torch

from vaekit import AutoencoderConfig
from vaekit.model import Autoencoder

torch.set_num_threads(1)  # the suite runs under pytest-xdist on 2 cores
# PyTorch's own convolutions, the same on every run: the default "auto" times each new layer shape once per machine, and
# a test that wants it says so (tests/test_speed.py), with a cache of its own; none ever writes to ~/.cache.
os.environ["VAEKIT_CONV"] = "direct"
os.environ["VAEKIT_CACHE"] = tempfile.mkdtemp(prefix="vaekit-cache-")


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random weights with non-trivial norms/biases, so parity tests exercise every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def tiny_config() -> AutoencoderConfig:
    return AutoencoderConfig(block_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8, latent_channels=4)


@pytest.fixture
def tiny_model(tiny_config) -> Autoencoder:
    torch.manual_seed(0)
    return perturb(Autoencoder(tiny_config)).eval()
