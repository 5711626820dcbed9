"""User-facing errors.

Every exception that a user can cause (a missing weight, an unknown name, an empty folder) is a
:class:`RaebenchError` whose message is one sentence saying what to do. The CLI prints the message
without a traceback; library callers can catch the class.
"""

from __future__ import annotations


class RaebenchError(Exception):
    """An error whose message is meant for the user, not a traceback."""


#: attributes the CLI reads on an error (:func:`raebench.cli.main`), set by :func:`mark_ranks`:
#: ``QUIET``, another rank of the torchrun job prints this sentence, so this one does not print it again;
#: ``EVERY_RANK``, every rank of the job raises it together (a collective told them), so they wait for one
#: another before exiting (torchrun would stop the printing rank before it printed) and all exit with status 2
QUIET, EVERY_RANK = "_raebench_quiet", "_raebench_every_rank"


def mark_ranks(e: BaseException, quiet: bool, every_rank: bool = True) -> BaseException:
    """``e`` marked for the CLI under torchrun (see ``QUIET`` / ``EVERY_RANK``); returned for ``raise``."""
    try:
        setattr(e, QUIET, quiet)
        setattr(e, EVERY_RANK, every_rank)
    except AttributeError:  # an exception class with __slots__: printed by every rank, as without a mark
        pass
    return e


class UnknownNameError(RaebenchError, KeyError):
    """A registry lookup failed; the message carries close-name suggestions."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class MissingWeightsError(RaebenchError, FileNotFoundError):
    """Pretrained weights are not available locally and could not be downloaded."""


class DataError(RaebenchError, ValueError):
    """A dataset cannot be used (empty folder, no readable image, bad npz)."""


class CheckpointError(RaebenchError, ValueError):
    """A checkpoint does not match the model it is loaded into, or is unsafe to load."""


class NonFiniteError(RaebenchError, FloatingPointError):
    """A tokenizer produced NaN or Inf in its latents or images."""


def first_line(e: BaseException, n: int = 120) -> str:
    """An exception's first line, cut at a word boundary to at most ``n`` characters (for one-sentence errors)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return line if len(line) <= n else line[:n].rsplit(" ", 1)[0] + " ..."


def check_rates(cfg: object, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
    """A training config's learning rates and the like: finite, and > 0 (``positive``) or >= 0."""
    import math

    for name in (*positive, *non_negative):
        v = getattr(cfg, name)
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not number or not (v > 0 if name in positive else v >= 0):
            raise RaebenchError(f"{name} must be a finite number {'above' if name in positive else 'at least'} 0, got {v!r}.")


def printable(text: str) -> str:
    """``text`` safe to print: the bytes of a file name that is not UTF-8 (surrogate-escaped by
    Python) shown as ``\\xNN``. Records keep the lossless name; a strict console
    refuses the surrogates (UnicodeEncodeError)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
