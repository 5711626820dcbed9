"""Image data by name: the dataset registry (:class:`DatasetSpec`, ``DATASETS``), the embedded
default set (photographs bundled with scikit-image) and :func:`resolve_data`, which turns ``--data DIR``
/ ``--dataset NAME`` into the images an evaluation runs on (:class:`ResolvedData`).

Contract: datasets yield uint8 NCHW RGB tensors at the requested resolution (the boundary format;
metrics and tokenizers convert from it with :func:`to_float`). Bad files never stop a run: they are
skipped, counted and listed with a reason (``Skip``), and an empty result is a clear error.

Order is deterministic: files are sorted by their path relative to the root (``--limit N`` takes a
seeded random subset, then keeps sorted order), so the same folder gives the same images on every
machine and every rank.

The parts live in :mod:`raebench.images` (conversions, reading one file, crops),
:mod:`raebench.folders` (listing a folder, fingerprint, subsets) and :mod:`raebench.loaders` (batches).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raebench.errors import DataError
from raebench.folders import IMAGE_EXTENSIONS, ImageList, scan_folder, subset
from raebench.images import to_float, to_uint8
from raebench.registry import Registry

log = logging.getLogger(__name__)

# to_float and to_uint8 (raebench.images) are public here too: README and the metrics' error sentences
# name them as raebench.data.to_uint8
__all__ = ["DATASETS", "DEFAULT_DATASET", "SKIMAGE_IMAGES", "DatasetSpec", "ResolvedData", "resolve_data",
           "to_float", "to_uint8"]


# ---------------------------------------------------------------------------------------------
# Named datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: where it lives, its layout and domain tag. Nothing is read at import."""

    name: str
    domain: str  # "in-domain" (ImageNet, what the tokenizers were trained on) or "open-domain"
    description: str
    split: str = "val"
    layout: str = ""  # what the user's folder should look like
    expected_n: int | None = None
    env_var: str | None = None  # where users point to their copy
    resolve_root: Callable[[], tuple[str, list[str] | None]] | None = None  # embedded sets
    aliases: tuple[str, ...] = ()

    def root(self, override: str | None = None) -> tuple[str, list[str] | None]:
        if override and self.resolve_root is not None:  # the rows would name the folder's images after this set
            raise DataError(f"Dataset {self.name!r} is bundled, so --data {override!r} cannot be a copy of it; drop "
                            f"--dataset to evaluate that folder as itself.")
        if override:
            return override, None
        if self.resolve_root is not None:
            return self.resolve_root()
        if self.env_var and os.environ.get(self.env_var):
            return os.environ[self.env_var], None
        raise DataError(
            f"Dataset {self.name!r} is not bundled: download it ({self.layout}) and pass its folder "
            f"with --dataset {self.name} --data DIR" + (f" or set {self.env_var}." if self.env_var else ".")
        )


DATASETS: Registry[DatasetSpec] = Registry("dataset")

#: Real photographs bundled with scikit-image (public domain / CC0 per scikit-image's data
#: documentation), chosen to span portraits, animals, food, astronomy, microscopy, medical, text and
#: textures: a small open-domain default that runs offline.
SKIMAGE_IMAGES = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "color.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "page.png", "retina.jpg", "rocket.jpg", "text.png",
)


def _skimage_root() -> tuple[str, list[str]]:
    import skimage

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    present = [f for f in SKIMAGE_IMAGES if os.path.exists(os.path.join(root, f))]
    if not present:
        raise DataError("The embedded default images were not found in scikit-image's data folder; reinstall scikit-image.")
    return root, present


DEFAULT_DATASET = "skimage-photos"

for _spec in (
    DatasetSpec(
        DEFAULT_DATASET, "open-domain",
        f"{len(SKIMAGE_IMAGES)} real photographs bundled with scikit-image (the embedded default)",
        split="all", resolve_root=_skimage_root, aliases=("default",),
    ),
    DatasetSpec(
        "imagenet-val", "in-domain", "ImageNet-1k validation, 50,000 images, ADM center crop",
        layout="ILSVRC2012 val as class subfolders (n01440764/ILSVRC2012_val_00000293.JPEG, ...)",
        expected_n=50_000, env_var="RAEBENCH_IMAGENET_VAL",
    ),
    DatasetSpec(
        "coco-val2017", "open-domain", "COCO val2017, 5,000 images (the SD-VAE card's protocol)",
        layout="the val2017/ folder of flat JPEGs", expected_n=5_000, env_var="RAEBENCH_COCO_VAL2017",
    ),
    DatasetSpec(
        "div2k-val", "open-domain", "DIV2K validation HR, 100 high-resolution photographs",
        layout="DIV2K_valid_HR/ with 0801.png ... 0900.png", expected_n=100, env_var="RAEBENCH_DIV2K_VAL",
    ),
    DatasetSpec(
        "ffhq-val", "open-domain", "faces: any FFHQ/CelebA-HQ subset, flat folder of PNG/JPEG",
        layout="a flat folder of face images", env_var="RAEBENCH_FACES",
    ),
    DatasetSpec(
        "text-images", "open-domain", "text-rich images (documents, signs, screenshots)",
        layout="a flat folder of images containing text", env_var="RAEBENCH_TEXT_IMAGES",
    ),
):
    DATASETS.register(_spec.name, _spec, aliases=_spec.aliases)


@dataclass
class ResolvedData:
    """What an evaluation runs on: the image list plus the identity recorded in results."""

    name: str
    domain: str
    split: str
    images: ImageList
    sampled: bool = False  # a --limit subset was drawn (fewer images than the folder holds)

    @property
    def n(self) -> int:
        return len(self.images.paths)

    def seed_of(self, seed: int) -> int:
        """The seed that chose these images: ``seed`` for a --limit subset, else 0 (all images, whatever
        the seed), so rows of the same images are never split by a seed that changed nothing."""
        return seed if self.sampled else 0


def resolve_data(
    data: str | None = None,
    dataset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    domain: str | None = None,
) -> ResolvedData:
    """Turn ``--data DIR`` / ``--dataset NAME`` (neither: the embedded default) into images.

    A folder given with --data is named after its last path component and tagged open-domain
    unless ``domain`` says otherwise; with --dataset NAME plus --data DIR the folder is that
    named dataset's copy (e.g. ``--dataset imagenet-val --data /data/imagenet/val``).
    """
    if dataset is None and data is None:
        dataset = DEFAULT_DATASET
    if dataset is not None:
        spec = DATASETS.get(dataset)
        root, paths = spec.root(data)
        name, dom, split = spec.name, domain or spec.domain, spec.split
    else:
        root, paths = str(data), None
        name = Path(str(data)).expanduser().resolve().name or "data"
        name = "".join(c if c.isalnum() or c in "-._" else "-" for c in name.lower())
        dom, split = domain or "open-domain", "all"
    found = scan_folder(root, paths)
    images = subset(found, limit, seed)
    if not images.paths:
        raise DataError(f"No image files (by extension: {', '.join(sorted(IMAGE_EXTENSIONS))}) under {root!r}.")
    sampled = len(images.paths) < len(found.paths)
    if limit is not None and not sampled:
        log.warning("--limit %d is not below the %d images of %s: all of them are used", limit, len(found.paths), name)
    return ResolvedData(name, dom, split, images, sampled)
