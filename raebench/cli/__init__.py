"""The ``raebench`` command line (typer + rich). Library code logs; only the CLI prints.

Each command module defines ``register(app)``; ``MODULES`` lists them. User errors
(:class:`raebench.errors.RaebenchError`) print one red sentence and exit with status 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from raebench.errors import EVERY_RANK, QUIET, RaebenchError, printable
from raebench.preempt import Preempted

app = typer.Typer(
    name="raebench",
    help="Representation Autoencoders and a benchmark for image tokenizers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train RAE stage 1 (decoder) or stage 2 (DiT-DH).", no_args_is_help=True)
app.add_typer(train_app, name="train")

console = Console(stderr=False)
err_console = Console(stderr=True)


def print_table(table) -> None:
    """Print a rich table on standard output, its title on a line of its own above it. Into a pipe, a file or a job's log (not a terminal) it is
    printed at its own width: rich would fit it to 80 columns there, cutting names to `rae-dino…` and
    splitting numbers over two lines (`-2.382` / `0`). A terminal gets it fitted to the window."""
    from rich.measure import Measurement

    if table.title is not None:  # its own line, whole: as the table's title rich wraps it to the table's width
        console.print(table.title, style="table.title", highlight=False, soft_wrap=True)
        table.title = None
    if not console.is_terminal:
        need = Measurement.get(console, console.options.update(width=100_000), table).maximum
        if need > console.width:
            width = console.width
            console.width = need
            try:
                console.print(table)
            finally:
                console.width = width
            return
    console.print(table)

#: command modules under raebench.cli, each with register(app)
MODULES = ("core", "rae_cmds", "stage2_cmds", "analyze_cmds", "stage1_cmds", "metrics_cmds")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


for _m in MODULES:
    importlib.import_module(f"raebench.cli.{_m}").register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one sentence, not a traceback."""
    try:
        with _help_on_rank0(argv):
            code = app(args=argv, standalone_mode=False)
    except Preempted as e:  # SIGTERM/SIGUSR1: the job saved its state; 128 + the signal, as a shell reports it
        if e.show:
            err_console.print(f"[yellow]{printable(str(e))}[/]", highlight=False, soft_wrap=True)
        _leave_process_group()
        sys.exit(e.exit_code)
    except RaebenchError as e:
        def say():
            err_console.print(f"[bold red]error:[/] {escape(printable(str(e)))}", highlight=False, soft_wrap=True)

        # unmarked: may be a check every rank met alike before their first collective (said once then)
        together = None if hasattr(e, EVERY_RANK) else _said_once(str(e), say)
        if together:
            _exit_together(met=True)
        elif together is None:
            if not getattr(e, QUIET, False):  # under torchrun: printed by one rank, not by each
                say()
            if getattr(e, EVERY_RANK, False):
                _exit_together()
        _leave_process_group()
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]{_resume_hint(argv)}", highlight=False)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # usage errors arrive here with standalone_mode=False
        if isinstance(e, _usage_errors()):
            _usage_error(e)
        if isinstance(e, _aborts()):
            sys.exit(1)
        if _peer_failed(e):  # the failing rank printed its own error: not a second traceback here
            # a rank killed outright (SIGKILL, the OOM killer) prints nothing: "its error is above" was false then
            err_console.print("[bold red]error:[/] another rank of this torchrun job stopped; its error, if it printed "
                              "one, is above (a rank killed outright, e.g. by the out-of-memory killer, prints none: "
                              "torchrun's summary names the rank and its exit code); this rank stopped too.",
                              highlight=False, soft_wrap=True)
            sys.exit(1)
        if isinstance(e, OSError) and _storage_error(e) and not logging.getLogger().isEnabledFor(logging.DEBUG):
            # a full disk or a vanished mount: one sentence (written results and resume state stay whole)
            where = f" ({printable(str(e.filename))})" if e.filename else ""
            err_console.print(f"[bold red]error:[/] {printable(e.strerror or str(e))}{where}; free the space or fix "
                              "the path and re-run the same command to continue (-v shows the traceback).",
                              highlight=False, soft_wrap=True)
            _leave_process_group()
            sys.exit(2)
        raise
    if isinstance(code, int) and code:  # typer >= 0.29 returns Ctrl-C as exit code 130 instead of raising
        if code == 130:
            err_console.print(f"[yellow]interrupted[/]{_resume_hint(argv)}", highlight=False)
        sys.exit(code)


#: commands that keep their progress on disk, so that after Ctrl-C the same command continues
RESUMING = ("eval", "compare", "score", "train", "sample", "cache-latents")


def _resume_hint(argv: list[str] | None) -> str:
    """After Ctrl-C, tell the user of a resuming command that re-running it continues (from the last
    periodic save: eval and score save every 20 batches); a bare ``interrupted`` left them guessing."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if words and words[0] in RESUMING:
        return ": run the same command to continue from its last saved progress"
    return ""


def _storage_error(e: OSError) -> bool:
    """A disk or file-system condition the user fixes outside raebench (full, quota, read-only, I/O,
    stale mount, permissions); other OSErrors (a decoder's, a network's) keep their traceback."""
    import errno

    codes = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ESTALE,
             getattr(errno, "EDQUOT", errno.ENOSPC)}
    return e.errno in codes


def _peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is this rank's collective failing because another rank of the job exited."""
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    if not (td.is_available() and td.is_initialized() and td.get_world_size() > 1):
        return False
    text = str(e)
    return isinstance(e, getattr(td, "DistBackendError", ())) or any(
        m in text for m in ("Connection closed by peer", "Connection reset by peer", "remote process exited"))


def _said_once(sentence: str, say) -> bool | None:
    """An error raised before this torchrun rank's first collective: a check every rank runs alike (arguments,
    names, files), said once by comparing the ranks' sentences (:func:`raebench.distributed.say_once`; True:
    every rank met it). None outside torchrun or past the first collective (then a rank may fail alone)."""
    from raebench import distributed

    if not distributed.launched():
        return None
    return distributed.say_once(sentence, say) if distributed.before_any_collective() else None


def _help_on_rank0(argv: list[str] | None):
    """Under torchrun every rank parses the same ``--help``; ranks other than 0 discard their copy."""
    import contextlib
    import io
    import os

    from raebench import distributed

    words = sys.argv[1:] if argv is None else argv
    if distributed.launched() and os.environ.get("RANK", "0") != "0" and "--help" in words:
        return contextlib.redirect_stdout(io.StringIO())
    return contextlib.nullcontext()


def _exit_together(met: bool = False) -> None:
    """Every rank of the job is leaving with the same error (:mod:`raebench.distributed` marked it):
    wait for all of them, so that torchrun, which stops the others once one rank exits, neither cuts
    off the rank that prints the sentence nor turns the other ranks' exit code 2 into a SIGTERM.
    ``met``: they already waited for one another (:func:`raebench.distributed.say_once`)."""
    import signal

    try:
        from raebench import distributed

        if not met:
            distributed.meet_before_exit()  # before a process group exists (usage, device): through torchrun's store
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting anyway, with our own code
    except Exception:  # noqa: BLE001 - exiting anyway; the error above is what the user needs
        pass


def _usage_error(e) -> None:
    """A usage error (unknown option, bad value, missing argument): every rank of a torchrun job parses
    the same arguments and meets the same one, so rank 0 prints it and every rank exits with its status
    (2) together; one process prints it as click does."""
    import os

    from raebench import distributed

    if not distributed.launched():
        e.show()
        sys.exit(e.exit_code)
    if os.environ.get("RANK", "0") == "0":
        e.show()
    _exit_together()
    sys.exit(e.exit_code)


def _leave_process_group() -> None:
    """Destroy this rank's process group before a user-error exit (torchrun then stops the other
    ranks) instead of leaving NCCL's teardown to the interpreter's exit."""
    try:
        from raebench import distributed

        distributed.finish()
    except Exception:  # noqa: BLE001 - exiting anyway; the error above is what the user needs
        pass


def _usage_errors() -> tuple[type, ...]:
    """Click's ClickException, and typer's copy of it (typer >= 0.29 vendors click as ``typer._click``)."""
    import click

    classes = [click.exceptions.ClickException]
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # typer < 0.29 raises click's own
        pass
    else:
        classes.append(ClickException)
    return tuple(classes)


def _aborts() -> tuple[type, ...]:
    import click

    return tuple({click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort)})
