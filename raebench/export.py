"""Text exports of result tables: :func:`render` writes CSV, Markdown or LaTeX (booktabs) with the best
value per column in bold (:func:`raebench.leaderboard.best_per_column`, or the cells given); labels and
text show literally in Markdown and LaTeX (:func:`md_escape`, :func:`latex_escape`), and CSV text cells
that a spreadsheet would run as a formula get a leading ``'`` (:func:`defuse_cell`, :func:`csv_text`).
:func:`rows_csv` is ``leaderboard --format rows``: every stored row as one CSV line.
"""

from __future__ import annotations

import pandas as pd

from raebench.leaderboard import MISSING, _fmt, best_per_column


#: LaTeX's specials, and characters that OT1, LaTeX's default font encoding, prints as other glyphs
#: (``<`` as ¡, ``>`` as ¿, a backtick as an opening quote)
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "|": r"\textbar{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}", "`": r"\textasciigrave{}",
                  "Δ": r"$\Delta$", "–": "--", "−": "-"}

#: characters with inline meaning in GitHub Markdown (emphasis, code, HTML and autolinks, strikethrough,
#: entities, the cell separator), each shown literally with a backslash before it
_MD_SPECIAL = frozenset("\\`*_<~&|")


def latex_escape(s: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in _one_line(s))


def md_escape(s: str) -> str:
    r"""``s`` as literal text in a GitHub Markdown table cell (or paragraph): ``my_vae*v2`` or
    ``C:\runs\x`` show as written, a ``|`` does not end the cell, and ``[a](b)`` is no link."""
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in _one_line(s)).replace("](", "]\\(")


def _one_line(s) -> str:
    """``s`` with line breaks as spaces: a Markdown table row ends at a newline, and a blank line in a
    LaTeX cell is a paragraph break that stops the tabular (a local weights folder may hold either)."""
    return " ".join(str(s).splitlines())


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: a LaTeX text column whose longest cell is longer than this wraps (``compare``'s ``protocol``)
WRAP_CHARS = 40
_WRAPPED = r">{\raggedright\arraybackslash}p{0.35\linewidth}"  # needs \usepackage{array}


def _latex_column(values: pd.Series) -> str:
    """``r`` for numbers, ``l`` for short text, a ragged-right paragraph column for long text (a
    citation-laden ``protocol`` in an ``r`` column ran off the page)."""
    texts = [str(v) for v in values if not _is_number(v) and v is not None]
    if not texts:
        return "r"
    return _WRAPPED if max(map(len, texts)) > WRAP_CHARS else "l"


def render(
    table: pd.DataFrame,
    fmt: str,
    hib: dict[str, bool | None] | None = None,
    bold: set[tuple] | None = None,
    caption: str | None = None,
) -> str:
    """CSV, Markdown or LaTeX text of a table; md/latex bold the best cells and show ``caption`` (a line
    above the Markdown table, a LaTeX ``table`` float's caption; CSV holds the table alone).

    ``bold``: explicit (row label, column) cells to embolden; default: the best of each column by
    :func:`best_per_column`. CSV carries raw numbers (full precision), never markup; its text cells
    are defused against spreadsheet formulas (:func:`csv_text`). Markdown and LaTeX show every label
    and text cell literally (:func:`md_escape`, :func:`latex_escape`); LaTeX needs ``booktabs`` and,
    for a text column longer than :data:`WRAP_CHARS` (wrapped), ``array``.
    """
    if fmt == "csv":
        return csv_text(table)
    if fmt not in ("md", "latex"):
        raise ValueError(f"unknown format {fmt!r}; use csv, md or latex")
    if bold is None:
        bold = {(lab, col) for col, labs in best_per_column(table, hib or {}).items() for lab in labs}
    esc = md_escape if fmt == "md" else latex_escape
    names = [n or "" for n in table.index.names]
    cols = [str(c) for c in table.columns]
    body = []
    for label, row in table.iterrows():
        labels = list(label) if isinstance(label, tuple) else [label]
        cells = []
        for col in table.columns:
            v = row[col]
            s = esc(_fmt(v) if _is_number(v) or v is None else str(v))
            if (label, col) in bold and s not in (MISSING, "--"):
                s = f"**{s}**" if fmt == "md" else f"\\textbf{{{s}}}"
            cells.append(s)
        body.append(([esc(x) for x in labels], cells))
    head = [esc(c) for c in [*names, *cols]]
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (len(names) + len(cols))]
        lines += ["| " + " | ".join([*labs, *cells]) + " |" for labs, cells in body]
        if caption:  # the dataset, n and resolution of a compare: a table without them cannot be cited
            lines = [md_escape(caption), "", *lines]
        return "\n".join(lines) + "\n"
    spec = "l" * len(names) + "".join(_latex_column(table[c]) for c in table.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    lines += [" & ".join([*labs, *cells]) + r" \\" for labs, cells in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}[t]", r"\centering", r"\caption{" + latex_escape(caption) + "}", *lines, r"\end{table}"]
    return "\n".join(lines) + "\n"


#: how a CSV cell may start that spreadsheet programs run as a formula (OWASP, "CSV Injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def defuse_cell(v):
    """``v`` with a ``'`` before it when it is text that a spreadsheet would run as a formula
    (``=HYPERLINK(...)``, ``@SUM(...)``, ``-2+3``); numbers, and text that reads as one (``-1.5``,
    ``-inf``), stay as they are."""
    if not isinstance(v, str) or not v.startswith(_FORMULA_START):
        return v
    try:
        float(v)
        return v
    except ValueError:
        return "'" + v


def csv_text(table: pd.DataFrame, index: bool = True) -> str:
    """``table.to_csv()`` with every text cell, label and header passed through :func:`defuse_cell`;
    number columns are written untouched (full precision, negatives as numbers)."""
    t = table.copy()
    for c in t.columns:
        if not pd.api.types.is_numeric_dtype(t[c]):
            t[c] = t[c].map(defuse_cell)
    t.columns = [defuse_cell(c) for c in t.columns]
    if index:
        if isinstance(t.index, pd.MultiIndex):
            t.index = pd.MultiIndex.from_tuples([tuple(defuse_cell(x) for x in lab) for lab in t.index],
                                                names=t.index.names)
        else:
            t.index = pd.Index([defuse_cell(x) for x in t.index], name=t.index.name, dtype=t.index.dtype
                               if pd.api.types.is_numeric_dtype(t.index) else object)
    return t.to_csv(index=index)


#: columns that hold whole numbers (a row of an older schema that lacks one turns the column to floats)
_WHOLE_COLUMNS = ("resolution", "n_images", "seed", "skipped", "nonfinite", "schema_version", "written_ns")


def rows_csv(*frames: pd.DataFrame | None) -> str:
    """``leaderboard --format rows``: every row of ``frames`` (measured, then published) as one CSV line
    with all its columns, ``extra`` as JSON; whole-number columns as integers (not ``5000.0``) and an
    unknown n (published numbers that do not give one, stored as -1) as an empty cell."""
    import json

    rows = pd.concat([x for x in frames if x is not None and not x.empty], ignore_index=True)
    if rows.empty:
        return ""
    rows = rows.assign(extra=rows["extra"].map(lambda e: json.dumps(e, sort_keys=True, default=str)))
    for col in _WHOLE_COLUMNS:
        if col in rows:
            v = pd.to_numeric(rows[col], errors="coerce")
            if (v.dropna() % 1 == 0).all():
                rows[col] = v.astype("Int64")
    if "n_images" in rows:
        rows["n_images"] = rows["n_images"].where(pd.to_numeric(rows["n_images"], errors="coerce") >= 0)
    return csv_text(rows, index=False)
