"""raebench: Representation Autoencoders and a benchmark for image tokenizers."""

__version__ = "0.1.0"
