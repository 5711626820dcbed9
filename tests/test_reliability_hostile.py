"""Hostile inputs end to end: ``eval``, ``analyze`` and ``reconstruct`` on the generated junk corpus
(tests/test_data.make_hostile_corpus) plus a few good images complete, use every readable image,
and count and list every skipped file with its reason."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import _smooth_image
from raebench.results import load
from test_data import make_hostile_corpus
from _cli import run


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch) -> tuple[Path, dict[str, str], int]:
    """(folder, {bad file name: expected reason}, number of usable images)."""
    import raebench.images as images_mod

    monkeypatch.setattr(images_mod, "MAX_PIXELS", 50_000_000)  # huge.png (112 Mpx) is over it, refused unread
    root = tmp_path / "hostile"
    expect = make_hostile_corpus(root)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(_smooth_image(rng, 40, 48)).save(root / f"good_{i}.png")
    bad = {name: reason for name, reason in expect.items() if reason is not None}
    n_good = sum(reason is None for reason in expect.values()) + 3
    return root, bad, n_good


def _check_listed(entries: list[str], bad: dict[str, str]) -> None:
    """Each bad file appears exactly once, with its reason."""
    assert len(entries) == len(bad), entries
    by_name = {Path(e.split(": ", 1)[0]).name: e.split(": ", 1)[1] for e in entries}
    for name, reason in bad.items():
        assert name in by_name and reason in by_name[name], (name, by_name.get(name))


def test_eval_on_hostile_folder(hostile, tmp_path: Path, capsys):
    root, bad, n_good = hostile
    res = tmp_path / "res"
    code, out, err = run(["eval", "-t", "bicubic-f8", "--data", str(root), "-r", "32", "--results", str(res),
                          "--device", "cpu"], capsys)
    assert code == 0, err
    df = load(res)
    assert set(df["metric"]) == {"psnr", "ssim"}
    assert (df["n_images"] == n_good).all() and (df["skipped"] == len(bad)).all()
    for extra in df["extra"]:
        _check_listed(extra["skipped_files"], bad)
        assert extra["upscaled"] >= 1  # one.png
    assert f"{len(bad)} file(s) skipped" in " ".join(err.split())


def test_analyze_on_hostile_folder(hostile, tmp_path: Path, capsys):
    root, bad, n_good = hostile
    res = tmp_path / "res"
    code, out, err = run(["analyze", "-t", "bicubic-f8", "--data", str(root), "-r", "32", "--reference", "random-proj",
                          "--perceptual", "rmse", "--no-plots", "--mutual-k", "3", "--n-diag", "2", "--interp-pairs", "1",
                          "--interp-steps", "2", "--sigmas", "1", "--results", str(res), "--device", "cpu"], capsys)
    assert code == 0, err
    df = load(res)
    assert {"latent-erank", "align-cka-random-proj", "robust-psnr-vs-image-s1"} <= set(df["metric"])
    assert (df["skipped"] == len(bad)).all()
    assert (df.set_index("metric").loc["latent-erank", "n_images"]) == n_good
    for extra in df["extra"]:
        _check_listed(extra["skipped_files"], bad)


def test_reconstruct_on_hostile_folder(hostile, tmp_path: Path, capsys):
    root, bad, n_good = hostile
    out_dir = tmp_path / "rec"
    code, out, err = run(["reconstruct", "-t", "bicubic-f8", "--data", str(root), "-r", "32", "--out", str(out_dir),
                          "--no-png", "--device", "cpu"], capsys)
    assert code == 0, err
    assert np.load(out_dir / "reconstructions.npz")["arr_0"].shape == (n_good, 32, 32, 3)
    # a file name that is not UTF-8 is written as its bytes on disk
    used = (out_dir / "files.csv").read_text(errors="surrogateescape").splitlines()[1:]
    assert len(used) == n_good and not any(Path(line.split(",", 1)[1]).name in bad for line in used)
    with open(out_dir / "skipped.csv", newline="", errors="surrogateescape") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason"]
    _check_listed([f"{p}: {r}" for p, r in rows[1:]], bad)
    if os.name == "posix":  # the corpus holds names that are not UTF-8; the CSVs keep their bytes
        assert b"\xff\xfe.png" in (out_dir / "files.csv").read_bytes()
        assert b"bad\xff.png" in (out_dir / "skipped.csv").read_bytes()
    assert f"{len(bad)} file(s) skipped" in " ".join(err.split())
    assert not list(out_dir.glob(".part-*"))
