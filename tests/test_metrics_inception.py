"""Inception metrics equal torch-fidelity's on the same uint8 images with the same (random) weights.

torch-fidelity cannot download its weights here, so a random state dict (kaiming-normal
convolutions) is saved to a temporary file and given to both sides.
"""

import numpy as np
import pytest
import torch
from _metrics_helpers import TensorDataset, blurred, photo_crops, random_inception_weights

from raebench.errors import MissingWeightsError
from raebench.evaluator import Evaluator
from raebench.metrics import EXTRACTORS


N = 12  # images per side; KID subsets of all 12, IS needs >= 10 (one per split)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture(scope="module")
def images():
    ref = photo_crops(N, 64, seed=0)
    return ref, blurred(ref, 3.0)  # candidates: "reconstructions" that lost detail


@pytest.fixture(scope="module")
def ours(weights, images):
    ref, cand = images
    ev = Evaluator(("fid", "kid", "is", "precision"), torch.device("cpu"), options={"inception": {"weights": str(weights)}})
    for i in range(0, N, 5):
        ev.update(ref[i:i + 5], cand[i:i + 5])
    return ev.compute()


@pytest.fixture(scope="module")
def theirs(weights, images):
    import torch_fidelity

    ref, cand = images
    # input1 = generated (candidates), input2 = real (references), torch-fidelity's convention
    return torch_fidelity.calculate_metrics(
        input1=TensorDataset(cand), input2=TensorDataset(ref), cuda=False, isc=True, fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights), kid_subset_size=N,
        batch_size=4, save_cpu_ram=True, cache=False, verbose=False,
    )


@pytest.mark.parametrize("ours_key,their_key", [
    ("fid", "frechet_inception_distance"), ("kid", "kernel_inception_distance_mean"),
    ("is", "inception_score_mean"), ("is-std", "inception_score_std"), ("precision", "precision"), ("recall", "recall"),
])
def test_equal_torch_fidelity(ours, theirs, ours_key, their_key):
    values, _, _ = ours
    assert values[ours_key] == pytest.approx(theirs[their_key], rel=1e-5)


def test_values_are_not_degenerate(ours):
    values, _, notes = ours
    assert values["fid"] > 1.0 and values["kid"] > 1e-3 and values["is"] > 1.0
    assert "N < d" in notes["fid"] and "subset size 12" in notes["kid"]
    # with N images and subsets of N, every subset is the whole set: no spread
    assert values["kid-std"] == pytest.approx(0.0, abs=1e-12)


def test_features_batch_independent_and_spatial_is_mixed6(weights, images):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf_resize

    x = images[0][:2]
    ex = EXTRACTORS.get("inception").builder(device="cpu", outputs=("pool", "logits", "spatial"), weights=str(weights))
    whole = ex(x)
    ones = [ex(x[i:i + 1]) for i in range(2)]
    for k in ("pool", "logits", "spatial"):  # batch 2 vs 1 + 1: float noise only
        assert torch.allclose(torch.cat([o[k] for o in ones]), whole[k], rtol=1e-5, atol=1e-6), k
    # ADM's mixed_6/conv:0 = Mixed_6d's 1x1 branch (conv, BN, ReLU); sFID keeps channels 0-6, flattened HWC.
    # Recomputed here by walking torch-fidelity's modules (resize and scaling as in its forward)
    ref = FeatureExtractorInceptionV3("ref", ["2048"], feature_extractor_weights_path=str(weights))
    h = (tf_resize(x.float(), size=(299, 299), align_corners=False) - 128) / 128
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            h = getattr(ref, name)(h)
        conv = ref.Mixed_6d.branch1x1(h)  # (2, 192, 17, 17)
    expected = torch.stack([conv[:, c] for c in range(7)], dim=-1).reshape(2, 17 * 17 * 7)  # NHWC[..., :7]
    assert (whole["spatial"] - expected).abs().max() < 1e-4 * expected.abs().max()  # layouts differ: rounding only


def test_float64_option_changes_only_rounding_and_the_version(weights, images):
    x = images[0][:1]
    ex32 = EXTRACTORS.get("inception").builder(device="cpu", outputs=("pool",), weights=str(weights))
    ex64 = EXTRACTORS.get("inception").builder(device="cpu", outputs=("pool",), weights=str(weights), dtype="float64")
    f32, f64 = ex32(x)["pool"], ex64(x)["pool"]
    assert torch.allclose(f64, f32, rtol=1e-3, atol=1e-5)
    # really float64 inside (torch-fidelity's own option maps "float64" to float32 and left the features
    # bit-identical): every parameter is float64 and the features differ from float32's by rounding
    assert all(p.dtype == torch.float64 for p in ex64.net.parameters()) and not torch.equal(f64, f32)
    assert ex64.variant == "dtype=float64" and ex64.identity != ex32.identity
    ev = Evaluator(("fid",), torch.device("cpu"), options={"inception": {"weights": str(weights), "dtype": "float64"}})
    ev.extractor("inception")
    assert ev.version_of(ev.specs[0]).endswith("+dtype=float64")


def test_missing_weights_offline_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAEBENCH_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError) as e:
        EXTRACTORS.get("inception").builder(device="cpu", outputs=("pool",))
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and str(tmp_path / "torch") in msg
    assert "RAEBENCH_INCEPTION_WEIGHTS" in msg and msg.count(". ") == 0 and "\n" not in msg


def test_weights_with_pickled_code_are_refused(tmp_path):
    import os
    import pickle

    from raebench.errors import CheckpointError

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"Mixed_7c.branch_pool.conv.weight": torch.zeros(1), "x": Payload()}))
    with pytest.raises(CheckpointError, match="Refused"):
        EXTRACTORS.get("inception").builder(device="cpu", outputs=("pool",), weights=str(evil))
    assert not (tmp_path / "pwned").exists()


def test_weights_that_do_not_fit_or_are_garbage_are_one_sentence(tmp_path):
    """Missing, unused and mis-shaped keys, and bytes that are no checkpoint at all (torch.load raises
    KeyError/IndexError on some), are CheckpointErrors naming the file."""
    from raebench.errors import CheckpointError

    sd = torch.load(random_inception_weights(tmp_path / "ok.pth"), weights_only=True)
    cases = {
        "missing.pth": ({k: v for k, v in sd.items() if k != "Conv2d_1a_3x3.conv.weight"}, "Missing key"),
        "extra.pth": ({**sd, "foo": torch.zeros(1)}, "Unexpected key"),
        "shape.pth": ({**sd, "Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, "size mismatch for Conv2d_1a_3x3.conv.weight"),
    }
    for name, (state, needle) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}' does not fit torch-fidelity's Inception-v3: {needle}"):
            EXTRACTORS.get("inception").builder(device="cpu", outputs=("pool",), weights=str(tmp_path / name))
    rng = np.random.default_rng(0)
    for i, blob in enumerate([b"hello world" * 10, *(rng.bytes(n) for n in (3, 64, 4096))]):
        (tmp_path / f"junk{i}.pth").write_bytes(blob)
        with pytest.raises(CheckpointError, match=f"junk{i}.pth"):
            EXTRACTORS.get("inception").builder(device="cpu", outputs=("pool",), weights=str(tmp_path / f"junk{i}.pth"))
