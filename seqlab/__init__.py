"""seqlab: a JAX/Flax research framework for efficient sequence models."""

__version__ = "0.1.0"
