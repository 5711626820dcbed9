"""Errors a torchrun job meets before its process group exists (a usage error, a device that cannot
work, a group that cannot form), or before its first collective (a command's own argument checks: `eval`
without --tokenizer, an unknown name), are said once, by the lowest rank that met them, and every rank
exits with status 2 together. Before, every rank printed its own copy (a device string torch does not
know: each rank's RuntimeError traceback), and torchrun's stop of the others made a rank's status -15.

The ranks are simulated in one process: RANK/WORLD_SIZE set, the other rank's outcome put in the
store by hand (the store is torchrun's, which the ranks share before any group exists)."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as td

from raebench import distributed
from raebench.errors import EVERY_RANK, QUIET, RaebenchError

ROOT = Path(__file__).parents[1]


class DictStore:
    """The calls of a c10d store that raebench makes; get() of a key no rank set fails (it would wait)."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value if isinstance(value, bytes) else str(value).encode()

    def get(self, key):
        if key not in self.data:
            raise TimeoutError(f"no rank set {key}")
        return self.data[key]

    def add(self, key, n):
        self.data[key] = str(int(self.data.get(key, b"0")) + n).encode()
        return int(self.data[key])


@pytest.fixture
def rank_of_two(monkeypatch):
    """Rank ``r`` of a 2-process torchrun job on a CPU node: returns (set_rank, store, started groups)."""
    store, started = DictStore(), []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("RAEBENCH_DIST_TIMEOUT_S", raising=False)
    monkeypatch.setattr(distributed, "_store", lambda seconds=None: store)
    monkeypatch.setattr(distributed, "_KEYS", [0])
    monkeypatch.setattr(distributed, "_STARTED", [])
    monkeypatch.setattr(distributed, "_collectives", lambda: 0)  # the fake group has run no collective
    monkeypatch.setattr(td, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(td, "init_process_group", lambda **kw: started.append(kw))
    monkeypatch.setattr(td, "get_rank", lambda: int(os.environ["RANK"]))
    monkeypatch.setattr(td, "get_world_size", lambda: 2)

    def set_rank(r):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("LOCAL_RANK", str(r))

    yield set_rank, store, started  # SIGTERM, which the CLI's exit together ignores, is restored by conftest


def _other(store, rank, outcome, n=1):
    store.set(f"outcome/0/{n}/{rank}", pickle.dumps(outcome))


def test_a_device_error_is_said_by_the_lowest_rank_and_raised_on_every_rank(rank_of_two):
    set_rank, store, started = rank_of_two
    said = "Unknown device 'bogus'; use auto, cpu, cuda or cuda:N."
    set_rank(0)  # rank 0 meets it and says it
    _other(store, 1, ("user", "raebench.errors", "RaebenchError", said))
    with pytest.raises(RaebenchError, match="Unknown device 'bogus'") as e:
        distributed.init("bogus")
    assert getattr(e.value, QUIET) is False and getattr(e.value, EVERY_RANK) is True
    assert pickle.loads(store.get("outcome/0/1/0"))[0] == "user"
    set_rank(1)  # rank 1 met it too: quiet
    distributed._KEYS[0] = 0
    _other(store, 0, ("user", "raebench.errors", "RaebenchError", said))
    with pytest.raises(RaebenchError) as e:
        distributed.init("bogus")
    assert getattr(e.value, QUIET) is True and getattr(e.value, EVERY_RANK) is True
    assert started == []  # no group is started with a device refused anywhere


def test_a_rank_whose_device_works_stops_with_the_rank_whose_device_does_not(rank_of_two):
    """E.g. --nproc_per_node above the node's GPU count: the ranks past it are refused, the others would
    have formed a group and waited in it; they now raise the refused rank's sentence, quietly."""
    set_rank, store, started = rank_of_two
    set_rank(0)
    _other(store, 1, ("user", "raebench.errors", "RaebenchError", "torchrun started local rank 1 but ..."))
    with pytest.raises(RaebenchError, match="local rank 1") as e:
        distributed.init("cpu")
    assert getattr(e.value, QUIET) is True and getattr(e.value, EVERY_RANK) is True
    assert started == []


def test_every_rank_fine_starts_the_group(rank_of_two):
    set_rank, store, started = rank_of_two
    set_rank(1)
    _other(store, 0, None)
    _other(store, 0, None, n=2)  # the second exchange: the group started
    assert distributed.init("cpu") == (1, 2)
    assert [kw["backend"] for kw in started] == ["gloo"]


def test_a_group_that_cannot_form_is_one_sentence_said_once(rank_of_two, monkeypatch):
    set_rank, store, started = rank_of_two

    def fail(**kw):
        raise RuntimeError("[enforce fail at gloo/transport/tcp/device.cc:83] ifa != nullptr. "
                           "Unable to find address for: nope0")

    monkeypatch.setattr(td, "init_process_group", fail)
    set_rank(0)
    _other(store, 1, None)
    _other(store, 1, ("user", "raebench.errors", "RaebenchError", "rank 1's copy"), n=2)
    with pytest.raises(RaebenchError, match=r"could not form a gloo process group .*nope0.*GLOO_SOCKET_IFNAME") as e:
        distributed.init("cpu")
    assert getattr(e.value, QUIET) is False and getattr(e.value, EVERY_RANK) is True


def test_leaving_together_before_a_group_waits_for_the_others_then_gives_up(rank_of_two, monkeypatch):
    import time

    set_rank, store, _ = rank_of_two
    set_rank(1)
    store.add("leaving/0/1", 1)  # rank 0 is already there
    t = time.monotonic()
    distributed.meet_before_exit()
    assert time.monotonic() - t < 1 and store.add("leaving/0/1", 0) == 2
    monkeypatch.setattr(distributed, "MEET_BEFORE_EXIT_S", 0.3)
    t = time.monotonic()
    distributed.meet_before_exit()  # nobody else comes: exits anyway
    assert 0.3 <= time.monotonic() - t < 2


@pytest.mark.parametrize("rank", [0, 1])
def test_a_usage_error_is_printed_by_rank_0_and_every_rank_exits_2_together(rank_of_two, monkeypatch, capsys, rank):
    from raebench.cli import main

    set_rank, _, _ = rank_of_two
    set_rank(rank)
    met = []
    monkeypatch.setattr(distributed, "meet_before_exit", lambda: met.append(True))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--no-such-option"])
    assert e.value.code == 2 and met == [True]
    err = capsys.readouterr().err
    assert ("No such option" in err) == (rank == 0), err


def test_one_process_prints_usage_errors_as_before(monkeypatch, capsys):
    from raebench.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "meet_before_exit", lambda: pytest.fail("no job to meet"))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--resolution", "abc"])
    assert e.value.code == 2 and "Invalid value for '--resolution'" in capsys.readouterr().err


def test_an_error_sentence_is_printed_as_written_not_as_rich_markup(monkeypatch, capsys):
    """The CLI printed error sentences with rich markup on, so a bracketed part that reads as a tag
    (torch's ``[enforce fail at ...]``, a file ``[draft] a.png``) vanished from the sentence."""
    from raebench.cli import main

    def fail():
        raise RaebenchError("Cannot read '/data/[draft] a.png'; fix it.")

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launched", lambda: False)
    import raebench.cli.core as core

    monkeypatch.setattr(core, "_split_metrics", lambda m: fail())
    with pytest.raises(SystemExit) as e:
        main(["eval", "-t", "pixels", "--device", "cpu"])
    assert e.value.code == 2
    assert "Cannot read '/data/[draft] a.png'; fix it." in " ".join(capsys.readouterr().err.split())


def _peer_said(store, rank, sentence, world=2):
    """What another rank that met ``sentence`` left in the store (distributed.say_once) before this rank came."""
    store.set(f"exit/0/{rank}", sentence.encode())
    store.add("exit/0/n", 1)
    store.add("exit/0/said", 1)


GIVE_TOKENIZER = "Give --tokenizer NAME (see `raebench ls tokenizers`) or --tokenizer-config official.yaml."


@pytest.mark.parametrize("rank", [0, 1])
def test_an_argument_check_after_the_group_formed_is_said_once_and_every_rank_exits_2(rank_of_two, monkeypatch, capsys,
                                                                                      rank):
    """`eval` without --tokenizer: checked on every rank after the group formed, before any collective.
    Each rank printed it (and torchrun's stop of the others made a rank's status -15)."""
    from raebench.cli import main

    set_rank, store, started = rank_of_two
    set_rank(rank)
    _other(store, 1 - rank, None)
    _other(store, 1 - rank, None, n=2)
    _peer_said(store, 1 - rank, GIVE_TOKENIZER)
    monkeypatch.setattr(distributed, "meet_before_exit", lambda: pytest.fail("say_once met the other rank already"))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--device", "cpu"])
    assert e.value.code == 2 and started and store.add("exit/0/said", 0) == 2
    assert (GIVE_TOKENIZER in " ".join(capsys.readouterr().err.split())) == (rank == 0)


def test_an_unknown_name_before_the_group_is_said_by_rank_0_only(rank_of_two, capsys):
    """`score --name ''` is refused before `init`: no group, the ranks compare through torchrun's store."""
    from raebench.cli import main

    set_rank, store, started = rank_of_two
    set_rank(1)
    said = "--name '' must be non-empty printable text (no newlines or control characters)."
    _peer_said(store, 0, said)
    with pytest.raises(SystemExit) as e:
        main(["score", "--ref", "r", "--cand", "c", "--name", "", "--device", "cpu"])
    assert e.value.code == 2 and not started and "error:" not in capsys.readouterr().err


def test_an_error_after_a_collective_is_not_compared(rank_of_two, monkeypatch, capsys):
    """Past the first collective a rank may fail alone while the others finish: it says its error at once."""
    from raebench.cli import main

    set_rank, store, _ = rank_of_two
    set_rank(1)
    _other(store, 0, None)
    _other(store, 0, None, n=2)
    ran = iter([0, 3])  # after init; then 3 collectives later
    monkeypatch.setattr(distributed, "_collectives", lambda: next(ran))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--device", "cpu"])
    assert e.value.code == 2 and GIVE_TOKENIZER in " ".join(capsys.readouterr().err.split())
    assert not any(k.startswith("exit/") for k in store.data)


def test_a_rank_that_does_not_report_leaves_the_others_to_say_their_own(rank_of_two, monkeypatch):
    set_rank, store, _ = rank_of_two
    set_rank(1)
    monkeypatch.setattr(distributed, "SAY_ONCE_WAIT_S", 0.2)
    said = []
    assert distributed.say_once("only here.", lambda: said.append(1)) is False and said == [1]


def test_another_sentence_than_the_lower_ranks_is_said_too(rank_of_two):
    set_rank, store, _ = rank_of_two
    set_rank(1)
    _peer_said(store, 0, "Cannot read '/data' on rank 0.")
    said = []
    assert distributed.say_once("Cannot read '/data' on rank 1.", lambda: said.append(1)) is True and said == [1]


@pytest.mark.parametrize("rank", [0, 1])
def test_help_is_printed_by_rank_0_only(rank_of_two, capsys, rank):
    from raebench.cli import main

    set_rank, _, _ = rank_of_two
    set_rank(rank)
    main(["eval", "--help"])
    assert ("--tokenizer" in capsys.readouterr().out) == (rank == 0)


@pytest.mark.slow
def test_torchrun_usage_and_device_errors_are_printed_once_and_every_rank_exits_2(tmp_path):
    """End to end under torchrun's agent (which stops the other ranks once one exits)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAEBENCH_DIST_TIMEOUT_S": "60",
           "PYTHONPATH": str(ROOT)}
    for argv, says in ((["eval", "--resolution", "abc"], "Invalid value for '--resolution'"),
                       (["score", "--references", str(tmp_path), "--candidates", str(tmp_path), "--device", "bogus"],
                        "Unknown device 'bogus'"),
                       (["eval", "--device", "cpu"], "Give --tokenizer NAME")):  # after the group formed
        r = subprocess.run(["timeout", "-k", "5", "150", sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "-m", "raebench", *argv],
                           env=env, capture_output=True, text=True, timeout=170)
        err = " ".join(r.stderr.split())
        assert r.returncode == 1 and err.count(says) == 1, r.stderr[-3000:]
        assert sorted(re.findall(r"exitcode\s+: (-?\d+)", r.stderr)) == ["2", "2"], r.stderr[-3000:]
        assert not re.search(r'File "[^"]*raebench', r.stderr), r.stderr[-3000:]
