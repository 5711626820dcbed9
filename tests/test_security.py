"""Checkpoints carrying code are refused, not executed; truncated ones are a clear error."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from raebench.checkpoint import load_state, save_atomic
from raebench.errors import CheckpointError


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    with open(ckpt, "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(2)}, "x": _Payload(str(marker))}, f)
    return ckpt, marker


def test_pickle_payload_is_refused_not_executed(tmp_path: Path):
    ckpt, marker = _malicious(tmp_path)
    with pytest.raises(CheckpointError, match="Refused"):
        load_state(ckpt)
    assert not marker.exists()


def test_round_trip_and_truncation(tmp_path: Path):
    state = {"model": {"w": torch.arange(4.0)}, "step": 3}
    p = save_atomic(state, tmp_path / "ck.pt")
    assert load_state(p)["step"] == 3
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_state(p)
    s = save_atomic({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    assert torch.equal(load_state(s)["w"], torch.ones(3))
    assert not list(tmp_path.glob("*.tmp"))


def test_files_that_are_not_checkpoints_are_named_so(tmp_path: Path):
    text = tmp_path / "model.pt"
    text.write_text("hf download nyu-visionx/RAE-collections\n")  # a note saved under the weights' name
    with pytest.raises(CheckpointError, match=r"is not a PyTorch checkpoint \(neither a torch.save zip archive nor a pickle\)"):
        load_state(text)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\): corrupt or truncated"):
        load_state(tmp_path / "empty.pt")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)  # a pickle: still loads
    assert torch.equal(load_state(legacy)["w"], torch.ones(2))
