"""The :class:`Evaluator`: builds the requested metrics and the feature extractors they share, streams
uint8 batches through them (each extractor once per image and side), keeps reference-side features in
the on-disk cache (:class:`ReferenceSet` names the reference images), and computes the values, versions
and notes of the result rows. :func:`raebench.evaluate.evaluate` and :func:`raebench.metrics.scoring.score`
drive it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from raebench.errors import RaebenchError
from raebench.eval_config import Planned, _raise_missing, check_options, parse_options, planned

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSet:
    """Identity of the reference images, for the feature cache: ``id`` covers the image list, the
    crop and the resolution (``<fingerprint>|adm-center-crop@256``); rows are indexed 0..n-1."""

    id: str
    n: int


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
