"""What one evaluation run is, before anything loads: the :class:`EvalConfig` (the CLI flags, one to
one), the device, precision and tokenizer it names, and the metric/extractor options
(``NAME.KEY=VALUE``) with their checks. :func:`planned` resolves the versions and network weights rows
measured now would record, from the specs and weight files only, so reuse (compare) and resume (eval)
decide without loading a network.
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass

import torch

from raebench.checks import check_domain, check_image_counts, check_run
from raebench.data import ResolvedData
from raebench.errors import RaebenchError


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
