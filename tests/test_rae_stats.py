"""Latent statistics: exact accumulation, exact merging across ranks, the official file format."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from raebench.errors import CheckpointError
from raebench.rae.stats import LatentStats, StatsAccumulator, accumulate_stats


def latents(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(n, 4, 2, 3, generator=g)  # offset mean: a cancellation-prone case


def test_accumulator_is_exact():
    z = latents()
    acc = StatsAccumulator()
    for chunk in z.split(7):
        acc.update(chunk)
    z64 = z.double()
    assert acc.count == 50
    assert torch.allclose(acc.mean, z64.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(acc.var, z64.var(0, unbiased=False), rtol=1e-10, atol=0)


def test_merge_equals_one_pass_regardless_of_split():
    z = latents()
    whole = StatsAccumulator()
    whole.update(z)
    parts = [StatsAccumulator() for _ in range(3)]
    for i, chunk in enumerate(z.split(17)):
        parts[i].update(chunk)
    merged = StatsAccumulator().merge(parts[2]).merge(parts[0]).merge(parts[1])
    assert merged.count == whole.count
    assert torch.allclose(merged.mean, whole.mean, rtol=1e-13, atol=0)
    assert torch.allclose(merged.var, whole.var, rtol=1e-12, atol=0)
    a, b = merged.to_stats(), whole.to_stats()  # what is written: float32
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    z = latents()
    acc = StatsAccumulator()
    acc.update(z[rank * 50 // world : (rank + 1) * 50 // world])
    acc.all_reduce()
    if rank == 0:
        torch.save({"count": acc.count, "mean": acc.mean, "var": acc.var}, out)
    dist.destroy_process_group()


def test_all_reduce_across_two_processes(tmp_path):
    out = tmp_path / "reduced.pt"
    mp.spawn(_rank_main, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    whole = StatsAccumulator()
    whole.update(latents())
    assert got["count"] == 50
    assert torch.allclose(got["mean"], whole.mean, rtol=1e-13, atol=0)
    assert torch.allclose(got["var"], whole.var, rtol=1e-12, atol=0)


def test_official_format_round_trip(tmp_path):
    z = latents()
    st = accumulate_stats(lambda x: x, [z[:20], z[20:]]).to_stats()
    p = st.save(tmp_path / "stat.pt")
    raw = torch.load(p, weights_only=True)
    assert set(raw) == {"mean", "var"} and raw["mean"].dtype == torch.float32 and raw["mean"].shape == (4, 2, 3)
    back = LatentStats.load(p)
    assert torch.equal(back.mean, st.mean) and torch.equal(back.var, st.var)
    zn = back.normalize(z)
    assert torch.allclose(zn, (z - raw["mean"]) / torch.sqrt(raw["var"] + 1e-5))
    assert torch.allclose(back.denormalize(zn), z, atol=1e-5)
    # official files may lack one entry (the official code then uses 0 / 1)
    torch.save({"mean": raw["mean"]}, tmp_path / "mean_only.pt")
    assert torch.equal(LatentStats.load(tmp_path / "mean_only.pt").var, torch.ones(4, 2, 3))
    torch.save({"nope": raw["mean"]}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no 'mean' or 'var'"):
        LatentStats.load(tmp_path / "bad.pt")


def test_hflip_adds_mirrors():
    x = torch.rand(3, 3, 4, 4)
    acc = accumulate_stats(lambda t: t, [x], hflip=True)
    ref = torch.cat([x, x.flip(-1)]).double()
    assert acc.count == 6 and torch.allclose(acc.mean, ref.mean(0))


def test_unknown_keys_in_a_stats_file_are_named(tmp_path, caplog):
    """A VA-VAE-style {'mean', 'std'} file read as RAE statistics: 'std' is ignored (as the official loader
    does, leaving unit variance), which the user is told."""
    torch.save({"mean": torch.zeros(4, 2, 2), "std": torch.full((4, 2, 2), 3.0)}, tmp_path / "stat.pt")
    with caplog.at_level("WARNING"):
        st = LatentStats.load(tmp_path / "stat.pt")
    assert "['std'], which are ignored" in caplog.text and torch.equal(st.var, torch.ones(4, 2, 2))


def test_stats_command_removes_a_killed_saves_temporary_and_is_one_job_per_file(image_folder, tmp_path, monkeypatch,
                                                                                capsys):
    """A `stats` job killed inside its save left `.stat.pt.XXXX.tmp` beside the output for good (the
    save's own sweep takes only hour-old files); the next job on that file removes it under the
    file's lock, and a second job on a file in use is refused."""
    from raebench.cli import rae_cmds
    from raebench.locks import OutputLock
    from _cli import run

    monkeypatch.setattr(rae_cmds, "feature_extractor", lambda **kw: ((lambda x: x[:, :, :4, :4]), "identity"))
    out = tmp_path / "stat.pt"
    orphan = tmp_path / ".stat.pt.k1ll3d_x.tmp"
    orphan.write_bytes(b"half a stats file")
    argv = ["stats", "--encoder", "x", "--data", str(image_folder), "-r", "16", "--out", str(out), "--device", "cpu"]
    held = OutputLock(out, "test job").acquire()
    try:
        code, _, err = run(argv, capsys)
        assert code != 0 and "Another statistics job is writing" in err, err
    finally:
        held.release()
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert not orphan.exists() and torch.load(out, weights_only=True)["mean"].shape == (3, 4, 4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".stat")) == [".stat.pt.lock"]


def test_normalise_and_denormalise_are_the_official_formulas_for_small_variances():
    """The official RAE encode/decode: (z - mean) / sqrt(var + 1e-5) and z * sqrt(var + 1e-5) + mean,
    written out in float64. Variances down to 1e-7 (nearly constant channels), where the eps is most
    of the scale and dropping it on either side would move the latents by factors."""
    g = torch.Generator().manual_seed(0)
    var = 10.0 ** torch.empty(4, 2, 3).uniform_(-7, 1, generator=g)
    mean = torch.randn(4, 2, 3, generator=g)
    stats = LatentStats(mean, var)
    x = torch.randn(5, 4, 2, 3, generator=g)
    scale = torch.sqrt(var.double() + 1e-5)
    torch.testing.assert_close(stats.normalize(x).double(), (x.double() - mean.double()) / scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.denormalize(x).double(), x.double() * scale + mean.double(), rtol=1e-5, atol=1e-6)


def test_stats_stops_at_the_first_batch_with_nan_latents_naming_the_image(image_folder, tmp_path, monkeypatch, capsys):
    """An encoder giving NaN ran the whole pass and then failed with "Latent statistics hold a negative or
    non-finite variance or mean"; now the pass stops at the first batch whose latents hold NaN/Inf, naming its
    image, and writes nothing."""
    from raebench.cli import rae_cmds
    from raebench.data import resolve_data
    from _cli import run

    images = resolve_data(str(image_folder), None, None, 0).images
    order = [str(p) for p in images.paths]
    poisoned = 5  # the sixth image in data order: batch 2 of batches of 2
    seen = []

    def encoder(x):  # (B, 3, 16, 16) -> (B, 3, 4, 4); NaN for the poisoned image (recognised by its pixels)
        seen.append(len(x))
        z = x[:, :, :4, :4].clone()
        z[(x.flatten(1) - ref.flatten()).abs().amax(1) < 1e-6] = float("nan")
        return z

    from raebench.images import to_float
    from raebench.loaders import ImageDataset

    ref = to_float(ImageDataset(images, 16)[poisoned]["image"])
    monkeypatch.setattr(rae_cmds, "feature_extractor", lambda **kw: (encoder, "nan-encoder"))
    out = tmp_path / "stat.pt"
    code, _, err = run(["stats", "--encoder", "x", "--data", str(image_folder), "-r", "16", "-b", "2", "--out", str(out),
                        "--device", "cpu"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "NaN/Inf latents for" in err and order[poisoned] in err.replace(" ", ""), err
    assert "negative or non-finite" not in err and not out.exists()
    assert seen == [1, 2, 2, 2], seen  # the probe of the latent shape, then batches 0-2 of 4: stopped at the third


def test_accumulate_stats_stops_at_the_batch_with_non_finite_features():
    from raebench.errors import NonFiniteError

    x = torch.rand(2, 3, 4, 4)
    seen = []

    def features(t):
        seen.append(t)
        return t.clone().fill_(float("inf")) if len(seen) == 2 else t

    with pytest.raises(NonFiniteError, match=r"batch 1 hold NaN/Inf \(image 0 of the batch; 2 of 2\)"):
        accumulate_stats(features, [x, x, x])
    assert len(seen) == 2
