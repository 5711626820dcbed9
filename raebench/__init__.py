"""raebench: Representation Autoencoders and a benchmark for image tokenizers."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: importing raebench must not import torch/transformers
    if name == "from_official_config":
        from raebench.official import from_official_config

        return from_official_config
    raise AttributeError(f"module 'raebench' has no attribute {name!r}")
