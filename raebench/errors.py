"""User-facing errors.

Every exception that a user can cause (a missing weight, an unknown name, an empty folder) is a
:class:`RaebenchError` whose message is one sentence saying what to do. The CLI prints the message
without a traceback; library callers can catch the class.
"""

from __future__ import annotations


class RaebenchError(Exception):
    """An error whose message is meant for the user, not a traceback.

    ``every_rank``: every rank of a torchrun job raises this error alike (a decision made on rank 0 and
    shared, :func:`raebench.distributed.refuse`); the CLI prints it on rank 0 alone, once, and every rank
    exits with the same status."""

    every_rank: bool = False


def on_every_rank(e: RaebenchError) -> RaebenchError:
    """``e`` marked as raised alike by every rank of the job (see :class:`RaebenchError`)."""
    e.every_rank = True
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
