"""Learned paired distances: LPIPS (Zhang et al. 2018) and DreamSim (Fu et al. 2023).

LPIPS: the ``lpips`` package's model, version 0.1, on 8-bit images mapped to [-1, 1]; the per-image
spatial average, then the mean over images. ``lpips-vgg`` (what RAE reports) and ``lpips-alex``.
The learned linear heads ship in the lpips wheel; the ImageNet backbone is torchvision's file
(``vgg16-397923af.pth``, ``alexnet-owt-7be5be79.pth``), resolved like every weight: the
``weights`` option or ``RAEBENCH_LPIPS_{VGG,ALEX}_WEIGHTS`` > ``$TORCH_HOME/hub/checkpoints`` > a
download. (The lpips package would fetch it through torchvision itself; we load it into the
package's random-backbone model so that offline runs fail with one sentence instead.)

DreamSim: the ``dreamsim`` package's model (``normalize_embeds=True``), images resized to 224
with PIL bicubic as the package's own preprocessing, distance 1 − cos of the embeddings, mean over
images. ``dreamsim`` is the default ensemble (DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP ViT-B/16);
``dreamsim-<backbone>`` are the single-backbone models. Weights: the folder given by the
``weights`` option or ``RAEBENCH_DREAMSIM_WEIGHTS``, else ``$TORCH_HOME/hub/dreamsim``; the
package downloads there when online. Building the ensemble calls ``torch.hub.set_dir`` globally;
we restore the previous hub directory afterwards.

The DINO ViT-B/16 of the ensemble (and of ``dreamsim-dino-b16``): the package gets it with
``torch.hub.load("facebookresearch/dino:main", "dino_vitb16")``, which fetches and runs the DINO
repository's code from GitHub. raebench runs no remote code, so that one call is answered locally
with what the hub entry point builds (``vit_base(patch_size=16, num_classes=0)``, strict load of
``dino_vitbase16_pretrain.pth``), using the copy of DINO's ``VisionTransformer`` that ships in the
dreamsim wheel. The backbone file lives where the hub puts it: ``<dreamsim folder>/checkpoints``.
DreamSim's DINOv2 variant builds DINOv2 through torch.hub as well and is not offered.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import torch

from raebench.checkpoint import load_state, load_strict
from raebench.errors import MissingWeightsError
from raebench.metrics.base import MetricInputError, MetricSpec, PairedMean, register_metric, shared_network
from raebench.metrics.extractors import (fingerprint_path, full_fp32, local_weights, resize_images, resolve_url_file,
                                         weights_env)
from raebench.weights import hf_offline


TORCHVISION_BACKBONES = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
#: the smallest image side each backbone's last LPIPS layer is reached with (smaller: "Output size is
#: too small"): VGG-16 halves 4 times before conv5 (16 px); AlexNet's 11/4 stride-4 convolution
#: (padding 2) and two 3/2 max-pools need a 3 px map before the second pool, 31 px (both tested)
LPIPS_MIN_SIDE = {"vgg": 16, "alex": 31}


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


def load_lpips(net: str, backbone_file: str | os.PathLike) -> torch.nn.Module:
    """The lpips package's LPIPS(net) with its shipped linear heads and the torchvision backbone
    weights from ``backbone_file`` (a torchvision state dict: ``features.<i>.weight``)."""
    import lpips

    with contextlib.redirect_stdout(io.StringIO()):
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    sd = load_state(backbone_file)  # refuses pickled code
    own = model.net.state_dict()
    # the package splits torchvision's ``features`` Sequential into slices: slice<k>.<i>.<p> = features.<i>.<p>
    new = {k: sd[f"features.{k.split('.', 1)[1]}"] for k in own if f"features.{k.split('.', 1)[1]}" in sd}
    if set(new) != set(own):
        missing = sorted(set(own) - set(new))[:3]
        raise MissingWeightsError(f"LPIPS-{net}: {str(backbone_file)!r} is not a torchvision {net} state dict "
                                  f"(missing {missing}); pass the file {TORCHVISION_BACKBONES[net].rsplit('/', 1)[-1]}.")
    load_strict(model.net, new, what=f"LPIPS-{net}'s torchvision backbone", path=backbone_file)
    return model.eval().requires_grad_(False)


def lpips_weights_path(name: str, net: str, weights: str | None = None) -> Path:
    """The backbone file an LPIPS metric loads (local option > env > cache > download), unloaded."""
    return resolve_url_file(TORCHVISION_BACKBONES[net], local_weights(name, weights),
                            what=f"LPIPS-{net} backbone (torchvision ImageNet)", env=weights_env(name))


class LPIPS(PairedMean):
    def __init__(self, spec: MetricSpec, net: str, device: str | torch.device = "cpu", weights: str | None = None):
        super().__init__(spec)
        path = lpips_weights_path(spec.name, net, weights)
        self.weights_id = fingerprint_path(path)
        self.device = torch.device(device)
        self.model = shared_network(("lpips", net, str(path), str(self.device)),
                                    lambda: load_lpips(net, path).to(self.device))

    def per_image(self, ref_u8, cand_u8):
        if min(ref_u8.shape[-2:]) < self.spec.min_image_side:
            raise MetricInputError(f"{self.spec.name} needs images of at least {self.spec.min_image_side} px on the "
                                   f"short side, got {tuple(ref_u8.shape[-2:])}.")
        a = ref_u8.to(self.device).float() / 127.5 - 1.0  # [-1, 1], what lpips expects
        b = cand_u8.to(self.device).float() / 127.5 - 1.0
        with full_fp32():  # TF32 off on GPUs, as for the feature extractors: the lpips package's numbers
            return self.model(a, b).flatten().cpu()  # (N,)


# ---------------------------------------------------------------------------------------------
# DreamSim
# ---------------------------------------------------------------------------------------------

#: DINO's released ViT-B/16 backbone: what torch.hub's ``dino_vitb16`` entry point loads, from
#: <hub dir>/checkpoints, and dreamsim sets the hub dir to its model folder
DINO_VITB16_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
DINO_VITB16_FILE = "checkpoints/" + DINO_VITB16_URL.rsplit("/", 1)[-1]
#: registry name -> dreamsim_type, and the files its folder must hold (dreamsim.model.download_weights)
DREAMSIM_VARIANTS = {
    "dreamsim": ("ensemble", ("dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar",
                              "clip_vitb16_pretrain.pth.tar", "ensemble_lora", DINO_VITB16_FILE)),
    "dreamsim-dino-b16": ("dino_vitb16", ("dino_vitb16_pretrain.pth", "dino_vitb16_single_lora", DINO_VITB16_FILE)),
    # no dinov2_vitb14: the package builds its DINOv2 with torch.hub code from GitHub (see the module docstring)
    "dreamsim-clip-b32": ("clip_vitb32", ("clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora")),
    "dreamsim-openclip-b32": ("open_clip_vitb32", ("open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora")),
    "dreamsim-synclr-b16": ("synclr_vitb16", ("synclr_vit_b_16.pth", "synclr_vitb16_single_lora")),
}
DREAMSIM_SIZE = 224


@contextlib.contextmanager
def torch_hub_dir_restored():
    """Undo any ``torch.hub.set_dir`` made inside (DreamSim sets it to its model folder)."""
    prev = getattr(torch.hub, "_hub_dir", None)
    try:
        yield
    finally:
        torch.hub._hub_dir = prev


def dreamsim_dir(weights: str | None = None) -> Path:
    return Path(local_weights("dreamsim", weights) or Path(torch.hub.get_dir()) / "dreamsim").expanduser()


def _missing_file_hint(name: str, folder: Path, dreamsim_type: str = "") -> str:
    """Where the file ``name`` of a DreamSim folder comes from."""
    if name == DINO_VITB16_FILE:
        return f"download {DINO_VITB16_URL} into {folder / 'checkpoints'}"
    from dreamsim.config import dreamsim_weights

    return f"unzip {dreamsim_weights[dreamsim_type]} into {folder}"


def dino_vitb16(folder: Path) -> torch.nn.Module:
    """DINO ViT-B/16 as ``torch.hub.load("facebookresearch/dino:main", "dino_vitb16")`` builds it
    (``vit_base(patch_size=16, num_classes=0)``, strict load), from the DINO ``VisionTransformer``
    that ships in the dreamsim wheel and ``<folder>/checkpoints/dino_vitbase16_pretrain.pth``
    (downloaded there when online, as the hub would)."""
    from dreamsim.feature_extraction import vision_transformer as vits

    path = folder / DINO_VITB16_FILE
    if not path.is_file():
        if hf_offline():
            raise MissingWeightsError(f"DreamSim's DINO backbone is missing: {_missing_file_hint(DINO_VITB16_FILE, folder)}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(DINO_VITB16_URL, str(path), progress=False)  # temp file, then rename
    model = vits.vit_base(patch_size=16, num_classes=0)
    load_strict(model, load_state(path), what="DINO ViT-B/16", path=path)  # load_state refuses pickled code
    return model


@contextlib.contextmanager
def local_hub_models(folder: Path):
    """Answer the dreamsim package's ``torch.hub.load`` calls without fetching or running GitHub code:
    DINO ViT-B/16 is built locally (:func:`dino_vitb16`); any other hub model is refused."""
    real = torch.hub.load

    def load(repo_or_dir, model, *args, **kwargs):
        repo = str(repo_or_dir).split(":")[0]
        if repo == "facebookresearch/dino" and model == "dino_vitb16" and not args and not kwargs:
            return dino_vitb16(folder)
        raise MissingWeightsError(f"DreamSim asked torch.hub for {repo_or_dir}:{model}, GitHub code that raebench "
                                  "does not run; use dreamsim (the ensemble) or another dreamsim-* variant.")

    torch.hub.load = load
    try:
        yield
    finally:
        torch.hub.load = real


def load_dreamsim(dreamsim_type: str, folder: Path, device: torch.device) -> torch.nn.Module:
    """The dreamsim package's model from ``folder`` (it downloads there when files are missing)."""
    from dreamsim import dreamsim

    with torch_hub_dir_restored(), local_hub_models(folder), contextlib.redirect_stdout(sys.stderr):
        model, _ = dreamsim(pretrained=True, device=str(device), cache_dir=str(folder), dreamsim_type=dreamsim_type)
    return model.eval().requires_grad_(False)


def dreamsim_weights(name: str, weights: str | None = None) -> Path | None:
    """The folder the DreamSim metric ``name`` loads (its weights' identity is that folder's fingerprint,
    as the metric records it), resolved without loading; None when files are missing that the dreamsim
    package will download there. Missing files offline, or in a folder the user gave, are an error."""
    dreamsim_type, required = DREAMSIM_VARIANTS[name]
    folder = dreamsim_dir(weights)
    missing = [f for f in required if not (folder / f).exists()]
    if missing and (hf_offline() or local_weights("dreamsim", weights)):
        hints = dict.fromkeys(_missing_file_hint(f, folder, dreamsim_type) for f in missing)  # ordered, unique
        raise MissingWeightsError(
            f"DreamSim ({dreamsim_type}) weights not found: {', '.join(map(repr, missing))} not in {folder}; "
            f"{' and '.join(hints)}, or pass another folder with {weights_env('dreamsim')}=DIR."
        )
    return None if missing else folder


class DreamSim(PairedMean):
    def __init__(self, spec: MetricSpec, device: str | torch.device = "cpu", weights: str | None = None):
        super().__init__(spec)
        dreamsim_type, required = DREAMSIM_VARIANTS[spec.name]
        folder = dreamsim_dir(weights)
        dreamsim_weights(spec.name, weights)  # missing files offline (or in the user's folder): one sentence
        self.device = torch.device(device)
        try:
            self.model = shared_network(("dreamsim", dreamsim_type, str(folder), str(self.device)),
                                        lambda: load_dreamsim(dreamsim_type, folder, self.device))
        except MissingWeightsError:
            raise
        except (OSError, RuntimeError) as e:  # download failures, a damaged file
            raise MissingWeightsError(
                f"DreamSim ({dreamsim_type}) could not be loaded from {folder} ({type(e).__name__}: {str(e)[:160]}); "
                f"its files: {', '.join(required)}; pass another folder with {weights_env('dreamsim')}=DIR."
            ) from None
        self.weights_id = spec.weights_identity(folder)  # its own files: the variants share the folder

    def per_image(self, ref_u8, cand_u8):
        a = resize_images(ref_u8, DREAMSIM_SIZE, "pil").to(self.device) / 255.0  # the package's PIL bicubic
        b = resize_images(cand_u8, DREAMSIM_SIZE, "pil").to(self.device) / 255.0
        with full_fp32():  # TF32 off on GPUs, as for the feature extractors
            return self.model(a, b).flatten().cpu()  # (N,) 1 - cos


for _net in ("vgg", "alex"):
    register_metric(
        MetricSpec(
            name=f"lpips-{_net}", higher_is_better=False, kind="paired", version=f"lpips-{_net}-v0.1-u8-v1",
            description=f"LPIPS v0.1 with the {'VGG-16' if _net == 'vgg' else 'AlexNet'} backbone (lpips package)",
            builder=lambda spec, net=_net, **o: LPIPS(spec, net, **o), options=("device", "weights"),
            aliases=("lpips",) if _net == "vgg" else (), min_image_side=LPIPS_MIN_SIDE[_net],
            weights_path=lambda weights=None, net=_net: lpips_weights_path(f"lpips-{net}", net, weights),
        )
    )
for _name, (_type, _files) in DREAMSIM_VARIANTS.items():
    register_metric(
        MetricSpec(
            name=_name, higher_is_better=False, kind="paired", version=f"dreamsim-0.2-{_type}-pil224-v1",
            description=f"DreamSim distance (dreamsim package, {_type})",
            builder=lambda spec, **o: DreamSim(spec, **o), options=("device", "weights"),
            weights_path=lambda weights=None, name=_name: dreamsim_weights(name, weights),
            weights_patterns=tuple(p for f in _files for p in (f, f"{f}/*")),  # a file, or a folder's files
        )
    )
