"""Model code only: no file formats, no CLI."""

from .autoencoder import ARCHITECTURES, Autoencoder, Posterior
from .ldm import Decoder, Encoder, winograd

__all__ = ["ARCHITECTURES", "Autoencoder", "Decoder", "Encoder", "Posterior", "winograd"]
