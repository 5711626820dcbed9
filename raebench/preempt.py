"""Graceful stop on SIGTERM / SIGUSR1, the signals of cluster preemption.

SLURM sends SIGTERM at a time limit or preemption and SIGKILL after its grace period (``KillWait``,
often 30-120 s); ``#SBATCH --signal=USR1@120`` asks for SIGUSR1 earlier. Kubernetes sends SIGTERM
and SIGKILL after ``terminationGracePeriodSeconds``; torchrun forwards SIGTERM to its ranks and kills
them after ``--shutdown-timeout`` (30 s by default).

While a long job's loop runs inside :class:`StopOnSignal`, those signals only set a flag. The loop
looks at it after each unit of work (a training step, an evaluation or sampling batch), saves its
resume state there exactly as a periodic save does, and raises :class:`Preempted`; the CLI prints its
one line and exits with 128 + the signal number (143 for SIGTERM). A second signal during the save
only sets the flag again, so the save (atomic anyway) completes. Leaving the block restores the
previous handlers; a signal that arrived after the loop's last look is then re-raised, so it is
never swallowed.

Ranks that share each step (the trainers) agree on the step to stop at: each contributes a one-hot
flag vector to a sum (:meth:`StopOnSignal.mark` / :meth:`StopOnSignal.decide`), so every rank
stops after the same step whichever of them the signal reached first. Jobs whose ranks work on
their own shards (eval, score, sample, cache-latents) stop each rank on its own signal.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger(__name__)

#: the signals that stop a long job gracefully (SIGINT keeps raising KeyboardInterrupt)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A long job stopped on a signal after saving its resume state.

    ``exit_code`` is 128 + the signal number (the shell's convention); ``show`` is False on the ranks
    of a training job other than rank 0, which stop at the same step and have nothing to add.
    """

    def __init__(self, signum: int, message: str, show: bool = True) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.show = show

    @classmethod
    def saved(cls, signum: int, where: str, kept: str = "progress", show: bool = True) -> "Preempted":
        """The stop of a job whose resume state is saved: ``stopped by SIGTERM {where}: {kept} saved;
        run the same command to continue``."""
        return cls(signum, f"stopped by {signal_name(signum)} {where}: {kept} saved; run the same command to continue",
                   show)


def of_rank(rank: int, world: int) -> str:
    """`` of rank R`` under torchrun (where each rank stops on its own), else nothing."""
    return f" of rank {rank}" if world > 1 else ""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignal:
    """Context manager: while active, the stop signals set :attr:`received` instead of killing the process.

    Outside the main thread (where Python cannot install handlers) it changes nothing and never
    reports a signal.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None  # the first stop signal received
        self._previous: dict[int, object] = {}
        self._acted = False

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum: int, frame) -> None:
        # nothing else here: the loop decides when to stop, so a second signal cannot interrupt a save
        if self.received is None:
            self.received = signum

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old)
        self._previous.clear()
        if self.received is not None and not self._acted and exc_type is None:
            # arrived after the loop's last look: delivered now to the handler it would have met
            signal.raise_signal(self.received)

    def local(self) -> int | None:
        """This process's signal, marked as acted on (for jobs whose ranks stop independently)."""
        if self.received is not None:
            self._acted = True
        return self.received

    def mark(self, slots: torch.Tensor) -> torch.Tensor:
        """Write 1 at this process's signal into ``slots`` (len(signals),), a zeroed slice of a tensor
        that the caller sums over the ranks (its own all-reduce, or one the step makes anyway);
        :meth:`decide` reads the sum. Nothing is written (no device copy) while no signal came."""
        if self.received is not None:
            slots[self.signals.index(self.received)] = 1
        return slots

    def decide(self, summed) -> int | None:
        """The signal to stop on from :meth:`mark`'s slots summed over the ranks (a tensor or a list;
        the first stop signal any rank got), else None."""
        values = summed.tolist() if isinstance(summed, torch.Tensor) else list(summed)
        hit = [s for s, v in zip(self.signals, values) if v > 0]
        if not hit:
            return None
        self._acted = True
        return hit[0]

    def agree(self, device: torch.device | str = "cpu") -> int | None:
        """The signal every rank stops on after this step (one small all-reduce with several ranks), else None."""
        import torch.distributed as dist

        from raebench import distributed

        if distributed.world_size() == 1:
            return self.local()
        f = self.mark(torch.zeros(len(self.signals), device=device))
        dist.all_reduce(f)
        return self.decide(f)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals.

    SLURM signals every process of a job step, DataLoader workers included, and torch's workers die
    on SIGTERM (SIGUSR1 kills by default), which makes the main process raise "DataLoader worker
    ... is killed by signal" in the middle of the step it should finish. The main process stops the
    workers itself; a worker whose main process is gone exits on its own (torch's watchdog).
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
