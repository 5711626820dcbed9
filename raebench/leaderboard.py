"""Leaderboards and comparisons: pivots of result rows, never hand-edited tables.

Numbers measured under different protocols never share a cell or a ranking. A leaderboard column is
one protocol: dataset, resolution, number of images and source (measured here, or reported by a
paper/model card), e.g. ``coco-val2017 n=5000 reported/psnr``; a measured run on 17 images and a
published number on 5,000 land in different columns, with the n in the header (a measured column
shows its n whenever another n exists for its dataset or the table has reported columns). Measured
columns are also apart by image list, split, seed, metric version and the weights of the metric's networks
(``default seed=1/probe-knn-top1``, ``default [fid-v1+dtype=float64]/fid``, ``default [networks #1a2b3c]/fid``,
each shown only where it tells columns apart), so a cell holds
exactly one measurement; reported columns by reference (shown where one dataset/n/metric has several)
and by whether the number is for a variant the tokenizer does not load (``reported variant``). The
resolution shows on every column when the table has several, and with ``explicit`` (the CSV export, which has
no caption to state what columns share) every column names its resolution and n. ``best`` is computed within a column
(leaderboard) or within the measured cells of a row that share n and metric version (compare), using
the metric's ``higher_is_better``: ties (equal as shown) are all best; there is none when the best is
not finite, for spreads (``kid-std``, ``is-std``), for a lone value, nor when all values tie (bold marks
a value that beat another).

The domain gap (seed question: is a tokenizer stable outside its training set?) is, per tokenizer,
metric and metric version, an open-domain value minus the in-domain value at the same resolution,
from measured rows only; its columns read ``gap coco-val2017 - imagenet-val/psnr``. For PSNR a
negative gap is a loss outside the training domain; for FID a positive one is. Each side is the
tokenizer's largest run; where tokenizers' gaps come from other image sets (n or image list), each set
pair is its own column (``gap coco-val2017 n=50 - imagenet-val n=100/psnr``), ranked apart.

A leaderboard row is one tokenizer; when a tokenizer was measured with several weights (told apart by
content: the Hub copy and a local copy of the same files are one row, under the released label), precisions
or (``score`` rows) candidate sets, each gets its own row, labelled with what differs
(``sd-vae-ft-ema [local:/w2]``, ``pixels [bf16]``, ``reconstructions [cand #1a2b3c]``); local weights
and a precision other than fp32 are labelled always. A measured
value that is NaN (an analysis with notes) shows as ``–``; its row and column stay.

The CSV, Markdown and LaTeX text of these tables is written by :mod:`raebench.export`.
"""

from __future__ import annotations

import math
from typing import Iterable

import pandas as pd

from raebench.results import KEY_COLUMNS, sort_newest_last

MISSING = "–"


def _fmt(v, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"  # a Δ or gap against an infinite value keeps its sign
    if not isinstance(v, (int, float)):
        return str(v)
    a = abs(v)
    # decided on the rounded value: 9.99996 reads 10.00 as 10.00001 does, 99999.996 as 1.000e+05
    if a != 0 and (round(a, 2) >= 1e5 or a < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}" if round(a, 4) < 10 else f"{v:.2f}"


def _n(n) -> str:
    return "n=?" if n is None or (isinstance(n, (int, float)) and (n < 0 or math.isnan(n))) else f"n={int(n)}"


def _newest(m: pd.DataFrame) -> pd.DataFrame:
    """The newest stored row of each measurement (several when read with ``load(latest=False)``)."""
    return sort_newest_last(m).drop_duplicates([c for c in KEY_COLUMNS if c in m], keep="last")


def _measured(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["source"].fillna("measured") == "measured"] if "source" in df else df


def _reported(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["source"] == "reported"] if "source" in df else df.iloc[0:0]


def _protocol(rep: pd.DataFrame) -> pd.DataFrame:
    """``rep`` with ``reference`` and ``variant`` (``weights_match`` is false: a number for a variant the
    tokenizer does not load) as columns, from ``reported_frame``'s columns or, for stored rows, ``extra``."""
    extra = [e if isinstance(e, dict) else {} for e in rep["extra"]] if "extra" in rep else [{}] * len(rep)

    def field(name: str) -> pd.Series:
        return rep[name] if name in rep else pd.Series([e.get(name) for e in extra], index=rep.index, dtype=object)

    # weights_match False (numpy's too) is a variant; a number that does not say is not
    return rep.assign(reference=field("reference").fillna("").astype(str),
                      variant=field("weights_match").map(lambda v: v is not None and v == 0))


#: a reported number's protocol: what a leaderboard column of reported numbers holds one of
REPORTED_KEY = ("tokenizer", "dataset", "resolution", "n_images", "metric", "reference", "variant")


def prefer_reported(rep: pd.DataFrame, keys: Iterable[str] = REPORTED_KEY) -> pd.DataFrame:
    """One reported number per ``keys`` (default: per tokenizer and protocol, :data:`REPORTED_KEY`): numbers
    for the weights the tokenizer loads before variants, then the best-ranked (authors' verified first);
    ``others`` counts the numbers left out for that key. Adds ``reference`` and ``variant`` columns."""
    rep = _protocol(rep)
    if rep.empty:
        return rep.assign(others=0)
    if "rank" not in rep:
        rep["rank"] = 0
    keys = list(keys)
    rep["others"] = rep.groupby(keys, dropna=False)["value"].transform("size") - 1
    return rep.sort_values(["variant", "rank"], kind="stable").drop_duplicates(keys, keep="first")


def _is_spread(metric: str) -> bool:
    """A spread of another metric (``kid-std``, ``is-std``): no best. The registry gives them no direction
    (None) now, but rows stored before say lower-is-better, so the ``-std`` suffix that every such output
    carries decides."""
    return str(metric).endswith("-std")


def _best(values: pd.Series, metric: str, h: bool | None) -> list:
    """Index labels of the best finite value of ``values`` (every one of them on ties); none for a
    spread, a metric without a direction, a best that is not finite (a column of inf), a lone value
    (nothing to beat) or values that all tie (nothing told apart): bold marks a value that beat another.
    Ties are equal at the precision shown (:func:`_fmt`): of 25.1234 and 25.1249, both shown 25.12,
    bolding one would mark a difference the table does not show (the CSV keeps full precision)."""
    s = pd.to_numeric(values, errors="coerce").dropna()
    if h is None or len(s) < 2 or _is_spread(metric):
        return []
    b = s.max() if h else s.min()
    best = s.index[s.map(_fmt) == _fmt(b)]
    return list(best) if math.isfinite(b) and len(best) < len(s) else []


# ---------------------------------------------------------------------------------------------
# Leaderboard: tokenizers x protocol/metric
# ---------------------------------------------------------------------------------------------

#: what tells apart the measurements of one tokenizer, and how a row label shows it
_VARIANTS = (("weights_id", lambda v: f" [{v}]"), ("precision", lambda v: f" [{v}]"),
             ("candidates_fingerprint", lambda v: f" [cand #{v[:6]}]"))

#: the parts of a measured column's key, besides dataset, resolution, n and image list; a label shows
#: each where columns that agree on everything else differ in it
_MEASURED_KEY = ("dataset", "split", "resolution", "n_images", "data_fingerprint", "metric", "metric_version", "seed",
                 "metric_networks")


def _networks(v: pd.Series) -> pd.Series:
    """How a label shows a ``metric_networks`` identity (see :func:`raebench.results.metric_networks`)."""
    v = v.fillna("").astype(str)
    return " [networks " + v.where(v == "", "#" + v.str[:6]).replace("", "unrecorded") + "]"


def _one_id_per_weights(d: pd.DataFrame) -> pd.DataFrame:
    """``d`` with the ``weights_id`` of rows that name the same weights (by content,
    :func:`raebench.weights.same_weights`: the Hub copy and a ``--weights`` copy; an older row's Hub label)
    made one per tokenizer: the released identity where there is one, else the newest row's. A tokenizer's
    rows of the same weights are then one leaderboard row, one measurement per cell."""
    from raebench.weights import LOCAL_LABELS, recorded_before, weights_key

    if d.empty or "weights_id" not in d:
        return d
    d = sort_newest_last(d)
    out = d["weights_id"].astype(str).tolist()
    for _, idx in d.groupby("tokenizer", sort=False).groups.items():
        ids = list(dict.fromkeys(d.loc[idx, "weights_id"].astype(str)))  # oldest first
        key = {w: weights_key(w) for w in ids}
        for w in ids:  # an older row's Hub label: the weights of the current identity with that label
            for v in ids:
                if w in recorded_before(v):
                    key[w] = key[v]
        chosen: dict[str, str] = {}
        for w in ids:  # the released identity first, else the newest
            if key[w] not in chosen or not w.startswith(LOCAL_LABELS) or chosen[key[w]].startswith(LOCAL_LABELS):
                chosen[key[w]] = w
        for i in idx:
            pos = d.index.get_loc(i)
            out[pos] = chosen[key[out[pos]]]
    return d.assign(weights_id=out)


def _row_labels(d: pd.DataFrame) -> pd.Series:
    """The tokenizer of each row, plus its weights, precision or candidate set where that tokenizer
    has rows with several of them (one leaderboard row per measured thing, never a mixed cell)."""
    lab = d["tokenizer"].astype(str)
    for col, fmt in _VARIANTS:
        if col not in d or d.empty:
            continue
        v = d[col].fillna("").astype(str)
        several = v.groupby(d["tokenizer"]).transform("nunique") > 1
        if col == "weights_id":  # a user's own weights are never the released ones that cards report
            from raebench.weights import LOCAL_LABELS

            several |= v.str.startswith(LOCAL_LABELS)
        if col == "precision":  # a bf16 forward changes every latent: never unmarked beside fp32 rows
            several |= ~v.isin(["fp32", ""])
        lab = lab.where(~several, lab + v.map(fmt))
    return lab


def _differs(d: pd.DataFrame, col: str, key: Iterable[str]) -> pd.Series:
    """Whether rows that agree on the rest of ``key`` have several values of ``col``."""
    rest = [k for k in key if k != col and k in d]
    return d.groupby(rest, dropna=False)[col].transform("nunique", dropna=False) > 1


def _text(v: pd.Series) -> pd.Series:
    # the metric is read after a label's last '/' (best_per_column, the CLI), so none may come before it
    return v.fillna("").astype(str).str.replace("/", "|", regex=False)


def _column_labels(d: pd.DataFrame, reported: bool, always_n: set[str] = frozenset(),
                   multi_res: bool | None = None) -> pd.Series:
    """``dataset[:split][@res] [n=N] [reported [variant] (ref: R)] [#fp] [seed=S] [[version]]/metric``
    for each row of ``d``.

    ``multi_res``: whether the table shows several resolutions (default: whether ``d`` has several);
    pass it for the whole table so that measured and reported columns say the same. Reported labels
    always carry n, say ``variant`` for numbers of a variant the tokenizer does not load, and give the
    reference where numbers of one dataset, n and metric use several. Measured labels carry n when the
    same dataset/metric was measured with several n, or when the table also has reported columns
    (``always_n``: every measured dataset then); a leaderboard of our own runs on one image list needs
    no n. The split, seed and metric version show where they tell columns apart.
    """
    if d.empty:
        return pd.Series([], index=d.index, dtype=str)
    if multi_res is None:
        multi_res = d["resolution"].nunique() > 1
    lab = d["dataset"].astype(str)
    if not reported and "split" in d:
        lab = lab.where(~_differs(d, "split", _MEASURED_KEY), lab + ":" + _text(d["split"]))
    if multi_res:
        lab = lab + "@" + d["resolution"].astype(str)
    if reported:
        lab = lab + " " + d["n_images"].map(_n) + " reported" + d["variant"].map({True: " variant", False: ""})
        refs = d.groupby(["dataset", "resolution", "n_images", "metric"], dropna=False)["reference"].transform("nunique")
        lab = lab.where(refs <= 1, lab + " (ref: " + _text(d["reference"]) + ")")
        return lab + "/" + d["metric"].astype(str)
    key = ["dataset", "resolution", "metric"]
    several_n = d.groupby(key)["n_images"].transform("nunique") > 1
    show_n = several_n | d["dataset"].isin(always_n)
    lab = lab.where(~show_n, lab + " " + d["n_images"].map(_n))
    if "data_fingerprint" in d:
        # the same dataset, resolution and n from different image lists: keep them apart, visibly
        fp = d.groupby([*key, "n_images"])["data_fingerprint"].transform("nunique")
        lab = lab.where(fp <= 1, lab + " #" + d["data_fingerprint"].astype(str).str[:6])
    for col, fmt in (("seed", lambda v: " seed=" + v), ("metric_version", lambda v: " [" + v + "]"),
                     ("metric_networks", _networks)):
        if col in d:
            lab = lab.where(~_differs(d, col, _MEASURED_KEY), lab + fmt(_text(d[col])))
    return lab + "/" + d["metric"].astype(str)


def _cells(d: pd.DataFrame, index: str) -> pd.DataFrame:
    """``d`` (one row per measurement) as ``index`` x ``column`` values, NaN cells and all-NaN rows and
    columns kept (shown as missing). Two rows in one cell are an error, never one of them picked."""
    clash = d[d.duplicated([index, "column"], keep=False)]
    if not clash.empty:
        raise ValueError(f"leaderboard: {len(clash)} rows share the cell(s) "
                         f"{sorted(set(zip(clash[index], clash['column'])))[:3]}; their labels do not tell them apart.")
    return d.pivot(index=index, columns="column", values="value")


def pivot(df: pd.DataFrame, reported: pd.DataFrame | None = None, gaps: bool = True,
          explicit: bool = False) -> pd.DataFrame:
    """Tokenizers as rows; one column per (protocol, metric); each cell one measurement.

    ``reported``: reported rows to add as their own columns (``... reported/metric``); rows of ``df``
    whose ``source`` is ``reported`` are used too. ``gaps``: append open-minus-in-domain columns.
    ``explicit``: every column label names its resolution and n (gap columns: each side's n), for a CSV,
    which has no caption to say what the columns share. Several stored rows of one measurement
    (``load(latest=False)``): the newest is shown.
    """
    m = _measured(df)
    rep = pd.concat([x for x in (_reported(df), reported) if x is not None and not x.empty], ignore_index=True) \
        if (reported is not None and not reported.empty) or not _reported(df).empty else None
    has_rep = rep is not None and not rep.empty
    multi_res = explicit or pd.concat([m["resolution"], rep["resolution"] if has_rep else None]).nunique() > 1
    parts = []
    with_n = set(m["dataset"]) if has_rep or explicit else set()  # published n beside ours: show both
    if not m.empty:
        m = _newest(_one_id_per_weights(m))
        m = m.assign(column=lambda d: _column_labels(d, False, with_n, multi_res), row=_row_labels)
        parts.append(_cells(m, "row"))
    if has_rep:
        rep = prefer_reported(rep)
        parts.append(_cells(rep.assign(column=_column_labels(rep, True, multi_res=multi_res)), "tokenizer"))
    if gaps and not m.empty:
        g = gap_columns(m, multi_res, always_n=explicit)
        if not g.empty:
            parts.append(g)
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, axis=1)
    table.index.name = "tokenizer"
    gap_cols = [c for c in table.columns if str(c).startswith("gap ")]
    other = sorted(c for c in table.columns if c not in gap_cols)
    return table.sort_index(axis=0)[other + sorted(gap_cols)]


def leaderboard_caption(df: pd.DataFrame) -> str | None:
    """What every measured column shares and so no column label says: each dataset's n (where it
    has one), the resolution, the seed and the precision (where the rows agree). Column labels name
    only what tells columns apart, so without this line a Markdown/LaTeX export of a one-protocol
    leaderboard could not be cited."""
    m = _measured(df)
    if m.empty:
        return None
    m = _newest(m)
    sets = []
    for name, g in m.groupby("dataset", sort=True):
        ns = g["n_images"].dropna().unique()
        sets.append(f"{name} ({_n(ns[0])})" if len(ns) == 1 else str(name))
    parts = ["Measured on " + ", ".join(sets)]
    for col, fmt in (("resolution", "{} px"), ("seed", "seed {}"), ("precision", "{}")):
        if col in m and m[col].nunique(dropna=False) == 1 and pd.notna(m[col].iloc[0]):
            v = m[col].iloc[0]
            parts.append(fmt.format(int(v) if isinstance(v, float) and float(v).is_integer() else v))
    return "; ".join(parts) + "; the best of each column in bold where its values differ"


# ---------------------------------------------------------------------------------------------
# Domain gap
# ---------------------------------------------------------------------------------------------


#: one measured value per gap side: a gap compares values of one metric version only
_GAP_KEY = ["tokenizer", "resolution", "metric", "metric_version"]


def _gap_key(m: pd.DataFrame) -> list[str]:
    """:data:`_GAP_KEY`, and the metric networks' weights where rows carry them (:func:`raebench.results.load`)."""
    return _GAP_KEY + (["metric_networks"] if "metric_networks" in m else [])


def _largest_run(m: pd.DataFrame) -> pd.DataFrame:
    """Per (tokenizer, dataset, resolution, metric, metric version and networks): the newest row of the largest n."""
    m = sort_newest_last(m).sort_values("n_images", kind="stable")
    return m.drop_duplicates(["dataset", *_gap_key(m)], keep="last")


def domain_gap(df: pd.DataFrame, tokenizers: Iterable[str] | None = None, resolution: int | None = None) -> pd.DataFrame:
    """Long table of open-domain minus in-domain values (measured rows only, of one metric version).

    Columns: tokenizer, metric, resolution, open, in_domain, open_value, in_value, gap, open_n, in_n,
    open_fingerprint, in_fingerprint, metric_version, metric_networks (both sides measured with the same
    metric version and networks' weights). Each side is the tokenizer's largest run; gaps
    of tokenizers whose sides are other image sets (n or image list) are other protocols, which
    :func:`gap_columns` and :func:`gap_table` keep apart.
    """
    m = _measured(df)
    if tokenizers is not None:
        m = m[m["tokenizer"].isin(list(tokenizers))]
    if resolution is not None:
        m = m[m["resolution"] == resolution]
    cols = ["tokenizer", "metric", "resolution", "open", "in_domain", "open_value", "in_value", "gap", "open_n", "in_n",
            "open_fingerprint", "in_fingerprint", "metric_version", "metric_networks"]
    if m.empty or "domain" not in m:
        return pd.DataFrame(columns=cols)
    m = _one_id_per_weights(m)
    m = _largest_run(m.assign(tokenizer=_row_labels(m)))  # other weights/precision: their own gap
    ind, opn = m[m["domain"] == "in-domain"], m[m["domain"] == "open-domain"]
    if ind.empty or opn.empty:
        return pd.DataFrame(columns=cols)
    j = opn.merge(ind, on=_gap_key(m), suffixes=("_o", "_i"))  # one metric version and networks on both sides
    out = pd.DataFrame({
        "tokenizer": j["tokenizer"], "metric": j["metric"], "resolution": j["resolution"],
        "open": j["dataset_o"], "in_domain": j["dataset_i"], "open_value": j["value_o"], "in_value": j["value_i"],
        "gap": j["value_o"] - j["value_i"], "open_n": j["n_images_o"], "in_n": j["n_images_i"],
        "open_fingerprint": _text(j["data_fingerprint_o"]) if "data_fingerprint_o" in j else "",
        "in_fingerprint": _text(j["data_fingerprint_i"]) if "data_fingerprint_i" in j else "",
        "metric_version": j["metric_version"],
        "metric_networks": _text(j["metric_networks"]) if "metric_networks" in j else "",
    })
    return out.sort_values(["metric", "open", "tokenizer"]).reset_index(drop=True)


def _several_versions(g: pd.DataFrame, col: str = "metric_version") -> pd.Series:
    """Whether gap rows of one pair, resolution and metric come from several metric versions (``col``:
    or several of another column, ``metric_networks``)."""
    return g.groupby(["open", "in_domain", "resolution", "metric"])[col].transform("nunique") > 1


def _gap_sides(g: pd.DataFrame, always_n: bool = False) -> tuple[pd.Series, pd.Series]:
    """The open and in-domain side labels of gap rows: the dataset, plus ``n=N`` where one pair, resolution,
    metric and version has gaps over several image sets (or ``always_n``), and the image list's
    ``#fingerprint`` where those share their n. Gaps over other images are other protocols: never one
    column or ranking."""
    key = [g["open"], g["in_domain"], g["resolution"], g["metric"], g["metric_version"]]
    if "metric_networks" in g:
        key.append(g["metric_networks"])
    n_o, n_i = g["open_n"].map(_n), g["in_n"].map(_n)
    proto = n_o + "|" + g["open_fingerprint"] + "|" + n_i + "|" + g["in_fingerprint"]
    several = (proto.groupby(key).transform("nunique") > 1) | always_n
    collide = (proto.groupby([*key, n_o, n_i]).transform("nunique") > 1)  # same n, other image lists
    open_lab = g["open"].where(~several, g["open"] + " " + n_o)
    in_lab = g["in_domain"].where(~several, g["in_domain"] + " " + n_i)
    open_lab = open_lab.where(~collide, open_lab + " #" + g["open_fingerprint"].str[:6])
    in_lab = in_lab.where(~collide, in_lab + " #" + g["in_fingerprint"].str[:6])
    return open_lab, in_lab


def gap_columns(m: pd.DataFrame, multi_res: bool | None = None, always_n: bool = False) -> pd.DataFrame:
    """:func:`domain_gap` as leaderboard columns ``gap <open>[ n=N] - <in>[ n=N][@res] [[version]]/<metric>``
    (tokenizers as rows; n where gaps of one pair and metric come from several image sets, see
    :func:`_gap_sides`, or ``always_n``); ``multi_res``: whether the labels show the resolution (default:
    the gaps have several)."""
    g = domain_gap(m)
    if g.empty:
        return pd.DataFrame()
    if multi_res is None:
        multi_res = g["resolution"].nunique() > 1
    res = ("@" + g["resolution"].astype(str)) if multi_res else ""
    version = (" [" + _text(g["metric_version"]) + "]").where(_several_versions(g), "")
    version = version + _networks(g["metric_networks"]).where(_several_versions(g, "metric_networks"), "")
    open_lab, in_lab = _gap_sides(g, always_n)
    g = g.assign(column="gap " + open_lab + " - " + in_lab + res + version + "/" + g["metric"], value=g["gap"])
    return _cells(g, "tokenizer")


def gap_table(gap: pd.DataFrame, explicit: bool = False) -> pd.DataFrame:
    """:func:`domain_gap` rows as (pair ``open - in``, metric[, metric_version where several][, resolution
    where several]) x tokenizer; ``explicit`` (an export: the gaps may use other images than the table
    beside them): each side's n and the resolution always."""
    if gap is None or gap.empty:
        return pd.DataFrame()
    open_lab, in_lab = _gap_sides(gap, explicit)
    g = gap.assign(pair=open_lab + " - " + in_lab)  # n (and image list) where tokenizers' gaps use other images
    index = ["pair", "metric"] + [c for c, several in (("metric_version", _several_versions(g).any()),
                                                       ("metric_networks", _several_versions(g, "metric_networks").any()),
                                                       ("resolution", explicit or g["resolution"].nunique() > 1))
                                  if several]
    return g.pivot(index=index, columns="tokenizer", values="gap")


def row_best(table: pd.DataFrame, hib: dict[str, bool | None]) -> set[tuple]:
    """Cells to bold: per row (index level ``metric``), the best by higher_is_better (a gap is
    better when higher for PSNR-like metrics and lower for FID-like ones); ties all bold."""
    out = set()
    for label, row in table.iterrows():
        metric = label[table.index.names.index("metric")] if isinstance(label, tuple) else label
        out |= {(label, col) for col in _best(row, metric, hib.get(metric))}
    return out


# ---------------------------------------------------------------------------------------------
# Compare: (dataset, metric) x tokenizer, measured and reported side by side
# ---------------------------------------------------------------------------------------------

REPORTED_SUFFIX = " (reported)"


def compare_table(
    df: pd.DataFrame,
    tokenizers: list[str],
    resolution: int | None = None,
    reported: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Rows (dataset, metric); per tokenizer a measured column ``<tok>`` (every tokenizer with a measured
    row, NaN values shown as missing) and, when a card reports something, ``<tok> (reported)``; then
    ``Δ <tok>`` (measured, vs the first tokenizer, on the same n and metric version only), ``best``
    (among measured cells, only when they share n and metric version; ties are all named, comma-separated),
    ``best (reported)`` (only when every reported cell of the row shares n, reference and variant status)
    and ``protocol`` (the resolution, then the n, reference and source of each cell).

    ``resolution``: the one compared; None takes the rows' only resolution (rows at several are an error,
    as a tokenizer's cell would hold whichever was newest and be ranked against others at another).

    ``df``'s measured rows must come from one image list (``compare`` filters on the fingerprint); the n of
    a metric still differs between tokenizers whose reconstructions of some images were not finite
    (those images are left out). A tokenizer's reported column shows one number per row: for the weights
    it loads before variants, then the best-ranked (the protocol counts the others).
    """
    d = _measured(df[df["tokenizer"].isin(tokenizers)])
    rep = reported if reported is not None else _reported(df)
    rep = rep[rep["tokenizer"].isin(tokenizers)] if rep is not None and not rep.empty else pd.DataFrame()
    if resolution is None:  # a cell per tokenizer, dataset and metric holds one resolution's number
        found = sorted({int(r) for r in pd.concat([d["resolution"], rep.get("resolution", pd.Series(dtype=float))])
                        .dropna()})
        if len(found) > 1:
            raise ValueError(f"compare_table: rows at resolutions {found}; pass resolution= to compare one of them.")
        resolution = found[0] if found else None
    if resolution is not None:
        d = d[d["resolution"] == resolution]
        rep = rep[rep["resolution"] == resolution] if not rep.empty else rep
    rep = prefer_reported(rep, ("tokenizer", "dataset", "resolution", "metric")) if not rep.empty else rep
    if d.empty and rep.empty:
        return pd.DataFrame()

    hib = {}
    for frame in (d, rep):
        if not frame.empty:
            hib.update(frame.dropna(subset=["higher_is_better"]).drop_duplicates("metric")
                       .set_index("metric")["higher_is_better"].to_dict())

    idx = pd.MultiIndex.from_tuples([], names=["dataset", "metric"])
    meas = n_of = version_of = pd.DataFrame(index=idx)
    if not d.empty:
        # compare measured or reused each tokenizer's current metric version just now: its newest row
        d = sort_newest_last(d).drop_duplicates(["tokenizer", "dataset", "metric"], keep="last")
        # what a Δ and a best need alike besides n: the metric version and the weights of its networks
        d = d.assign(measured_as=_text(d["metric_version"]) + "|" + _text(d.get("metric_networks", pd.Series("", d.index))))
        meas, n_of, version_of = (d.pivot(index=["dataset", "metric"], columns="tokenizer", values=v)
                                  for v in ("value", "n_images", "measured_as"))
    repv = pd.DataFrame(index=idx)
    if not rep.empty:
        repv = rep.pivot(index=["dataset", "metric"], columns="tokenizer", values="value")
    rows = meas.index.union(repv.index)
    t = pd.DataFrame(index=rows)
    t.index.names = ["dataset", "metric"]
    for tok in tokenizers:
        t[tok] = meas[tok].reindex(rows) if tok in meas else float("nan")
        if tok in repv:
            t[tok + REPORTED_SUFFIX] = repv[tok].reindex(rows)
    measured_cols = [c for c in tokenizers if c in meas]
    base = tokenizers[0]
    for tok in tokenizers[1:]:
        if base in measured_cols and tok in measured_cols:
            same = (n_of[tok] == n_of[base]) & (version_of[tok] == version_of[base])  # a Δ within one protocol only
            t[f"Δ {tok}"] = (t[tok] - t[base]).where(same.reindex(rows, fill_value=False))
    t = t[[c for c in t.columns if c in measured_cols or c not in tokenizers]]

    best, best_rep, protocol = [], [], []
    for (dataset, metric), row in t.iterrows():
        h = hib.get(metric)
        cells = d[(d["dataset"] == dataset) & (d["metric"] == metric)] if not d.empty else d
        valued = cells[cells["value"].notna()] if not cells.empty else cells
        ranked = valued.empty or (valued["n_images"].nunique() == 1 and valued["measured_as"].nunique() == 1)
        best.append(", ".join(_best(row[measured_cols], metric, h)) if ranked else "")
        rcells = rep[(rep["dataset"] == dataset) & (rep["metric"] == metric)] if not rep.empty else rep
        protos = {(r.n_images, r.reference, r.variant) for r in rcells.itertuples()}
        comparable = len(protos) == 1 and len(rcells) > 1 and h is not None
        rvals = pd.Series({r.tokenizer + REPORTED_SUFFIX: r.value for r in rcells.itertuples()}, dtype=float)
        best_rep.append(", ".join(_best(rvals, metric, h)) if comparable else "")
        protocol.append(_protocol_text(cells, rcells, comparable, resolution))
    t["best"] = best
    if not rep.empty:
        t["best (reported)"] = best_rep
    t["protocol"] = protocol
    return t


def _protocol_text(meas: pd.DataFrame, rep: pd.DataFrame, comparable: bool, resolution: int | None = None) -> str:
    # the resolution leads: CSV and Markdown exports carry no title, and every cell of the table shares it
    parts = [f"{resolution} px"] if resolution is not None else []
    if not meas.empty:
        valued = meas[meas["value"].notna()]
        ns = sorted({int(n) for n in (valued if not valued.empty else meas)["n_images"]})
        if len(ns) == 1:
            parts.append(f"measured: same images, n={ns[0]}")
        else:
            parts.append("measured: different image subsets (non-finite reconstructions left out), n="
                         + "/".join(map(str, ns)) + ": not ranked")
        versions = sorted(set(valued["metric_version"].astype(str)))
        if len(versions) > 1:
            parts.append(f"measured with metric versions {', '.join(versions)}: not ranked")
        nets = sorted(set(_text(valued["metric_networks"]))) if "metric_networks" in valued else []
        if len(nets) > 1:
            parts.append("measured with other weights of the metric networks ("
                         + ", ".join(f"#{v[:6]}" if v else "unrecorded" for v in nets) + "): not ranked")
    for r in rep.itertuples() if not rep.empty else ():
        extra = r.extra if isinstance(r.extra, dict) else {}
        flags = [x for x, on in (("secondary", extra.get("secondary")), ("not re-verified", extra.get("verified") is False),
                                 ("variant", r.variant)) if on]
        others = getattr(r, "others", 0) or 0
        more = f"; +{others} other value(s) in the card" if others else ""
        cite = str(extra.get("citation", "?"))
        cite = cite if len(cite) <= 90 else cite[:89] + "…"
        parts.append(f"{r.tokenizer} reported: {_n(r.n_images)}, ref: {r.reference or '?'}; source: {cite}"
                     + (f" [{', '.join(flags)}]" if flags else "") + more)
    if len(rep) > 1 and not comparable:
        parts.append("reported values use different protocols: not ranked")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Best cells (bold in the exports of raebench.export)
# ---------------------------------------------------------------------------------------------


def best_per_column(table: pd.DataFrame, hib: dict[str, bool | None]) -> dict[str, list]:
    """column -> index labels of the best value (all of them on ties; see :func:`_best` for columns
    without one), by the metric's higher_is_better (the text after the last '/' of the column name)."""
    best = {}
    for col in table.columns:
        metric = str(col).split("/")[-1]
        labels = _best(table[col], metric, hib.get(metric))
        if labels:
            best[col] = labels
    return best


def compare_bold(table: pd.DataFrame) -> set[tuple]:
    """The cells that ``compare_table``'s ``best`` and ``best (reported)`` columns name."""
    out = set()
    for label, row in table.iterrows():
        for key in ("best", "best (reported)"):
            if key in table.columns and row[key]:
                out |= {(label, name) for name in row[key].split(", ")}
    return out
