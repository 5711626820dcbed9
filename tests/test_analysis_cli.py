"""``raebench analyze`` end to end on tiny images: rows in the results tables, readable PNGs, a
reference encoder with random weights through the same code path as DINOv2, one-sentence errors."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from raebench.analysis.references import REFERENCES, ReferenceSpec, register_reference
from raebench.results import load
from _cli import run

TINY_VIT = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _file_fingerprint(path: Path) -> str:
    """What raebench.metrics.extractors.fingerprint_path computes for one file, from its definition:
    sha256 of "\0<size>\n" and the sha256 digest of the whole content; 12 hex digits."""
    import hashlib

    data = path.read_bytes()
    h = hashlib.sha256(f"\0{len(data)}\n".encode() + hashlib.sha256(data).digest())
    return h.hexdigest()[:12]


@pytest.fixture(scope="module")
def tiny_vit_weights(tmp_path_factory) -> Path:
    """A random-weight 1-block ViT registered as the reference ``test-tiny-vit``: built and loaded
    by exactly the timm + weights.resolve path that serves dinov2-b / clip-l."""
    import safetensors.torch
    import timm

    arch = "vit_small_patch16_224.augreg_in21k"
    if "test-tiny-vit" not in REFERENCES:
        register_reference(ReferenceSpec("test-tiny-vit", "1-block ViT, random weights (tests)", "test-tiny-vit-v1",
                                         arch=arch, input_size=32, model_kwargs=TINY_VIT))
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=32, **TINY_VIT)
    path = tmp_path_factory.mktemp("ref") / "tiny_vit.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """A random-weight 1-layer DINOv2 in transformers' format: ``dinov2-l`` loads it through the
    metrics package's ``dinov2-l14`` extractor, the FD-DINOv2 code path."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=518)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def random_alexnet_file(tmp_path_factory) -> Path:
    """Random torchvision AlexNet convolutions (``features.*``), the file LPIPS-alex loads."""
    import torchvision

    torch.manual_seed(0)
    feats = torchvision.models.alexnet(weights=None).features.state_dict()
    path = tmp_path_factory.mktemp("lpips") / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in feats.items()}, path)
    return path


def test_analyze_end_to_end(image_folder: Path, tmp_path: Path, tiny_vit_weights: Path, tiny_dinov2_dir: Path,
                            random_alexnet_file: Path, monkeypatch, capsys):
    monkeypatch.setenv("RAEBENCH_LPIPS_ALEX_WEIGHTS", str(random_alexnet_file))
    res = tmp_path / "res"
    argv = [
        "analyze", "-t", "pixels", "-t", "bicubic-f8", "--data", str(image_folder), "-r", "32",
        "--reference", "random-proj,test-tiny-vit,dinov2-l", "--reference-weights", f"test-tiny-vit={tiny_vit_weights}",
        "--reference-weights", f"dinov2-l={tiny_dinov2_dir}",
        "--mutual-k", "3", "--align-images", "6", "--n-diag", "4", "--interp-pairs", "2", "--interp-steps", "3", "--sigmas", "0.25,1",
        "--results", str(res), "--device", "cpu",
    ]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    df = load(res)
    assert set(df["tokenizer"]) == {"pixels", "bicubic-f8"}
    assert (df["source"] == "measured").all() and df["metric_version"].str.len().gt(0).all()
    per_tok = df[df["tokenizer"] == "bicubic-f8"].set_index("metric")
    expected = {
        "probe-linear-top1", "probe-knn-top1", "latent-erank", "latent-participation-ratio", "latent-kurtosis-mean",
        "latent-hoyer-sparsity", "latent-std", "robust-psnr-vs-decode-s0.25", "robust-psnr-vs-image-s1",
        "robust-lpips-alex-vs-decode-s1", "robust-lpips-alex-vs-image-s0.25", "interp-lpips-alex-step-mean",
        "interp-lpips-alex-step-relvar", "interp-lpips-alex-path-ratio",
        "align-mutual-knn-random-proj", "align-cknna-random-proj", "align-cka-random-proj",
        "align-mutual-knn-test-tiny-vit", "align-cknna-test-tiny-vit", "align-cka-test-tiny-vit",
        "align-mutual-knn-dinov2-l", "align-cknna-dinov2-l", "align-cka-dinov2-l",
    }
    assert expected <= set(per_tok.index)
    assert per_tok.loc["latent-erank", "value"] <= 3.0 + 1e-9  # 3 channels
    assert 0.0 <= per_tok.loc["probe-linear-top1", "value"] <= 1.0
    assert per_tok.loc["align-cka-random-proj", "metric_version"].endswith("ref:random-proj-32px-256d-seed0-v1")
    assert per_tok.loc["latent-erank", "n_images"] == 8 and per_tok.loc["robust-psnr-vs-image-s1", "n_images"] == 4
    assert per_tok.loc["align-cka-random-proj", "n_images"] == 6  # the seeded alignment subset
    assert bool(per_tok.loc["probe-linear-top1", "higher_is_better"]) is True
    # pixels keeps the image exactly: decode(z) vs image is perfect, so the two robustness curves coincide
    px = df[df["tokenizer"] == "pixels"].set_index("metric")["value"]
    assert px["robust-psnr-vs-decode-s0.25"] == pytest.approx(px["robust-psnr-vs-image-s0.25"])
    assert px["robust-lpips-alex-vs-decode-s0.25"] == pytest.approx(px["robust-lpips-alex-vs-image-s0.25"])
    # the LPIPS backbone's weights are part of the version (their fingerprint: sizes and ends of the file)
    assert per_tok.loc["robust-lpips-alex-vs-decode-s1", "metric_version"].endswith(
        f"lpips-alex-v0.1-u8-v1@weights:{_file_fingerprint(random_alexnet_file)}")
    assert "ref:extractor:dinov2-vitl14-cls-224-hubpos-v1@weights:" in per_tok.loc["align-cka-dinov2-l", "metric_version"]
    vit = per_tok.loc["align-cka-test-tiny-vit"]
    assert vit["metric_version"].endswith(f"ref:test-tiny-vit-v1@weights:{_file_fingerprint(tiny_vit_weights)}")
    assert vit["extra"]["reference_weights"] == _file_fingerprint(tiny_vit_weights)
    assert "probe-linear-top1" in out and "bicubic-f8" in out
    # the printed table says what its alignment values were computed on (its title's n is every image)
    assert "alignment on 6 images" in out and "k = 3 on L2-normalised" in out and "DINOv2 ViT-L/14" in out
    # 6 images with k = 3: unrelated features already share 3/5 of their neighbours, and the rows say so
    assert "unrelated features score k / (N - 1) = 0.6" in per_tok.loc["align-mutual-knn-random-proj", "notes"]

    # figures: every kind is written, and each is a real PNG of a sensible size
    out_dirs = list((res / "analysis").iterdir())
    assert len(out_dirs) == 1 and (out_dirs[0] / "config.json").exists()
    names = {p.name for p in out_dirs[0].glob("*.png")}
    assert names == {"robustness.png", "spectra.png", "alignment.png", "interpolation.png", "reconstructions.png"}
    for p in out_dirs[0].glob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200

    # a re-run whose rows are all stored fingerprints the references' weights without building them
    import raebench.metrics.extractors as ex

    def no_build(*args, **kwargs):
        raise AssertionError("a reference network was built for a fully reused run")
    monkeypatch.setattr(ex.DinoV2Extractor, "__init__", no_build)
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert len(load(res, latest=False)) == len(df)  # nothing measured again

    # the rows are ordinary results: the leaderboard pivots them with the eval metrics
    csv = tmp_path / "lb.csv"
    assert run(["leaderboard", "--format", "csv", "--out", str(csv), "--results", str(res)], capsys)[0] == 0
    assert "/align-cka-test-tiny-vit" in csv.read_text().splitlines()[0]


def test_lpips_needs_images_it_can_take(image_folder: Path, tmp_path: Path, random_alexnet_file: Path, monkeypatch, capsys):
    """24 px is below LPIPS-alex's smallest input: auto leaves LPIPS out with the reason, an explicit
    lpips-alex is refused before the pass (both were a max-pool traceback)."""
    monkeypatch.setenv("RAEBENCH_LPIPS_ALEX_WEIGHTS", str(random_alexnet_file))
    base = ["analyze", "-t", "pixels", "--data", str(image_folder), "-r", "24", "--reference", "none", "--n-diag", "2",
            "--interp-pairs", "1", "--interp-steps", "2", "--sigmas", "1", "--no-plots", "--device", "cpu",
            "--results", str(tmp_path / "res")]
    code, out, err = run(base, capsys)
    assert code == 0, err
    df = load(tmp_path / "res").set_index("metric")
    assert "interp-rmse-step-mean" in df.index and not any("lpips" in m for m in df.index)
    assert "LPIPS left out: lpips-alex needs images of at least" in df.loc["interp-rmse-step-mean", "notes"]
    code, out, err = run([*base, "--perceptual", "lpips-alex"], capsys)
    assert code == 2 and "use --resolution" in " ".join(err.split()) and "Traceback" not in err


def test_no_decoder_diagnostics_need_no_perceptual_network(image_folder: Path, tmp_path: Path, monkeypatch, capsys):
    """--n-diag 0 computes nothing perceptual: the LPIPS network is not built, so its missing weights
    are neither warned about nor noted on the rows (an explicit --perceptual is still checked)."""
    monkeypatch.delenv("RAEBENCH_LPIPS_ALEX_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no AlexNet file
    base = ["analyze", "-t", "pixels", "--data", str(image_folder), "-r", "32", "--reference", "none",
            "--n-diag", "0", "--no-plots", "--device", "cpu", "--results", str(tmp_path / "res")]
    code, out, err = run([*base, "--perceptual", "lpips-alex"], capsys)
    assert code == 0 and "lpips" not in (out + err).lower(), out + err
    assert not load(tmp_path / "res")["notes"].fillna("").str.contains("LPIPS").any()
    code, out, err = run([*base, "--perceptual", "lpips"], capsys)
    assert code == 2 and "Unknown --perceptual 'lpips'" in err


def test_analyze_default_data_without_labels_or_reference_with_diffusability(tmp_path: Path, capsys):
    code, out, err = run(["analyze", "-t", "bicubic-f16", "-r", "32", "--limit", "4", "--reference", "none",
                          "--perceptual", "none", "--no-plots", "--n-diag", "2", "--interp-pairs", "1",
                          "--diffusability", "--probe-preset", "ditdh-tiny", "--probe-steps", "2",
                          "--probe-batch-size", "2", "--probe-samples", "4", "--probe-sample-steps", "3",
                          "--results", str(tmp_path), "--device", "cpu"], capsys)
    assert code == 0, err
    df = load(tmp_path).set_index("metric")
    assert {"latent-erank", "interp-rmse-path-ratio", "diffuse-latent-fd"} <= set(df.index)
    assert not any(m.startswith(("probe-", "align-", "robust-rmse")) for m in df.index)
    assert df.loc["diffuse-latent-fd", "metric_version"].startswith("diffuse-ditdh-tiny-steps2-bs2-")
    assert len(list((tmp_path / "analysis" / "probes").glob("bicubic-f16-*/checkpoints/last.pt"))) == 1
    assert "at least two class subfolders" in " ".join(err.split())


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--reference", "dinov2-b"], "--reference-weights dinov2-b=PATH"),
        (["--reference", "dinov3"], "Unknown reference"),
        (["--reference", "random-proj", "--reference-weights", "clip-l=/x.pt"], "not among --reference"),
        (["--reference-weights", "nonsense"], "NAME=PATH"),
        (["--sigmas", "0,1"], "numbers in (0, 100]"),
        (["--sigmas=nan"], "numbers in (0, 100]"),
        (["--sigmas=inf"], "numbers in (0, 100]"),
        (["--sigmas=1e300"], "numbers in (0, 100]"),
        (["--sigmas", "0.5,0.5"], "--sigmas lists 0.5 more than once"),
        (["--perceptual", "ssim"], "Unknown --perceptual"),
        (["-t", "bicubic-f9"], "Did you mean 'bicubic-f8'"),
        (["--knn-k", "0"], "--knn-k must be at least 1, got 0"),
        (["--knn-k", "-3"], "--knn-k must be at least 1, got -3"),
        (["--mutual-k", "0"], "--mutual-k must be at least 2, got 0"),
        (["--mutual-k", "1"], "--mutual-k must be at least 2, got 1"),  # CKNNA needs k >= 2
        (["--mutual-k", "-2"], "--mutual-k must be at least 2, got -2"),
        (["--n-diag", "-1"], "--n-diag must be at least 0, got -1"),
        (["--interp-steps", "0"], "--interp-steps must be at least 1, got 0"),
        (["--interp-steps", "-2"], "--interp-steps must be at least 1, got -2"),
        (["--interp-pairs", "-1"], "--interp-pairs must be at least 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--num-workers", "-1"], "--num-workers must be 0 or more"),
        (["--reference", "random-proj", "--align-images", "-5"], "--align-images must be at least 4 and more than --mutual-k"),
        (["--reference", "random-proj", "--align-images", "8"], "--align-images must be at least 4 and more than --mutual-k (10)"),
        (["--diffusability", "--probe-preset", "tiny"], "it takes a stage-2 model name: ditdh-b, ditdh-l, ditdh-s, ditdh-tiny"),
        (["--diffusability", "--probe-steps", "0"], "--probe-steps must be at least 1"),
        (["--diffusability", "--probe-images", "4", "--probe-batch-size", "8"], "--probe-images 4 is fewer than one batch"),
    ],
)
def test_analyze_user_errors_are_one_sentence(argv, needle, tmp_path: Path, capsys):
    base = ["analyze", "-t", "pixels", "-r", "32", "--limit", "2", "--results", str(tmp_path), "--device", "cpu"]
    code, out, err = run(base + argv, capsys)
    assert code == 2, (out, err)
    assert needle in " ".join(err.split()) and "Traceback" not in err
    assert "raebench ls stage" not in err  # no hint at a listing that does not exist


def test_bad_settings_are_refused_before_any_data_or_model(monkeypatch):
    """The Python API checks what the CLI checks, before reading the data (which would fail here)."""
    from raebench.analysis import run as analysis_run
    from raebench.errors import RaebenchError

    def no_data(*a, **k):
        raise AssertionError("the data were read before the settings were checked")

    monkeypatch.setattr(analysis_run, "resolve_data", no_data)
    for bad, needle in [(dict(knn_k=0), "--knn-k"), (dict(mutual_k=-1), "--mutual-k"), (dict(sigmas=(float("nan"),)), "--sigmas"),
                        (dict(sigmas=(0.1234567, 0.1234568, 0.1234567)), "0.1234567 more than once"),
                        (dict(batch_size=0), "--batch-size"), (dict(interp_steps=0), "--interp-steps")]:
        with pytest.raises(RaebenchError, match=needle):
            analysis_run.analyze(analysis_run.AnalyzeConfig(tokenizers=("pixels",), write=False, **bad))
