"""Stage-2 latent sources: a latent cache written once, or latents computed on the fly.

:func:`cache_latents` (``raebench cache-latents``) encodes an image folder once with a frozen
tokenizer, each image with its horizontal flip, into one memory-mapped ``latents.npy``
(N, V, C, H, W) plus ``labels.npy`` and ``meta.json``; :class:`LatentCache` reads it back.
:class:`OnTheFly` encodes decoded, cropped and randomly flipped images at every step instead. Both
give the trainer ``fetch(idx, u)`` (the data-side random draw comes in as uniforms ``u``),
``prepare(raw, device)``, ``labels``, ``latent_shape`` and ``identity()`` (what a run records of its
data, to refuse resuming on other data). Both record the tokenizer's name and the identity of its
weights (``tokenizer_weights``: the ``weights_id`` that ``eval`` records with its rows), so that
``raebench sample`` can tell whether it decodes with the weights the latents came from.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raebench import distributed
from raebench.errors import DataError, printable
from raebench.preempt import Preempted, StopOnSignal, of_rank
from raebench.weights import same_weights  # noqa: F401 -- by content; callers import it from here too

log = logging.getLogger(__name__)

#: identity keys that older caches and runs do not record: absent, they are unknown, not different
RECORDED_LATER = frozenset({"tokenizer_weights"})


def build_tokenizer(name: str, device: torch.device, resolution: int | None = None, weights: str | None = None,
                    decoder: str | None = None, stats: str | None = None) -> nn.Module:
    """A registered tokenizer with ``eval``'s local-files options (``--weights``, ``--decoder``,
    ``--stats``), built as ``eval`` builds it, at ``resolution`` (None: the first resolution its
    weights were released at, as an older raebench built it here)."""
    from raebench.eval_config import EvalConfig, build_tokenizer_from_config
    from raebench.tokenizers import get_tokenizer_spec

    if resolution is None:
        resolution = get_tokenizer_spec(name).native_resolutions[0]
    cfg = EvalConfig(tokenizer=name, resolution=resolution, weights=weights, decoder=decoder, stats=stats)
    return build_tokenizer_from_config(cfg, device)


def weights_of(tokenizer: nn.Module) -> str:
    """The identity of a tokenizer's weights, as ``eval`` records it with its rows (``weights_id``)."""
    return getattr(tokenizer, "weights_id", "none")


class LatentCache:
    """A directory with ``latents.npy`` (N, V, C, H, W) (V variants: image, flipped image),
    ``labels.npy`` (N,) and ``meta.json``; memory-mapped, so caches larger than RAM work."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{str(self.root)!r} is not a latent cache (no meta.json); write one with `raebench cache-latents`.")
        self.meta = _read_meta(meta_path)
        if not self.meta.get("complete", False):
            raise DataError(f"Latent cache {str(self.root)!r} is incomplete; re-run `raebench cache-latents` to finish it.")
        self._mm = _open_latents(self.root / "latents.npy", self.meta)  # fails here, not steps into training
        try:
            self.labels = torch.from_numpy(np.load(self.root / "labels.npy")).long()
        except (OSError, ValueError) as e:
            raise DataError(f"{str(self.root / 'labels.npy')!r} is damaged ({e}); re-run `raebench cache-latents` "
                            "into a new folder to rebuild the cache.") from None
        if self.labels.shape != (self._mm.shape[0],):
            raise DataError(f"Latent cache {str(self.root)!r} holds {self._mm.shape[0]} latents but "
                            f"{tuple(self.labels.shape)} labels; rebuild it with `raebench cache-latents`.")
        # rows of images that could not be read hold no latents: training sees only the others
        gone = [int(s["index"]) for s in self.meta.get("skipped") or []]
        self.rows = np.setdiff1d(np.arange(self._mm.shape[0], dtype=np.int64), gone) if gone else None
        if self.rows is not None:
            self.labels = self.labels[torch.from_numpy(self.rows)]

    @property
    def latents(self) -> np.ndarray:
        """(N, V, C, H, W) memory map, opened lazily in each process (worker processes included)."""
        if self._mm is None:
            self._mm = np.load(self.root / "latents.npy", mmap_mode="r")
        return self._mm

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mm": None}  # never pickle the map's pages into a worker

    def __len__(self) -> int:
        return self.latents.shape[0] if self.rows is None else len(self.rows)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.latents.shape[2:])

    def identity(self) -> dict[str, Any]:
        """What a run records of its data, to refuse resuming on other data."""
        keep = {k: self.meta[k] for k in ("id", "fingerprint", "tokenizer", "tokenizer_weights", "resolution")
                if k in self.meta}  # an older cache records no tokenizer_weights
        return {"n": len(self), "latent_shape": list(self.latent_shape), **keep}

    def fetch(self, idx: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One variant (image or flip) per example, chosen by uniforms ``u`` (B,): (B, C, H, W) float32, (B,)."""
        var = (u * self.latents.shape[1]).long().clamp(max=self.latents.shape[1] - 1)
        rows = idx.numpy() if self.rows is None else self.rows[idx.numpy()]  # example -> row of latents.npy
        order = np.argsort(rows)  # sorted reads are kinder to a memory map
        x = np.empty((len(idx), *self.latents.shape[2:]), dtype=np.float32)
        for j in order:
            x[j] = self.latents[int(rows[j]), int(var[j])]
        return torch.from_numpy(x), self.labels[idx]

    def prepare(self, raw: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return raw[0].to(device), raw[1].to(device)


class OnTheFly:
    """Encodes images of a folder with a frozen tokenizer at every step (random horizontal flips)."""

    def __init__(self, tokenizer: nn.Module, data: str, resolution: int, device: torch.device) -> None:
        from raebench.data import resolve_data
        from raebench.loaders import ImageDataset

        self.images = resolve_data(data=data).images
        if min(self.images.labels) < 0:
            raise DataError(f"{data!r} has no class subfolders; stage-2 training needs labelled images.")
        self.dataset = ImageDataset(self.images, resolution)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.tokenizer_name = getattr(tokenizer, "name", type(tokenizer).__name__)
        self.tokenizer_weights = weights_of(tokenizer)
        self.labels = torch.tensor(self.images.labels)
        with torch.no_grad():
            self._shape = tuple(tokenizer.encode(torch.zeros(1, 3, resolution, resolution, device=device)).shape[1:])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tokenizer": None}  # workers only decode images

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self._shape

    def identity(self) -> dict[str, Any]:
        """What a run records of its data, to refuse resuming on other data."""
        return {"n": len(self), "latent_shape": list(self.latent_shape), "fingerprint": self.images.fingerprint(),
                "tokenizer": self.tokenizer_name, "tokenizer_weights": self.tokenizer_weights}

    def fetch(self, idx: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded, cropped images, flipped where the uniform ``u`` (B,) is below 0.5: (B, 3, R, R) uint8, (B,)."""
        items = [self.dataset[int(i)] for i in idx]
        bad = [it["path"] for it in items if "image" not in it]
        if bad:
            raise DataError(f"Unreadable training images: {bad[:3]}; remove them, or cache latents first "
                            "(`raebench cache-latents` skips and lists unreadable images).")
        img = torch.stack([it["image"] for it in items])  # (B, 3, R, R) uint8
        flip = u < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), img.flip(-1), img), self.labels[idx]

    @torch.no_grad()
    def prepare(self, raw: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        from raebench.images import to_float

        return self.tokenizer.encode(to_float(raw[0].to(device))).float(), raw[1].to(device)  # (B, C, H, W)


def write_latent_cache(out: str | os.PathLike, latents: torch.Tensor, labels: torch.Tensor, **meta: Any) -> Path:
    """Write in-memory latents (N, V, C, H, W) and labels (N,) as a complete :class:`LatentCache`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", latents.float().numpy())
    np.save(out / "labels.npy", labels.long().numpy())
    _write_json(out / "meta.json", {"n": len(labels), "variants": latents.shape[1], "shape": list(latents.shape[2:]),
                                    "done": len(labels), "complete": True, "id": uuid.uuid4().hex, **meta})
    return out


#: seconds between the progress saves of ``cache-latents`` (see :func:`cache_latents`)
SAVE_SECONDS = 30.0


@torch.no_grad()
def cache_latents(
    tokenizer: nn.Module, data: str, out: str | os.PathLike, resolution: int = 256, batch_size: int = 32,
    flip: bool = True, dtype: str = "float16", progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Encode every image of ``data`` (and its horizontal flip) once into a :class:`LatentCache`.

    Under torchrun each rank encodes a contiguous shard of the images and writes its rows into the
    one memory-mapped ``latents.npy`` (the ranks must share one file system: run it on one node).
    Resumable: each rank flushes its rows and records its position in ``progress-R-of-W.json`` every
    :data:`SAVE_SECONDS`, on a stop signal and on any error (a SIGKILL loses at most that much work);
    a re-run (with the same world size) continues where each rank stopped, and another world size
    starts afresh. ``meta.json`` is marked complete only when every rank has finished; its
    ``id`` is new for every fresh cache, so a run trained on it refuses to resume on another one.
    A complete cache of the same images and settings is returned as it is (nothing is encoded again).
    Two jobs on one ``out`` are refused, and so is a folder that holds a cache of other images or
    settings (complete or not): it is never overwritten. Images that cannot be read, and images whose
    latents hold NaN/Inf as stored (the tokenizer's own, or values past float16's range), are left out
    of the cache, counted and listed with their reason in ``meta.json`` (``skipped``).
    """
    from raebench.locks import exclusive

    out = Path(out)
    with exclusive(out, "latent-caching job", "choose another --out"):
        return _cache_latents(tokenizer, data, out, resolution, batch_size, flip, dtype, progress)


def _cache_latents(tokenizer, data, out, resolution, batch_size, flip, dtype, progress) -> Path:
    from raebench.data import resolve_data
    from raebench.images import to_float
    from raebench.loaders import ImageDataset, make_loader
    from raebench.results import remove_orphan_temps
    from raebench.tf32 import tf32

    rank, world = distributed.rank_world()
    images = resolve_data(data=data).images
    if images.labels and min(images.labels) < 0:
        raise DataError(f"{data!r} has no class subfolders; stage-2 training needs labelled images.")
    out = Path(out)
    dev = next(iter(tokenizer.parameters()), torch.zeros(())).device
    shape = tuple(tokenizer.encode(torch.zeros(1, 3, resolution, resolution, device=dev)).shape[1:])
    n, variants = len(images.paths), 2 if flip else 1
    meta_path = out / "meta.json"
    want = {"n": n, "variants": variants, "shape": list(shape), "resolution": resolution, "dtype": dtype,
            "fingerprint": images.fingerprint(), "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
            "tokenizer_weights": weights_of(tokenizer), "world": world}
    progress_path = out / f"progress-{rank}-of-{world}.json"
    complete, meta, refusal = False, {}, None
    if rank == 0:  # a finished cache of these images and settings (at any world size) is kept as it is
        meta = _read_meta(meta_path) if meta_path.is_file() else {}
        # a complete cache of an older raebench (no tokenizer_weights) is kept; an unfinished one starts afresh below
        diff = [f"{k}: {meta.get(k)!r} -> {v!r}" for k, v in want.items()
                if k != "world" and (k in meta or k not in RECORDED_LATER) and setting_differs(k, meta.get(k), v)]
        if meta and diff:
            state = "a complete" if meta.get("complete") else "an unfinished"
            refusal = (f"{str(out)!r} holds {state} latent cache of other images or settings "
                       f"({'; '.join(diff[:4])}); choose another --out, or delete that folder to replace it.")
        complete = bool(meta.get("complete")) and refusal is None
        if complete:
            try:
                _open_latents(out / "latents.npy", meta)
            except DataError:
                log.warning("%s is marked complete but its latents.npy is missing or damaged; encoding it again", out)
                complete, meta = False, {}
    distributed.refuse(refusal, DataError)  # on every rank (rank 0 says it, once), not rank 0 alone
    if world > 1:
        box = [complete]
        dist.broadcast_object_list(box, src=0)
        complete = box[0]
    if complete:
        if rank == 0:  # of a job killed after marking the cache complete, before removing them (we hold the lock)
            for finished in out.glob("progress-*.json"):
                finished.unlink()
            remove_orphan_temps(out)
        log.info("%s already holds these latents (complete); nothing to encode", out)
        return out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_orphan_temps(out)  # of a killed job's progress and meta writes (we hold the lock)
        fresh = any(setting_differs(k, meta.get(k), v) for k, v in want.items()) or not (out / "latents.npy").is_file()
        if fresh:
            for old in out.glob("progress-*.json"):
                old.unlink()
            np.lib.format.open_memmap(out / "latents.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, variants, *shape)).flush()
            np.save(out / "labels.npy", np.asarray(images.labels, dtype=np.int64))
            meta = {"id": uuid.uuid4().hex}
            _write_json(meta_path, {**want, "id": meta["id"], "complete": False})
    if world > 1:
        dist.barrier()
    lo, hi = distributed.shard(n, rank, world)
    start, skipped = lo, []  # skipped: {"index", "path", "reason"} of this shard's unreadable images
    if progress_path.is_file():
        try:
            state = json.loads(progress_path.read_text())
            start, skipped = int(state["next"]), list(state.get("skipped", []))
        except (OSError, ValueError, KeyError, TypeError) as e:  # rows are rewritten, so restarting the shard is safe
            log.warning("unreadable %s (%s); this shard is encoded again from its start", progress_path, e)
            start, skipped = lo, []
    if not lo <= start <= hi:
        start, skipped = lo, []
    lat = np.load(out / "latents.npy", mmap_mode="r+")  # (N, V, C, H, W)
    loader = make_loader(ImageDataset(images, resolution), batch_size, indices=range(start, hi))
    where = None  # path -> index, built at the first unreadable image
    # the position is saved (rows flushed first, then progress-R-of-W.json) at most every SAVE_SECONDS, on a
    # stop signal and on any exception: flushing the map and fsyncing the progress after every batch cost
    # ~25 ms per 32 images on a local disk (not measured on a GPU node), of the order of a GPU encode of
    # them; a SIGKILL loses at most SAVE_SECONDS of work. reached (reached_skips): the next index (and the
    # skips) once every batch so far is in `lat`
    reached, reached_skips, saved_at = None, [], time.monotonic()

    def save(lat: np.memmap) -> None:
        nonlocal saved_at
        if reached is not None:
            lat.flush()
            _write_json(progress_path, {"next": reached, "skipped": reached_skips})
        saved_at = time.monotonic()

    with StopOnSignal() as preempt:  # the stop signals only set a flag, read after each batch (each rank on its own)
        try:
            for batch in loader:
                done = [int(i) for i in batch["index"]]
                if batch["skipped"]:  # counted and listed as eval does; their rows stay out of the cache (meta "skipped")
                    where = where or {p: i for i, p in enumerate(images.paths)}
                    for sk in batch["skipped"]:
                        skipped.append({"index": where[sk.path], "path": sk.path, "reason": sk.reason})
                        done.append(where[sk.path])
                if len(batch["index"]):
                    x = to_float(batch["image"].to(dev))  # (B, 3, R, R): uint8 over the bus, 4x fewer bytes than float
                    with tf32(False):  # the cache holds full-float32 latents (then rounded to --dtype)
                        z = [tokenizer.encode(x)] + ([tokenizer.encode(x.flip(-1))] if flip else [])
                    z32 = torch.stack(z, 1).float().cpu().numpy()  # (B, V, C, H, W)
                    with np.errstate(over="ignore", invalid="ignore"):  # overflow is found and reported below
                        rows = z32.astype(dtype)
                    lat[batch["index"].numpy()] = rows
                    skipped += _nonfinite_rows(z32, rows, batch["index"].tolist(), batch["path"], dtype)
                reached, reached_skips = max(done) + 1, list(skipped)
                signum = preempt.local()
                if signum or time.monotonic() - saved_at >= SAVE_SECONDS:
                    save(lat)
                if progress:
                    progress(reached - lo, hi - lo)
                if signum:  # this batch's latents and the position are saved
                    raise Preempted.saved(signum, f"after {reached - lo} of {hi - lo} images{of_rank(rank, world)}")
        except BaseException:  # a crash, Ctrl-C, an unreadable batch: keep the batches already in `lat`
            save(lat)
            raise
    lat.flush()
    del lat
    _write_json(progress_path, {"next": hi, "skipped": skipped})  # read by rank 0 below (an empty shard too)
    if world > 1:
        dist.barrier()
    distributed.on_rank0(lambda: _finish_cache(out, world, n, data, want, meta, meta_path))  # its error reaches every rank
    return out


def _nonfinite_rows(z32: np.ndarray, rows: np.ndarray, index: list[int], paths: list[str], dtype: str) -> list[dict]:
    """Skip entries of the images whose latents hold NaN/Inf as stored: the tokenizer's own NaN/Inf, or
    values past the range of ``dtype`` (float16 ends at 65504). Training on such a row makes the loss
    NaN and stops the run many steps later, so they are left out of the cache like unreadable files."""
    # the float32 latents' largest |value| per image finds the candidates (NaN propagates through max/min);
    # only those are checked as stored: np.isfinite over float16 rows cost 4x these two passes on the CPU
    flat = z32.reshape(len(z32), -1)
    peak = np.maximum(flat.max(1), -flat.min(1)) if flat.shape[1] else np.zeros(len(z32), np.float32)  # (B,)
    with np.errstate(invalid="ignore"):
        suspect = np.flatnonzero(~(peak <= np.finfo(rows.dtype).max))  # NaN, Inf or past the stored range
    bad = [j for j in suspect.tolist() if not np.isfinite(rows[j]).all()]  # 65519 rounds to 65504 in float16
    if not bad:
        return []
    out = []
    for j in bad:
        if np.isfinite(z32[j]).all():
            reason = (f"its latents exceed the {dtype} range (largest |value| {float(np.abs(z32[j]).max()):.3g}); "
                      "use --dtype float32")
        else:
            reason = "the tokenizer gave NaN/Inf latents"
        log.warning("left out of the cache: %s: %s", printable(paths[j]), reason)
        out.append({"index": int(index[j]), "path": paths[j], "reason": reason})
    return out


def _finish_cache(out: Path, world: int, n: int, data, want: dict, meta: dict, meta_path: Path) -> None:
    """Rank 0, after every rank encoded its shard: the skip lists into meta.json, marked complete."""
    every = sorted((s for r in range(world) for s in _shard_skips(out / f"progress-{r}-of-{world}.json")),
                   key=lambda s: s["index"])
    if len(every) == n:
        raise DataError(f"None of the {n} images of {data!r} could be used (first: {every[0]['path']}: "
                        f"{every[0]['reason']}); nothing to cache.")
    if every:
        log.warning("%d image(s) skipped (unreadable, or NaN/Inf latents) and left out of the cache (listed in its "
                    "meta.json), e.g. %s", len(every), "; ".join(f"{s['path']}: {s['reason']}" for s in every[:3]))
    _write_json(meta_path, {**want, "id": meta.get("id", uuid.uuid4().hex), "complete": True, "skipped": every})
    for finished in out.glob("progress-*.json"):
        finished.unlink()


def _shard_skips(path: Path) -> list[dict]:
    """The unreadable images one rank recorded (its progress file, written at its end)."""
    try:
        return list(json.loads(path.read_text()).get("skipped", []))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{str(path)!r} is missing or damaged ({e}) after every rank finished; re-run "
                        "`raebench cache-latents` to finish the cache.") from None


def setting_differs(key: str, old: Any, new: Any) -> bool:
    """A recorded setting differs (a cache's, a run's data identity, a sample file's): the tokenizer's
    weights by content (:func:`same_weights`), every other key by equality."""
    return not same_weights(old, new) if key == "tokenizer_weights" else old != new


def _read_meta(path: Path) -> dict:
    """A cache's meta.json, or a DataError naming it."""
    from raebench.checkpoint import read_json_object

    return read_json_object(path, DataError, "; the latent cache is damaged: rebuild it with `raebench cache-latents` "
                                             "into a new folder (or delete this one)")


def _open_latents(path: Path, meta: dict, mode: str = "r") -> np.ndarray:
    """The (N, V, C, H, W) memory map of ``latents.npy``, checked against ``meta``; DataError if the
    file is missing, truncated or of another shape."""
    try:
        mm = np.load(path, mmap_mode=mode)
    except (OSError, ValueError) as e:  # "mmap length is greater than file size" for a truncated file
        raise DataError(f"{str(path)!r} is missing or damaged ({e}); rebuild the latent cache with "
                        "`raebench cache-latents`.") from None
    want = (meta.get("n"), meta.get("variants"), *meta.get("shape", ()))
    if mm.ndim != 5 or (meta.get("n") is not None and tuple(mm.shape) != want):
        raise DataError(f"{str(path)!r} has shape {tuple(mm.shape)}, but its meta.json says {want}; rebuild the "
                        "latent cache with `raebench cache-latents`.")
    return mm


def _write_json(path: Path, obj: Any) -> None:
    from raebench.results import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())
