"""Metric specs, the stateful accumulator interface, and feature-extractor specs.

Design (after torchmetrics / torch-fidelity): each metric is a pure function on arrays plus a thin
accumulator with ``update`` / ``compute`` / ``reset``. Expensive per-image features come from
*extractors* (Inception, DINOv2, CLIP, ...) that the evaluator runs once per image and shares among
every metric that names them in ``MetricSpec.extractors``.

Inputs at this boundary are uint8 NCHW RGB tensors (what a PNG holds); a metric that wants floats
converts them itself (the network metrics with :func:`raebench.images.to_float`, the pixel metrics to
float64).
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from raebench.errors import RaebenchError
from raebench.registry import Registry

T = TypeVar("T")
_SHARED: dict[tuple, Any] | None = None  # networks built once inside sharing_networks()


@contextlib.contextmanager
def sharing_networks() -> Iterator[None]:
    """Inside this block, networks loaded through :func:`shared_network` are built once and reused.

    ``raebench compare`` evaluates many tokenizers with the same metrics: Inception, DINOv2, CLIP,
    LPIPS and DreamSim then load once per run instead of once per tokenizer. The networks are
    frozen and in eval mode; metric state lives in the metric objects, which are still per run.
    """
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def shared_network(key: tuple, build: Callable[[], T]) -> T:
    """``build()`` once per ``key`` inside :func:`sharing_networks`, every time outside it."""
    if _SHARED is None:
        return build()
    if key not in _SHARED:
        _SHARED[key] = build()
    return _SHARED[key]


class MetricInputError(RaebenchError, ValueError):
    """Images or features a metric cannot take (floats where uint8 is the contract, unequal pairs)."""


class TooFewImagesError(MetricInputError):
    """A side holds fewer images than the metric is defined for (``MetricSpec.min_images``)."""


def require_images(spec: "MetricSpec", **counts: int) -> None:
    """Raise :class:`TooFewImagesError` unless every side in ``counts`` (``candidates=n``,
    ``references=n``) holds at least ``spec.min_images`` images."""
    need = spec.min_images
    if all(n >= need for n in counts.values()):
        return
    got = " and ".join(f"{n} {side}" for side, n in counts.items())
    what = "images on each side" if len(counts) > 1 else next(iter(counts))
    raise TooFewImagesError(f"{spec.name} needs at least {need} {what}, got {got}")


@dataclass
class MetricBatch:
    """One batch seen by every metric.

    ``reference`` and ``candidate`` are (N, 3, H, W) uint8; for paired metrics row i of one matches
    row i of the other. ``features[name] = (ref_feats, cand_feats)`` holds the shared extractor
    outputs (each a dict ``{output: (N, D) float32}``, e.g. ``{"pool": ..., "logits": ...}``);
    either side may be None when it is not computed (e.g. reference features from the cache come
    without images).

    Distribution metrics also receive one-sided batches (``score`` with unpaired sets, or a
    reference batch read from an ``.npz``): then ``candidate`` or ``reference`` is None and only
    that side's features are present. Paired metrics never receive one-sided batches.
    """

    reference: torch.Tensor | None
    candidate: torch.Tensor | None
    features: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)
    #: (extractor, output, side) -> the CPU copy :meth:`kept` made of it for this batch
    _kept: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def kept(self, extractor: str, output: str, side: int) -> torch.Tensor | None:
        """A detached, contiguous CPU copy of one side's (0: references, 1: candidates) extractor
        ``output`` (None when that side has none), made once per batch. Metrics that keep features
        whole append this tensor rather than a copy of their own: precision, density and KID then hold
        one copy of the Inception features between them (3 × 800 MB at 50k per side before), and a
        resume save writes it once (torch.save writes a storage once, whichever lists hold it, and
        loads it back shared). Kept features are never modified in place."""
        key = (extractor, output, side)
        if key not in self._kept:
            feats = self.features.get(extractor, (None, None))[side]
            if feats is None:
                return None
            self._kept[key] = feats[output].detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        return self._kept[key]


class Metric(abc.ABC):
    """Accumulates over batches; ``compute`` returns ``{metric_name: value, ...}``.

    A metric may return more than one named value (``kid`` also returns ``kid-std``); each becomes a
    result row. ``notes`` collects warnings recorded with the result (e.g. "N < d").
    """

    def __init__(self, spec: "MetricSpec") -> None:
        self.spec = spec
        self.notes: list[str] = []

    @property
    def reference_stats_keys(self) -> tuple[str, ...]:
        """Keys of an ADM reference batch ``.npz`` (``("mu", "sigma")``) this metric can use instead
        of reference features; see :meth:`set_reference_stats`."""
        return self.spec.reference_stats_keys

    def set_reference_stats(self, stats: dict) -> None:
        """Use stored reference statistics (arrays named by ``reference_stats_keys``) instead of
        accumulating reference features."""
        raise NotImplementedError(f"{self.spec.name} cannot use stored reference statistics")

    @abc.abstractmethod
    def update(self, batch: MetricBatch) -> None: ...

    @abc.abstractmethod
    def compute(self) -> dict[str, float]: ...

    @abc.abstractmethod
    def reset(self) -> None: ...

    # -- exact merging across shards, ranks and resumed runs ------------------------------------
    # Convention: accumulator attributes are numbers or tensors that *add* (float64 sums, counts)
    # or lists that *concatenate* (per-image features kept whole, in data order). Anything else
    # (configuration, ``spec``, ``notes``) is not state. A metric whose state does not fit overrides
    # both methods. Merging states in shard order reproduces the single-process accumulation (up to
    # float summation order), because shards are contiguous slices of the ordered dataset.

    _NOT_STATE = frozenset({"spec", "notes"})

    def state(self) -> dict:
        """The accumulator's state: plain numbers, tensors and lists of tensors (torch.save-able
        with ``weights_only=True``)."""
        out = {}
        for k, v in vars(self).items():
            if k in self._NOT_STATE or k.startswith("_"):
                continue
            if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool):
                out[k] = v.detach().cpu() if isinstance(v, torch.Tensor) else v
            elif isinstance(v, list) and all(isinstance(t, torch.Tensor) for t in v):
                out[k] = [t.detach().cpu() for t in v]
        return out

    def merge(self, state: dict) -> None:
        """Add another shard's ``state()`` into this accumulator (a fresh one + merge = restore)."""
        for k, v in state.items():
            cur = getattr(self, k)
            if isinstance(cur, list):
                cur.extend(t.to(cur[0].device) if cur and isinstance(t, torch.Tensor) else t for t in v)
            elif isinstance(cur, torch.Tensor):
                setattr(self, k, cur + v.to(cur.device))
            else:
                setattr(self, k, type(cur)(cur + v))


class PairedMean(Metric):
    """Mean over images of a per-image score of (reference, candidate) pairs. The per-image float64
    scores are kept (8 bytes an image) and summed with ``math.fsum``, the correctly rounded sum: the
    mean does not depend on how the scores were split or the order they arrive in (a running float
    sum differed in the last digit across torchrun ranks). Scores computed per image in float64
    (PSNR, SSIM, MS-SSIM) are then the same bits for any ranks, batch size or resume; network scores
    (LPIPS, DreamSim) still move with the batch's float32 arithmetic. The score is ``on_float`` of the images as
    [0, 1] floats, or a subclass's :meth:`per_image`. Inputs are uint8 pairs of equal shape;
    anything else is refused (a float image in [0, 1] would otherwise be divided by 255 again)."""

    def __init__(self, spec: "MetricSpec", on_float: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(spec)
        self.on_float = on_float
        self.reset()

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []  # (n,) float64 per batch, CPU

    def per_image(self, ref_u8: torch.Tensor, cand_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) pairs -> (N,) scores. ``on_float`` gets float64 images (x / 255 in
        float64, as scikit-image's ``img_as_float`` on uint8): the pixel metrics compute in float64, and
        a float32 x / 255 first would move PSNR by ~1e-8 relative to scikit-image."""
        if self.on_float is None:
            raise NotImplementedError(f"{type(self).__name__} needs on_float or a per_image method")
        return self.on_float(ref_u8.double() / 255.0, cand_u8.double() / 255.0)

    def update(self, batch: MetricBatch) -> None:
        ref, cand = batch.reference, batch.candidate
        if ref is None or cand is None:
            raise MetricInputError(f"{self.spec.name} is a paired metric and needs reference and candidate images.")
        for side, x in (("reference", ref), ("candidate", cand)):
            if x.dtype != torch.uint8:
                raise MetricInputError(f"{self.spec.name} takes uint8 images (0..255, what a PNG holds), got {side} "
                                       f"images of {x.dtype}; convert [0, 1] floats with raebench.data.to_uint8.")
        if ref.shape != cand.shape or ref.ndim != 4:
            raise MetricInputError(f"{self.spec.name} needs reference and candidate batches of one (N, 3, H, W) shape, "
                                   f"got {tuple(ref.shape)} and {tuple(cand.shape)}.")
        with torch.no_grad():
            v = self.per_image(batch.reference, batch.candidate).double()
        self.values.append(v.detach().reshape(-1).cpu())

    @property
    def count(self) -> int:
        return sum(v.numel() for v in self.values)

    def compute(self) -> dict[str, float]:
        n = self.count
        return {self.spec.name: math.fsum(torch.cat(self.values).tolist()) / n if n else math.nan}


@dataclass(frozen=True)
class MetricSpec:
    """Metadata of a metric; ``builder(spec, **options)`` makes the accumulator lazily."""

    name: str
    higher_is_better: bool
    kind: str  # "paired" (reconstruction vs original) or "distribution" (two sets)
    version: str  # bump when anything that changes the value changes
    description: str
    builder: Callable[..., Metric]
    extractors: tuple[str, ...] = ()
    unit: str = ""
    aliases: tuple[str, ...] = ()
    #: other result names this metric emits (``kid`` -> ``kid-std``), with their higher_is_better
    #: (None for a spread of the main value: no direction, no arrow, no best)
    outputs: tuple[tuple[str, bool | None], ...] = ()
    #: extractor outputs read from each side, as ``"extractor/output"`` (``"inception/pool"``); the
    #: evaluator runs (or reads from its cache) only what some metric reads
    reference_inputs: tuple[str, ...] = ()
    candidate_inputs: tuple[str, ...] = ()
    #: option names ``build`` accepts (``weights`` for LPIPS, ``variant`` for DreamSim)
    options: tuple[str, ...] = ()
    #: the values an option may take, where they are a fixed set: ``(("dtype", ("float32", "float64")),)``
    option_choices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: the fewest images on each side the metric reads (FID's covariance needs 2, precision's
    #: k = 3 radii need 4); fewer is refused before the pass where the counts are known
    min_images: int = 1
    #: the smallest image side the metric accepts (an SSIM window, LPIPS-AlexNet's pooling)
    min_image_side: int = 1
    #: keys of an ADM reference batch ``.npz`` that can stand in for the reference features
    reference_stats_keys: tuple[str, ...] = ()
    #: ``weights_path(weights=None)`` of a metric with a network of its own (LPIPS, DreamSim), resolved
    #: without loading, so reuse can compare the weights recorded with stored rows; None: not compared
    #: (the resolver too may return None: files its builder will download, so nothing to compare yet)
    weights_path: Callable[..., Path | None] | None = None
    #: the files of a ``weights_path`` folder that make the weights' identity (``fingerprint_path``'s
    #: patterns; None: every file): DreamSim's variants share one folder, each loads its own files
    weights_patterns: tuple[str, ...] | None = None

    def build(self, **options) -> Metric:
        return self.builder(self, **options)

    def weights_identity(self, path: str | os.PathLike) -> str:
        """The identity of the weights at ``path`` (a ``weights_path``), as rows record it in
        ``extra.metric_weights``: the fingerprint of its :attr:`weights_patterns` files."""
        from raebench.metrics.extractors import fingerprint_path

        return fingerprint_path(path, self.weights_patterns)

    def reads_references(self, stats: Collection[str] = ()) -> bool:
        """Whether the metric reads reference features that stored statistics (the keys ``stats``
        of an ADM reference batch) do not stand in for."""
        keys = set(self.reference_stats_keys)
        return bool(self.reference_inputs) and not (keys and keys <= set(stats))


@dataclass(frozen=True)
class ExtractorSpec:
    """A feature extractor: uint8 (N, 3, H, W) -> features; built lazily, run once per image.

    ``builder(device=..., outputs=..., **options)`` returns a callable mapping uint8 images to
    ``{output: (N, D) float32}`` with attributes ``identity`` (version + weights fingerprint +
    options; part of every cache key) and ``variant`` (non-default options that change values,
    appended to the version of every metric that reads it; "" by default).
    """

    name: str
    version: str  # the definition: network, layer, resize; bump when any changes
    description: str
    builder: Callable[..., Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]]]
    outputs: tuple[str, ...] = ()
    #: option names the builder accepts (besides device and outputs); unknown options are errors
    options: tuple[str, ...] = ()
    #: the values an option may take, where they are a fixed set (checked before anything loads)
    option_choices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: ``weights_path(weights=None)``: the file or folder the builder would load, resolved without
    #: building (so its fingerprint can decide reuse before any network loads); None if unknown
    weights_path: Callable[..., Path] | None = None
    #: ``variant_of(**options)``: the variant string the options give, without building; None: always ""
    variant_of: Callable[..., str] | None = None
    #: the width D of each output, ``(("pool", 2048), ...)``, known without building (stored
    #: statistics are checked against it before any network loads)
    dims: tuple[tuple[str, int], ...] = ()

    def dim(self, output: str) -> int | None:
        """The width of ``output``'s features, or None when not declared."""
        return dict(self.dims).get(output)


METRICS: Registry[MetricSpec] = Registry("metric")
EXTRACTORS: Registry[ExtractorSpec] = Registry("extractor", listed=False)


def register_metric(spec: MetricSpec) -> MetricSpec:
    return METRICS.register(spec.name, spec, aliases=spec.aliases)


def register_extractor(spec: ExtractorSpec) -> ExtractorSpec:
    return EXTRACTORS.register(spec.name, spec)


def network_keys(name: str) -> tuple[str, ...]:
    """The keys under which a result row of ``name`` (``kid-std`` included) records the weights of the
    networks behind it in ``extra.metric_weights``: its extractors and the metric itself (LPIPS, DreamSim);
    () for a name that is no registered metric (analysis rows, published numbers)."""
    for spec in METRICS:
        if name == spec.name or any(out == name for out, _ in spec.outputs):
            return (*spec.extractors, spec.name)
    return ()


def higher_is_better(name: str) -> bool | None:
    """higher_is_better of a result name, including secondary outputs like ``kid-std``."""
    for spec in METRICS:
        if spec.name == name:
            return spec.higher_is_better
        for out, hib in spec.outputs:
            if out == name:
                return hib
    return None
