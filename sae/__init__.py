"""sae: harvest LM activations into a zarr cache, train sparse autoencoders on it, evaluate them."""

__version__ = "0.1.0"
