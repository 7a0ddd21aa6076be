"""Markdown tables of the reports (``report.md`` of every experiment and of ``defend evaluate``)."""
from __future__ import annotations

from typing import Any

__all__ = ["fmt", "markdown_table"]


def fmt(v: Any) -> str:
    """One table cell: floats to three decimals, ``None`` (not measured) as ``-``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table (no trailing newline); cells through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
