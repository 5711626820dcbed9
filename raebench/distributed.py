"""torch.distributed helpers for commands launched with ``torchrun``.

``torchrun --nproc_per_node N -m raebench eval ...`` sets WORLD_SIZE/RANK/LOCAL_RANK; ``init()``
then starts a process group (NCCL on CUDA, gloo on CPU) and pins each rank to its GPU. Without
torchrun everything runs as one process and these helpers are no-ops.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td

from raebench.errors import mark_ranks as _mark


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


#: seconds a collective may wait (``$RAEBENCH_DIST_TIMEOUT_S``): rank 0 alone merges 50k samples or
#: computes precision/recall while the others wait, which can pass NCCL's default 10 minutes
DEFAULT_TIMEOUT_S = 7200


def init(device: torch.device | str | None = None) -> tuple[int, int]:
    """Initialise the default process group if torchrun launched us; returns (rank, world).

    The backend follows ``device`` (NCCL for a CUDA device, gloo otherwise: ``--device cpu`` on a GPU
    node gets gloo); "auto" or None means NCCL whenever CUDA is available. With NCCL the rank's GPU
    (``cuda:LOCAL_RANK``, or an explicit index) becomes the current device, which the object
    collectives use, and is bound to the group (``device_id``), which ``barrier()`` uses: without it,
    a barrier before any other collective guesses the GPU as global rank mod GPUs per node (another
    GPU than this rank's under ``--nproc_per_node`` below the GPU count on several nodes) and warns
    on every call. Binding also forms the NCCL communicator here, so a device string that cannot work
    (:func:`local_device`, :func:`_check_local_gpu`) is refused first, in one sentence.
    """
    import datetime

    if not launched():
        return 0, 1
    if not td.is_initialized():
        # every rank checks its device, then all compare (through torchrun's store: no group yet), so a
        # device that cannot work is said once and stops every rank together (it was each rank's
        # sentence or traceback, racing torchrun's stop of the others)
        backend, bind = before_group(lambda: _plan(device))
        timeout = datetime.timedelta(seconds=_timeout_s())
        before_group(lambda: _start_group(backend, timeout, bind))
        _STARTED[:] = [_collectives()]
    return td.get_rank(), td.get_world_size()


#: the count of collectives of the default group right after :func:`init` formed it (None: unknown)
_STARTED: list = []


def _collectives() -> int | None:
    """How many collectives this rank's default group has run (its sequence number, which gloo and NCCL
    advance on each collective, the object ones and barriers included), or None where the backend keeps none."""
    try:
        return td.distributed_c10d._get_default_group()._get_sequence_number_for_group()
    except Exception:  # noqa: BLE001 - a backend without the counter: treated as past its first collective
        return None


def before_any_collective() -> bool:
    """Whether this rank of a torchrun job has not yet met the other ranks in a collective: no process group
    formed yet, or one formed by :func:`init` that ran none since. A user error raised then is most often
    one of the checks every rank runs alike (arguments, names, files), and a rank that did not raise it
    waits for this one in its first collective (or finishes a command that has none), so the ranks may
    compare their errors before any exits (:func:`say_once`); past it a rank may fail alone while the
    others finish, and would wait for them in vain."""
    if not launched():
        return False
    if not _STARTED:
        return not td.is_initialized()  # a group that raebench did not form: its history is unknown
    return td.is_initialized() and _STARTED[0] is not None and _collectives() == _STARTED[0]


def _plan(device: torch.device | str | None) -> tuple[str, dict]:
    """The backend and the keywords binding this rank's GPU (see :func:`init`), or one sentence."""
    from raebench.eval_config import resolve_device

    _timeout_s()  # a bad $RAEBENCH_DIST_TIMEOUT_S is refused with the device's sentences, once
    if isinstance(device, str):
        device = local_device(device)  # refuses cuda:N for several ranks of a node first
        device = None if device == "auto" else resolve_device(device)  # an unknown device, CUDA asked of a CPU build
    use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    bind = {}
    if use_cuda:
        index = device.index if device is not None and device.index is not None else _check_local_gpu()
        torch.cuda.set_device(index)
        bind["device_id"] = torch.device("cuda", index)
    return ("nccl" if use_cuda else "gloo"), bind


def _start_group(backend: str, timeout, bind: dict) -> None:
    try:
        td.init_process_group(backend=backend, timeout=timeout, **bind)
    except Exception as e:  # noqa: BLE001 - torch's RuntimeError/ValueError from the backend, per rank
        from raebench.errors import RaebenchError, first_line

        if isinstance(e, td.DistError) and "timed out" in str(e).lower():
            raise _not_formed(e, timeout.total_seconds()) from e
        raise RaebenchError(f"torchrun's ranks could not form a {backend} process group ({first_line(e, 200)}); check "
                            "the network settings (MASTER_ADDR, GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME) and --device."
                            ) from e


def _not_formed(e: Exception, seconds: float) -> Exception:
    """The rendezvous that forms the group timed out: one sentence (torch's is a traceback ending in
    "Timed out after N seconds waiting for clients. 1/2 clients joined."). Under torchrun on one node
    its agent stops every rank within a second of one dying, so this is a rank lost before joining
    under a launcher without one (processes started by hand or by srun), or another node's rank."""
    from raebench.errors import RaebenchError, first_line

    return RaebenchError(f"rank {os.environ.get('RANK', '?')} waited {seconds:g} s (RAEBENCH_DIST_TIMEOUT_S) for the "
                         f"other ranks of this job to join and gave up ({first_line(e)}): a rank died or never started "
                         "(its own error, if it printed one, is in its log); check that every rank was launched with "
                         "the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE, then re-run the command on every rank.")


def _timeout_s() -> float:
    """``$RAEBENCH_DIST_TIMEOUT_S`` (default :data:`DEFAULT_TIMEOUT_S`), or one sentence if it is not
    a positive number of seconds (it was a ValueError traceback on every rank)."""
    text = os.environ.get("RAEBENCH_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        from raebench.errors import RaebenchError

        raise RaebenchError(f"RAEBENCH_DIST_TIMEOUT_S={text!r} is not a number of seconds; set it to e.g. 600, or "
                            f"unset it (default {DEFAULT_TIMEOUT_S}).")
    return seconds


def _check_local_gpu() -> int:
    """This rank's GPU index, ``LOCAL_RANK``, if the node shows that many GPUs; else one sentence
    (torch's own error is "CUDA error: invalid device ordinal" from deep inside set_device)."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        from raebench.errors import RaebenchError

        if count == 0:
            raise RaebenchError("--device cuda was asked for but this torch build sees no CUDA GPU; use --device cpu.")
        raise RaebenchError(f"torchrun started local rank {local} but this process sees {count} GPU(s); give "
                            f"--nproc_per_node {count} or fewer (one process per GPU), or, where each rank sees only "
                            "its own GPU (CUDA_VISIBLE_DEVICES set per rank), --device cuda:0.")
    return local


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    return rank(), world_size()


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice [lo, hi) of rank ``rank``: concatenating shards in rank order gives data
    order, so metrics that keep per-image features see them in the single-process order."""
    return n * rank // world, n * (rank + 1) // world


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """Under torchrun on GPUs, 'auto'/'cuda' means this rank's GPU.

    An explicit ``cuda:N`` with several ranks on a node that has several GPUs would put every
    rank of the node on GPU N, which NCCL refuses with its own "duplicate GPU" error deep in the
    first collective: refused here in one sentence. One rank per node, or one visible GPU per rank
    (``CUDA_VISIBLE_DEVICES`` set per rank), keeps ``cuda:N``.
    """
    if launched() and torch.cuda.is_available():
        if device in ("auto", "cuda"):
            return f"cuda:{_check_local_gpu()}"
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if device.startswith("cuda:") and per_node > 1 and torch.cuda.device_count() > 1:
            from raebench.errors import RaebenchError

            raise RaebenchError(f"--device {device} under torchrun would put every rank of a node on one GPU; give "
                                "--device cuda (or auto): each rank then takes its own GPU, cuda:LOCAL_RANK.")
    return device


def from_rank0(obj):
    """Rank 0's ``obj`` on every rank of an initialised process group (``obj`` itself otherwise)."""
    if world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def refuse(message: str | None, cls: type | None = None) -> None:
    """Raise ``cls(message)`` (default :class:`~raebench.errors.RaebenchError`) on every rank when rank 0's
    ``message`` is not None; otherwise return. For refusals every rank would reach alike (a resume with other
    settings): rank 0 decides, so no rank goes on while another stops; the CLI prints the sentence once
    (rank 0) and every rank exits with status 2."""
    from raebench.errors import RaebenchError

    message = from_rank0(message)
    if message is not None:
        raise _mark((cls or RaebenchError)(message), quiet=rank() != 0)


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each of ``flags`` or-ed over every rank (one small all-reduce; one process: the flags). For loops whose
    ranks must stop together: a rank that alone stopped would leave the others waiting in their next collective."""
    if world_size() == 1:
        return tuple(bool(f) for f in flags)
    on = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=on)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def refuse_first(message: str | None, cls: type | None = None) -> None:
    """Raise the lowest rank's ``message`` that is not None as ``cls`` (default
    :class:`~raebench.errors.RaebenchError`) on every rank; return when no rank has one. Every rank must call
    it (:func:`any_rank` tells them when): unlike :func:`refuse`, any rank may hold the reason (its shard of
    the data). Printed once, by rank 0; every rank exits with status 2."""
    from raebench.errors import RaebenchError

    cls = cls or RaebenchError
    if world_size() == 1:
        if message is not None:
            raise cls(message)
        return
    said: list = [None] * world_size()
    td.all_gather_object(said, message)
    first = next((m for m in said if m is not None), None)
    if first is not None:
        raise _mark(cls(first), quiet=rank() != 0)


def gather_to_rank0(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the others (one process: ``[obj]``).

    For state only rank 0 reads (metric states before :func:`on_rank0`): the other ranks do not
    receive and unpickle every rank's per-image features, as ``all_gather_object`` made them do.
    ``obj`` travels as ``torch.save`` writes it (tensors, numbers, strings, containers; loaded with
    ``weights_only``): a storage that several lists share (the Inception features precision, density
    and KID keep together) is sent once and arrives shared, where pickle would send and rebuild one
    copy per list.
    """
    if world_size() == 1:
        return [obj]
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list | None = [None] * world_size() if rank() == 0 else None
    data = buf.getvalue()
    del buf  # one copy fewer alive while gather_object pickles the bytes
    td.gather_object(data, out, dst=0)
    del data
    if out is None:
        return None
    for i, data in enumerate(out):  # each rank's bytes dropped once loaded
        out[i] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        del data
    return out


def on_rank0(fn):
    """``fn()`` run on rank 0 alone, its result given to every rank (one process: just ``fn()``).

    For the final computation of merged metric states (precision/recall and the other k-NN metrics
    at 50k images cost minutes of CPU): the other ranks wait instead of repeating it, and do not
    rebuild the metric networks. Rank 0 raises what ``fn`` raised; the others get the same
    :class:`~raebench.errors.RaebenchError` class and sentence (a plain RaebenchError where the
    class cannot be rebuilt from its message; the CLI prints it on rank 0 only), or a RuntimeError
    naming any other exception. The result is pickled inside the guard, so an unpicklable one is
    such an exception too: no rank waits out the collective timeout.
    """
    if world_size() == 1:
        return fn()
    import pickle

    from raebench.errors import RaebenchError

    box: list = [None]
    if rank() == 0:
        try:
            result = fn()
            pickle.dumps(result)  # fails here, not inside the broadcast the others already wait in
            box[0] = ("ok", result)
        except BaseException as e:
            user = isinstance(e, RaebenchError)
            td.broadcast_object_list([("user" if user else "fail",
                                       (type(e).__module__, type(e).__qualname__, str(e)) if user
                                       else f"{type(e).__name__}: {e}")], src=0)
            if user:  # printed here; the other ranks raise it quietly and wait for this one to print it
                _mark(e, quiet=False)
            raise
    td.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    if kind == "user":
        raise _mark(_rebuild_error(*value), quiet=True)
    raise RuntimeError(f"rank 0 failed: {value}")


def on_every_rank(fn):
    """``fn()`` on every rank, then one exchange of the outcomes, so that a user error stops every
    rank together and its sentence is printed once.

    For set-up that every rank repeats alike and that holds no collective (arguments, checkpoints,
    tokenizers): a rank that raised a :class:`~raebench.errors.RaebenchError` raises it, printed by
    the lowest rank with that sentence (another sentence, e.g. of a file missing on one node only, is
    printed too); a rank that did not raise gets the lowest failing rank's error, quiet. Any other
    exception is re-raised on its rank (with its traceback) and the other ranks stop quietly. One
    process: just ``fn()``.
    """
    if world_size() == 1:
        return fn()

    def gather(mine):
        outcomes: list = [None] * world_size()
        td.all_gather_object(outcomes, mine)
        return outcomes

    return _agree(fn, gather, rank())


def before_group(fn):
    """:func:`on_every_rank` before the process group exists (its device and the group itself), the
    outcomes exchanged through torchrun's rendezvous store. Without torchrun: just ``fn()``."""
    if not launched():
        return fn()
    rank_, world = _env_rank_world()

    def gather(mine):
        import pickle

        store, key = _store(), f"outcome/{_next_key()}"
        store.set(f"{key}/{rank_}", pickle.dumps(mine))
        return [pickle.loads(store.get(f"{key}/{r}")) for r in range(world)]

    return _agree(fn, gather, rank_)


def _agree(fn, gather, my_rank: int):
    """``fn()`` here, every rank's outcome through ``gather``, and the error every rank then raises
    (see :func:`on_every_rank`)."""
    from raebench.errors import RaebenchError, first_line

    result, err, mine = None, None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - every rank must learn of it before any rank exits
        err = e
        mine = (("user", type(e).__module__, type(e).__qualname__, str(e)) if isinstance(e, RaebenchError)
                else ("fail", f"{type(e).__name__}: {first_line(e)}"))
    failed = [(r, o) for r, o in enumerate(gather(mine)) if o is not None]
    if not failed:
        return result
    every_rank = all(o[0] == "user" for _, o in failed)  # else a rank exits with its traceback, not waiting
    if err is not None and mine[0] != "user":
        raise _mark(err, quiet=False, every_rank=False)
    if err is not None:
        quiet = next(r for r, o in failed if o == mine) != my_rank
    else:
        r, o = failed[0]
        err = _rebuild_error(*o[1:]) if o[0] == "user" else RaebenchError(f"rank {r} stopped: {o[1]}.")
        quiet = True
    raise _mark(err, quiet, every_rank)


def _env_rank_world() -> tuple[int, int]:
    """torchrun's RANK and WORLD_SIZE (a process group need not exist yet)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


_STORE: list = []  # the rendezvous store of this process, once connected (rank 0 may host it)
_KEYS = [0]


def _next_key() -> str:
    """A key every rank computes alike (the same exchanges in the same order), new per exchange and
    per torchrun restart (the agent's store outlives the ranks it restarts)."""
    _KEYS[0] += 1
    return f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_KEYS[0]}"


def _store(seconds: float | None = None):
    """torchrun's key-value store (``env://``: MASTER_ADDR/PORT), under a prefix of raebench's own. Rank 0
    hosts it where torchrun's agent does not; init_process_group then shares that server (multi-tenant).
    ``seconds``: how long connecting may wait (default ``RAEBENCH_DIST_TIMEOUT_S``)."""
    if not _STORE:
        import datetime

        from raebench.errors import RaebenchError

        try:
            seconds = seconds or _timeout_s()
        except RaebenchError:  # refused by the set-up this store carries; wait as long as by default
            seconds = DEFAULT_TIMEOUT_S
        try:
            store, _, _ = next(td.rendezvous("env://", timeout=datetime.timedelta(seconds=seconds)))
        except td.DistError as e:  # rank 0 hosts the store and waits for every rank to connect
            if "timed out" not in str(e).lower():
                raise
            raise _not_formed(e, seconds) from e
        _STORE.append(td.PrefixStore("raebench", store))
    return _STORE[0]


#: seconds a rank leaving with an error every rank met waits for the others before it exits anyway
MEET_BEFORE_EXIT_S = 60


def meet_before_exit() -> None:
    """Wait until every rank of the job got here (the ranks leave together with one error: see
    ``raebench.cli._exit_together``): a barrier of the process group, or before one exists (a usage or
    device error), a count in the rendezvous store, given up after :data:`MEET_BEFORE_EXIT_S`."""
    if td.is_available() and td.is_initialized():
        td.barrier()
        return
    if not launched():
        return
    _arrive_and_wait(_store(), f"leaving/{_next_key()}", MEET_BEFORE_EXIT_S)


def _arrive_and_wait(store, key: str, seconds: float) -> bool:
    """Count this rank in at ``key`` of the store and wait until every rank has, at most ``seconds``:
    whether all came."""
    import time

    _, world = _env_rank_world()
    store.add(key, 1)
    deadline = time.monotonic() + seconds
    while store.add(key, 0) < world and time.monotonic() < deadline:
        time.sleep(0.05)
    return store.add(key, 0) >= world


#: seconds a rank that met a user error before any collective waits for the other ranks to report theirs
SAY_ONCE_WAIT_S = 30


def say_once(sentence: str, say) -> bool:
    """A user error this rank met before any collective (:func:`before_any_collective`): the ranks compare
    their sentences through torchrun's store, ``say()`` prints this rank's where no lower rank has the same
    one (rank 0 at once), and once every rank printed what it prints they leave together: True. A rank
    that does not report within :data:`SAY_ONCE_WAIT_S` (it did not meet an error, or met another kind)
    makes this rank say its own sentence and return False (it exits alone, as before this exchange)."""
    rank_ = _env_rank_world()[0]
    said = rank_ == 0
    if said:
        say()
    try:
        mine = sentence.encode("utf-8", "surrogateescape")  # a file name that is not UTF-8 stays as it is
        store = _store(SAY_ONCE_WAIT_S)
        key = f"exit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # one per process: it exits next
        store.set(f"{key}/{rank_}", mine)
        if _arrive_and_wait(store, f"{key}/n", SAY_ONCE_WAIT_S):
            if not said and mine not in {store.get(f"{key}/{r}") for r in range(rank_)}:
                say()  # another sentence than the lower ranks' (a file missing on this node only)
            said = True
            # no rank exits before every rank has printed: torchrun stops the others once one exits
            _arrive_and_wait(store, f"{key}/said", MEET_BEFORE_EXIT_S)
            return True
    except Exception:  # noqa: BLE001 - no store to compare through (its host rank gone): say it here
        pass
    if not said:
        say()
    return False


def _rebuild_error(module: str, qualname: str, message: str) -> Exception:
    """Rank 0's RaebenchError (sub)class with its message, else a plain RaebenchError."""
    import importlib

    from raebench.errors import RaebenchError

    try:
        cls = getattr(importlib.import_module(module), qualname)
        if isinstance(cls, type) and issubclass(cls, RaebenchError):
            return cls(message)
    except Exception:  # a class that takes other arguments, or is not importable here
        pass
    return RaebenchError(message)


def no_buffer_sync() -> dict[str, bool]:
    """DDP keyword that skips the per-forward buffer broadcast (raebench's buffers are constants).

    torch 2.14 deprecates ``broadcast_buffers`` for ``forward_sync_buffers`` (which still syncs once
    at init: harmless, every rank holds the same buffers) and warns on each launch; older torch has
    only ``broadcast_buffers``.
    """
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def pin_cuda(device: torch.device) -> torch.device:
    """Make ``device`` this process's current CUDA device and return it with its index.

    ``torch.cuda.set_device`` refuses a bare ``cuda`` ("Expected a torch.device with a specified
    index"), which is what ``--device cuda`` and ``auto`` give outside torchrun: that means the
    current device. Other devices come back unchanged.
    """
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def finish() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
