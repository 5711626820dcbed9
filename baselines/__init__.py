"""Baseline cards (installed as ``raebench.baselines``): what each tokenizer is and what was reported.

One declarative YAML card per tokenizer in ``cards/``: its source (repository, subfolder, revision,
loader), licence and gating, latent shape and normalisation, citation, the facts that were checked
and where (``verified``), and the numbers its authors or the RAE paper reported, each with the
protocol they used (dataset, n images, reference set, resolution) and its source. A number quoted
from someone other than the model's authors is ``secondary: true``.

Reported numbers become :class:`raebench.results.ResultRow` rows with ``source="reported"`` so that
``raebench compare`` and the leaderboard can put them beside measured values, never in the same
cell: a reported row carries its own n and reference. Cards may name tokenizers that are not
registered (yet); nothing here imports a model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import MISSING, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from raebench.errors import RaebenchError

log = logging.getLogger(__name__)

CARDS_DIR = Path(__file__).resolve().parent / "cards"
#: ``metric_version`` of every reported row: a paper's number is not one of our metric versions
REPORTED_VERSION = "reported"


class CardError(RaebenchError, ValueError):
    """A card does not follow the schema (unknown key, missing field, wrong type)."""


@dataclass(frozen=True)
class Fact:
    """Something checked while writing the card, and where: ``status`` is verified | secondary | unverified."""

    fact: str
    where: str
    status: str = "verified"


@dataclass(frozen=True)
class Reported:
    """One published number with the protocol that produced it."""

    metric: str  # raebench result name: fid (reconstruction FID when reference is the originals), psnr, ...
    value: float
    dataset: str  # raebench dataset name when one exists (imagenet-val, coco-val2017, ...)
    n_images: int | None
    reference: str  # what the reconstructions were compared with
    source: str  # where the number was read (URL + table)
    label: str = ""  # the name the source uses (rFID, PSNR)
    split: str = "val"
    resolution: int = 256
    secondary: bool = False  # quoted by someone other than the model's authors
    weights_match: bool = True  # False: reported for a variant that is not what the tokenizer loads
    verified: bool = True  # False: taken from the brief/issue, not re-read in the source
    higher_is_better: bool | None = None  # only needed when the metric is not registered
    notes: str = ""


@dataclass(frozen=True)
class Card:
    name: str
    tokenizer: str
    title: str
    loader: str
    source: dict[str, Any]
    licence: str
    gated: bool
    latent: dict[str, Any]
    citation: str
    verified: tuple[Fact, ...] = ()
    reported: tuple[Reported, ...] = ()
    notes: str = ""

    @property
    def weights_id(self) -> str:
        repo = self.source.get("repo") or "?"
        rev = self.source.get("revision")
        return f"{repo}@{rev}" if rev else repo


#: what each annotation of the card dataclasses accepts from YAML (bool is not an int here)
_ACCEPTS = {
    "str": ((str,), "a string"), "int": ((int,), "an integer"), "int | None": ((int, type(None)), "an integer or null"),
    "bool": ((bool,), "true or false"), "bool | None": ((bool, type(None)), "true, false or null"),
    "float": ((int, float), "a number"), "dict[str, Any]": ((dict,), "a mapping"),
    "tuple[Fact, ...]": ((list, tuple), "a list"), "tuple[Reported, ...]": ((list, tuple), "a list"),
}


def _strict(cls, data: Any, where: str) -> dict[str, Any]:
    """Check ``data`` against dataclass ``cls``: unknown keys, missing required keys and values of the
    wrong type are CardErrors naming the card and the key."""
    if not isinstance(data, dict):
        raise CardError(f"{where}: expected a mapping, got {type(data).__name__}.")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CardError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}.")
    missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
    if missing:
        raise CardError(f"{where}: missing key(s) {missing}.")
    for f in fields(cls):
        ok, what = _ACCEPTS.get(str(f.type), (None, ""))
        v = data.get(f.name)
        if f.name in data and ok is not None and (not isinstance(v, ok) or (isinstance(v, bool) and bool not in ok)):
            raise CardError(f"{where}: {f.name} must be {what}, got {v!r}.")
    return data


def parse_card(data: dict[str, Any], where: str = "card") -> Card:
    d = dict(_strict(Card, data, where))
    d["verified"] = tuple(Fact(**_strict(Fact, f, f"{where}: verified[{i}]")) for i, f in enumerate(d.get("verified") or ()))
    rep = []
    for i, r in enumerate(d.get("reported") or ()):
        r = dict(_strict(Reported, r, f"{where}: reported[{i}]"))
        try:
            r["value"] = float(r["value"])
            if not math.isfinite(r["value"]):
                raise ValueError(f"value {r['value']} is not a finite number")
            rep.append(Reported(**r))
        except (KeyError, TypeError, ValueError) as e:
            raise CardError(f"{where}: reported[{i}]: {e}") from None
    d["reported"] = tuple(rep)
    try:
        card = Card(**d)
    except TypeError as e:
        raise CardError(f"{where}: {e}") from None
    for f in card.verified:
        if f.status not in ("verified", "secondary", "unverified"):
            raise CardError(f"{where}: verified status {f.status!r} must be verified, secondary or unverified.")
    return card


@lru_cache(maxsize=4)
def load_cards(directory: str | None = None) -> tuple[Card, ...]:
    """Every ``*.yaml`` card, sorted by name (cached; ``directory`` for tests)."""
    root = Path(directory) if directory else CARDS_DIR
    cards = []
    for p in sorted(root.glob("*.yaml")):
        try:
            with open(p, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise CardError(f"{p.name}: not valid YAML ({str(e).splitlines()[0]}).") from None
        cards.append(parse_card(data, where=p.name))
    names = [c.name for c in cards]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CardError(f"duplicate card names {dup} in {root}.")
    return tuple(sorted(cards, key=lambda c: c.name))


def get_card(name: str) -> Card:
    """The card of tokenizer ``name`` (canonical registry name or card name)."""
    for c in load_cards():
        if name in (c.name, c.tokenizer):
            return c
    raise RaebenchError(f"No baseline card for {name!r}; cards exist for {', '.join(c.name for c in load_cards())}.")


def _hib(r: Reported, where: str) -> bool | None:
    """The metric registry decides; a card's own ``higher_is_better`` is used only for metrics the
    registry does not know yet, and must agree with the registry once it does."""
    from raebench.metrics import higher_is_better

    h = higher_is_better(r.metric)
    if h is None:
        return r.higher_is_better
    if r.higher_is_better is not None and r.higher_is_better != h:
        raise CardError(f"{where}: {r.metric} is higher_is_better={h} in the metrics registry, the card says {r.higher_is_better}.")
    return h


def rank(r: Reported) -> int:
    """Preference among several numbers for the same protocol: authors' verified > secondary > unverified."""
    return (0 if r.verified else 2) + (1 if r.secondary else 0)


def reported_rows(tokenizers: list[str] | None = None, include_variants: bool = False) -> list:
    """Reported numbers as ResultRows (``source="reported"``), optionally for some tokenizers only.

    ``include_variants``: also rows reported for a variant the tokenizer does not load
    (``weights_match: false``, e.g. RAE's decoder trained without noise).
    """
    from raebench.data import DATASETS
    from raebench.results import ResultRow

    out = []
    for card in load_cards():
        if tokenizers is not None and card.tokenizer not in tokenizers:
            continue
        for r in card.reported:
            if not (r.weights_match or include_variants):
                continue
            domain = DATASETS.get(r.dataset).domain if r.dataset in DATASETS else "unknown"
            out.append(ResultRow(
                tokenizer=card.tokenizer, weights_id=card.weights_id, dataset=r.dataset, split=r.split, domain=domain,
                resolution=r.resolution, n_images=r.n_images if r.n_images is not None else -1, metric=r.metric,
                value=r.value, higher_is_better=_hib(r, card.name), metric_version=REPORTED_VERSION, source="reported",
                notes=r.notes, run_id=f"card:{card.name}",
                extra={"reference": r.reference, "citation": r.source, "label": r.label or r.metric,
                       "secondary": r.secondary, "verified": r.verified, "weights_match": r.weights_match,
                       "card": card.name, "rank": rank(r)},
            ))
    return out


def reported_frame(tokenizers: list[str] | None = None, include_variants: bool = False):
    """:func:`reported_rows` as a DataFrame: the results columns plus ``reference``, ``citation``,
    ``secondary``, ``verified``, ``weights_match`` and ``rank`` (also kept in ``extra``)."""
    from dataclasses import asdict

    import pandas as pd

    from raebench.results import COLUMNS

    keys = ("reference", "citation", "secondary", "verified", "weights_match", "rank")
    rows = reported_rows(tokenizers, include_variants)
    if not rows:
        return pd.DataFrame(columns=[*COLUMNS, *keys])
    recs = []
    for r in rows:
        d = asdict(r)
        d.update({k: r.extra[k] for k in keys})
        recs.append(d)
    return pd.DataFrame.from_records(recs)


__all__ = ["Card", "CardError", "Fact", "Reported", "get_card", "load_cards", "parse_card", "rank", "reported_frame",
           "reported_rows", "REPORTED_VERSION"]
