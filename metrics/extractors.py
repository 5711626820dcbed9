"""Feature extractors shared by the distribution metrics, and how their weights are found.

Contract: an extractor maps uint8 (N, 3, H, W) RGB images to ``{output: (N, D) float32}``; the
evaluator runs each one once per image and hands the outputs to every metric that reads them.

* ``inception``: torch-fidelity's port of the TF Inception-v3 graph of the FID/ADM evaluators (TF1
  bilinear resize to 299, (x − 128) / 128). Outputs ``pool`` (pool_3, 2048-d; FID, KID, PR,
  density/coverage), ``logits`` (the 1008 logits without bias, torch-fidelity's IS input) and
  ``spatial`` (ADM's sFID features: ``mixed_6/conv`` = ``Mixed_6d.branch1x1`` after BN+ReLU, its
  first 7 channels flattened in TF's HWC order, 17·17·7 = 2023-d). Option ``dtype="float64"`` runs
  the network in float64 (torch-fidelity's ``feature_extractor_internal_dtype``).
* ``dinov2-l14``: DINOv2 ViT-L/14 CLS token after the final norm, at 224 px (FD-DINOv2 of EDM2 and
  dgm-eval). Loaded with transformers; the positional embedding is interpolated exactly as the
  torch.hub model that EDM2 loads does (bicubic by scale factor (16 + 0.1)/37, no antialias), not
  as transformers does (by size). Resize: ``torch`` (EDM2's default: bicubic with antialias on
  float 0..255) or ``pil`` (dgm-eval: PIL bicubic on uint8).
* ``clip-l14-336``: CLIP ViT-L/14@336 projected image embedding, L2-normalised (CMMD). The input
  of google-research's CMMD program (``io_util.py``): the largest centred square (offsets
  (h − l) // 2, (w − l) // 2), PIL bicubic to 336 on the uint8 image (clipped and rounded to uint8,
  as PIL returns it), / 255, CLIP mean/std. (Its ``embedding.py`` calls ``jax.image.resize`` again,
  but on images already at 336: the identity.)

Weights resolve like the tokenizers' (``raebench.weights``): an explicit path (the ``weights``
option, or ``RAEBENCH_<NAME>_WEIGHTS``) > the torch-hub or Hugging Face cache > a download; when
none works the error is one sentence naming the file and where to put it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from raebench.checkpoint import load_error_summary, load_state, read_json_object, strict_from_pretrained
from raebench.errors import CheckpointError, MissingWeightsError
from raebench.metrics.base import ExtractorSpec, register_extractor
from raebench.weights import WeightsSource, hf_offline, resolve


log = logging.getLogger(__name__)

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def weights_env(name: str) -> str:
    """The environment variable that points at local weights for extractor/metric ``name``."""
    return "RAEBENCH_" + name.upper().replace("-", "_").replace(".", "_") + "_WEIGHTS"


def local_weights(name: str, given: str | os.PathLike | None) -> str | None:
    """The explicit weights path: the option if given, else the environment variable, else None."""
    return str(given) if given else os.environ.get(weights_env(name)) or None


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_url_file(url: str, local: str | None, *, what: str, env: str) -> Path:
    """A weights file published at ``url``: local path > ``$TORCH_HOME/hub/checkpoints`` > download.

    ``HF_HUB_OFFLINE=1`` also means "no download" here (one switch for every loader).
    """
    if local:
        p = Path(local).expanduser()
        if not p.is_file():
            raise MissingWeightsError(f"{what}: the weights file {str(p)!r} (given with --option NAME.weights=FILE "
                                      f"or {env}) does not exist.")
        return p
    name = url.rsplit("/", 1)[-1]
    cache = torch_hub_checkpoints()
    if (cache / name).is_file():
        return cache / name
    reason = "HF_HUB_OFFLINE=1 forbids downloads"
    if not hf_offline():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cache / name), progress=False)  # writes a temp file, then renames
            return cache / name
        except Exception as e:  # every download failure becomes one sentence
            reason = f"the download failed ({type(e).__name__})"
    raise MissingWeightsError(
        f"{what} weights not found: {name!r} is not in {cache} and {reason}; download {url} into that folder "
        f"(set TORCH_HOME to move it) or pass a local copy with {env}=FILE."
    )


def fingerprint_path(path: str | os.PathLike, patterns: tuple[str, ...] | None = None) -> str:
    """The identity of a weights file or folder: sha256 over each file's relative name, size and
    whole content (:func:`content_digest`), 12 hex digits. A file's own name does not count: the same
    weights under another name are the same weights. Reading a 1.2 GB checkpoint costs about a
    second, once: digests are cached by file identity (see :func:`content_digest`).

    ``patterns`` (a folder's): only the files whose relative path matches one (``fnmatch``), e.g. the
    files a loader reads, so that a Hub snapshot and a copy holding other files too (a README, a
    ``.bin`` beside the safetensors) are the same weights; a folder of exactly those files has the
    identity it has without ``patterns``."""
    import fnmatch

    p = Path(path)
    # files under dot-folders are tool metadata (`hf download --local-dir` writes .cache/huggingface/...,
    # with timestamps): the same weights must not get another identity for them
    files = (sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
             if p.is_dir() else [p])
    if patterns is not None and p.is_dir():
        files = [f for f in files if any(fnmatch.fnmatch(f.relative_to(p).as_posix(), pat) for pat in patterns)]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if p.is_dir() else ''}\0{size}\n".encode())
        if f.suffix in (".lock", ".md") or f.name.startswith("."):
            continue
        h.update(bytes.fromhex(content_digest(f)))
    return h.hexdigest()[:12]


def fingerprint_data_file(path: str | os.PathLike) -> str:
    """A cheap identity of a large data file (an ``.npz`` of 50k samples is 10-40 GB, read by every
    rank of a torchrun): its size and its first and last MiB, 12 hex digits. Two image sets of one
    size differ within their first images; hashing all of a 39 GB file would cost ~30 s per rank.
    (Weights, where a fine-tune may change only middle tensors, use :func:`fingerprint_path`.)"""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(f"\0{size}\n".encode())
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


_DIGESTS: dict[str, str] = {}  # this process's view of the digest cache
_DIGEST_CACHE_ENTRIES = 5000


def _digest_cache_file() -> Path:
    from raebench.metrics.cache import raebench_cache

    return raebench_cache() / "digests.json"


def _digest_key(f: Path, st: os.stat_result | None = None) -> str:
    """A file version's identity in the digest cache: resolved path, device, inode, size, mtime, ctime."""
    st = st or f.stat()
    return f"{os.path.realpath(f)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


#: seconds a job waits for another one fingerprinting the same new file before hashing it itself
#: (``$RAEBENCH_DIGEST_WAIT_S``): the lock only saves work, so a holder that hangs (a stalled mount, a
#: stopped job) must not stall every other job; 10 minutes hash ~60 GB at 100 MB/s
DIGEST_WAIT_S = 600.0
#: seconds between the lines that say a job is still waiting for that lock
DIGEST_WAIT_LINE_S = 15.0


def _digest_wait_s() -> float:
    text = os.environ.get("RAEBENCH_DIGEST_WAIT_S", "")
    try:
        return max(0.0, float(text)) if text.strip() else DIGEST_WAIT_S
    except ValueError:
        log.warning("RAEBENCH_DIGEST_WAIT_S=%r is not a number of seconds; using %g", text, DIGEST_WAIT_S)
        return DIGEST_WAIT_S


@contextlib.contextmanager
def _digest_lock(cache_file: Path, what: str = "a weights file"):
    """An exclusive lock on ``<cache>.lock`` while one process hashes (released by the kernel even on
    SIGKILL); where the cache folder cannot hold one (read-only, no flock), no lock. Waiting for another
    holder logs a line every :data:`DIGEST_WAIT_LINE_S` and ends after ``$RAEBENCH_DIGEST_WAIT_S``
    (:data:`DIGEST_WAIT_S`): then this process hashes ``what`` itself, unlocked (the cache's writes are
    atomic, so two hashers cost only time)."""
    import fcntl
    import time

    from raebench.locks import HELD_ERRNOS

    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fh = open(cache_file.with_name(cache_file.name + ".lock"), "a")
    except OSError:
        yield
        return
    with fh:
        start = time.monotonic()
        wait_s, next_line = _digest_wait_s(), start + DIGEST_WAIT_LINE_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in HELD_ERRNOS:
                    break  # the file system cannot lock: hash without
            now = time.monotonic()
            if now - start >= wait_s:
                log.warning("another process has held %s for %.0f s (RAEBENCH_DIGEST_WAIT_S) while fingerprinting; "
                            "fingerprinting %s here instead", fh.name, now - start, what)
                break
            if now >= next_line:
                log.info("waiting %.0f s for another process fingerprinting weights (lock %s) before "
                         "fingerprinting %s; at most %.0f s, then here", now - start, fh.name, what, wait_s)
                next_line += DIGEST_WAIT_LINE_S
            time.sleep(min(0.1, max(0.0, wait_s - (now - start))))
        yield


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's whole content, hex. An earlier identity read only the first and last MiB,
    so a fine-tune that changed only middle tensors (same size, same safetensors header) kept the
    identity of the original and stored results were reused for other weights.

    Digests are cached in ``$RAEBENCH_CACHE/digests.json`` (default ``~/.cache/raebench``) under the
    file's resolved path, device, inode, size and modification and change times: writing to a file
    changes its ctime, which no tool can set back, and a copy is another inode, so a stale digest is
    never served. The cache is written atomically and read leniently (an unreadable cache only
    means hashing again); concurrent writers may drop each other's new entries, never corrupt them."""
    import json

    from raebench.results import atomic_write_bytes

    f = Path(path)
    st = f.stat()
    key = _digest_key(f, st)
    if key in _DIGESTS:
        return _DIGESTS[key]
    cache_file = _digest_cache_file()

    def cached() -> tuple[dict, str | None]:
        try:
            stored = json.loads(cache_file.read_text())
            stored = stored if isinstance(stored, dict) else {}
        except (OSError, ValueError):
            stored = {}
        digest = stored.get(key)
        return stored, digest if isinstance(digest, str) and len(digest) == 64 else None

    stored, digest = cached()
    if digest is None:
        # one hasher at a time per cache: the ranks of a torchrun (or several jobs) asking for one new
        # file wait for the first, then read its digest instead of each reading the whole file again
        with _digest_lock(cache_file, f"{f.name} ({st.st_size / 1e9:.1f} GB)"):
            stored, digest = cached()
            if digest is None:
                if st.st_size > 256 << 20:
                    log.info("fingerprinting %s (%.1f GB; once: the digest is cached in %s)", f.name, st.st_size / 1e9,
                             cache_file)
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while chunk := fh.read(8 << 20):
                        h.update(chunk)
                digest = h.hexdigest()
                stored[key] = digest
                if len(stored) > _DIGEST_CACHE_ENTRIES:  # oldest entries first out (dicts keep insertion order)
                    stored = dict(list(stored.items())[-_DIGEST_CACHE_ENTRIES:])
                try:
                    atomic_write_bytes(cache_file, json.dumps(stored).encode())
                except OSError as e:  # a read-only home only costs hashing again next time
                    log.debug("digest cache %s not written: %s", cache_file, e)
    _DIGESTS[key] = digest
    return digest


@contextlib.contextmanager
def full_fp32():
    """Disable TF32 inside: PyTorch lets cuDNN convolutions use it by default on Ampere and later GPUs,
    which changes features far beyond float32 rounding; the reference evaluators compute in fp32."""
    from raebench.tf32 import tf32

    with tf32(False):
        yield


class Extractor:
    """Base of the extractors: ``__call__(uint8 NCHW) -> {output: (N, D) float32}`` (no grad)."""

    spec: ExtractorSpec
    variant: str = ""

    def __init__(self, spec: ExtractorSpec, device: torch.device, outputs: tuple[str, ...], weights_path: Path):
        self.spec = spec
        self.device = torch.device(device)
        self.outputs = tuple(outputs) or spec.outputs
        bad = set(self.outputs) - set(spec.outputs)
        if bad:
            raise ValueError(f"extractor {spec.name!r} has no output(s) {sorted(bad)}; it has {spec.outputs}")
        self.weights_path = Path(weights_path)
        self.weights_id = fingerprint_path(weights_path)

    @property
    def identity(self) -> str:
        return f"{self.spec.version}|{self.variant}|weights={self.weights_id}"

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.spec.name} expects uint8 (N, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        with torch.no_grad(), full_fp32():
            out = self.forward(x.to(self.device))
        return {k: v.to(torch.float32) for k, v in out.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Inception (torch-fidelity)
# ---------------------------------------------------------------------------------------------


class InceptionExtractor(Extractor):
    @staticmethod
    def variant_of(dtype: str = "float32", **_) -> str:
        """The variant string these options give (without building the network)."""
        return "" if dtype == "float32" else f"dtype={dtype}"

    @staticmethod
    def resolve_weights(weights: str | None = None) -> Path:
        """The file this extractor would load (local option > env > cache > download), unbuilt."""
        return resolve_url_file(INCEPTION_URL, local_weights("inception", weights),
                                what="Inception-v3 (FID/KID/IS)", env=weights_env("inception"))

    def __init__(self, spec, device, outputs=(), weights: str | None = None, dtype: str = "float32"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if dtype not in ("float32", "float64"):
            raise ValueError(f"inception dtype must be float32 or float64, got {dtype!r}")
        path = self.resolve_weights(weights)
        super().__init__(spec, device, outputs, path)
        # torch-fidelity's constructor unpickles the file with weights_only=False: vet it safely first
        state = load_state(path)
        if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise CheckpointError(f"{str(path)!r} is not torch-fidelity's Inception state dict "
                                  f"(weights-inception-2015-12-05-6726825d.pth).")
        del state
        self.variant = self.variant_of(dtype=dtype)
        layers = ["2048"] + (["logits_unbiased"] if "logits" in self.outputs else [])
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", layers, feature_extractor_weights_path=str(path),
                                              feature_extractor_internal_dtype=dtype)
        except RuntimeError as e:  # its strict load_state_dict: missing, unused or mis-shaped keys
            raise CheckpointError(f"{str(path)!r} does not fit torch-fidelity's Inception-v3: {load_error_summary(e)}.") from None
        if dtype == "float64":
            # torch-fidelity's text_to_dtype maps "float64" to torch.float32 (0.4.0 and upstream), so its
            # own option runs in float32; set the network and its input conversion to float64 here
            net.feature_extractor_internal_dtype = torch.float64
            net = net.double()
        # Same network, faster: batch norms folded into the convolutions (in float64) and channels-last
        # layout (oneDNN/cuDNN); features differ from torch-fidelity's by float rounding only (~1e-6).
        self.net = fold_batch_norms(net).to(self.device).to(memory_format=torch.channels_last)
        self._spatial: list[torch.Tensor] = []
        if "spatial" in self.outputs:  # ADM's mixed_6/conv:0 is the output of Mixed_6d's 1x1 branch (conv+BN+ReLU)
            self.net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: self._spatial.append(out))

    def forward(self, x):
        self._spatial.clear()
        feats = self.net(x)  # tuple in the order of ``layers``
        out = {"pool": feats[0]}  # (N, 2048)
        if "logits" in self.outputs:
            out["logits"] = feats[1]  # (N, 1008)
        if "spatial" in self.outputs:
            s = self._spatial.pop()  # (N, 192, 17, 17)
            out["spatial"] = s[:, :7].permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # (N, 17*17*7) in HWC order
        return {k: v for k, v in out.items() if k in self.outputs}


def fold_batch_norms(net: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode ``BasicConv2d``'s BatchNorm into its convolution, in place:
    W' = W·γ/sqrt(σ² + ε), b' = β − μ·γ/sqrt(σ² + ε), computed in float64."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    for m in net.modules():
        if isinstance(m, BasicConv2d) and isinstance(m.bn, torch.nn.BatchNorm2d):
            conv, bn = m.conv, m.bn
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (C_out,)
            fused = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                    bias=True, dtype=conv.weight.dtype, device=conv.weight.device)
            fused.weight.data = (conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
            fused.bias.data = (bn.bias.double() - bn.running_mean.double() * scale).to(conv.weight.dtype)
            m.conv, m.bn = fused.requires_grad_(False), torch.nn.Identity()
    return net


# ---------------------------------------------------------------------------------------------
# DINOv2 ViT-L/14 (transformers)
# ---------------------------------------------------------------------------------------------


def _hub_interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINOv2's torch.hub interpolation (scale factor (n + 0.1) / M, bicubic, no antialias), bound
    to a transformers ``Dinov2Embeddings``; transformers resizes by size, which differs slightly."""
    import math

    pos = self.position_embeddings
    num_patches, num_positions = embeddings.shape[1] - 1, pos.shape[1] - 1
    if num_patches == num_positions and height == width:
        return pos
    pos = pos.float()
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    dim = embeddings.shape[-1]
    p = self.patch_embeddings.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else p
    h0, w0 = height // p + 0.1, width // p + 0.1
    m = int(math.sqrt(num_positions))
    patch_pos = F.interpolate(
        patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2),  # (1, D, M, M)
        scale_factor=(float(h0 / m), float(w0 / m)), mode="bicubic",
    )
    assert patch_pos.shape[-2:] == (int(h0), int(w0))
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((cls_pos, patch_pos), dim=1).to(embeddings.dtype)


class DinoV2Extractor(Extractor):
    @staticmethod
    def variant_of(resize: str = "torch", **_) -> str:
        return "" if resize == "torch" else f"resize={resize}"

    SIZE = 224

    @staticmethod
    def resolve_weights(weights: str | None = None) -> Path:
        """The folder this extractor would load (local option > env > Hub cache > download), unbuilt."""
        src = WeightsSource("facebook/dinov2-large", allow_patterns=("config.json", "model.safetensors"))
        return resolve(src, local_weights("dinov2-l14", weights), what="DINOv2 ViT-L/14 (FD-DINOv2)",
                       flag=weights_env("dinov2-l14"))

    def __init__(self, spec, device, outputs=(), weights: str | None = None, resize: str = "torch"):
        import types

        from transformers import Dinov2Model

        if resize not in ("torch", "pil"):
            raise ValueError(f"dinov2 resize must be 'torch' (EDM2) or 'pil' (dgm-eval), got {resize!r}")
        path = self.resolve_weights(weights)
        super().__init__(spec, device, outputs, path)
        self.resize = resize
        self.variant = self.variant_of(resize=resize)
        self.model = _load_hf_vision(Dinov2Model, path, ("dinov2",), "DINOv2 ViT-L/14 (FD-DINOv2)",
                                     {"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14}).to(self.device)
        emb = self.model.embeddings
        emb.interpolate_pos_encoding = types.MethodType(_hub_interpolate_pos_encoding, emb)

    def forward(self, x):
        x = resize_images(x, self.SIZE, self.resize)  # (N, 3, 224, 224) float 0..255
        x = x / 255.0
        x = (x - _const(IMAGENET_MEAN, x)) / _const(IMAGENET_STD, x)
        return {"cls": self.model(pixel_values=x).pooler_output}  # (N, 1024): CLS after the final norm


# ---------------------------------------------------------------------------------------------
# CLIP ViT-L/14@336 (transformers)
# ---------------------------------------------------------------------------------------------


class ClipExtractor(Extractor):
    @staticmethod
    def resolve_weights(weights: str | None = None) -> Path:
        """The folder this extractor would load (local option > env > Hub cache > download), unbuilt."""
        src = WeightsSource("openai/clip-vit-large-patch14-336",
                            allow_patterns=("config.json", "model.safetensors", "pytorch_model.bin"))
        return resolve(src, local_weights("clip-l14-336", weights), what="CLIP ViT-L/14@336 (CMMD)",
                       flag=weights_env("clip-l14-336"))

    def __init__(self, spec, device, outputs=(), weights: str | None = None):
        from transformers import CLIPVisionModelWithProjection

        path = self.resolve_weights(weights)
        super().__init__(spec, device, outputs, path)
        self.model = _load_hf_vision(CLIPVisionModelWithProjection, path, ("clip", "clip_vision_model"),
                                     "CLIP ViT-L/14@336 (CMMD)",
                                     {"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14, "image_size": 336},
                                     unused_ok=("text_model.", "text_projection.", "logit_scale")).to(self.device)
        self.size = int(self.model.config.image_size)

    def forward(self, x):
        x = resize_images(center_square(x), self.size, "pil") / 255.0  # (N, 3, S, S): the official reader's input
        x = (x - _const(CLIP_MEAN, x)) / _const(CLIP_STD, x)
        e = self.model(pixel_values=x).image_embeds.double()  # (N, 768)
        return {"embed": e / e.norm(dim=-1, keepdim=True)}


# ---------------------------------------------------------------------------------------------
# Helpers and registration
# ---------------------------------------------------------------------------------------------


def _load_hf_vision(cls, path, model_types: tuple[str, ...], what: str, arch: dict[str, int],
                    unused_ok: tuple[str, ...] = ()) -> torch.nn.Module:
    """A transformers vision model from a local folder, strictly (every weight loads; only the text
    tower of a full CLIP checkpoint may go unused). A folder of another model type is refused; one of
    another size is loaded with a warning, since its numbers are not the named metric's."""
    cfg = read_json_object(Path(path) / "config.json")
    if cfg.get("model_type") not in model_types:
        raise CheckpointError(f"{str(path)!r} holds a {cfg.get('model_type')!r} model, not {what} "
                              f"(model_type {' or '.join(model_types)}).")
    vision = cfg.get("vision_config", cfg) if cfg.get("model_type") == "clip" else cfg
    other = {k: vision.get(k) for k, v in arch.items() if vision.get(k, v) != v}
    if other:
        log.warning("%s: %r is not the model this metric is defined with (%s instead of %s); its numbers are not "
                    "comparable with published ones.", what, str(path), other, {k: arch[k] for k in other})
    model = strict_from_pretrained(cls, path, what=what, unexpected_ok=lambda key: key.startswith(unused_ok))
    return model.eval().requires_grad_(False)


def _const(v: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def center_square(x: torch.Tensor) -> torch.Tensor:
    """The largest centred square of (N, C, H, W) images, as the CMMD reader crops (offsets
    (H − l) // 2 and (W − l) // 2 with l = min(H, W)); square images come back as they are."""
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return x[..., top:top + side, left:left + side]


def resize_images(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, size, size) in 0..255.

    ``torch``: bicubic with antialias on floats (Keys a = −0.5, PIL-like support scaling; EDM2's
    fast path). ``pil``: PIL bicubic on each uint8 image, rounded to uint8 as PIL returns it.
    """
    if mode == "pil":
        import numpy as np
        from PIL import Image

        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([np.asarray(Image.fromarray(a, "RGB").resize((size, size), Image.Resampling.BICUBIC)) for a in arr])
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, torch.float32)
    return F.interpolate(x.to(torch.float32), size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def _register(cls, **fields) -> None:
    spec = ExtractorSpec(builder=None, **fields)
    build = lambda device, outputs=(), **options: cls(spec, device, outputs, **options)
    register_extractor(replace(spec, builder=build, weights_path=cls.resolve_weights,
                               variant_of=getattr(cls, "variant_of", None)))


_register(InceptionExtractor, name="inception", version="tfinception-torchfidelity-v1",
          description="TF Inception-v3 (torch-fidelity port): pool3, logits, mixed_6/conv",
          outputs=("pool", "logits", "spatial"), options=("weights", "dtype"),
          option_choices=(("dtype", ("float32", "float64")),),
          dims=(("pool", 2048), ("logits", 1008), ("spatial", 17 * 17 * 7)))
_register(DinoV2Extractor, name="dinov2-l14", version="dinov2-vitl14-cls-224-hubpos-v1",
          description="DINOv2 ViT-L/14 CLS token at 224 px (torch.hub positional interpolation)",
          outputs=("cls",), options=("weights", "resize"), option_choices=(("resize", ("torch", "pil")),),
          dims=(("cls", 1024),))
# v1 resized the whole image (squashed when not square) with torch's antialiased bicubic on floats
_register(ClipExtractor, name="clip-l14-336", version="clip-vitl14-336-embed-l2-croppil-v2",
          description="CLIP ViT-L/14@336 projected image embedding, L2-normalised, of the centred square (PIL bicubic)",
          outputs=("embed",), options=("weights",), dims=(("embed", 768),))
