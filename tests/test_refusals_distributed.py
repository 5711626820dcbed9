"""A refusal that every rank of a torchrun job reaches (a resume with other settings, an evaluation another
job is running) is printed once, by rank 0, and every rank exits with its status (2).

The ranks are two plain processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without
torchrun's agent, so that each rank's own output and exit status can be read (the agent stops the other
ranks at the first exit)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_stage2_train import toy_cache

ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(argv: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """``python ARGV`` as ranks 0 and 1 of one job (gloo, a 30 s collective timeout: a rank left waiting
    fails instead of hanging)."""
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RAEBENCH_DIST_TIMEOUT_S": "30",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out = []
    for r, p in enumerate(procs):
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


JOB = textwrap.dedent('''
    import sys
    import torch
    from raebench import distributed
    from raebench.errors import EVERY_RANK, RaebenchError

    root, images = sys.argv[1], sys.argv[2]
    distributed.init("cpu")
    rank = distributed.rank()
    try:  # the parts of a sampling run with seed 0, sampled with seed 1
        from raebench.stage2.sample import generate_npz
        generate_npz(lambda z, y: z, lambda z: torch.sigmoid(z[:, :3]), root + "/s.npz", torch.arange(4) % 2,
                     (3, 2, 2), batch_size=2, seed=1)
    except RaebenchError as e:
        print(f"sample, rank {rank}: every_rank={getattr(e, EVERY_RANK, False)}: {e}", flush=True)
    import raebench.eval_progress as ep
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate
    acquire = ep.WorkState.acquire
    def busy(self):  # another job evaluates this configuration: it holds rank 1's progress
        if rank == 1:
            raise RaebenchError("Another evaluation with the same configuration is running.")
        acquire(self)
    ep.WorkState.acquire = busy
    try:
        evaluate(EvalConfig(tokenizer="pixels", data=images, resolution=16, device="cpu", metrics=("psnr",),
                            results_dir=root + "/res"))
    except RaebenchError as e:
        print(f"eval, rank {rank}: every_rank={getattr(e, EVERY_RANK, False)}: {e}", flush=True)
    from raebench.stage2.latents import cache_latents
    from test_stage2_train import _MeanPool as MeanPool
    try:  # a latent cache of 32-px crops, asked for at 16 px
        cache_latents(MeanPool(), images, root + "/latents", resolution=16, batch_size=2)
    except RaebenchError as e:
        print(f"cache, rank {rank}: every_rank={getattr(e, EVERY_RANK, False)}: {e}", flush=True)
    from raebench.cli import main  # a stage-2 run resumed with another learning rate
    main(["train", "stage2", "--preset", "tiny", "--latents", root + "/cache", "--out", root + "/run", "--num-classes",
          "4", "--batch-size", "8", "--max-steps", "1", "--lr", "5e-4", "--device", "cpu"])
''')


@pytest.mark.slow
def test_refusals_reach_every_rank_are_printed_once_and_every_rank_exits_2(tmp_path, image_folder):
    """Before, each rank printed a stage-2 resume refusal; rank 0 alone refused the parts of another
    sampling run or a latent cache of other settings (the other rank waited in a collective until the job
    was killed); an evaluation busy on one rank
    stopped that rank only (the other waited in a collective). Now every rank raises rank 0's verdict,
    marked so that the CLI prints it once, on rank 0, and every rank exits with status 2."""
    import torch

    from raebench.stage2.sample import generate_npz
    from raebench.stage2.train import preset, train

    def decode(z):  # the second batch never finishes: a sampling run killed after its first part
        decode.calls += 1
        if decode.calls == 2:
            raise KeyboardInterrupt
        return torch.sigmoid(z[:, :3])

    decode.calls = 0
    try:  # the labels, shapes and batch size of JOB, seed 0
        generate_npz(lambda z, y: z, decode, tmp_path / "s.npz", torch.arange(4) % 2, (3, 2, 2), batch_size=2, seed=0)
    except KeyboardInterrupt:
        pass
    assert [p.name for p in (tmp_path / ".s.npz.parts").glob("b*.npz")] == ["b0000000.npz"]
    toy_cache(tmp_path / "cache", n=32)
    train(preset("tiny", out=str(tmp_path / "run"), latents=str(tmp_path / "cache"), num_classes=4, global_batch=8,
                 max_steps=1))  # learning rate 1e-3
    from raebench.stage2.latents import cache_latents
    from test_stage2_train import _MeanPool as MeanPool

    cache_latents(MeanPool(), image_folder, tmp_path / "latents", resolution=32, batch_size=4)
    (tmp_path / "job.py").write_text(JOB)

    r0, r1 = two_ranks([str(tmp_path / "job.py"), str(tmp_path), str(image_folder)])
    for rank, r in enumerate((r0, r1)):
        for what, says in (("sample", "other settings (seed: 0 -> 1)"), ("eval", "Another evaluation"),
                           ("cache", "other images or settings (")):
            assert f"{what}, rank {rank}: every_rank=True: " in r.stdout and says in r.stdout, (rank, r.stdout, r.stderr)
        assert r.returncode == 2, (rank, r.stdout, r.stderr[-2000:])
    said = "holds a run with other settings or data (lr: "
    assert " ".join(r0.stderr.split()).count(said) == 1, r0.stderr[-2000:]
    assert "error" not in r1.stderr, r1.stderr[-2000:]  # said once, by rank 0


def test_a_rank_that_never_joins_gives_one_sentence_after_the_timeout(monkeypatch):
    """Rank 0 of a 2-rank job whose rank 1 died before joining (no torchrun agent to stop it) waits
    RAEBENCH_DIST_TIMEOUT_S in the rendezvous, then stops with a RaebenchError, not torch's traceback."""
    import time

    from raebench import distributed
    from raebench.errors import RaebenchError

    for k, v in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RAEBENCH_DIST_TIMEOUT_S": "1"}.items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(RaebenchError, match=r"rank 0 waited 1 s \(RAEBENCH_DIST_TIMEOUT_S\) for the other ranks"):
        distributed.init("cpu")
    assert time.monotonic() - t0 < 30
    assert not distributed.td.is_initialized()


STATS_JOB = textwrap.dedent('''
    import atexit, sys
    from raebench import distributed
    from raebench.cli import main, rae_cmds
    calls = []
    def encoder(x):  # NaN latents for every image of rank 1's shard
        calls.append(len(x))
        z = x[:, :, :4, :4].clone()
        if distributed.rank() == 1:
            z[:] = float("nan")
        return z
    rae_cmds.feature_extractor = lambda **kw: (encoder, "nan-on-rank-1")
    atexit.register(lambda: print(f"calls {calls}", flush=True))
    main(["stats", "--encoder", "x", "--data", sys.argv[1], "-r", "16", "-b", "1", "--out", sys.argv[2], "--device", "cpu"])
''')


@pytest.mark.slow
def test_stats_with_nan_latents_on_one_rank_stops_every_rank_at_that_batch_said_once(tmp_path, image_folder):
    """Under torchrun, NaN latents on rank 1 went into the sums, and every rank failed at the end with "Latent
    statistics hold a negative or non-finite variance or mean". Now both ranks stop at the first batch (rank 0
    too, whose latents are finite), rank 0 prints the image once, and both exit with status 2."""
    from raebench.data import resolve_data

    paths = resolve_data(str(image_folder), None, None, 0).images.paths
    (tmp_path / "job.py").write_text(STATS_JOB)
    r0, r1 = two_ranks([str(tmp_path / "job.py"), str(image_folder), str(tmp_path / "stat.pt")])
    for r in (r0, r1):
        assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
        assert "calls [1, 1]" in r.stdout, r.stdout  # the latent-shape probe, then one batch of one image
    said = "".join(r0.stderr.split())
    assert said.count("NaN/Inflatentsfor" + str(paths[4]).replace(" ", "")) == 1, r0.stderr[-2000:]  # rank 1's first
    assert "error" not in r1.stderr and not (tmp_path / "stat.pt").exists(), r1.stderr[-2000:]


EMPTY_STATS_JOB = textwrap.dedent('''
    import sys
    from raebench.cli import main, rae_cmds
    rae_cmds.feature_extractor = lambda **kw: ((lambda x: x[:, :, :4, :4].clone()), "probe")
    main(["stats", "--encoder", "x", "--data", sys.argv[1], "-r", "16", "-b", "1", "--out", sys.argv[2], "--device", "cpu"])
''')


@pytest.mark.slow
def test_stats_with_no_readable_image_is_said_once(tmp_path):
    """Every rank reaches "No readable image" alike after the all-reduce of the counts: it was printed by each
    rank; now rank 0 says it and both exit with status 2."""
    data = tmp_path / "broken"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_bytes(b"not a png")
    (tmp_path / "job.py").write_text(EMPTY_STATS_JOB)
    r0, r1 = two_ranks([str(tmp_path / "job.py"), str(data), str(tmp_path / "stat.pt")])
    for r in (r0, r1):
        assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    assert " ".join(r0.stderr.split()).count("No readable image in 'broken'") == 1, r0.stderr[-2000:]
    assert "No readable image" not in r1.stderr, r1.stderr[-2000:]


@pytest.mark.slow
def test_reconstruct_with_no_readable_image_is_said_once(tmp_path):
    """Every rank reads the same shard records and stops alike ("Nothing to reconstruct"): said once, exit 2."""
    data = tmp_path / "broken"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_bytes(b"not a png")
    job = tmp_path / "job.py"
    job.write_text("import sys\nfrom raebench.cli import main\nmain(['reconstruct', '-t', 'bicubic-f8', '--data', "
                   "sys.argv[1], '--out', sys.argv[2], '-r', '32', '--device', 'cpu'])\n")
    r0, r1 = two_ranks([str(job), str(data), str(tmp_path / "out")])
    for r in (r0, r1):
        assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    assert " ".join(r0.stderr.split()).count("Nothing to reconstruct in 'broken'") == 1, r0.stderr[-2000:]
    assert "Nothing to reconstruct" not in r1.stderr, r1.stderr[-2000:]
