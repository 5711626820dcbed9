"""Stage-1 losses: L1 + LPIPS(VGG) reconstruction, hinge GAN, and the VQGAN adaptive weight.

Decoder loss (official RAE recipe, after VQGAN, Esser et al. 2021):

    L = L1(x_rec, x) + w_lpips * LPIPS(x_rec, x) + w_gan * lambda * L_gan
    lambda = clamp(||grad_W L_rec|| / (||grad_W L_gan|| + 1e-6), 0, 1e4),  W = the decoder's last layer

with L_rec = L1 + w_lpips * LPIPS, L_gan = -mean(D(x_rec)) and lambda treated as a constant. The
discriminator minimises the hinge loss 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))).

LPIPS is the ``lpips`` package's VGG variant on images in [-1, 1]; its linear layers ship in the
wheel, and its VGG16 backbone is resolved offline-safely (see :func:`build_lpips`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raebench import distributed
from raebench.errors import CheckpointError, MissingWeightsError
from raebench.weights import WeightsSource, resolve

log = logging.getLogger(__name__)

#: torchvision's VGG16 file, which ``lpips`` would download into the torch hub cache
TORCHVISION_VGG16 = "vgg16-397923af.pth"
#: the same weights on the Hugging Face Hub (timm's copy; ``features.*`` keys are torchvision's)
VGG16_SOURCE = WeightsSource("timm/vgg16.tv_in1k", filename="model.safetensors", description="LPIPS VGG16 backbone")


def _torch_hub_vgg16() -> Path | None:
    p = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16
    return p if p.is_file() else None


def build_lpips(weights: str | os.PathLike | None = None) -> nn.Module:
    """Frozen LPIPS-VGG in eval mode: ``lpips(x, y)`` on [-1, 1] images -> (N, 1, 1, 1).

    The VGG16 backbone comes from ``weights`` (a torchvision or timm VGG16 file), else torchvision's
    file in the torch hub cache, else ``timm/vgg16.tv_in1k`` through the Hugging Face cache (or a
    download); offline with none of them, a one-sentence :class:`MissingWeightsError`.
    ``weights="random"`` keeps a random backbone (``pnet_rand``; tests only).
    """
    import lpips

    # built on the meta device: torchvision's vgg16() would allocate and initialise its 120M-parameter
    # classifier, which LPIPS never uses; real tensors come from the files below
    with warnings.catch_warnings(), torch.device("meta"):  # lpips passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    model = model.to_empty(device="cpu")
    model.scaling_layer = lpips.lpips.ScalingLayer()  # its constant shift/scale buffers
    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"  # ships in the wheel
    lin_sd = torch.load(lin, map_location="cpu", weights_only=True)
    missing = set(k for k in model.state_dict() if k[:3] == "lin" and k[3].isdigit()) - set(lin_sd)  # lin0..lin4
    if missing:
        raise CheckpointError(f"lpips' packaged {lin} lacks {sorted(missing)[:3]}; reinstall lpips.")
    model.load_state_dict(lin_sd, strict=False)
    if weights != "random":
        if weights is None and _torch_hub_vgg16() is not None:
            path = _torch_hub_vgg16()
        else:
            try:
                path = resolve(None if weights else VGG16_SOURCE, weights, what="LPIPS VGG16 backbone",
                               flag="--set lpips_weights=FILE")
            except MissingWeightsError as e:
                raise MissingWeightsError(
                    f"{e} (torchvision's {TORCHVISION_VGG16} in {torch.hub.get_dir()}/checkpoints works too.)"
                ) from None
        _load_vgg_features(model.net, path)
    else:
        if distributed.is_main():  # every rank builds it alike: said once under torchrun
            log.warning("LPIPS backbone has random weights (lpips_weights=random): for tests only")
        with torch.random.fork_rng(devices=[]):  # the same random backbone in every process and run
            torch.manual_seed(0)
            for m in model.net.modules():
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()
    return model.eval().requires_grad_(False)


def _load_vgg_features(net: nn.Module, path: str | os.PathLike) -> None:
    """Copy VGG16 ``features.{i}`` weights into lpips' ``slice{k}.{i}`` modules, strictly."""
    from raebench.checkpoint import load_state

    sd = load_state(path)
    feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    own = {}
    for name, t in net.state_dict().items():  # "slice2.5.weight" -> "5.weight"
        own[name.split(".", 1)[1]] = (name, t)
    missing = sorted(set(own) - set(feats))
    bad = [k for k in set(own) & set(feats) if own[k][1].shape != feats[k].shape]
    if missing or bad:
        raise CheckpointError(
            f"{str(path)!r} is not a VGG16 checkpoint (missing {missing[:3]}, shape mismatches {bad[:3]}); "
            f"give torchvision's {TORCHVISION_VGG16} or timm's vgg16.tv_in1k model.safetensors."
        )
    net.load_state_dict({name: feats[k] for k, (name, _) in own.items()})


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The official ``vanilla_g_loss``: -mean(D(x_rec))."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||grad L_rec|| / (||grad L_gan|| + 1e-6) on ``last_layer``, clamped to [0, max_weight], detached.

    The definition (as the official trainer computes it); training uses :func:`adaptive_gan_backward`,
    which gives the same weight and gradients with fewer backward passes.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = g_rec.float().norm() / (g_gan.float().norm() + 1e-6)
    return w.clamp(0.0, max_weight).detach()


class LastLayerTap:
    """Keeps the input ``h`` and output ``out`` of a linear layer from its latest forward (a forward hook)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.inp: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.inp, self.out = args[0], output


def adaptive_gan_backward(rec_loss: torch.Tensor, gan_loss: torch.Tensor, tap: LastLayerTap, gan_weight: float,
                          max_weight: float = 1e4, scale: float = 1.0) -> torch.Tensor:
    """Backward of ``scale * (rec_loss + gan_weight * lambda * gan_loss)``; returns lambda (:func:`adaptive_weight`).

    For the last layer out = h W^T + b, grad_W L = (dL/dout)^T h summed over tokens, so both
    last-layer gradients follow from dL/dout: LPIPS and the discriminator are traversed once each
    (the official code traverses them twice), and the decoder below ``out`` once, with the combined
    output gradient. Every loss must reach the decoder's parameters only through ``tap.out``.
    """
    g_rec = torch.autograd.grad(rec_loss, tap.out, retain_graph=True)[0]  # (N, T, O)
    g_gan = torch.autograd.grad(gan_loss, tap.out)[0]
    h = tap.inp.detach().float().reshape(-1, tap.inp.shape[-1])  # (N*T, D)
    w_rec = g_rec.float().reshape(-1, g_rec.shape[-1]).T @ h  # (O, D) = grad_W L_rec
    w_gan = g_gan.float().reshape(-1, g_gan.shape[-1]).T @ h
    lam = (w_rec.norm() / (w_gan.norm() + 1e-6)).clamp(0.0, max_weight)
    out, tap.inp, tap.out = tap.out, None, None  # drop the references before the next forward
    out.backward(((g_rec.float() + gan_weight * lam * g_gan.float()) * scale).to(out.dtype))
    return lam
