"""Weights resolution shared by every model raebench loads.

Order: an explicit local path (file or directory) > the Hugging Face cache (``HF_HUB_CACHE``, else
``HF_HOME``/hub, else ``$XDG_CACHE_HOME``/huggingface/hub; ``HF_HUB_OFFLINE=1`` means "cache only") >
a download. When none works, the error is one sentence naming the repository/file and the flag or
cache path that supplies it.

A :class:`WeightsSource` is metadata: declaring one never touches the network, so registries can
list sources without loading anything.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from raebench.errors import MissingWeightsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsSource:
    """Where a set of weights lives on the Hugging Face Hub.

    ``filename`` set: one file (``subfolder/filename`` in the repo). ``filename`` None: a snapshot of
    the repo, restricted to ``allow_patterns`` (and to ``subfolder`` if given).
    """

    repo_id: str
    filename: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    allow_patterns: tuple[str, ...] = ()
    gated: bool = False
    description: str = ""

    @property
    def path_in_repo(self) -> str:
        parts = [p for p in (self.subfolder, self.filename) if p]
        return "/".join(parts) if parts else "."

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        where = "" if self.path_in_repo == "." else f":{self.path_in_repo}"
        return f"hf://{self.repo_id}{rev}{where}"

    def download_hint(self) -> str:
        cmd = f"hf download {self.repo_id}"
        if self.filename:
            cmd += f" {self.path_in_repo}"
        elif self.allow_patterns:
            cmd += " " + " ".join(f"--include '{p}'" for p in self.allow_patterns)
        elif self.subfolder:
            cmd += f" --include '{self.subfolder}/*'"
        if self.revision:
            cmd += f" --revision {self.revision}"
        return cmd


def hf_offline() -> bool:
    """True when the user asked the Hub libraries not to touch the network (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hf_cache_dir() -> Path:
    """The hub cache folder the Hub client reads and ``hf download`` fills: huggingface_hub's own
    ``constants.HF_HUB_CACHE`` (``HF_HUB_CACHE`` > ``HF_HOME``/hub > ``$XDG_CACHE_HOME``/huggingface/hub >
    ~/.cache/huggingface/hub, as read when huggingface_hub was imported), so that a message names the
    folder that is searched, not one rebuilt from the environment of the moment."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_cache_move_hint() -> str:
    """How to point the cache elsewhere: ``HF_HUB_CACHE`` wins over ``HF_HOME`` when it is set."""
    return "set HF_HUB_CACHE to move it" if os.environ.get("HF_HUB_CACHE") else "set HF_HOME to move it"


#: how the running command spells the flags that supply a local copy (None: as the flag is given)
_LOCAL_FLAGS: ContextVar[Callable[[str], str] | None] = ContextVar("raebench_local_flags", default=None)


@contextmanager
def local_flags(spell: Callable[[str], str]) -> Iterator[None]:
    """Inside the block, missing-weights sentences end with ``spell(flag)`` instead of
    ``, or pass a local copy with FLAG``: for commands whose flags differ from the builders' (eval's
    ``--weights DIR``), e.g. ``--weights NAME=PATH`` in compare/analyze."""
    token = _LOCAL_FLAGS.set(spell)
    try:
        yield
    finally:
        _LOCAL_FLAGS.reset(token)


def named_flags(command: str, name: str, options: tuple[str, ...]) -> AbstractContextManager[None]:
    """For commands that take local weights per tokenizer as ``OPTION NAME=PATH``: ``options`` are the
    ones ``command`` has (compare: --weights; analyze: --weights, --decoder, --stats)."""

    def spell(flag: str) -> str:
        option, _, what = flag.partition(" ")  # "--weights DIR holding ..." -> "--weights NAME=DIR holding ..."
        if option in options:
            return f", or pass a local copy with {option} {name}={what or 'PATH'}"
        return (f"; `{command}` has no {option} option: put the file in that cache, or give {name}'s files "
                f"with --weights {name}=DIR (the layout of their Hub repo)")

    return local_flags(spell)


def local_copy_hint(flag: str) -> str:
    """The end of a missing-weights sentence: ``, or pass a local copy with FLAG``, or the running
    command's spelling of it (:func:`local_flags`)."""
    spell = _LOCAL_FLAGS.get()
    return f", or pass a local copy with {flag}" if spell is None else spell(flag)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _check_snapshot(folder: Path, patterns: list[str] | None, subfolder: str | None) -> None:
    """A cached snapshot is returned even when only some of its files were ever fetched (a config
    without weights, say); it counts as present only with its config.json (when asked for) and at
    least one weights file among the requested patterns."""
    import fnmatch

    root = folder.parent if subfolder else folder
    files = [f.relative_to(root).as_posix() for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []
    wanted = patterns or [f"{subfolder}/*" if subfolder else "*"]
    matched = [f for f in files if any(fnmatch.fnmatch(f, pat) for pat in wanted)]
    weights = [f for f in matched if f.endswith(_WEIGHT_SUFFIXES)]
    config_missing = any(pat.endswith("config.json") for pat in wanted if "*" not in pat) and not any(
        f.endswith("config.json") for f in matched)
    if not weights or config_missing:
        raise FileNotFoundError(f"incomplete snapshot {folder} (has {matched[:5]})")


def resolve(
    source: WeightsSource | None,
    local: str | os.PathLike | None = None,
    *,
    what: str = "weights",
    flag: str = "--weights",
) -> Path:
    """Return a local path (file or directory) holding ``source``.

    Args:
        source: the hub location; may be None when only ``local`` can supply the weights.
        local: an explicit file or directory given by the user; wins over everything else.
        what: a few words naming the model, for the error message.
        flag: the CLI flag that supplies a local path, for the error message.
    Raises:
        MissingWeightsError: one sentence saying what to fetch and where to put it.
    """
    if local is not None:
        p = Path(local).expanduser()
        if not p.exists():
            raise MissingWeightsError(f"{what}: the local path {str(p)!r} given with {flag} does not exist.")
        if p.is_dir() and source is not None and source.filename:
            cand = p / source.path_in_repo
            if cand.exists():
                return cand
            cand = p / source.filename
            if cand.exists():
                return cand
        return p
    if source is None:
        raise MissingWeightsError(f"{what} has no download source; pass a local file or directory with {flag}.")

    offline = hf_offline()
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if source.filename:
            path = hf_hub_download(
                source.repo_id,
                source.filename,
                subfolder=source.subfolder,
                revision=source.revision,
                local_files_only=offline,
            )
        else:
            patterns = list(source.allow_patterns) or (
                [f"{source.subfolder}/*"] if source.subfolder else None
            )
            path = snapshot_download(
                source.repo_id,
                revision=source.revision,
                allow_patterns=patterns,
                local_files_only=offline,
            )
            if source.subfolder:
                path = os.path.join(path, source.subfolder)
            _check_snapshot(Path(path), patterns, source.subfolder)
        return Path(path)
    except Exception as exc:  # every hub failure becomes one actionable sentence
        log.debug("weights resolution failed for %s", source, exc_info=True)
        reason = "HF_HUB_OFFLINE=1 and they are not in the cache" if offline else (
            f"the download failed ({type(exc).__name__})"
        )
        gated = " The repository is gated: accept its licence on the Hub and log in with `hf auth login`." if source.gated else ""
        item = f"file {source.path_in_repo!r} from" if source.filename else (
            f"folder {source.subfolder!r} of" if source.subfolder else "the files of")
        raise MissingWeightsError(
            f"{what} not found: {reason}; fetch {item} Hugging Face repo "
            f"{source.repo_id!r} (`{source.download_hint()}`) into the cache at {hf_cache_dir()} "
            f"({hf_cache_move_hint()}){local_copy_hint(flag)}.{gated}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Identity of a tokenizer's weights (``weights_id``)
# ---------------------------------------------------------------------------------------------

#: ``<label>@<fingerprint>[+<part>:<fingerprint>...]``: a readable label (the Hub repo, snapshot and file;
#: ``local:<name>``; ``diffusers:<name>``; ``official:<name>``), then the content fingerprints of the main
#: weights and of its other parts (``enc``, ``stats``), 12 hex digits each (``fingerprint_path``)
_CONTENT_ID = re.compile(r"^(?P<label>.*?)@(?P<content>[0-9a-f]{12}(?:\+[a-z]+:[0-9a-f]{12})*)$")
#: labels of weights the user supplied (never the released ones that cards report)
LOCAL_LABELS = ("local:", "diffusers:", "official:")


def _parse(weights_id: str) -> tuple[str, str] | None:
    m = _CONTENT_ID.match(weights_id) if isinstance(weights_id, str) else None
    return (m["label"], m["content"]) if m else None


def weights_key(weights_id: str) -> str:
    """What identifies the weights themselves: the content part of ``weights_id`` (its fingerprints), so
    the same files reached through the Hub cache, a ``--weights`` copy or a renamed file have one key;
    an identity without fingerprints (``none``, ``random``, rows stored before 2026-11-27 for the released
    weights, ``nyu-visionx/RAE-collections:decoders/...``) is its own key."""
    parsed = _parse(weights_id)
    if parsed is None:
        return weights_id
    # a diffusers-format RAE (one file) or an official YAML's files are put together otherwise than a Hub or
    # local decoder with its encoder and statistics: the same bytes there are another tokenizer
    kind = next((k for k in ("diffusers:", "official:") if parsed[0].startswith(k)), "")
    return f"{kind}@{parsed[1]}"


def released_label(weights_id: str) -> str | None:
    """The Hub label of an identity with fingerprints (``stabilityai/sd-vae-ft-ema@0123456789ab``), which is
    the whole identity that rows, checkpoints and caches recorded for those released weights before
    identities carried content; None for other identities and for weights the user supplied."""
    parsed = _parse(weights_id)
    if parsed is None or not parsed[0] or parsed[0].startswith(LOCAL_LABELS):
        return None
    return parsed[0]


def recorded_before(weights_id: str) -> tuple[str, ...]:
    """What rows, checkpoints and caches recorded for the released weights ``weights_id`` names before
    identities carried the main weights' content: its Hub label alone, or with its other parts
    (``hustvl/...@<rev>:<file>+stats:<fingerprint>``)."""
    label = released_label(weights_id)
    if label is None:
        return ()
    parts = weights_id[len(label):].partition("+")
    return (label, label + "+" + parts[2]) if parts[2] else (label,)


def same_weights(a: str | None, b: str | None) -> bool:
    """Whether two ``weights_id`` name the same weights: by content (:func:`weights_key`), so the Hub copy and a
    local copy, or a renamed file, are the same weights; an identity recorded before identities carried
    content for the released weights (a Hub label alone) is the same as a current one with that label,
    as it was then."""
    if not (isinstance(a, str) and isinstance(b, str)):  # None (not recorded) or anything else: as it is
        return a == b
    return a == b or weights_key(a) == weights_key(b) or b in recorded_before(a) or a in recorded_before(b)
