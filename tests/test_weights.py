"""Weights: resolution of local folders and the Hub cache (raebench.weights; a missing-weight message names the
cache folder that is searched, and following it works), and the weights identity's digest cache
(raebench.metrics.extractors)."""

import errno
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

import raebench.metrics.extractors as ex
from raebench.errors import MissingWeightsError
from raebench.weights import WeightsSource, _check_snapshot, hf_cache_dir, hf_cache_move_hint, hf_offline, resolve


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ex, "_DIGESTS", {})
    return tmp_path / "cache" / "digests.json"


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_damaged_cache_entry_is_hashed_again(tmp_path, cache):
    w = _file(tmp_path / "w.bin", b"abc")
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({ex._digest_key(w): "ab"}))
    assert ex.content_digest(w) == hashlib.sha256(b"abc").hexdigest()


def test_the_digest_cache_keeps_the_newest_entries(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(ex, "_DIGEST_CACHE_ENTRIES", 2)
    files = [_file(tmp_path / f"w{i}.bin", bytes([i])) for i in range(3)]
    for f in files:
        ex.content_digest(f)
    assert list(json.loads(cache.read_text())) == [ex._digest_key(f) for f in files[1:]]


def test_an_unwritable_or_unlockable_digest_cache_costs_only_hashing(tmp_path, cache, monkeypatch):
    w = _file(tmp_path / "w.bin", b"abc")
    cache.mkdir(parents=True)  # digests.json cannot be written (nor read)

    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    assert ex.content_digest(w) == hashlib.sha256(b"abc").hexdigest()


def test_the_identity_ignores_the_file_name_and_tool_metadata(tmp_path, cache):
    a = _file(tmp_path / "a" / "model.safetensors", b"weights")
    b = _file(tmp_path / "b" / "renamed.safetensors", b"weights")
    assert ex.fingerprint_path(a) == ex.fingerprint_path(b)
    before = ex.fingerprint_path(a.parent)
    _file(a.parent / ".cache" / "huggingface" / "model.safetensors.metadata", b"timestamp 123")
    assert ex.fingerprint_path(a.parent) == before
    _file(a.parent / "config.json", b"{}")
    assert ex.fingerprint_path(a.parent) != before


def test_a_local_folder_supplies_the_file_at_its_path_in_the_repo(tmp_path):
    src = WeightsSource("org/repo", filename="model.safetensors", subfolder="decoder")
    f = _file(tmp_path / "dl" / "decoder" / "model.safetensors", b"w")
    assert resolve(src, tmp_path / "dl") == f
    g = _file(tmp_path / "flat" / "model.safetensors", b"w")
    assert resolve(src, tmp_path / "flat") == g


def test_offline_and_cache_settings(monkeypatch, tmp_path):
    for v, want in (("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", v)
        assert hf_offline() is want
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # what the Hub client searches
    assert hf_cache_dir() == tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_move_hint() == "set HF_HUB_CACHE to move it"  # it wins over HF_HOME
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hf_cache_move_hint() == "set HF_HOME to move it"


def test_a_snapshot_without_its_config_is_incomplete(tmp_path):
    _file(tmp_path / "snap" / "model.safetensors", b"w")
    with pytest.raises(FileNotFoundError, match="incomplete snapshot"):
        _check_snapshot(tmp_path / "snap", ["config.json", "*.safetensors"], None)
    _file(tmp_path / "snap" / "config.json", b"{}")
    _check_snapshot(tmp_path / "snap", ["config.json", "*.safetensors"], None)


def _place_as_hf_download(cache, repo: str, rel: str, data: bytes) -> None:
    """Where `hf download REPO REL` leaves a file: models--o--n/snapshots/<commit>/REL, refs/main -> commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "a" * 40
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    f = root / "snapshots" / commit / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)


def test_missing_weight_message_names_the_searched_cache_and_following_it_works(tmp_path, monkeypatch):
    """The message used to rebuild the cache path from HF_HOME / ~/.cache/huggingface, but the Hub client
    searches its own constants.HF_HUB_CACHE (read at its import, honouring $XDG_CACHE_HOME): with
    XDG_CACHE_HOME=/x the message said ~/.cache/huggingface/hub while /x/huggingface/hub was searched, so a
    file copied where the message said was never found."""
    import huggingface_hub.constants as hc

    searched = tmp_path / "xdg" / "huggingface" / "hub"  # what huggingface_hub derives from XDG_CACHE_HOME
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(searched))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # set after import: not what is searched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = WeightsSource("owner/some-vae", filename="latents_stats.pt")
    with pytest.raises(MissingWeightsError) as e:
        resolve(src, what="thing")
    msg = str(e.value)
    named = re.search(r"into the cache at (\S+) \(set HF_HOME to move it\)", msg)
    assert named and named.group(1) == str(searched), msg
    assert "`hf download owner/some-vae latents_stats.pt`" in msg
    _place_as_hf_download(searched, "owner/some-vae", "latents_stats.pt", b"x")  # follow the message literally
    assert resolve(src, what="thing").read_bytes() == b"x"


def test_cache_hint_names_hf_hub_cache_when_it_is_the_setting_in_force(tmp_path, monkeypatch):
    """HF_HUB_CACHE wins over HF_HOME: telling its users to set HF_HOME would not move anything."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=r"\(set HF_HUB_CACHE to move it\)"):
        resolve(WeightsSource("owner/name", allow_patterns=("config.json", "*.safetensors")), what="thing")


def test_a_hung_digest_lock_holder_delays_a_job_boundedly_with_progress_lines(tmp_path, cache, monkeypatch, caplog):
    """A job that held the digest cache's lock and hung (a stalled mount, a stopped job) blocked every other
    job fingerprinting a new weights file forever, silently. Now the wait says so every
    DIGEST_WAIT_LINE_S and ends after $RAEBENCH_DIGEST_WAIT_S: the job hashes the file itself."""
    import logging
    import threading

    w = _file(tmp_path / "w.bin", b"abc")
    cache.parent.mkdir(parents=True)
    holder = open(cache.with_name(cache.name + ".lock"), "a")  # another open file: flock conflicts with it
    fcntl.flock(holder, fcntl.LOCK_EX)
    monkeypatch.setenv("RAEBENCH_DIGEST_WAIT_S", "0.6")
    monkeypatch.setattr(ex, "DIGEST_WAIT_LINE_S", 0.2, raising=False)
    got = []
    try:
        with caplog.at_level(logging.INFO, logger=ex.__name__):
            t = threading.Thread(target=lambda: got.append(ex.content_digest(w)), daemon=True)
            t.start()
            t.join(timeout=10)
            assert not t.is_alive(), "still waiting for the lock's holder"
    finally:
        holder.close()
    assert got == [hashlib.sha256(b"abc").hexdigest()]
    text = " ".join(caplog.messages)
    assert "waiting" in text and "fingerprinting w.bin (0.0 GB) here instead" in text
    assert ex._digest_key(w) in json.loads(cache.read_text())  # and cached for the next job


def test_weights_identities_compare_by_content_and_keep_older_hub_labels():
    from raebench.weights import released_label, same_weights, weights_key

    hub = "stabilityai/sd-vae-ft-ema@0123456789ab@b8f06c32ab1c"
    assert weights_key(hub) == weights_key("local:my+vae@v2@b8f06c32ab1c") == "@b8f06c32ab1c"  # '+' and '@' in a name
    assert same_weights(hub, "local:w@b8f06c32ab1c") and not same_weights(hub, "local:w@000000000000")
    assert same_weights(hub, "stabilityai/sd-vae-ft-ema@0123456789ab")  # a row stored with the Hub label alone
    assert not same_weights(hub, "stabilityai/sd-vae-ft-ema@fedcba987654")  # another snapshot, unfingerprinted
    rae = "nyu-visionx/RAE-collections:decoders/a/model.pt@111111111111+enc:222222222222+stats:333333333333"
    assert released_label(rae) == "nyu-visionx/RAE-collections:decoders/a/model.pt"
    assert not same_weights(rae, "local:model.pt@111111111111")  # without its encoder and statistics: other
    assert released_label("local:model.pt@111111111111") is None and not same_weights("local:model.pt", "local:model.pt@111111111111")
    assert weights_key("none") == "none" and same_weights("none", "none") and not same_weights("none", "random")
