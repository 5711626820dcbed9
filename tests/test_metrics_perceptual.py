"""LPIPS equals the lpips package, DreamSim equals the dreamsim package, MS-SSIM equals pytorch-msssim;
all with random weights saved to temporary files and loaded by both sides."""

from functools import partial

import pytest
import torch
from _metrics_helpers import blurred, photo_crops

from raebench.errors import MissingWeightsError
from raebench.metrics import METRICS, MetricBatch


@pytest.fixture(scope="module")
def pairs():
    ref = photo_crops(4, 64, seed=3)
    return ref, blurred(ref, 1.5)


def _mean_over_batches(metric, ref, cand, bs):
    for i in range(0, ref.shape[0], bs):
        metric.update(MetricBatch(ref[i:i + bs], cand[i:i + bs]))
    return metric.compute()


def test_lpips_alex_equals_lpips_package(pairs, tmp_path, monkeypatch):
    import lpips
    import torchvision

    # the random backbone goes where torchvision (inside lpips) and raebench both look: $TORCH_HOME/hub/checkpoints
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("RAEBENCH_LPIPS_ALEX_WEIGHTS", raising=False)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    ref, cand = pairs
    reference = lpips.LPIPS(net="alex", verbose=False)  # pretrained backbone via torchvision's loader
    expected = reference(ref.float() / 127.5 - 1, cand.float() / 127.5 - 1).flatten().double().mean().item()
    ours = _mean_over_batches(METRICS.get("lpips-alex").build(), ref, cand, bs=3)["lpips-alex"]
    assert expected > 0 and ours == pytest.approx(expected, rel=1e-5)


def test_lpips_vgg_loads_torchvision_features_into_the_package_model(pairs, tmp_path):
    import lpips
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    features = make_layers(cfgs["D"])  # VGG-16's feature extractor, without the 500 MB classifier
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    for sl in (reference.net.slice1, reference.net.slice2, reference.net.slice3, reference.net.slice4, reference.net.slice5):
        for name, module in sl.named_children():
            module.load_state_dict(features[int(name)].state_dict())
    ref, cand = pairs
    expected = reference(ref.float() / 127.5 - 1, cand.float() / 127.5 - 1).flatten().double().mean().item()
    ours = _mean_over_batches(METRICS.get("lpips-vgg").build(weights=str(path)), ref, cand, bs=4)["lpips-vgg"]
    assert ours == pytest.approx(expected, rel=1e-5)


def test_lpips_missing_backbone_offline_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAEBENCH_LPIPS_VGG_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af\.pth.*RAEBENCH_LPIPS_VGG_WEIGHTS=FILE\.$"):
        METRICS.get("lpips-vgg").build()


# --- DreamSim ------------------------------------------------------------------------------------


#: the tiny stand-in for the package's hard-coded ViT-B (86 M parameters, a 350 MB random checkpoint):
#: 12 blocks, since DreamSim reads block 11, but 64 wide
TINY_VIT = dict(embed_dim=64, depth=12, num_heads=4, mlp_ratio=4, qkv_bias=True)


def _tiny_vits(monkeypatch):
    """Swap the package's ``vit_base`` for a tiny ViT of the package's own class, in every module
    that builds one (both sides alike); loading, LoRA, preprocessing, embedding normalisation and
    the distance stay the package's code."""
    import dreamsim.feature_extraction.load_clip_as_dino as lcd
    import dreamsim.feature_extraction.load_open_clip_as_dino as locd
    import dreamsim.feature_extraction.vision_transformer as vits

    tiny = partial(vits.VisionTransformer, **TINY_VIT, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    for module in (lcd, locd, vits):
        monkeypatch.setattr(module, "vit_base", lambda patch_size=16, **kw: tiny(patch_size=patch_size, **kw))
    return tiny


def _far_from_init(module, seed):
    torch.manual_seed(seed)
    return {k: v + 0.3 * torch.randn_like(v) for k, v in module.state_dict().items()}  # distances well above 0


def _save_clip_as_dino(tiny, path, patch, seed):
    """A CLIP/OpenCLIP tower in the package's DINO layout: state dict + ``proj``, LayerNorm as pos_drop."""
    vit = tiny(patch_size=patch)
    vit.pos_drop = torch.nn.LayerNorm(TINY_VIT["embed_dim"])
    torch.save({"state_dict": {**_far_from_init(vit, seed), "proj": torch.randn(64, 32) / 8}}, path)


def _save_lora(folder, dreamsim_type, name):
    """The package's model for ``dreamsim_type`` built from ``folder``, with a random LoRA adapter saved as ``name``."""
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    base = PerceptualModel(**dreamsim_args["model_config"][dreamsim_type], device="cpu", load_dir=str(folder),
                           normalize_embeds=True)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=["qkv"]))
    torch.manual_seed(7)
    for n, p in peft.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.05)
    peft.save_pretrained(str(folder / name))


@pytest.fixture
def tiny_dreamsim(tmp_path, monkeypatch):
    """A dreamsim ``clip_vitb32`` folder with random weights: checkpoint + LoRA adapter."""
    tiny = _tiny_vits(monkeypatch)
    _save_clip_as_dino(tiny, tmp_path / "clip_vitb32_pretrain.pth.tar", 32, seed=2)
    _save_lora(tmp_path, "clip_vitb32", "clip_vitb32_single_lora")
    return tmp_path


def _timm_dino_vit(path):
    """The reference DINO ViT: timm's own VisionTransformer (the architecture of timm's
    ``vit_base_patch16_224.dino``) at the tiny size, strictly loaded from the DINO backbone file."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=224, patch_size=16, num_classes=0, global_pool="token", **TINY_VIT)
    vit.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return vit.eval()


@pytest.fixture
def tiny_dreamsim_ensemble(tmp_path, monkeypatch):
    """A dreamsim ``ensemble`` folder with random weights, plus the DINO backbone where torch.hub
    keeps it (checkpoints/dino_vitbase16_pretrain.pth); ``torch.hub.load`` answers with timm's ViT."""
    tiny = _tiny_vits(monkeypatch)
    backbone = tmp_path / "checkpoints" / "dino_vitbase16_pretrain.pth"
    backbone.parent.mkdir()
    torch.save(_far_from_init(tiny(patch_size=16, num_classes=0), seed=3), backbone)
    torch.manual_seed(4)
    head = {f"module.head.mlp.{i}.{p}": torch.randn(8, 8) if p == "weight" else torch.randn(8)
            for i in (0, 2, 4) for p in ("weight", "bias")}
    torch.save({"student": {**head, "module.head.last_layer.weight": torch.randn(8, 8)}}, tmp_path / "dino_vitb16_pretrain.pth")
    _save_clip_as_dino(tiny, tmp_path / "clip_vitb16_pretrain.pth.tar", 16, seed=5)
    _save_clip_as_dino(tiny, tmp_path / "open_clip_vitb16_pretrain.pth.tar", 16, seed=6)
    monkeypatch.setattr(torch.hub, "load", lambda repo, model, **kw: _timm_dino_vit(backbone))
    _save_lora(tmp_path, "ensemble", "ensemble_lora")
    return tmp_path


def test_dreamsim_equals_dreamsim_package(tiny_dreamsim, pairs):
    from dreamsim import dreamsim
    from PIL import Image

    ref, cand = pairs
    model, preprocess = dreamsim(pretrained=True, device="cpu", cache_dir=str(tiny_dreamsim), dreamsim_type="clip_vitb32")
    pil = [[Image.fromarray(x.permute(1, 2, 0).numpy()) for x in s] for s in (ref, cand)]
    with torch.no_grad():
        expected = torch.stack([model(preprocess(a), preprocess(b)).flatten()[0] for a, b in zip(*pil)]).double().mean().item()
    before = torch.hub.get_dir()
    ours = _mean_over_batches(METRICS.get("dreamsim-clip-b32").build(weights=str(tiny_dreamsim)), ref, cand, bs=3)
    assert expected > 1e-2 and ours["dreamsim-clip-b32"] == pytest.approx(expected, rel=1e-5)
    assert torch.hub.get_dir() == before


def test_dreamsim_ensemble_equals_dreamsim_package_without_hub_code(tiny_dreamsim_ensemble, pairs, monkeypatch):
    """The default DreamSim (DINO + CLIP + OpenCLIP): raebench builds the DINO ViT-B/16 itself; the
    reference is the package with torch.hub answering timm's ViT from the same backbone file."""
    from dreamsim import dreamsim
    from PIL import Image

    ref, cand = pairs
    model, preprocess = dreamsim(pretrained=True, device="cpu", cache_dir=str(tiny_dreamsim_ensemble), dreamsim_type="ensemble")
    pil = [[Image.fromarray(x.permute(1, 2, 0).numpy()) for x in s] for s in (ref, cand)]
    with torch.no_grad():
        expected = torch.stack([model(preprocess(a), preprocess(b)).flatten()[0] for a, b in zip(*pil)]).double().mean().item()

    def no_hub(*a, **k):
        raise AssertionError("torch.hub.load called")

    monkeypatch.setattr(torch.hub, "load", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = METRICS.get("dreamsim").build(weights=str(tiny_dreamsim_ensemble))
    assert torch.hub.load is no_hub  # put back after the build
    ours = _mean_over_batches(metric, ref, cand, bs=3)
    assert expected > 1e-2 and ours["dreamsim"] == pytest.approx(expected, rel=1e-5)


def test_dino_vitb16_is_dino_vit_base_with_its_checkpoint(tmp_path, monkeypatch):
    """What the local build stands for: DINO's hub ``dino_vitb16`` is timm's ``vit_base_patch16_224.dino``
    architecture (same parameters, LayerNorm eps 1e-6) loaded strictly; and it computes timm's function."""
    import dreamsim.feature_extraction.vision_transformer as vits
    import timm

    from raebench.metrics.perceptual import dino_vitb16

    full = vits.vit_base(patch_size=16, num_classes=0)
    reference = timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in full.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert {m.eps for m in full.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    del full, reference

    tiny = _tiny_vits(monkeypatch)
    (tmp_path / "checkpoints").mkdir()
    torch.save(_far_from_init(tiny(patch_size=16, num_classes=0), seed=8), tmp_path / "checkpoints" / "dino_vitbase16_pretrain.pth")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = dino_vitb16(tmp_path).eval()(x)
        expected = _timm_dino_vit(tmp_path / "checkpoints" / "dino_vitbase16_pretrain.pth")(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_dreamsim_runs_no_hub_code(tmp_path, monkeypatch):
    from raebench.metrics.perceptual import local_hub_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = torch.hub.load
    with local_hub_models(tmp_path):
        with pytest.raises(MissingWeightsError, match="facebookresearch/dinov2:dinov2_vitb14, GitHub code"):
            torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")
        with pytest.raises(MissingWeightsError, match=r"download https://dl\.fbaipublicfiles\.com/dino/.*checkpoints"):
            torch.hub.load("facebookresearch/dino:main", "dino_vitb16")
    assert torch.hub.load is real
    assert "dreamsim-dinov2-b14" not in METRICS


def test_dreamsim_hub_dir_change_is_contained(monkeypatch, tmp_path):
    import dreamsim

    from raebench.metrics.perceptual import load_dreamsim

    def fake(**kw):  # what the ensemble does: torch.hub.set_dir(<model folder>) for the DINO hub code
        torch.hub.set_dir(str(tmp_path / "elsewhere"))
        return torch.nn.Identity(), None

    monkeypatch.setattr(dreamsim, "dreamsim", fake)
    before = torch.hub.get_dir()
    load_dreamsim("ensemble", tmp_path, torch.device("cpu"))
    assert torch.hub.get_dir() == before


def test_dreamsim_missing_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=r"'dino_vitb16_pretrain\.pth', .*'ensemble_lora', 'checkpoints/dino_"
                                                  r"vitbase16_pretrain\.pth' not in .*; unzip https://.*dreamsim_ensemble"
                                                  r"_checkpoint\.zip into .* and download https://.*dino_vitbase16_pretrain\.pth"):
        METRICS.get("dreamsim").build(weights=str(tmp_path))
    for f in ("dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar", "ensemble_lora"):
        (tmp_path / f).touch()
    with pytest.raises(MissingWeightsError, match=r"weights not found: 'checkpoints/dino_vitbase16_pretrain\.pth' not in .*; download "
                                                  r"https://dl\.fbaipublicfiles\.com/dino/dino_vitbase16_pretrain/"):
        METRICS.get("dreamsim").build(weights=str(tmp_path))


# --- MS-SSIM -------------------------------------------------------------------------------------


def test_ms_ssim_equals_pytorch_msssim():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    ref = photo_crops(3, 177, seed=4)  # odd size: exercises the padded pooling
    cand = blurred(ref, 1.0)
    cand[0] = (cand[0].float() + torch.randn(cand[0].shape) * 20).clamp(0, 255).to(torch.uint8)
    expected = pytorch_msssim.ms_ssim(ref.double() / 255, cand.double() / 255, data_range=1.0, size_average=True).item()
    ours = _mean_over_batches(METRICS.get("ms-ssim").build(), ref, cand, bs=2)["ms-ssim"]
    assert ours == pytest.approx(expected, rel=1e-6)  # pytorch-msssim builds its Gaussian window in float32


def test_ms_ssim_negative_contrast_terms_count_as_zero():
    """An inverted channel has negative contrast-structure terms at every scale; pytorch-msssim sets
    them to 0 before the fractional powers (the channel scores 0, not NaN) and averages channels."""
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    ref = photo_crops(2, 192, seed=5)
    cand = blurred(ref, 0.8)
    cand[:, 0] = 255 - cand[:, 0]  # the red channel inverted, the others only blurred
    expected = pytorch_msssim.ms_ssim(ref.double() / 255, cand.double() / 255, data_range=1.0, size_average=True).item()
    ours = _mean_over_batches(METRICS.get("ms-ssim").build(), ref, cand, bs=2)["ms-ssim"]
    assert 0.3 < expected < 0.67  # the inverted channel counts as 0 in a mean of three
    assert ours == pytest.approx(expected, rel=1e-6)


def test_ms_ssim_negative_fine_scale_terms_count_as_zero_not_by_magnitude():
    """Inverted fine detail over a shared smooth image: the contrast-structure term of the finest
    scale is negative while the coarsest scale's SSIM is positive, so only clamping that term to 0
    (pytorch-msssim's relu) zeroes the channel; its magnitude (|cs|) or a clamp of the last scale
    alone would not. One channel inverted, the others noisy but aligned."""
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    from raebench.metrics.msssim import _ssim_cs
    from raebench.metrics.pixel import _gaussian_window

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(176.0, dtype=torch.float64), torch.arange(176.0, dtype=torch.float64), indexing="ij")
    smooth = 128 + 70 * torch.sin(xx / 17 + torch.arange(3.0, dtype=torch.float64).view(3, 1, 1)) * torch.cos(yy / 23)
    detail = torch.randn(2, 3, 176, 176, generator=g, dtype=torch.float64) * 20
    ref = (smooth + detail).round().clamp(0, 255).to(torch.uint8)
    flip = torch.tensor([-1.0, 0.5, 0.8], dtype=torch.float64).view(1, 3, 1, 1)  # channel 0: detail inverted
    cand = (smooth + flip * detail).round().clamp(0, 255).to(torch.uint8)
    a, b = ref.double() / 255, cand.double() / 255
    _, cs_fine = _ssim_cs(a, b, _gaussian_window())
    ssim_coarse, _ = _ssim_cs(*(torch.nn.functional.avg_pool2d(x, 16) for x in (a, b)), _gaussian_window())
    assert bool((cs_fine[:, 0] < -0.5).all()) and bool((ssim_coarse[:, 0] > 0.9).all())  # the premise
    expected = pytorch_msssim.ms_ssim(a, b, data_range=1.0, size_average=True).item()
    ours = _mean_over_batches(METRICS.get("ms-ssim").build(), ref, cand, bs=1)["ms-ssim"]
    assert 0.2 < expected < 0.67  # channel 0 counts as 0 in a mean of three
    assert ours == pytest.approx(expected, rel=1e-6)


def test_reuse_and_resume_compare_the_dreamsim_weights_recorded_with_a_row(tmp_path, monkeypatch):
    """DreamSim had no spec-level weights resolver, so `compare` (and eval's resume key) reused DreamSim rows
    measured with other DreamSim weights. The plan now fingerprints the folder the metric loads, as the
    metric records it (its weights_id), without loading it; files the package will download leave nothing
    to compare yet (no refusal online), and missing files offline are one sentence at start-up."""
    from raebench.eval_config import planned
    from raebench.metrics.extractors import fingerprint_path

    name = "dreamsim-clip-b32"
    for folder, content in (("a", b"1"), ("b", b"2")):
        (tmp_path / folder).mkdir()
        for f in ("clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"):
            (tmp_path / folder / f).write_bytes(content)
    plan = planned((name,), {name: {"weights": str(tmp_path / "a")}})
    assert plan.weights[name] == fingerprint_path(tmp_path / "a") and not plan.missing
    version = plan.versions[name]
    assert plan.row_matches(name, version, {"metric_weights": {name: fingerprint_path(tmp_path / "a")}})
    assert not plan.row_matches(name, version, {"metric_weights": {name: fingerprint_path(tmp_path / "b")}})

    monkeypatch.delenv("RAEBENCH_DREAMSIM_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty default folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    plan = planned((name,), {})
    assert plan.weights[name] is None and not plan.missing  # the package downloads them when it builds
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "clip_vitb32_pretrain.pth.tar" in planned((name,), {}).missing[name]


def test_a_dreamsim_variants_identity_is_its_own_files_in_the_shared_folder(tmp_path):
    """Every DreamSim variant loads from one folder (``$TORCH_HOME/hub/dreamsim``): its identity was the
    fingerprint of the whole folder, so downloading another variant there made the rows measured before
    other networks' rows (compare measured them again, the leaderboard split their columns by
    metric_networks). Now it is the variant's own files, in the plan and as the metric records it."""
    from raebench.eval_config import planned
    from raebench.metrics import METRICS

    name = "dreamsim-clip-b32"
    (tmp_path / "clip_vitb32_single_lora").mkdir()
    (tmp_path / "clip_vitb32_pretrain.pth.tar").write_bytes(b"1")
    (tmp_path / "clip_vitb32_single_lora" / "adapter.bin").write_bytes(b"2")
    before = planned((name,), {name: {"weights": str(tmp_path)}}).weights[name]
    (tmp_path / "dino_vitb16_single_lora").mkdir()  # another variant, downloaded later
    (tmp_path / "dino_vitb16_single_lora" / "adapter.bin").write_bytes(b"3")
    (tmp_path / "dino_vitb16_pretrain.pth").write_bytes(b"4")
    assert planned((name,), {name: {"weights": str(tmp_path)}}).weights[name] == before
    assert METRICS.get(name).weights_identity(tmp_path) == before  # what a built DreamSim records
    (tmp_path / "clip_vitb32_single_lora" / "adapter.bin").write_bytes(b"other")
    assert planned((name,), {name: {"weights": str(tmp_path)}}).weights[name] != before
