"""``defend bench``: validate model cards and write the IDLS-Bench leaderboard.

usage: defend bench CARDS... --out DIR [--protocol NAME|SHA] [--sort COLUMN] [--overwrite]

  CARDS               card.json files, or folders searched recursively for card.json
  --out DIR           where leaderboard.md, leaderboard.csv, index.html and scatter.png go (created)
  --protocol NAME|SHA the protocol of the main ranking: a frozen protocol's name (bench-v1) or a protocol sha256
                      (or its first 12+ hex digits); default bench-v1 where a card has it, else the protocol with the
                      most cards. Every other protocol gets its own table, never mixed into one ranking.
  --sort COLUMN       the ranking column (default: dual_robustness_adaptive, then autoattack_acc): name, defence,
                      architecture, training_data, clean_acc, autoattack_acc, topk_tau, dual_robustness,
                      dual_robustness_adaptive, adaptive_gap, dual_certified_acc, number_forward_passes,
                      eval_seconds, device, source
                      (the page sorts by any column, the per-attack ones included)
  --overwrite         allow replacing files in DIR that defend did not write

Every card is read as JSON only and checked (schema, protocol hash against its battery, weights and inputs sha256);
each card that cannot be ranked is printed as one line with its reason and listed on the page. Bad arguments (no
CARDS, a path that does not exist, an unknown column or protocol, a file in DIR defend did not write) are one line
and exit status 2, before any card is read; a --protocol no valid card has, or no card that can be ranked at all, is
one line too, and nothing is written. See docs/bench.md.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from .leaderboard import COLUMN_KEYS, check_protocol_option, collect, column, find_cards

__all__ = ["main", "bench", "OUTPUTS"]

#: the files ``defend bench`` writes into --out
OUTPUTS = ("leaderboard.md", "leaderboard.csv", "index.html", "scatter.png")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{message} (see `defend bench --help`)")


def _parser() -> _Parser:
    """The parser; ``--help`` prints this module's docstring (usage, options, rules) after the one-line summary."""
    usage, _, rest = (__doc__ or "").partition("usage: ")[2].partition("\n")
    p = _Parser(prog="defend bench", usage=usage, allow_abbrev=False, add_help=False,
                description="Validate model cards and write the IDLS-Bench leaderboard (md, csv, index.html).",
                epilog=rest.strip("\n") + "\n\nexample:\n  defend bench runs/scorecard/cards --out runs/bench",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="help", help=argparse.SUPPRESS)
    p.add_argument("cards", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--protocol", help=argparse.SUPPRESS)
    p.add_argument("--sort", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace) -> None:
    """Every argument, one line each, before any card is read."""
    if not args.cards:
        raise ValueError("no CARDS: give card.json files or folders holding them, e.g. defend bench runs/*/cards "
                         "--out runs/bench")
    if not args.out or not str(args.out).strip():
        raise ValueError("--out DIR is required (where leaderboard.md, leaderboard.csv and index.html go)")
    if args.sort is not None and args.sort not in COLUMN_KEYS:
        raise ValueError(f"--sort {args.sort!r} is not a column; the columns: {', '.join(COLUMN_KEYS)}")
    check_protocol_option(args.protocol)
    find_cards(args.cards)  # a path that does not exist: one line


def bench(cards: Sequence[str | Path], out: str | Path, *, protocol: str | None = None, sort: str | None = None,
          overwrite: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """Collect, rank and write the leaderboard into ``out``; returns (the files written, the cards not ranked).
    Refuses (one line, nothing written) when no card is valid or a file in ``out`` is not defend's own."""
    from ..io import OutputGuard, atomic_write_text, guarded_outputs
    from .leaderboard import build_tables
    from .page import page_html, scatter_points
    from .pareto import pareto_front
    from .writers import csv_text, markdown

    if sort is not None:
        column(sort)
    out = Path(out)
    guard = OutputGuard(out, overwrite=overwrite)
    planned = [out / name for name in OUTPUTS]
    guard.refuse(planned)
    valid, invalid = collect(cards)
    if not invalid and not valid:
        raise ValueError(f"no card.json under {', '.join(map(str, cards))[:200]}: give card.json files or folders "
                         "holding them")
    if not valid:
        raise ValueError(f"none of the {len(invalid)} card(s) can be ranked; the first: {invalid[0][0]}: "
                         f"{invalid[0][1]}")
    tables = build_tables(valid, protocol, sort)
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    points = scatter_points(next(t for t in tables if t.main).cards)
    written: list[Path] = []
    with guarded_outputs(guard):
        if points:
            from ..figures import scatter_ci_plot

            front = pareto_front([(p[0], p[3]) for p in points])
            scatter_ci_plot(planned[3], points, front, "AutoAttack accuracy (higher is better)",
                            "top-k Kendall tau (higher is better)", f"IDLS-Bench: {tables[0].title}")
            written.append(planned[3])
        atomic_write_text(planned[0], markdown(tables, invalid, made, OUTPUTS[3] if points else None))
        atomic_write_text(planned[1], csv_text(tables))
        atomic_write_text(planned[2], page_html(tables, invalid, made))
    return planned[:3] + written, invalid


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``defend bench``; 0 on success, 2 with a one-line error (nothing written)."""
    from ..errors import USER_ERRORS, debug_enabled, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    out, created = None, False
    try:
        args = _parser().parse_args(argv)
        _check(args)
        out = Path(args.out)
        created = not out.exists()
        written, invalid = bench(args.cards, out, protocol=args.protocol, sort=args.sort, overwrite=args.overwrite)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except USER_ERRORS as exc:
        if created and out is not None and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if debug_enabled():
            raise
        print(f"defend bench: error: {one_line(exc)}", file=sys.stderr)
        return 2
    for path, reason in invalid:
        print(f"not ranked: {path}: {reason}")
    for path in written:
        print(f"wrote {path}")
    return 0
