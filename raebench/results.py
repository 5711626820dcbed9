"""Results: rows with provenance, stored append-only and atomically, read back as pandas.

Storage: ``<results>/runs/<run_id>.jsonl``, one file per run, written to a temporary name, fsynced
and renamed, so a crash leaves either the whole file or nothing, and two evaluations writing to the
same directory never touch the same file (rows are merged on read). Files that fail to parse (a
half-written file from a filesystem without atomic rename) are skipped with a warning.

One row per measurement (``KEY_COLUMNS``: tokenizer, weights, precision, data and candidate
fingerprints, resolution, n, seed, metric and its version, and the weights of the metric's networks,
``metric_networks``, which :func:`load` derives from ``extra.metric_weights``); the stored columns are ``COLUMNS``.
``SCHEMA_VERSION`` is stored in every row from day one. Version 2 added ``precision``,
``candidates_fingerprint`` (score rows) and ``written_ns`` (write order); :func:`load` fills them
for version-1 rows from ``extra`` (``fp32``, ``""``, 0), so older files keep loading.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
DEFAULT_RESULTS_DIR = "results"

#: the identity of a measurement: rows equal on these describe the same number
KEY_COLUMNS = (
    "tokenizer", "weights_id", "precision", "dataset", "split", "resolution", "n_images", "seed", "metric",
    "metric_version", "data_fingerprint", "candidates_fingerprint", "metric_networks",
)
#: newest last: the date (seconds), then the write time in ns (0 in version-1 rows), then the run id
ORDER_COLUMNS = ("date", "written_ns", "run_id")


@dataclass
class ResultRow:
    tokenizer: str
    weights_id: str
    dataset: str
    split: str
    domain: str
    resolution: int
    n_images: int
    metric: str
    value: float
    higher_is_better: bool | None
    metric_version: str
    seed: int = 0
    data_fingerprint: str = ""  # see ImageList.fingerprint: relative paths + sizes of the images used
    skipped: int = 0
    nonfinite: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    source: str = "measured"  # or "reported" (a number from a paper or model card)
    notes: str = ""
    run_id: str = ""
    date: str = ""
    raebench_version: str = ""
    torch_version: str = ""
    git_hash: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # of the tokenizer's forward (bf16 changes every latent)
    candidates_fingerprint: str = ""  # score rows: the scored set (data_fingerprint is the references')
    written_ns: int = 0  # set by write_rows: orders rows written within one second


COLUMNS = tuple(ResultRow.__dataclass_fields__)
#: columns :func:`load` derives from the stored ones (not stored themselves): ``metric_networks``, see
#: :func:`metric_networks`
DERIVED_COLUMNS = ("metric_networks",)


def metric_networks(metric: str, extra: Any) -> str:
    """The identity of the weights of the networks behind a row of ``metric`` (Inception for FID, the
    LPIPS or DreamSim weights, ...), as the row records them in ``extra.metric_weights``: 12 hex digits
    of the identities recorded for that metric's own networks (:func:`raebench.metrics.network_keys`;
    a run's other metrics' networks do not count), '' for a metric without networks, and for rows that
    recorded none (published numbers, analysis rows, whose versions carry their weights)."""
    import hashlib

    recorded = extra.get("metric_weights") if isinstance(extra, dict) else None
    if not isinstance(recorded, dict) or not recorded:
        return ""
    mine = {k: recorded[k] for k in _network_keys(metric) if k in recorded}
    return hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()[:12] if mine else ""


@lru_cache(maxsize=None)
def _network_keys(metric: str) -> tuple[str, ...]:
    from raebench.metrics import network_keys

    return network_keys(metric)


@lru_cache(maxsize=1)
def git_hash() -> str:
    """The raebench source tree's commit (``+dirty`` if modified), or '' outside a checkout (an
    installed wheel); see :func:`source_commit`."""
    return source_commit(Path(__file__))


def source_commit(source: Path) -> str:
    """The commit of the git checkout that tracks the file ``source`` (``+dirty`` if that checkout has
    modified tracked files), or '' when no checkout tracks it.

    Only a repository that tracks ``source`` itself counts: an installed raebench inside a virtual
    environment inside the user's own project (``myproject/.venv/...``) would otherwise record the
    project's commit. The caller's ``GIT_DIR`` and other ``GIT_*`` variables are ignored for the same
    reason (they point git at another repository whatever ``-C`` says)."""
    source = Path(source).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(source.parent), *args], capture_output=True, text=True, timeout=5,
                              env=env, check=False)

    try:
        if git("ls-files", "--error-unmatch", "--", source.name).returncode != 0:
            return ""  # not in a checkout, or in one that does not track this file
        h = git("rev-parse", "--short=12", "HEAD")
        if h.returncode != 0:
            return ""
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return h.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance() -> dict[str, str]:
    import torch

    import raebench

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "raebench_version": raebench.__version__,
        "torch_version": torch.__version__,
        "git_hash": git_hash(),
    }


#: distributions whose versions can change a number (decoding, resizing, SSIM, metric networks, models)
VERSIONED_PACKAGES = ("numpy", "scipy", "pillow", "scikit-image", "torchvision", "diffusers", "transformers", "timm",
                      "safetensors", "torch-fidelity", "lpips", "dreamsim")


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Python and the installed versions of :data:`VERSIONED_PACKAGES` (absent ones left out), plus
    the CUDA runtime torch was built with; recorded in every row's ``extra["packages"]``."""
    import platform
    from importlib import metadata

    import torch

    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def device_name(device: str) -> str:
    """The model of the GPU a row's ``device`` (``cuda``, ``cuda:1``, ``cuda:0 x8``) names, as CUDA reports
    it (``NVIDIA H100 80GB HBM3``); '' for other devices or when CUDA cannot say. ``cuda:0`` alone does not
    tell an H100 from an A100, whose float32 convolutions (and timings) differ."""
    dev = str(device).split(" ")[0]
    if not dev.startswith("cuda"):
        return ""
    try:
        import torch

        if not torch.cuda.is_available():
            return ""
        index = int(dev.partition(":")[2]) if ":" in dev else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    except Exception:  # noqa: BLE001 -- provenance must never fail the write of finished results
        return ""


_clock = threading.Lock()
_last_ns = 0


def _write_ns() -> int:
    """Wall-clock nanoseconds, strictly increasing within this process."""
    global _last_ns
    with _clock:
        _last_ns = max(time.time_ns(), _last_ns + 1)
        return _last_ns


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; when the block finishes, fsync it and rename it
    to ``path`` (a crash leaves the old file or the new one, never half); on error, remove it.
    ``suffix`` lets writers that insist on an extension (``np.savez``) keep it. ``mode``: the new
    file's permissions (default: 0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    if mode is None:
        mode = 0o666 & ~_umask()  # mkstemp's 0600 would hide results from the other users
    try:
        os.chmod(tmp, mode)
        yield Path(tmp)
        os.chmod(tmp, mode)  # again: a writer may have replaced the file (safetensors' save_file makes it 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        remove_orphan_temps(path.parent, of=path.name, older_than=STALE_TEMP_SECONDS)  # of writers killed mid-save
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


#: a temporary file untouched this long was left by a killed writer (a live one keeps writing)
STALE_TEMP_SECONDS = 3600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_orphan_temps(folder: str | os.PathLike, of: str | None = None, older_than: float | None = None) -> int:
    """Remove the temporary files that :func:`atomic_path` writers killed mid-save left in ``folder``
    (``.NAME.RANDOM.SUFFIX``), only those of the file named ``of`` when given; returns how many.
    ``older_than`` (seconds): only files untouched that long, where a live writer may still own the
    fresh ones; None: all, for a caller whose writers are known to be gone (it holds their
    :mod:`raebench.locks` lock)."""
    import re

    name = re.escape(of) if of is not None else ".+"
    pattern = re.compile(rf"^\.{name}\.[a-z0-9_]+(\.tmp|\.npz)$")  # mkstemp's names, the suffixes in use
    cutoff = None if older_than is None else time.time() - older_than
    removed = 0
    for old in Path(folder).glob(".*"):
        try:
            if pattern.match(old.name) and old.is_file() and (cutoff is None or old.stat().st_mtime < cutoff):
                old.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def save_npz_atomic(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` to ``path`` atomically (see :func:`atomic_path`)."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, **arrays)


def save_npz_streamed_atomic(path: str | os.PathLike, key: str, shape: tuple[int, ...], dtype, chunks: Iterable,
                             **arrays) -> None:
    """``np.savez(path, **{key: concatenation of chunks}, **arrays)``, atomically, without the
    concatenation in memory: ``chunks`` (arrays of ``shape[1:]`` rows, ``shape[0]`` rows in all) are
    written one after the other into the ``key`` member, as ``np.savez`` lays it out (stored, npy
    header version 1.0), so a 50k-image 512-px sample file (39 GB) needs one chunk of memory."""
    import zipfile

    import numpy as np

    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    with atomic_path(path, suffix=".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            rows = 0
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                if chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{key}: a chunk of shape {chunk.shape} does not fit {tuple(shape)}")
                rows += chunk.shape[0]
                f.write(chunk.data)
            if rows != shape[0]:
                raise ValueError(f"{key}: {rows} rows written, {shape[0]} announced")
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def check_writable(results_dir: str | os.PathLike, need_bytes: int = 1 << 20) -> None:
    """Fail before heavy work if the results folder cannot be written or the disk is full."""
    from raebench.errors import RaebenchError

    d = Path(results_dir) / "runs"
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise RaebenchError(f"Results folder {str(d)!r} is not writable ({e.strerror}); pass another with --results.") from None
    free = os_free_bytes(d)
    if free is not None and free < need_bytes:
        raise RaebenchError(f"Only {free} bytes free under {str(d)!r}; free some space or pass another --results folder.")


def os_free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except (OSError, AttributeError):
        return None


def run_file(results_dir: str | os.PathLike, run_id: str) -> Path:
    """The file that holds the rows of run ``run_id`` under ``results_dir``."""
    return Path(results_dir) / "runs" / f"{run_id}.jsonl"


def write_rows(rows: Iterable[ResultRow], results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, run_id: str | None = None) -> Path:
    """Append rows as one new run file (atomic). Returns its path."""
    rows = list(rows)
    run_id = run_id or (rows[0].run_id if rows and rows[0].run_id else new_run_id())
    prov = provenance()
    written = _write_ns()
    lines = []
    for r in rows:
        d = asdict(r)
        d["run_id"] = run_id
        d["written_ns"] = written
        if isinstance(d["extra"], dict) and d["extra"].get("precision"):
            d["precision"] = d["extra"]["precision"]  # writers that record it only in extra
        if isinstance(d["extra"], dict) and r.source == "measured":
            d["extra"] = {**d["extra"], "packages": d["extra"].get("packages") or package_versions()}
            gpu = d["extra"].get("device_name") or device_name(r.device)
            if gpu:
                d["extra"]["device_name"] = gpu
        for k, v in prov.items():
            if not d.get(k):
                d[k] = v
        lines.append(json.dumps(d, sort_keys=True, allow_nan=True))
    path = run_file(results_dir, run_id)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    # every run file has its own name, so its own writes clean nothing else: old temps of any run
    remove_orphan_temps(path.parent, older_than=STALE_TEMP_SECONDS)
    return path


_warned_newer: set[tuple[str, int]] = set()  # (runs folder, rows) already warned about in this process


def load(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, latest: bool = True) -> pd.DataFrame:
    """All result rows under ``results_dir`` as a DataFrame (columns ``COLUMNS``, then ``DERIVED_COLUMNS``),
    oldest first.

    ``latest=True`` keeps, for each measurement key (``KEY_COLUMNS``), only the newest row (by
    ``ORDER_COLUMNS``). Lines that are not JSON row objects are skipped with a warning.
    """
    d = Path(results_dir) / "runs"
    records: list[dict] = []
    if d.is_dir():
        for f in sorted(d.glob("*.jsonl")):
            rows = _read_run_file(f)
            if rows is not None:
                records.extend(rows)
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS)) if records else \
        pd.DataFrame(columns=[*COLUMNS, *DERIVED_COLUMNS])
    if records:
        schema = pd.to_numeric(df["schema_version"], errors="coerce")
        n_newer = int((schema > SCHEMA_VERSION).sum())
        if n_newer and (str(d), n_newer) not in _warned_newer:  # once per folder (compare loads it often)
            _warned_newer.add((str(d), n_newer))
            # columns this version does not know are dropped, and their meaning may have moved
            log.warning("%d row(s) under %s were written by a newer raebench (schema %d; this one reads %d): "
                        "upgrade raebench to read them fully.", n_newer, d, int(schema.max()), SCHEMA_VERSION)
        df = _fill_v1(df)
        df = sort_newest_last(df)
        if latest:
            df = df.drop_duplicates(subset=list(KEY_COLUMNS), keep="last")
    return df.reset_index(drop=True)


#: parsed run files by path, with the (inode, size, mtime) they were read at: run files are written once
#: (atomic rename) and never edited, so ``compare``, which loads the folder once per tokenizer, parses
#: each file once per process (a 100k-row folder took ~6 s a load)
_parsed: dict[str, tuple[tuple[int, int, int], list[dict]]] = {}
_parsed_lock = threading.Lock()


def _read_run_file(f: Path) -> list[dict] | None:
    """The result rows of one run file (a damaged line costs that line, with a warning), or None if
    it cannot be read. Callers must not modify the returned rows (they are shared between loads)."""
    try:
        with open(f, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            with _parsed_lock:
                hit = _parsed.get(os.path.abspath(f))
            if hit is not None and hit[0] == key:
                return hit[1]
            lines = [line for line in fh if line.strip()]
    except OSError as e:
        log.warning("ignoring unreadable results file %s (%s)", f, e)
        return None
    recs, bad = [], 0
    for line in lines:  # one damaged line costs that line, not the file's other rows
        try:
            recs.append(json.loads(line.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
    good = [r for r in recs if _is_row(r)]
    bad += len(recs) - len(good)
    if bad:
        log.warning("ignoring %d line(s) of %s that are not result rows", bad, f)
    with _parsed_lock:
        _parsed[os.path.abspath(f)] = (key, good)
    return good


def _is_row(r) -> bool:
    """A JSON object with the columns every row has, of usable types: text tokenizer, dataset and metric,
    a number (or null) as value, plain values (not lists or objects) in the other key columns, and a
    known source. Anything else would break every table built from the folder, or vanish from it."""
    if not (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("tokenizer", "dataset", "metric"))
            and "value" in r and r.get("source") in (None, "measured", "reported")):
        return False
    if any(isinstance(r.get(k), (list, dict, bool)) for k in KEY_COLUMNS):
        return False
    v = r["value"]
    if isinstance(v, int) and not isinstance(v, bool):
        return abs(v) < 2 ** 1023  # a float, as every value is read (a 400-digit integer is not)
    return v is None or isinstance(v, float)


def _fill_v1(df: pd.DataFrame) -> pd.DataFrame:
    """Columns that version-1 rows lack (precision and the candidates' fingerprint, from ``extra``), and
    the derived ``metric_networks``."""
    extra = [e if isinstance(e, dict) else {} for e in df["extra"].tolist()]
    def col(name: str) -> list:  # a list: iterating pandas' string arrays is ~10x slower
        return df[name].tolist()

    def text(v) -> str:
        return v if isinstance(v, str) else ""

    return df.assign(
        metric_networks=[metric_networks(m, e) for m, e in zip(col("metric"), extra)],
        precision=[text(e.get("precision")) or text(p) or "fp32" for e, p in zip(extra, col("precision"))],
        candidates_fingerprint=[text(c) or text(e.get("candidates_fingerprint"))
                                for e, c in zip(extra, col("candidates_fingerprint"))],
        data_fingerprint=[text(v) for v in col("data_fingerprint")],
        written_ns=pd.to_numeric(df["written_ns"], errors="coerce").fillna(0).astype("int64"),
        date=[text(v) for v in col("date")],
        run_id=[text(v) for v in col("run_id")],
        extra=extra,
    )


def sort_newest_last(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` ordered oldest to newest (``ORDER_COLUMNS`` where present), stable otherwise."""
    cols = [c for c in ORDER_COLUMNS if c in df]
    if not cols or df.empty:
        return df
    key = {c: df[c].fillna(0 if c == "written_ns" else "") for c in cols}
    order = pd.DataFrame(key).sort_values(cols, kind="stable").index
    return df.loc[order]
