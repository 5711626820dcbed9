"""Generate many samples for evaluation: class-balanced labels, sharded, resumable, ADM npz output.

Output contract (the ADM evaluation suite's): ``arr_0`` uint8 (N, H, W, 3) images and ``arr_1`` int64
(N,) class labels (also stored as ``labels``), plus ``raebench_settings``: the model, tokenizer, sampler,
guidance, seed and labels as a JSON string, which ``raebench score`` copies into its rows. Work is cut into global batches; batch ``b`` belongs to
rank ``b % world`` and draws its noise from a generator seeded by (seed, b), so the result does not
depend on the number of ranks (it does on the batch size, which is recorded) and an interrupted run
resumes batch by batch. Each finished batch is a
part file written atomically; rank 0 merges the parts into the final npz (also atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raebench.distributed import rank_world
from raebench.errors import CheckpointError, RaebenchError
from raebench.preempt import Preempted, StopOnSignal, of_rank
from raebench.results import save_npz_atomic

log = logging.getLogger(__name__)

SampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise, labels) -> latents
DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # latents -> float images (N, 3, H, W) in [0, 1]


def class_labels(num: int, num_classes: int, mode: str = "equal", seed: int = 0) -> torch.Tensor:
    """(num,) labels. 'equal': every class num // num_classes times (the remainder spread over the
    first classes), in a seeded random order; 'random': i.i.d. uniform classes."""
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randint(num_classes, (num,), generator=g)
    if mode != "equal":
        raise RaebenchError(f"--label-sampling must be 'equal' or 'random', got {mode!r}.")
    labels = torch.arange(num) % num_classes
    return labels[torch.randperm(num, generator=g)]


@torch.no_grad()
def generate_npz(
    sample_fn: SampleFn,
    decode: DecodeFn,
    out: str | os.PathLike,
    labels: torch.Tensor,
    latent_shape: tuple[int, ...],
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    settings: Mapping[str, Any] | None = None,
    quantize: str = "round",
) -> Path:
    """Sample ``len(labels)`` images into an ADM npz at ``out``; see the module docstring.

    ``settings``: everything else that changes the samples (model, tokenizer, sampler, guidance), as
    JSON values; a resumed run must have the same ones, the labels, seed, batch size and latent shape,
    or it is refused (parts of two runs are never mixed). ``quantize``: how decoded images become
    uint8, "round" (default) or "truncate" (the official RAE ``sample_ddp.py``; see :func:`raebench.images.to_uint8`).
    """
    import contextlib

    from raebench.distributed import on_rank0
    from raebench.locks import exclusive

    out = Path(out)
    if out.is_dir():
        raise RaebenchError(f"--out {str(out)!r} is a folder; give the .npz file to write.")
    # one job per output: two would write the same parts and the first to finish would delete them;
    # rank 0 locks, and its refusal reaches every rank (they would wait for it in a collective)
    with contextlib.ExitStack() as held:
        on_rank0(lambda: held.enter_context(exclusive(out, "sampling job", "choose another --out")))
        return _generate(sample_fn, decode, out, labels, latent_shape, batch_size, seed, device, progress, settings,
                         quantize)


def _read_parts_meta(meta: Path) -> dict:
    from raebench.checkpoint import read_json_object

    return read_json_object(meta, RaebenchError, "; the parts beside it cannot be matched to their settings, so "
                                                 "delete that folder to start afresh")


def _readable_part(part: Path) -> bool:
    """Whether a finished part opens (its zip directory, at the end of the file, is intact)."""
    try:
        with np.load(part) as a:
            return {"images", "labels"} <= set(a.files)
    except Exception:  # noqa: BLE001 - any failure to open means the part must be sampled again
        return False


#: keys of a finished npz's settings that describe the file, not the run (compared separately or not at all)
_FILE_KEYS = ("n", "raebench_version", "git_hash")


def _settings_diff(old: dict, run: dict) -> str:
    """The settings that differ between saved samples and this run ("" when none); the tokenizer's
    weights by content (:func:`~raebench.stage2.latents.same_weights`: a renamed --decoder file is the
    same weights)."""
    from raebench.stage2.latents import setting_differs

    name = {"labels": "labels (a digest: other --num, --num-classes, --label-sampling or --seed)"}
    return "; ".join(f"{name.get(k, k)}: {old.get(k)!r} -> {run.get(k)!r}" for k in sorted(set(old) | set(run))
                     if setting_differs(k, old.get(k), run.get(k)))


def _finished(out: Path, run: dict, n: int) -> bool:
    """Whether ``out`` is this run's finished npz (True), absent (False); anything else is refused, so a
    finished file of other settings, or a file that is not ours, is never silently replaced."""
    if not out.exists():
        return False
    from raebench.metrics.sources import SETTINGS_KEY

    try:
        with np.load(out, allow_pickle=False) as z:
            saved = json.loads(str(z[SETTINGS_KEY])) if SETTINGS_KEY in z.files else None
    except Exception:  # noqa: BLE001 - unreadable, not an npz, truncated: all refused below
        saved = None
    if not isinstance(saved, dict):
        raise RaebenchError(f"--out {str(out)!r} exists and is not a sample file written by raebench sample; delete it "
                            "or choose another --out.")
    old = {k: v for k, v in saved.items() if k not in _FILE_KEYS}
    diff = _settings_diff(old, run)
    if not diff and saved.get("n") == n:
        return True
    if saved.get("n") != n:
        diff = f"n: {saved.get('n')!r} -> {n!r}" + (f"; {diff}" if diff else "")
    raise RaebenchError(f"--out {str(out)!r} already holds finished samples of other settings ({diff}); delete it or "
                        "choose another --out to sample with these.")


def _prepare_parts(parts: Path, out: Path, run: dict, n: int, labels, seed, batch_size, latent_shape) -> None:
    """On rank 0: the parts folder made (or its parts checked against ``run``, so parts of two runs are never
    mixed), the temporaries of a killed job and damaged parts removed, ``run`` recorded in its meta.json."""
    from raebench.results import atomic_write_bytes, remove_orphan_temps

    parts.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(parts)  # half-written parts of a killed job (we hold the lock)
    remove_orphan_temps(out.parent, of=out.name)  # and its half-written final npz
    meta = parts / "meta.json"
    if not meta.is_file() and any(parts.glob("b*.npz")):
        raise RaebenchError(f"{parts} holds sample parts without a record of their settings (meta.json), so they "
                            "cannot be resumed safely; delete that folder to start afresh.")
    saved = _read_parts_meta(meta) if meta.is_file() else {"run": run}
    old = saved.get("run", {})
    if "run" not in saved and "key" in saved and any(parts.glob("b*.npz")):  # parts of raebench before 0.1's run keys
        legacy = {hashlib.sha256(labels.numpy().tobytes() + f"{seed}/{batch_size}/{shape}".encode()).hexdigest()[:16]
                  for shape in (tuple(latent_shape), list(latent_shape))}  # as a checkpoint's list or a tuple
        if saved["key"] not in legacy:
            raise RaebenchError(f"{parts} holds samples written by an older raebench for other labels, seed, batch size "
                                "or latent shape; re-run with those to finish it, or delete that folder to start afresh.")
        log.warning("%s was written by an older raebench, which did not record the model and sampler settings; "
                    "resuming on the assumption that they are these", parts)
        old = run
    diff = _settings_diff(old, run)
    if diff and saved.get("n") not in (None, n):  # the count, as for a finished file
        diff = f"n: {saved['n']!r} -> {n!r}; {diff}"
    if diff and any(parts.glob("b*.npz")):
        raise RaebenchError(f"{parts} holds samples of a sampling run with other settings ({diff}); re-run with "
                            "those settings to finish it, or delete that folder (or choose another --out) to start afresh.")
    atomic_write_bytes(meta, json.dumps({"run": run, "n": n}).encode())
    damaged = [p for p in sorted(parts.glob("b*.npz")) if not _readable_part(p)]
    for p in damaged:  # truncated by a full disk or a copy: sampled again, not discovered at the merge
        p.unlink()
    if damaged:
        log.warning("%d damaged sample part(s) in %s will be sampled again: %s", len(damaged), parts,
                    ", ".join(p.name for p in damaged[:5]))


def _generate(sample_fn, decode, out: Path, labels, latent_shape, batch_size, seed, device, progress, settings,
              quantize) -> Path:
    from raebench.images import nonfinite_rows, to_uint8

    rank, world = rank_world()
    n = len(labels)
    if n < 1 or batch_size < 1:
        raise RaebenchError(f"Need at least one sample and a batch size of at least 1, got {n} and {batch_size}.")
    parts = out.with_name(f".{out.name}.parts")
    run = {"labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16], "seed": seed, "batch_size": batch_size,
           "latent_shape": list(latent_shape), **json.loads(json.dumps(dict(settings or {})))}
    if quantize != "round":  # absent when rounding, so parts written before this option still resume
        run["quantize"] = quantize
    from raebench.distributed import on_rank0

    if on_rank0(lambda: _finished(out, run, n)):  # re-running a finished job costs nothing (50k samples: GPU-hours)
        if rank == 0 and parts.is_dir():  # of a job killed between writing the npz and removing its parts (we hold the lock)
            shutil.rmtree(parts, ignore_errors=True)
        log.info("%s already holds these %d samples (same model, sampler, labels and seed); nothing to do "
                 "(delete it to sample again)", out, n)
        return out
    # rank 0 checks and prepares the parts folder; its refusal stops every rank (said once, by rank 0)
    on_rank0(lambda: _prepare_parts(parts, out, run, n, labels, seed, batch_size, latent_shape))
    num_batches = math.ceil(n / batch_size)
    mine = [b for b in range(num_batches) if b % world == rank]
    with StopOnSignal() as preempt:  # the stop signals only set a flag, read after each batch (each rank on its own)
        for done, b in enumerate(mine, 1):
            part = parts / f"b{b:07d}.npz"
            if part.is_file():
                continue
            y = labels[b * batch_size:(b + 1) * batch_size]
            noise = torch.randn(len(y), *latent_shape, generator=_noise_generator(seed, b)).to(device)  # (B, C, H, W)
            with torch.random.fork_rng(devices=[]):  # stochastic samplers (SDE) draw from the global CPU RNG:
                torch.manual_seed(_step_noise_seed(seed, b))  # seeded per batch, so reruns and resumes repeat
                img = decode(sample_fn(noise, y.to(device)))  # (B, 3, H, W) float in [0, 1]
            # which samples of the batch hold NaN/Inf: recorded here, refused at the merge (all ranks), where
            # their indices and labels are named so that a user can look at them
            at = np.array(nonfinite_rows(img), dtype=np.int64)
            # NaN/Inf have no 8-bit value: zeros here, never used (the merge refuses a run that has any)
            img = torch.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0) if len(at) else img
            save_npz_atomic(part, images=to_uint8(img, quantize).permute(0, 2, 3, 1).cpu().numpy(), labels=y.numpy(),
                            nonfinite=np.array(len(at)), nonfinite_at=at)
            if progress:
                progress(done, len(mine))
            signum = preempt.local()
            if signum:  # every finished batch is already a part file: nothing more to save
                raise Preempted.saved(signum, f"after batch {done} of {len(mine)}{of_rank(rank, world)}", "samples")
    if world > 1:
        dist.barrier()
    on_rank0(lambda: _merge(parts, out, run, n, num_batches))  # rank 0's error (non-finite samples) reaches every rank
    return out


def _noise_generator(seed: int, b: int) -> torch.Generator:
    """The generator of batch ``b``'s starting noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + b)


def _step_noise_seed(seed: int, b: int) -> int:
    """The global RNG seed of batch ``b``'s stochastic sampler steps (SDE): hashed from (seed, b), so
    that it is no batch's starting-noise seed. It was seed * 1_000_003 + b + 7_919, the starting-noise
    seed of batch b + 7919: that batch started from the noise of batch b's first SDE step (runs of
    more than 7,919 batches, e.g. 50k samples at --batch-size 6 or less)."""
    hi, lo = np.random.SeedSequence([seed % 2**64, b, 7_919]).generate_state(2, np.uint32)  # --seed may be < 0
    return ((int(hi) << 32) | int(lo)) >> 1  # 63 bits


def _merge(parts: Path, out: Path, run: dict, n: int, num_batches: int) -> None:
    """The parts into the final npz (rank 0), unless some samples decoded to NaN/Inf: those would be
    written as black images and enter gFID unnoticed, so the run is refused and the parts kept."""
    # two passes over the parts, one open at a time (1,563 parts for 50k would pass the usual 1,024
    # open files): labels, counts and the image shape first, then the images streamed into the npz,
    # so peak memory is one part, not the samples (39 GB for 50k at 512 px)
    labs, bad, first = [], 0, None  # first: (image shape, dtype)
    where: list[tuple[int, int | None, int]] = []  # (batch, index in the run or None, label or None) of bad samples
    for b in range(num_batches):
        with np.load(parts / f"b{b:07d}.npz") as a:
            labs.append(a["labels"])
            k = int(a["nonfinite"]) if "nonfinite" in a.files else 0  # parts of raebench before the count: 0
            bad += k
            if k and len(where) < _NAMED:
                at = a["nonfinite_at"] if "nonfinite_at" in a.files else None  # parts before the indices: the batch
                where += ([(b, None, None)] if at is None else
                          [(b, b * run["batch_size"] + int(i), int(a["labels"][i])) for i in at])
            if first is None:
                first = a["images"].shape[1:], a["images"].dtype
    if bad:
        from raebench.errors import NonFiniteError

        raise NonFiniteError(_nonfinite_message(bad, n, where[:_NAMED], run, parts))
    labs = np.concatenate(labs).astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    from raebench.metrics.sources import SETTINGS_KEY
    from raebench.results import provenance, save_npz_streamed_atomic

    def images():
        for b in range(num_batches):
            with np.load(parts / f"b{b:07d}.npz") as a:
                yield a["images"]

    # the settings travel with the samples: `raebench score` copies them into its rows
    prov = provenance()
    meta = {**run, "n": n, "raebench_version": prov["raebench_version"], "git_hash": prov["git_hash"]}
    save_npz_streamed_atomic(out, "arr_0", (n, *first[0]), first[1], images(), arr_1=labs, labels=labs,
                             **{SETTINGS_KEY: np.array(json.dumps(meta))})
    shutil.rmtree(parts, ignore_errors=True)
    log.debug("wrote %d samples to %s", n, out)


#: how many non-finite samples the refusal names
_NAMED = 5


def _nonfinite_message(bad: int, n: int, where: list, run: dict, parts: Path) -> str:
    """The refusal of a run with NaN/Inf samples: the first ones (index in the run, class label, batch), how
    to draw them again, and what to try."""
    named = ", ".join(f"some in batch {b}" if i is None else f"sample #{i} (class {y}, batch {b})" for b, i, y in where)
    more = f" and {bad - len(where)} more" if bad > len(where) and all(i is not None for _, i, _ in where) else ""
    tries = []
    if isinstance(run.get("cfg_scale"), (int, float)) and run["cfg_scale"] > 1:
        tries.append(f"a lower --cfg-scale (this run: {run['cfg_scale']:g})")
    if run.get("tf32"):
        tries.append("full float32 (drop --tf32)")
    tries.append("checking the checkpoint and the decoder (a model that diverged in training, or a damaged file)")
    note = " (#: the position in the sample file, from 0)" if any(i is not None for _, i, _ in where) else ""
    return (f"{bad} of {n} samples decoded to non-finite values (NaN/Inf): {named}{more}{note}. No sample file was "
            f"written; the parts stay in {parts}: delete that folder to sample again; the same command (same --num, "
            f"--seed {run.get('seed')}, --batch-size {run.get('batch_size')}) draws these samples again, as batch b "
            f"starts from noise seeded by (--seed, b). Try {'; '.join(tries)}.")


def save_grid(npz: str | os.PathLike, png: str | os.PathLike, n: int = 64) -> Path:
    """A PNG grid of the first ``n`` samples of an ADM npz; only their bytes are read (``np.load``
    would read the whole arr_0: 9.8 GB for 50k samples at 256 px). Written atomically: a job killed
    meanwhile leaves the earlier grid (or none), never a truncated PNG."""
    import io
    import zipfile

    from PIL import Image

    from raebench.results import atomic_write_bytes

    with zipfile.ZipFile(npz) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)  # C order: raebench writes it
        n = min(n, shape[0])
        arr = np.frombuffer(f.read(n * math.prod(shape[1:]) * dtype.itemsize), dtype).reshape(n, *shape[1:])
    cols = int(math.ceil(math.sqrt(len(arr))))
    rows = int(math.ceil(len(arr) / cols))
    h, w = arr.shape[1:3]
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, im in enumerate(arr):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(png, buf.getvalue())
    return Path(png)


def stage2_checkpoint(source: str | os.PathLike) -> Path:
    """A run folder (``checkpoints/last.pt`` inside) or a checkpoint file -> the checkpoint file."""
    from raebench.checkpoint import run_checkpoint

    return run_checkpoint(source, "stage-2")


def load_trained(checkpoint: str | os.PathLike, key: str = "ema") -> tuple[nn.Module, dict]:
    """A raebench stage-2 training checkpoint (or its run folder) -> (eval model, info with
    shift/latent_shape/config/step/data)."""
    import dataclasses

    from raebench.checkpoint import load_state
    from raebench.stage2.checkpoints import load_stage2_state
    from raebench.stage2.train import LEGACY_VALUES, TrainConfig, build_for_training
    from raebench.stage2.transport import shift_from_dims

    checkpoint = stage2_checkpoint(checkpoint)
    ck = load_state(checkpoint)
    if not isinstance(ck, dict) or not isinstance(ck.get("config"), dict) or "latent_shape" not in ck or key not in ck:
        raise CheckpointError(f"{str(checkpoint)!r} is not a raebench stage-2 training checkpoint; use --config for official ones.")
    unknown = sorted(set(ck["config"]) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CheckpointError(f"The config in {str(checkpoint)!r} has settings this raebench does not know "
                              f"({', '.join(unknown)}); it was written by another version.")
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in {**LEGACY_VALUES, **ck["config"]}.items()}
    cfg = TrainConfig(**fields)
    shape = tuple(ck["latent_shape"])
    model = load_stage2_state(build_for_training(cfg, shape), ck[key]).eval()
    return model, {"config": cfg, "latent_shape": shape, "shift": shift_from_dims(math.prod(shape), cfg.shift_base),
                   "step": ck.get("step"), "data": ck.get("data")}
