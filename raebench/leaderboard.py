"""Leaderboards and comparisons: pivots of result rows, never hand-edited tables.

Numbers measured under different protocols never share a cell or a ranking. A leaderboard column is
one protocol: dataset, resolution, number of images and source (measured here, or reported by a
paper/model card), e.g. ``coco-val2017 n=5000 reported/psnr``; a measured run on 17 images and a
published number on 5,000 land in different columns, with the n in the header (a measured column
shows its n whenever another n exists for its dataset or the table has reported columns). ``best`` is computed
within a column (leaderboard) or within the measured cells of a row (compare, all measured on the
same images), using the metric's ``higher_is_better``.

The domain gap (seed question: is a tokenizer stable outside its training set?) is, per tokenizer
and metric, an open-domain value minus the in-domain value at the same resolution, from measured rows
only; its columns read ``gap coco-val2017 - imagenet-val/psnr``. For PSNR a negative gap is a loss
outside the training domain; for FID a positive one is.

A leaderboard row is one tokenizer; when a tokenizer was measured with several weights, precisions
or (``score`` rows) candidate sets, each gets its own row, labelled with what differs
(``sd-vae-ft-ema [local:/w2]``, ``pixels [bf16]``, ``reconstructions [cand #1a2b3c]``).

``render`` writes CSV, Markdown or LaTeX (booktabs) with the best value per column in bold.
"""

from __future__ import annotations

import math
from typing import Iterable

import pandas as pd

from raebench.results import sort_newest_last

MISSING = "–"


def _fmt(v, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if not isinstance(v, (int, float)):
        return str(v)
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}" if a < 10 else f"{v:.2f}"


def _n(n) -> str:
    return "n=?" if n is None or (isinstance(n, (int, float)) and (n < 0 or math.isnan(n))) else f"n={int(n)}"


def _measured(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["source"].fillna("measured") == "measured"] if "source" in df else df


def _reported(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["source"] == "reported"] if "source" in df else df.iloc[0:0]


def prefer_reported(rep: pd.DataFrame) -> pd.DataFrame:
    """One reported number per (tokenizer, dataset, resolution, n, metric): the best-ranked (authors'
    verified first); ``others`` counts the numbers left out for that key."""
    if rep.empty:
        return rep.assign(others=0)
    rep = rep.copy()
    if "rank" not in rep:
        rep["rank"] = 0
    keys = ["tokenizer", "dataset", "resolution", "n_images", "metric"]
    rep["others"] = rep.groupby(keys, dropna=False)["value"].transform("size") - 1
    return rep.sort_values("rank", kind="stable").drop_duplicates(keys, keep="first")


# ---------------------------------------------------------------------------------------------
# Leaderboard: tokenizers x protocol/metric
# ---------------------------------------------------------------------------------------------

#: what tells apart the measurements of one tokenizer, and how a row label shows it
_VARIANTS = (("weights_id", lambda v: f" [{v}]"), ("precision", lambda v: f" [{v}]"),
             ("candidates_fingerprint", lambda v: f" [cand #{v[:6]}]"))


def _row_labels(d: pd.DataFrame) -> pd.Series:
    """The tokenizer of each row, plus its weights, precision or candidate set where that tokenizer
    has rows with several of them (one leaderboard row per measured thing, never a mixed cell)."""
    lab = d["tokenizer"].astype(str)
    for col, fmt in _VARIANTS:
        if col not in d or d.empty:
            continue
        v = d[col].fillna("").astype(str)
        several = v.groupby(d["tokenizer"]).transform("nunique") > 1
        lab = lab.where(~several, lab + v.map(fmt))
    return lab


def _column_labels(d: pd.DataFrame, reported: bool, always_n: set[str] = frozenset()) -> pd.Series:
    """``dataset [@res] [n=N] [reported] [#fp]/metric`` for each row of ``d``.

    Reported labels always carry n. Measured labels carry it when the same dataset/metric was
    measured with several n, or when the table also has reported columns (``always_n``: every
    measured dataset then); a leaderboard of our own runs on one image list needs no n.
    """
    multi_res = d["resolution"].nunique() > 1
    lab = d["dataset"].astype(str)
    if multi_res:
        lab = lab + "@" + d["resolution"].astype(str)
    if reported:
        return lab + " " + d["n_images"].map(_n) + " reported/" + d["metric"].astype(str)
    key = ["dataset", "resolution", "metric"]
    several_n = d.groupby(key)["n_images"].transform("nunique") > 1
    show_n = several_n | d["dataset"].isin(always_n)
    lab = lab.where(~show_n, lab + " " + d["n_images"].map(_n))
    if "data_fingerprint" in d and not d.empty:
        # the same dataset, resolution and n from different image lists: keep them apart, visibly
        fp = d.groupby([*key, "n_images"])["data_fingerprint"].transform("nunique")
        lab = lab.where(fp <= 1, lab + " #" + d["data_fingerprint"].astype(str).str[:6])
    return lab + "/" + d["metric"].astype(str)


def pivot(df: pd.DataFrame, reported: pd.DataFrame | None = None, gaps: bool = True) -> pd.DataFrame:
    """Tokenizers as rows; one column per (protocol, metric); newest measured value wins.

    ``reported``: reported rows to add as their own columns (``... reported/metric``); rows of ``df``
    whose ``source`` is ``reported`` are used too. ``gaps``: append open-minus-in-domain columns.
    """
    m = _measured(df)
    rep = pd.concat([x for x in (_reported(df), reported) if x is not None and not x.empty], ignore_index=True) \
        if (reported is not None and not reported.empty) or not _reported(df).empty else None
    parts = []
    with_n = set(m["dataset"]) if rep is not None and not rep.empty else set()  # published n beside ours: show both
    if not m.empty:
        m = sort_newest_last(m).assign(column=lambda d: _column_labels(d, False, with_n), row=_row_labels)
        parts.append(m.pivot_table(index="row", columns="column", values="value", aggfunc="last"))
    if rep is not None and not rep.empty:
        rep = prefer_reported(rep).assign(column=lambda d: _column_labels(d, True))
        parts.append(rep.pivot_table(index="tokenizer", columns="column", values="value", aggfunc="first"))
    if gaps and not m.empty:
        g = gap_columns(m)
        if not g.empty:
            parts.append(g)
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, axis=1)
    table.index.name = "tokenizer"
    gap_cols = [c for c in table.columns if str(c).startswith("gap ")]
    other = sorted(c for c in table.columns if c not in gap_cols)
    return table.sort_index(axis=0)[other + sorted(gap_cols)]


# ---------------------------------------------------------------------------------------------
# Domain gap
# ---------------------------------------------------------------------------------------------


def _largest_run(m: pd.DataFrame) -> pd.DataFrame:
    """Per (tokenizer, dataset, resolution, metric): the newest row of the largest n."""
    m = sort_newest_last(m).sort_values("n_images", kind="stable")
    return m.drop_duplicates(["tokenizer", "dataset", "resolution", "metric"], keep="last")


def domain_gap(df: pd.DataFrame, tokenizers: Iterable[str] | None = None, resolution: int | None = None) -> pd.DataFrame:
    """Long table of open-domain minus in-domain values (measured rows only).

    Columns: tokenizer, metric, resolution, open, in_domain, open_value, in_value, gap, open_n, in_n.
    """
    m = _measured(df)
    if tokenizers is not None:
        m = m[m["tokenizer"].isin(list(tokenizers))]
    if resolution is not None:
        m = m[m["resolution"] == resolution]
    cols = ["tokenizer", "metric", "resolution", "open", "in_domain", "open_value", "in_value", "gap", "open_n", "in_n"]
    if m.empty or "domain" not in m:
        return pd.DataFrame(columns=cols)
    m = _largest_run(m.assign(tokenizer=_row_labels(m)))  # other weights/precision: their own gap
    ind, opn = m[m["domain"] == "in-domain"], m[m["domain"] == "open-domain"]
    if ind.empty or opn.empty:
        return pd.DataFrame(columns=cols)
    j = opn.merge(ind, on=["tokenizer", "metric", "resolution"], suffixes=("_o", "_i"))
    out = pd.DataFrame({
        "tokenizer": j["tokenizer"], "metric": j["metric"], "resolution": j["resolution"],
        "open": j["dataset_o"], "in_domain": j["dataset_i"], "open_value": j["value_o"], "in_value": j["value_i"],
        "gap": j["value_o"] - j["value_i"], "open_n": j["n_images_o"], "in_n": j["n_images_i"],
    })
    return out.sort_values(["metric", "open", "tokenizer"]).reset_index(drop=True)


def gap_columns(m: pd.DataFrame) -> pd.DataFrame:
    """:func:`domain_gap` as leaderboard columns ``gap <open> - <in>/<metric>`` (tokenizers as rows)."""
    g = domain_gap(m)
    if g.empty:
        return pd.DataFrame()
    multi_res = g["resolution"].nunique() > 1
    res = ("@" + g["resolution"].astype(str)) if multi_res else ""
    g = g.assign(column="gap " + g["open"] + " - " + g["in_domain"] + res + "/" + g["metric"])
    return g.pivot_table(index="tokenizer", columns="column", values="gap", aggfunc="last")


def gap_table(gap: pd.DataFrame) -> pd.DataFrame:
    """:func:`domain_gap` rows as (pair ``open - in``, metric) x tokenizer."""
    if gap is None or gap.empty:
        return pd.DataFrame()
    g = gap.assign(pair=gap["open"] + " - " + gap["in_domain"])
    return g.pivot_table(index=["pair", "metric"], columns="tokenizer", values="gap", aggfunc="last")


def row_best(table: pd.DataFrame, hib: dict[str, bool | None]) -> set[tuple]:
    """Cells to bold: per row (index level ``metric``), the best by higher_is_better (a gap is
    better when higher for PSNR-like metrics and lower for FID-like ones)."""
    out = set()
    for label, row in table.iterrows():
        metric = label[table.index.names.index("metric")] if isinstance(label, tuple) else label
        h = hib.get(metric)
        s = pd.to_numeric(row, errors="coerce").dropna()
        if h is not None and len(s) > 1:
            out.add((label, s.idxmax() if h else s.idxmin()))
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
    """Rows (dataset, metric); per tokenizer a measured column ``<tok>`` and, when a card reports
    something, ``<tok> (reported)``; then ``Δ <tok>`` (measured, vs the first tokenizer), ``best``
    (among measured cells: same images by construction), ``best (reported)`` (only when every reported
    cell of the row shares n and reference) and ``protocol`` (the n, reference and source of each cell).

    ``df``'s measured rows must come from one image list (``compare`` filters on the fingerprint).
    """
    d = _measured(df[df["tokenizer"].isin(tokenizers)])
    if resolution is not None:
        d = d[d["resolution"] == resolution]
    rep = reported if reported is not None else _reported(df)
    rep = rep[rep["tokenizer"].isin(tokenizers)] if rep is not None and not rep.empty else pd.DataFrame()
    if resolution is not None and not rep.empty:
        rep = rep[rep["resolution"] == resolution]
    rep = prefer_reported(rep) if not rep.empty else rep
    if d.empty and rep.empty:
        return pd.DataFrame()

    hib = {}
    for frame in (d, rep):
        if not frame.empty:
            hib.update(frame.dropna(subset=["higher_is_better"]).drop_duplicates("metric")
                       .set_index("metric")["higher_is_better"].to_dict())

    idx = pd.MultiIndex.from_tuples([], names=["dataset", "metric"])
    meas = pd.DataFrame(index=idx)
    if not d.empty:
        d = sort_newest_last(d)
        meas = d.pivot_table(index=["dataset", "metric"], columns="tokenizer", values="value", aggfunc="last")
    repv = pd.DataFrame(index=idx)
    if not rep.empty:
        repv = rep.pivot_table(index=["dataset", "metric"], columns="tokenizer", values="value", aggfunc="first")
    rows = meas.index.union(repv.index)
    t = pd.DataFrame(index=rows)
    t.index.names = ["dataset", "metric"]
    for tok in tokenizers:
        t[tok] = meas[tok].reindex(rows) if tok in meas else float("nan")
        if tok in repv:
            t[tok + REPORTED_SUFFIX] = repv[tok].reindex(rows)
    measured_cols = [c for c in tokenizers if t[c].notna().any()]
    base = tokenizers[0]
    for tok in tokenizers[1:]:
        if base in measured_cols and tok in measured_cols:
            t[f"Δ {tok}"] = t[tok] - t[base]
    t = t[[c for c in t.columns if c in measured_cols or c not in tokenizers]]

    best, best_rep, protocol = [], [], []
    for (dataset, metric), row in t.iterrows():
        h = hib.get(metric)
        vals = {c: row[c] for c in measured_cols if pd.notna(row[c])}
        best.append("" if not vals or h is None else (max if h else min)(vals, key=vals.get))
        cells = rep[(rep["dataset"] == dataset) & (rep["metric"] == metric)] if not rep.empty else rep
        protos = {(r.n_images, r.extra.get("reference", "") if isinstance(r.extra, dict) else "") for r in cells.itertuples()}
        rvals = {r.tokenizer + REPORTED_SUFFIX: r.value for r in cells.itertuples()}
        comparable = len(protos) == 1 and len(rvals) > 1 and h is not None
        best_rep.append((max if h else min)(rvals, key=rvals.get) if comparable else "")
        protocol.append(_protocol_text(d[(d["dataset"] == dataset) & (d["metric"] == metric)] if not d.empty else d,
                                       cells, comparable))
    t["best"] = best
    if not rep.empty:
        t["best (reported)"] = best_rep
    t["protocol"] = protocol
    return t


def _protocol_text(meas: pd.DataFrame, rep: pd.DataFrame, comparable: bool) -> str:
    parts = []
    if not meas.empty:
        ns = sorted({int(n) for n in meas["n_images"]})
        parts.append("measured: same images, n=" + "/".join(map(str, ns)))
    for r in rep.itertuples() if not rep.empty else ():
        extra = r.extra if isinstance(r.extra, dict) else {}
        flags = [x for x, on in (("secondary", extra.get("secondary")), ("not re-verified", extra.get("verified") is False),
                                 ("variant", extra.get("weights_match") is False)) if on]
        others = getattr(r, "others", 0) or 0
        more = f"; +{others} other value(s) in the card" if others else ""
        cite = str(extra.get("citation", "?"))
        cite = cite if len(cite) <= 90 else cite[:89] + "…"
        parts.append(f"{r.tokenizer} reported: {_n(r.n_images)}, ref: {extra.get('reference', '?')}; source: {cite}"
                     + (f" [{', '.join(flags)}]" if flags else "") + more)
    if len(rep) > 1 and not comparable:
        parts.append("reported values use different protocols: not ranked")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def best_per_column(table: pd.DataFrame, hib: dict[str, bool | None]) -> dict[str, str]:
    """column -> index label of the best value, by the metric's higher_is_better (the text after the
    last '/' of the column name)."""
    best = {}
    for col in table.columns:
        metric = str(col).split("/")[-1]
        h = hib.get(metric)
        s = pd.to_numeric(table[col], errors="coerce").dropna()
        if h is None or s.empty:
            continue
        best[col] = s.idxmax() if h else s.idxmin()
    return best


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "Δ": r"$\Delta$", "–": "--", "−": "-"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(s))


def render(
    table: pd.DataFrame,
    fmt: str,
    hib: dict[str, bool | None] | None = None,
    bold: set[tuple] | None = None,
    caption: str | None = None,
) -> str:
    """CSV, Markdown or LaTeX text of a table; md/latex bold the best cells.

    ``bold``: explicit (row label, column) cells to embolden; default: the best of each column by
    :func:`best_per_column`. CSV carries raw numbers (full precision), never markup.
    """
    if fmt == "csv":
        return table.to_csv()
    if fmt not in ("md", "latex"):
        raise ValueError(f"unknown format {fmt!r}; use csv, md or latex")
    if bold is None:
        bold = {(lab, col) for col, lab in best_per_column(table, hib or {}).items()}
    names = [n or "" for n in table.index.names]
    cols = [str(c) for c in table.columns]
    body = []
    for label, row in table.iterrows():
        labels = list(label) if isinstance(label, tuple) else [label]
        cells = []
        for col in table.columns:
            v = row[col]
            s = _fmt(v) if isinstance(v, (int, float)) or v is None else str(v)
            if fmt == "latex":
                s = latex_escape(s)
            if (label, col) in bold and s not in (MISSING, "--"):
                s = f"**{s}**" if fmt == "md" else f"\\textbf{{{s}}}"
            cells.append(s)
        body.append(([str(x) for x in labels], cells))
    if fmt == "md":
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(map(esc, [*names, *cols])) + " |", "|" + "---|" * (len(names) + len(cols))]
        lines += ["| " + " | ".join(map(esc, [*labs, *cells])) + " |" for labs, cells in body]
        return "\n".join(lines) + "\n"
    lines = [r"\begin{tabular}{" + "l" * len(names) + "r" * len(cols) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in [*names, *cols]) + r" \\", r"\midrule"]
    lines += [" & ".join([*(latex_escape(x) for x in labs), *cells]) + r" \\" for labs, cells in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}[t]", r"\centering", r"\caption{" + latex_escape(caption) + "}", *lines, r"\end{table}"]
    return "\n".join(lines) + "\n"


def compare_bold(table: pd.DataFrame) -> set[tuple]:
    """The cells that ``compare_table``'s ``best`` and ``best (reported)`` columns name."""
    out = set()
    for label, row in table.iterrows():
        for key in ("best", "best (reported)"):
            if key in table.columns and row[key]:
                out.add((label, row[key]))
    return out
