"""Stage-2 training on a toy latent distribution: learning, exact resume, the latent cache."""

import dataclasses

import numpy as np
import pytest
import torch

from raebench.errors import DataError, RaebenchError
from raebench.stage2.samplers import sample
from raebench.stage2.latents import LatentCache, cache_latents, write_latent_cache
from raebench.stage2.train import PRESETS, TrainConfig, build_for_training, lr_factor, preset, train
from raebench.stage2.checkpoints import load_stage2_state

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_cache(root, n=512, classes=4, shape=(4, 2, 2), seed=0):
    """A class-conditional mixture: each class a tight Gaussian around its own random mean."""
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(classes, *shape, generator=g)
    y = torch.arange(n) % classes
    x = means[y] + 0.2 * torch.randn(n, *shape, generator=g)
    return write_latent_cache(root, torch.stack([x, x.flip(-1)], 1), y), means


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between two sample sets (flattened)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    return preset("tiny", out=str(tmp_path / "run"), latents=str(tmp_path / "cache"), num_classes=4, **kw)


def test_loss_falls_and_samples_approach_data(tmp_path):
    _, means = toy_cache(tmp_path / "cache")
    cfg = tiny_cfg(tmp_path, epochs=8, lr=8e-3, ema_decay=0.9, shift_base=16, ckpt_every=1000)  # 64 steps
    torch.manual_seed(0)
    init = build_for_training(cfg, (4, 2, 2)).eval()
    res = train(cfg)
    losses = res["losses"]
    assert res["step"] == 64 and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])

    trained = build_for_training(cfg, (4, 2, 2)).eval()
    load_stage2_state(trained, tmp_path / "run" / "checkpoints" / "last.pt")  # the EMA weights
    g = torch.Generator().manual_seed(1)
    y = torch.arange(128) % 4
    noise = torch.randn(128, 4, 2, 2, generator=g)
    ref = means[y] + 0.2 * torch.randn(128, 4, 2, 2, generator=g)  # fresh data with the same labels
    d_init = energy_distance(sample(init, noise, y, num_steps=20), ref)
    d_trained = energy_distance(sample(trained, noise, y, num_steps=20), ref)
    assert d_trained < 0.6 * d_init


def test_resume_matches_uninterrupted(tmp_path):
    toy_cache(tmp_path / "cache", n=128)
    base = dict(global_batch=32, epochs=10, ckpt_every=3, grad_accum=2, shift_base=16)
    full = train(dataclasses.replace(tiny_cfg(tmp_path, **base), out=str(tmp_path / "a"), max_steps=12))
    part = dataclasses.replace(tiny_cfg(tmp_path, **base), out=str(tmp_path / "b"), max_steps=7)
    assert train(part)["step"] == 7  # "killed" after the checkpoint at step 7 (and 6)
    again = train(dataclasses.replace(part, max_steps=12))  # the same command, re-run
    assert again["step"] == 12 and full["step"] == 12
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    for k in ("model", "ema"):
        for name, t in a[k].items():
            torch.testing.assert_close(t, b[k][name], atol=0, rtol=0, msg=f"{k}.{name}")
    assert set(a) >= {"model", "ema", "opt", "sched", "step", "config", "data"}
    assert (tmp_path / "b" / "config.json").is_file()
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp"))


def _log_rows(run) -> dict[int, tuple]:
    import csv

    with open(run / "log.csv", newline="") as f:
        return {int(r["step"]): (r["epoch"], r["images"], r["lr"], r["loss"]) for r in csv.DictReader(f)}


def test_log_rows_after_a_resume_average_the_same_steps(tmp_path):
    """A checkpoint between two log rows (ckpt_every 3, log_every 2) keeps the losses since the last
    row: the first row after the resume averages steps 9-10 as the uninterrupted run's, bit for bit
    (it averaged step 10 alone). The row at the stop (step 9) is the stopped run's own."""
    toy_cache(tmp_path / "cache", n=128)
    base = dict(global_batch=32, epochs=3, ckpt_every=3, log_every=2, shift_base=16)
    train(dataclasses.replace(tiny_cfg(tmp_path, **base), out=str(tmp_path / "a")))
    part = dataclasses.replace(tiny_cfg(tmp_path, **base), out=str(tmp_path / "b"), max_steps=9)
    assert train(part)["step"] == 9
    assert train(dataclasses.replace(part, max_steps=None))["step"] == 12
    a, b = _log_rows(tmp_path / "a"), _log_rows(tmp_path / "b")
    assert sorted(a) == [2, 4, 6, 8, 10, 12] and sorted(b) == [2, 4, 6, 8, 9, 10, 12]
    assert {s: b[s] for s in a} == a


def test_pending_losses_resume_on_another_number_of_ranks():
    from raebench.stage2.train import _pending_at_resume

    saved = [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]  # 2 ranks, 3 steps since the last row
    assert _pending_at_resume(saved, 13, 10, 1, 2) == [3.0, 4.0, 5.0]  # its own
    assert _pending_at_resume(saved, 13, 10, 0, 1) == [2.0, 3.0, 4.0]  # each step's mean over the saved ranks
    assert _pending_at_resume(saved, 13, 2, 0, 2) == [3.0]  # --log-every 2 now: the steps since row 12
    assert _pending_at_resume(saved, 14, 2, 0, 2) == [] and _pending_at_resume(None, 13, 10, 0, 1) == []


def test_one_training_job_per_run_folder(tmp_path):
    """A second job on a run folder in use is refused (it would overwrite the first's checkpoints);
    a half-written checkpoint of a killed job is removed when the folder is next used."""
    from raebench.locks import OutputLock

    toy_cache(tmp_path / "cache", n=64)
    cfg = dataclasses.replace(tiny_cfg(tmp_path, global_batch=32, epochs=1, ckpt_every=1), out=str(tmp_path / "run"))
    held = OutputLock(tmp_path / "run", "test job", "wait").acquire()
    try:
        with pytest.raises(RaebenchError, match=r"Another stage-2 training job is writing .*run'; wait for it to "
                                                r"finish, or choose another --out"):
            train(cfg)
    finally:
        held.release()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    orphan = tmp_path / "run" / "checkpoints" / ".last.pt.k1ll3d_x.tmp"
    orphan.write_bytes(b"half a checkpoint")
    (tmp_path / "run" / ".config.json.abcd1234.tmp").write_text("{")
    assert train(cfg)["step"] == 2 and not orphan.exists()
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_official_schedule_and_presets():
    cfg = PRESETS["ditdh-xl"]
    assert (cfg.lr, cfg.betas, cfg.global_batch, cfg.clip_grad, cfg.ema_decay) == (2e-4, (0.9, 0.95), 1024, 1.0, 0.9995)
    # fp32 as the official recipe (its README: "we recommend using fp32 for more stable training")
    assert all(p.precision == "fp32" for p in PRESETS.values())
    spe = 1251
    assert lr_factor(0, spe, cfg) == 1.0 and lr_factor(40 * spe - 1, spe, cfg) == 1.0
    assert lr_factor(800 * spe, spe, cfg) == pytest.approx(0.1) and lr_factor(1000 * spe, spe, cfg) == pytest.approx(0.1)
    assert lr_factor(420 * spe, spe, cfg) == pytest.approx(0.55)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


class _MeanPool(torch.nn.Module):
    name = "meanpool"

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):  # (N, 3, 32, 32) -> (N, 3, 4, 4)
        return torch.nn.functional.avg_pool2d(x, 8)


def test_cache_latents_with_flips(tmp_path, image_folder):
    out = cache_latents(_MeanPool(), str(image_folder), tmp_path / "lat", resolution=32, batch_size=3)
    cache = LatentCache(out)
    assert len(cache) == 8 and cache.latent_shape == (3, 4, 4) and cache.latents.shape[1] == 2
    torch.testing.assert_close(torch.from_numpy(np.asarray(cache.latents[:, 1], dtype=np.float32)),
                               torch.from_numpy(np.asarray(cache.latents[:, 0], dtype=np.float32)).flip(-1), atol=1e-3, rtol=0)
    assert sorted(cache.labels.tolist()) == [0] * 4 + [1] * 4
    # a re-run on a complete cache of the same images and settings encodes nothing and keeps its id
    meta = (out / "meta.json").read_text()
    calls = []
    enc = _MeanPool()
    real = enc.encode
    enc.encode = lambda x: calls.append(x.shape[0]) or real(x)
    cache_latents(enc, str(image_folder), tmp_path / "lat", resolution=32, batch_size=3)
    assert calls == [1] and (out / "meta.json").read_text() == meta  # only the shape probe
    calls.clear()
    with pytest.raises(DataError, match=r"holds a complete latent cache of other images or settings \(variants: 2 -> 1\)"):
        cache_latents(enc, str(image_folder), tmp_path / "lat", resolution=32, batch_size=3, flip=False)
    assert calls == [1] and (out / "meta.json").read_text() == meta  # never overwritten
    cache_latents(enc, str(image_folder), tmp_path / "lat1", resolution=32, batch_size=3, flip=False)
    assert sum(calls) > 1


def test_damaged_latent_caches_are_named_not_tracebacks(tmp_path, image_folder):
    import json
    import os

    out = cache_latents(_MeanPool(), str(image_folder), tmp_path / "lat", resolution=32, batch_size=3)
    size = (out / "latents.npy").stat().st_size
    os.truncate(out / "latents.npy", size // 2)
    with pytest.raises(DataError, match=r"latents\.npy' is missing or damaged"):
        LatentCache(out)
    # the same command encodes a complete-but-truncated cache of the same settings again
    cache_latents(_MeanPool(), str(image_folder), out, resolution=32, batch_size=3)
    assert (out / "latents.npy").stat().st_size == size and len(LatentCache(out)) == 8
    (out / "labels.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(DataError, match=r"labels\.npy' is damaged"):
        LatentCache(out)
    (out / "meta.json").write_text('{"n": 8, "compl')
    for call in (lambda: LatentCache(out),
                 lambda: cache_latents(_MeanPool(), str(image_folder), out, resolution=32, batch_size=3)):
        with pytest.raises(DataError, match=r"meta\.json' is not a readable JSON file .*the latent cache is damaged"):
            call()
    # an unfinished cache of other settings is not overwritten either
    part = tmp_path / "part"
    part.mkdir()
    (part / "meta.json").write_text(json.dumps({"n": 3, "variants": 2, "shape": [3, 4, 4], "complete": False}))
    with pytest.raises(DataError, match="holds an unfinished latent cache of other images"):
        cache_latents(_MeanPool(), str(image_folder), part, resolution=32, batch_size=3)


def test_one_job_per_output_and_orphan_temps_removed(tmp_path, image_folder):
    from raebench.locks import OutputLock

    lat = tmp_path / "lat"
    held = OutputLock(lat, "test job", "wait").acquire()  # as another process would hold it
    try:
        with pytest.raises(RaebenchError, match=r"Another latent-caching job is writing .*lat'; wait for it to finish"):
            cache_latents(_MeanPool(), str(image_folder), lat, resolution=32, batch_size=3)
    finally:
        held.release()
    assert not lat.exists()  # a refused job creates nothing
    lat.mkdir()
    (lat / ".progress-0-of-1.json.abcd1234.tmp").write_text("{")  # left by a job killed mid-write
    cache_latents(_MeanPool(), str(image_folder), lat, resolution=32, batch_size=3)
    assert not list(lat.glob("*.tmp")) and not list(lat.glob(".*.tmp"))


def test_gradient_accumulation_equals_big_batch():
    from raebench.stage2.train import accumulate_gradients

    torch.manual_seed(0)
    cfg = preset("tiny", num_classes=4, class_dropout=0.0)
    model = build_for_training(cfg, (4, 2, 2))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)

    def loss_fn(m, x, y):  # deterministic stand-in for Transport.loss: time and target from each example
        t = torch.sigmoid(x.flatten(1).mean(1))
        return (m(x, t, y) - torch.sin(3 * x)).pow(2).flatten(1).mean(1)

    x, y = torch.randn(12, 4, 2, 2), torch.arange(12) % 4
    grads = []
    for accum in (1, 3):
        model.zero_grad()
        loss = accumulate_gradients(model, loss_fn, x, y, accum)
        grads.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(Exception, match="equal micro-batches"):
        accumulate_gradients(model, loss_fn, x, y, 5)


def test_bf16_step_runs(tmp_path):
    toy_cache(tmp_path / "cache", n=64)
    res = train(tiny_cfg(tmp_path, global_batch=32, epochs=1, precision="bf16", shift_base=16))
    assert res["step"] == 2 and all(np.isfinite(res["losses"]))


def test_on_the_fly_tokenizer_with_workers(tmp_path, image_folder):
    """Images decoded in a worker process, encoded by the tokenizer in the main process."""
    cfg = preset("tiny", out=str(tmp_path / "run"), tokenizer="pixels", data=str(image_folder), resolution=4,
                 num_classes=2, global_batch=4, epochs=1, num_workers=1)
    res = train(cfg)
    assert res["step"] == 2 and all(np.isfinite(res["losses"]))
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["latent_shape"] == [3, 4, 4]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "for-loop"])
@pytest.mark.parametrize("max_norm", [0.05, 1e4], ids=["clipping", "not-clipping"])
def test_clip_folded_into_fused_adamw_equals_clip_grad_norm(max_norm, fused):
    """clip_and_step (clip factor as the fused kernel's grad divisor) = clip_grad_norm_ + step."""
    from raebench.stage2.train import clip_and_step, make_optimizer

    torch.manual_seed(0)
    cfg = preset("tiny", num_classes=4, class_dropout=0.0)  # no random label dropout: both see the same batch
    a = build_for_training(cfg, (4, 2, 2))
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.1)
    b = build_for_training(cfg, (4, 2, 2))
    b.load_state_dict(a.state_dict())
    oa, ob = make_optimizer(a, cfg), make_optimizer(b, cfg)
    if not fused:
        oa = torch.optim.AdamW(a.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8, foreach=False)
        ob = torch.optim.AdamW(b.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8, foreach=False)
    assert all(bool(g["fused"]) == fused for g in oa.param_groups)
    x, t, y = torch.randn(8, 4, 2, 2), torch.rand(8), torch.arange(8) % 4
    for _ in range(3):
        for m in (a, b):
            m.zero_grad(set_to_none=True)
            m(x, t, y).pow(2).sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
        ob.step()
        clip_and_step(a, oa, max_norm)
        assert (norm > max_norm) == (max_norm < 1)  # the case the id names
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7)  # the kernel writes clipped grads back
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert not hasattr(oa, "grad_scale")


def test_compile_option_traces_the_model(tmp_path, monkeypatch):
    """--compile wraps the model in torch.compile; traced with the eager backend to stay fast here."""
    seen = []
    real = torch.compile

    def recording(model, **kw):
        seen.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", recording)
    toy_cache(tmp_path / "cache", n=64)
    res = train(tiny_cfg(tmp_path, global_batch=32, epochs=1, shift_base=16, compile=True))
    assert res["step"] == 2 and all(np.isfinite(res["losses"])) and len(seen) == 1
    torch._dynamo.reset()


def test_cache_latents_resumes_after_a_crash(tmp_path, image_folder):
    ref = LatentCache(cache_latents(_MeanPool(), str(image_folder), tmp_path / "ref", resolution=32, batch_size=3))

    def crash(done, total):
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_latents(_MeanPool(), str(image_folder), tmp_path / "lat", resolution=32, batch_size=3, progress=crash)
    with pytest.raises(Exception, match="incomplete"):
        LatentCache(tmp_path / "lat")
    seen = []
    out = cache_latents(_MeanPool(), str(image_folder), tmp_path / "lat", resolution=32, batch_size=3,
                        progress=lambda done, total: seen.append(done))
    assert seen == [8]  # only the last batch (images 6 and 7) was encoded again
    assert np.array_equal(np.asarray(LatentCache(out).latents), np.asarray(ref.latents))
    assert not list(out.glob("progress-*.json"))


def test_non_finite_gradients_stop_with_a_clear_error_and_keep_the_checkpoint(tmp_path):
    toy_cache(tmp_path / "cache", n=64)
    cfg = tiny_cfg(tmp_path, global_batch=32, epochs=4, ckpt_every=2, shift_base=16)
    train(dataclasses.replace(cfg, max_steps=2))
    good = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    lat = np.load(tmp_path / "cache" / "latents.npy", mmap_mode="r+")
    lat[:] = np.nan  # every later batch is poisoned
    lat.flush()
    del lat
    with pytest.raises(Exception, match="Training stopped at step 3: the gradient norm is nan") as err:
        train(cfg)
    assert "fp32" not in str(err.value)  # the run is already fp32
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert after["step"] == 2
    for name, t in good["model"].items():
        assert torch.equal(t, after["model"][name])


def test_bad_rates_and_damaged_resume_states_are_named(tmp_path):
    """A learning rate of 0, below 0 or NaN is refused when the config is made (it used to divide by
    zero); a checkpoint whose model, EMA or optimizer state does not fit the run is a CheckpointError
    naming the file and the state, not a raw load_state_dict traceback."""
    import math

    from raebench.errors import CheckpointError

    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(RaebenchError, match=r"lr must be a finite number above 0"):
            tiny_cfg(tmp_path, lr=bad)
    with pytest.raises(RaebenchError, match=r"final_lr must be a finite number at least 0"):
        tiny_cfg(tmp_path, final_lr=-1e-5)
    with pytest.raises(RaebenchError, match=r"ema_decay must lie in \[0, 1\)"):
        tiny_cfg(tmp_path, ema_decay=1.0)
    for bad in (None, "2e-4"):  # not a number: the same sentence, not a TypeError from the comparison
        with pytest.raises(RaebenchError, match=r"lr must be a finite number above 0"):
            tiny_cfg(tmp_path, lr=bad)
    assert tiny_cfg(tmp_path, clip_grad=None).clip_grad is None  # no clipping, as clip_and_step documents

    toy_cache(tmp_path / "cache", n=64)
    cfg = tiny_cfg(tmp_path, global_batch=32, epochs=4, ckpt_every=2, max_steps=2)
    train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    good = torch.load(last, weights_only=True)
    for key, damage, match in [
        ("ema", lambda ck: ck["ema"].pop("pos_embed"), r"does not fit the run's ema: .*pos_embed.* Delete it"),
        ("model", lambda ck: ck["model"].__setitem__("pos_embed", torch.zeros(3)), r"the run's model: .*pos_embed"),
        ("opt", lambda ck: ck["opt"]["param_groups"].clear(), r"its opt state does not fit this run"),
        ("step", lambda ck: ck.pop("step"), r"has no step state, so the run cannot resume"),
    ]:
        ck = torch.load(last, weights_only=True)
        damage(ck)
        torch.save(ck, last)
        with pytest.raises(CheckpointError, match=match):
            train(dataclasses.replace(cfg, max_steps=4))
        torch.save(good, last)
    assert train(dataclasses.replace(cfg, max_steps=4))["step"] == 4  # the intact checkpoint still resumes


def test_cache_latents_skips_lists_and_leaves_out_unreadable_images(tmp_path, image_folder):
    """An unreadable image used to stop `cache-latents` at its batch (and on-the-fly training pointed
    back at caching); it is now skipped and listed as eval does: its row stays out of the cache
    (meta.json "skipped"), the other latents and labels line up, and training runs on them."""
    import json

    (image_folder / "cls_a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a header, no image
    first = sorted((image_folder / "cls_b").iterdir())[0]
    first.write_bytes(first.read_bytes()[:200])  # a cut-off file
    out = cache_latents(_MeanPool(), str(image_folder), tmp_path / "cache", resolution=32, batch_size=3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and sorted(s["path"].rsplit("/", 1)[-1] for s in meta["skipped"]) == ["broken.png", first.name]
    cache = LatentCache(out)
    assert len(cache) == 7 and sorted(cache.labels.tolist()) == [0] * 4 + [1] * 3
    ok = LatentCache(cache_latents(_MeanPool(), str(image_folder), tmp_path / "again", resolution=32, batch_size=8))
    x, y = cache.fetch(torch.arange(7), torch.zeros(7))
    x2, y2 = ok.fetch(torch.arange(7), torch.zeros(7))  # another batch size: the same rows left out
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.abs().sum(dim=(1, 2, 3)).min() > 0  # no empty row served
    cfg = preset("tiny", out=str(tmp_path / "run"), latents=str(out), num_classes=2, global_batch=7, max_steps=2,
                 shift_base=16)
    assert train(cfg)["step"] == 2


class _NaNOrHuge(_MeanPool):
    """NaN latents for images darker than ``dark``; latents past float16's range for those brighter than ``bright``."""

    def encode(self, x):
        z = super().encode(x).clone()
        level = x.flatten(1).mean(1)  # (N,) the same for an image and its flip
        z[level < self.dark] = float("nan")
        z[level > self.bright] *= 1e6
        return z


def test_cache_latents_leaves_out_nan_and_float16_overflow_latents(tmp_path, image_folder):
    """NaN latents, and latents past float16's range (stored as Inf), were written into the cache
    silently; training on it stopped with a NaN gradient at whichever step first drew such a row.
    Now those images are left out and listed with their reason in meta.json, as unreadable files are;
    with --dtype float32 the large latents are kept."""
    import json

    from raebench.folders import scan_folder
    from raebench.images import to_float
    from raebench.loaders import ImageDataset

    images = scan_folder(image_folder)
    ds = ImageDataset(images, 32)
    level = sorted((float(to_float(ds[i]["image"]).mean()), images.paths[i]) for i in range(len(ds)))
    enc = _NaNOrHuge()
    enc.dark, enc.bright = (level[0][0] + level[1][0]) / 2, (level[-3][0] + level[-2][0]) / 2
    out = cache_latents(enc, str(image_folder), tmp_path / "c16", resolution=32, batch_size=3)
    meta = json.loads((out / "meta.json").read_text())
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert sorted(reasons) == sorted([level[0][1], level[-2][1], level[-1][1]])
    assert reasons[level[0][1]] == "the tokenizer gave NaN/Inf latents"
    assert "exceed the float16 range" in reasons[level[-1][1]] and "--dtype float32" in reasons[level[-1][1]]
    cache = LatentCache(out)
    x, _ = cache.fetch(torch.arange(len(cache)), torch.zeros(len(cache)))
    assert len(cache) == 5 and bool(torch.isfinite(x).all())
    kept = LatentCache(cache_latents(enc, str(image_folder), tmp_path / "c32", resolution=32, batch_size=3,
                                     dtype="float32"))
    assert [s["path"] for s in kept.meta["skipped"]] == [level[0][1]] and len(kept) == 7


def test_cache_latents_finds_exactly_the_rows_not_finite_as_stored():
    """The rows left out are those whose stored values hold NaN/Inf: 65519 rounds to float16's 65504 (kept),
    -70000 becomes -Inf (left out); float32 keeps both; an Inf or NaN anywhere in a row is found."""
    import numpy as np

    from raebench.stage2.latents import _nonfinite_rows

    z = np.random.default_rng(0).random((6, 2, 4, 3, 3), dtype=np.float32)
    z[1, 0, 0, 0, 0], z[2, 1, 3, 2, 2], z[3, 0, 1, 1, 1] = np.nan, 65519.0, -70000.0
    z[4, 1, 3, 2, 2], z[5, 0, 0, 0, 0] = np.inf, -65504.0
    paths = [f"{i}.png" for i in range(6)]
    for dtype, left_out in (("float16", [1, 3, 4]), ("float32", [1, 4])):
        with np.errstate(over="ignore", invalid="ignore"):
            rows = z.astype(dtype)
        got = _nonfinite_rows(z, rows, [10 + i for i in range(6)], paths, dtype)
        assert [s["index"] for s in got] == [10 + i for i in left_out], (dtype, got)
        assert [s["path"] for s in got] == [paths[i] for i in left_out]


def test_keep_every_keeps_step_checkpoints_beside_last(tmp_path):
    """--keep-every N keeps checkpoints/step-NNNNNNN.pt (the official trainer keeps one per 10 epochs;
    last.pt alone allowed no FID-vs-step curve); each holds its own step, and sample loads it."""
    from raebench.stage2.sample import load_trained

    toy_cache(tmp_path / "cache", n=64)
    cfg = tiny_cfg(tmp_path, global_batch=16, epochs=4, ckpt_every=100, keep_every=2, max_steps=5)
    train(cfg)
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["last.pt", "step-0000002.pt", "step-0000004.pt"]
    steps = {p.name: torch.load(p, weights_only=True)["step"] for p in ck.glob("*.pt")}
    assert steps == {"last.pt": 5, "step-0000002.pt": 2, "step-0000004.pt": 4}
    model, info = load_trained(ck / "step-0000002.pt")
    assert info["latent_shape"] == [4, 2, 2] or tuple(info["latent_shape"]) == (4, 2, 2)
    assert train(dataclasses.replace(cfg, max_steps=6, keep_every=3))["step"] == 6  # a run-only setting
    assert (ck / "step-0000006.pt").is_file() and torch.load(ck / "step-0000004.pt", weights_only=True)["step"] == 4
    with pytest.raises(RaebenchError, match="keep_every must be at least 0"):
        tiny_cfg(tmp_path, keep_every=-1)


def test_a_kill_between_last_and_its_kept_copy_is_made_good_on_resume(tmp_path, monkeypatch):
    """A job killed after saving last.pt at a --keep-every step but before keeping it resumed past that
    step, and step-NNNNNNN.pt was missing for good (a hole in the FID-vs-step curve)."""
    import raebench.stage2.train as tr

    toy_cache(tmp_path / "cache", n=64)
    cfg = tiny_cfg(tmp_path, global_batch=16, epochs=4, ckpt_every=100, keep_every=2, max_steps=4)

    def killed(last, kept):
        raise KeyboardInterrupt  # the process dies right after last.pt of step 2 was renamed into place

    monkeypatch.setattr(tr, "_keep_copy", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["last.pt"]
    assert train(cfg)["step"] == 4
    steps = {p.name: torch.load(p, weights_only=True)["step"] for p in ck.glob("*.pt")}
    assert steps == {"last.pt": 4, "step-0000002.pt": 2, "step-0000004.pt": 4}


def test_keep_every_copies_where_hard_links_fail(tmp_path, monkeypatch):
    """On file systems without hard links the kept step file is a streamed copy, renamed into place."""
    import os

    def no_links(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    toy_cache(tmp_path / "cache", n=64)
    train(tiny_cfg(tmp_path, global_batch=16, epochs=4, ckpt_every=100, keep_every=2, max_steps=3))
    ck = tmp_path / "run" / "checkpoints"
    assert torch.load(ck / "step-0000002.pt", weights_only=True)["step"] == 2
    assert not list(ck.glob(".*.tmp")) and os.stat(ck / "step-0000002.pt").st_nlink == 1


def test_cache_latents_saves_its_position_every_few_seconds_not_every_batch(tmp_path, image_folder, monkeypatch):
    """Flushing the map and fsyncing the position after every batch cost ~25 ms per 32 images on a
    local disk, of the order of a GPU encode of them: the position is saved every SAVE_SECONDS (and on errors and stop
    signals, tested above); with SAVE_SECONDS = 0 it is saved after every batch."""
    import raebench.stage2.latents as lt

    writes = []
    real = lt._write_json
    monkeypatch.setattr(lt, "_write_json", lambda p, obj: (writes.append(p.name), real(p, obj))[1])
    ref = cache_latents(_MeanPool(), str(image_folder), tmp_path / "a", resolution=32, batch_size=1)
    assert sum(w.startswith("progress-") for w in writes) == 1  # the final position only (8 batches, < 30 s)
    writes.clear()
    monkeypatch.setattr(lt, "SAVE_SECONDS", 0.0)
    out = cache_latents(_MeanPool(), str(image_folder), tmp_path / "b", resolution=32, batch_size=1)
    assert sum(w.startswith("progress-") for w in writes) == 9  # after each of the 8 batches, and the final one
    assert np.array_equal(np.asarray(LatentCache(out).latents), np.asarray(LatentCache(ref).latents))


def test_a_cache_killed_between_marking_complete_and_removing_its_positions_is_tidied(tmp_path, image_folder,
                                                                                     monkeypatch):
    """SIGKILLed after meta.json says complete but before the progress files go (found by
    bench/fuzz_kill_resume.py), a re-run found the cache complete and returned, leaving them forever."""
    from pathlib import Path

    real_unlink = Path.unlink

    def dies(self, *a, **k):  # the process dies at the first progress file it removes
        if self.name.startswith("progress-"):
            raise KeyboardInterrupt
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", dies)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(_MeanPool(), str(image_folder), tmp_path / "c", resolution=32, batch_size=4)
    assert (tmp_path / "c" / "progress-0-of-1.json").is_file() and LatentCache(tmp_path / "c").meta["complete"]
    monkeypatch.undo()
    cache_latents(_MeanPool(), str(image_folder), tmp_path / "c", resolution=32, batch_size=4)
    assert not list((tmp_path / "c").glob("progress-*"))


def test_cache_latents_error_save_lists_only_the_skips_of_cached_batches(tmp_path, image_folder):
    """An error in a batch that holds an unreadable image: the position saved is the start of that
    batch, so its skip must not be saved with it (the resume reads that image again and listed it
    twice in meta.json)."""
    import json

    from raebench.data import resolve_data

    (image_folder / "cls_a" / "img_3_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    paths = resolve_data(data=str(image_folder)).images.paths
    broken = [i for i, p in enumerate(paths) if p.endswith("img_3_broken.png")]
    assert broken == [2]  # batch 1 of size 2: the broken image and one readable image

    class _FailsInBatch1(_MeanPool):
        calls = 0

        def encode(self, x):  # call 0 probes the latent shape; batch j encodes in calls 1 + 2j and 2 + 2j
            type(self).calls += 1
            if type(self).calls == 4:
                raise RuntimeError("encoder failed")
            return super().encode(x)

    with pytest.raises(RuntimeError, match="encoder failed"):
        cache_latents(_FailsInBatch1(), str(image_folder), tmp_path / "c", resolution=32, batch_size=2)
    saved = json.loads((tmp_path / "c" / "progress-0-of-1.json").read_text())
    assert saved == {"next": 2, "skipped": []}
    out = cache_latents(_MeanPool(), str(image_folder), tmp_path / "c", resolution=32, batch_size=2)
    meta = json.loads((out / "meta.json").read_text())
    assert [s["index"] for s in meta["skipped"]] == [2]


@pytest.mark.parametrize("freeze", [False, True])
def test_positions_and_time_frequencies_train_as_in_the_official_trainer(tmp_path, freeze):
    """The official src/train.py calls model.requires_grad_(True), which unfreezes the sin-cos positions
    and the time embedding's Fourier frequencies W (its ``with torch.no_grad(): W = self.W`` does not
    detach), so AdamW and the EMA update them; --freeze-embeddings keeps both fixed."""
    toy_cache(tmp_path / "cache", n=64)
    # adaLN-Zero: no gradient reaches them before the third step
    cfg = tiny_cfg(tmp_path, global_batch=32, max_steps=3, shift_base=16, freeze_embeddings=freeze)
    torch.manual_seed(cfg.seed)
    init = build_for_training(cfg, (4, 2, 2)).state_dict()
    train(cfg)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    for which in ("model", "ema"):
        for name in ("pos_embed", "t_embedder.W"):
            assert torch.equal(ck[which][name], init[name]) is freeze, (which, name)
    n_params = len(list(build_for_training(cfg, (4, 2, 2)).parameters()))
    assert len(ck["opt"]["state"]) == n_params - 2 * freeze  # every parameter is optimised unless frozen


def test_a_run_from_before_freeze_embeddings_resumes_with_frozen_embeddings_only():
    """Runs written before the setting kept the positions and time frequencies fixed: resuming one with
    the new default would change its trajectory, so it is refused; --freeze-embeddings resumes it."""
    from raebench.stage2.train import _jsonable, compare_configs

    old = _jsonable(preset("tiny"))
    del old["freeze_embeddings"]
    assert compare_configs(old, preset("tiny")) == ["freeze_embeddings: True -> False"]
    assert compare_configs(old, preset("tiny", freeze_embeddings=True)) == []


@pytest.mark.parametrize("trainer", ["stage1", "stage2"])
def test_ema_update_is_decay_times_ema_plus_one_minus_decay_times_model(trainer):
    """The EMA both trainers keep: ema <- decay * ema + (1 - decay) * model (the official update), checked
    against that formula in float64 over three steps. A resume test cannot see an inverted decay: both
    runs would use it."""
    import importlib

    update_ema = importlib.import_module(f"raebench.{trainer}.train").update_ema
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ref = [p.detach().double().clone() for p in ema.parameters()]
    decay = 0.9
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        update_ema(ema, model, decay)
        ref = [decay * r + (1 - decay) * p.detach().double() for r, p in zip(ref, model.parameters())]
    for p, r in zip(ema.parameters(), ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=1e-7)
