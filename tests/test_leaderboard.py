"""Leaderboard and compare tables: one measurement per cell, one protocol per ranking, every best bold."""

from __future__ import annotations

import math
from dataclasses import asdict

import pandas as pd
import pytest

from raebench.export import latex_escape, render
from raebench.leaderboard import best_per_column, compare_bold, compare_table, domain_gap, pivot
from raebench.results import ResultRow, load, write_rows

NAN, INF = float("nan"), float("inf")


def _row(tok, metric, value, **kw):
    base = dict(tokenizer=tok, weights_id="none", dataset="d", split="val", domain="in-domain", resolution=256,
                n_images=17, metric=metric, value=value, higher_is_better=metric not in ("fid", "kid", "kid-std"),
                metric_version="v1", data_fingerprint="fp1")
    return ResultRow(**{**base, **kw})


def _frame(rows):
    return pd.DataFrame([asdict(r) for r in rows])


def _reported(tok, metric, value, reference="originals", weights_match=True, **kw):
    extra = {"reference": reference, "citation": "paper", "weights_match": weights_match}
    return _row(tok, metric, value, source="reported", metric_version="reported", n_images=5000, extra=extra, **kw)


# ---------------------------------------------------------------------------------------------
# one measurement per cell
# ---------------------------------------------------------------------------------------------


def test_metric_versions_seeds_and_splits_get_their_own_columns(tmp_path):
    write_rows([_row("pixels", "fid", 5.0, metric_version="fid-v1"),
                _row("bicubic-f8", "fid", 7.0, metric_version="fid-v1")], tmp_path)
    write_rows([_row("pixels", "fid", 9.0, metric_version="fid-v1+dtype=float64")], tmp_path)
    write_rows([_row("pixels", "probe", 0.5), _row("bicubic-f8", "probe", 0.6)], tmp_path)
    write_rows([_row("pixels", "probe", 0.9, seed=1), _row("pixels", "psnr", 30.0),
                _row("pixels", "psnr", 40.0, split="train")], tmp_path)
    table = pivot(load(tmp_path), gaps=False)
    assert table.loc["pixels", "d [fid-v1]/fid"] == 5.0 and table.loc["bicubic-f8", "d [fid-v1]/fid"] == 7.0
    assert table.loc["pixels", "d [fid-v1+dtype=float64]/fid"] == 9.0
    assert table.loc["pixels", "d seed=0/probe"] == 0.5 and table.loc["pixels", "d seed=1/probe"] == 0.9
    assert table.loc["pixels", "d:val/psnr"] == 30.0 and table.loc["pixels", "d:train/psnr"] == 40.0
    md = render(table, "md", {"fid": False, "probe": True, "psnr": True})
    assert "**5.0000**" in md and "**7.0000**" not in md and "**0.6000**" in md


def test_a_cell_is_one_measurement_and_a_newer_nan_is_shown(tmp_path):
    write_rows([_row("pixels", "psnr", 2.0)], tmp_path)
    write_rows([_row("pixels", "psnr", NAN, notes="empty test split")], tmp_path)  # the same measurement, newer
    assert math.isnan(pivot(load(tmp_path, latest=False), gaps=False).iloc[0, 0])


def test_domain_gap_pairs_values_of_one_metric_version():
    rows = [_row("a", "psnr", 25.0, dataset="imagenet-val", metric_version="v1"),
            _row("a", "psnr", 20.0, dataset="coco-val2017", domain="open-domain", metric_version="v2")]
    assert domain_gap(_frame(rows)).empty
    rows.append(_row("a", "psnr", 22.0, dataset="coco-val2017", domain="open-domain", metric_version="v1"))
    gap = domain_gap(_frame(rows))
    assert gap["gap"].tolist() == [-3.0] and gap["metric_version"].tolist() == ["v1"]


# ---------------------------------------------------------------------------------------------
# reported numbers: one protocol per column
# ---------------------------------------------------------------------------------------------


def test_reported_columns_are_keyed_by_reference_and_variant_status():
    rep = _frame([_reported("a", "fid", 0.5, "RAE protocol"), _reported("b", "fid", 0.3, "another protocol"),
                  _reported("c", "fid", 0.4, "RAE protocol"),
                  _reported("c", "fid", 0.1, "RAE protocol", weights_match=False)])
    table = pivot(pd.DataFrame(columns=rep.columns), reported=rep)
    cols = {c: table[c].dropna().to_dict() for c in table.columns}
    assert cols == {"d n=5000 reported (ref: RAE protocol)/fid": {"a": 0.5, "c": 0.4},
                    "d n=5000 reported (ref: another protocol)/fid": {"b": 0.3},
                    "d n=5000 reported variant (ref: RAE protocol)/fid": {"c": 0.1}}
    best = best_per_column(table, {"fid": False})
    assert best["d n=5000 reported (ref: RAE protocol)/fid"] == ["c"]  # not b (another protocol), not c's variant


def test_compare_shows_the_number_for_the_loaded_weights_before_a_variant():
    rep = _frame([_reported("a", "fid", 0.5), _reported("a", "fid", 0.1, weights_match=False)])
    rep = rep.assign(rank=[2, 0], weights_match=[True, False])  # as reported_frame: the variant ranks higher
    row = compare_table(pd.DataFrame(columns=rep.columns), ["a"], 256, reported=rep).loc[("d", "fid")]
    assert row["a (reported)"] == 0.5 and "+1 other value(s)" in row["protocol"]


# ---------------------------------------------------------------------------------------------
# compare: measured cells on different image subsets; NaN rows
# ---------------------------------------------------------------------------------------------


def test_compare_does_not_rank_values_on_different_image_subsets():
    meas = _frame([_row("a", "psnr", 20.0, n_images=17), _row("b", "psnr", 25.0, n_images=14),
                   _row("a", "ssim", 0.5), _row("b", "ssim", 0.6)])
    t = compare_table(meas, ["a", "b"], 256)
    psnr, ssim = t.loc[("d", "psnr")], t.loc[("d", "ssim")]
    assert psnr["best"] == "" and math.isnan(psnr["Δ b"]) and "different image subsets" in psnr["protocol"]
    assert "n=14/17" in psnr["protocol"] and "same images" not in psnr["protocol"]
    assert ssim["best"] == "b" and ssim["Δ b"] == pytest.approx(0.1) and "same images, n=17" in ssim["protocol"]


def test_measured_nan_rows_keep_their_tokenizer_row_and_column():
    meas = _frame([_row("a", "probe", NAN, notes="empty test split"), _row("b", "probe", NAN),
                   _row("a", "psnr", NAN), _row("b", "psnr", 25.0)])
    table = pivot(meas, gaps=False)
    assert list(table.columns) == ["d/probe", "d/psnr"] and list(table.index) == ["a", "b"]
    assert "| a | – | – |" in render(table, "md", {"probe": True, "psnr": True})
    t = compare_table(meas, ["a", "b"], 256)
    assert {"a", "b"} <= set(t.columns) and ("d", "probe") in t.index
    assert t.loc[("d", "psnr"), "best"] == "" and t.loc[("d", "probe"), "best"] == ""  # b's value is alone


# ---------------------------------------------------------------------------------------------
# bold: ties, infinities, spreads
# ---------------------------------------------------------------------------------------------


def test_every_tie_is_bold_and_no_best_for_infinities_or_spreads():
    table = pd.DataFrame({"d/psnr": [25.0, 25.0, 20.0], "d/fid": [INF, INF, NAN], "d/kid-std": [0.1, 0.2, 0.3],
                          "d/is-std": [1.0, 2.0, 3.0]}, index=["a", "b", "c"])
    assert best_per_column(table, {"psnr": True, "fid": False, "kid-std": False, "is-std": False}) == {"d/psnr": ["a", "b"]}
    meas = _frame([_row(t, "psnr", 25.0 if t != "c" else 20.0) for t in "abc"] + [_row(t, "kid-std", 0.1) for t in "ab"])
    t = compare_table(meas, ["a", "b", "c"], 256)
    assert t.loc[("d", "psnr"), "best"] == "a, b" and t.loc[("d", "kid-std"), "best"] == ""
    assert compare_bold(t) == {(("d", "psnr"), "a"), (("d", "psnr"), "b")}


# ---------------------------------------------------------------------------------------------
# labels and LaTeX
# ---------------------------------------------------------------------------------------------


def test_resolution_shows_on_every_column_when_the_table_has_several():
    table = pivot(_frame([_row("a", "fid", 1.0)]), reported=_frame([_reported("a", "fid", 0.5, resolution=512)]))
    assert list(table.columns) == ["d@256 n=17/fid", "d@512 n=5000 reported/fid"]


def test_explicit_labels_name_resolution_and_n_on_every_column():
    """A CSV export has no caption: a one-protocol table's measured columns said neither resolution nor n
    (``d/psnr``), reported columns no resolution, gap columns neither: with ``explicit`` every label does."""
    rows = [_row("a", "psnr", 20.0), _row("b", "psnr", 21.0),
            _row("a", "psnr", 19.0, dataset="o", domain="open-domain", n_images=9, data_fingerprint="fp2"),
            _row("b", "psnr", 18.0, dataset="o", domain="open-domain", n_images=9, data_fingerprint="fp2")]
    rep = _frame([_reported("a", "psnr", 25.0)])
    assert list(pivot(_frame(rows), reported=rep)) == ["d n=17/psnr", "d n=5000 reported/psnr", "o n=9/psnr",
                                                       "gap o - d/psnr"]  # what the caption completes
    assert list(pivot(_frame(rows), reported=rep, explicit=True)) == [
        "d@256 n=17/psnr", "d@256 n=5000 reported/psnr", "o@256 n=9/psnr", "gap o n=9 - d n=17@256/psnr"]
    assert list(pivot(_frame(rows[:2]), explicit=True)) == ["d@256 n=17/psnr"]


def test_latex_escapes_the_bar():
    assert latex_escape("local:/w|a") == r"local:/w\textbar{}a"
    assert r"\textbar{}" in render(pd.DataFrame({"d/psnr": [1.0]}, index=["x|y"]), "latex", {"psnr": True})


def test_gaps_over_other_image_sets_are_other_columns_never_ranked_together():
    """A tokenizer whose open-domain side is a 4-image subset has a gap over other images than one
    measured on all 12: its own column (n on both sides), so neither is bold against the other; the
    same n over another image list is told apart by fingerprint; compare's gap table likewise."""
    from raebench.leaderboard import gap_table

    def both(tok, open_v, in_v, open_n=12, open_fp="fpO", in_fp="fpI"):
        return [_row(tok, "psnr", open_v, dataset="open", domain="open-domain", n_images=open_n, data_fingerprint=open_fp),
                _row(tok, "psnr", in_v, dataset="in", n_images=12, data_fingerprint=in_fp)]

    df = _frame(both("f8", 20.0, 20.0) + both("f16", 20.0, 17.8, open_n=4) + both("f4", 21.0, 20.0))
    table = pivot(df)
    gaps = {c: table[c].dropna().to_dict() for c in table.columns if c.startswith("gap ")}
    assert gaps == {"gap open n=12 - in n=12/psnr": {"f8": 0.0, "f4": 1.0},
                    "gap open n=4 - in n=12/psnr": {"f16": pytest.approx(2.2)}}
    best = best_per_column(table, {"psnr": True})
    assert best["gap open n=12 - in n=12/psnr"] == ["f4"] and "gap open n=4 - in n=12/psnr" not in best  # alone
    gt = gap_table(domain_gap(df))
    assert set(gt.index.get_level_values("pair")) == {"open n=12 - in n=12", "open n=4 - in n=12"}

    df = _frame(both("f8", 20.0, 20.0) + both("f4", 21.0, 20.0, open_fp="other"))  # same n, another image list
    cols = [c for c in pivot(df).columns if c.startswith("gap ")]
    assert sorted(cols) == ["gap open n=12 #fpO - in n=12 #fpI/psnr", "gap open n=12 #other - in n=12 #fpI/psnr"]
    df = _frame(both("f8", 20.0, 20.0) + both("f4", 21.0, 20.0))  # one protocol: the plain label, as before
    assert [c for c in pivot(df).columns if c.startswith("gap ")] == ["gap open - in/psnr"]


def test_a_line_break_in_a_label_keeps_markdown_and_latex_rows_whole():
    """A local weights folder named with a line break split its Markdown row in two and put a paragraph
    break (a blank line) inside the LaTeX tabular."""
    table = pd.DataFrame({"d/psnr": [1.0, 2.0]}, index=["sd-vae-ft-ema [local:my\nvae]", "b [local:x\n\ny|z]"])
    md = render(table, "md", {"psnr": True})
    assert md.splitlines()[2:] == ["| sd-vae-ft-ema [local:my vae] | 1.0000 |", "| b [local:x  y\\|z] | **2.0000** |"]
    tex = render(table, "latex", {"psnr": True})
    assert "\n\n" not in tex and r"b [local:x  y\textbar{}z] & \textbf{2.0000} \\" in tex


def test_compare_never_ranks_values_of_different_resolutions_and_names_the_resolution():
    """Without a resolution, compare_table ranked one tokenizer's 512 px PSNR against another's 256 px
    one as 'same images'; CSV and Markdown exports (no title) never said which resolution it was."""
    meas = _frame([_row("a", "psnr", 20.0), _row("b", "psnr", 25.0), _row("a", "psnr", 30.0, resolution=512)])
    with pytest.raises(ValueError, match=r"resolutions \[256, 512\]"):
        compare_table(meas, ["a", "b"])
    t = compare_table(meas, ["a", "b"], 256)
    assert t.loc[("d", "psnr"), "best"] == "b" and t.loc[("d", "psnr"), "protocol"].startswith("256 px | measured")
    one = compare_table(meas[meas["resolution"] == 256], ["a", "b"])  # the only resolution present
    assert one.loc[("d", "psnr"), "Δ b"] == 5.0 and "256 px" in one.loc[("d", "psnr"), "protocol"]


def test_markdown_export_keeps_the_caption():
    """compare --format md dropped its title (dataset, n, resolution, what was computed now)."""
    md = render(pd.DataFrame({"d/psnr": [1.0]}, index=["a"]), "md", {"psnr": True}, caption="compare on d (n=4) · 32px")
    assert md.splitlines()[:3] == ["compare on d (n=4) · 32px", "", "|  | d/psnr |"]


def test_a_tokenizer_measured_only_in_bf16_is_labelled_so():
    """A bf16-only tokenizer sat unmarked in the leaderboard, ranked beside fp32 ones (and beside the
    published fp32 numbers of its bare name)."""
    table = pivot(_frame([_row("a", "psnr", 20.0, precision="bf16"), _row("b", "psnr", 25.0)]), gaps=False)
    assert list(table.index) == ["a [bf16]", "b"]


def test_rows_export_writes_whole_numbers_and_no_minus_one_images():
    """``--format rows`` cited a published number 'on -1 images' (the unknown-n sentinel), and a row of
    an older schema without a resolution turned every resolution and n into '256.0', '17.0'."""
    import io

    from raebench.export import rows_csv

    meas = _frame([_row("a", "psnr", 20.0)]).assign(resolution=[None]).astype({"resolution": object})
    meas = pd.concat([meas, _frame([_row("b", "psnr", 21.0)])], ignore_index=True)
    text = rows_csv(meas, _frame([_reported("a", "fid", 0.6)]).assign(n_images=[-1]))  # a card that gives no n
    back = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    assert back["resolution"].tolist() == ["", "256", "256"] and back["n_images"].tolist() == ["17", "17", ""]


def test_the_caption_states_what_every_measured_column_shares():
    """Column labels name only what tells columns apart; the md/latex caption says the rest (n per
    dataset, resolution, seed, precision where the rows agree), so a one-protocol table can be cited."""
    from raebench.leaderboard import leaderboard_caption

    df = _frame([_row("pixels", "psnr", 40.0), _row("bicubic-f8", "psnr", 20.0),
                 _row("pixels", "psnr", 30.0, dataset="open", n_images=12), _reported("pixels", "psnr", 41.0)])
    assert leaderboard_caption(df) == ("Measured on d (n=17), open (n=12); 256 px; seed 0; fp32; "
                                       "the best of each column in bold where its values differ")
    df = _frame([_row("pixels", "psnr", 40.0), _row("pixels", "psnr", 30.0, n_images=5, resolution=512, seed=1)])
    assert leaderboard_caption(df) == ("Measured on d; fp32; the best of each column in bold where its values "
                                       "differ")  # n, px, seed differ: labels
    md = render(pivot(df, gaps=False), "md", caption=leaderboard_caption(df))
    assert md.startswith("Measured on d; fp32; the best") and "| tokenizer |" in md


# ---------------------------------------------------------------------------------------------
# exports: literal text, formulas, wrapping, lone values
# ---------------------------------------------------------------------------------------------


def test_markdown_shows_labels_and_text_cells_literally():
    """Only '|' was escaped: a weights folder ``my_vae*v2*`` rendered in italics, ``C:\\runs\\x`` lost its
    backslashes' meaning, ``<b>`` became HTML, backticks code, ``~~s~~`` strikethrough, ``[l](u)`` a link."""
    import html
    import re

    markdown_it = pytest.importorskip("markdown_it")  # rich's Markdown parser (GFM tables, strikethrough)
    labels = ["my_vae*v2* [local:C:\\runs\\x]", "a`b`<b>x</b> ~~s~~ &amp; [l](u)", "p|q\\|r _s_"]
    table = pd.DataFrame({"_d_/psnr": [1.0, 2.0, 3.0], "note": ["_a_", "*b*", "`c`"]}, index=labels)
    text = render(table, "md", {"psnr": True}, caption="compare on my_set_ (n=4)")
    out = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)
    cells = [html.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", out)]
    assert cells == ["", "_d_/psnr", "note", labels[0], "1.0000", "_a_", labels[1], "2.0000", "*b*",
                     labels[2], "<strong>3.0000</strong>", "`c`"]
    assert out.startswith("<p>compare on my_set_ (n=4)</p>")


def test_latex_escapes_every_special_and_wraps_long_text_columns():
    """``<``, ``>`` and backticks printed as ¡, ¿ and a quote (OT1); a long ``protocol`` column was ``r``
    and ran off the page."""
    assert latex_escape("a&b%c$d#e_f{g}h~i^j\\k<l>m`n") == (
        r"a\&b\%c\$d\#e\_f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k\textless{}l"
        r"\textgreater{}m\textasciigrave{}n")
    long = "256 px | measured: same images, n=17 | a reported: n=5000, ref: originals"
    t = pd.DataFrame({"a": [1.0, 2.0], "best": ["a", ""], "protocol": [long, "x"]},
                     index=pd.MultiIndex.from_tuples([("d", "psnr"), ("d", "ssim")], names=["dataset", "metric"]))
    tex = render(t, "latex", bold=set())
    assert tex.splitlines()[0] == r"\begin{tabular}{llrl>{\raggedright\arraybackslash}p{0.35\linewidth}}"


def test_csv_defuses_formulas_and_keeps_numbers():
    """OWASP CSV injection: text cells, labels and headers starting with = + - @ get a leading ';
    numbers (negative ones included) and text that reads as a number stay as they are."""
    import io

    from raebench.export import rows_csv

    t = pd.DataFrame({"=x/psnr": [-1.5, 2.0], "note": ['=HYPERLINK("http://e")', "-2.5"]}, index=["@SUM(A1)", "+b"])
    back = pd.read_csv(io.StringIO(render(t, "csv")), index_col=0, dtype={"note": str})
    assert list(back.columns) == ["'=x/psnr", "note"] and list(back.index) == ["'@SUM(A1)", "'+b"]
    assert back["'=x/psnr"].tolist() == [-1.5, 2.0] and back["note"].tolist() == ['\'=HYPERLINK("http://e")', "-2.5"]
    rows = pd.read_csv(io.StringIO(rows_csv(_frame([_row("a", "psnr", -3.0, notes="-cmd|' /C calc'!A0")]))))
    assert rows["value"].tolist() == [-3.0] and rows["notes"].tolist() == ["'-cmd|' /C calc'!A0"]


def test_a_lone_value_or_a_column_of_ties_is_never_bold():
    """A column with one value (a published number of one tokenizer, a run of one) was bold as if it had
    beaten something; a column where every value ties was all bold."""
    table = pd.DataFrame({"d/psnr": [25.0, NAN, NAN], "d/ssim": [0.5, 0.5, 0.5], "d/fid": [1.0, 1.0, 2.0],
                          "e/fid": [INF, 3.0, NAN]}, index=["a", "b", "c"])
    assert best_per_column(table, {"psnr": True, "ssim": True, "fid": False}) == {"d/fid": ["a", "b"], "e/fid": ["b"]}
    board = pivot(_frame([_row("a", "psnr", 20.0), _row("b", "psnr", 25.0)]),
                  reported=_frame([_reported("a", "psnr", 26.0)]), gaps=False)
    md = render(board, "md", {"psnr": True})
    assert "**25.00**" in md and "| 26.00 |" in md  # the published number stands alone in its column
    t = compare_table(_frame([_row("a", "psnr", 20.0), _row("b", "psnr", 20.0)]), ["a", "b"], 256)
    assert t.loc[("d", "psnr"), "best"] == "" and compare_bold(t) == set()
    assert compare_table(_frame([_row("a", "psnr", 20.0)]), ["a"], 256).loc[("d", "psnr"), "best"] == ""


def test_the_terminal_compare_table_keeps_bracketed_flags():
    """rich read ``[variant]``, ``[secondary, not re-verified]`` and ``[bf16]`` as markup and dropped them."""
    import io

    from rich.console import Console

    from raebench.cli.core import _rich_table

    t = pd.DataFrame({"a [bf16]": [1.0], "protocol": ["a reported: n=5000 [secondary, variant]"]},
                     index=pd.MultiIndex.from_tuples([("d", "psnr")], names=["dataset", "metric"]))
    con = Console(file=io.StringIO(), width=200)
    con.print(_rich_table(t, "compare on [x]", {(("d", "psnr"), "a [bf16]")}))
    text = con.file.getvalue()
    assert "[secondary, variant]" in text and "a [bf16]" in text and "compare on [x]" in text


def test_number_format_keeps_the_sign_of_infinity_and_one_precision_per_magnitude():
    """A Δ against an infinite FID (-inf) read "inf"; 9.99996 read 10.0000 beside 10.00001's 10.00."""
    from raebench.leaderboard import _fmt

    assert [_fmt(v) for v in (INF, -INF, NAN, 9.99996, 10.00001, 9.99994, -12.345, 99999.996, 0.0005, 0.0)] == [
        "inf", "-inf", "–", "10.00", "10.00", "9.9999", "-12.35", "1.000e+05", "5.000e-04", "0.0000"]


def test_values_equal_at_the_precision_shown_tie():
    """25.1234 and 25.1249 both read 25.12, and only one was bold; compare named one of them best."""
    table = pd.DataFrame({"d/psnr": [25.1234, 25.1249, 20.0], "d/fid": [12.341, 12.344, 13.0],
                          "e/ssim": [0.91234, 0.91236, 0.5]}, index=["a", "b", "c"])
    assert best_per_column(table, {"psnr": True, "fid": False, "ssim": True}) == {
        "d/psnr": ["a", "b"], "d/fid": ["a", "b"], "e/ssim": ["b"]}  # 0.9123 < 0.9124 as shown
    t = compare_table(_frame([_row("a", "psnr", 25.1234), _row("b", "psnr", 25.1249)]), ["a", "b"], 256)
    assert t.loc[("d", "psnr"), "best"] == ""  # all tie as shown


def test_number_format_boundaries_and_unknown_n():
    from raebench.leaderboard import _fmt, _n

    assert _fmt(0.001) == "0.0010" and _fmt(0.000999) == "9.990e-04"  # scientific only below 1e-3
    assert _n(0) == "n=0" and _n(-1) == "n=?" and _n(None) == "n=?"


def test_no_best_when_the_best_is_infinite():
    # the documented rule: a best that is not finite bolds nothing (here a higher-is-better column with inf)
    table = pd.DataFrame({"d/psnr": [INF, 20.0, 10.0]}, index=["a", "b", "c"])
    assert best_per_column(table, {"psnr": True}) == {}


def test_a_missing_cell_is_never_bold_and_delta_is_latex():
    table = pd.DataFrame({"Δ b": [NAN, 1.0]}, index=["x", "y"])
    md = render(table, "md", bold={("x", "Δ b"), ("y", "Δ b")})
    assert "**–**" not in md and "**1.0000**" in md
    assert r"$\Delta$ b" in render(table, "latex", bold=set())



def test_rows_of_other_metric_networks_weights_are_never_one_column_or_ranking(tmp_path):
    """FID of tokenizer a with one Inception's weights and of b with another's shared a column, and b was
    bold against a; now each networks identity is its own column (labelled where it tells columns apart),
    a gap pairs sides of one identity, and compare does not rank or subtract across identities."""
    def row(tok, metric, value, inc, **kw):
        return _row(tok, metric, value, extra={"metric_weights": {"inception": f"fid-v1||weights={inc}"}}, **kw)

    write_rows([row("a", "fid", 5.0, "aaaa"), row("a", "psnr", 30.0, "aaaa"),
                row("a", "fid", 6.0, "aaaa", dataset="o", domain="open-domain", data_fingerprint="fp2")], tmp_path)
    write_rows([row("b", "fid", 7.0, "bbbb"), row("b", "psnr", 31.0, "bbbb"),
                row("b", "fid", 9.0, "aaaa", dataset="o", domain="open-domain", data_fingerprint="fp2")], tmp_path)
    df = load(tmp_path)
    table = pivot(df)
    fid = sorted(c for c in table.columns if c.startswith("d ") and c.endswith("/fid"))
    assert len(fid) == 2 and all("[networks #" in c for c in fid), list(table.columns)
    assert {table[c].dropna().index[0] for c in fid} == {"a", "b"}  # one tokenizer per column: nothing bold
    assert not set(fid) & set(best_per_column(table, {"fid": False}))
    assert table.loc["a", "d/psnr"] == 30.0 and table.loc["b", "d/psnr"] == 31.0  # PSNR has no networks: one column
    gaps = domain_gap(df)
    assert list(gaps[gaps["metric"] == "fid"]["tokenizer"]) == ["a"]  # b's sides used other Inception weights
    t = compare_table(df[df["dataset"] == "d"], ["a", "b"])
    assert t.loc[("d", "fid"), "best"] == "" and math.isnan(t.loc[("d", "fid"), "Δ b"])
    assert "other weights of the metric networks" in t.loc[("d", "fid"), "protocol"]
    assert t.loc[("d", "psnr"), "best"] == "b"


@pytest.mark.parametrize("wid", ["local:x@0123456789ab", "diffusers:x@0123456789ab", "official:x@0123456789ab"])
def test_weights_the_user_supplied_never_share_the_row_of_published_numbers(wid):
    """A diffusers-format folder or an official YAML's files are the user's weights as a --weights copy is
    (raebench.weights.LOCAL_LABELS): named in the row label, never beside the card's numbers."""
    df = _frame([_row("rae-dinov2-b", "psnr", 20.0, weights_id=wid), _reported("rae-dinov2-b", "psnr", 18.0)])
    assert list(pivot(df, gaps=False).index) == ["rae-dinov2-b", f"rae-dinov2-b [{wid}]"]
