"""``defend card upgrade``: convert schema 1.x model cards to schema 2.0 (a ``protocol`` and a leaderboard ``entry``).

usage: defend card upgrade CARD [CARD ...] --out DIR [--overwrite]

  CARD         a 1.x card.json, or the folder holding it
  --out DIR    write DIR/<name>/card.json, <name> being the card's folder name (also the entry's name)
  --overwrite  replace an existing DIR/<name>/card.json that defend did not write (otherwise refused; DIR's output
               manifest, as for every defend output, lets a later upgrade replace its own unedited files)

Each card must be a 1.x card: ``schema`` ``idls-defend-card``, a ``schema_version`` of 1.x and every top-level
section of schema 1.x present (the 1.x schemas are not kept: only their top-level sections are checked here; the
upgraded card is then validated against schema 2.0 in full). The upgrade adds ``protocol`` (the battery's hash and
frozen name) and ``entry`` (:func:`defend.evaluate.entry.entry_from_card`, ``defence`` and ``inputs_sha256`` null:
a 1.x card recorded neither), and sets ``schema_version`` 2.0.0; every other section is kept as it was. Every card is
checked before any is written (an error is one line, exit status 2, nothing written); each write is atomic. One line
per card says where it went and which entry fields it could not fill (null).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "upgrade_card", "OLD_SECTIONS", "USAGE"]

USAGE = "usage: defend card upgrade CARD [CARD ...] --out DIR [--overwrite]"

#: the top-level sections every 1.x card holds
OLD_SECTIONS = ("schema", "schema_version", "mode", "system", "data", "battery", "results", "validity", "files",
                "inputs", "provenance")


def _read(spec: str) -> tuple[Path, dict[str, Any]]:
    """The card file ``spec`` names (a file or its folder) and its content, checked to be a 1.x card."""
    from .card import CardError

    path = Path(spec)
    path = path / "card.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no card.json there (give a 1.x card.json or the folder holding it)")
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CardError(f"cannot read {path}: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(card, dict) or card.get("schema") != "idls-defend-card":
        raise CardError(f"{path} is not a defend model card (no schema 'idls-defend-card')")
    version = str(card.get("schema_version"))
    if not version.startswith("1."):
        raise CardError(f"{path} has schema_version {version}: only 1.x cards are upgraded (a 2.x card needs none)")
    missing = [k for k in OLD_SECTIONS if k not in card]
    if missing:
        raise CardError(f"{path} is not a complete 1.x card: missing {', '.join(missing)}")
    return path, card


def upgrade_card(card: dict[str, Any], name: str) -> dict[str, Any]:
    """The schema 2.0 card of the 1.x ``card`` (validated), its entry named ``name``."""
    from .card import CARD_SCHEMA_VERSION, CardError, validate_card
    from .entry import entry_from_card
    from .protocol import protocol_record

    out: dict[str, Any] = {}
    for key, value in card.items():
        out[key] = CARD_SCHEMA_VERSION if key == "schema_version" else value
        if key == "battery":
            out["protocol"] = protocol_record(value)
    try:
        out["entry"] = entry_from_card(out, name=name, defence=None, inputs_sha256=None)
        validate_card(out)
    except (KeyError, TypeError, ValueError) as exc:  # a 1.x card too old or edited to fill schema 2.0
        raise CardError(f"{name}: cannot be upgraded: {exc}") from None
    return out


def unfilled(entry: dict[str, Any]) -> list[str]:
    """The entry's fields left null (figures by name, not their interval keys), and ``defence.name`` when no
    defence is named (a 1.x card does not say which registered defence it measured)."""
    out = [k for k, v in entry.items() if v is None and not k.endswith(("_ci_low", "_ci_high"))]
    return out + (["defence.name"] if entry["defence"]["name"] is None else [])


def _args(argv: list[str]) -> tuple[list[str], Path, bool]:
    """``(cards, out, overwrite)`` from the command line (argparse; its errors are one line)."""
    import argparse

    p = argparse.ArgumentParser(prog="defend card upgrade", exit_on_error=False, add_help=False)
    p.add_argument("cards", nargs="*")
    p.add_argument("--out")
    p.add_argument("--overwrite", action="store_true")
    try:
        args, extra = p.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise ValueError(f"{exc}; {USAGE}") from None
    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}; {USAGE}")
    if not args.cards or not args.out:
        raise ValueError(f"give at least one CARD and --out DIR; {USAGE}")
    return args.cards, Path(args.out), bool(args.overwrite)


def _plan(cards: list[str], out: Path) -> list[tuple[Path, Path, dict[str, Any]]]:
    """Every card read and upgraded, and where it goes, before anything is written."""
    plan, targets = [], set()
    for spec in cards:
        path, card = _read(spec)
        name = path.resolve().parent.name
        target = out / name / "card.json"
        if target in targets:
            raise ValueError(f"two cards would both be written to {target} (their folders are both named '{name}')")
        targets.add(target)
        plan.append((path, target, upgrade_card(card, name)))
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """``defend card upgrade`` (module docstring); 0 on success, 2 on a user error (one line)."""
    from ..errors import USER_ERRORS, debug_enabled, one_line
    from ..io import OutputGuard, guarded_outputs, write_json

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__.split("\n\n", 1)[1].strip())
        return 0
    try:
        cards, out, overwrite = _args(argv)
        plan = _plan(cards, out)
        guard = OutputGuard(out, overwrite=overwrite)
        guard.refuse([target for _, target, _ in plan])
        with guarded_outputs(guard):
            for path, target, card in plan:
                write_json(target, card)
                missing = unfilled(card["entry"])
                print(f"{path} -> {target}: not filled: {', '.join(missing) if missing else 'none'}")
    except USER_ERRORS as exc:
        if debug_enabled():
            raise
        print(f"defend card upgrade: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
