"""vaekit: build, load, train and measure the image autoencoders under latent diffusion models."""

from ._version import __version__
from .checkpoints import load, save
from .config import PRESETS, AutoencoderConfig, preset
from .latents import LatentDataset
from .model import Autoencoder, Posterior, convolutions, winograd

__all__ = ["Autoencoder", "AutoencoderConfig", "LatentDataset", "Posterior", "PRESETS", "load", "preset", "save", "convolutions", "winograd"]
