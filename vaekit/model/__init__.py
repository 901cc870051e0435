"""Model code, and the registry of architectures (`architectures`), which pairs each model module with its
checkpoint layout (`vaekit.layouts`). No CLI."""

from .architectures import ARCHITECTURES
from .autoencoder import Autoencoder, Posterior
from .ldm import Decoder, Encoder
from .lean import winograd

__all__ = ["ARCHITECTURES", "Autoencoder", "Decoder", "Encoder", "Posterior", "winograd"]
