"""Graceful preemption: SIGTERM/SIGUSR1 during a long job finish the unit of work, save, exit 128 + signal.

Signals are delivered deterministically: a hook sends one to this process during a given step or
batch, so the tests know where the job must stop.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from raebench.preempt import Preempted, StopOnSignal
from test_stage1_train import assets  # noqa: F401 - the stage-1 fixture
from test_stage2_train import tiny_cfg, toy_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def kill_during(monkeypatch, module, name: str, call: int, sig=signal.SIGTERM) -> list:
    """``module.name`` sends ``sig`` to this process during its ``call``-th call (1-based), then returns as usual;
    returns the list that counts its calls."""
    real, calls = getattr(module, name), []

    def hooked(*a, **k):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(module, name, hooked)
    return calls


def test_handlers_are_restored_and_a_late_signal_is_not_swallowed():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handler
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not replace the first
            assert stop.received == signal.SIGUSR1 and not seen
        # never acted on: re-raised to the handler it would have met
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.local() == signal.SIGUSR1  # acted on: not re-raised
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stage2_sigterm_saves_at_that_step_and_the_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, sig):
    import raebench.stage2.train as tr

    toy_cache(tmp_path / "cache", n=128)
    base = dict(global_batch=32, epochs=10, ckpt_every=4, shift_base=16, max_steps=8)
    full = tr.train(dataclasses.replace(tiny_cfg(tmp_path, **base), out=str(tmp_path / "a")))
    cfg = dataclasses.replace(tiny_cfg(tmp_path, **base), out=str(tmp_path / "b"))
    with monkeypatch.context() as m:
        kill_during(m, tr, "train_step", 6, sig)  # during step 6: not a checkpoint step (ckpt_every 4)
        import raebench.checkpoint

        kill_during(m, raebench.checkpoint, "save_atomic", 2)  # a second signal during that save changes nothing
        with pytest.raises(Preempted, match=rf"stopped by {sig.name} at step 6: checkpoint saved") as e:
            tr.train(cfg)
    assert e.value.exit_code == 128 + sig
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler lives only while the job runs
    ck = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 6 and ck["format"] == tr.CHECKPOINT_FORMAT
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp"))
    again = tr.train(cfg)  # the same command
    assert again["step"] == full["step"] == 8 and again["losses"] == full["losses"][6:]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    for k in ("model", "ema"):
        for name, t in a[k].items():
            assert torch.equal(t, b[k][name]), f"{k}.{name}"


TORCHRUN_STAGE2 = textwrap.dedent('''
    import os, signal, sys
    import raebench.stage2.train as tr
    from raebench.cli import main

    real, steps = tr.train_step, []
    def hooked(*a, **k):  # SIGTERM to rank 1 alone, during its step 3: both ranks must stop after step 3
        steps.append(1)
        if len(steps) == 3 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    tr.train_step = hooked
    main(sys.argv[1:])
''')


def test_torchrun_ranks_agree_on_the_step_and_the_resume_equals_one_process(tmp_path):
    from raebench.stage2.train import preset, train

    toy_cache(tmp_path / "cache", n=64)
    (tmp_path / "job.py").write_text(TORCHRUN_STAGE2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "job.py"),
           "train", "stage2", "--preset", "tiny", "--out", str(tmp_path / "ddp"), "--latents", str(tmp_path / "cache"),
           "--num-classes", "4", "--batch-size", "16", "--epochs", "2", "--ckpt-every", "5", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode != 0
    assert res.stderr.count("stopped by SIGTERM at step 3: checkpoint saved; run the same command to continue") == 1, \
        res.stderr[-3000:]
    assert "exitcode  : 143" in res.stderr, res.stderr[-3000:]  # torchrun itself reports the failure with status 1
    ck = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 3
    cfg = preset("tiny", latents=str(tmp_path / "cache"), num_classes=4, global_batch=16, epochs=2, ckpt_every=5)
    train(dataclasses.replace(cfg, out=str(tmp_path / "ddp")))  # resumed on one process
    train(dataclasses.replace(cfg, out=str(tmp_path / "one")))  # uninterrupted
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert one["step"] == ddp["step"] == 8
    for k in ("model", "ema"):
        for name, t in one[k].items():
            torch.testing.assert_close(ddp[k][name], t, atol=1e-5, rtol=1e-5, msg=f"{k}.{name}")


def test_stage2_dataloader_workers_survive_a_sigterm_to_every_process(tmp_path, monkeypatch):
    """SLURM signals every process of a job step: the DataLoader workers get SIGTERM too, and a dead
    worker would make the main process raise in the middle of the step it should finish."""
    import multiprocessing

    import raebench.stage2.train as tr

    toy_cache(tmp_path / "cache", n=128)
    cfg = tiny_cfg(tmp_path, global_batch=32, epochs=10, ckpt_every=4, shift_base=16, max_steps=8, num_workers=1)
    real, calls = tr.train_step, []

    def hooked(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            # from another process, as SLURM's: torch's workers exit quietly only on their parent's SIGTERM
            pids = [str(c.pid) for c in multiprocessing.active_children()] + [str(os.getpid())]  # the loader's worker
            subprocess.run(["kill", "-TERM", *pids], check=True)
            time.sleep(0.5)  # the worker is gone (or not) before the step goes on
        return real(*a, **k)

    monkeypatch.setattr(tr, "train_step", hooked)
    with pytest.raises(Preempted, match="at step 3: checkpoint saved"):
        tr.train(cfg)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


def test_stage1_sigterm_saves_at_that_step_and_the_resume_equals_an_uninterrupted_run(assets, tmp_path, monkeypatch):
    import raebench.stage1.train as tr
    from raebench.checkpoint import load_state
    from test_stage1_train import _log, _resume_cfg

    tr.train(_resume_cfg(assets), tmp_path / "full")
    with monkeypatch.context() as m:
        kill_during(m, tr, "update_ema", 3)  # during step 3 of 4 (the tiny preset saves every 4)
        with pytest.raises(Preempted, match="stopped by SIGTERM at step 3: checkpoint saved"):
            tr.train(_resume_cfg(assets), tmp_path / "split")
    assert load_state(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 3
    assert not (tmp_path / "split" / "decoder").exists()
    assert tr.train(_resume_cfg(assets), tmp_path / "split")["decoder"]  # the same command: finishes and exports
    a = load_state(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_state(tmp_path / "split" / "checkpoints" / "last.pt")
    for key in ("model", "ema", "disc"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    assert [r["l1"] for r in _log(tmp_path / "full")] == [r["l1"] for r in _log(tmp_path / "split")]


def test_eval_sigterm_saves_progress_after_the_batch_and_the_rerun_gives_the_same_numbers(image_folder, tmp_path,
                                                                                           monkeypatch):
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate
    from raebench.tokenizers import build_tokenizer

    base = dict(tokenizer="bicubic-f8", data=str(image_folder), resolution=32, batch_size=2, device="cpu")
    ref = evaluate(EvalConfig(**base, results_dir=str(tmp_path / "ref")))
    tok = build_tokenizer("bicubic-f8")
    cfg = EvalConfig(**base, results_dir=str(tmp_path / "res"))
    with monkeypatch.context() as m:
        kill_during(m, tok, "encode", 2)  # during batch 2 of 4; no periodic save before batch 20
        with pytest.raises(Preempted, match="stopped by SIGTERM after 4 of 8 images: progress saved") as e:
            evaluate(cfg, tokenizer=tok)
    assert e.value.exit_code == 143 and len(list((tmp_path / "res" / ".work").glob("*/rank0.pt"))) == 1
    calls = kill_during(monkeypatch, tok, "encode", 10**9)  # counts the calls
    out = evaluate(cfg, tokenizer=tok)
    assert len(calls) == 2  # only batches 3 and 4: the progress saved at the signal was resumed
    assert {r.metric: r.value for r in out.rows} == pytest.approx({r.metric: r.value for r in ref.rows}, rel=1e-12)


def test_score_sigterm_saves_progress_after_the_batch_and_the_rerun_gives_the_same_numbers(tmp_path, make_images,
                                                                                            monkeypatch):
    from PIL import Image

    from raebench.evaluator import Evaluator
    from raebench.metrics.scoring import score

    for name, seed in (("ref", 1), ("cand", 2)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(make_images(8, 16, 16, seed=seed)):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i}.png")
    args = (str(tmp_path / "ref"), str(tmp_path / "cand"), ("psnr",))
    full = score(*args, device="cpu", results_dir=str(tmp_path / "full"), batch_size=2)
    with monkeypatch.context() as m:
        kill_during(m, Evaluator, "update", 3)
        with pytest.raises(Preempted, match="stopped by SIGTERM after 6 pairs: progress saved"):
            score(*args, device="cpu", results_dir=str(tmp_path / "res"), batch_size=2)
    calls = kill_during(monkeypatch, Evaluator, "update", 10**9)  # counts the calls
    out = score(*args, device="cpu", results_dir=str(tmp_path / "res"), batch_size=2)
    assert len(calls) == 1  # only the 4th pair batch: the progress saved at the signal was resumed
    assert {r.metric: r.value for r in out.rows} == {r.metric: r.value for r in full.rows}


def test_sample_and_cache_latents_stop_after_the_batch_and_resume(tmp_path, image_folder, monkeypatch):
    import numpy as np

    from raebench.stage2.latents import cache_latents
    from raebench.stage2.sample import generate_npz
    from raebench.tokenizers import build_tokenizer

    labels = torch.arange(7) % 3
    calls, kill_at = [], [2]

    def sample_fn(z, y):
        calls.append(1)
        if len(calls) == kill_at[0]:
            kill_at[0] = None
            os.kill(os.getpid(), signal.SIGUSR1)
        return z * 0.1 + y.view(-1, 1, 1, 1)

    run = lambda out: generate_npz(sample_fn, lambda z: torch.sigmoid(z[:, :3]), tmp_path / out, labels, (4, 2, 2),  # noqa: E731
                                   batch_size=2, seed=3)
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after batch 2 of 4: samples saved") as e:
        run("a.npz")
    assert e.value.exit_code == 128 + signal.SIGUSR1 and len(list((tmp_path / ".a.npz.parts").glob("b*.npz"))) == 2
    calls.clear()
    run("a.npz")
    assert len(calls) == 2  # only the two batches not yet sampled
    run("b.npz")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])

    tok = build_tokenizer("bicubic-f8")
    cache_latents(tok, str(image_folder), tmp_path / "full", resolution=32, batch_size=3, flip=False)
    with monkeypatch.context() as m:
        kill_during(m, tok, "encode", 3)  # the first call measures the latent shape; then batch 2 of 3
        with pytest.raises(Preempted, match="stopped by SIGTERM after 6 of 8 images: progress saved"):
            cache_latents(tok, str(image_folder), tmp_path / "split", resolution=32, batch_size=3, flip=False)
    cache_latents(tok, str(image_folder), tmp_path / "split", resolution=32, batch_size=3, flip=False)
    assert np.array_equal(np.load(tmp_path / "full" / "latents.npy"), np.load(tmp_path / "split" / "latents.npy"))


def test_mark_and_decide_name_the_signal_each_rank_got():
    # the slots of mark, summed over the ranks, tell decide which signal to stop on: SIGUSR1 on one rank is SIGUSR1
    # for all (not slot 0's SIGTERM); with both, the first of STOP_SIGNALS
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            slots = stop.mark(torch.zeros(2))
            assert slots.tolist() == [0.0, 1.0]
            assert StopOnSignal().decide(slots) == signal.SIGUSR1
            assert StopOnSignal().decide([1, 1]) == signal.SIGTERM
            assert StopOnSignal().decide(torch.zeros(2)) is None
            assert stop.decide(slots) == signal.SIGUSR1
        assert not seen  # acted on: leaving the block does not re-raise it
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_during_a_failing_block_is_not_re_raised_over_the_error():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with pytest.raises(ValueError, match="boom"), StopOnSignal():
            os.kill(os.getpid(), signal.SIGUSR1)
            raise ValueError("boom")
        assert not seen  # the error is what the job reports; a re-raised SIGTERM would kill it before the traceback
    finally:
        signal.signal(signal.SIGUSR1, previous)
