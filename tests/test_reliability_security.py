"""Every real checkpoint loader refuses a pickle that carries code: a clear error naming the file,
and the payload (which would create a marker file) never runs.

The payload is a ``torch.save`` file, the format every loader reads, whose pickle calls
``os.system("touch MARKER")`` when unpickled without ``weights_only``; the first test shows that
it does exactly that, so the others test something real.
"""

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raebench.errors import CheckpointError, RaebenchError


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _evil(path: Path, marker: Path, state: dict | None = None) -> Path:
    """A checkpoint shaped like what the loader expects, plus the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(state or {"model": {"w": torch.zeros(2)}, "ema": {"w": torch.zeros(2)}}), "x": _Payload(marker)}, path)
    return path


def test_the_payload_runs_when_unpickled_unsafely(tmp_path: Path):
    marker = tmp_path / "pwned"
    ck = _evil(tmp_path / "evil.pt", marker)
    torch.load(ck, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# The loaders, each called the way its command calls it
# ---------------------------------------------------------------------------------------------

TINY_DITDH = dict(input_size=2, patch_size=1, in_channels=4, hidden_size=[32, 48], depth=[1, 1], num_heads=[2, 2],
                  num_classes=1)


def rae_decoder(evil: Path, tmp: Path):
    from raebench.rae.decoder import DecoderConfig, build_decoder

    build_decoder(DecoderConfig(latent_dim=8, hidden_size=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4, grid_size=2), evil)


def rae_stats(evil: Path, tmp: Path):
    from raebench.rae.stats import LatentStats

    LatentStats.load(evil)


def ditdh_official(evil: Path, tmp: Path):
    from raebench.stage2.official import build_official_model

    build_official_model({"target": "stage2.models.DDT.DiTwDDTHead", "params": TINY_DITDH, "ckpt": str(evil)})


def stage2_sample_checkpoint(evil: Path, tmp: Path):
    from raebench.stage2.sample import load_trained

    load_trained(evil)


def stage2_resume(evil: Path, tmp: Path):
    import dataclasses

    from raebench.analysis.diffusability import _InMemoryLatents
    from raebench.stage2.train import preset, train

    out = tmp / "s2run"
    _evil(out / "checkpoints" / "last.pt", tmp / "pwned")
    cfg = preset("tiny", out=str(out), num_classes=1, global_batch=4, epochs=1)
    if "num_workers" in cfg.__dataclass_fields__:
        cfg = dataclasses.replace(cfg, num_workers=0)
    train(cfg, "cpu", source=_InMemoryLatents(torch.randn(8, 4, 2, 2)))


def stage1_resume(evil: Path, tmp: Path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from raebench.stage1.config import preset
    from raebench.stage1.train import train

    torch.manual_seed(0)
    enc = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, patch_size=8, image_size=32,
        num_register_tokens=4))
    enc.save_pretrained(tmp / "encoder")
    (tmp / "encoder" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    (tmp / "images").mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 48, 3), 40 * i, np.uint8)).save(tmp / "images" / f"{i}.png")
    run = tmp / "s1run"
    _evil(run / "checkpoints" / "last.pt", tmp / "pwned")
    cfg = preset("tiny", encoder=str(tmp / "encoder"), data=str(tmp / "images"), lpips_weight=0.0, gan_weight=0.0,
                 sample_every=0)
    train(cfg, run, device="cpu")


def stage1_export(evil: Path, tmp: Path):
    from raebench.stage1.export import export_decoder

    export_decoder(evil, tmp / "exported")


def stage1_discriminator_backbone(evil: Path, tmp: Path):
    from raebench.stage1.discriminator import load_backbone_state

    load_backbone_state(evil)


def stage1_lpips_vgg(evil: Path, tmp: Path):
    from raebench.stage1.losses import build_lpips

    build_lpips(str(evil))


def va_vae_checkpoint(evil: Path, tmp: Path):
    from raebench.tokenizers import build_tokenizer

    folder = tmp / "vavae"
    folder.mkdir()
    os.replace(evil, folder / "vavae-imagenet256-f16d32-dinov2.pt")
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, folder / "latents_stats.pt")
    build_tokenizer("va-vae-f16d32", weights=str(folder))


def va_vae_stats(evil: Path, tmp: Path):
    from raebench.tokenizers.ldm_vae import _load_stats

    _load_stats(evil)


def diffusers_vae_folder(evil: Path, tmp: Path):
    """A diffusers folder holding only a pickled .bin: never read (safetensors only)."""
    from raebench.tokenizers import build_tokenizer

    folder = tmp / "sdvae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    os.replace(evil, folder / "diffusion_pytorch_model.bin")
    build_tokenizer("sd-vae-ft-ema", weights=str(folder))


def analysis_reference_weights(evil: Path, tmp: Path):
    from raebench.analysis.references import build_reference

    build_reference("dinov2-b", str(evil))


def analysis_reference_extractor_folder(evil: Path, tmp: Path):
    """dinov2-l is the metrics package's FD-DINOv2 extractor (transformers from_pretrained)."""
    from transformers import Dinov2Config

    from raebench.analysis.references import build_reference

    folder = tmp / "dinov2"
    Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 patch_size=14, image_size=518).save_pretrained(folder)
    os.replace(evil, folder / "pytorch_model.bin")
    build_reference("dinov2-l", str(folder))


def metrics_lpips_backbone(evil: Path, tmp: Path):
    from raebench.metrics.perceptual import load_lpips

    load_lpips("alex", evil)


def metrics_inception(evil: Path, tmp: Path):
    """torch-fidelity's constructor unpickles without weights_only: the extractor vets the file first."""
    from raebench.metrics import EXTRACTORS

    EXTRACTORS.get("inception").builder(device=torch.device("cpu"), outputs=("pool",), weights=str(evil))


LOADERS = [rae_decoder, rae_stats, ditdh_official, stage2_sample_checkpoint, stage2_resume, stage1_resume,
           stage1_export, stage1_discriminator_backbone, stage1_lpips_vgg, va_vae_checkpoint, va_vae_stats,
           diffusers_vae_folder, analysis_reference_weights, analysis_reference_extractor_folder, metrics_lpips_backbone,
           metrics_inception]


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
def test_every_loader_refuses_a_code_payload(loader, tmp_path: Path):
    if loader is diffusers_vae_folder:
        pytest.importorskip("diffusers")
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pt", marker, {"mean": torch.zeros(3), "var": torch.ones(3), "std": torch.ones(3),
                                                "model": {"w": torch.zeros(2)}, "ema": {"w": torch.zeros(2)},
                                                "config": {}, "latent_shape": [4, 2, 2]})
    with pytest.raises(Exception) as info:
        loader(evil, tmp_path)
    assert not marker.exists(), f"{loader.__name__} executed the pickled code"
    err = info.value
    assert isinstance(err, RaebenchError), f"{loader.__name__}: {type(err).__name__}: {err}"
    if loader is diffusers_vae_folder:
        assert "safetensors" in str(err)  # the .bin is not even opened
    else:  # a CheckpointError that names the refused file and says why
        assert isinstance(err, CheckpointError), f"{loader.__name__}: {type(err).__name__}: {err}"
        assert str(tmp_path) in str(err) and ("Refused" in str(err) or "weights_only" in str(err)), str(err)


def test_eval_resume_state_with_a_payload_is_ignored_not_run(image_folder: Path, tmp_path: Path):
    """<results>/.work/<key>/rank0.pt is read back on a re-run: a payload there is refused, the
    shard restarts from zero and the run completes with every image."""
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate
    from raebench.tokenizers import build_tokenizer

    class Crash:
        name, weights_id = "pixels", "none"

        def __init__(self):
            self.tok, self.calls = build_tokenizer("pixels"), 0

        def encode(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("crash")
            return self.tok.encode(x)

        def decode(self, z):
            return self.tok.decode(z)

    cfg = EvalConfig(tokenizer="pixels", data=str(image_folder), resolution=32, batch_size=4, device="cpu",
                     results_dir=str(tmp_path / "res"))
    with pytest.raises(RuntimeError):
        evaluate(cfg, tokenizer=Crash(), save_every=1)
    (state,) = list((tmp_path / "res" / ".work").glob("*/rank0.pt"))
    marker = tmp_path / "pwned"
    _evil(state, marker, {"version": 1, "shard": [0, 8], "done": 4, "n_used": 4, "metrics": []})
    out = evaluate(cfg)
    assert out.n_images == 8 and not marker.exists()

