"""Input checks shared by ``eval``, ``score``, ``compare`` and ``analyze``: sizes, batch sizes and
image counts that cannot work are one sentence before any data is read or any model loads."""

from __future__ import annotations

from raebench.errors import RaebenchError


#: the largest --resolution accepted (one 16384² image is 3.2 GB as float32; registered tokenizers are native at 256 or 512)
MAX_RESOLUTION = 16384


def check_sizes(batch_size: int, resolution: int | None, metrics: tuple[str, ...] = (), image_side: int | None = None,
                resizable: bool = True) -> None:
    """Batch size, resolution and the smallest image each metric accepts (``image_side``: the short
    side of images read as they are), checked before any work. ``resizable=False``: the images
    cannot be cropped (an ``.npz``), so the advice is not --resolution."""
    if batch_size < 1:
        raise RaebenchError(f"--batch-size must be at least 1, got {batch_size}.")
    if resolution is not None and resolution < 1:
        raise RaebenchError(f"--resolution must be a positive number of pixels, got {resolution}.")
    if resolution is not None and resolution > MAX_RESOLUTION:  # else a typo ends in an out-of-memory kill mid-run
        raise RaebenchError(f"--resolution {resolution} is above {MAX_RESOLUTION} px (one such image alone takes "
                            f"{3 * 4 * resolution ** 2 / 1e9:.0f} GB as float32); no tokenizer here is meant for that.")
    side = resolution if image_side is None else image_side
    what = f"--resolution {resolution} is smaller" if image_side is None else f"these images have {image_side}"
    for m in metrics if side is not None else ():
        need = min_image_side(m)
        if side < need:
            fix = (f"use --resolution {need} or more, or drop {m}" if resizable else
                   f"an .npz cannot be resized: drop {m}, or write the images at {need} px or more")
            raise RaebenchError(f"{m} needs images of at least {need} px on the short side, and {what} ({fix}).")


def min_image_side(metric: str) -> int:
    """The smallest image side ``metric`` accepts (1 when any size works): SSIM's 11-tap Gaussian
    window must fit (MS-SSIM's after four halvings), and LPIPS's backbone must reach its last layer.
    The extractor metrics (Inception, DINOv2, CLIP) and DreamSim resize every image first."""
    from raebench.metrics import METRICS

    return METRICS.get(metric).min_image_side


def check_image_counts(metrics: tuple[str, ...], n_references: int, n_candidates: int, *,
                       where: tuple[str, str] = ("the references", "the candidates"), stats: tuple[str, ...] = ()) -> None:
    """Refuse, before any model loads, a metric that needs more images on a side than it holds
    (``MetricSpec.min_images``; FID 2, precision 4, IS 10). ``where`` names the two sides in the
    message; ``stats``: keys of stored reference statistics, which stand in for reference images.
    Counts are of files: unreadable ones can still leave fewer, which the metric then reports."""
    from raebench.metrics import METRICS

    for m in dict.fromkeys(metrics):
        spec = METRICS.get(m)
        sides = []
        if spec.reads_references(stats):
            sides.append((where[0], n_references))
        if spec.candidate_inputs:
            sides.append((where[1], n_candidates))
        short = [(w, n) for w, n in sides if n < spec.min_images]
        if short:
            per = "on each side" if len(sides) > 1 else "to score"
            w, n = short[0]
            raise RaebenchError(f"{spec.name} needs at least {spec.min_images} images {per}, and there "
                                f"{'is' if n == 1 else 'are'} {n} in {w}; add images or drop {spec.name}.")


#: the domain tags results carry (a dataset's own tag is used when --domain is not given)
DOMAINS = ("in-domain", "open-domain")


def check_domain(domain: str | None) -> None:
    """``--domain``: one of :data:`DOMAINS` (or unset)."""
    if domain is not None and domain not in DOMAINS:
        raise RaebenchError(f"--domain takes {' or '.join(DOMAINS)}, not {domain!r}.")


def check_run(batch_size: int, resolution: int | None, precision: str, num_workers: int | None,
              metrics: tuple[str, ...] = ()) -> None:
    """The flags every data-parallel command shares: sizes (see :func:`check_sizes`), precision, workers."""
    check_sizes(batch_size, resolution, metrics)
    if precision not in ("fp32", "bf16"):
        raise RaebenchError(f"Unknown precision {precision!r}; use fp32 or bf16.")
    if num_workers is not None and num_workers < 0:
        raise RaebenchError(f"--num-workers must be 0 or more, got {num_workers}.")
