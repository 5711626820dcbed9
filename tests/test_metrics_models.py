"""FD-DINOv2 and CMMD through tiny random transformers models saved to temporary folders: the
extractors follow EDM2's / the CMMD paper's preprocessing and the metrics equal their definitions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _metrics_helpers import blurred, photo_crops

from raebench.evaluator import Evaluator
from raebench.metrics import EXTRACTORS
from raebench.metrics.frechet import frechet_distance


@pytest.fixture(scope="module")
def images():
    ref = photo_crops(10, 48, seed=5)
    return ref, blurred(ref, 2.0)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    # 98 px / patch 14 = 7x7 positions, so 224 px inputs (16x16 patches) interpolate, as ViT-L/14 at 518 does
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=98, patch_size=14)
    d = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, projection_dim=16)
    d = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(d)
    return d


def _hub_pos_embed(pos: torch.Tensor, n: int) -> torch.Tensor:
    """facebookresearch/dinov2 ``interpolate_pos_encoding`` for an n x n grid (what EDM2 runs)."""
    cls, patch = pos[:, :1], pos[:, 1:]
    m = int(patch.shape[1] ** 0.5)
    patch = F.interpolate(patch.reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                          scale_factor=((n + 0.1) / m, (n + 0.1) / m))
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, n * n, -1)], 1)


def test_dinov2_features_follow_edm2(dinov2_dir, images):
    from transformers import Dinov2Model

    x = images[0][:3]
    ex = EXTRACTORS.get("dinov2-l14").builder(device="cpu", outputs=("cls",), weights=str(dinov2_dir))
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    # EDM2's DINOv2Detector, resize_mode='torch', written out
    y = F.interpolate(x.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    y = (y - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    emb = model.embeddings
    pos = _hub_pos_embed(emb.position_embeddings, 16)
    assert not torch.allclose(pos, emb.interpolate_pos_encoding(torch.zeros(1, 257, 32), 224, 224))  # transformers' own differs
    with torch.no_grad():
        tokens = torch.cat([emb.cls_token.expand(3, -1, -1), emb.patch_embeddings(y)], 1) + pos
        h = model.encoder(tokens).last_hidden_state
        expected = model.layernorm(h)[:, 0]
    assert torch.allclose(ex(x)["cls"], expected, rtol=1e-4, atol=1e-5)
    pil = EXTRACTORS.get("dinov2-l14").builder(device="cpu", outputs=("cls",), weights=str(dinov2_dir), resize="pil")
    assert pil.variant == "resize=pil" and torch.allclose(pil(x)["cls"], expected, atol=0.05)


def test_fd_dinov2_and_cmmd_equal_their_definitions(dinov2_dir, clip_dir, images):
    from transformers import CLIPVisionModelWithProjection

    ref, cand = images
    ev = Evaluator(("fd-dinov2", "cmmd"), torch.device("cpu"),
                   options={"dinov2-l14": {"weights": str(dinov2_dir)}, "clip-l14-336": {"weights": str(clip_dir)}})
    for i in range(0, 10, 4):
        ev.update(ref[i:i + 4], cand[i:i + 4])
    values, versions, _ = ev.compute()
    # FD-DINOv2: Fréchet distance of the CLS features (extracted in one batch)
    dino = ev.extractor("dinov2-l14")
    fr, fc = dino(ref)["cls"].double().numpy(), dino(cand)["cls"].double().numpy()
    expected = frechet_distance(fc.mean(0), np.cov(fc, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))
    assert values["fd-dinov2"] == pytest.approx(expected, rel=1e-4)
    # CMMD: the official definition on L2-normalised CLIP embeddings (the official reader, CLIP mean/std)
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()

    def embed(u8):
        y = _official_cmmd_reader(u8, 56)
        y = (y - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
            [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        with torch.no_grad():
            e = model(pixel_values=y).image_embeds.double()
        return (e / e.norm(dim=1, keepdim=True)).numpy()

    x, y = embed(cand), embed(ref)

    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * 10.0**2))

    cmmd = 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    assert cmmd > 0 and values["cmmd"] == pytest.approx(cmmd, rel=1e-4)
    assert versions["fd-dinov2"].startswith("fd-dinov2-vitl14") and "torch" in versions["fd-dinov2"]
    assert "croppil" in versions["cmmd"]


def test_extractor_folders_are_loaded_strictly(dinov2_dir, clip_dir, tmp_path, caplog):
    """A DINOv2/CLIP folder with a missing weight, or of another model type, is refused (transformers alone
    would initialise the weight at random, or drop register tokens); a full CLIP checkpoint's text tower
    may go unused; another size loads with a warning."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from raebench.errors import CheckpointError

    build = {name: EXTRACTORS.get(name).builder for name in ("dinov2-l14", "clip-l14-336")}
    holed = tmp_path / "holed"
    shutil.copytree(dinov2_dir, holed)
    sd = load_file(str(holed / "model.safetensors"))
    dropped = next(k for k in sd if "layer.1." in k)
    save_file({k: v for k, v in sd.items() if k != dropped}, str(holed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing \(encoder\.layer\.1\."):
        build["dinov2-l14"](device="cpu", outputs=("cls",), weights=str(holed))
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=28, patch_size=14)
                             ).save_pretrained(tmp_path / "reg")
    with pytest.raises(CheckpointError, match="holds a 'dinov2_with_registers' model"):
        build["dinov2-l14"](device="cpu", outputs=("cls",), weights=str(tmp_path / "reg"))
    with caplog.at_level("WARNING"):
        build["dinov2-l14"](device="cpu", outputs=("cls",), weights=str(dinov2_dir))
    assert "not the model this metric is defined with" in caplog.text and "'hidden_size': 32" in caplog.text

    vision = CLIPConfig().vision_config.to_dict() | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                                                     "projection_dim": 16}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).save_pretrained(tmp_path / "full")
    ex = build["clip-l14-336"](device="cpu", outputs=("embed",), weights=str(tmp_path / "full"))  # text tower unused
    assert ex.model.visual_projection.weight.shape == (16, 32)
    with pytest.raises(CheckpointError, match="holds a 'dinov2' model"):
        build["clip-l14-336"](device="cpu", outputs=("embed",), weights=str(dinov2_dir))


def test_every_missing_metric_weight_is_named_in_one_error(tmp_path, monkeypatch):
    """`score -m lpips-vgg,fid,fd-dinov2,cmmd` without weights named LPIPS, then (next run) Inception,
    then DINOv2...; one error now names each missing file, before any image is read."""
    import os

    from raebench.errors import MissingWeightsError
    from raebench.evaluator import Evaluator

    for k in list(os.environ):
        if k.startswith("RAEBENCH_") and k.endswith("_WEIGHTS") or k == "RAEBENCH_METRIC_OPTIONS":
            monkeypatch.delenv(k)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as e:
        Evaluator(("lpips-vgg", "fid", "fd-dinov2", "cmmd"), torch.device("cpu"))
    msg = str(e.value)
    assert msg.startswith("4 metric weights are missing: (1) ")
    for what in ("LPIPS-vgg", "Inception-v3", "DINOv2 ViT-L/14", "CLIP ViT-L/14@336"):
        assert what in msg, what
    ev = Evaluator(("fid", "fd-dinov2"), torch.device("cpu"))  # metrics without weights of their own build ...
    with pytest.raises(MissingWeightsError, match=r"^2 metric weights are missing: \(1\) DINOv2.*\(2\) Inception"):
        ev.check_weights()  # ... and evaluate/score check their extractors' weights before the pass


def _official_cmmd_reader(u8: torch.Tensor, size: int) -> torch.Tensor:
    """google-research cmmd/io_util.py, written out: the largest centred square (offsets (h − l) // 2,
    (w − l) // 2), PIL bicubic to the model size on the uint8 image, then / 255 (embedding.py's own
    jax.image.resize to the same size is the identity)."""
    from PIL import Image

    out = []
    for a in u8.permute(0, 2, 3, 1).numpy():
        im = Image.fromarray(a)
        w, h = im.size
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)
        out.append(np.asarray(im).astype(np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 255.0


def test_cmmd_clip_input_is_the_official_readers(clip_dir):
    """The CLIP extractor sees what google-research's CMMD program feeds its model: square images with
    hard edges (PIL clips bicubic overshoot to 0..255 and rounds to uint8) and non-square ones (cropped
    to the centred square, not squashed) give the official embeddings."""
    from skimage import data as skdata
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    ex = EXTRACTORS.get("clip-l14-336").builder(device="cpu", outputs=("embed",), weights=str(clip_dir))
    def u8(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]

    astronaut = u8(skdata.astronaut()[:48:2, :48:2])  # 24 px with hard edges: upsampling overshoots 0..255
    chelsea = u8(skdata.chelsea()[100:140, 150:211])  # 40 x 61: cropped to its centred 40 x 40
    tall = chelsea.transpose(-1, -2).contiguous()  # 61 x 40
    for x in (astronaut.repeat(2, 1, 1, 1), torch.cat([chelsea, chelsea.flip(-1)]), tall):
        with torch.no_grad():
            e = model(pixel_values=(_official_cmmd_reader(x, 56) - mean) / std).image_embeds.double()
        expected = (e / e.norm(dim=1, keepdim=True)).float()
        assert torch.allclose(ex(x)["embed"], expected, rtol=1e-5, atol=1e-6), tuple(x.shape)


def test_pil_resize_is_dgm_eval_and_dreamsim_transform():
    """``resize_images(..., "pil")`` (``dinov2-l14.resize=pil``, DreamSim) gives the uint8 values of
    dgm-eval's and dreamsim's ``Resize((224, 224), BICUBIC)`` on a PIL image, non-square ones squashed."""
    import torchvision.transforms as T
    from PIL import Image
    from skimage import data as skdata

    from raebench.metrics.extractors import resize_images

    for a in (skdata.astronaut()[::2, ::2], skdata.chelsea()):  # 256 x 256, 300 x 451
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
        tv = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor()])(Image.fromarray(a))
        assert torch.equal(resize_images(x, 224, "pil")[0], (tv * 255).round())
