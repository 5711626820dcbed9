"""Leaderboards and comparisons: pivots of result rows, never hand-edited tables.

``pivot``: tokenizers x (dataset, metric). ``compare_table``: one row per (dataset, metric), one
column per tokenizer, deltas against the first tokenizer and the best marked by higher_is_better.
``render``: CSV, Markdown or LaTeX text, with the best value per column in bold for md/latex.
"""

from __future__ import annotations

import math

import pandas as pd


def _fmt(v: float, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}" if a < 10 else f"{v:.2f}"


def pivot(df: pd.DataFrame) -> pd.DataFrame:
    """Tokenizers as rows; ``dataset/metric`` columns; measured rows only; newest value wins."""
    m = df[df["source"].fillna("measured") == "measured"] if "source" in df else df
    if m.empty:
        return pd.DataFrame()
    m = m.assign(column=m["dataset"].astype(str) + "/" + m["metric"].astype(str))
    m = m.sort_values("date", kind="stable")
    table = m.pivot_table(index="tokenizer", columns="column", values="value", aggfunc="last")
    return table.sort_index(axis=0).sort_index(axis=1)


def best_per_column(table: pd.DataFrame, hib: dict[str, bool | None]) -> dict[str, str]:
    """column -> index label of the best value, by the metric's higher_is_better."""
    best = {}
    for col in table.columns:
        metric = str(col).split("/")[-1]
        h = hib.get(metric)
        s = table[col].dropna()
        s = s[s.map(lambda v: not (isinstance(v, float) and math.isnan(v)))]
        if h is None or s.empty:
            continue
        best[col] = s.idxmax() if h else s.idxmin()
    return best


def compare_table(df: pd.DataFrame, tokenizers: list[str], resolution: int | None = None) -> pd.DataFrame:
    """Rows (dataset, metric); columns per tokenizer plus ``Δ <tok>`` vs the first and ``best``."""
    d = df[df["tokenizer"].isin(tokenizers)]
    if "source" in d:
        d = d[d["source"].fillna("measured") == "measured"]
    if resolution is not None:
        d = d[d["resolution"] == resolution]
    if d.empty:
        return pd.DataFrame()
    d = d.sort_values("date", kind="stable")
    t = d.pivot_table(index=["dataset", "metric"], columns="tokenizer", values="value", aggfunc="last")
    t = t[[c for c in tokenizers if c in t.columns]]
    hib = d.drop_duplicates("metric").set_index("metric")["higher_is_better"].to_dict()
    base = tokenizers[0]
    for tok in tokenizers[1:]:
        if base in t and tok in t:
            t[f"Δ {tok}"] = t[tok] - t[base]
    bests = []
    for (dataset, metric), row in t.iterrows():
        vals = {c: row[c] for c in tokenizers if c in t.columns and pd.notna(row[c])}
        h = hib.get(metric)
        bests.append("" if not vals or h is None else (max if h else min)(vals, key=vals.get))
    t["best"] = bests
    return t


def render(table: pd.DataFrame, fmt: str, hib: dict[str, bool | None] | None = None) -> str:
    """CSV, Markdown or LaTeX text of a pivot; md/latex bold the best per column."""
    if fmt == "csv":
        return table.to_csv()
    best = best_per_column(table, hib or {})
    idx_name = table.index.name or ""
    cols = [str(c) for c in table.columns]
    body = []
    for label, row in table.iterrows():
        cells = []
        for col in table.columns:
            v = row[col]
            s = _fmt(v) if isinstance(v, (int, float)) else str(v)
            if best.get(col) == label:
                s = f"**{s}**" if fmt == "md" else f"\\textbf{{{s}}}"
            cells.append(s)
        body.append((str(label), cells))
    if fmt == "md":
        lines = ["| " + " | ".join([idx_name, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
        lines += ["| " + " | ".join([lab, *cells]) + " |" for lab, cells in body]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
        lines = [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
                 " & ".join([esc(idx_name), *map(esc, cols)]) + r" \\", r"\midrule"]
        lines += [" & ".join([esc(lab), *cells]) + r" \\" for lab, cells in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r}; use csv, md or latex")
