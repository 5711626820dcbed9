"""``compare`` and ``analyze`` under torchrun (2 gloo processes on CPU) give the single-process
numbers, print once and write their rows once; the exact merges behind them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raebench.analysis.stream import Keep
from raebench.analysis.spectrum import LatentStats
from raebench.results import load
from _cli import run


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m raebench ARGV`` (a free port, one thread per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "raebench", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _values(res: Path) -> dict[tuple[str, str], float]:
    df = load(res)
    return {(t, m): v for t, m, v in zip(df["tokenizer"], df["metric"], df["value"])}


# ---------------------------------------------------------------------------------------------
# The merges, in one process
# ---------------------------------------------------------------------------------------------


def test_latent_stats_merge_of_shards_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)
    z = (torch.randn(40, 6, 3, 3, generator=g).permute(0, 2, 3, 1) @ mix).permute(0, 3, 1, 2) + 50.0  # offset, correlated
    z[:, 2] = z[:, 2] ** 3 / 100  # a heavy-tailed channel
    whole = LatentStats()
    for s in range(0, 40, 7):
        whole.update(z[s : s + 7])
    shards = [LatentStats(), LatentStats(), LatentStats()]  # uneven shards, other batch sizes, one empty
    for s in range(0, 13, 5):
        shards[0].update(z[s : min(s + 5, 13)])
    for s in range(13, 40, 4):
        shards[1].update(z[s : s + 4])
    merged = LatentStats()
    for sh in shards:
        merged.merge(sh.state())  # through the state dict, as across processes
    a, b = whole.summary(), merged.summary()
    assert b.tokens == a.tokens == 40 * 9
    torch.testing.assert_close(b.eigvals, a.eigvals, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.kurtosis, a.kurtosis, rtol=1e-8, atol=1e-9)
    for f in ("latent_std", "effective_rank", "participation_ratio", "hoyer_sparsity", "near_zero_frac",
              "token_norm_mean", "token_norm_std", "kurtosis_max"):
        assert getattr(b, f) == pytest.approx(getattr(a, f), rel=1e-9), f


def test_diagnostic_subset_ignores_batching_sharding_and_unreadable_files():
    """The first k readable images of the seeded permutation, however the data arrive."""
    n, k, unreadable = 30, 5, {3, 17, 22}

    def kept(order: list[list[int]]) -> list[int]:
        parts = []
        for shard in order:
            keep = Keep(n, k, seed=7)
            for i in shard:
                if i not in unreadable and keep.wants(i):
                    keep.offer(i, (i,))
            parts.append(keep)
        for p in parts[1:]:
            parts[0].merge(p.heap)
        return [p for (p,) in parts[0].payloads()]

    one = kept([list(range(n))])
    assert one == kept([list(range(0, 11)), list(range(11, 30))]) == kept([list(range(15)), [], list(range(15, 30))])
    perm = [i for i in __import__("random").Random(7).sample(range(n), n) if i not in unreadable]
    assert one == sorted(perm[:k])  # data order


# ---------------------------------------------------------------------------------------------
# torchrun end to end
# ---------------------------------------------------------------------------------------------


def test_compare_under_torchrun_equals_one_process(image_folder: Path, tmp_path: Path, capsys):
    common = ["compare", "-t", "bicubic-f8", "-t", "pixels", "--data", str(image_folder), "-r", "32", "-b", "3",
              "--device", "cpu", "--reported", "none"]
    code, out, err = run([*common, "--results", str(tmp_path / "one")], capsys)
    assert code == 0, err
    r = torchrun([*common, "--results", str(tmp_path / "two")])
    assert r.stdout.count("compare on images") == 1  # only rank 0 prints
    assert "computed now: bicubic-f8, pixels" in r.stdout
    a, b = _values(tmp_path / "one"), _values(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:  # PSNR and SSIM: per-image means, summed exactly rounded, so the same bits
        assert b[k] == a[k], k
    rows = load(tmp_path / "two", latest=False)
    assert len(rows) == 4 and (rows["n_images"] == 8).all() and rows["device"].str.endswith("x2").all()
    # a second torchrun reuses every row on both ranks (rank 0 decides) and writes nothing
    r = torchrun([*common, "--results", str(tmp_path / "two")])
    assert "computed now: nothing (all reused)" in r.stdout and len(load(tmp_path / "two", latest=False)) == 4


def test_analyze_under_torchrun_equals_one_process(image_folder: Path, tmp_path: Path, capsys):
    common = ["analyze", "-t", "pixels", "-t", "bicubic-f8", "--data", str(image_folder), "-r", "32", "-b", "3",
              "--reference", "random-proj", "--perceptual", "rmse", "--mutual-k", "3", "--knn-k", "3", "--n-diag", "4",
              "--interp-pairs", "2", "--interp-steps", "3", "--sigmas", "0.25,1", "--device", "cpu",
              # rank 0 trains the probe alone after the gather (the trainer must not wait for the others)
              "--diffusability", "--probe-preset", "ditdh-tiny", "--probe-steps", "2", "--probe-batch-size", "2",
              "--probe-samples", "4", "--probe-sample-steps", "3"]
    code, out, err = run([*common, "--results", str(tmp_path / "one")], capsys)
    assert code == 0, err
    r = torchrun([*common, "--results", str(tmp_path / "two")])
    assert r.stdout.count("analyze · images") == 1  # only rank 0 prints
    a, b = _values(tmp_path / "one"), _values(tmp_path / "two")
    assert a.keys() == b.keys()
    assert {m for _, m in a} >= {"probe-linear-top1", "probe-knn-top1", "align-cknna-random-proj", "latent-erank",
                                 "latent-kurtosis-max", "robust-psnr-vs-image-s1", "interp-rmse-path-ratio",
                                 "diffuse-latent-fd", "diffuse-fd-random-proj"}
    for k in a:  # float32 forwards see other batch compositions: float tolerance, not bit equality
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-9), k
    one, two = load(tmp_path / "one"), load(tmp_path / "two", latest=False)
    assert len(two) == len(one)  # every row written once
    key = ["tokenizer", "metric"]
    n1, n2 = one.set_index(key)["n_images"], two.set_index(key)["n_images"]
    assert n2.sort_index().equals(n1.sort_index())
    assert two["device"].str.endswith("x2").all()
    (out_dir,) = [d for d in (tmp_path / "two" / "analysis").iterdir() if (d / "config.json").exists()]  # once, by rank 0
    assert {p.name for p in out_dir.glob("*.png")} >= {"robustness.png", "spectra.png", "alignment.png"}


def test_torchrun_score_equals_one_process(tmp_path: Path):
    """`torchrun -m raebench score` shards both sets contiguously and merges metric states in rank
    order: paired (psnr + fid on the same pairs) and unpaired (fid, kid, precision) equal 1 process."""
    import numpy as np
    from _metrics_helpers import photo_crops, random_inception_weights, save_pngs

    ref, cand = photo_crops(6, 32, seed=1), photo_crops(6, 32, seed=2)
    save_pngs(ref, tmp_path / "ref")
    save_pngs(cand, tmp_path / "cand")
    np.savez(tmp_path / "samples.npz", arr_0=cand[:5].permute(0, 2, 3, 1).numpy())
    weights = random_inception_weights(tmp_path / "inception.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAEBENCH_INCEPTION_WEIGHTS": str(weights)}
    for label, cands, metrics in (("paired", tmp_path / "cand", "psnr,fid"),
                                  ("unpaired", tmp_path / "samples.npz", "fid,kid,precision")):
        argv = ["score", "--references", str(tmp_path / "ref"), "--candidates", str(cands), "--metrics", metrics,
                "--device", "cpu", "-b", "3"]
        one, two = tmp_path / f"{label}-1", tmp_path / f"{label}-2"
        env1 = {**env, "RAEBENCH_CACHE": str(tmp_path / f"cache-{label}-1")}
        env2 = {**env, "RAEBENCH_CACHE": str(tmp_path / f"cache-{label}-2")}
        subprocess.run([sys.executable, "-m", "raebench", *argv, "--results", str(one)], env=env1, check=True,
                       capture_output=True, timeout=300)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "raebench", *argv, "--results", str(two)], env=env2, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        a, b = _values(one), _values(two)
        assert a.keys() == b.keys() and len(a) >= 2
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (label, k)
        assert len(load(two, latest=False)) == len(a)  # rows written once


ON_RANK0 = '''
import sys
from raebench import distributed
from raebench.errors import RaebenchError

distributed.init("cpu")
r = distributed.rank()
calls = []
out = distributed.on_rank0(lambda: calls.append(r) or {"from": r})
assert out == {"from": 0} and calls == ([0] if r == 0 else []), (r, out, calls)
assert distributed.from_rank0(f"rank {r}") == "rank 0"
try:
    distributed.on_rank0(lambda: (_ for _ in ()).throw(RaebenchError("Nothing to write: no metric.")))
except RaebenchError as e:
    assert str(e) == "Nothing to write: no metric.", e
else:
    sys.exit("no RaebenchError")
try:
    distributed.on_rank0(lambda: 1 / 0)
except ZeroDivisionError:
    assert r == 0
except RuntimeError as e:
    assert r == 1 and "rank 0 failed: ZeroDivisionError" in str(e), e
else:
    sys.exit("no error")
from raebench.errors import MissingWeightsError
try:  # the subclass reaches every rank (library callers catch MissingWeightsError)
    distributed.on_rank0(lambda: (_ for _ in ()).throw(MissingWeightsError("fetch X into Y")))
except MissingWeightsError as e:
    assert str(e) == "fetch X into Y", e
else:
    sys.exit("no MissingWeightsError")
try:  # an unpicklable result fails on rank 0 before the broadcast, so rank 1 does not wait it out
    distributed.on_rank0(lambda: (lambda: 1))
except RuntimeError as e:
    assert r == 1 and "rank 0 failed" in str(e), e
except Exception as e:
    assert r == 0 and "pickle" in str(e).lower(), e
else:
    sys.exit("no pickling error")
# on_every_rank: set-up every rank runs; a user error stops all of them, printed by one (QUIET on the others)
from raebench.distributed import on_every_rank
from raebench.errors import EVERY_RANK, QUIET
try:
    distributed.on_rank0(lambda: (_ for _ in ()).throw(RaebenchError("rank 0 says it.")))
except RaebenchError as e:
    assert getattr(e, QUIET) == (r == 1) and getattr(e, EVERY_RANK), (r, vars(e))
assert on_every_rank(lambda: r * 10) == r * 10
try:  # on one rank only: that rank prints it, the other stops quietly with the same error
    on_every_rank(lambda: (_ for _ in ()).throw(MissingWeightsError("only on rank 1.")) if r == 1 else r)
except MissingWeightsError as e:
    assert str(e) == "only on rank 1." and getattr(e, QUIET) == (r == 0) and getattr(e, EVERY_RANK), (r, e)
else:
    sys.exit("no MissingWeightsError")
try:  # the same sentence on both: printed by rank 0
    on_every_rank(lambda: (_ for _ in ()).throw(RaebenchError("both.")))
except RaebenchError as e:
    assert getattr(e, QUIET) == (r == 1), (r, vars(e))
try:  # a crash: its traceback on its rank, the other stops quietly without waiting for it
    on_every_rank(lambda: 1 / 0 if r == 0 else r)
except ZeroDivisionError:
    assert r == 0
except RaebenchError as e:
    assert r == 1 and getattr(e, QUIET) and not getattr(e, EVERY_RANK), vars(e)
    assert "rank 0 stopped: ZeroDivisionError" in str(e), e
else:
    sys.exit("no error")
got = distributed.gather_to_rank0({"rank": r})
assert got == ([{"rank": 0}, {"rank": 1}] if r == 0 else None), (r, got)
import torch
kept = torch.full((3, 4), float(r))  # one tensor kept by three metrics' states: sent once, arrives shared
# each state holds its own tensor object over that storage, as Metric.state() returns them (t.detach())
got = distributed.gather_to_rank0([{"ref": [kept.detach()]}, {"ref": [kept.detach()]}, {"ref": [kept.detach()], "n": 3}])
if r == 0:
    for k, states in enumerate(got):
        held = [st["ref"][0] for st in states]
        assert all(torch.equal(t, torch.full((3, 4), float(k))) for t in held) and states[2]["n"] == 3, states
        assert len({t.untyped_storage().data_ptr() for t in held}) == 1, "three copies"
distributed.finish()
sys.stdout.write(f"ok{r}\\n")  # one write: the two ranks share the pipe
sys.stdout.flush()
'''


def test_on_rank0_computes_once_and_every_rank_gets_the_result_or_the_error(tmp_path):
    """eval and score merge the gathered metric states and compute on rank 0 alone (k-NN metrics at
    50k cost minutes of CPU; the others used to repeat them and rebuild the metric networks); the
    others get the numbers, rank 0's one-sentence error, or word of its crash instead of a hang."""
    (tmp_path / "job.py").write_text(ON_RANK0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAEBENCH_DIST_TIMEOUT_S": "30"}  # a missed broadcast fails, not hangs
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "job.py")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(r.stdout.split()) == ["ok0", "ok1"]


def test_one_failing_rank_gives_one_sentence_per_rank_not_tracebacks(image_folder: Path, tmp_path: Path):
    """A user error or a full disk on one rank used to end the other rank in a raw gloo traceback
    ("Connection closed by peer"), and a disk error on the failing rank in a raw OSError traceback.
    Now the failing rank says what failed, the other says another rank stopped, both exit non-zero."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(
        "import errno, os, sys\n"
        "import raebench.evaluate as ev\n"
        "from raebench.errors import RaebenchError\n"
        "real = ev.shard\n"
        "def shard(n, rank, world):\n"
        "    if rank == int(os.environ['FAIL_RANK']):\n"
        "        if os.environ['FAIL'] == 'disk':\n"
        "            raise OSError(errno.ENOSPC, 'No space left on device', '/results/runs/x.jsonl')\n"
        "        raise RaebenchError('injected user error on one rank.')\n"
        "    return real(n, rank, world)\n"
        "ev.shard = shard\n"
        "from raebench.cli import main\n"
        "main(sys.argv[1:])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    for fail, says in (("user", "error: injected user error on one rank."), ("disk", "error: No space left on device")):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), "eval", "-t", "pixels", "--data", str(image_folder), "-r", "16", "--device", "cpu",
                            "--results", str(tmp_path / fail)], env={**env, "FAIL": fail, "FAIL_RANK": "1"},
                           capture_output=True, text=True, timeout=120)
        err = " ".join(r.stderr.split())
        assert r.returncode != 0 and says in err, r.stderr[-3000:]
        assert "another rank of this torchrun job stopped" in err, r.stderr[-3000:]
        # (torchrun's own launcher still prints its ChildFailedError traceback: frames of torch only)
        import re

        assert not re.search(r'File "[^"]*(raebench|one_rank_fails)', r.stderr) and "GLHF" not in r.stderr, r.stderr[-3000:]
