"""KID, IS, precision/recall, density/coverage and CMMD on features: equal to torch-fidelity or to
brute-force definitions; the one-pass evaluator is batch-size independent and merges shards."""

import numpy as np
import pytest
import torch
from _metrics_helpers import stand_in_extractors  # noqa: F401  (a fixture)

from raebench.evaluator import Evaluator
from raebench.metrics import METRICS, MetricBatch
from raebench.metrics import neighbours as nb
from raebench.metrics.inception_score import inception_score
from raebench.metrics.kernel import kid, rbf_mmd2_biased


def _feats(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + shift).abs()


def test_kid_equals_torch_fidelity_subsets():
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = _feats(60, 48, 0), _feats(50, 48, 1, 0.1)
    theirs = kid_features_to_metric(x, y, kid_subsets=100, kid_subset_size=20, kid_kernel="poly", kid_kernel_poly_degree=3,
                                    kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    mean, std = kid(x, y, 100, 20, 2020)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-8)


def _kid_metric(cand, ref):
    m = METRICS.get("kid").build()
    m.update(MetricBatch(None, None, {"inception": ({"pool": ref.float()}, {"pool": cand.float()})}))
    return m.compute()


@pytest.mark.parametrize("n_cand, n_ref, subset", [(1100, 1050, 1000), (300, 320, 300)])
def test_kid_metric_uses_torch_fidelitys_protocol(n_cand, n_ref, subset):
    """The metric class (its constants, side order and subset-size rule) against torch-fidelity's
    KID on the same float32-stored features: 100 subsets of min(1000, n), seed 2020, candidates first."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    cand, ref = _feats(n_cand, 16, 11), _feats(n_ref, 16, 12, 0.05)
    theirs = kid_features_to_metric(cand.float().double(), ref.float().double(), kid_subsets=100,
                                    kid_subset_size=subset, kid_kernel="poly", kid_kernel_poly_degree=3,
                                    kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    out = _kid_metric(cand, ref)
    assert out["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert out["kid-std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-8)


def test_inception_score_equals_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = _feats(37, 20, 2) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert inception_score(logits) == pytest.approx(
        (theirs["inception_score_mean"], theirs["inception_score_std"]), rel=1e-12)


def test_precision_recall_equal_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    cand, ref = _feats(70, 16, 3), _feats(90, 16, 4, 0.3)
    theirs = prc_features_to_metric(cand, ref, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    m = METRICS.get("precision").build()
    m.update(MetricBatch(None, None, {"inception": ({"pool": ref.float()}, {"pool": cand.float()})}))
    out = m.compute()
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1
    assert out["precision"] == pytest.approx(theirs["precision"], rel=1e-6)
    assert out["recall"] == pytest.approx(theirs["recall"], rel=1e-6)


def _brute_prdc(ref: np.ndarray, cand: np.ndarray, k: int):
    """Naeem et al.'s density/coverage written out with full distance matrices."""
    d_rr = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))
    d_rc = np.sqrt(((ref[:, None] - cand[None]) ** 2).sum(-1))  # (N ref, M cand)
    radii = np.sort(d_rr, axis=1)[:, k]  # k-th neighbour, self excluded (column 0 is the self-distance 0)
    density = (d_rc < radii[:, None]).sum(0).mean() / k
    coverage = (d_rc.min(1) < radii).mean()
    return density, coverage


def test_density_coverage_equal_brute_force_and_chunking_changes_nothing(monkeypatch):
    ref, cand = _feats(80, 12, 5), _feats(60, 12, 6, 0.2)
    m = METRICS.get("density").build()
    m.update(MetricBatch(None, None, {"inception": ({"pool": ref.float()}, {"pool": cand.float()})}))
    full = m.compute()
    d, c = _brute_prdc(ref.float().double().numpy(), cand.float().double().numpy(), 5)
    assert full["density"] == pytest.approx(d, rel=1e-12) and full["coverage"] == pytest.approx(c, rel=1e-12)
    monkeypatch.setattr(nb, "CHUNK", 7)  # blocks of 7 x 7: the same answer
    assert m.compute() == pytest.approx(full, rel=1e-12)


def test_neighbourhood_metrics_on_ties_follow_their_references():
    """Lattice features put candidates exactly on reference radii (and duplicate points): precision
    and recall count the ball's boundary as inside (torch-fidelity's <=), density and coverage do not
    (Naeem et al.'s strict <), so a flipped comparison changes the fractions."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(13)
    ref = torch.randint(0, 3, (120, 4), generator=g).double()
    cand = torch.randint(0, 3, (100, 4), generator=g).double()
    theirs = prc_features_to_metric(cand, ref, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    pr = METRICS.get("precision").build()
    pr.update(MetricBatch(None, None, {"inception": ({"pool": ref.float()}, {"pool": cand.float()})}))
    out = pr.compute()
    assert out["precision"] == pytest.approx(theirs["precision"], rel=1e-12)
    assert out["recall"] == pytest.approx(theirs["recall"], rel=1e-12)
    dc = METRICS.get("density").build()
    dc.update(MetricBatch(None, None, {"inception": ({"pool": ref.float()}, {"pool": cand.float()})}))
    got = dc.compute()
    d, c = _brute_prdc(ref.numpy(), cand.numpy(), 5)
    assert got["density"] == pytest.approx(d, rel=1e-12) and got["coverage"] == pytest.approx(c, rel=1e-12)
    assert c < 1.0  # the boundary matters here: counting it as inside would give 1.0


def test_cmmd_equals_brute_force():
    x, y = _feats(40, 8, 7), _feats(30, 8, 8, 0.5)
    x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)

    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * 10.0**2))

    xn, yn = x.numpy(), y.numpy()
    brute = 1000 * (k(xn, xn).mean() + k(yn, yn).mean() - 2 * k(xn, yn).mean())
    assert 1000 * rbf_mmd2_biased(x, y, chunk=9) == pytest.approx(brute, rel=1e-9)
    m = METRICS.get("cmmd").build()
    m.update(MetricBatch(None, None, {"clip-l14-336": ({"embed": y.float()}, {"embed": x.float()})}))
    assert m.compute()["cmmd"] == pytest.approx(brute, rel=1e-5)  # float32 storage of the embeddings


# --- the one-pass evaluator, with cheap stand-in extractors --------------------------------------

DIST = ("fid", "sfid", "kid", "is", "precision", "density", "cmmd", "fd-dinov2", "psnr", "ssim")


def _run(ref, cand, batch_size, metrics=DIST):
    ev = Evaluator(metrics, torch.device("cpu"), options={})
    for i in range(0, ref.shape[0], batch_size):
        ev.update(ref[i:i + batch_size], cand[i:i + batch_size], index=torch.arange(i, min(i + batch_size, ref.shape[0])))
    return ev


def test_evaluator_batch_size_independent(stand_in_extractors, make_images):
    ref, cand = make_images(32, 24, 24, seed=1), make_images(32, 24, 24, seed=2)
    a, _, _ = _run(ref, cand, 1).compute()
    b, _, notes = _run(ref, cand, 16).compute()
    assert set(a) == {"fid", "sfid", "kid", "kid-std", "is", "is-std", "precision", "recall", "density", "coverage",
                      "cmmd", "fd-dinov2", "psnr", "ssim"}
    for k in a:  # float32 features may differ in the last bit with the batch size (BLAS blocking)
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    assert "N < d" not in notes["fid"] and "subset size 32" in notes["kid"]


def test_evaluator_shards_merge_to_the_single_pass(stand_in_extractors, make_images):
    ref, cand = make_images(30, 24, 24, seed=3), make_images(30, 24, 24, seed=4)
    whole = _run(ref, cand, 10).compute()[0]
    parts = [_run(ref[s], cand[s], 5) for s in (slice(0, 12), slice(12, 30))]
    merged = Evaluator(DIST, torch.device("cpu"), options={})
    for p in parts:
        for m, pm in zip(merged.metrics, p.metrics):
            m.merge(pm.state())
    got = merged.compute()[0]
    for k in whole:
        assert got[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-9), k


def test_metrics_reading_the_same_features_keep_one_copy_saved_once_and_resumed_shared(
        stand_in_extractors, make_images, tmp_path):
    from raebench.eval_progress import WorkState

    knn = ("precision", "density", "kid")
    ref, cand = make_images(40, 24, 24, seed=5), make_images(40, 24, 24, seed=6)

    def saved(ev, key):  # a resume save of ev's states: (its segment's size, its WorkState)
        work = WorkState(tmp_path, key, 0)
        work.acquire()
        work.save({"metrics": ev.states()})
        (seg,) = work.dir.glob("rank0.seg-*.pt")
        return seg.stat().st_size, work

    def storages(e):  # per metric: the storage of every kept feature tensor, both sides in order
        return [[t.untyped_storage().data_ptr() for t in m.ref + m.cand] for m in e.metrics]

    ev = _run(ref, cand, 8, knn)
    held = storages(ev)
    assert held[0] == held[1] == held[2] and len(set(held[0])) == 10  # 5 batches x 2 sides, one copy
    size, work = saved(ev, "all")
    size_alone, alone_work = saved(_run(ref, cand, 8, ("precision",)), "alone")
    alone_work.release(remove=True)
    assert size < 1.3 * size_alone  # the features once, not three times
    resumed = Evaluator(knn, torch.device("cpu"), options={})
    resumed.merge(WorkState(tmp_path, "all", 0).load()["metrics"])
    again = storages(resumed)
    assert again[0] == again[1] == again[2]
    work.release(remove=True)
    # the same numbers, bit for bit, as each metric keeping features alone
    alone = {k: v for m in knn for k, v in _run(ref, cand, 8, (m,)).compute()[0].items()}
    for e in (ev, resumed):
        got = e.compute()[0]
        assert {k: got[k] for k in alone} == alone


def test_evaluator_excludes_rows_and_one_sided_batches(stand_in_extractors, make_images):
    ref, cand = make_images(20, 24, 24, seed=5), make_images(20, 24, 24, seed=6)
    keep = torch.arange(20) % 3 != 0
    ev = Evaluator(("fid", "psnr"), torch.device("cpu"), options={})
    ev.update(ref, cand[keep], index=torch.arange(20), keep=keep)
    same = Evaluator(("fid", "psnr"), torch.device("cpu"), options={})
    same.update(ref[keep], cand[keep])
    assert ev.compute()[0] == pytest.approx(same.compute()[0], rel=1e-12)
    # unpaired: references and candidates streamed separately give the paired answer for fid
    one = Evaluator(("fid", "kid"), torch.device("cpu"), options={})
    one.update_reference(ref[keep])
    one.update_candidates(cand[keep])
    assert one.compute()[0]["fid"] == pytest.approx(same.compute()[0]["fid"], rel=1e-12)
    with pytest.raises(Exception, match="paired"):
        Evaluator(("psnr",), torch.device("cpu"), options={}).update_candidates(cand)


def test_knn_metrics_compute_on_the_evaluation_device(monkeypatch):
    """Precision/recall and density/coverage take the evaluator's device (a GPU in real runs: at 50k
    images they take ~20 minutes on one CPU thread); features stay CPU state, and every neighbours
    helper computes on the device of its inputs."""
    ev = Evaluator(("precision", "density", "cmmd", "kid"), torch.device("meta"))  # meta: no GPU here, the plumbing
    assert {type(m).__name__: getattr(m, "device", None) for m in ev.metrics} == {
        "PrecisionRecall": torch.device("meta"), "DensityCoverage": torch.device("meta"), "CMMD": torch.device("meta"),
        "KID": torch.device("cpu")}
    seen = []
    real = nb.sq_dists
    monkeypatch.setattr(nb, "sq_dists", lambda a, b: seen.append((a.device, b.device)) or real(a, b))
    ref, cand = _feats(40, 8, 1), _feats(30, 8, 2, 0.2)
    for name in ("precision", "density", "cmmd"):
        m = METRICS.get(name).build(device="cpu")
        feats = ({"pool": ref.float()}, {"pool": cand.float()}) if name != "cmmd" else ({"embed": ref}, {"embed": cand})
        m.update(MetricBatch(None, None, {m.extractor: feats}))
        assert "device" not in m.state()  # not accumulated, not merged, not saved for a resume
        moved = []
        monkeypatch.setattr(m, "_both", lambda f=m._both: moved.append([t.device for t in f()]) or f())
        m.compute()
        assert moved == [[torch.device("cpu")] * 2]
    assert seen and all(d == (torch.device("cpu"), torch.device("cpu")) for d in seen)


def test_a_device_option_is_taken_only_where_a_metric_lists_it():
    """`--option precision.device=cpu` keeps the k-NN metrics on the CPU; a device option for a
    metric or extractor without one was let through and failed as a raw TypeError when built."""
    from raebench.errors import RaebenchError

    ev = Evaluator(("precision", "kid"), torch.device("meta"), options={"precision": {"device": "cpu"}})
    assert ev.metrics[0].device == torch.device("cpu")
    for target, says in (("kid", "kid takes no option device; it takes none"),
                         ("inception", "inception takes no option device")):
        with pytest.raises(RaebenchError, match=says):
            Evaluator(("precision", "kid"), torch.device("cpu"), options={target: {"device": "cpu"}})


def test_option_values_outside_their_set_are_one_sentence_before_anything_loads():
    """`--option inception.dtype=float16`, `dinov2-l14.resize=bogus` and `precision.device=gpu7` used to
    fail as raw tracebacks once the network or metric was built; now each is a RaebenchError when the
    Evaluator is made (nothing built, no weights needed), and the valid values still pass."""
    from raebench.errors import RaebenchError

    for metrics, options, says in [
        (("fid",), {"inception": {"dtype": "float16"}}, r"inception.dtype=float16: dtype takes float32 or float64"),
        (("fd-dinov2",), {"dinov2-l14": {"resize": "bogus"}}, r"dinov2-l14.resize=bogus: resize takes torch or pil"),
        (("precision",), {"precision": {"device": "gpu7"}}, r"precision.device=gpu7: not a device"),
        (("lpips-vgg",), {"lpips-vgg": {"weights": " "}}, r"lpips-vgg.weights is empty"),
    ]:
        with pytest.raises(RaebenchError, match=says):
            Evaluator(metrics, torch.device("cpu"), options=options)
    Evaluator(("fid", "fd-dinov2"), torch.device("cpu"), options={"inception": {"dtype": "float64"},
                                                                  "dinov2-l14": {"resize": "pil"}})


def test_precision_recall_balls_end_exactly_at_their_radius():
    """A candidate 1e-5 beyond the k-th-neighbour radius of the only reference ball near it is outside
    (torch-fidelity's <= on the exact radius): any slack on the radius would count it. 1-D features:
    the references' radii are 3, 2, 2, 3, 9 (k = 3), so the ball of 0 ends at -3 and -3.00003 is
    outside every ball."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    cand = torch.tensor([[-3.00003], [0.5], [-1.0], [5.0], [30.0]])
    theirs = prc_features_to_metric(cand, ref, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    pr = METRICS.get("precision").build()
    pr.update(MetricBatch(None, None, {"inception": ({"pool": ref}, {"pool": cand})}))
    out = pr.compute()
    # inside: 0.5, -1 (the ball of 0, and more) and 5 (of 3 and 10); outside: -3.00003 and 30
    assert out["precision"] == 0.6 and theirs["precision"] == pytest.approx(0.6, rel=1e-6)
    assert out["recall"] == pytest.approx(theirs["recall"], rel=1e-12)
    swapped = METRICS.get("precision").build()  # the same geometry seen from recall's side
    swapped.update(MetricBatch(None, None, {"inception": ({"pool": cand}, {"pool": ref})}))
    assert swapped.compute()["recall"] == 0.6
