"""Reference models built on fastattn's modules."""

from .transformer import Transformer, lengths_to_mask, sinusoidal_positions

__all__ = ["Transformer", "lengths_to_mask", "sinusoidal_positions"]
