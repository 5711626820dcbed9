"""What NCCL needs that gloo does not, checked on the CPU with torch.distributed's entry points faked.

NCCL serves CUDA tensors only, runs the object collectives through ``torch.cuda.current_device()``
and picks a barrier's GPU from the device bound to the group (``init_process_group(device_id=...)``),
else from earlier collectives, else as global rank mod GPUs per node. The gloo tests (2 processes on
the CPU) cannot see any of that; these pin what :func:`raebench.distributed.init` hands to torch.
Multi-process NCCL itself runs in ``bench/check_nccl.sh`` (2 GPUs).
"""

import pytest
import torch
import torch.distributed as td

from raebench import distributed
from raebench.errors import RaebenchError


@pytest.fixture
def fake_torchrun(monkeypatch):
    """Rank 1 of 2 on a node with 2 GPUs; init_process_group and set_device recorded, not run."""
    calls = {"init": [], "set_device": []}
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAEBENCH_DIST_TIMEOUT_S", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(td, "is_initialized", lambda: bool(calls["init"]))
    monkeypatch.setattr(td, "init_process_group", lambda **kw: calls["init"].append(kw))
    monkeypatch.setattr(td, "get_rank", lambda: 1)
    monkeypatch.setattr(td, "get_world_size", lambda: 2)
    store = _OtherRankFine()
    monkeypatch.setattr(distributed, "_store", lambda seconds=None: store)  # the ranks' exchange before the group
    return calls


class _OtherRankFine:
    """torchrun's store as rank 1 sees it before the group forms: rank 0's set-up went fine."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value

    def get(self, key):
        import pickle

        return self.data.get(key, pickle.dumps(None))


@pytest.mark.parametrize("device", ["auto", "cuda", torch.device("cuda"), torch.device("cuda", 1)])
def test_nccl_group_is_bound_to_the_rank_gpu(fake_torchrun, device):
    """The rank's GPU is the current device (object collectives) and the group's bound device
    (barrier: without it torch warns on every barrier and, before any other collective, guesses
    global rank mod GPUs per node); the device the command then computes on is the same GPU."""
    from raebench.eval_config import resolve_device

    assert distributed.init(device) == (1, 2)
    (kw,) = fake_torchrun["init"]
    assert kw["backend"] == "nccl" and kw["device_id"] == torch.device("cuda", 1), kw
    assert kw["timeout"].total_seconds() == distributed.DEFAULT_TIMEOUT_S
    assert fake_torchrun["set_device"] == [1]
    if isinstance(device, str):  # the CLI's path: init(device), then resolve_device(local_device(device))
        assert resolve_device(distributed.local_device(device)) == torch.device("cuda", 1)


def test_cpu_under_torchrun_on_a_gpu_node_is_gloo_unbound(fake_torchrun):
    distributed.init("cpu")
    assert fake_torchrun["init"] == [{"backend": "gloo", "timeout": fake_torchrun["init"][0]["timeout"]}]
    assert fake_torchrun["set_device"] == []
    assert distributed.local_device("cpu") == "cpu"


def test_devices_nccl_cannot_use_are_refused_before_the_group_forms(fake_torchrun, monkeypatch):
    """With the GPU bound, NCCL forms its communicator inside init_process_group: a cuda:N shared by
    the ranks of a node, or a local rank past the visible GPUs, must be a sentence before that (they
    were NCCL's "duplicate GPU" error and CUDA's "invalid device ordinal")."""
    with pytest.raises(RaebenchError, match="every rank of a node on one GPU"):
        distributed.init("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("auto", "cuda", torch.device("cuda")):
        with pytest.raises(RaebenchError, match="--nproc_per_node 1 or fewer"):
            distributed.init(device)
    with pytest.raises(RaebenchError, match="--nproc_per_node 1 or fewer"):
        distributed.local_device("auto")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RaebenchError, match="sees no CUDA GPU"):
        distributed.init(torch.device("cuda"))
    assert fake_torchrun["init"] == [] and fake_torchrun["set_device"] == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one visible GPU per rank: cuda:0 is its own
    distributed.init("cuda:0")
    assert fake_torchrun["init"][0]["device_id"] == torch.device("cuda", 0)


def test_one_process_starts_no_group(fake_torchrun, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init("auto") == (0, 1)
    assert fake_torchrun["init"] == [] and fake_torchrun["set_device"] == []


def test_torch_barrier_takes_the_bound_device():
    """The reason for device_id: torch's barrier() uses the group's bound device before any guess
    (read in this torch's source, so that a change of rule shows here)."""
    import inspect

    src = inspect.getsource(td.barrier)
    bound, guess = src.find("bound_device_id"), src.find("using the device under current context")
    assert 0 < bound < guess, "torch.distributed.barrier no longer prefers init_process_group(device_id=...)"


def test_the_collective_timeout_is_read_once_and_checked(fake_torchrun, monkeypatch):
    monkeypatch.setenv("RAEBENCH_DIST_TIMEOUT_S", "90")
    distributed.init("cpu")
    assert fake_torchrun["init"][0]["timeout"].total_seconds() == 90
    fake_torchrun["init"].clear()
    for bad in ("abc", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("RAEBENCH_DIST_TIMEOUT_S", bad)
        with pytest.raises(RaebenchError, match="RAEBENCH_DIST_TIMEOUT_S"):
            distributed.init("cpu")
    assert fake_torchrun["init"] == []
