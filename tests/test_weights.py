"""raebench.weights: a missing-weight message names the cache folder that is searched, and following it works."""

import re

import pytest

from raebench.errors import MissingWeightsError
from raebench.weights import WeightsSource, resolve


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
