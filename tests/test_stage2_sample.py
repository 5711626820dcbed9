"""Sampling runs: balanced labels, resumable ADM npz output, loading trained checkpoints."""

import numpy as np
import pytest
import torch

from raebench.stage2.sample import class_labels, generate_npz, load_trained, save_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def test_balanced_labels():
    y = class_labels(50_000, 1000, "equal", seed=3)
    assert torch.equal(torch.bincount(y, minlength=1000), torch.full((1000,), 50))
    assert not torch.equal(y[:1000], torch.arange(1000))  # shuffled, so shards mix classes
    assert torch.equal(y, class_labels(50_000, 1000, "equal", seed=3))
    r = class_labels(100, 10, "random")
    assert r.min() >= 0 and r.max() < 10


def fake_fns(calls):
    def sample_fn(noise, y):
        calls.append(len(y))
        if len(calls) == 3 and getattr(sample_fn, "crash", False):
            raise KeyboardInterrupt
        # like the SDE sampler: step noise from torch's global CPU RNG (seeded per batch by generate_npz)
        return noise + y.view(-1, 1, 1, 1) + torch.randn(noise.shape)

    def decode(z):  # (B, 4, 2, 2) -> (B, 3, 8, 8) in [0, 1]
        return torch.sigmoid(z[:, :3]).repeat_interleave(4, -1).repeat_interleave(4, -2)

    return sample_fn, decode


def test_generate_npz_resumes(tmp_path):
    y = class_labels(10, 5, seed=0)
    calls = []
    sample_fn, decode = fake_fns(calls)
    ref = generate_npz(sample_fn, decode, tmp_path / "ref.npz", y, (4, 2, 2), batch_size=3, seed=7)
    assert calls == [3, 3, 3, 1]
    data = np.load(ref)
    assert data["arr_0"].shape == (10, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert np.array_equal(data["arr_1"], y.numpy()) and np.array_equal(data["labels"], y.numpy())
    import json

    settings = json.loads(str(data["raebench_settings"]))  # plain JSON: no pickle needed to read it
    assert settings["seed"] == 7 and settings["batch_size"] == 3 and settings["n"] == 10

    calls2 = []
    sample_fn, decode = fake_fns(calls2)
    sample_fn.crash = True
    with pytest.raises(KeyboardInterrupt):
        generate_npz(sample_fn, decode, tmp_path / "out.npz", y, (4, 2, 2), batch_size=3, seed=7)
    assert not (tmp_path / "out.npz").exists()
    sample_fn.crash = False
    calls2.clear()
    out = generate_npz(sample_fn, decode, tmp_path / "out.npz", y, (4, 2, 2), batch_size=3, seed=7)
    assert calls2 == [3, 1]  # only the unfinished batches
    assert np.array_equal(np.load(out)["arr_0"], data["arr_0"])
    assert save_grid(out, tmp_path / "grid.png").is_file()


def test_load_trained_checkpoint(tmp_path):
    from raebench.stage2.train import preset, train

    from test_stage2_train import toy_cache

    toy_cache(tmp_path / "cache", n=64)
    cfg = preset("tiny", out=str(tmp_path / "run"), latents=str(tmp_path / "cache"), num_classes=4,
                 global_batch=32, epochs=1, shift_base=16)
    train(cfg)
    model, info = load_trained(tmp_path / "run" / "checkpoints" / "last.pt")
    assert info["latent_shape"] == (4, 2, 2) and info["step"] == 2 and info["shift"] == 1.0
    assert model(torch.randn(2, 4, 2, 2), torch.rand(2), torch.tensor([0, 3])).shape == (2, 4, 2, 2)


def test_quantize_truncate_is_the_official_conversion_and_keys_the_resume(tmp_path):
    """--quantize truncate writes x * 255 floored, the expression of the official sample_ddp.py;
    the default rounds; parts of one mode are never finished in the other."""
    from raebench.images import to_uint8
    from raebench.errors import RaebenchError

    x = torch.rand(2, 3, 5, 7) * 1.2 - 0.1
    assert torch.equal(to_uint8(x, "truncate"), x.clamp(0, 1).mul(255).to(torch.uint8))  # the official expression
    assert torch.equal(to_uint8(x), torch.clamp(x * 255 + 0.5, 0, 255).to(torch.uint8))  # DiT's: 127.5 (2x-1) + 128
    with pytest.raises(ValueError):
        to_uint8(x, "nearest")

    y = class_labels(4, 2, seed=0)
    sample_fn, decode = fake_fns([])
    rounded = np.load(generate_npz(sample_fn, decode, tmp_path / "r.npz", y, (4, 2, 2), batch_size=2, seed=1))["arr_0"]
    truncated = np.load(generate_npz(sample_fn, decode, tmp_path / "t.npz", y, (4, 2, 2), batch_size=2, seed=1,
                                     quantize="truncate"))["arr_0"]
    diff = rounded.astype(int) - truncated.astype(int)
    assert set(np.unique(diff)) <= {0, 1} and diff.any()

    calls = []
    sample_fn, decode = fake_fns(calls)
    sample_fn.crash = True
    y6 = class_labels(6, 2, seed=0)
    with pytest.raises(KeyboardInterrupt):
        generate_npz(sample_fn, decode, tmp_path / "o.npz", y6, (4, 2, 2), batch_size=2, seed=1)
    with pytest.raises(RaebenchError, match="quantize"):
        generate_npz(sample_fn, decode, tmp_path / "o.npz", y6, (4, 2, 2), batch_size=2, seed=1, quantize="truncate")


def test_sampling_refuses_a_second_job_unrecorded_parts_and_resamples_damaged_parts(tmp_path):
    from raebench.errors import RaebenchError
    from raebench.locks import OutputLock

    y = class_labels(10, 5, seed=0)
    calls = []
    sample_fn, decode = fake_fns(calls)
    out = tmp_path / "s.npz"
    held = OutputLock(out, "test job", "wait").acquire()  # a job already on s.npz
    try:
        with pytest.raises(RaebenchError, match=r"Another sampling job is writing .*s\.npz'"):
            generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=3, seed=7)
    finally:
        held.release()
    assert calls == []
    ref = np.load(generate_npz(sample_fn, decode, tmp_path / "ref.npz", y, (4, 2, 2), batch_size=3, seed=7))["arr_0"]
    # parts without their settings record (meta.json) are never taken for this run's
    parts = tmp_path / ".s.npz.parts"
    parts.mkdir()
    (parts / "b0000003.npz").write_bytes(b"PK")
    with pytest.raises(RaebenchError, match="without a record of their settings"):
        generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=3, seed=7)
    (parts / "b0000003.npz").unlink()
    # a damaged part (truncated by a full disk) is sampled again at the resume, not found at the merge
    sample_fn.crash = True
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # on the third batch
        generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=3, seed=7)
    sample_fn.crash = False
    done = sorted(parts.glob("b*.npz"))
    assert len(done) == 2
    done[0].write_bytes(done[0].read_bytes()[:100])
    (parts / ".b0000002.npz.abcd1234.npz").write_bytes(b"half")  # a part write killed midway
    (tmp_path / ".s.npz.qwertyui.npz").write_bytes(b"half")  # a final write killed midway (10 GB at 50k)
    calls.clear()
    got = np.load(generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=3, seed=7))["arr_0"]
    assert calls == [3, 3, 1] and np.array_equal(got, ref)
    assert not parts.exists() and not (tmp_path / ".s.npz.qwertyui.npz").exists()


def test_merging_many_parts_keeps_one_file_open(tmp_path):
    """300 parts merged under a soft limit of 200 open files (50k samples are 1,563 parts at batch 32)."""
    import resource

    y = class_labels(300, 5, seed=0)
    calls = []
    sample_fn, decode = fake_fns(calls)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(200, hard), hard))
    try:
        out = generate_npz(sample_fn, decode, tmp_path / "many.npz", y, (4, 2, 2), batch_size=1, seed=2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    data = np.load(out)
    assert data["arr_0"].shape == (300, 8, 8, 3) and np.array_equal(data["arr_1"], y.numpy())


def test_a_finished_sample_file_is_kept_and_never_silently_replaced(tmp_path):
    """Re-running a finished job returns its npz without sampling again; other settings, another
    count, or a file that is not ours are refused, and the file stays as it was."""
    from raebench.errors import RaebenchError

    y = class_labels(6, 3, seed=0)
    calls = []
    sample_fn, decode = fake_fns(calls)
    out = generate_npz(sample_fn, decode, tmp_path / "s.npz", y, (4, 2, 2), batch_size=2, seed=1, settings={"cfg": 1.0})
    before = out.read_bytes()
    calls.clear()
    assert generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=2, seed=1, settings={"cfg": 1.0}) == out
    assert calls == [] and out.read_bytes() == before  # nothing sampled, nothing rewritten
    with pytest.raises(RaebenchError, match=r"other settings \(cfg: 1.0 -> 4.0\); delete it"):
        generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=2, seed=1, settings={"cfg": 4.0})
    with pytest.raises(RaebenchError, match=r"n: 6 -> 3.*labels"):
        generate_npz(sample_fn, decode, out, y[:3], (4, 2, 2), batch_size=2, seed=1, settings={"cfg": 1.0})
    with pytest.raises(RaebenchError, match="seed: 1 -> 2"):
        generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=2, seed=2, settings={"cfg": 1.0})
    assert calls == [] and out.read_bytes() == before and not list(tmp_path.glob(".s.npz.parts"))
    foreign = tmp_path / "mine.npz"
    np.savez(foreign, arr_0=np.zeros((2, 8, 8, 3), np.uint8))  # e.g. the user's reference batch
    for f in (foreign, tmp_path / "text.npz"):
        if not f.exists():
            f.write_text("not an npz")
        kept = f.read_bytes()
        with pytest.raises(RaebenchError, match="not a sample file written by raebench sample; delete it"):
            generate_npz(sample_fn, decode, f, y, (4, 2, 2), batch_size=2, seed=1)
        assert f.read_bytes() == kept


def test_parts_left_by_a_kill_after_the_merge_are_removed_by_the_rerun(tmp_path, monkeypatch):
    """A job killed between writing the final npz and removing its parts left the parts folder (a
    second copy of every sample: ~10 GB for 50k at 256 px) for good: the re-run found the npz finished
    and returned before any cleanup."""
    import types

    import raebench.stage2.sample as sm

    y = class_labels(6, 3, seed=0)
    sample_fn, decode = fake_fns([])
    out = tmp_path / "s.npz"

    def killed(*a, **k):
        raise RuntimeError("killed")  # the process dies right after the npz was renamed into place

    monkeypatch.setattr(sm, "shutil", types.SimpleNamespace(rmtree=killed))
    with pytest.raises(RuntimeError, match="killed"):
        generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=2, seed=1)
    monkeypatch.undo()
    parts = tmp_path / ".s.npz.parts"
    assert out.is_file() and len(list(parts.glob("b*.npz"))) == 3
    before = out.read_bytes()
    assert generate_npz(sample_fn, decode, out, y, (4, 2, 2), batch_size=2, seed=1) == out
    assert out.read_bytes() == before and not parts.exists()


def test_non_finite_samples_are_refused_not_written_as_black_images(tmp_path):
    """A model that outputs NaN used to give an all-black npz and exit 0 (a silent wrong gFID); now the
    merge refuses it, names the count, writes no npz and keeps the parts (a re-run says the same)."""
    from raebench.errors import NonFiniteError

    y = class_labels(6, 3, seed=0)
    sample_fn, decode = fake_fns([])

    def nan_in_second_batch(noise, labels):
        z = sample_fn(noise, labels)
        if nan_in_second_batch.calls == 1:
            z[0, 0, 0, 0] = float("nan")
        nan_in_second_batch.calls += 1
        return z

    nan_in_second_batch.calls = 0
    out = tmp_path / "s.npz"
    for _ in range(2):
        with pytest.raises(NonFiniteError, match=r"1 of 6 samples decoded to non-finite values .*No sample file was written"):
            generate_npz(nan_in_second_batch, decode, out, y, (4, 2, 2), batch_size=2, seed=1)
        assert not out.exists() and len(list((tmp_path / ".s.npz.parts").glob("b*.npz"))) == 3


def test_non_finite_refusal_names_the_samples_their_labels_seed_and_what_to_try(tmp_path):
    """The refusal said only how many samples were NaN; now it names the first few (position in the sample
    file, class label, batch), the seed and batch size that draw them again, and what to try (a lower
    --cfg-scale when guided, no --tf32 when it was on, the checkpoint)."""
    import re

    from raebench.errors import NonFiniteError

    y = class_labels(12, 4, seed=0)
    sample_fn, decode = fake_fns([])
    nan_at = {1: [0, 2], 3: [1]}  # batch -> samples of it (batches of 3)

    def nan_here(noise, labels):
        z = sample_fn(noise, labels)
        for i in nan_at.get(nan_here.calls, []):
            z[i, 0, 0, 0] = float("nan")
        nan_here.calls += 1
        return z

    nan_here.calls = 0
    with pytest.raises(NonFiniteError) as e:
        generate_npz(nan_here, decode, tmp_path / "s.npz", y, (4, 2, 2), batch_size=3, seed=5,
                     settings={"cfg_scale": 4.0, "tf32": True})
    msg = " ".join(str(e.value).split())
    want = [(b * 3 + i, int(y[b * 3 + i]), b) for b, at in sorted(nan_at.items()) for i in at]
    assert re.findall(r"sample #(\d+) \(class (\d+), batch (\d+)\)", msg) == [tuple(map(str, w)) for w in want], msg
    assert msg.startswith("3 of 12 samples decoded to non-finite values"), msg
    assert "--seed 5, --batch-size 3" in msg and "a lower --cfg-scale (this run: 4)" in msg and "drop --tf32" in msg, msg
    assert "checking the checkpoint" in msg and not (tmp_path / "s.npz").exists()


def test_merge_streams_the_parts_into_the_npz(tmp_path):
    """rank 0's merge holds one part at a time, not every sample (39 GB for 50k at 512 px), and writes
    the arrays np.savez would: the same member bytes."""
    import tracemalloc
    import zipfile

    from raebench.stage2.sample import _merge

    parts = tmp_path / ".s.npz.parts"
    parts.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30 * 8 - 3, 64, 64, 3), dtype=np.uint8)  # 30 parts, the last one short
    labels = rng.integers(0, 1000, len(images))
    for b in range(30):
        np.savez(parts / f"b{b:07d}.npz", images=images[b * 8:(b + 1) * 8], labels=labels[b * 8:(b + 1) * 8],
                 nonfinite=np.array(0))
    import raebench.metrics.sources  # noqa: F401 (imported by the merge: not part of its memory)
    from raebench.results import provenance

    provenance()  # its imports and package lookups, likewise
    tracemalloc.start()
    try:
        _merge(parts, tmp_path / "s.npz", {"seed": 1}, len(images), 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 4, (peak, images.nbytes)
    assert not parts.exists()
    np.savez(tmp_path / "ref.npz", arr_0=images, arr_1=labels, labels=labels)
    with zipfile.ZipFile(tmp_path / "s.npz") as got, zipfile.ZipFile(tmp_path / "ref.npz") as want:
        assert got.namelist() == [*want.namelist(), "raebench_settings.npy"]
        for name in want.namelist():
            assert got.read(name) == want.read(name), name
            assert got.getinfo(name).compress_type == zipfile.ZIP_STORED


def test_save_grid_reads_only_the_samples_it_shows(tmp_path):
    """--grid of a 50k-sample file loaded the whole arr_0 (9.8 GB at 256 px) to show 64 of them."""
    import tracemalloc

    from PIL import Image

    imgs = np.random.default_rng(0).integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)  # 1.2 MB
    np.savez(tmp_path / "s.npz", arr_0=imgs, arr_1=np.zeros(400, np.int64))
    tracemalloc.start()
    try:
        save_grid(tmp_path / "s.npz", tmp_path / "g.png", n=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < imgs.nbytes // 4, peak
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(grid[:32, :32], imgs[0]) and np.array_equal(grid[32:, 32:], imgs[3])


def test_a_grid_write_killed_midway_leaves_the_earlier_grid_whole(tmp_path, monkeypatch):
    """The --grid PNG is written atomically: a job killed while writing it (SIGKILL: simulated by
    dying after half the bytes) leaves the grid of the earlier run, never a truncated PNG."""
    from PIL import Image

    imgs = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs, arr_1=np.zeros(4, np.int64))
    save_grid(tmp_path / "s.npz", tmp_path / "g.png")
    before = (tmp_path / "g.png").read_bytes()
    real = Image.Image.save

    def dies(self, fp, *a, **k):
        import io

        buf = io.BytesIO()
        real(self, buf, *a, **{"format": "PNG", **k})
        data = buf.getvalue()
        if hasattr(fp, "write"):
            fp.write(data[: len(data) // 2])
        else:
            open(fp, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_grid(tmp_path / "s.npz", tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]


def test_sde_step_noise_is_no_batch_starting_noise(tmp_path):
    """The stochastic samplers' step noise was seeded with batch b's noise seed + 7919, i.e. it was
    the starting noise of batch b + 7919: in runs of more than 7,919 batches (50k samples at
    --batch-size 6 or less) two samples shared a noise draw."""
    from raebench.stage2.sample import _noise_generator

    draws = []

    def sde_like(noise, y):  # the first SDE step draws randn like x from the global CPU RNG
        draws.append(torch.randn(noise.shape))
        return noise

    generate_npz(sde_like, lambda z: torch.sigmoid(z[:, :3]), tmp_path / "s.npz", class_labels(2, 2), (3, 2, 2),
                 batch_size=1, seed=0)
    starts = torch.stack([torch.randn(1, 3, 2, 2, generator=_noise_generator(0, b)) for b in range(10_000)])
    for d in draws:
        assert not (starts == d).flatten(1).all(1).any()
    again = []
    generate_npz(lambda z, y: again.append(torch.randn(z.shape)) or z, lambda z: torch.sigmoid(z[:, :3]),
                 tmp_path / "t.npz", class_labels(2, 2), (3, 2, 2), batch_size=1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(draws, again))  # still seeded per batch: reruns repeat
    generate_npz(sde_like, lambda z: torch.sigmoid(z[:, :3]), tmp_path / "u.npz", class_labels(2, 2), (3, 2, 2),
                 batch_size=2, seed=-3)  # a negative --seed, as torch takes it


def test_parts_of_another_count_or_labels_are_refused_naming_the_options(tmp_path):
    """Parts of an interrupted run resumed with another --num (or label options) were refused as
    "labels: 'c590673d...' -> '80893dd8...'", a digest that names no option."""
    from raebench.errors import RaebenchError

    calls = []
    sample_fn, decode = fake_fns(calls)
    sample_fn.crash = True
    with pytest.raises(KeyboardInterrupt):
        generate_npz(sample_fn, decode, tmp_path / "s.npz", class_labels(8, 2), (4, 2, 2), batch_size=2, seed=1)
    with pytest.raises(RaebenchError, match=r"other settings \(n: 8 -> 6; labels \(a digest: other --num, "
                                            r"--num-classes, --label-sampling or --seed\): '"):
        generate_npz(sample_fn, decode, tmp_path / "s.npz", class_labels(6, 2), (4, 2, 2), batch_size=2, seed=1)
    with pytest.raises(RaebenchError, match=r"other settings \(labels \(a digest: other --num, --num-classes, "
                                            r"--label-sampling or --seed\): '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        generate_npz(sample_fn, decode, tmp_path / "s.npz", class_labels(8, 2, "random"), (4, 2, 2), batch_size=2,
                     seed=1)
