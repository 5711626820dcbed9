"""Randomised crash-resume fuzz of raebench's long jobs (README "Long jobs", "Crash-safe").

For each job it runs the command once uninterrupted (the reference), then K trials: the same command
in a fresh output folder, SIGKILLed (the whole process group) 1, 2 or 3 times in a row at random
moments (each re-run of the command is killed in turn, so the later kills hit a resume), then run
to completion. The finished outputs are compared with the reference: result rows' values,
checkpoint tensors, npz/npy arrays, JSON/CSV contents (wall-clock fields aside), and the set of
files (no temporary or half-written file may remain, none may be missing). After every kill the
results folder of `eval`/`score` must still be read by `raebench leaderboard` and `compare`.

Kill moments, chosen per kill: `uniform` over the measured uninterrupted duration (start-up
included), `late` (the last 15 %: final merges and writes), or `on-write` (as soon as a temporary
file of an atomic write shows up in an output folder, after a random delay: checkpoint, npz, cache
and results writes); for torchrun jobs also `rank`: one worker SIGKILLed, not the launcher, whose
agent must then stop the other rank and exit within RANK_EXIT_BOUND_S (not wait out the collective
timeout). After every kill and every trial no process naming the trial folder may be left running.

    python bench/fuzz_kill_resume.py                      # every job, 12 trials each
    python bench/fuzz_kill_resume.py --jobs eval,sample --trials 20 --seed 3 --keep

Exit status 1 when any trial found a defect; the matrix job x kills is printed at the end.
Offline and on the CPU, with random weights (the environment variables the tests use).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
RUN_ID = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")
# fields that legitimately differ between runs (wall clock, run identity)
VOLATILE = {"date", "run_id", "seconds", "written_ns", "time", "elapsed", "id", "started", "wall_s",
            "images_per_second", "steps_per_second", "sec_per_step", "git_hash"}
# the unseeded global Python/NumPy generators a trainer saves with its checkpoint: nothing draws from them (every
# draw comes from generators seeded by (seed, step, position)), so two uninterrupted runs differ there too
UNSEEDED = re.compile(r"/rng(\[\d+\])?/(python|numpy)$")
TEMP = re.compile(r"^\..+\.[a-z0-9_]+\.(tmp|npz)$|\.tmp$|^\.part-|\.partial$")


def env_for(work: Path, trial: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "RAEBENCH_CACHE": str(trial / "cache"), "RAEBENCH_LPIPS_ALEX_WEIGHTS": str(work / "alex.pth"),
           "RAEBENCH_INCEPTION_WEIGHTS": str(work / "inception.pth")}
    return env


# ---------------------------------------------------------------- fixtures (built once)

def build_fixtures(work: Path) -> None:
    if (work / "fixtures.done").is_file():
        return
    code = r"""
import json, sys, numpy as np, torch, torchvision
from pathlib import Path
from PIL import Image
w = Path(sys.argv[1])
rng = np.random.default_rng(0)
for name, n in (("images", 48), ("refs", 12), ("cands", 12)):
    for i in range(n):
        d = w / name / f"class_{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
np.savez(w / "cands.npz", arr_0=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
torch.manual_seed(0)
torch.save(torchvision.models.alexnet().state_dict(), w / "alex.pth")
sys.path.insert(0, sys.argv[2])  # the tests' helper for random torch-fidelity Inception weights
from _metrics_helpers import random_inception_weights
random_inception_weights(w / "inception.pth")
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8, image_size=32,
    num_register_tokens=4)).save_pretrained(w / "encoder")
with open(w / "encoder" / "preprocessor_config.json", "w") as f:
    json.dump({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, f)
"""
    subprocess.run([PY, "-c", code, str(work), str(REPO / "tests")], check=True, env=env_for(work, work))
    # inputs other jobs start from: a latent cache (stage 2) and a stage-2 checkpoint (sample)
    run([PY, "-m", "raebench", "cache-latents", "-t", "pixels", "--data", str(work / "images"), "-o",
         str(work / "latents"), "-r", "8", "-b", "8", "--device", "cpu"], env_for(work, work))
    run([PY, "-m", "raebench", "train", "stage2", "-p", "tiny", "--num-classes", "2", "-b", "8", "--device", "cpu",
         "--latents", str(work / "latents"), "-o", str(work / "s2"), "--precision", "fp32", "--max-steps", "4"],
        env_for(work, work))
    (work / "fixtures.done").write_text("ok")


def run(argv, env, timeout=600):
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise SystemExit(f"fixture command failed ({p.returncode}): {' '.join(argv)}\n{p.stderr[-3000:]}")
    return p


# ---------------------------------------------------------------- the jobs

# the `-eager` jobs: the CLI with its resume states saved far more often than by default (evaluations every
# 2 batches instead of 20, latent caches after every batch instead of every 30 s), so that tiny jobs
# resume from saved states, and kills land in those saves
EAGER = r"""
import functools, sys
import raebench.evaluate as e, raebench.metrics.scoring as s, raebench.stage2.latents as l
l.SAVE_SECONDS = 0.0
e.evaluate = functools.partial(e.evaluate, save_every=2)
s.score = functools.partial(s.score, save_every=2)
from raebench.cli import main
main(sys.argv[1:])
"""

def jobs(work: Path) -> dict:
    """name -> (argv for a trial folder T, outputs: folders/files under T to compare, results folder or None,
    the `compare` arguments that must reuse every row of a finished eval, or None)."""
    rb = [PY, "-m", "raebench"]

    def cmp(tok, data, metrics):
        return lambda t: ["compare", "-t", tok, "--data", str(work / data), "-r", "32", "-m", metrics, "-b", "1",
                          "--results", str(t / "res"), "--device", "cpu", "--reported", "none"]

    s1 = ["train", "stage1", "-p", "tiny", "--data", str(work / "images"), "--encoder", str(work / "encoder"),
          "--device", "cpu", "--set", "disc_start_epoch=0.5", "--set", "gan_start_epoch=1", "--set", "sample_every=0",
          "--set", "ckpt_every=2", "--name", "fz", "--precision", "fp32", "--max-steps", "16"]
    table = {
        "eval": (lambda t: rb + ["eval", "-t", "bicubic-f8", "--data", str(work / "images"), "-r", "32", "-m",
                                 "psnr,ssim,lpips-alex", "-b", "1", "--results", str(t / "res"), "--device", "cpu"],
                 ["res", "cache"], "res", cmp("bicubic-f8", "images", "psnr,ssim,lpips-alex")),
        "eval-pixels-fid": (lambda t: rb + ["eval", "-t", "pixels", "--data", str(work / "refs"), "-r", "32", "-m",
                                            "psnr,ssim,fid", "-b", "1", "--results", str(t / "res"), "--device", "cpu"],
                            ["res", "cache"], "res", cmp("pixels", "refs", "psnr,ssim,fid")),
        "score": (lambda t: rb + ["score", "--references", str(work / "refs"), "--candidates", str(work / "cands"),
                                  "-m", "psnr,ssim,fid", "-b", "1", "--results", str(t / "res"), "--device", "cpu"],
                  ["res", "cache"], "res", None),
        # three metrics that keep one shared copy of both sides' Inception features (MetricBatch.kept)
        "score-knn": (lambda t: rb + ["score", "--references", str(work / "refs"), "--candidates", str(work / "cands"),
                                      "-m", "precision,density,kid", "-b", "1", "--results", str(t / "res"),
                                      "--device", "cpu"],
                      ["res", "cache"], "res", None),
        "eval-samples": (lambda t: rb + ["eval", "--samples", str(work / "cands.npz"), "--reference",
                                         str(work / "refs"), "-r", "32", "-m", "fid,kid", "-b", "1", "--results",
                                         str(t / "res"), "--device", "cpu"],
                         ["res", "cache"], "res", None),
        "cache-latents": (lambda t: rb + ["cache-latents", "-t", "pixels", "--data", str(work / "images"), "-o",
                                          str(t / "latents"), "-r", "8", "-b", "2", "--device", "cpu"],
                          ["latents"], None, None),
        "stage1": (lambda t: rb + s1 + ["--results", str(t / "res")], ["res"], None, None),
        "stage2": (lambda t: rb + ["train", "stage2", "-p", "tiny", "--num-classes", "2", "-b", "8", "--device", "cpu",
                                   "--latents", str(work / "latents"), "-o", str(t / "run"), "--precision", "fp32",
                                   "--max-steps", "24", "--ckpt-every", "3", "--keep-every", "12", "--log-every", "1"],
                   ["run"], None, None),
        "sample": (lambda t: rb + ["sample", "-c", str(work / "s2" / "checkpoints" / "last.pt"), "-n", "24",
                                   "--steps", "6", "--method", "heun", "--cfg-scale", "2", "-b", "2", "-o",
                                   str(t / "s.npz"), "--grid", str(t / "grid.png"), "--device", "cpu"],
                   ["."], None, None),
    }
    # the same commands under torchrun, 2 processes (gloo on the CPU): per-rank states, the merge on rank 0
    tr = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "raebench"]
    for name in ("eval", "sample", "cache-latents", "stage1", "stage2"):
        argv_of, *rest = table[name]
        table[f"{name}-ddp"] = (lambda t, a=argv_of: tr + a(t)[3:], *rest)
    for name in ("eval-pixels-fid", "score", "score-knn", "eval-samples", "cache-latents"):
        argv_of, *rest = table[name]
        table[f"{name}-eager"] = (lambda t, a=argv_of: [PY, "-c", EAGER] + a(t)[3:], *rest)
    return table


def reuses(job: str) -> bool:
    """Whether a re-run of ``job`` once finished reuses its stored rows instead of measuring again (eval, not
    eval --samples or score: README "Results")."""
    return job.startswith("eval") and not job.startswith("eval-samples")


# ---------------------------------------------------------------- running and killing

def walk(root: Path, outputs) -> list[Path]:
    files = []
    for o in outputs:
        p = root / o
        if p.is_file():
            files.append(p)
        elif p.is_dir():  # os.walk: the job may remove folders while this walks them
            files += [Path(d) / n for d, _, names in os.walk(p) for n in names]
    return sorted(set(files))


def launch(argv, env, log):
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children[ppid].append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def kill_group(p):
    """SIGKILL the job: its process group and every process below it. torchrun starts each worker in a
    session of its own, so killing torchrun's group alone leaves the workers running (as orphans)."""
    for _ in range(3):  # again, for a process forked while the first pass ran
        procs = descendants(p.pid)
        for pid in [p.pid, *procs]:
            for kill in (lambda q: os.killpg(q, signal.SIGKILL), lambda q: os.kill(q, signal.SIGKILL)):
                try:
                    kill(pid)
                except (ProcessLookupError, PermissionError):
                    pass
        if not procs:
            break
    p.wait()


def strays(trial: Path) -> list[str]:
    """Live processes whose command line names the trial folder (a job's leftover: an orphaned
    torchrun worker, a data-loader worker), as ``pid command``."""
    mark, out = f"{trial}{os.sep}".encode(), []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if mark in cmd:
                out.append(f"{d} {cmd.replace(bytes(1), b' ').decode(errors='replace')[:160]}")
    return out


def workers(launcher: int) -> list[int]:
    """torchrun's worker processes: the launcher's children with a RANK in their environment."""
    out = []
    for pid in descendants(launcher):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(bytes(1))
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and any(e.startswith(b"RANK=") for e in env):
            out.append(pid)
    return sorted(out)


#: seconds torchrun may take to stop the job after one worker died: its agent polls the workers
#: (every 0.1 s), SIGTERMs the others and SIGKILLs them after --shutdown-timeout (30 s by default)
RANK_EXIT_BOUND_S = 60.0


def killed_run(argv, env, trial: Path, outputs, duration: float, mode: str, rng: random.Random, log,
               results: str | None = None) -> dict:
    """Run argv and SIGKILL its process group at a moment chosen by ``mode``; what happened.

    ``rank``: SIGKILL one torchrun worker (not the launcher) and let torchrun stop the rest; the
    launcher must exit within :data:`RANK_EXIT_BOUND_S`, not wait out the collective timeout."""
    runs_before = len(list((trial / results / "runs").glob("*.jsonl"))) if results else 0
    if mode in ("uniform", "rank"):
        at = rng.uniform(0, duration)
    elif mode == "late":
        at = duration * rng.uniform(0.85, 1.02)
    else:
        at = None
    skip = rng.randint(0, 5)  # on-write: the writes let through before the one killed (each temp name is one write)
    seen: set[str] = set()
    t0 = time.monotonic()
    p = launch(argv, env, log)
    seen_temp = None
    while True:
        now = time.monotonic() - t0
        if p.poll() is not None:
            return {"mode": mode, "at": round(now, 3), "finished": True, "rc": p.returncode}
        if at is not None and now >= at:
            if mode == "rank" and len(workers(p.pid)) < 2:  # torchrun is still starting them
                time.sleep(0.01)
                continue
            break
        if at is None:
            if now > duration * 1.5:  # no write seen: kill anyway
                break
            temps = [f.name for f in walk(trial, outputs) if TEMP.search(f.name) and not f.name.endswith(".lock")]
            new = [t for t in temps if t not in seen]
            seen.update(new)
            if new and len(seen) > skip:
                seen_temp = new[0]
                time.sleep(rng.uniform(0, 0.01))
                break
            continue
        time.sleep(0.002)
    if mode == "rank":
        ranks = workers(p.pid)
        victim = rng.choice(ranks)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        t1 = time.monotonic()
        ev = {"mode": mode, "at": round(t1 - t0, 3), "finished": False, "temp": None, "rank": ranks.index(victim)}
        try:
            ev["rc"] = p.wait(timeout=RANK_EXIT_BOUND_S)
            ev["exit_s"] = round(time.monotonic() - t1, 2)
        except subprocess.TimeoutExpired:
            ev["problem"] = f"torchrun still running {RANK_EXIT_BOUND_S:.0f} s after one rank was SIGKILLed"
        kill_group(p)  # whatever torchrun left (nothing, when it works)
        if ev.get("rc") == 0:  # the job had finished: the victim was exiting
            ev["finished"] = True
        elif results is not None and committed(trial / results, runs_before):
            ev["finished"] = "committed"
        return ev
    kill_group(p)
    ev = {"mode": mode, "at": round(time.monotonic() - t0, 3), "finished": False, "temp": seen_temp}
    if results is not None and committed(trial / results, runs_before):
        ev["finished"] = "committed"  # killed while exiting, its rows written and its resume state gone
    return ev


def committed(results: Path, runs_before: int) -> bool:
    """Whether an eval/score killed just now had finished: a new run file, and no resume state left
    (it removes that state last). A re-run of score then is a new measurement, and adds a run file; one of
    eval reuses the rows."""
    runs = len(list((results / "runs").glob("*.jsonl"))) if (results / "runs").is_dir() else 0
    work = [f for f in (results / ".work").rglob("*") if f.is_file() and not f.name.endswith(".lock")] \
        if (results / ".work").is_dir() else []
    return runs > runs_before and not work


# ---------------------------------------------------------------- comparing outputs

def norm(rel: str) -> str:
    return RUN_ID.sub("RUNID", rel)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def same_tensors(a, b, where="") -> str | None:
    import numpy as np
    import torch

    if UNSEEDED.search(where):
        return None
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return f"{where}: type/shape/dtype differ"
        if not torch.equal(a, b):
            d = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "int"
            return f"{where}: tensors differ (max abs {d})"
        return None
    if isinstance(a, np.ndarray):
        return None if isinstance(b, np.ndarray) and np.array_equal(a, b) else f"{where}: arrays differ"
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return f"{where}: type differs"
        keys = (set(a) | set(b)) - VOLATILE
        for k in sorted(keys, key=str):
            if k not in a or k not in b:
                return f"{where}/{k}: missing on one side"
            r = same_tensors(a[k], b[k], f"{where}/{k}")
            if r:
                return r
        return None
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            r = same_tensors(x, y, f"{where}[{i}]")
            if r:
                return r
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if isinstance(a, str) and isinstance(b, str) and ROOTS:  # paths of the trial folder vs the reference's
        a, b = a.replace(ROOTS[0], "<out>"), b.replace(ROOTS[1], "<out>")
    return None if a == b else f"{where}: {a!r} != {b!r}"


ROOTS: list[str] = []  # the reference and trial folders being compared


def compare_file(a: Path, b: Path) -> str | None:
    import numpy as np

    name = a.name
    try:
        if name.endswith(".pt"):
            import torch

            return same_tensors(torch.load(a, map_location="cpu", weights_only=False),
                                torch.load(b, map_location="cpu", weights_only=False), name)
        if name.endswith(".npz"):
            with np.load(a) as x, np.load(b) as y:
                if set(x.files) != set(y.files):
                    return f"{name}: members {x.files} vs {y.files}"
                def same(u, v):  # a JSON member (raebench_settings) as JSON: provenance (git hash) aside
                    if u.dtype.kind == "U" and v.dtype.kind == "U" and u.ndim == v.ndim == 0:
                        try:
                            return strip(json.loads(str(u))) == strip(json.loads(str(v)))
                        except ValueError:
                            pass
                    return np.array_equal(u, v)

                bad = [k for k in x.files if not same(x[k], y[k])]
                return f"{name}: {bad} differ" if bad else None
        if name.endswith(".npy"):
            return None if np.array_equal(np.load(a), np.load(b)) else f"{name}: differs"
        if name.endswith(".jsonl"):
            ra = sorted(json.dumps(strip(json.loads(line)), sort_keys=True) for line in a.read_text().splitlines() if line)
            rb = sorted(json.dumps(strip(json.loads(line)), sort_keys=True) for line in b.read_text().splitlines() if line)
            return None if ra == rb else f"{name}: rows differ"
        if name.endswith(".json"):
            return same_tensors(strip(json.loads(a.read_text())), strip(json.loads(b.read_text())), name)
        if name.endswith(".csv"):
            ra = [strip(r) for r in csv.DictReader(a.open())]
            rb = [strip(r) for r in csv.DictReader(b.open())]
            return same_tensors(ra, rb, name)
        if name.endswith((".lock", ".log", ".yaml", ".txt")) or name == "digests.json":
            return None
        return None if a.read_bytes() == b.read_bytes() else f"{name}: bytes differ"
    except Exception as e:  # noqa: BLE001 - an unreadable (half-written) file, whatever its reader raises
        return f"{name}: unreadable ({type(e).__name__}: {e})"


def compare_trees(ref: Path, trial: Path, outputs, runs: int = 1) -> tuple[list[str], list[str]]:
    """(defects, notes): trial outputs against the reference's. ``runs``: result files expected (1; for
    score and eval --samples, plus one for each killed attempt that had finished before its kill: their
    re-run is a new measurement, where a finished eval's re-run reuses its rows)."""
    ROOTS[:] = [str(ref), str(trial)]
    problems, notes = [], []
    rf = {norm(str(f.relative_to(ref))): f for f in walk(ref, outputs) if not f.name.endswith(".out")}
    tf = {norm(str(f.relative_to(trial))): f for f in walk(trial, outputs) if not f.name.endswith(".out")}
    runs_r = [f for f in walk(ref, outputs) if RUN_ID.search(f.name)]
    runs_t = [f for f in walk(trial, outputs) if RUN_ID.search(f.name)]
    if len(runs_t) != len(runs_r) * runs:
        problems.append(f"{len(runs_t)} result files, {len(runs_r) * runs} expected")
    for k in sorted(set(tf) - set(rf)):
        if k.startswith("cache/") and TEMP.search(Path(k).name):
            # the feature cache is shared by concurrent jobs: a killed writer's temporary file goes
            # only once untouched for STALE_TEMP_SECONDS (raebench.results), by design
            notes.append(f"shared-cache temp {k}")
        else:
            problems.append(f"leftover file {k}")
    for k in sorted(set(rf) - set(tf)):
        if k.startswith("cache/"):  # a resumed eval/score publishes no reference features (it did not see them all)
            notes.append(f"not cached: {k}")
        else:
            problems.append(f"missing file {k}")
    for k in sorted(set(rf) & set(tf)):
        if k.startswith("cache/") and k.endswith(".json"):  # a cache's own bookkeeping (digests of weights)
            continue
        r = compare_file(rf[k], tf[k])
        if r:
            problems.append(r)
    for r in runs_t:  # every run's rows (the resumed one, and those of re-runs) equal the reference's
        if runs_r and (d := compare_file(runs_r[0], r)):
            problems.append(d)
    return problems, notes


def readers(results: Path, env, compare: list | None = None) -> list[str]:
    """`leaderboard` (and, given its arguments, `compare`, which must then reuse the stored rows and
    measure nothing) must read a results folder (possibly one a kill just left)."""
    if not results.exists():
        return []
    out = []
    cmds = [["leaderboard", "--results", str(results), "-f", "rows"]] + ([compare] if compare else [])
    for cmd in cmds:
        p = subprocess.run([PY, "-m", "raebench", *cmd], env=env, capture_output=True, text=True, timeout=300,
                           check=False)
        empty = p.returncode == 2 and "No results under" in p.stderr  # a kill before any row: a sentence
        if (p.returncode != 0 and not empty) or "Traceback" in p.stderr:
            out.append(f"`raebench {cmd[0]}` failed ({p.returncode}): {p.stderr.strip()[-300:]}")
        elif cmd[0] == "compare" and "nothing (all reused)" not in p.stdout + p.stderr:
            out.append(f"`raebench compare` measured again instead of reusing the stored rows: "
                       f"{(p.stdout + p.stderr).strip()[-300:]}")
    return out


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default=",".join(jobs(Path("."))), help="comma-separated job names")
    ap.add_argument("--trials", type=int, default=12, help="killed trials per job")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="work folder, kept (default: a new temporary one, removed when "
                                                  "no defect was found)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--modes", default="uniform,uniform,late,on-write,rank",
                    help="kill moments drawn from (repeats weigh); `rank` (one torchrun worker) for -ddp jobs only")
    ap.add_argument("--no-readers", action="store_true", help="skip leaderboard/compare after each kill")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="raebench-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}", flush=True)
    build_fixtures(work)
    rng = random.Random(args.seed)
    table = jobs(work)
    matrix = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # job -> kills -> [ok, defect]
    defects = []
    for job in args.jobs.split(","):
        argv_of, outputs, results, compare_of = table[job]
        ref = work / job / "ref"
        shutil.rmtree(ref, ignore_errors=True)
        ref.mkdir(parents=True)
        t0 = time.monotonic()
        with open(ref / "run.out", "w") as log:
            p = launch(argv_of(ref), env_for(work, ref), log)
            p.wait()
        duration = time.monotonic() - t0
        if p.returncode != 0:
            print(f"{job}: uninterrupted run failed ({p.returncode}); see {ref / 'run.out'}")
            defects.append((job, "reference", "uninterrupted run failed"))
            continue
        print(f"{job}: uninterrupted {duration:.1f} s", flush=True)
        for i in range(args.trials):
            kills = 1 + i % 3
            trial = work / job / f"t{i:02d}"
            shutil.rmtree(trial, ignore_errors=True)
            trial.mkdir(parents=True)
            env = env_for(work, trial)
            argv = argv_of(trial)
            events, problems = [], []
            with open(trial / "run.out", "w") as log:
                ddp = "torch.distributed.run" in argv
                modes = [m for m in args.modes.split(",") if m != "rank" or ddp] or ["uniform"]
                for k in range(kills):
                    mode = rng.choice(modes)
                    ev = killed_run(argv, env, trial, outputs, duration, mode, rng, log, results)
                    events.append(ev)
                    if ev.get("finished") is True and ev["rc"] != 0:
                        problems.append(f"run {k + 1} exited {ev['rc']} before its kill")
                    if ev.get("problem"):
                        problems.append(f"kill {k + 1}: {ev['problem']}")
                    if left := strays(trial):
                        problems.append(f"after kill {k + 1}: processes left running: {left}")
                        for line in left:  # so that they disturb neither the next run nor other trials
                            try:
                                os.kill(int(line.split()[0]), signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                    if results and not args.no_readers:
                        problems += [f"after kill {k + 1}: {r}" for r in readers(trial / results, env)]
                t1 = time.monotonic()
                p = launch(argv, env, log)
                try:
                    rc = p.wait(timeout=duration * 5 + 60)
                except subprocess.TimeoutExpired:
                    kill_group(p)
                    rc = "hang"
                resume_s = time.monotonic() - t1
            if left := strays(trial):
                problems.append(f"processes left running after the completing run: {left}")
            notes = []
            if rc != 0:
                problems.append(f"resume exited {rc}: {(trial / 'run.out').read_text()[-400:]!r}")
            else:
                # a re-run of a finished eval shows its stored rows (no new run file); score and eval --samples
                # measure again, so a kill after they committed adds a run of the same rows
                finished = sum(bool(e.get("finished")) for e in events)
                found, notes = compare_trees(ref, trial, outputs, 1 if reuses(job) else 1 + finished)
                problems += found
                if results:
                    problems += readers(trial / results, env, compare_of(trial) if compare_of else None)
            desc = ", ".join(f"{e['mode']}@{e['at']:.2f}s" + (f"(rank {e['rank']}; exit {e.get('exit_s', '-')} s)"
                                                               if "rank" in e else "")
                             + (f"({'done' if e['finished'] is True else e['finished']})"
                                                               if e.get("finished") else "")
                             + (f"[{e['temp']}]" if e.get("temp") else "") for e in events)
            status = "ok" if not problems else "DEFECT"
            matrix[job][kills][0 if not problems else 1] += 1
            print(f"  {job} t{i:02d} kills={kills} [{desc}] resume {resume_s:.1f} s: {status}", flush=True)
            for pr in problems:
                print(f"      - {pr}", flush=True)
                defects.append((job, f"t{i:02d}", pr))
            for n in notes:
                print(f"      . note: {n}", flush=True)
            if not problems and not args.keep:
                shutil.rmtree(trial, ignore_errors=True)
    print("\njob x kills: ok/defect")
    print(f"{'job':16s} " + " ".join(f"{k} kill{'s' if k > 1 else ' '}" for k in (1, 2, 3)))
    for job, row in matrix.items():
        print(f"{job:16s} " + " ".join(f"{row[k][0]:>2d}/{row[k][1]:<3d}" for k in (1, 2, 3)))
    if not args.keep and not defects and not args.work:  # a folder given may be shared with other runs
        shutil.rmtree(work, ignore_errors=True)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
