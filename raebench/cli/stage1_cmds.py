"""Stage-1 commands: ``raebench train stage1`` and ``raebench export-decoder``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from raebench.errors import RaebenchError


def register(app: typer.Typer) -> None:
    from raebench.cli import train_app

    @train_app.command("stage1")
    def stage1_cmd(
        preset: str = typer.Option("dinov2-b-decxl", "--preset", "-p", help="Recipe preset (dinov2-b-decxl, tiny, ...)."),
        data: Optional[str] = typer.Option(None, "--data", help="Training image folder (recursive)."),
        results: Path = typer.Option(Path("results"), "--results", help="Results root; the run lives in RESULTS/stage1/NAME."),
        name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the preset name)."),
        val_data: Optional[str] = typer.Option(None, "--val-data", help="Images for sample grids and online PSNR/SSIM."),
        encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder repo, short name or local folder."),
        init_decoder: Optional[str] = typer.Option(None, "--init-decoder", help="Start from these decoder weights."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 (autocast)."),
        global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Images per optimizer step over all processes (the recipe's 512 by default)."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per step (splits the global batch for memory; the adaptive GAN weight is then per micro-batch)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (the preset's by default)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop (and checkpoint) after this many steps."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initial weights and of every random draw (the preset's by default)."),
        overrides: list[str] = typer.Option([], "--set", help="Any setting as key=value (repeatable), e.g. --set lr=1e-4."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and step plan, then exit."),
    ) -> None:
        """Train an RAE decoder on a frozen encoder; re-running the same command resumes the run.

        Multi-GPU: torchrun --nproc_per_node=8 -m raebench train stage1 ...
        """
        import os

        from raebench.cli import console
        from raebench.stage1.config import parse_overrides
        from raebench.stage1.config import preset as get_preset

        named = dict(data=data, val_data=val_data, encoder=encoder, init_decoder=init_decoder, precision=precision,
                     global_batch=global_batch, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, seed=seed)
        cfg = get_preset(preset, **{k: v for k, v in named.items() if v is not None}, **parse_overrides(overrides))
        run_dir = results / "stage1" / (name or preset)
        if dry_run:
            out = {"run_dir": str(run_dir), "config": cfg.to_dict()}
            if cfg.data:
                from raebench.folders import scan_folder
                from raebench.stage1.train import plan

                try:
                    out["plan"] = plan(cfg, len(scan_folder(cfg.data).paths), int(os.environ.get("WORLD_SIZE", "1")))
                except RaebenchError as e:  # the config still prints; the run itself would stop here
                    out["plan_error"] = str(e)
            console.print_json(json.dumps(out))
            return
        from raebench.stage1.train import train

        res = train(cfg, run_dir, device=device)
        if int(os.environ.get("RANK", "0")) == 0:
            state = "finished" if res["step"] >= res["total_steps"] else "stopped"
            console.print(f"{state} at step {res['step']}/{res['total_steps']} · run {res['run_dir']}"
                          + (f" · decoder {res['decoder']}" if res["decoder"] else ""))
        from raebench import distributed

        distributed.finish()

    @app.command("export-decoder")
    def export_decoder_cmd(
        source: Path = typer.Argument(..., help="A stage-1 run folder or its checkpoints/last.pt."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/decoder)."),
        weights: str = typer.Option("ema", "--weights", help="ema | model."),
    ) -> None:
        """Write a trained decoder as official model.pt + safetensors + config.json (loads back strictly)."""
        from raebench.cli import console
        from raebench.stage1.export import export_decoder, stage1_checkpoint

        ckpt = stage1_checkpoint(source)
        if out is None:
            out = ckpt.parent.parent / "decoder"
        if weights not in ("ema", "model"):
            raise RaebenchError(f"--weights must be ema or model, not {weights!r}.")
        d = export_decoder(ckpt, out, which=weights)
        console.print(f"wrote {d}/model.pt, model.safetensors, config.json · {_eval_hint(d)}")


def _eval_hint(folder: Path) -> str:
    """How to evaluate an exported decoder: with the registered RAE of the same encoder and resolution."""
    from raebench.tokenizers.rae import RELEASES

    meta = json.loads((folder / "stage1.json").read_text())
    names = [r.name for r in RELEASES.values()
             if r.encoder_repo == meta.get("encoder") and r.resolution == meta.get("resolution")]
    if names:
        return f"use it with `raebench eval --tokenizer {names[0]} --decoder {folder}`"
    return (f"no registered RAE tokenizer has its encoder {meta.get('encoder')!r} at {meta.get('resolution')} px; "
            f"load it through an official-style YAML (pretrained_decoder_path: {folder}/model.pt) with `raebench eval --tokenizer-config`")
