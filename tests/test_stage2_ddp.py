"""torchrun (2 CPU processes, gloo): DDP training equals one process, sharded sampling equals one process."""

import subprocess
import sys
import textwrap

import numpy as np
import torch

from test_stage2_train import toy_cache

SCRIPT = textwrap.dedent('''
    import sys, torch
    from raebench import distributed
    from raebench.stage2.train import preset, train
    from raebench.stage2.sample import class_labels, generate_npz

    root, out, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    distributed.init()
    cfg = preset("tiny", out=out, latents=root + "/cache", num_classes=4, global_batch=16,
                 grad_accum=2, epochs=2, shift_base=16, ckpt_every=2, max_steps=max_steps)
    res = train(cfg)
    assert res["step"] == max_steps, res
    y = class_labels(10, 4, seed=0)
    generate_npz(lambda z, y: z * 0.1 + y.view(-1, 1, 1, 1), lambda z: torch.sigmoid(z[:, :3]),
                 root + "/ddp.npz", y, (4, 2, 2), batch_size=3, seed=5)
    distributed.finish()
''')


def torchrun(tmp_path, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "job.py"), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "`broadcast_buffers` is deprecated" not in res.stderr, res.stderr[-3000:]  # torch 2.14's FutureWarning


def test_torchrun_train_equals_one_process_and_sample(tmp_path):
    """2 processes (and a resume on 2 of a 1-process run) = 1 process at the same global batch."""
    from raebench.stage2.sample import class_labels, generate_npz
    from raebench.stage2.train import preset, train

    toy_cache(tmp_path / "cache", n=64)
    (tmp_path / "job.py").write_text(SCRIPT)
    torchrun(tmp_path, tmp_path, tmp_path / "ddp", 8)
    cfg = preset("tiny", out=str(tmp_path / "one"), latents=str(tmp_path / "cache"), num_classes=4, global_batch=16,
                 grad_accum=2, epochs=2, shift_base=16, ckpt_every=2)
    assert train(cfg)["step"] == 8
    train(preset("tiny", **{**cfg.__dict__, "out": str(tmp_path / "mixed"), "max_steps": 3}))
    torchrun(tmp_path, tmp_path, tmp_path / "mixed", 8)  # 1 process to step 3, then 2 processes
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    for run in ("ddp", "mixed"):
        ck = torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
        assert ck["step"] == 8
        for k in ("model", "ema"):
            for name, t in one[k].items():
                torch.testing.assert_close(ck[k][name], t, atol=1e-5, rtol=1e-5, msg=f"{run} {k}.{name}")
    y = class_labels(10, 4, seed=0)
    single = generate_npz(lambda z, y: z * 0.1 + y.view(-1, 1, 1, 1), lambda z: torch.sigmoid(z[:, :3]),
                          tmp_path / "one.npz", y, (4, 2, 2), batch_size=3, seed=5)
    a, b = np.load(single), np.load(tmp_path / "ddp.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


CACHE_SCRIPT = textwrap.dedent('''
    import sys, torch
    from raebench import distributed
    from raebench.stage2.latents import cache_latents

    class MeanPool(torch.nn.Module):
        name = "meanpool"
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))
        def encode(self, x):
            return torch.nn.functional.avg_pool2d(x, 8)

    distributed.init()
    cache_latents(MeanPool(), sys.argv[1], sys.argv[2], resolution=32, batch_size=2)
    distributed.finish()
''')


def test_torchrun_cache_latents_equals_one_process(tmp_path, image_folder):
    from test_stage2_train import _MeanPool

    from raebench.stage2.latents import LatentCache, cache_latents

    (tmp_path / "job.py").write_text(CACHE_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "job.py"), str(image_folder), str(tmp_path / "ddp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    one = LatentCache(cache_latents(_MeanPool(), str(image_folder), tmp_path / "one", resolution=32, batch_size=2))
    two = LatentCache(tmp_path / "ddp")
    assert two.meta["world"] == 2 and two.meta["complete"]
    assert np.array_equal(np.asarray(two.latents), np.asarray(one.latents))
    assert torch.equal(two.labels, one.labels)


def test_ddp_wrapping_skips_buffer_sync_without_a_deprecation_warning(tmp_path):
    """Both trainers wrap in DDP with distributed.no_buffer_sync(): on torch 2.14 `broadcast_buffers`
    warns (FutureWarning) at every launch; the keyword follows the installed torch."""
    code = textwrap.dedent(f'''
        import warnings, torch, torch.distributed as dist
        from raebench.distributed import no_buffer_sync
        warnings.simplefilter("error")
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        m = torch.nn.Linear(3, 2)
        m.register_buffer("b", torch.ones(1))
        ddp = torch.nn.parallel.DistributedDataParallel(m, **no_buffer_sync())
        ddp(torch.ones(4, 3)).sum().backward()
        dist.destroy_process_group()
        print(sorted(no_buffer_sync().items()))
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import inspect
    new = "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    assert out.stdout.strip() == str([("forward_sync_buffers" if new else "broadcast_buffers", False)])


def test_torchrun_sample_errors_are_printed_once_and_every_rank_exits_2(tmp_path, image_folder):
    """A user error of `raebench sample` under torchrun (a missing checkpoint, met by every rank in its
    set-up; an output another job holds, met by rank 0 alone) was printed by every rank, or by rank 0
    while the other said that another rank stopped (exit 1); now it is printed once and every rank
    exits with 2. The note on unequal class counts was printed by every rank too."""
    import os
    import re
    from pathlib import Path

    from test_stage2_cli import _pixels_run

    from raebench.locks import OutputLock

    ck = _pixels_run(tmp_path, image_folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAEBENCH_DIST_TIMEOUT_S": "60",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    held = OutputLock(tmp_path / "held.npz", "test job", "wait").acquire()
    try:
        for argv, says in ((["-c", str(tmp_path / "nowhere"), "-o", str(tmp_path / "s.npz")], "No stage-2 checkpoint at"),
                           (["-c", str(ck), "-o", str(tmp_path / "held.npz")], "Another sampling job is writing")):
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "-m", "raebench", "sample", *argv, "-n", "3", "--steps", "2", "--device", "cpu"],
                               env=env, capture_output=True, text=True, timeout=120)
            err = " ".join(r.stderr.split())
            assert r.returncode != 0 and err.count(says) == 1, r.stderr[-3000:]
            assert "another rank of this torchrun job stopped" not in err, r.stderr[-3000:]
            assert sorted(re.findall(r"exitcode\s+: (-?\d+)", r.stderr)) == ["2", "2"], r.stderr[-3000:]
            if "held" in argv[-1]:  # this one got past the set-up
                assert r.stdout.count("3 is not a multiple of 2 classes") == 1, r.stdout
    finally:
        held.release()
