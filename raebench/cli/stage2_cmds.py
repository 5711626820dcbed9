"""Stage-2 commands: ``train stage2``, ``sample`` and ``cache-latents``.

Each takes the tokenizer's local files as ``eval`` does (``--weights``, ``--decoder``, ``--stats``;
built by the same code); ``cache-latents`` and ``train stage2`` record the identity of those weights
with the latents, and ``sample`` warns when it decodes with other ones.
All three run under ``torchrun`` as well as alone (``train stage2`` with DDP; ``sample`` shards its
batches over ranks). Library code lives in :mod:`raebench.stage2`; this module only parses flags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Optional

import typer

from raebench.cli.core import progress_bar
from raebench.errors import RaebenchError, first_line

log = logging.getLogger(__name__)


def _interval(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise RaebenchError(f"--cfg-interval must be 'T_MIN,T_MAX' (e.g. 0.1,1.0), got {text!r}.") from None
    if not 0.0 <= lo < hi <= 1.0:  # also refuses NaN
        raise RaebenchError(f"--cfg-interval must be T_MIN,T_MAX with 0 <= T_MIN < T_MAX <= 1, got {text!r}.")
    return lo, hi


def register(app: typer.Typer) -> None:
    from raebench.cli import train_app

    @train_app.command("stage2")
    def train_stage2_cmd(
        preset: str = typer.Option("ditdh-xl", "--preset", "-p", help="ditdh-s|b|l|xl (official recipe), lightningdit-s|b|l|xl (the plain DiT, same recipe) or tiny."),
        out: Path = typer.Option(Path("runs/stage2"), "--out", "-o", help="Run folder; re-running the same command resumes."),
        latents: Optional[Path] = typer.Option(None, "--latents", help="Latent cache from `raebench cache-latents`."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Encode --data on the fly with this tokenizer."),
        data: Optional[str] = typer.Option(None, "--data", help="Image folder with one subfolder per class."),
        resolution: Optional[int] = typer.Option(None, "--resolution", "-r", help="Image size for on-the-fly encoding with --tokenizer/--data (the preset's by default: 256 in the recipe; a cache has its own)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="With --tokenizer: local weights file/folder for the tokenizer (as eval's)."),
        decoder: Optional[str] = typer.Option(None, "--decoder", help="With --tokenizer, RAE: a decoder checkpoint instead of the released one (recorded with the run; `sample` decodes with it)."),
        stats: Optional[str] = typer.Option(None, "--stats", help="With --tokenizer, RAE: latent statistics file (stat.pt)."),
        num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Class count of the model (default: the preset's)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Global batch (all ranks, all accumulation steps; the preset's by default: 1024 in the recipe)."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per step (splits the global batch for memory; same result)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (the preset's by default)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (the preset's by default: 2e-4 in the recipe)."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32 (default, as the official recipe) | bf16 (autocast, faster)"),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initial weights and every random draw (default 0)."),
        ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="Steps between checkpoints (the last step is always saved; the preset's by default: 5000 in the recipe)."),
        keep_every: Optional[int] = typer.Option(None, "--keep-every", help="Also keep checkpoints/step-NNNNNNN.pt every N steps (default 0: only last.pt), e.g. to sample and score along training."),
        log_every: Optional[int] = typer.Option(None, "--log-every", help="Steps between rows of log.csv (the preset's by default: 100 in the recipe)."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA if available) | cpu | cuda | cuda:N."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data-loading processes per rank (default 4: image decoding for on-the-fly latents, or latent-cache reads; may change on resume)."),
        compile_model: bool = typer.Option(False, "--compile", help="torch.compile the DiT (first steps slower)."),
        freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings", help="Keep the sin-cos positions and the time embedding's frequencies fixed (the official trainer trains them; runs from before this option resume only with it)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
    ) -> None:
        """Train DiT-DH on RAE latents (official recipe presets; resumable; torchrun for DDP)."""
        from raebench import distributed
        from raebench.cli import console
        from raebench.eval_config import resolve_device
        from raebench.stage2.train import preset as make_preset, train

        local = {"--weights": weights, "--decoder": decoder, "--stats": stats}
        if latents and (tokenizer or data or any(local.values())):
            given = " and ".join(f for f, v in (("--tokenizer", tokenizer), ("--data", data), *local.items()) if v)
            raise RaebenchError(f"--latents trains on the cached latents (their tokenizer, weights and images), so "
                                f"{given} would be ignored; give either --latents DIR or --tokenizer NAME --data DIR.")
        if not tokenizer and any(local.values()):
            given = " and ".join(f for f, v in local.items() if v)
            raise RaebenchError(f"{given} give the files of the --tokenizer that encodes --data on the fly; add "
                                "--tokenizer NAME (and --data DIR).")
        overrides = dict(out=str(out), latents=str(latents) if latents else None, tokenizer=tokenizer, data=data,
                         weights=weights, decoder=decoder, stats=stats,
                         resolution=resolution, num_classes=num_classes, global_batch=batch_size, grad_accum=grad_accum,
                         epochs=epochs, max_steps=max_steps, lr=lr, precision=precision, seed=seed,
                         ckpt_every=ckpt_every, keep_every=keep_every, log_every=log_every, compile=compile_model or None,
                         num_workers=num_workers, freeze_embeddings=freeze_embeddings or None)
        cfg = make_preset(preset, **{k: v for k, v in overrides.items() if v is not None})
        if dry_run:
            console.print_json(json.dumps(dataclasses.asdict(cfg)))
            return
        distributed.init(device)
        res = train(cfg, device=resolve_device(distributed.local_device(device)))
        if distributed.is_main():
            console.print(f"trained to step {res['step']}; checkpoint in {res['out']}/checkpoints/last.pt")
        distributed.finish()

    @app.command("sample")
    def sample_cmd(
        out: Path = typer.Option(..., "--out", "-o", help="ADM npz to write (arr_0 uint8 NHWC, arr_1 labels)."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A raebench stage-2 run folder or its checkpoint."),
        config: Optional[Path] = typer.Option(None, "--config", help="An official RAE YAML (stage_1 + stage_2 blocks)."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Decoder for --checkpoint (default: the run's)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="With --checkpoint: local weights file/folder for the tokenizer that decodes (as eval's)."),
        decoder: Optional[str] = typer.Option(None, "--decoder", help="With --checkpoint, RAE: a decoder checkpoint instead of the released one."),
        stats: Optional[str] = typer.Option(None, "--stats", help="With --checkpoint, RAE: latent statistics file (stat.pt)."),
        num: int = typer.Option(50_000, "--num", "-n", help="Number of samples."),
        label_sampling: str = typer.Option("equal", "--label-sampling", help="equal (exactly num/classes each) | random"),
        num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Sample labels 0 .. N-1 (default: every class of the model)."),
        cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Guidance scale (1: none; CFG, or AutoGuidance with --guide-checkpoint). Default: 1, or the YAML's."),
        cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="Guidance interval T_MIN,T_MAX in t (0: data, 1: noise), e.g. 0.2,0.9. Default: 0,1 (every step), or the YAML's."),
        guide_checkpoint: Optional[Path] = typer.Option(None, "--guide-checkpoint", help="AutoGuidance guide: a raebench stage-2 run folder or checkpoint (with --cfg-scale other than 1)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: 50, or the YAML's: 50 for ODE, 250 for SDE)."),
        method: Optional[str] = typer.Option(None, "--method", help="euler | heun | adaptive (dopri5) | euler-maruyama (sde) | sde-heun. Default: euler, or the YAML's sampler."),
        batch_size: int = typer.Option(32, "--batch-size", "-b", help="Samples per batch (per rank); with --seed it fixes the noise "
                                    "draws (another size: other samples; any number of ranks: the same)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the labels and of every noise draw."),
        grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a grid of the first 64 samples to this .png file."),
        quantize: str = typer.Option("round", "--quantize", help="uint8 conversion: round (x*255+0.5, as DiT) | "
                                     "truncate (x*255, as the official RAE sample_ddp.py, which it reproduces byte for byte)."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA if available) | cpu | cuda | cuda:N."),
        allow_tf32: bool = typer.Option(False, "--tf32", help="Allow TF32 on GPUs (faster; the official sample_ddp.py "
                                        "default); recorded with the samples. Default: full float32."),
    ) -> None:
        """Generate class-conditional samples for gFID (sharded over torchrun ranks, resumable)."""
        import torch

        from raebench import distributed
        from raebench.cli import console
        from raebench.eval_config import resolve_device
        from raebench.stage2.latents import build_tokenizer, weights_of
        from raebench.stage2.sample import class_labels, generate_npz, load_trained, save_grid, stage2_checkpoint
        from raebench.stage2.samplers import has_null_class, sample

        distributed.init(device)
        dev = resolve_device(distributed.local_device(device))

        def setup():
            # every argument is checked before a model loads
            if (checkpoint is None) == (config is None):
                raise RaebenchError("Give exactly one of --checkpoint (raebench run) or --config (official YAML).")
            if quantize not in ("round", "truncate"):
                raise RaebenchError(f"--quantize takes round or truncate, not {quantize!r}.")
            method_name = _method(method)
            interval = _interval(cfg_interval)
            _check_sampling_args(num, batch_size, steps, cfg_scale, num_classes, label_sampling, out, grid)
            if guide_checkpoint is not None and config is not None:
                raise RaebenchError("--guide-checkpoint goes with --checkpoint; an official YAML names its own guide.")
            local = {"--tokenizer": tokenizer, "--weights": weights, "--decoder": decoder, "--stats": stats}
            if config is not None and any(local.values()):
                given = ", ".join(f for f, v in local.items() if v)
                raise RaebenchError(f"{given} go with --checkpoint; an official YAML names its own tokenizer and weights "
                                    "(its stage_1 block).")
            if guide_checkpoint is not None and (cfg_scale is None or cfg_scale == 1.0):
                raise RaebenchError("--guide-checkpoint has no effect without --cfg-scale other than 1 (AutoGuidance "
                                    "strength); add e.g. --cfg-scale 1.5.")
            source = config if config is not None else stage2_checkpoint(checkpoint)
            guide_path = stage2_checkpoint(guide_checkpoint) if guide_checkpoint is not None else None
            settings = {"source": _file_id(source), "method": method_name, "steps": steps, "cfg_scale": cfg_scale,
                        "cfg_interval": list(interval) if interval else None,
                        "guide": _file_id(guide_path) if guide_path else None}
            if config is not None:
                from raebench.official import from_official_config

                obj = from_official_config(config, device=dev)
                obj.model.to(dev)
                tok, shape = obj.tokenizer, tuple(obj.latent_size)
                model_classes = obj.num_classes or obj.model.num_classes
                classes = _classes(num_classes, model_classes)
                settings.update(_official_settings(obj, method_name, steps, cfg_scale, interval))

                def sample_fn(noise, y):
                    return obj.sample(noise, y, num_steps=steps, method=method_name, cfg_scale=cfg_scale, cfg_interval=interval)
            else:
                model, info = load_trained(source)
                run = info["config"]
                classes = _classes(num_classes, run.num_classes)
                run_tok = run.tokenizer or _cache_tokenizer(run.latents)
                guide = None
                if guide_path is not None:
                    guide, g_info = load_trained(guide_path)
                    _check_guide(info, g_info, run_tok, guide_path)
                elif cfg_scale is not None and cfg_scale != 1.0 and not has_null_class(model):
                    raise RaebenchError(f"{str(source)!r} was trained without label dropout (class_dropout 0), so it has no "
                                        "null class and classifier-free guidance is impossible; sample without --cfg-scale.")
                name = tokenizer or run_tok
                if name is None:
                    raise RaebenchError("The run does not name its tokenizer; pass --tokenizer NAME to decode samples.")
                model.to(dev)
                guide = guide.to(dev) if guide is not None else None
                own = run_tok is not None and _canonical(name) == _canonical(run_tok)  # another one: at its released size
                tok = build_tokenizer(name, dev, _encoded_at(info) if own else None, weights, decoder, stats)
                shape = info["latent_shape"]
                _check_decoder(tok, name, run_tok, tuple(shape))
                _check_decoder_weights(tok, run_tok, (info.get("data") or {}).get("tokenizer_weights"))
                settings.update(tokenizer=name, tokenizer_weights=weights_of(tok),
                                method=method_name or "euler", steps=steps or 50,
                                cfg_scale=cfg_scale if cfg_scale is not None else 1.0,
                                cfg_interval=list(interval or (0.0, 1.0)))

                def sample_fn(noise, y):
                    return sample(model, noise, y, num_steps=steps or 50, method=method_name or "euler", shift=info["shift"],
                                  cfg_scale=cfg_scale if cfg_scale is not None else 1.0,
                                  cfg_interval=interval or (0.0, 1.0), guide=guide)

            return sample_fn, tok, shape, classes, settings

        # every rank checks and loads alike; an error stops all of them together, printed once
        sample_fn, tok, shape, classes, settings = distributed.on_every_rank(setup)
        labels = class_labels(num, classes, label_sampling, seed)
        if label_sampling == "equal" and num % classes and distributed.is_main():  # once, not per rank
            console.print(f"[yellow]{num} is not a multiple of {classes} classes: counts differ by one[/]")
        if allow_tf32:  # absent otherwise, so parts written before this option still resume
            settings["tf32"] = True
        from raebench.tf32 import tf32

        with torch.no_grad(), tf32(allow_tf32), progress_bar("sampling (batches of this rank)") as bar:
            generate_npz(sample_fn, tok.decode, out, labels, shape, batch_size, seed, dev, progress=bar, settings=settings,
                         quantize=quantize)
        if distributed.is_main():
            if grid is not None:
                from raebench.locks import exclusive
                from raebench.results import remove_orphan_temps

                with exclusive(out, "sampling job", "choose another --out"):  # the grid belongs to this job
                    remove_orphan_temps(grid.parent, of=grid.name)  # of a grid write killed earlier
                    save_grid(out, grid)
            console.print(f"{num} samples in {out}")
        distributed.finish()

    @app.command("cache-latents")
    def cache_latents_cmd(
        tokenizer: str = typer.Option(..., "--tokenizer", "-t", help="Tokenizer that encodes the images (raebench ls tokenizers)."),
        data: str = typer.Option(..., "--data", help="Image folder with one subfolder per class."),
        out: Path = typer.Option(..., "--out", "-o", help="Cache folder (latents.npy, labels.npy, meta.json)."),
        resolution: int = typer.Option(256, "--resolution", "-r", help="Image size the images are cropped to before encoding."),
        batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per batch (per rank)."),
        flip: bool = typer.Option(True, "--flip/--no-flip", help="Also store each image's horizontal flip."),
        dtype: str = typer.Option("float16", "--dtype", help="float16 (half the disk; latents rounded to ~5e-4 relative) | float32 (exact, as the official on-the-fly encoding)"),
        device: str = typer.Option("auto", "--device", help="auto (CUDA if available) | cpu | cuda | cuda:N."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file/folder for the tokenizer (as eval's; recorded in meta.json)."),
        decoder: Optional[str] = typer.Option(None, "--decoder", help="RAE: a decoder checkpoint instead of the released one (part of the weights recorded; `sample` decodes with it)."),
        stats: Optional[str] = typer.Option(None, "--stats", help="RAE: latent statistics file (stat.pt)."),
    ) -> None:
        """Encode a dataset once (plus flips) so stage-2 training does not pay the encoder every step."""
        from raebench.cli import console
        from raebench.eval_config import resolve_device
        from raebench.stage2.latents import build_tokenizer, cache_latents

        from raebench import distributed

        distributed.init(device)
        dev = resolve_device(distributed.local_device(device))
        tok = build_tokenizer(tokenizer, dev, resolution, weights, decoder, stats)
        with progress_bar("encoding (images of this rank)") as bar:
            path = cache_latents(tok, data, out, resolution, batch_size, flip, dtype, progress=bar)
        if distributed.is_main():
            import json

            gone = json.loads((path / "meta.json").read_text()).get("skipped") or []
            console.print(f"latent cache written to {path}" + (f" ({len(gone)} unreadable image(s) skipped, listed in "
                                                               "its meta.json)" if gone else ""))
        distributed.finish()


def _method(method: Optional[str]) -> Optional[str]:
    from raebench.stage2.samplers import METHODS, canonical_method

    if method is None:
        return None
    try:
        return canonical_method(method)
    except ValueError:
        raise RaebenchError(f"Unknown sampling --method {method!r}; choose one of {', '.join(METHODS)}.") from None


def _check_sampling_args(num: int, batch_size: int, steps: Optional[int], cfg_scale: Optional[float],
                         num_classes: Optional[int], label_sampling: str, out: Path, grid: Optional[Path]) -> None:
    """The sample command's numeric and path arguments; missing parent folders of --grid are created."""
    if num < 1:
        raise RaebenchError(f"--num must be at least 1, got {num}.")
    if batch_size < 1:
        raise RaebenchError(f"--batch-size must be at least 1, got {batch_size}.")
    if steps is not None and steps < 2:
        raise RaebenchError(f"--steps must be at least 2 (the points of the time grid), got {steps}.")
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise RaebenchError(f"--cfg-scale must be a finite number, got {cfg_scale}.")
    if num_classes is not None and num_classes < 1:
        raise RaebenchError(f"--num-classes must be at least 1, got {num_classes}.")
    if label_sampling not in ("equal", "random"):
        raise RaebenchError(f"--label-sampling must be 'equal' or 'random', got {label_sampling!r}.")
    if out.is_dir():
        raise RaebenchError(f"--out {str(out)!r} is a folder; give the .npz file to write (e.g. {out / 'samples.npz'}).")
    if out.suffix.lower() != ".npz":  # eval and score recognise sample files by this suffix
        raise RaebenchError(f"--out {str(out)!r} must end in .npz (e.g. {out.with_name(out.name + '.npz')}).")
    if grid is not None:
        if grid.is_dir():
            raise RaebenchError(f"--grid {str(grid)!r} is a folder; give the .png file to write.")
        if grid.suffix.lower() != ".png":  # else Pillow refuses it with a traceback after all the sampling
            raise RaebenchError(f"--grid {str(grid)!r} must end in .png (e.g. {grid.with_name(grid.name + '.png')}).")
        grid.parent.mkdir(parents=True, exist_ok=True)


def _classes(asked: Optional[int], trained: int) -> int:
    """Sample labels 0 .. asked - 1 (default: every class of the model); more classes than it knows are refused."""
    if asked is not None and asked > trained:
        raise RaebenchError(f"--num-classes {asked} is more than the {trained} classes the model was trained on "
                            f"(label {trained} is its null class); use at most {trained}.")
    return asked or trained


def _check_guide(info: dict, g_info: dict, run_tok: Optional[str], guide_path: Path) -> None:
    """An AutoGuidance guide must share the model's latent space and classes."""
    run, g_run = info["config"], g_info["config"]
    g_tok = g_run.tokenizer or _cache_tokenizer(g_run.latents)
    diff = []
    if tuple(g_info["latent_shape"]) != tuple(info["latent_shape"]):
        diff.append(f"latent shape {tuple(g_info['latent_shape'])} vs {tuple(info['latent_shape'])}")
    if g_run.num_classes != run.num_classes:
        diff.append(f"{g_run.num_classes} classes vs {run.num_classes}")
    if g_tok and run_tok and g_tok != run_tok:
        diff.append(f"tokenizer {g_tok} vs {run_tok}")
    if diff:
        raise RaebenchError(f"The guide {str(guide_path)!r} does not fit the model ({'; '.join(diff)}); a guide must be "
                            "trained on the same latents with the same classes.")


def _file_id(path: Path) -> str:
    """A file's name and content fingerprint (sha256 of every byte, cached): the same weights copied
    elsewhere are the same, retrained weights are not."""
    from raebench.metrics.extractors import fingerprint_path

    if not path.is_file():
        return str(path)  # its loader says what is wrong
    return f"{path.name}@{fingerprint_path(path)}"


def _official_settings(obj, method, steps, cfg_scale, interval) -> dict:
    """What an official YAML resolves to: the weights behind it and the sampler it runs (the YAML's
    own values where the command line gives none)."""
    s = obj.stage2[1] if isinstance(obj.stage2, tuple) else obj.stage2.sample
    out = {"model": getattr(obj.model, "weights_id", "unknown"), "tokenizer": getattr(obj.tokenizer, "weights_id", "none")}
    if hasattr(s, "num_steps"):  # an OfficialSampler
        out.update(method=method or s.method, steps=steps or s.num_steps,
                   cfg_scale=cfg_scale if cfg_scale is not None else s.cfg_scale,
                   cfg_interval=list(interval or s.cfg_interval))
        guide = getattr(s, "guide", None)
        if guide is not None:
            out["guide"] = getattr(guide, "weights_id", "from the YAML")
        if out["method"] in ("euler-maruyama", "sde-heun"):
            out.update(diffusion_form=s.diffusion_form, diffusion_norm=s.diffusion_norm, last_step=s.last_step,
                       last_step_size=s.last_step_size)
        elif out["method"] == "adaptive":
            out.update(atol=s.atol, rtol=s.rtol)
    return out


def _check_decoder(tok, name: str, run_tok: str | None, latent_shape: tuple) -> None:
    """A --tokenizer other than the run's must decode latents of the run's shape (else one
    sentence, before any sampling); another decoder that does is allowed, with a warning."""
    import torch

    dev = next(iter(tok.parameters()), torch.zeros(())).device
    try:
        with torch.no_grad():
            img = tok.decode(torch.zeros(1, *latent_shape, device=dev))
    except Exception as e:  # noqa: BLE001 - any failure here means the decoder does not fit
        raise RaebenchError(f"--tokenizer {name} cannot decode the model's latents of shape {latent_shape}"
                            f"{f' (trained on {run_tok})' if run_tok else ''}: {type(e).__name__}: {first_line(e)}") from None
    if img.ndim != 4 or img.shape[1] != 3:  # e.g. pixels "decodes" 32-channel latents into 32-channel images
        raise RaebenchError(f"--tokenizer {name} turns the model's latents of shape {latent_shape} into "
                            f"{tuple(img.shape[1:])}, not RGB images{f' (trained on {run_tok})' if run_tok else ''}; "
                            "decode with the tokenizer the model was trained on.")
    from raebench import distributed

    if run_tok and _canonical(name) != _canonical(run_tok) and distributed.is_main():  # once, not per rank
        log.warning("decoding with %s, but the model was trained on latents of %s", name, run_tok)


def _check_decoder_weights(tok, run_tok: Optional[str], trained_on: Optional[str]) -> None:
    """The run's tokenizer must decode with the weights that encoded its latents (``tokenizer_weights``
    recorded in the checkpoint, compared by content: :func:`~raebench.stage2.latents.same_weights`): other
    weights are a warning, as another --tokenizer is; a run of an older raebench records none (a
    one-line note). Said by rank 0 only: under torchrun every rank runs this check."""
    from raebench import distributed
    from raebench.stage2.latents import same_weights, weights_of

    if run_tok is None or tok.name != _canonical(run_tok) or not distributed.is_main():
        return  # another tokenizer altogether: _check_decoder has said so (other ranks: rank 0 says it once)
    now = weights_of(tok)
    if trained_on is None:
        log.info("the run does not record which weights of %s encoded its latents (an older raebench); decoding "
                 "with %s", tok.name, now)
    elif not same_weights(now, trained_on):
        log.warning("decoding with %s weights %s, but the model was trained on latents encoded with %s: the samples "
                    "decode latents with other weights than they were trained on (pass those with --weights, "
                    "--decoder or --stats)", tok.name, now, trained_on)


def _encoded_at(info: dict) -> Optional[int]:
    """The resolution the run's tokenizer was built at to encode its latents, so that the decoding one
    is built alike: the cache's or the run's image size when the run records the tokenizer's weights
    (raebench built it at that size since then); None (its released size) for older runs."""
    data, run = info.get("data") or {}, info["config"]
    if "tokenizer_weights" not in data:
        return None
    return data.get("resolution") if run.latents else run.resolution


def _canonical(name: str) -> str:
    """A tokenizer's registry name (a run records the name it was given, an alias too); unknown names as they are."""
    from raebench.tokenizers import get_tokenizer_spec

    try:
        return get_tokenizer_spec(name).name
    except RaebenchError:  # a name this raebench does not know
        return name


def _cache_tokenizer(latents: Optional[str]) -> Optional[str]:
    if not latents:
        return None
    meta = Path(latents) / "meta.json"
    return json.loads(meta.read_text()).get("tokenizer") if meta.is_file() else None


__all__ = ["register"]
