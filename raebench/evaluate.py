"""One-pass reconstruction evaluation: load -> encode -> decode -> every metric.

Per batch: uint8 originals (N, 3, R, R) -> float [0, 1] -> ``tokenizer.encode`` -> ``decode`` ->
per-image finiteness check -> clamp and round to uint8 (what a PNG of the reconstruction holds;
every metric sees 8-bit images, as external evaluators do) -> each requested feature extractor runs
once on originals and once on reconstructions -> every metric updates from the shared batch.

Images whose latents or reconstructions contain NaN/Inf are excluded from all metrics and counted
per tokenizer (``nonfinite`` in the rows), never averaged in. Unreadable files are skipped, counted
and listed. Rows are written only when the whole evaluation finished.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from raebench.data import ImageDataset, ResolvedData, Skip, iter_batches, make_loader, resolve_data, to_float, to_uint8
from raebench.errors import RaebenchError
from raebench.results import ResultRow, check_writable, new_run_id, write_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Everything that defines one evaluation run (the CLI flags, one to one)."""

    tokenizer: str
    metrics: tuple[str, ...] = ("psnr", "ssim")
    data: str | None = None
    dataset: str | None = None
    domain: str | None = None
    resolution: int = 256
    limit: int | None = None
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    precision: str = "fp32"  # or "bf16" (autocast around the tokenizer only; metrics stay fp32/64)
    num_workers: int = 0
    results_dir: str = "results"
    write: bool = True
    # tokenizer options, passed to its builder only when set
    weights: str | None = None
    decoder: str | None = None
    stats: str | None = None
    tokenizer_config: str | None = None


@dataclass
class EvalOutcome:
    rows: list[ResultRow]
    skipped: list[Skip] = field(default_factory=list)
    upscaled: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    seconds: float = 0.0
    n_images: int = 0


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RaebenchError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RaebenchError("--device cuda was asked for but this torch build sees no CUDA GPU; use --device cpu.")
    return dev


def build_tokenizer_from_config(cfg: EvalConfig, device: torch.device):
    """Build the tokenizer named in ``cfg`` with only the options the user set."""
    if cfg.tokenizer_config:
        from raebench.official import from_official_config  # noqa: PLC0415 (optional heavy import)

        tok = from_official_config(cfg.tokenizer_config).tokenizer
        return tok.to(device).eval()
    from raebench.tokenizers import get_tokenizer_spec

    spec = get_tokenizer_spec(cfg.tokenizer)
    opts = {k: getattr(cfg, k) for k in ("weights", "decoder", "stats") if getattr(cfg, k) is not None}
    params = inspect.signature(spec.builder).parameters
    accepts_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    bad = [k for k in opts if k not in params and not accepts_kw]
    if bad:
        flags = ", ".join(f"--{k}" for k in bad)
        raise RaebenchError(f"Tokenizer {spec.name!r} takes no {flags}.")
    if "resolution" in params:
        opts["resolution"] = cfg.resolution
    tok = spec.build(**opts)
    return tok.to(device).eval()


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise RaebenchError(f"Unknown precision {precision!r}; use fp32 or bf16.")


class Evaluator:
    """Builds metrics and shared extractors once; ``run`` streams a dataset through them."""

    def __init__(self, metric_names: tuple[str, ...], device: torch.device):
        from raebench.metrics import EXTRACTORS, METRICS

        self.device = device
        self.specs = [METRICS.get(m) for m in metric_names]
        self.metrics = [s.build() for s in self.specs]
        names = sorted({e for s in self.specs for e in s.extractors})
        self.extractors = {n: EXTRACTORS.get(n).builder(device=device) for n in names}

    def update(self, ref_u8: torch.Tensor, rec_u8: torch.Tensor) -> None:
        from raebench.metrics import MetricBatch

        feats = {n: (ex(ref_u8), ex(rec_u8)) for n, ex in self.extractors.items()}
        batch = MetricBatch(reference=ref_u8, candidate=rec_u8, features=feats)
        for m in self.metrics:
            m.update(batch)

    def compute(self) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
        """-> (values by result name, metric version by result name, notes by result name)."""
        values, versions, notes = {}, {}, {}
        for spec, m in zip(self.specs, self.metrics):
            out = m.compute()
            for k, v in out.items():
                values[k] = float(v)
                versions[k] = spec.version
                notes[k] = "; ".join(m.notes)
        return values, versions, notes


def evaluate(
    cfg: EvalConfig,
    tokenizer=None,
    on_progress: Callable[[int, int], None] | None = None,
    data: ResolvedData | None = None,
) -> EvalOutcome:
    """Run one evaluation; writes rows to ``cfg.results_dir`` when ``cfg.write``.

    ``on_progress(done_images, total_images)`` is called after each batch (the CLI draws a bar).
    """
    from raebench.metrics import higher_is_better

    t0 = time.perf_counter()
    if cfg.write:
        check_writable(cfg.results_dir)
    data = data or resolve_data(cfg.data, cfg.dataset, cfg.limit, cfg.seed, cfg.domain)
    device = resolve_device(cfg.device)
    tok = tokenizer if tokenizer is not None else build_tokenizer_from_config(cfg, device)
    ev = Evaluator(tuple(cfg.metrics), device)

    ds = ImageDataset(data.images, cfg.resolution)
    loader = make_loader(ds, cfg.batch_size, cfg.num_workers, pin_memory=device.type == "cuda")
    skipped = list(data.images.skipped)
    upscaled: list[str] = []
    nonfinite: list[str] = []
    done = n_used = 0
    for batch in loader:
        skipped.extend(batch["skipped"])
        upscaled.extend(batch["upscaled"])
        done += len(batch["skipped"]) + batch["image"].shape[0]
        if batch["image"].shape[0]:
            ref = batch["image"].to(device, non_blocking=True)  # (N, 3, R, R) uint8
            with torch.no_grad(), _autocast(device, cfg.precision):
                z = tok.encode(to_float(ref))
                rec = tok.decode(z)
            z, rec = z.float(), rec.float()
            ok = torch.isfinite(z.flatten(1)).all(1) & torch.isfinite(rec.flatten(1)).all(1)  # (N,)
            if not bool(ok.all()):
                bad = (~ok).nonzero().flatten().tolist()
                nonfinite.extend(batch["path"][i] for i in bad)
                log.warning("%s: %d image(s) with NaN/Inf latents or reconstructions excluded", tok.name, len(bad))
            if bool(ok.any()):
                ev.update(ref[ok], to_uint8(rec[ok]))
                n_used += int(ok.sum())
        if on_progress:
            on_progress(done, data.n)
    if n_used == 0:
        reason = "no image was readable" if not nonfinite else "every reconstruction contained NaN/Inf"
        raise RaebenchError(f"Nothing to evaluate for {tok.name!r} on {data.name!r}: {reason} ({len(skipped)} skipped).")
    if upscaled:
        log.warning("%d image(s) were smaller than %d px and were upscaled by the crop", len(upscaled), cfg.resolution)
    values, versions, notes = ev.compute()
    seconds = time.perf_counter() - t0
    run_id = new_run_id()
    rows = [
        ResultRow(
            tokenizer=tok.name,
            weights_id=getattr(tok, "weights_id", "none"),
            dataset=data.name,
            split=data.split,
            domain=data.domain,
            resolution=cfg.resolution,
            n_images=n_used,
            metric=name,
            value=value,
            higher_is_better=higher_is_better(name),
            metric_version=versions[name],
            seed=cfg.seed,
            data_fingerprint=data.images.fingerprint(),
            skipped=len(skipped),
            nonfinite=len(nonfinite),
            seconds=round(seconds, 3),
            device=str(device),
            notes=notes[name],
            run_id=run_id,
            extra={
                "skipped_files": [f"{s.path}: {s.reason}" for s in skipped][:1000],
                "upscaled": len(upscaled),
                "nonfinite_files": nonfinite[:1000],
                "precision": cfg.precision,
                "limit": cfg.limit,
            },
        )
        for name, value in values.items()
    ]
    if cfg.write:
        write_rows(rows, cfg.results_dir, run_id)
    return EvalOutcome(rows, skipped, upscaled, nonfinite, seconds, n_used)


def with_metrics(cfg: EvalConfig, metrics: tuple[str, ...]) -> EvalConfig:
    return replace(cfg, metrics=metrics)
