"""Model code only: no file formats, no CLI."""

from .autoencoder import Autoencoder, Decoder, Encoder, Posterior

__all__ = ["Autoencoder", "Decoder", "Encoder", "Posterior"]
