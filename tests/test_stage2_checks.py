"""Stage-2 runs refuse what would give a silent wrong result: labels the model cannot hold, resuming
with other settings or data, mixing sampling runs, incompatible guides; the CLI says so before loading."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import raebench.cli as cli
from raebench.cli import stage2_cmds
from raebench.errors import CheckpointError, DataError, RaebenchError
from raebench.stage2.checkpoints import load_stage2_state, read_state_dict
from raebench.stage2.sample import class_labels, generate_npz, load_trained
from raebench.stage2.latents import cache_latents, write_latent_cache
from raebench.stage2.train import PRESETS, build_for_training, preset, train

from test_stage2_sample import fake_fns
from test_stage2_train import _MeanPool, toy_cache

pytestmark = pytest.mark.usefixtures("one_thread")

if "stage2_cmds" not in cli.MODULES:
    stage2_cmds.register(cli.app)


def cli_error(args) -> str:
    """Run the CLI, expect a user error (a RaebenchError, printed without a traceback); return its text."""
    res = CliRunner().invoke(cli.app, args)
    assert isinstance(res.exception, RaebenchError), (res.exception, res.output)
    return str(res.exception)


def small(tmp_path, out="run", **kw):
    return preset("tiny", out=str(tmp_path / out), latents=str(tmp_path / "cache"), num_classes=4, global_batch=16,
                  epochs=1, shift_base=16, **kw)


@pytest.fixture
def trained(tmp_path):
    """A 4-class toy cache and a 4-step run on it (class dropout 0.1)."""
    toy_cache(tmp_path / "cache", n=64)
    train(small(tmp_path))
    return tmp_path / "run"


# -- labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [1, 3])
def test_labels_beyond_num_classes_are_refused(tmp_path, classes):
    toy_cache(tmp_path / "cache", n=64)
    with pytest.raises(DataError, match="labels up to 3.*set --num-classes 4"):
        train(dataclasses.replace(small(tmp_path), num_classes=classes))
    assert not (tmp_path / "run").exists()


def test_unlabelled_data_is_refused_by_cache_latents_and_training(tmp_path, image_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in image_folder.rglob("*.png"):
        (flat / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="has no class subfolders"):
        cache_latents(_MeanPool(), str(flat), tmp_path / "lat", resolution=32)
    assert not (tmp_path / "lat").exists()
    write_latent_cache(tmp_path / "cache", torch.zeros(16, 1, 4, 2, 2), torch.full((16,), -1))
    with pytest.raises(DataError, match="unlabelled examples"):
        train(small(tmp_path))


# -- resuming ---------------------------------------------------------------------------------------


def test_resume_refuses_changed_settings_and_data(trained, tmp_path):
    import json
    import shutil

    # the same cache by another path (moved, or relative vs absolute) is the same data: resumes
    shutil.move(str(tmp_path / "cache"), str(tmp_path / "moved"))
    assert train(dataclasses.replace(small(tmp_path), latents=str(tmp_path / "moved")))["step"] == 4  # finished: not refused
    assert json.loads((tmp_path / "run" / "config.json").read_text())["latents"] == str(tmp_path / "moved")
    shutil.move(str(tmp_path / "moved"), str(tmp_path / "cache"))
    with pytest.raises(RaebenchError, match=r"global_batch: 16 -> 8; lr: 0.001 -> 0.5"):
        train(dataclasses.replace(small(tmp_path), global_batch=8, lr=0.5))
    toy_cache(tmp_path / "cache", n=64, shape=(4, 4, 4))  # other latents into the same folder
    with pytest.raises(RaebenchError, match=r"latent_shape: \[4, 2, 2\] -> \[4, 4, 4\]"):
        train(small(tmp_path))
    toy_cache(tmp_path / "cache", n=64, seed=1)  # the same shape, other data
    with pytest.raises(RaebenchError, match="data id"):
        train(small(tmp_path))
    toy_cache(tmp_path / "cache2", n=64, seed=1)
    # settings that do not change the trajectory may change
    assert train(small(tmp_path, out="other", log_every=1, ckpt_every=1, num_workers=0, max_steps=2))["step"] == 2


def test_config_validation():
    for bad in (dict(log_every=0), dict(ckpt_every=0), dict(max_steps=0), dict(max_steps=-1), dict(num_classes=0),
                dict(class_dropout=1.0)):
        with pytest.raises(RaebenchError):
            preset("tiny", **bad)
    assert {"lightningdit-s", "lightningdit-xl"} <= set(PRESETS)
    m = build_for_training(preset("lightningdit-s", num_classes=4), (4, 2, 2))
    assert type(m).__name__ == "LightningDiT"


def test_log_csv_is_written_and_truncated_on_resume(tmp_path):
    toy_cache(tmp_path / "cache", n=64)
    cfg = dataclasses.replace(small(tmp_path, log_every=1, ckpt_every=2), epochs=2)
    train(dataclasses.replace(cfg, max_steps=3))  # checkpoints at 2 and 3
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=True)
    state["step"] = 2  # as if killed after logging step 3 but before its checkpoint
    torch.save(state, ck)
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert all(np.isfinite(float(r["loss"])) for r in rows) and rows[-1]["epoch"] == "2"


# -- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_formats_and_errors(trained, tmp_path):
    ck = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    model = build_for_training(small(tmp_path), (4, 2, 2))
    wrapped = {"state_dict": {f"module._orig_mod.{k}": v for k, v in ck["ema"].items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    load_stage2_state(model, tmp_path / "wrapped.pt")
    torch.testing.assert_close(model.state_dict(), ck["ema"])
    torch.save({"ema": {**ck["ema"], "step": 3}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="step is not a tensor"):
        read_state_dict(tmp_path / "bad.pt")
    torch.save({**ck, "config": {**ck["config"], "future_knob": 1}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="future_knob"):
        load_trained(tmp_path / "future.pt")
    assert load_trained(trained)[1]["step"] == 4  # a run folder


# -- sampling ----------------------------------------------------------------------------------------


def test_generate_npz_refuses_to_mix_runs_and_a_crash_before_the_first_part_does_not_block(tmp_path):
    y = class_labels(10, 5, seed=0)
    sample_fn, decode = fake_fns([])
    sample_fn.crash = True
    with pytest.raises(KeyboardInterrupt):
        generate_npz(sample_fn, decode, tmp_path / "out.npz", y, (4, 2, 2), batch_size=3, settings={"cfg_scale": 2.0})
    with pytest.raises(RaebenchError, match=r"cfg_scale: 2.0 -> 3.0.*delete that folder"):
        generate_npz(sample_fn, decode, tmp_path / "out.npz", y, (4, 2, 2), batch_size=3, settings={"cfg_scale": 3.0})

    def broken(noise, y):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_npz(broken, decode, tmp_path / "b.npz", y, (4, 2, 2), batch_size=3, settings={"steps": 1})
    sample_fn, decode = fake_fns([])
    out = generate_npz(sample_fn, decode, tmp_path / "b.npz", y, (4, 2, 2), batch_size=3, settings={"steps": 5})
    assert np.load(out)["arr_0"].shape[0] == 10


def test_parts_written_by_the_previous_raebench_resume(tmp_path, caplog):
    """Before the run keys, meta.json held {"key": sha256(labels + seed/batch/shape)}: those parts resume
    (with a warning that their sampler settings were not recorded); other labels are refused."""
    import hashlib
    import json

    y = class_labels(10, 5, seed=0)
    sample_fn, decode = fake_fns([])
    full = np.load(generate_npz(sample_fn, decode, tmp_path / "full.npz", y, (4, 2, 2), batch_size=3, seed=5))["arr_0"]
    sample_fn, decode = fake_fns([])
    sample_fn.crash = True
    with pytest.raises(KeyboardInterrupt):
        generate_npz(sample_fn, decode, tmp_path / "out.npz", y, (4, 2, 2), batch_size=3, seed=5)
    parts = tmp_path / ".out.npz.parts"
    key = hashlib.sha256(y.numpy().tobytes() + b"5/3/[4, 2, 2]").hexdigest()[:16]  # the old format, shape from a checkpoint
    (parts / "meta.json").write_text(json.dumps({"key": key, "n": 10, "batch_size": 3, "seed": 5}))
    with pytest.raises(RaebenchError, match="written by an older raebench for other labels"):
        generate_npz(sample_fn, decode, tmp_path / "out.npz", y.flip(0), (4, 2, 2), batch_size=3, seed=5)
    sample_fn, decode = fake_fns([])
    with caplog.at_level("WARNING"):
        out = generate_npz(sample_fn, decode, tmp_path / "out.npz", y, (4, 2, 2), batch_size=3, seed=5)
    assert "did not record the model and sampler settings" in caplog.text
    assert np.array_equal(np.load(out)["arr_0"], full)


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "--num must be at least 1"),
    (["-n", "-2"], "--num must be at least 1"),
    (["-b", "0"], "--batch-size must be at least 1"),
    (["--method", "foo"], "Unknown sampling --method 'foo'"),
    (["--steps", "1"], "--steps must be at least 2"),
    (["--steps", "0"], "--steps must be at least 2"),
    (["--cfg-interval", "0.8,0.2"], "0 <= T_MIN < T_MAX <= 1"),
    (["--cfg-interval", "nan,inf"], "0 <= T_MIN < T_MAX <= 1"),
    (["--num-classes", "5"], "more than the 4 classes"),
    (["--cfg-scale", "2", "--guide-checkpoint", "GUIDE"], "does not fit the model"),
    (["--guide-checkpoint", "RUN"], "has no effect without --cfg-scale"),
])
def test_sample_arguments_are_checked_before_sampling(trained, tmp_path, args, message):
    (tmp_path / "dir.npz").mkdir()
    if "GUIDE" in args:
        toy_cache(tmp_path / "cache3", n=64, classes=3)
        train(preset("tiny", out=str(tmp_path / "guide"), latents=str(tmp_path / "cache3"), num_classes=3,
                     global_batch=16, epochs=1, shift_base=16))
    args = [{"GUIDE": str(tmp_path / "guide"), "RUN": str(trained)}.get(a, a) for a in args]
    out = cli_error(["sample", "-c", str(trained), "-t", "pixels", "-o", str(tmp_path / "s.npz"), "--device", "cpu"] + args)
    assert message in out
    assert not list(tmp_path.glob(".s.npz.parts"))


def test_sample_paths_and_null_class(trained, tmp_path):
    assert "is a folder" in cli_error(["sample", "-c", str(trained), "-t", "pixels", "-o", str(tmp_path), "--device", "cpu"])
    toy_cache(tmp_path / "rgb-cache", n=64, shape=(3, 2, 2))  # decodable by the 'pixels' tokenizer
    train(preset("tiny", out=str(tmp_path / "rgb"), latents=str(tmp_path / "rgb-cache"), num_classes=4,
                 global_batch=16, epochs=1, shift_base=16))
    res = CliRunner().invoke(cli.app, ["sample", "-c", str(tmp_path / "rgb"), "-t", "pixels", "-n", "4", "--steps", "2",
                                       "-o", str(tmp_path / "new" / "s.npz"), "--grid", str(tmp_path / "g" / "grid.png"),
                                       "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "new" / "s.npz").is_file() and (tmp_path / "g" / "grid.png").is_file()
    train(dataclasses.replace(small(tmp_path, out="nodrop"), class_dropout=0.0))
    assert "no null class" in cli_error(["sample", "-c", str(tmp_path / "nodrop"), "-t", "pixels", "--cfg-scale", "2",
                                         "-o", str(tmp_path / "s.npz"), "--device", "cpu"])


def test_sample_refuses_resuming_with_other_settings(tmp_path):
    toy_cache(tmp_path / "rgb-cache", n=64, shape=(3, 2, 2))  # decodable by the 'pixels' tokenizer
    train(preset("tiny", out=str(tmp_path / "rgb"), latents=str(tmp_path / "rgb-cache"), num_classes=4,
                 global_batch=16, epochs=1, shift_base=16))
    base = ["sample", "-c", str(tmp_path / "rgb"), "-t", "pixels", "-n", "8", "-b", "2", "--steps", "2", "-o", str(tmp_path / "s.npz"),
            "--device", "cpu"]
    parts = tmp_path / ".s.npz.parts"
    parts.mkdir()
    (parts / "b0000000.npz").write_bytes(b"")  # a finished batch of an earlier run ...
    (parts / "meta.json").write_text(json.dumps({"run": {"steps": 5}}))  # ... with other settings
    assert "re-run with those settings" in cli_error(base)


def test_data_with_fewer_classes_than_the_model_warns(caplog):
    """Legal, but the untrained classes would be sampled by `sample --label-sampling equal`."""
    import logging

    from raebench.stage2.train import check_labels

    with caplog.at_level(logging.WARNING):
        check_labels(torch.tensor([0, 1, 1, 0]), 10, "'data'")
    assert "2 of the model's 10 classes" in caplog.text and "--num-classes 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_labels(torch.tensor([0, 1, 2]), 3, "'data'")
    assert not caplog.text


def test_latents_with_a_tokenizer_or_data_is_refused(tmp_path):
    err = cli_error(["train", "stage2", "-p", "tiny", "--latents", str(tmp_path / "cache"), "-t", "pixels", "--data",
                     str(tmp_path), "-o", str(tmp_path / "run"), "--device", "cpu"])
    assert "so --tokenizer and --data would be ignored; give either --latents DIR or --tokenizer NAME --data DIR" in err
    assert not (tmp_path / "run").exists()


def test_generate_npz_takes_a_renamed_decoder_file_as_the_same_weights(tmp_path):
    """Samples and their parts record the tokenizer's weights (a local file's name is only a label):
    a renamed --decoder file of the same content finishes or reuses them; other content is refused."""
    y = class_labels(6, 3, seed=0)
    a, renamed = "local:a.pt@0123456789ab+stats:aaaaaaaaaaaa", "local:b.pt@0123456789ab+stats:aaaaaaaaaaaa"
    other = "local:a.pt@ba9876543210+stats:aaaaaaaaaaaa"
    sample_fn, decode = fake_fns([])
    sample_fn.crash = True  # parts of a killed job, resumed with the renamed file
    with pytest.raises(KeyboardInterrupt):
        generate_npz(sample_fn, decode, tmp_path / "s.npz", y, (4, 2, 2), batch_size=2, settings={"tokenizer_weights": a})
    with pytest.raises(RaebenchError, match="tokenizer_weights"):
        generate_npz(sample_fn, decode, tmp_path / "s.npz", y, (4, 2, 2), batch_size=2, settings={"tokenizer_weights": other})
    calls = []
    sample_fn, decode = fake_fns(calls)
    generate_npz(sample_fn, decode, tmp_path / "s.npz", y, (4, 2, 2), batch_size=2, settings={"tokenizer_weights": renamed})
    assert calls == [2]  # the two parts before the crash were kept
    calls.clear()  # the finished file: nothing to do
    generate_npz(sample_fn, decode, tmp_path / "s.npz", y, (4, 2, 2), batch_size=2, settings={"tokenizer_weights": a})
    assert calls == []
    with pytest.raises(RaebenchError, match="finished samples of other settings"):
        generate_npz(sample_fn, decode, tmp_path / "s.npz", y, (4, 2, 2), batch_size=2, settings={"tokenizer_weights": other})
