"""Stage-2 commands: ``train stage2``, ``sample`` and ``cache-latents``.

All three run under ``torchrun`` as well as alone (``train stage2`` with DDP; ``sample`` shards its
batches over ranks). Library code lives in :mod:`raebench.stage2`; this module only parses flags.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from raebench.cli.core import progress_bar
from raebench.errors import RaebenchError


def _interval(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise RaebenchError(f"--cfg-interval must be 'T_MIN,T_MAX' (e.g. 0.1,1.0), got {text!r}.") from None
    return lo, hi


def _tokenizer(name: str, device):
    from raebench.tokenizers.base import build_tokenizer

    return build_tokenizer(name).to(device)


def register(app: typer.Typer) -> None:
    from raebench.cli import train_app

    @train_app.command("stage2")
    def train_stage2_cmd(
        preset: str = typer.Option("ditdh-xl", "--preset", "-p", help="ditdh-s|b|l|xl (official recipe) or tiny."),
        out: Path = typer.Option(Path("runs/stage2"), "--out", "-o", help="Run folder; re-running the same command resumes."),
        latents: Optional[Path] = typer.Option(None, "--latents", help="Latent cache from `raebench cache-latents`."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Encode --data on the fly with this tokenizer."),
        data: Optional[str] = typer.Option(None, "--data", help="Image folder with one subfolder per class."),
        resolution: Optional[int] = typer.Option(None, "--resolution", "-r"),
        num_classes: Optional[int] = typer.Option(None, "--num-classes"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Global batch (all ranks, all accumulation steps)."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
        epochs: Optional[int] = typer.Option(None, "--epochs"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
        lr: Optional[float] = typer.Option(None, "--lr"),
        precision: Optional[str] = typer.Option(None, "--precision", help="bf16 | fp32"),
        seed: Optional[int] = typer.Option(None, "--seed"),
        ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every"),
        log_every: Optional[int] = typer.Option(None, "--log-every"),
        device: str = typer.Option("auto", "--device"),
        compile_model: bool = typer.Option(False, "--compile", help="torch.compile the DiT (first steps slower)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
    ) -> None:
        """Train DiT-DH on RAE latents (official recipe presets; resumable; torchrun for DDP)."""
        from raebench import distributed
        from raebench.cli import console
        from raebench.evaluate import resolve_device
        from raebench.stage2.train import preset as make_preset, train

        overrides = dict(out=str(out), latents=str(latents) if latents else None, tokenizer=tokenizer, data=data,
                         resolution=resolution, num_classes=num_classes, global_batch=batch_size, grad_accum=grad_accum,
                         epochs=epochs, max_steps=max_steps, lr=lr, precision=precision, seed=seed,
                         ckpt_every=ckpt_every, log_every=log_every, compile=compile_model or None)
        cfg = make_preset(preset, **{k: v for k, v in overrides.items() if v is not None})
        if dry_run:
            console.print_json(json.dumps(dataclasses.asdict(cfg)))
            return
        distributed.init()
        res = train(cfg, device=resolve_device(distributed.local_device(device)))
        if distributed.is_main():
            console.print(f"trained to step {res['step']}; checkpoint in {res['out']}/checkpoints/last.pt")
        distributed.finish()

    @app.command("sample")
    def sample_cmd(
        out: Path = typer.Option(..., "--out", "-o", help="ADM npz to write (arr_0 uint8 NHWC, arr_1 labels)."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A raebench stage-2 training checkpoint."),
        config: Optional[Path] = typer.Option(None, "--config", help="An official RAE YAML (stage_1 + stage_2 blocks)."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Decoder for --checkpoint (default: the run's)."),
        num: int = typer.Option(50_000, "--num", "-n"),
        label_sampling: str = typer.Option("equal", "--label-sampling", help="equal (exactly num/classes each) | random"),
        num_classes: Optional[int] = typer.Option(None, "--num-classes"),
        cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale"),
        cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="T_MIN,T_MAX"),
        guide_checkpoint: Optional[Path] = typer.Option(None, "--guide-checkpoint", help="AutoGuidance guide model."),
        steps: Optional[int] = typer.Option(None, "--steps"),
        method: Optional[str] = typer.Option(None, "--method", help="euler | heun | adaptive | euler-maruyama | sde-heun"),
        batch_size: int = typer.Option(32, "--batch-size", "-b"),
        seed: int = typer.Option(0, "--seed"),
        grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a PNG grid of the first 64 samples."),
        device: str = typer.Option("auto", "--device"),
    ) -> None:
        """Generate class-conditional samples for gFID (sharded over torchrun ranks, resumable)."""
        import torch

        from raebench import distributed
        from raebench.cli import console
        from raebench.evaluate import resolve_device
        from raebench.stage2.sample import class_labels, generate_npz, load_trained, save_grid
        from raebench.stage2.samplers import sample

        if (checkpoint is None) == (config is None):
            raise RaebenchError("Give exactly one of --checkpoint (raebench run) or --config (official YAML).")
        distributed.init()
        dev = resolve_device(distributed.local_device(device))
        interval = _interval(cfg_interval)
        if config is not None:
            from raebench.official import from_official_config

            obj = from_official_config(config, device=dev)
            obj.model.to(dev)
            tok, shape = obj.tokenizer, tuple(obj.latent_size)
            classes = num_classes or obj.num_classes or obj.model.num_classes

            def sample_fn(noise, y):
                return obj.sample(noise, y, num_steps=steps, method=method, cfg_scale=cfg_scale, cfg_interval=interval)
        else:
            model, info = load_trained(checkpoint)
            model.to(dev)
            guide = load_trained(guide_checkpoint)[0].to(dev) if guide_checkpoint else None
            run = info["config"]
            name = tokenizer or run.tokenizer or _cache_tokenizer(run.latents)
            if name is None:
                raise RaebenchError("The run does not name its tokenizer; pass --tokenizer NAME to decode samples.")
            tok, shape, classes = _tokenizer(name, dev), info["latent_shape"], num_classes or run.num_classes

            def sample_fn(noise, y):
                return sample(model, noise, y, num_steps=steps or 50, method=method or "euler", shift=info["shift"],
                              cfg_scale=cfg_scale if cfg_scale is not None else 1.0,
                              cfg_interval=interval or (0.0, 1.0), guide=guide)

        labels = class_labels(num, classes, label_sampling, seed)
        if label_sampling == "equal" and num % classes:
            console.print(f"[yellow]{num} is not a multiple of {classes} classes: counts differ by one[/]")
        with torch.no_grad(), progress_bar("sampling (batches of this rank)") as bar:
            generate_npz(sample_fn, tok.decode, out, labels, shape, batch_size, seed, dev, progress=bar)
        if distributed.is_main():
            if grid is not None:
                save_grid(out, grid)
            console.print(f"wrote {num} samples to {out}")
        distributed.finish()

    @app.command("cache-latents")
    def cache_latents_cmd(
        tokenizer: str = typer.Option(..., "--tokenizer", "-t"),
        data: str = typer.Option(..., "--data", help="Image folder with one subfolder per class."),
        out: Path = typer.Option(..., "--out", "-o", help="Cache folder (latents.npy, labels.npy, meta.json)."),
        resolution: int = typer.Option(256, "--resolution", "-r"),
        batch_size: int = typer.Option(32, "--batch-size", "-b"),
        flip: bool = typer.Option(True, "--flip/--no-flip", help="Also store each image's horizontal flip."),
        dtype: str = typer.Option("float16", "--dtype", help="float16 | float32"),
        device: str = typer.Option("auto", "--device"),
    ) -> None:
        """Encode a dataset once (plus flips) so stage-2 training does not pay the encoder every step."""
        from raebench.cli import console
        from raebench.evaluate import resolve_device
        from raebench.stage2.train import cache_latents

        from raebench import distributed

        distributed.init()
        dev = resolve_device(distributed.local_device(device))
        tok = _tokenizer(tokenizer, dev)
        with progress_bar("encoding (images of this rank)") as bar:
            path = cache_latents(tok, data, out, resolution, batch_size, flip, dtype, progress=bar)
        if distributed.is_main():
            console.print(f"latent cache written to {path}")
        distributed.finish()


def _cache_tokenizer(latents: Optional[str]) -> Optional[str]:
    if not latents:
        return None
    meta = Path(latents) / "meta.json"
    return json.loads(meta.read_text()).get("tokenizer") if meta.is_file() else None


__all__ = ["register"]
