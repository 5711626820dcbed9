"""RAE commands: ``stats`` (exact latent statistics) and ``reconstruct`` (PNGs + ADM npz).

Both read images like ``raebench eval`` (``--data DIR`` / ``--dataset NAME``, ADM center crop at
``--resolution``) and shard them over ``torchrun`` ranks (contiguous slices, data order kept).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import typer

from raebench.errors import RaebenchError, mark_ranks, printable

log = logging.getLogger(__name__)

#: the skipped.csv reason of an image whose reconstruction holds NaN/Inf
NONFINITE_REASON = "its reconstruction contains NaN/Inf (left out of every output)"


# ---------------------------------------------------------------------------------------------
# Library functions behind the commands
# ---------------------------------------------------------------------------------------------


def _batches(data, resolution: int, batch_size: int, num_workers: int | None, device: torch.device, on_progress=None,
             skipped: list | None = None):
    """(indices, uint8 (N, 3, R, R) on ``device``, paths) for this rank's contiguous shard; unreadable
    files are logged and, if given, appended to ``skipped`` (as :class:`raebench.folders.Skip`)."""
    from raebench import distributed
    from raebench.loaders import ImageDataset, default_workers, make_loader
    from raebench.distributed import shard

    lo, hi = shard(data.n, *distributed.rank_world())
    loader = make_loader(ImageDataset(data.images, resolution), batch_size, default_workers(num_workers, device),
                         indices=range(lo, hi))
    done = 0
    for b in loader:
        done += b["image"].shape[0] + len(b["skipped"])
        for s in b["skipped"]:
            log.warning("skipped %s: %s", printable(s.path), s.reason)
        if skipped is not None:
            skipped.extend(b["skipped"])
        if b["image"].shape[0]:
            yield b["index"], b["image"].to(device), b["path"]
        if on_progress:
            on_progress(done, hi - lo)


def _stats_batch(fn, acc, x: torch.Tensor, paths: list[str], hflip: bool) -> str | None:
    """One batch of float images (and their mirrors with ``hflip``) into ``acc``; a batch whose latents hold
    NaN/Inf is not added, and the refusal naming its first such image is returned (None when all are finite)."""
    from raebench.rae.stats import add_batch

    found = add_batch(fn, acc, x, hflip)
    if found is None:
        return None
    bad, mirrored, _ = found
    return (f"The encoder gave NaN/Inf latents for {printable(str(paths[bad[0]]))}"
            f"{' (its mirror, --hflip)' if mirrored else ''}"
            f"{f' and {len(bad) - 1} other image(s) of its batch' if len(bad) > 1 else ''}, so the "
            "statistics would be NaN; stopped there and wrote nothing. Check the encoder's weights (a damaged "
            "or half-downloaded file gives NaN on every image) and its --resolution; if only some images do "
            "this, look at that one and leave such images out of --data.")


def feature_extractor(
    *,
    tokenizer: str | None = None,
    tokenizer_config: str | None = None,
    encoder: str | None = None,
    weights: str | None = None,
    resolution: int = 256,
    encoder_input_size: int | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The raw-feature function whose statistics ``raebench stats`` computes, and a label for it; an
    ``nn.Module`` in every case, on the CPU (the caller moves it to the images' device)."""
    if tokenizer_config:
        from raebench.official import from_official_config

        tok = from_official_config(tokenizer_config).tokenizer
        # the encoder module (tok.encode_features is tok.encoder(x)), which the caller moves to its device: the
        # bound method stayed on the CPU while the images went to the GPU
        return tok.encoder, Path(tokenizer_config).stem
    if tokenizer:
        from raebench.tokenizers import get_tokenizer_spec
        from raebench.tokenizers.rae import RELEASES, build_release_encoder

        spec = get_tokenizer_spec(tokenizer)
        if spec.name not in RELEASES:
            raise RaebenchError(f"{spec.name!r} is not an RAE tokenizer; latent statistics are computed for RAE encoders.")
        enc = build_release_encoder(RELEASES[spec.name], encoder=encoder, weights=weights, resolution=resolution)
        return enc, spec.name
    if encoder:
        from raebench.rae.encoders import build_encoder

        enc = build_encoder(encoder, input_size=encoder_input_size or resolution)
        return enc, encoder
    raise RaebenchError("Give --tokenizer NAME, --tokenizer-config official.yaml or --encoder NAME to compute statistics for.")


def write_reconstructions(tok, data, out: str | os.PathLike, **kw) -> dict:
    """Reconstruct ``data`` with ``tok`` into the folder ``out``; see :func:`_write_reconstructions`.

    One job per folder (:mod:`raebench.locks`). The folder is consistent at every moment: PNGs are
    staged in a hidden folder and moved into ``images/`` at the end, the npz files are written
    atomically, and ``files.csv`` (the index) is removed first and written last, so a folder
    without ``files.csv`` is an unfinished one and a killed run never mixes two runs' images.
    """
    from raebench.locks import exclusive

    out = Path(out)
    check_out_dir(out)
    with exclusive(out, "reconstruction job", "choose another --out"):
        return _write_reconstructions(tok, data, out, **kw)


def _write_reconstructions(
    tok,
    data,
    out: str | os.PathLike,
    *,
    resolution: int,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
    num_workers: int | None = None,
    png: bool = True,
    references: bool = False,
    precision: str = "fp32",
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Reconstruct ``data`` with ``tok``; write PNGs, ``reconstructions.npz`` (ADM: ``arr_0`` uint8 NHWC)
    and optionally ``references.npz`` (the cropped originals); unreadable files go to ``skipped.csv``
    (path, reason), and so do images whose reconstruction holds NaN/Inf (left out of every output,
    listed in the summary's ``nonfinite``). PNGs of an earlier run
    into the same folder that this run did not write are removed. No readable image is an error
    (nothing is written). Returns a summary dict."""
    import shutil

    import torch.distributed as td
    from PIL import Image

    from raebench import distributed
    from raebench.folders import Skip
    from raebench.images import to_float, to_uint8
    from raebench.eval_config import _autocast
    from raebench.results import atomic_write_bytes, remove_orphan_temps, save_npz_streamed_atomic

    rows, nonfinite, shape = [], [], None  # shape: (H, W, 3) of this rank's reconstructions
    rank, world = distributed.rank_world()
    staging = out / ".images.partial"  # this run's PNGs until it has finished
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # of a killed run (we hold the lock)
        staging.mkdir(parents=True)
        remove_orphan_temps(out)
        for stale in out.glob(".part-*"):  # every rank's shard files of a killed (multi-rank) run
            stale.unlink(missing_ok=True)
    if world > 1:
        td.barrier()
    skipped = list(data.images.skipped) if rank == 0 else []  # found while listing the folder
    for s in skipped:
        log.warning("skipped %s: %s", printable(s.path), s.reason)
    # this rank's images go to raw uint8 files in the staging folder, (N, H, W, 3) row after row, as they
    # come: memory holds one batch, not the shard (50k images at 256 px are 9.8 GB, again with --references)
    part, raw = out / f".part-{rank}", staging / f"part-{rank}"
    with open(raw.with_suffix(".rec"), "wb") as rec_file, open(raw.with_suffix(".ref"), "wb") as ref_file:
        for idx, ref, paths in _batches(data, resolution, batch_size, num_workers, device, on_progress, skipped):
            with torch.no_grad(), _autocast(device, precision):
                rec = tok.decode(tok.encode(to_float(ref))).float()
            # a NaN/Inf reconstruction has no 8-bit image: written as anything (black, say) it would be scored
            # against its original by `score` unnoticed, so it is left out like an unreadable file (as eval does)
            ok = torch.isfinite(rec.flatten(1)).all(1)  # (N,)
            if not bool(ok.all()):
                for p, good in zip(paths, ok.tolist()):
                    if not good:
                        nonfinite.append(p)
                        skipped.append(Skip(p, NONFINITE_REASON))
                        log.warning("left out %s: %s", printable(p), NONFINITE_REASON)
                keep = ok.nonzero().flatten().tolist()
                idx, ref, rec, paths = idx[keep], ref[ok], rec[ok], [paths[j] for j in keep]
                if not keep:
                    continue
            u8 = to_uint8(rec).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
            if shape is not None and u8.shape[1:] != shape:
                raise RaebenchError(f"{tok.name} reconstructed images of {shape[:2]} and then of {u8.shape[1:3]} pixels.")
            shape = u8.shape[1:]
            rec_file.write(np.ascontiguousarray(u8).data)
            if references:
                ref_file.write(np.ascontiguousarray(ref.permute(0, 2, 3, 1).cpu().numpy()).data)
            for i, a, p in zip(idx.tolist(), u8, paths):
                if png:
                    Image.fromarray(a).save(staging / f"{i:06d}.png")
                rows.append((i, p))
    atomic_write_bytes(part.with_suffix(".json"), json.dumps({"rows": rows, "nonfinite": nonfinite, "shape": shape,
                                                              "skipped": [(s.path, s.reason) for s in skipped]}).encode())
    if world > 1:
        td.barrier()
    shards = [out / f".part-{r}" for r in range(world)]
    meta = [json.loads(p.with_suffix(".json").read_text()) for p in shards]
    if not any(m["rows"] for m in meta):  # every rank sees it: all stop, nothing is written
        if world > 1:
            td.barrier()
        for f in (part.with_suffix(".json"), raw.with_suffix(".rec"), raw.with_suffix(".ref")):
            f.unlink(missing_ok=True)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        n_skip = sum(len(m["skipped"]) for m in meta)
        n_bad = sum(len(m["nonfinite"]) for m in meta)
        why = f"every reconstruction contained NaN/Inf ({n_bad})" if n_bad else "no image was readable"
        raise mark_ranks(RaebenchError(f"Nothing to reconstruct in {data.name!r}: {why} ({n_skip} skipped)."),
                         quiet=rank != 0)  # every rank read the same shard records: said once
    summary = {}
    if rank == 0:
        # files.csv goes first and comes back last: a folder without it is unfinished
        (out / "files.csv").unlink(missing_ok=True)
        shapes = {tuple(m["shape"]) for m in meta if m["rows"]}
        if len(shapes) > 1:
            raise RaebenchError(f"{tok.name} reconstructed images of several sizes across ranks: {sorted(shapes)}.")
        (shape,) = shapes
        n_all = sum(len(m["rows"]) for m in meta)
        save_npz_streamed_atomic(out / "reconstructions.npz", "arr_0", (n_all, *shape), np.uint8,
                                 _raw_chunks([staging / f"part-{r}.rec" for r in range(world)], shape))
        if references:
            save_npz_streamed_atomic(out / "references.npz", "arr_0", (n_all, resolution, resolution, 3), np.uint8,
                                     _raw_chunks([staging / f"part-{r}.ref" for r in range(world)], (resolution, resolution, 3)))
        else:
            (out / "references.npz").unlink(missing_ok=True)  # an earlier run's originals, not this run's
        (out / "images").mkdir(exist_ok=True)
        written = {f"{i:06d}.png" for m in meta for i, _ in m["rows"]} if png else set()
        for stale in (out / "images").glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # from an earlier run
            if stale.name not in written:
                stale.unlink()
        for name in sorted(written):
            os.replace(staging / name, out / "images" / name)
        shutil.rmtree(staging, ignore_errors=True)
        skips = [tuple(s) for m in meta for s in m["skipped"]]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([("path", "reason"), *skips])
        # a file name that is not UTF-8 is written as its bytes on disk (surrogate-escaped in Python)
        atomic_write_bytes(out / "skipped.csv", buf.getvalue().encode("utf-8", "surrogateescape"))
        buf = io.StringIO()  # csv quoting: file names may hold commas or quotes
        listed = ((i, src) for m in meta for i, src in m["rows"])  # npz row order: ranks in order, each in scan order
        csv.writer(buf, lineterminator="\n").writerows([("index", "source", "row"),
                                                        *((i, src, row) for row, (i, src) in enumerate(listed))])
        atomic_write_bytes(out / "files.csv", buf.getvalue().encode("utf-8", "surrogateescape"))
        summary = {"n": n_all, "nonfinite": [p for m in meta for p in m["nonfinite"]], "out": str(out),
                   "skipped": skips}
    if world > 1:
        td.barrier()
    part.with_suffix(".json").unlink(missing_ok=True)  # the raw files went with the staging folder
    return summary


#: bytes of images read at a time when the raw part files are merged into an npz
RAW_CHUNK_BYTES = 16 << 20


def _raw_chunks(files: list[Path], shape: tuple[int, ...]):
    """The (n, *shape) uint8 images of raw files, in order, about ``RAW_CHUNK_BYTES`` at a time."""
    per = int(np.prod(shape))
    for path in files:
        with open(path, "rb") as f:
            while buf := f.read(max(1, RAW_CHUNK_BYTES // per) * per):
                if len(buf) % per:
                    raise RaebenchError(f"{str(path)!r} ends inside an image; the run was disturbed, run it again.")
                yield np.frombuffer(buf, np.uint8).reshape(-1, *shape)


def check_out_dir(out: Path) -> None:
    """An output folder that exists as something else is one sentence, before any model loads."""
    if out.exists() and not out.is_dir():
        raise RaebenchError(f"--out {str(out)!r} is a file; reconstructions go to a folder, so give a folder path.")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    @app.command("stats")
    def stats_cmd(
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="A registered RAE (its encoder is used)."),
        tokenizer_config: Optional[Path] = typer.Option(None, "--tokenizer-config", help="Official RAE YAML instead of a name."),
        encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder name/folder/hub id/timm:<name>; with --tokenizer, a local copy of its encoder."),
        encoder_input_size: Optional[int] = typer.Option(None, "--encoder-input-size", help="With --encoder alone (default: --resolution)."),
        data: Optional[str] = typer.Option(None, "--data", help="Image folder (recursive)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Named dataset; default: the embedded photos."),
        out: Path = typer.Option(Path("stat.pt"), "--out", "-o", help="Where to write {'mean','var'} (official stat.pt)."),
        resolution: int = typer.Option(256, "--resolution", "-r", help="Crop size in px (ADM center crop)."),
        hflip: bool = typer.Option(False, "--hflip", help="Also use each image's mirror (the official estimator flips at random)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="A seeded random subset of N images."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
        batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per batch."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA if available) | cpu | cuda | cuda:N."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data-loading worker processes (default: 0 on the CPU, min(8, cores) on a GPU)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Local RAE-collections-style folder (for the encoder copy)."),
    ) -> None:
        """Exact per-element latent mean/var of an RAE encoder over a dataset (float64, deterministic)."""
        from raebench import distributed
        from raebench.cli import console
        from raebench.cli.core import progress_bar
        from raebench.data import resolve_data
        from raebench.images import to_float
        from raebench.eval_config import resolve_device
        from raebench.locks import exclusive
        from raebench.rae.stats import StatsAccumulator
        from raebench.results import remove_orphan_temps
        from raebench.tf32 import tf32

        distributed.init(device)
        dev = resolve_device(distributed.local_device(device))
        fn, label = feature_extractor(
            tokenizer=tokenizer, tokenizer_config=str(tokenizer_config) if tokenizer_config else None,
            encoder=encoder, weights=weights, resolution=resolution, encoder_input_size=encoder_input_size,
        )
        if isinstance(fn, torch.nn.Module):
            fn = fn.to(dev)
        rd = resolve_data(data, dataset, limit, seed)
        # one job per statistics file; the lock also makes any temporary file of this name a dead writer's
        with exclusive(out, "statistics job", "choose another --out"):
            with torch.no_grad():  # the latent shape, so that a rank with an empty shard still reduces
                acc = StatsAccumulator(tuple(fn(torch.zeros(1, 3, resolution, resolution, device=dev)).shape[1:]), dev)
            with progress_bar(f"stats {label}") as bar:
                batches = _batches(rd, resolution, batch_size, num_workers, dev, bar)
                # the ranks go batch by batch together, so that NaN/Inf latents on any rank stop every rank
                # at that batch (one rank alone stopping would leave the others waiting in all_reduce)
                while True:
                    item = next(batches, None)
                    bad = None
                    if item is not None:
                        with torch.no_grad(), tf32(False):  # exact statistics: full float32 on GPUs too
                            bad = _stats_batch(fn, acc, to_float(item[1]), item[2], hflip)
                    stop, running = distributed.any_rank(bad is not None, item is not None)
                    if stop:
                        from raebench.errors import NonFiniteError

                        distributed.refuse_first(bad, NonFiniteError)
                    if not running:
                        break
            acc.all_reduce()
            if acc.count == 0:  # the count is every rank's sum: all stop here alike, said once by rank 0
                raise mark_ranks(RaebenchError(f"No readable image in {rd.name!r}; nothing to compute statistics "
                                               "from."), quiet=distributed.rank() != 0)
            if distributed.is_main():
                st = acc.to_stats()
                remove_orphan_temps(out.parent, of=out.name)  # of a job killed while saving
                st.save(out)
                v = st.var
                console.print(
                    f"wrote {out}: mean/var of shape {tuple(st.shape)} over {acc.count} latents of {rd.name} "
                    f"(mean |mean| {st.mean.abs().mean():.4g}, mean var {v.mean():.4g})"
                )
        distributed.finish()

    @app.command("reconstruct")
    def reconstruct_cmd(
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Registered tokenizer name."),
        tokenizer_config: Optional[Path] = typer.Option(None, "--tokenizer-config", help="Official RAE YAML instead of a name."),
        data: Optional[str] = typer.Option(None, "--data", help="Image folder (recursive)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Named dataset; default: the embedded photos."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: images/*.png, reconstructions.npz, files.csv."),
        resolution: int = typer.Option(256, "--resolution", "-r", help="Crop size in px (ADM center crop)."),
        references: bool = typer.Option(False, "--references", help="Also write references.npz (the cropped originals)."),
        png: bool = typer.Option(True, "--png/--no-png", help="Write one PNG per image."),
        limit: Optional[int] = typer.Option(None, "--limit", help="A seeded random subset of N images."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
        batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per batch."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA if available) | cpu | cuda | cuda:N."),
        precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (tokenizer forward only)."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data-loading worker processes (default: 0 on the CPU, min(8, cores) on a GPU)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file/folder for the tokenizer."),
        decoder: Optional[str] = typer.Option(None, "--decoder", help="RAE: a decoder checkpoint instead of the released one."),
        stats: Optional[str] = typer.Option(None, "--stats", help="RAE: latent statistics file (stat.pt)."),
    ) -> None:
        """Reconstructions to disk: PNGs and an ADM-style npz (arr_0, uint8 NHWC) for external evaluators."""
        from raebench import distributed
        from raebench.cli import console, err_console
        from raebench.cli.core import progress_bar
        from raebench.data import resolve_data
        from raebench.eval_config import EvalConfig, build_tokenizer_from_config, check_config, resolve_device

        distributed.init(device)
        if not tokenizer and not tokenizer_config:
            raise RaebenchError("Give --tokenizer NAME (see `raebench ls tokenizers`) or --tokenizer-config official.yaml.")
        dev = resolve_device(distributed.local_device(device))
        cfg = EvalConfig(
            tokenizer=tokenizer or "official-config", metrics=(), resolution=resolution, batch_size=batch_size,
            precision=precision, num_workers=num_workers, weights=weights, decoder=decoder, stats=stats,
            tokenizer_config=str(tokenizer_config) if tokenizer_config else None,
        )
        check_config(cfg)  # bad flags, an unusable --out or data fail before the model loads
        check_out_dir(out)
        rd = resolve_data(data, dataset, limit, seed)
        tok = build_tokenizer_from_config(cfg, dev)
        with progress_bar(f"reconstruct {tok.name}") as bar:
            summary = write_reconstructions(
                tok, rd, out, resolution=resolution, batch_size=batch_size, device=dev, num_workers=num_workers,
                png=png, references=references, precision=precision, on_progress=bar,
            )
        if distributed.is_main():
            console.print(f"wrote {summary['n']} reconstructions of {rd.name} to {summary['out']}")
            if summary["nonfinite"]:
                err_console.print(f"[red]{len(summary['nonfinite'])} reconstruction(s) contained NaN/Inf and were left out "
                                  "(counted among the skipped files).[/]")
            if summary["skipped"]:
                err_console.print(f"[yellow]{len(summary['skipped'])} file(s) skipped[/] (listed in {out / 'skipped.csv'}).",
                                  highlight=False)
        distributed.finish()

