"""The leaderboard's cells as text, ``leaderboard.md`` and ``leaderboard.csv``.

A figure with an interval reads ``0.48 ± 0.06`` (the value and the half-width of its 95 % interval) when the interval
is symmetric about the value to the shown precision, else ``0.02 [0.01, 0.07]`` (the bounds: a Wilson interval near 0
or 1 is lopsided, and ``±`` would claim a bound below 0); ``-`` is not measured. The ``n`` of a column goes into its
header when every entry of the table has the same, else beside each cell (``0.48 ± 0.06 (n 500)``). The CSV keeps
full precision, the bounds in ``<column>_ci_low`` / ``<column>_ci_high`` and the n in ``<column>_n``.
"""
from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .leaderboard import BenchCard, Column, Table, cell_at, cell_interval, cell_n, cell_value, column

__all__ = ["DIGITS", "figure_text", "cell_text", "column_n", "header_text", "ranking_text", "markdown", "csv_text"]

#: decimals of a figure on the board (the CSV keeps every digit)
DIGITS = 2


def figure_text(value: float | None, low: float | None, high: float | None, digits: int = DIGITS) -> str:
    """``0.48 ± 0.06``, ``0.02 [0.01, 0.07]`` (asymmetric), ``0.48`` (no interval) or ``-`` (not measured)."""
    if value is None:
        return "-"
    out = f"{value:.{digits}f}"
    if low is None or high is None:
        return out
    if abs((value - low) - (high - value)) < 0.5 * 10 ** -digits:
        return f"{out} ± {(high - low) / 2:.{digits}f}"
    return f"{out} [{low:.{digits}f}, {high:.{digits}f}]"


def column_n(cards: Sequence[BenchCard], col: Column) -> int | None:
    """The n of ``col`` when every entry that has the figure states the same one, else None."""
    ns = {cell_n(c.entry, col) for c in cards if cell_value(c.entry, col) is not None}
    return ns.pop() if len(ns) == 1 and None not in ns else None


def cell_text(entry: Mapping[str, Any], col: Column, rank: int, header_n: int | None) -> str:
    """The text of one cell (card text as written: escape it for the format it goes into)."""
    value = cell_value(entry, col, rank)
    if value is None:
        return "-"
    if isinstance(value, str):
        return " ".join(value.split())
    if col.kind != "figure":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    text = figure_text(value, *cell_interval(entry, col))
    at = cell_at(entry, col)
    text = text if at is None else f"{text} at r {at:g}"
    n = cell_n(entry, col)
    return text if header_n is not None or n is None else f"{text} (n {n})"


def header_text(cards: Sequence[BenchCard], col: Column) -> str:
    """A column's header: its title, with the n of its figures where the table has one."""
    n = column_n(cards, col)
    return f"{col.title} (n {n})" if n is not None else col.title


def ranking_text(table: Table) -> str:
    """``ranked by dual robustness (adaptive), then AutoAttack acc: best first, not measured last, ties by name``."""
    titles = [column(k, table.columns).title for k in table.sort]
    return f"ranked by {', then '.join(titles)}: best first, not measured last, ties by name"


# ------------------------------------------------------------------------------------------------ markdown
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def md_escape(text: str) -> str:
    """Card text as literal Markdown: one line, HTML and Markdown syntax escaped (a card comes from a stranger)."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(text.split())))


def _md_table(table: Table) -> list[str]:
    heads = [md_escape(header_text(table.cards, c)) for c in table.columns]
    align = ["---" if c.kind == "text" else "---:" for c in table.columns]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|"]
    for i, card in enumerate(table.cards, 1):
        cells = [cell_text(card.entry, c, i, column_n(table.cards, c)) for c in table.columns]
        cells = [md_escape(t) if c.kind == "text" else t for c, t in zip(table.columns, cells)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _dates(table: Table) -> str:
    dates = sorted({c.date for c in table.cards if c.date and re.fullmatch(r"\d{4}-\d\d-\d\d", c.date)})
    if not dates:
        return "evaluation dates not stated"
    return f"evaluated {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")


def markdown(tables: Sequence[Table], invalid: Sequence[tuple[str, str]], made: str, scatter: str | None) -> str:
    """``leaderboard.md``: per protocol its name, hash, dates, entries and ranking, the table; the scatter; the cards
    not ranked with their reason. ``made``: the date line (UTC)."""
    lines = ["# IDLS-Bench leaderboard", "",
             f"Made {made} by `defend bench` from {sum(len(t.cards) for t in tables)} ranked card(s) "
             f"({len(invalid)} not ranked). A cell reads value ± half-width of its 95 % interval (value [low, high] "
             "where the interval is lopsided); `-`: not measured; n: inputs behind the figure. See docs/bench.md.", ""]
    for t in tables:
        head = f"## {md_escape(t.title)}" + (" (main ranking)" if t.main else " (another protocol: ranked apart)")
        lines += [head, "", f"Protocol sha256 `{t.protocol}`; {len(t.cards)} entries; {_dates(t)}; "
                  f"{md_escape(ranking_text(t))}.", ""]
        lines += _md_table(t) + [""]
    if scatter:
        lines += ["## Robust accuracy against interpretation robustness", "",
                  f"![AutoAttack accuracy against top-k Kendall tau, Pareto front drawn]({scatter})", ""]
    lines += ["## Cards not ranked", ""]
    lines += [f"- `{md_escape(path)}`: {md_escape(reason)}" for path, reason in invalid] or ["None."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ csv
def _csv_safe(text: str) -> str:
    """Card text in a CSV cell: a leading ``= + - @`` (a spreadsheet formula) is quoted with ``'``."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_fields(col: Column) -> list[str]:
    if col.kind != "figure":
        return [col.key]
    return [col.key, f"{col.key}_ci_low", f"{col.key}_ci_high", f"{col.key}_n"] + ([f"{col.key}_at"] if col.at_key
                                                                                  else [])


def _csv_cells(entry: Mapping[str, Any], col: Column, rank: int) -> list[Any]:
    value = cell_value(entry, col, rank)
    if isinstance(value, str):
        return [_csv_safe(" ".join(value.split()))]
    cells: list[Any] = ["" if value is None else (int(value) if value.is_integer() and col.kind != "figure" else value)]
    if col.kind == "figure":
        low, high = cell_interval(entry, col)
        n = cell_n(entry, col)
        at = [entry.get(col.at_key)] if col.at_key else []
        at = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in at]
        cells += ["" if v is None else v for v in (low, high, n, *at)]
    return cells


def csv_text(tables: Sequence[Table]) -> str:
    """``leaderboard.csv``: one row per entry per protocol (``protocol``: its name or hash), every column of every
    table (empty where a table lacks it), intervals as ``_ci_low`` / ``_ci_high``, and ``card`` (its path)."""
    cols: list[Column] = []
    for t in tables:
        cols += [c for c in t.columns if c.key not in {k.key for k in cols}]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["protocol", "protocol_sha256"] + [f for c in cols for f in _csv_fields(c)] + ["card"])
    for t in tables:
        for i, card in enumerate(t.cards, 1):
            cells = [_csv_safe(t.title), t.protocol]
            keys = {k.key for k in t.columns}
            for c in cols:
                cells += _csv_cells(card.entry, c, i) if c.key in keys else [""] * len(_csv_fields(c))
            writer.writerow(cells + [_csv_safe(card.path)])
    return buf.getvalue()
