"""Representation Autoencoders (Zheng et al. 2025, arXiv:2510.11690): frozen encoder, latent
statistics, ViT decoder. See :mod:`raebench.rae.tokenizer` for the contract."""

from raebench.rae.decoder import (
    DECODER_PRESETS,
    DecoderConfig,
    RAEDecoder,
    build_decoder,
    load_decoder_weights,
    official_config,
    preset_config,
)
from raebench.rae.encoders import RepresentationEncoder, build_encoder, load_hf_encoder, wrap_hf_model
from raebench.rae.stats import LatentStats, StatsAccumulator
from raebench.rae.tokenizer import RAETokenizer, add_noise

__all__ = [
    "DECODER_PRESETS",
    "DecoderConfig",
    "LatentStats",
    "RAEDecoder",
    "RAETokenizer",
    "RepresentationEncoder",
    "StatsAccumulator",
    "add_noise",
    "build_decoder",
    "build_encoder",
    "load_decoder_weights",
    "load_hf_encoder",
    "official_config",
    "preset_config",
    "wrap_hf_model",
]
