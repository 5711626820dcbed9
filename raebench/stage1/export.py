"""Export a trained decoder: ``raebench export-decoder RUN_OR_CHECKPOINT --out DIR``.

Writes, in ``DIR``: ``model.pt`` (a plain decoder state dict, the official RAE format, keys such as
``decoder_layers.0.attention.attention.query.weight``), ``model.safetensors`` (the same tensors),
``config.json`` (the official ViTMAE-style decoder config) and ``stage1.json`` (where it came from).
Before writing, the state dict is loaded *strictly* into a decoder built from that config, so an
export that would not load back is never written. The folder (or its ``model.pt``) is what
``raebench eval --tokenizer rae-dinov2-b --decoder DIR`` and the official ``pretrained_decoder_path``
expect.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from raebench.errors import CheckpointError
from raebench.results import atomic_write_bytes

WHICH = ("ema", "model")


def stage1_checkpoint(source: str | os.PathLike) -> Path:
    """A run folder (``checkpoints/last.pt`` inside) or a checkpoint file -> the checkpoint file."""
    from raebench.checkpoint import run_checkpoint

    return run_checkpoint(source, "stage-1")


def export_decoder(source: str | os.PathLike, out: str | os.PathLike, which: str = "ema") -> Path:
    """Write the ``which`` ("ema" or "model") decoder of a stage-1 checkpoint to ``out``; returns ``out``."""
    from raebench.checkpoint import load_state, save_atomic
    from raebench.rae.decoder import DecoderConfig, build_decoder
    from raebench.stage1.config import from_dict

    if which not in WHICH:
        raise CheckpointError(f"Export which weights? {which!r} is neither 'ema' nor 'model'.")
    path = stage1_checkpoint(source)
    ck = load_state(path)
    if not isinstance(ck, dict) or which not in ck or "config" not in ck:
        raise CheckpointError(f"{str(path)!r} is not a raebench stage-1 checkpoint (no {which!r}/'config' entries).")
    saved = ck["config"] if isinstance(ck["config"], dict) else {}
    if str(saved.get("model", "")).startswith(("ditdh", "lightningdit")):  # a `train stage2` run
        raise CheckpointError(f"{str(path)!r} is a stage-2 ({saved['model']}) checkpoint; export-decoder exports the "
                              "decoder of a `raebench train stage1` run.")
    cfg = from_dict(ck["config"])
    sd = {k: v.detach().float().contiguous() for k, v in ck[which].items()}
    if "decoder_embed.weight" not in sd:
        raise CheckpointError(f"The {which!r} entry of {str(path)!r} is not a decoder state dict.")
    dcfg = DecoderConfig(
        latent_dim=int(sd["decoder_embed.weight"].shape[1]), hidden_size=cfg.decoder_hidden, depth=cfg.decoder_depth,
        num_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp, patch_size=cfg.decoder_patch, grid_size=cfg.grid,
        layer_norm_eps=cfg.decoder_layer_norm_eps,
    )
    build_decoder(dcfg, sd)  # strict: raises CheckpointError naming any missing/unexpected key
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write_bytes(out / "model.pt", buf.getvalue())
    save_atomic(sd, out / "model.safetensors")
    meta = {"source": str(path.resolve()), "weights": which, "step": int(ck.get("step", -1)), "encoder": cfg.encoder,
            "encoder_input_size": cfg.encoder_input_size, "resolution": cfg.resolution, "noise_tau": cfg.noise_tau}
    atomic_write_bytes(out / "stage1.json", json.dumps(meta, indent=2).encode())
    atomic_write_bytes(out / "config.json", json.dumps(dcfg.to_official(), indent=2).encode())  # last: marks completion
    return out
