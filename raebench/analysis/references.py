"""Reference encoders that latents are aligned against (``--reference dinov2-b,clip-l``).

A reference maps uint8 (N, 3, H, W) images to (N, D) float32 features of the whole image. Three
kinds, one registry (:data:`REFERENCES`):

* **metrics-package extractors** — ``dinov2-l`` is the ``dinov2-l14`` extractor of FD-DINOv2 (CLS
  after the final norm, 224 px) and ``clip-l`` the ``clip-l14-336`` extractor of CMMD (projected,
  L2-normalised embedding at 336 px): the very networks, preprocessing and weights resolution that
  ``raebench eval`` uses, not copies.
* **timm models** for the sizes the metrics package does not carry — ``dinov2-b``, ``clip-b``: resized
  to their input size (bicubic, antialiased; the images are already square ADM crops), normalised
  with their own mean/std, timm's pooled pre-logits feature (final-norm CLS token; for CLIP before
  the projection). Weights resolve through :func:`raebench.weights.resolve`: a local file given
  with ``--reference-weights NAME=PATH`` > the Hugging Face cache > a download.
* ``random-proj`` needs no weights: a seeded Gaussian projection of the 32×32 area-downsampled
  pixels to 256 dimensions — the "how aligned is this with raw pixels" floor and a test fixture.

The weights are part of every row's identity: :meth:`ReferenceSpec.row_version` appends the
fingerprint of the weights file a reference resolves to (its content, not its name or date:
:func:`raebench.metrics.extractors.fingerprint_path`) to the definition's version, so rows made
with other weights are never reused for these.

Every offline failure is one sentence naming the file and the flag that supplies it.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raebench.images import to_float
from raebench.errors import CheckpointError, RaebenchError
from raebench.registry import Registry
from raebench.weights import WeightsSource, resolve

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ReferenceSpec:
    """A reference encoder; nothing here loads weights. ``version`` enters every metric version."""

    name: str
    description: str
    version: str
    arch: str | None = None  # timm architecture (None: a weightless builtin)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: WeightsSource | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    extractor: str | None = None  # a raebench.metrics extractor, and the output used
    output: str = ""

    def row_version(self, weights_id: str | None) -> str:
        """The version that enters the rows: the definition's, and the fingerprint of the weights
        (None: a weightless builtin, whose definition is everything)."""
        return self.version if weights_id is None else f"{self.version}@weights:{weights_id}"

    def resolve_weights(self, weights: str | None = None):
        """The local file or folder of a timm reference's weights (``weights`` > cache > download)."""
        return resolve(self.weights, weights, what=f"Reference encoder {self.name!r}",
                       flag=f"--reference-weights {self.name}=PATH")

    def build(self, weights: str | None = None, device: torch.device | str = "cpu") -> "ReferenceEncoder":
        if self.extractor is not None:
            from raebench.metrics import EXTRACTORS

            try:
                ex = EXTRACTORS.get(self.extractor).builder(device=torch.device(device), outputs=(self.output,), weights=weights)
            except pickle.UnpicklingError:  # transformers' weights_only=True refusal of a pickled .bin
                raise CheckpointError(
                    f"Refused to load the weights of reference {self.name!r} ({weights or 'the cached copy'}): they contain "
                    "pickled objects other than tensors (possibly code); give a folder with model.safetensors."
                ) from None
            return ExtractorReference(ex, self.output)
        if self.arch is None:
            return RandomProjection().to(device).eval()
        path = self.resolve_weights(weights)
        model = _timm_from_file(self.arch, str(path), self.input_size, self.model_kwargs)
        return TimmReference(model, self, _fingerprint(path)).to(device).eval()


def _fingerprint(path) -> str:
    from raebench.metrics.extractors import fingerprint_path

    return fingerprint_path(path)


class ReferenceEncoder(nn.Module):
    """uint8 (N, 3, H, W) -> (N, D) float32 features; ``weights_id``: the fingerprint of the weights
    it loaded (None: weightless)."""

    weights_id: str | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _timm_from_file(arch: str, path: str, input_size: int, model_kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not path.endswith(".safetensors"):
        # timm also unpickles with weights_only=True, but reports a refused payload as a RuntimeError
        # that reads like a shape mismatch: check the file the project's way first (CheckpointError)
        from raebench.checkpoint import load_state

        load_state(path)
    try:
        return timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=0,
            img_size=input_size, **model_kwargs,
        )
    except (RuntimeError, KeyError, ValueError) as e:
        raise RaebenchError(f"The weights in {path!r} do not fit timm's {arch!r} ({type(e).__name__}: {str(e)[:120]}); pass the matching file with --reference-weights.") from None


class TimmReference(ReferenceEncoder):
    def __init__(self, model: nn.Module, spec: ReferenceSpec, weights_id: str) -> None:
        super().__init__()
        self.model = model
        self.weights_id = weights_id
        self.size = spec.input_size
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images.to(self.mean.device))
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        f = self.model.forward_features(x)
        return self.model.forward_head(f, pre_logits=True).float()  # (N, D)


class ExtractorReference(ReferenceEncoder):
    """One output of a metrics-package extractor (which owns its device and weights)."""

    def __init__(self, extractor, output: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.output = output
        self.weights_id = extractor.weights_id

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images)[self.output].float()


class RandomProjection(ReferenceEncoder):
    """Seeded Gaussian projection of 32×32 area-downsampled pixels to 256 dimensions."""

    side, dim, seed = 32, 256, 0

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(self.seed)
        d_in = 3 * self.side * self.side
        self.register_buffer("proj", torch.randn(d_in, self.dim, generator=g) / d_in**0.5, persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images.to(self.proj.device))
        x = F.interpolate(x, size=(self.side, self.side), mode="area")
        return x.flatten(1) @ self.proj  # (N, 256)


REFERENCES: Registry[ReferenceSpec] = Registry("reference")


def register_reference(spec: ReferenceSpec) -> ReferenceSpec:
    return REFERENCES.register(spec.name, spec)


def _extractor_version(name: str) -> str:
    from raebench.metrics import EXTRACTORS

    return f"extractor:{EXTRACTORS.get(name).version}"


def _timm_source(tag: str) -> WeightsSource:
    return WeightsSource(f"timm/{tag}", "model.safetensors", description=f"timm's {tag}")


for _spec in (
    ReferenceSpec(
        "dinov2-b", "DINOv2 ViT-B/14 (LVD-142M, timm) at 224 px, final-norm CLS token (768-d)",
        "dinov2-b-timm-lvd142m-224-cls-v1", arch="vit_base_patch14_dinov2.lvd142m",
        weights=_timm_source("vit_base_patch14_dinov2.lvd142m"),
    ),
    ReferenceSpec(
        "dinov2-l", "DINOv2 ViT-L/14 at 224 px, final-norm CLS (1024-d): the FD-DINOv2 extractor dinov2-l14",
        _extractor_version("dinov2-l14"), extractor="dinov2-l14", output="cls",
    ),
    ReferenceSpec(
        "clip-l", "CLIP ViT-L/14@336 projected embedding, L2-normalised (768-d): the CMMD extractor clip-l14-336",
        _extractor_version("clip-l14-336"), extractor="clip-l14-336", output="embed",
    ),
    ReferenceSpec(
        "clip-b", "OpenAI CLIP ViT-B/16 image tower at 224 px, final-norm CLS before projection (768-d)",
        "clip-b-timm-openai-224-cls-v1", arch="vit_base_patch16_clip_224.openai", mean=CLIP_MEAN, std=CLIP_STD,
        weights=_timm_source("vit_base_patch16_clip_224.openai"),
    ),
    ReferenceSpec(
        "random-proj", "Seeded Gaussian projection of 32x32 pixels to 256-d (weightless floor and test fixture)",
        "random-proj-32px-256d-seed0-v1",
    ),
):
    register_reference(_spec)


def build_reference(name: str, weights: str | None = None, device: torch.device | str = "cpu") -> tuple[ReferenceSpec, ReferenceEncoder]:
    spec = REFERENCES.get(name)
    return spec, spec.build(weights=weights, device=device)


def reference_identity(
    name: str, weights: str | None = None, device: torch.device | str = "cpu",
) -> tuple[ReferenceSpec, str | None, ReferenceEncoder | None]:
    """-> (spec, fingerprint of the weights it would load (None: weightless), the encoder if it had
    to be built to know them).

    The weights are resolved and fingerprinted without building the network (a timm file, or the
    metrics extractor's ``weights_path``), so a re-run whose rows are all stored loads nothing; an
    extractor that cannot say is built here and the caller keeps it for the pass.
    """
    from raebench.metrics import EXTRACTORS
    from raebench.metrics.extractors import fingerprint_path

    spec = REFERENCES.get(name)
    if spec.extractor is not None:
        locate = EXTRACTORS.get(spec.extractor).weights_path
        if locate is not None:
            return spec, fingerprint_path(locate(weights)), None
        enc = spec.build(weights=weights, device=device)
        return spec, enc.weights_id, enc
    if spec.arch is None:
        return spec, None, None
    return spec, _fingerprint(spec.resolve_weights(weights)), None
