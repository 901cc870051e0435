"""Model code only: no file formats, no CLI."""

from .autoencoder import ARCHITECTURES, Autoencoder, Posterior
from .lean import winograd
from .ldm import Decoder, Encoder

__all__ = ["ARCHITECTURES", "Autoencoder", "Decoder", "Encoder", "Posterior", "winograd"]
