"""torchrun (2 CPU processes, gloo): DDP training runs and sharded sampling equals one process."""

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

    root = sys.argv[1]
    distributed.init()
    cfg = preset("tiny", out=root + "/run", latents=root + "/cache", num_classes=4, global_batch=16,
                 grad_accum=2, epochs=1, shift_base=16)
    res = train(cfg)
    assert res["step"] == 4, res
    y = class_labels(10, 4, seed=0)
    generate_npz(lambda z, y: z * 0.1 + y.view(-1, 1, 1, 1), lambda z: torch.sigmoid(z[:, :3]),
                 root + "/ddp.npz", y, (4, 2, 2), batch_size=3, seed=5)
    distributed.finish()
''')


def test_torchrun_train_and_sample(tmp_path):
    from raebench.stage2.sample import class_labels, generate_npz

    toy_cache(tmp_path / "cache", n=64)
    (tmp_path / "job.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "job.py"), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 4 and len(ck["rng"]) == 2  # both ranks' RNG states are saved
    y = class_labels(10, 4, seed=0)
    single = generate_npz(lambda z, y: z * 0.1 + y.view(-1, 1, 1, 1), lambda z: torch.sigmoid(z[:, :3]),
                          tmp_path / "one.npz", y, (4, 2, 2), batch_size=3, seed=5)
    a, b = np.load(single), np.load(tmp_path / "ddp.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
