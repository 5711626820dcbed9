"""Tokenizer registry. Importing this package registers every built-in tokenizer."""

from raebench.tokenizers.base import (
    TOKENIZERS,
    Tokenizer,
    TokenizerSpec,
    build_tokenizer,
    get_tokenizer_spec,
    register_tokenizer,
)
from raebench.tokenizers import reference  # noqa: F401  (registers pixels, bicubic-f8/16)
from raebench.tokenizers import vae  # noqa: F401  (registers the diffusers VAE baselines)
from raebench.tokenizers import rae  # noqa: F401  (registers the released RAEs)

__all__ = [
    "TOKENIZERS",
    "Tokenizer",
    "TokenizerSpec",
    "build_tokenizer",
    "get_tokenizer_spec",
    "register_tokenizer",
]
