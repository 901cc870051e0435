"""Model code, and the registry of architectures (`architectures`), which pairs each model module with its
checkpoint layout (`vaekit.layouts`). No CLI."""

from .architectures import ARCHITECTURES
from .autoencoder import Autoencoder, Posterior
from .ldm import Decoder, Encoder
from . import convchoice
from .convchoice import convolutions, winograd

__all__ = ["ARCHITECTURES", "Autoencoder", "Decoder", "Encoder", "Posterior", "convolutions", "winograd"]
