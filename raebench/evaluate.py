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

import difflib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raebench import distributed
from raebench.distributed import rank_world, shard
from raebench.data import ImageDataset, ResolvedData, Skip, default_workers, make_loader, resolve_data, to_float, to_uint8
from raebench.checks import check_domain, check_image_counts, check_run
from raebench.errors import RaebenchError
from raebench.eval_progress import WorkState
from raebench.preempt import STOP_SIGNALS, Preempted, StopOnSignal, of_rank
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
    num_workers: int | None = None  # None: 0 on CPU (workers would compete with the model), else min(8, cores)
    results_dir: str = "results"
    write: bool = True
    # tokenizer options, passed to its builder only when set
    weights: str | None = None
    decoder: str | None = None
    stats: str | None = None
    tokenizer_config: str | None = None
    # metric/extractor options "NAME.KEY=VALUE" (None: $RAEBENCH_METRIC_OPTIONS)
    metric_options: tuple[str, ...] | None = None


@dataclass
class EvalOutcome:
    rows: list[ResultRow]
    skipped: list[Skip] = field(default_factory=list)
    upscaled: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    seconds: float = 0.0
    n_images: int = 0
    #: metric -> why it has no row (too few usable images left after unreadable or NaN ones)
    failed: dict[str, str] = field(default_factory=dict)


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


def check_config(cfg: EvalConfig) -> None:
    """Flags that cannot work, as one sentence before any data is read or any model loads."""
    check_run(cfg.batch_size, cfg.resolution, cfg.precision, cfg.num_workers, tuple(cfg.metrics))
    check_domain(cfg.domain)


def check_data_counts(cfg: EvalConfig, data: ResolvedData) -> None:
    """Every metric of ``cfg`` has enough images in ``data`` (originals and reconstructions alike)."""
    name = f"the data {data.name!r}" + (f" (--limit {cfg.limit})" if cfg.limit is not None else "")
    check_image_counts(tuple(cfg.metrics), data.n, data.n, where=(name, name))


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
    """The tokenizer's precision: "fp32" is full float32 (TF32 off, also for cuDNN convolutions, which
    PyTorch lets use TF32 by default), "bf16" is autocast."""
    from raebench.tf32 import tf32

    if precision == "fp32":
        return tf32(False)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise RaebenchError(f"Unknown precision {precision!r}; use fp32 or bf16.")


@dataclass(frozen=True)
class ReferenceSet:
    """Identity of the reference images, for the feature cache: ``id`` covers the image list, the
    crop and the resolution (``<fingerprint>|adm-center-crop@256``); rows are indexed 0..n-1."""

    id: str
    n: int


def parse_options(items: list[str] | tuple[str, ...] | str | None) -> dict[str, dict[str, str]]:
    """``["inception.dtype=float64", "lpips-vgg.weights=/w/vgg16.pth"]`` (or one comma-separated
    string) -> ``{"inception": {"dtype": "float64"}, "lpips-vgg": {"weights": ...}}``."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, _, value = item.partition("=")
        target, _, key = name.strip().rpartition(".")
        if not target or not key or not _:
            raise RaebenchError(f"Metric option {item!r} is not NAME.KEY=VALUE (e.g. inception.dtype=float64).")
        out.setdefault(target, {})[key] = value.strip()
    return out


@dataclass
class Planned:
    """What rows measured now would record, found without loading any network (:func:`planned`)."""

    versions: dict  # result name (kid-std included) -> metric version (base + option variants)
    weights: dict  # network key (extractor or metric name) -> identity as ``extra.metric_weights`` records it; None: unresolved
    keys: dict  # result name -> the network keys behind it
    missing: dict  # network key -> the MissingWeightsError sentence of weights that cannot be found

    def row_matches(self, metric: str, version: str, extra) -> bool:
        """Whether a stored row of ``metric`` was measured as a row made now would be: the same version
        and, for every network whose weights resolve here, the same weights (rows record them in
        ``extra.metric_weights``; a row without them does not match)."""
        if self.versions.get(metric) != version:
            return False
        recorded = (extra or {}).get("metric_weights") if isinstance(extra, dict) else None
        for key in self.keys.get(metric, ()):
            want = self.weights.get(key)
            if want is not None and (not isinstance(recorded, dict) or recorded.get(key) != want):
                return False
        return True


def planned(metric_names, options: dict | None = None) -> Planned:
    """The versions and network weights of ``metric_names`` under ``options`` (default
    ``$RAEBENCH_METRIC_OPTIONS``), resolved from the specs and weight files only: reuse (compare) and
    resume (eval) decide with it before, or without, loading a network. Weights that cannot be found
    here are None (not compared)."""
    from raebench.errors import MissingWeightsError
    from raebench.metrics import EXTRACTORS, METRICS
    from raebench.metrics.extractors import fingerprint_path

    options = parse_options(os.environ.get("RAEBENCH_METRIC_OPTIONS")) if options is None else options
    versions, weights, keys, missing = {}, {}, {}, {}

    def fingerprint(key: str, resolver, prefix: str = "", identity=fingerprint_path) -> None:
        if key in weights:
            return
        try:  # resolved (found or fetched), not loaded; None: to be downloaded when the network is built
            path = resolver(options.get(key, {}).get("weights"))
            weights[key] = None if path is None else prefix + identity(path)
        except MissingWeightsError as e:
            weights[key], missing[key] = None, str(e)

    for m in dict.fromkeys(metric_names):
        spec = METRICS.get(m)
        variants, mine = [], []
        for e in spec.extractors:
            es = EXTRACTORS.get(e)
            variant = es.variant_of(**options.get(e, {})) if es.variant_of else ""
            if variant:
                variants.append(variant)
            if es.weights_path is not None:  # an extractor records version|variant|weights=fingerprint
                fingerprint(e, es.weights_path, f"{es.version}|{variant}|weights=")
            mine.append(e)
        if spec.weights_path is not None:
            fingerprint(spec.name, spec.weights_path, identity=spec.weights_identity)
            mine.append(spec.name)
        for name in (spec.name, *(o for o, _ in spec.outputs)):
            versions[name], keys[name] = "+".join([spec.version, *variants]), tuple(mine)
    return Planned(versions, weights, keys, missing)


def _raise_missing(missing: list[str]) -> None:
    from raebench.errors import MissingWeightsError

    if len(missing) == 1:
        raise MissingWeightsError(missing[0])
    if missing:
        raise MissingWeightsError(f"{len(missing)} metric weights are missing: " +
                                  " ".join(f"({i}) {m}" for i, m in enumerate(missing, 1)))


def check_option_values(spec, opts: dict[str, str]) -> None:
    """The values of one metric's or extractor's options, before anything loads: a fixed set where the
    spec lists one, a torch device string for ``device``, a non-empty path for ``weights``."""
    choices = dict(spec.option_choices)
    for key, value in opts.items():
        if key in choices and value not in choices[key]:
            raise RaebenchError(f"Option {spec.name}.{key}={value}: {key} takes {' or '.join(choices[key])}.")
        if key == "device":
            try:
                torch.device(value)
            except (RuntimeError, TypeError, ValueError):
                raise RaebenchError(f"Option {spec.name}.device={value}: not a device (cpu, cuda, cuda:N, mps).") from None
        if key == "weights" and not str(value).strip():
            raise RaebenchError(f"Option {spec.name}.weights is empty; give the weights file or folder.")


def check_options(options: dict[str, dict[str, str]]) -> None:
    """Metric/extractor options (:func:`parse_options`) name known networks, keys and values: one sentence
    before anything loads (also where every row asked for is stored and nothing is built)."""
    from raebench.metrics import EXTRACTORS, METRICS

    for target, opts in options.items():
        if target not in METRICS and target not in EXTRACTORS:
            names = METRICS.names() + EXTRACTORS.names()
            close = difflib.get_close_matches(target, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RaebenchError(f"Option {target}.{next(iter(opts))}: no metric or extractor is named {target!r}.{hint} "
                                f"Extractors: {', '.join(EXTRACTORS.names())}.")
        spec = METRICS.get(target) if target in METRICS else EXTRACTORS.get(target)
        # keys and values are checked for every named target: a typo is an error even in a run that
        # does not use that network (the options of metrics not requested now are then ignored, as one
        # env var serves many runs)
        allowed = spec.options  # "device" only where listed: extractors always get the evaluation device
        bad = sorted(set(opts) - set(allowed))
        if bad:
            raise RaebenchError(f"{target} takes no option {', '.join(bad)}; it takes {', '.join(allowed) or 'none'}.")
        check_option_values(spec, opts)


class Evaluator:
    """Builds the metrics and the extractors they share; streams batches through them.

    Each extractor runs once per image and side; its outputs feed every metric that reads them.
    Reference-side features come from the on-disk cache when ``reference`` identifies the set and
    a cached copy exists (then the reference images are not run through the extractor), and are
    written to it at :meth:`finish` when this run saw every reference image.

    ``options`` (``{"inception": {"dtype": "float64"}, "lpips-vgg": {"weights": PATH}}``, default:
    ``$RAEBENCH_METRIC_OPTIONS``) go to extractor and metric builders; unknown keys are errors.
    """

    def __init__(
        self,
        metric_names: tuple[str, ...],
        device: torch.device,
        *,
        options: dict[str, dict[str, str]] | None = None,
        reference: ReferenceSet | None = None,
        cache=None,
    ):
        from raebench.metrics import METRICS
        from raebench.metrics.cache import FeatureCache

        self.device = torch.device(device)
        self.options = parse_options(os.environ.get("RAEBENCH_METRIC_OPTIONS")) if options is None else options
        self.specs = [METRICS.get(m) for m in dict.fromkeys(metric_names)]
        check_options(self.options)
        # which outputs of which extractor each side needs
        self.ref_needs: dict[str, set[str]] = {}
        self.cand_needs: dict[str, set[str]] = {}
        for s in self.specs:
            for side, inputs in ((self.ref_needs, s.reference_inputs), (self.cand_needs, s.candidate_inputs)):
                for item in inputs:
                    ext, out = item.split("/")
                    side.setdefault(ext, set()).add(out)
        self.metrics = self._build_all()
        self._extractors: dict = {}
        self.reference = reference
        self.cache = (FeatureCache() if cache is None else cache) if reference is not None else None
        self._ref_cached: dict[str, dict[str, np.ndarray]] = {}  # extractor -> output -> (N, D) memory map
        self._ref_writers: dict[tuple[str, str], object] = {}  # (extractor, output) -> CacheWriter or None
        self.failed: dict[str, str] = {}  # metric -> why compute() could not give it a value

    # -- building ---------------------------------------------------------------------------------

    def _build_all(self) -> list:
        """Every metric; if some lack their weights, one error names those and every extractor's missing
        weights too, not one per run (LPIPS, then DreamSim, then DINOv2, ...)."""
        from raebench.errors import MissingWeightsError

        metrics, missing = [], {}
        for s in self.specs:
            try:
                metrics.append(self._build_metric(s))
            except MissingWeightsError as e:
                missing[s.name] = str(e)
        if missing:
            _raise_missing([m for _, m in sorted({**self.planned().missing, **missing}.items())])
        return metrics

    def planned(self) -> "Planned":
        """:func:`planned` for these metrics and options (weights resolved, no network loaded)."""
        return planned(tuple(s.name for s in self.specs), self.options)

    def check_weights(self, plan: "Planned | None" = None) -> None:
        """Every metric network's weights present (or fetched) before the pass: all missing ones in one
        error, at start-up, not at the first batch."""
        _raise_missing([m for _, m in sorted((plan or self.planned()).missing.items())])

    def _build_metric(self, spec):
        opts = dict(self.options.get(spec.name, {}))
        if "device" in spec.options:
            opts.setdefault("device", self.device)
        return spec.build(**opts)

    def extractor(self, name: str):
        """The extractor ``name``, built on first use with every output some metric reads."""
        from raebench.metrics import EXTRACTORS
        from raebench.metrics.base import shared_network

        if name not in self._extractors:
            outputs = tuple(sorted(self.ref_needs.get(name, set()) | self.cand_needs.get(name, set())))
            opts = self.options.get(name, {})
            key = ("extractor", name, outputs, tuple(sorted(opts.items())), str(self.device))
            self._extractors[name] = shared_network(
                key, lambda: EXTRACTORS.get(name).builder(device=self.device, outputs=outputs, **opts))
        return self._extractors[name]

    def set_reference_stats(self, stats: dict) -> None:
        """Use stored reference statistics (an ADM reference batch's ``mu``/``sigma``,
        ``mu_s``/``sigma_s``) for every metric that can; the others keep needing reference features."""
        self.ref_needs = {}
        for spec, m in zip(self.specs, self.metrics):
            keys = m.reference_stats_keys
            if keys and all(k in stats for k in keys):
                m.set_reference_stats({k: stats[k] for k in keys})
                continue
            for item in spec.reference_inputs:  # still needed by a metric the statistics do not serve
                ext, out = item.split("/")
                self.ref_needs.setdefault(ext, set()).add(out)

    @property
    def needs_reference_features(self) -> bool:
        """False when every reference-side input comes from stored statistics or the cache."""
        self._load_cache()
        return any(e not in self._ref_cached for e in self.ref_needs)

    def _load_cache(self) -> None:
        if self.cache is None or getattr(self, "_cache_checked", False):
            return
        self._cache_checked = True
        for ext, outs in self.ref_needs.items():
            arrs = {o: self.cache.load(self._cache_key(ext, o), self.reference.n) for o in outs}
            if all(a is not None for a in arrs.values()):
                self._ref_cached[ext] = arrs
                log.info("reference %s features read from the cache", ext)

    def _cache_key(self, ext: str, output: str) -> str:
        return self.cache.key(self.reference.id, self.extractor(ext).identity, output)

    # -- streaming --------------------------------------------------------------------------------

    def _reference_features(self, ref_u8, index, keep) -> dict:
        """{extractor: {output: (n_kept, D)}} for the reference rows, from the cache or extracted."""
        self._load_cache()
        feats = {}
        for ext, outs in self.ref_needs.items():
            if ext in self._ref_cached and index is not None:
                idx = (index if keep is None else index[keep.cpu()]).cpu().numpy()
                feats[ext] = {o: torch.from_numpy(np.asarray(self._ref_cached[ext][o][idx])) for o in outs}
                continue
            if ref_u8 is None:
                continue
            f = self.extractor(ext)(ref_u8)
            if self.cache is not None and index is not None:  # every row, kept or not, goes to the cache
                for o in outs:
                    if (ext, o) not in self._ref_writers:  # None: the cache cannot take it (warned once)
                        self._ref_writers[(ext, o)] = self.cache.writer(self._cache_key(ext, o), self.reference.n, f[o].shape[1])
                    w = self._ref_writers[(ext, o)]
                    if w is not None:
                        w.write(index.cpu().numpy(), f[o].cpu().numpy())
            feats[ext] = f if keep is None else {o: v[keep.to(v.device)] for o, v in f.items()}
        return feats

    def _dispatch(self, ref_u8, cand_u8, ref_feats: dict, cand_feats: dict) -> None:
        from raebench.metrics import MetricBatch

        names = set(ref_feats) | set(cand_feats)
        feats = {n: (ref_feats.get(n), cand_feats.get(n)) for n in names}
        batch = MetricBatch(reference=ref_u8, candidate=cand_u8, features=feats)
        for spec, m in zip(self.specs, self.metrics):
            if spec.kind == "paired" and (ref_u8 is None or cand_u8 is None):
                raise RaebenchError(f"{spec.name} is a paired metric: it needs references and candidates image by image.")
            m.update(batch)

    def _candidate_features(self, cand_u8) -> dict:
        return {ext: self.extractor(ext)(cand_u8) for ext in self.cand_needs}

    def update(self, ref_u8: torch.Tensor, cand_u8: torch.Tensor, index: torch.Tensor | None = None,
               keep: torch.Tensor | None = None) -> None:
        """A paired batch: uint8 (N, 3, H, W) references and their candidates, row by row.

        ``index``: the references' positions in the reference set (for the feature cache).
        ``keep``: (N,) bool; rows that are False are left out of every metric (e.g. NaN
        reconstructions) and ``cand_u8`` holds only the kept rows, in order. The reference
        extractor still sees all N rows, so the cache stays complete.
        """
        if keep is not None and bool(keep.all()):
            keep = None
        ref_feats = self._reference_features(ref_u8, index, keep)
        ref_kept = ref_u8 if keep is None else ref_u8[keep.to(ref_u8.device)]
        if ref_kept.shape[0] == 0:
            return
        self._dispatch(ref_kept, cand_u8, ref_feats, self._candidate_features(cand_u8))

    def update_reference(self, ref_u8: torch.Tensor | None, index: torch.Tensor | None = None) -> None:
        """An unpaired batch of references (distribution metrics only)."""
        feats = self._reference_features(ref_u8, index, None)
        if feats:
            self._dispatch(None, None, feats, {})

    def update_candidates(self, cand_u8: torch.Tensor) -> None:
        """An unpaired batch of candidates (distribution metrics only)."""
        self._dispatch(None, cand_u8, {}, self._candidate_features(cand_u8))

    def references_from_cache(self, chunk: int = 4096) -> bool:
        """Feed every cached reference feature to the metrics (unpaired scoring) in chunks of ``chunk``
        rows; False, and nothing fed, unless the cache holds all that the metrics need. Chunks of the
        run's batch size give the numbers of a run that extracted them, bit for bit (Fréchet sums are
        taken about the first chunk's mean)."""
        if self.needs_reference_features or not self._ref_cached:
            return False
        for start in range(0, self.reference.n, chunk):
            idx = slice(start, min(start + chunk, self.reference.n))
            # a copy: the cache is memory-mapped read-only, and a tensor over it would fault on any
            # in-place use (torch warns "not writable" at every score that reads a reference cache)
            feats = {e: {o: torch.from_numpy(np.array(a[idx])) for o, a in outs.items()} for e, outs in self._ref_cached.items()}
            self._dispatch(None, None, feats, {})
        return True

    def finish(self) -> None:
        """Publish the reference features written to the cache if this run extracted all of them
        (not after a resume or on one shard of several); otherwise drop the partial files."""
        for (ext, o), w in self._ref_writers.items():
            if w is None:
                continue
            meta = {"reference": self.reference.id, "extractor": self.extractor(ext).identity, "output": o}
            if not w.commit(meta):
                log.debug("reference %s/%s features not cached: this run did not see every image", ext, o)
        self._ref_writers.clear()

    # -- results ----------------------------------------------------------------------------------

    def states(self) -> list[dict]:
        """Every metric's accumulator state, in metric order (for a resume file or another rank)."""
        return [m.state() for m in self.metrics]

    def merge(self, states: list[dict]) -> None:
        """Add ``states()`` of another shard, rank or saved run (a fresh evaluator + merge = restore)."""
        for m, st in zip(self.metrics, states):
            m.merge(st)

    def version_of(self, spec) -> str:
        """The metric's version plus the non-default variants of the extractors it reads (built here
        if this process never ran them, e.g. after a resume or a merge of shards)."""
        variants = [self.extractor(e).variant for e in spec.extractors if self.extractor(e).variant]
        return "+".join([spec.version, *variants])

    def weights_ids(self) -> dict[str, str]:
        """Identity of every network's weights used by the metrics, for the result rows."""
        out = {e: self.extractor(e).identity for s in self.specs for e in s.extractors}
        for spec, m in zip(self.specs, self.metrics):
            if getattr(m, "weights_id", None):
                out[spec.name] = m.weights_id
        return out

    def _nonfinite_cause(self, spec, m) -> str:
        """Why ``m``'s accumulated features or per-image scores hold NaN/Inf ("" when they do not):
        the images are uint8, so it is the network, usually its weights; named with its file."""
        if not _nonfinite_count(m.state()):
            return ""
        nets = []
        for e in spec.extractors:
            path = getattr(self.extractor(e), "weights_path", None)
            nets.append(f"{e} ({str(path)!r})" if path else e)
        if not nets and getattr(m, "weights_id", None):
            nets.append(f"{spec.name} (weights {m.weights_id})")
        return (f"NaN: the features or scores of {' and '.join(nets) or spec.name} hold NaN/Inf "
                "(from 8-bit images: its network's weights are at fault; check that file)")

    def compute(self) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
        """-> (values by result name, metric version by result name, notes by result name).

        A metric left with too few images (unreadable files, NaN reconstructions) gives no value;
        ``self.failed`` then says why, and the other metrics are still computed."""
        from raebench.metrics.base import TooFewImagesError

        values, versions, notes = {}, {}, {}
        self.failed = {}
        for spec, m in zip(self.specs, self.metrics):
            why = self._nonfinite_cause(spec, m)
            if why:  # NaN with the cause, never a number computed from NaN/Inf features
                log.warning("%s: %s", spec.name, why)
                for k in (spec.name, *(o for o, _ in spec.outputs)):
                    values[k], versions[k], notes[k] = float("nan"), self.version_of(spec), why
                continue
            try:
                out = m.compute()
            except TooFewImagesError as e:
                self.failed[spec.name] = str(e)
                log.warning("%s is not computed: %s", spec.name, e)
                continue
            for k, v in out.items():
                values[k] = float(v)
                versions[k] = self.version_of(spec)
                notes[k] = "; ".join(m.notes)
        return values, versions, notes


def _nonfinite_count(x) -> int:
    """NaN/Inf entries in a metric state (tensors, numbers, nested lists and dicts)."""
    if isinstance(x, torch.Tensor):
        return int(x.numel() - torch.isfinite(x).sum()) if x.is_floating_point() else 0
    if isinstance(x, float):
        return int(not np.isfinite(x))
    if isinstance(x, dict):
        return sum(_nonfinite_count(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nonfinite_count(v) for v in x)
    return 0


def _metric_options(cfg: EvalConfig) -> dict[str, dict[str, str]] | None:
    return None if cfg.metric_options is None else parse_options(list(cfg.metric_options))


def _content_id(path: str | None) -> str | None:
    """A local weights path by its content (moving a folder keeps the progress made with it); a Hub
    repo id, or a path not found (its loader says so), as given."""
    from raebench.metrics.extractors import fingerprint_path

    return fingerprint_path(path) if path is not None and Path(path).exists() else path


def _run_key(cfg: EvalConfig, data: ResolvedData, tok, metric_versions: list[str]) -> str:
    """Identity of an evaluation for resuming: everything that changes a number, nothing that
    doesn't (batch size, workers and device may change between the crash and the re-run)."""
    from raebench.eval_progress import work_key

    return work_key({
        "tokenizer": tok.name, "weights": getattr(tok, "weights_id", "none"), "config": cfg.tokenizer_config,
        "data": data.images.fingerprint(), "dataset": data.name, "resolution": cfg.resolution, "seed": data.seed_of(cfg.seed),
        "metrics": sorted(metric_versions), "precision": cfg.precision,
        "opts": [_content_id(p) for p in (cfg.weights, cfg.decoder, cfg.stats)],
        "metric_options": sorted(cfg.metric_options or ()) or os.environ.get("RAEBENCH_METRIC_OPTIONS", ""),
    })


def resume_key(cfg: EvalConfig, data: ResolvedData, tok, plan: Planned) -> str:
    """The ``results/.work`` folder name of this evaluation's resume state (:func:`_run_key`)."""
    # options and the metric networks' weights are in the key: progress made with other ones is not resumed
    return _run_key(cfg, data, tok, sorted(set(plan.versions.values())) + [json.dumps(plan.weights, sort_keys=True)])


def evaluate(
    cfg: EvalConfig,
    tokenizer=None,
    on_progress: Callable[[int, int], None] | None = None,
    data: ResolvedData | None = None,
    save_every: int = 20,
) -> EvalOutcome:
    """Run one evaluation; writes rows to ``cfg.results_dir`` when ``cfg.write``.

    Under torchrun (an initialised process group) each rank takes a contiguous shard and the
    metric states are merged exactly on rank 0, which alone writes rows. Progress is saved every
    ``save_every`` batches; re-running the same evaluation after a crash continues from there and
    gives the same numbers. ``on_progress(done_images, total_images)`` is called after each batch
    (this rank's shard).
    """
    import torch.distributed as td

    from raebench.metrics import higher_is_better

    t0 = time.perf_counter()
    rank, world = rank_world()
    check_config(cfg)
    if cfg.write:
        check_writable(cfg.results_dir)
    data = data or resolve_data(cfg.data, cfg.dataset, cfg.limit, cfg.seed, cfg.domain)
    check_data_counts(cfg, data)
    device = resolve_device(cfg.device)
    tok = tokenizer if tokenizer is not None else build_tokenizer_from_config(cfg, device)
    reference = ReferenceSet(f"{data.images.fingerprint()}|adm-center-crop@{cfg.resolution}", data.n)
    ev = Evaluator(tuple(cfg.metrics), device, reference=reference, options=_metric_options(cfg))
    plan = ev.planned()  # weights resolved once: checked here, and part of the resume key below
    ev.check_weights(plan)

    lo, hi = shard(data.n, rank, world)
    work = WorkState(cfg.results_dir, resume_key(cfg, data, tok, plan), rank) if cfg.write else None
    skipped: list[Skip] = list(data.images.skipped) if rank == 0 else []
    upscaled: list[str] = []
    nonfinite: list[str] = []
    done = n_used = 0
    # the run's identity is kept in its resume state: a job killed after writing its rows but before
    # removing that state rewrites the same run file when resumed, instead of adding a duplicate run
    run_id = new_run_id()
    if work is not None:
        try:
            work.acquire()
            busy = None
        except RaebenchError as e:  # another job evaluates this configuration (holds this rank's progress)
            busy = str(e)
        if world > 1:  # one verdict for the job: any rank's progress busy stops every rank, rank 0 says so once
            busy = next((m for m in distributed.gather_to_rank0(busy) or [] if m), None)
        try:
            distributed.refuse(busy)
        except RaebenchError:
            work.release(remove=False)
            raise
        st = work.load()
        if st is not None and st.get("shard") == [lo, hi] and len(st["metrics"]) == len(ev.metrics):
            ev.merge(st["metrics"])
            done, n_used = st["done"], st["n_used"]
            skipped = [Skip(p, r) for p, r in st["skipped"]]
            upscaled, nonfinite = list(st["upscaled"]), list(st["nonfinite"])
            t0 -= float(st.get("seconds", 0.0))  # the row's seconds count the work before the crash too
            run_id = str(st.get("run_id", run_id))
            log.info("resuming %s on %s: %d of %d images already evaluated", tok.name, data.name, done, hi - lo)

    def checkpoint() -> None:
        if work is not None:
            work.save({
                "shard": [lo, hi], "done": done, "n_used": n_used, "metrics": ev.states(),
                "skipped": [(s.path, s.reason) for s in skipped], "upscaled": upscaled, "nonfinite": nonfinite,
                "seconds": time.perf_counter() - t0, "run_id": run_id,
            })

    ds = ImageDataset(data.images, cfg.resolution)
    workers = default_workers(cfg.num_workers, device)
    loader = make_loader(ds, cfg.batch_size, workers, pin_memory=device.type == "cuda",
                         indices=range(lo + done, hi))
    try:  # the stop signals only set a flag, read after each batch (only where there is progress to save)
        with StopOnSignal(STOP_SIGNALS if work is not None else ()) as preempt:
            for i, batch in enumerate(loader):
                skipped.extend(batch["skipped"])
                upscaled.extend(batch["upscaled"])
                if batch["image"].shape[0]:
                    ref = batch["image"].to(device, non_blocking=True)  # (N, 3, R, R) uint8
                    with torch.no_grad(), _autocast(device, cfg.precision):
                        z = tok.encode(to_float(ref))
                        rec = tok.decode(z)
                    z, rec = z.float(), rec.float()
                    if rec.shape != ref.shape:
                        raise RaebenchError(
                            f"{tok.name} reconstructs {tuple(ref.shape[-2:])} inputs as {tuple(rec.shape[-2:])} images; "
                            f"its input size is fixed, so pass --resolution {rec.shape[-1]} (or a tokenizer built for "
                            f"{ref.shape[-1]} px).")
                    ok = torch.isfinite(z.flatten(1)).all(1) & torch.isfinite(rec.flatten(1)).all(1)  # (N,)
                    if not bool(ok.all()):
                        bad = (~ok).nonzero().flatten().tolist()
                        nonfinite.extend(batch["path"][j] for j in bad)
                        log.warning("%s: %d image(s) with NaN/Inf latents or reconstructions excluded", tok.name, len(bad))
                    # every original goes to the reference extractors (for the feature cache); only the
                    # finite reconstructions and their originals reach the metrics
                    ev.update(ref, to_uint8(rec[ok]), index=batch["index"], keep=ok)
                    n_used += int(ok.sum())
                done += len(batch["skipped"]) + batch["image"].shape[0]
                if on_progress:
                    on_progress(done, hi - lo)
                signum = preempt.local()  # SIGTERM/SIGUSR1: this batch is done; save and stop (each rank on its own)
                if (i + 1) % save_every == 0 or signum:
                    checkpoint()
                if signum:
                    raise Preempted.saved(signum, f"after {done} of {hi - lo} images{of_rank(rank, world)}")
    except BaseException:
        if work is not None:  # keep saved progress for a resume; a run that saved none leaves nothing
            work.release(remove=not work.path.exists())
        raise

    ev.finish()  # cache the reference features if this process extracted all of them
    states = None  # with several ranks: every rank's metric states, in rank order
    if world > 1:  # metric states to rank 0, which alone merges and computes (below); counts to every rank
        checkpoint()
        states = distributed.gather_to_rank0(ev.states())
        mine = {"n_used": n_used, "skipped": [(s.path, s.reason) for s in skipped], "upscaled": upscaled,
                "nonfinite": nonfinite}
        gathered: list = [None] * world
        td.all_gather_object(gathered, mine)
        n_used, skipped, upscaled, nonfinite = 0, [], [], []
        for g in gathered:
            n_used += g["n_used"]
            skipped += [Skip(p, r) for p, r in g["skipped"]]
            upscaled += g["upscaled"]
            nonfinite += g["nonfinite"]

    if n_used == 0:
        if work is not None:
            work.release(remove=True)
        reason = "no image was readable" if not nonfinite else "every reconstruction contained NaN/Inf"
        raise RaebenchError(f"Nothing to evaluate for {tok.name!r} on {data.name!r}: {reason} ({len(skipped)} skipped).")
    if upscaled and rank == 0:
        log.warning("%d image(s) were smaller than %d px and were upscaled by the crop", len(upscaled), cfg.resolution)

    def final() -> tuple:
        merged = ev
        if world > 1:  # a fresh evaluator holding the states of all ranks, merged in rank order
            merged = Evaluator(tuple(cfg.metrics), device, reference=reference, options=_metric_options(cfg))
            for per_rank in states:
                merged.merge(per_rank)
        values, versions, notes = merged.compute()
        return values, versions, notes, merged.weights_ids(), dict(merged.failed)

    values, versions, notes, metric_weights, failed = distributed.on_rank0(final)
    if not values:
        if work is not None:
            work.release(remove=True)
        raise RaebenchError(f"Nothing to write for {tok.name!r} on {data.name!r}: {'; '.join(failed.values())}.")
    seconds = time.perf_counter() - t0
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
            seed=data.seed_of(cfg.seed),
            data_fingerprint=data.images.fingerprint(),
            skipped=len(skipped),
            nonfinite=len(nonfinite),
            seconds=round(seconds, 3),
            device=str(device) + (f" x{world}" if world > 1 else ""),
            notes=notes[name],
            run_id=run_id,
            precision=cfg.precision,
            extra={
                "skipped_files": [f"{s.path}: {s.reason}" for s in skipped][:1000],
                "upscaled": len(upscaled),
                "nonfinite_files": nonfinite[:1000],
                "precision": cfg.precision,
                "limit": cfg.limit if data.sampled else None,
                "world_size": world,
                "metric_weights": metric_weights,
            },
        )
        for name, value in values.items()
    ]
    if cfg.write and rank == 0:
        write_rows(rows, cfg.results_dir, run_id)
    if world > 1:
        td.barrier()  # rows are written before any rank removes its resume state
    if work is not None:
        work.release(remove=True)
    return EvalOutcome(rows, skipped, upscaled, nonfinite, seconds, n_used, failed)
