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


@pytest.fixture
def tiny_dreamsim(tmp_path, monkeypatch):
    """A dreamsim ``clip_vitb32`` folder with random weights: checkpoint + LoRA adapter.

    The package hard-codes a ViT-B/32 (86 M parameters, a 350 MB random checkpoint); its constructor
    is swapped for a 2-block, 64-wide ViT of the package's own class, for both sides alike. Loading,
    LoRA, preprocessing, embedding normalisation and the distance stay the package's code.
    """
    import dreamsim.feature_extraction.load_clip_as_dino as lcd
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.vision_transformer import VisionTransformer
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    tiny = partial(VisionTransformer, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4, qkv_bias=True,
                   norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    monkeypatch.setattr(lcd, "vit_base", lambda patch_size=16, **kw: tiny(patch_size=patch_size, **kw))
    torch.manual_seed(2)
    vit = tiny(patch_size=32)
    vit.pos_drop = torch.nn.LayerNorm(64)
    sd = {k: v + 0.3 * torch.randn_like(v) for k, v in vit.state_dict().items()}  # far from init: distances well above 0
    torch.save({"state_dict": {**sd, "proj": torch.randn(64, 32) / 8}}, tmp_path / "clip_vitb32_pretrain.pth.tar")
    base = PerceptualModel(**dreamsim_args["model_config"]["clip_vitb32"], device="cpu", load_dir=str(tmp_path),
                           normalize_embeds=True)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=["qkv"]))
    for n, p in peft.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.05)
    peft.save_pretrained(str(tmp_path / "clip_vitb32_single_lora"))
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
    with pytest.raises(MissingWeightsError, match="ensemble_lora|dino_vitb16_pretrain"):
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
