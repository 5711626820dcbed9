"""How raebench's I/O and memory grow with N, on synthetic data (no network, no GPU).

    python bench/bench_scale.py resume --n 1280 5120 20480          # eval/score resume saves
    python bench/bench_scale.py npz --n 1000 4000 16000 --res 64     # npz shard seek, merges
    python bench/bench_scale.py reconstruct --n 1000 4000 --res 64   # reconstruct's npz writing
    python bench/bench_scale.py folder --n 1000 4000 16000           # listing + fingerprint

* ``resume``: the metric states an evaluation saves every 20 batches (``WorkState``), fed with
  random features of the real widths (Inception pool 2048, logits 1008) for precision, density,
  KID, IS, FID and PSNR-like per-image scores, batch 64, as ``raebench.evaluate`` saves them. Prints
  the bytes written by all saves and their time: a save that rewrites everything grows as N².
* ``npz``: time to reach the last shard of an ADM ``.npz`` (what rank W-1 of a torchrun scoring,
  or a resumed one, does first), the peak memory of ``raebench sample``'s merge of its parts and
  of ``raebench reconstruct``'s writing of its npz files (fresh processes, ``ru_maxrss``).
* ``reconstruct``: peak memory of ``raebench reconstruct --references --no-png`` (identity
  tokenizer) over N images, in a fresh process.
* ``features``: precision/recall, density/coverage and KID asked together (three metrics that keep
  both sides' Inception pool features whole), fed N random 2048-d features per side in batches as
  the evaluator dispatches them (one batch object to every metric), saved every 20 batches as
  ``WorkState`` does: peak RSS of that process (VmHWM) and what the features add to it, the bytes
  the saves wrote, the resume files' size, and the peak RSS of a fresh process that loads them and
  merges them into fresh metrics (a resume). The metrics' ``compute()`` is not run (N² on the CPU).
* ``folder``: ``scan_folder`` and the data fingerprint over N small files, warm and cold (pages
  dropped with ``posix_fadvise``), per file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def bench_resume(n: int, batch: int = 64, save_every: int = 20, metrics=("precision", "density", "kid", "is", "fid", "psnr")) -> dict:
    from raebench.eval_progress import WorkState
    from raebench.metrics import METRICS, MetricBatch

    ms = [METRICS.get(m).build() for m in metrics]
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="raebench-resume-") as root:
        work = WorkState(root, "bench", 0)
        work.acquire()
        written, t_save, saves = 0, 0.0, 0
        for i, start in enumerate(range(0, n, batch)):
            k = min(batch, n - start)
            pool = torch.randn(k, 2048, generator=g)
            logits = torch.randn(k, 1008, generator=g)
            feats = {"inception": ({"pool": pool, "logits": logits}, {"pool": pool + 0.1, "logits": logits})}
            img = torch.randint(0, 256, (k, 3, 8, 8), dtype=torch.uint8, generator=g)
            b = MetricBatch(reference=img, candidate=img, features=feats)
            for m in ms:
                if m.spec.kind == "paired":
                    m.values.append(torch.rand(k, dtype=torch.float64, generator=g))  # a per-image score
                else:
                    m.update(b)
            if (i + 1) % save_every == 0:
                before = _wchar()
                t = time.perf_counter()
                work.save({"shard": [0, n], "done": start + k, "n_used": start + k, "metrics": [m.state() for m in ms],
                           "skipped": [], "upscaled": [], "nonfinite": [], "seconds": 0.0})
                t_save += time.perf_counter() - t
                saves += 1
                written += _wchar() - before
        on_disk = _dir_bytes(work.dir)
        t = time.perf_counter()
        st = work.load()
        t_load = time.perf_counter() - t
        assert st is not None and st["done"] == (saves * save_every * batch if saves else 0)
        work.release(remove=True)
    return {"n": n, "saves": saves, "written_MB": written / 2**20, "save_s": t_save, "on_disk_MB": on_disk / 2**20,
            "load_s": t_load}


def _wchar() -> int:
    """Bytes this process has passed to write() so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _features_feed(n: int, root: str, batch: int, save_every: int, metrics: tuple[str, ...]) -> dict:
    """In a fresh process: ``metrics`` fed N random pool features per side, saved as eval saves them."""
    from raebench.eval_progress import WorkState
    from raebench.metrics import METRICS, MetricBatch

    ms = [METRICS.get(m).build() for m in metrics]
    work = WorkState(root, "bench", 0)
    work.acquire()
    g = torch.Generator().manual_seed(0)
    base = _status_kib("VmRSS")
    written, saves = 0, 0
    for i, start in enumerate(range(0, n, batch)):
        k = min(batch, n - start)
        feats = {"inception": ({"pool": torch.randn(k, 2048, generator=g)}, {"pool": torch.randn(k, 2048, generator=g)})}
        b = MetricBatch(reference=None, candidate=None, features=feats)  # one batch for every metric, as _dispatch
        for m in ms:
            m.update(b)
        if (i + 1) % save_every == 0 or start + k == n:
            before = _wchar()
            work.save({"done": start + k, "metrics": [m.state() for m in ms]})
            written += _wchar() - before
            saves += 1
    work.release(remove=False)
    return {"n": n, "saves": saves, "peak_rss_MB": _status_kib("VmHWM") / 1024,
            "features_rss_MB": (_status_kib("VmRSS") - base) / 1024, "written_MB": written / 2**20}


def _features_resume(n: int, root: str, metrics: tuple[str, ...]) -> dict:
    """In a fresh process: the saved state loaded and merged into fresh metrics (what a resume does)."""
    from raebench.eval_progress import WorkState
    from raebench.metrics import METRICS

    ms = [METRICS.get(m).build() for m in metrics]
    base = _status_kib("VmRSS")
    work = WorkState(root, "bench", 0)
    st = work.load()
    assert st is not None and st["done"] == n
    for m, s in zip(ms, st["metrics"]):
        m.merge(s)
    del st
    # the resume files are memory-mapped: pages count in the RSS once read, as compute() reads them all
    kept = {t.untyped_storage().data_ptr(): t for m in ms for v in m.state().values() if isinstance(v, list) for t in v}
    for m in ms:
        for v in m.state().values():
            for t in v if isinstance(v, list) else ():
                t.sum()
    held = sum(t.untyped_storage().nbytes() for t in kept.values())
    return {"resume_peak_rss_MB": _status_kib("VmHWM") / 1024, "resume_rss_MB": (_status_kib("VmRSS") - base) / 1024,
            "resume_held_MB": held / 2**20}


def bench_features(n: int, batch: int = 64, save_every: int = 20, metrics=("precision", "density", "kid")) -> dict:
    import json

    here = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory(prefix="raebench-features-") as root:
        out = {}
        for call in (f"_features_feed({n}, {root!r}, {batch}, {save_every}, {metrics!r})",
                     f"_features_resume({n}, {root!r}, {metrics!r})"):
            code = f"import json, sys\nsys.path.insert(0, {here!r})\nimport bench_scale as b\nprint(json.dumps(b.{call}))"
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
            if res.returncode:
                raise RuntimeError(res.stderr)
            out.update(json.loads(res.stdout.strip().splitlines()[-1]))
        out["on_disk_MB"] = _dir_bytes(Path(root) / ".work") / 2**20
    return out


def _child(code: str) -> float:
    """Run ``code`` in a fresh interpreter; its peak RSS in MiB. VmHWM, not ``ru_maxrss``: a child's
    ``ru_maxrss`` starts at its parent's RSS at the fork and survives the exec."""
    hwm = "\nprint([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    out = subprocess.run([sys.executable, "-c", code + hwm], check=True, capture_output=True, text=True, env={**os.environ})
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def bench_npz(n: int, res: int, batch: int = 64) -> dict:
    from raebench.metrics.sources import _npz_batches

    with tempfile.TemporaryDirectory(prefix="raebench-npz-") as d:
        path = Path(d) / "s.npz"
        arr = np.lib.format.open_memmap(Path(d) / "a.npy", mode="w+", dtype=np.uint8, shape=(n, res, res, 3))
        arr[:] = np.arange(n, dtype=np.uint8)[:, None, None, None]
        arr.flush()
        del arr
        np.savez(path, arr_0=np.load(Path(d) / "a.npy", mmap_mode="r"))
        os.unlink(Path(d) / "a.npy")
        lo = n - n // 8  # the last of 8 ranks
        t = time.perf_counter()
        idx, first = next(_npz_batches(path, batch, lo, n))
        t_seek = time.perf_counter() - t
        assert int(idx[0]) == lo and int(first[0, 0, 0, 0]) == lo % 256
        # raebench sample's merge of its parts (one per batch), in a fresh process
        parts = Path(d) / ".out.npz.parts"
        parts.mkdir()
        for b in range(0, n, batch):
            k = min(batch, n - b)
            np.savez(parts / f"b{b // batch:07d}.npz", images=np.full((k, res, res, 3), b % 251, np.uint8),
                     labels=np.arange(b, b + k), nonfinite=np.array(0))
        code = (f"from pathlib import Path\nfrom raebench.stage2.sample import _merge\n"
                f"_merge(Path({str(parts)!r}), Path({str(Path(d) / 'out.npz')!r}), {{}}, {n}, {-(-n // batch)})")
        t = time.perf_counter()
        rss_merge = _child(code)
        t_merge = time.perf_counter() - t
        with np.load(Path(d) / "out.npz") as z:
            assert z["arr_0"].shape == (n, res, res, 3)
    return {"n": n, "res": res, "file_MB": n * res * res * 3 / 2**20, "seek_last_shard_s": t_seek,
            "merge_peak_rss_MB": rss_merge, "merge_s": t_merge}


def bench_reconstruct(n: int, res: int, batch: int = 64) -> dict:
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="raebench-rec-") as d:
        src = Path(d) / "src"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(src / f"{i:06d}.bmp")
        code = (f"from raebench.cli.rae_cmds import write_reconstructions\nfrom raebench.data import resolve_data\n"
                f"from raebench.tokenizers.reference import PixelTokenizer\n"
                f"write_reconstructions(PixelTokenizer(), resolve_data({str(src)!r}), {str(Path(d) / 'out')!r}, "
                f"resolution={res}, batch_size={batch}, png=False, references=True)")
        t = time.perf_counter()
        rss = _child(code)
        secs = time.perf_counter() - t
    return {"n": n, "res": res, "set_MB": n * res * res * 3 / 2**20, "peak_rss_MB": rss, "s": secs}


def bench_folder(n: int) -> dict:
    from raebench.folders import scan_folder

    with tempfile.TemporaryDirectory(prefix="raebench-folder-") as root:
        payload = os.urandom(40000)
        for i in range(n):  # 100 class folders, 20-40 KB files (the fingerprint reads 16 KiB of each)
            d = os.path.join(root, f"n{i % 100:08d}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"img_{i:08d}.JPEG"), "wb") as f:
                f.write(payload[: 20000 + (i * 37) % 20000])
        t = time.perf_counter()
        images = scan_folder(root)
        t_scan = time.perf_counter() - t
        t = time.perf_counter()
        images._compute_fingerprint()
        t_warm = time.perf_counter() - t
        for p in images.paths:
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)  # dirty pages (files just written) are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t = time.perf_counter()
        images._compute_fingerprint()
        t_cold = time.perf_counter() - t
    return {"n": n, "scan_us_per_file": 1e6 * t_scan / n, "fingerprint_warm_us_per_file": 1e6 * t_warm / n,
            "fingerprint_cold_us_per_file": 1e6 * t_cold / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("resume", "npz", "reconstruct", "folder", "features"))
    ap.add_argument("--n", type=int, nargs="+", default=[1280, 5120])
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for n in args.n:
        if args.what == "resume":
            r = bench_resume(n, args.batch)
        elif args.what == "npz":
            r = bench_npz(n, args.res, args.batch)
        elif args.what == "features":
            r = bench_features(n, args.batch)
        elif args.what == "reconstruct":
            r = bench_reconstruct(n, args.res, args.batch)
        else:
            r = bench_folder(n)
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
