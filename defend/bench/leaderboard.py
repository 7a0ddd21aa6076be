"""The leaderboard's data: read and validate model cards, group them by protocol, declare the columns, rank entries.

A card is read as JSON only (never executed; over :data:`MAX_CARD_BYTES` it is refused unread) and ranked only when
it follows the current card schema, its ``protocol.sha256`` is the hash of its own ``battery`` recomputed (and its
``protocol.name`` the frozen protocol of that hash, if any), and its entry names the sha256 of the classifier's
weights and of the evaluation inputs. Every other card is kept as ``(path, one-line reason)``. Entries of different
protocols are never ranked together (:func:`group_by_protocol`).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..evaluate.card import CARD_SCHEMA_VERSION, card_errors
from ..evaluate.protocol import FROZEN_PROTOCOLS, defence_adapted_keys, protocol_hash, protocol_name

__all__ = ["MAX_CARD_BYTES", "DEFAULT_PROTOCOL", "DEFAULT_RANKING", "Column", "COLUMNS", "COLUMN_KEYS", "BenchCard",
           "Table", "read_card", "card_problem", "find_cards", "collect", "group_by_protocol", "main_protocol",
           "check_protocol_option", "protocol_title", "column", "table_columns", "cell_value", "cell_interval", "cell_n",
           "cell_at", "rank", "build_tables"]

#: a card larger than this is refused unread (a card is a few tens of kB)
MAX_CARD_BYTES = 5_000_000
#: the protocol of the main ranking when a card has it and ``--protocol`` is not given
DEFAULT_PROTOCOL = "bench-v1"
#: the default ranking: robust on both halves against an attacker who knows the defence, then AutoAttack accuracy
DEFAULT_RANKING = ("dual_robustness_adaptive", "autoattack_acc")


@dataclass(frozen=True)
class Column:
    """One leaderboard column: ``key`` (entry field, or ``attack/<attack>/<interpreter>/<figure>``), its header
    ``title``, its ``kind`` (``text``, ``figure``: a value with an interval, ``number``: a plain number) and which
    way is better (``higher``, ``lower``; ``None`` for text: sorted A to Z). ``at_key``: the entry field saying where
    the figure is read (the certified radius): in the header when every entry of a table has the same
    (``at_in_title``), else in each cell (:func:`table_columns`); the CSV has it as ``<key>_at``."""

    key: str
    title: str
    kind: str = "figure"
    better: str | None = "higher"
    n_key: str | None = None
    at_key: str | None = None
    at_in_title: bool = False

    @property
    def descending(self) -> bool:
        """The default sort direction: best first (text A to Z)."""
        return self.better == "higher"


_ATTACKS = "attacks"  # where the ADV2 / AdvEdge+ columns (one per attack and interpreter present) go

#: the declared columns (md, csv and html use this one list; the attack columns are expanded per table)
COLUMNS: tuple[Column, ...] = (
    Column("rank", "rank", "number", "lower"),
    Column("name", "name", "text", None),
    Column("defence", "defence", "text", None),
    Column("architecture", "architecture", "text", None),
    Column("training_data", "training data", "text", None),
    Column("clean_acc", "clean acc", n_key="clean_n"),
    Column("autoattack_acc", "AutoAttack acc", n_key="autoattack_n"),
    Column("topk_tau", "top-k Kendall tau", n_key="topk_n"),
    Column("dual_robustness", "dual robustness", n_key="dual_n"),
    Column("dual_robustness_adaptive", "dual robustness (adaptive)", n_key="dual_n"),
    Column("adaptive_gap", "adaptive gap", better="lower", n_key="dual_n"),
    Column("dual_certified_acc", "dual-certified acc", n_key="certified_n", at_key="certified_radius"),
    Column(_ATTACKS, "", "attacks", None),
    Column("number_forward_passes", "forward passes", "number", "lower"),
    Column("eval_seconds", "eval seconds", "number", "lower"),
    Column("device", "device", "text", None),
    Column("source", "source", "text", None),
)
#: the keys ``--sort`` accepts (the attack columns, known only once the cards are read, sort on the page)
COLUMN_KEYS: tuple[str, ...] = tuple(c.key for c in COLUMNS if c.key not in ("rank", _ATTACKS))
_ATTACK_FIGURES = (("success", "success", "lower"), ("iou", "IoU", "higher"))


@dataclass(frozen=True)
class BenchCard:
    """A valid card: where it was read, its protocol (hash, frozen name or None), its entry and its date."""

    path: str
    protocol: str
    protocol_name: str | None
    entry: dict[str, Any]
    date: str | None = None


@dataclass(frozen=True)
class Table:
    """One ranking: the protocol's hash and title, its columns and its entries in rank order."""

    protocol: str
    title: str
    columns: tuple[Column, ...]
    cards: tuple[BenchCard, ...]
    sort: tuple[str, ...]
    main: bool


# ------------------------------------------------------------------------------------------------ reading cards
def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``: a one-line ``ValueError`` when it is too large, not JSON or not an object."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_CARD_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_CARD_BYTES:
        raise ValueError(f"larger than {MAX_CARD_BYTES // 1_000_000} MB: not a card (a card is a few tens of kB)")

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        card = json.loads(data.decode("utf-8"), parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({' '.join(str(exc).split())[:80]}): a card is card.json as defend evaluate "
                         "writes it") from None
    if not isinstance(card, dict):
        raise ValueError(f"not a card: the JSON is a {type(card).__name__}, not an object")
    return card


def _hex(value: Any) -> bool:
    """Whether ``value`` is a sha256 as hex (64 lower-case hex digits)."""
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _schema_problem(card: dict[str, Any]) -> str | None:
    """The first way ``card`` departs from the current schema (a 1.x card: the upgrade to run), else None."""
    version = card.get("schema_version")
    if "entry" not in card and isinstance(version, str) and version.startswith("1."):
        return f"a schema {version} card (no entry): convert it with `defend card upgrade`"
    errors = card_errors(card)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"does not follow card schema {CARD_SCHEMA_VERSION}: {errors[0]}{more}"
    return None


def _adapted_keys_problem(card: dict[str, Any], keys: Any) -> str | None:
    """Whether the keys the card left out of its protocol hash are exactly those its named defence adapts."""
    entry = card.get("entry") if isinstance(card.get("entry"), dict) else {}
    defence = (entry.get("defence") or {}).get("name") if isinstance(entry.get("defence"), dict) else None
    try:
        expected = defence_adapted_keys(defence)
    except (KeyError, ValueError):
        return f"entry.defence.name {str(defence)[:40]!r} is not a registered defence"
    if keys != expected:
        return (f"protocol.adapted_keys {keys} are not those its defence {defence!r} adapts ({expected}): "
                "edited? (re-evaluate with defend evaluate)")
    return None


def _protocol_problem(card: dict[str, Any]) -> str | None:
    """Whether the card's protocol record is its battery's (the adapted keys its defence's, the hash recomputed
    without them; the name the frozen one of that hash)."""
    record = card.get("protocol")
    if not isinstance(record, dict) or not _hex(record.get("sha256")):
        return "no protocol sha256: re-evaluate with defend evaluate or convert it with defend card upgrade"
    keys = record.get("adapted_keys")
    problem = _adapted_keys_problem(card, keys)
    if problem:
        return problem
    try:
        actual = protocol_hash(card.get("battery") or {}, keys)
    except (ValueError, TypeError) as exc:
        return f"its battery has no protocol hash: {exc}"
    if actual != record["sha256"]:
        return "protocol hash does not match its battery: edited? (re-evaluate with defend evaluate)"
    claimed, frozen = record.get("name"), protocol_name(actual, keys)
    if claimed != frozen:
        return f"protocol name {str(claimed)[:40]!r} is not its battery's ({frozen or 'a custom protocol'}): edited?"
    return None


def _hash_problem(entry: Mapping[str, Any]) -> str | None:
    """The hashes a ranked entry needs: the classifier's weights and the evaluation inputs."""
    weights = entry.get("weights_sha256")
    if not isinstance(weights, dict) or not _hex(weights.get("classifier")):
        return "no weights sha256 (entry.weights_sha256.classifier): re-evaluate with defend evaluate"
    if not _hex(entry.get("inputs_sha256")):
        return ("no inputs sha256: re-evaluate with defend evaluate, or defend card upgrade cannot fill it")
    return None


def card_problem(card: dict[str, Any]) -> str | None:
    """Why ``card`` cannot be ranked (one line), or None: schema, then protocol hash, then the weights / data hashes."""
    problem = _schema_problem(card) or _protocol_problem(card)
    if problem:
        return problem
    entry = card.get("entry")
    if not isinstance(entry, dict):
        return "no entry: convert it with `defend card upgrade`"
    return _hash_problem(entry)


def find_cards(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each path a ``card.json`` (any name) or a folder searched recursively for ``card.json`` (sorted, no repeat);
    a path that does not exist is a one-line ``FileNotFoundError``."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"no such card or folder: {p} (give card.json files or folders holding them)")
        found = sorted(q for q in p.rglob("card.json") if q.is_file()) if p.is_dir() else [p]
        out += [q for q in found if q not in out]
    return out


def _date(card: dict[str, Any]) -> str | None:
    """The day the card's evaluation finished (``provenance.finished``), if it says."""
    provenance = card.get("provenance")
    finished = provenance.get("finished") if isinstance(provenance, dict) else None
    return finished[:10] if isinstance(finished, str) and len(finished) >= 10 else None


def _bench_card(path: Path, card: dict[str, Any]) -> BenchCard:
    """A valid card as ranked: under a frozen protocol (its pinned hash, whatever keys its defence adapted), else
    under its own hash."""
    record = card["protocol"]
    name = record["name"]
    sha = FROZEN_PROTOCOLS[name] if name in FROZEN_PROTOCOLS else record["sha256"]
    return BenchCard(str(path), sha, name, card["entry"], _date(card))


def collect(paths: Iterable[str | os.PathLike]) -> tuple[list[BenchCard], list[tuple[str, str]]]:
    """The valid cards found under ``paths`` and the others as ``(path, one-line reason)``; an entry with the name
    and weights of one already read under the same protocol is listed once (the other noted as a duplicate)."""
    cards: list[BenchCard] = []
    invalid: list[tuple[str, str]] = []
    seen: dict[tuple[str, str, str], str] = {}
    for path in find_cards(paths):
        try:
            card = read_card(path)
        except ValueError as exc:
            invalid.append((str(path), str(exc)))
            continue
        problem = card_problem(card)
        if problem:
            invalid.append((str(path), problem))
            continue
        bc = _bench_card(path, card)
        key = (bc.protocol, str(bc.entry.get("name")), bc.entry["weights_sha256"]["classifier"])
        if key in seen:
            invalid.append((str(path), f"duplicate of {seen[key]} (same name, weights and protocol): listed once"))
            continue
        seen[key] = str(path)
        cards.append(bc)
    return cards, invalid


# ------------------------------------------------------------------------------------------------ protocols
def group_by_protocol(cards: Iterable[BenchCard]) -> dict[str, list[BenchCard]]:
    """The cards by protocol hash (in the order first met)."""
    groups: dict[str, list[BenchCard]] = {}
    for c in cards:
        groups.setdefault(c.protocol, []).append(c)
    return groups


def check_protocol_option(protocol: str | None) -> None:
    """``--protocol``: a frozen protocol's name or a hex hash (or its first 12+ characters), checked before work."""
    if protocol is None or protocol in FROZEN_PROTOCOLS or re.fullmatch(r"[0-9a-f]{12,64}", protocol.lower()):
        return
    names = ", ".join(sorted(FROZEN_PROTOCOLS)) or "none yet"
    raise ValueError(f"--protocol {protocol!r} is neither a frozen protocol ({names}) nor a protocol sha256 "
                     "(64 hex digits, or its first 12 or more)")


def main_protocol(groups: Mapping[str, Sequence[BenchCard]], protocol: str | None = None) -> str | None:
    """The hash of the main ranking: ``protocol`` (a frozen name or a hash / its prefix), else bench-v1 where any card
    has it, else the protocol with the most cards (ties: the first met); None without cards."""
    if protocol is not None:
        wanted = FROZEN_PROTOCOLS.get(protocol, protocol.lower())
        hits = [h for h in groups if h.startswith(wanted)]
        if not hits:
            have = ", ".join(protocol_title(h) for h in groups) or "no valid card"
            raise ValueError(f"no valid card was evaluated under protocol {protocol!r}; the cards' protocols: {have}")
        return hits[0]
    default = FROZEN_PROTOCOLS.get(DEFAULT_PROTOCOL)
    if default in groups:
        return default
    return max(groups, key=lambda h: len(groups[h]), default=None)


def protocol_title(sha256: str) -> str:
    """A protocol's heading: its frozen name, or ``custom protocol <first 12 hex>``."""
    return protocol_name(sha256) or f"custom protocol {sha256[:12]}"


# ------------------------------------------------------------------------------------------------ cells
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _attack_row(entry: Mapping[str, Any], attack: str, interpreter: str) -> Mapping[str, Any]:
    for row in entry.get("attacks") or []:
        if isinstance(row, dict) and row.get("kind", "standard") == "standard" and \
                row.get("attack") == attack and row.get("interpreter") == interpreter:
            return row
    return {}


def _source(entry: Mapping[str, Any], col: Column) -> tuple[Mapping[str, Any], str]:
    """The mapping that holds ``col``'s figure and the figure's name there (an attack row for attack columns)."""
    if col.key.startswith("attack/"):
        _, attack, interpreter, figure = col.key.split("/", 3)
        return _attack_row(entry, attack, interpreter), figure
    return entry, col.key


def cell_value(entry: Mapping[str, Any], col: Column, rank: int | None = None) -> float | str | None:
    """The cell's value: a number, a text, or None (not measured)."""
    if col.key == "rank":
        return None if rank is None else float(rank)
    if col.key == "defence":
        defence = entry.get("defence")
        value = defence.get("name") if isinstance(defence, dict) else defence
        return value if isinstance(value, str) and value else None
    if col.kind == "text":
        value = entry.get(col.key)
        return value if isinstance(value, str) and value else None
    source, figure = _source(entry, col)
    return _number(source.get(figure))


def cell_interval(entry: Mapping[str, Any], col: Column) -> tuple[float | None, float | None]:
    """The cell's interval ``(low, high)`` (None where not measured or not a figure)."""
    if col.kind != "figure":
        return None, None
    source, figure = _source(entry, col)
    return _number(source.get(f"{figure}_ci_low")), _number(source.get(f"{figure}_ci_high"))


def cell_n(entry: Mapping[str, Any], col: Column) -> int | None:
    """The number of inputs behind the cell's figure (None when not stated)."""
    if col.kind != "figure":
        return None
    n = _source(entry, col)[0].get(col.n_key) if col.n_key else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def table_columns(entries: Iterable[Mapping[str, Any]]) -> tuple[Column, ...]:
    """:data:`COLUMNS` with the attack placeholder expanded: a success and an IoU column per (attack, interpreter) of
    the entries' standard attack rows, in the order first met; a column read at a place (``at_key``) says it in its
    title where every entry agrees."""
    entries = list(entries)
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        for row in entry.get("attacks") or []:
            if isinstance(row, dict) and row.get("kind", "standard") == "standard" and isinstance(
                    row.get("attack"), str) and isinstance(row.get("interpreter"), str):
                if "/" not in row["attack"] + row["interpreter"] and (row["attack"], row["interpreter"]) not in pairs:
                    pairs.append((row["attack"], row["interpreter"]))
    out: list[Column] = []
    for col in COLUMNS:
        if col.key != _ATTACKS:
            out.append(_at_header(col, entries) if col.at_key else col)
            continue
        out += [Column(f"attack/{a}/{i}/{fig}", f"{a} {i} {title}", better=better, n_key="n")
                for a, i in pairs for fig, title, better in _ATTACK_FIGURES]
    return tuple(out)


def _at_header(col: Column, entries: Iterable[Mapping[str, Any]]) -> Column:
    """``col`` with where its figures are read (``at_key``: an L2 radius) in its title when every entry that has the
    figure states the same (``at_in_title``), else as it is (each cell says it)."""
    where = {_number(e.get(col.at_key)) for e in entries if cell_value(e, col) is not None}
    if len(where) != 1 or None in where:
        return col
    return replace(col, title=f"{col.title} (L2 r {where.pop():g})", at_in_title=True)


def cell_at(entry: Mapping[str, Any], col: Column) -> float | None:
    """Where the cell's figure is read (its ``at_key`` value) when the header does not say it, else None."""
    return _number(entry.get(col.at_key)) if col.at_key and not col.at_in_title else None


def column(key: str, columns: Sequence[Column] = COLUMNS) -> Column:
    """The column ``key`` of ``columns``; a one-line error naming the choices."""
    for col in columns:
        if col.key == key and key != _ATTACKS:
            return col
    choices = ", ".join(c.key for c in columns if c.key not in ("rank", _ATTACKS))
    raise ValueError(f"unknown column {key!r}; the columns: {choices}")


# ------------------------------------------------------------------------------------------------ ranking
def rank(entries: Sequence[Mapping[str, Any]], key: str | None = None, descending: bool | None = None,
         columns: Sequence[Column] | None = None) -> list[Mapping[str, Any]]:
    """``entries`` sorted by the column ``key`` (default :data:`DEFAULT_RANKING`: dual robustness under the adaptive
    attack, then AutoAttack accuracy), best first in the column's own direction unless ``descending`` says,
    not-measured last, ties by name (stable)."""
    cols = columns or table_columns(entries)
    keys = [key] if key else list(DEFAULT_RANKING)
    out = sorted(entries, key=lambda e: str(e.get("name", "")))
    for k in reversed(keys):
        col = column(k, cols)
        down = col.descending if descending is None else descending
        values = [(cell_value(e, col), e) for e in out]
        present = [(v, e) for v, e in values if v is not None]
        present.sort(key=lambda ve: ve[0].casefold() if isinstance(ve[0], str) else ve[0], reverse=down)
        out = [e for _, e in present] + [e for v, e in values if v is None]
    return out


def build_tables(cards: Sequence[BenchCard], protocol: str | None = None, sort: str | None = None) -> list[Table]:
    """One :class:`Table` per protocol, the main one first (:func:`main_protocol`), each ranked by ``sort`` (default
    :data:`DEFAULT_RANKING`)."""
    groups = group_by_protocol(cards)
    main = main_protocol(groups, protocol)
    order = ([main] if main else []) + [h for h in groups if h != main]
    tables = []
    for h in order:
        entries = [c.entry for c in groups[h]]
        cols = table_columns(entries)
        ranked = rank(entries, sort, columns=cols)
        by_id = {id(c.entry): c for c in groups[h]}
        tables.append(Table(h, protocol_title(h), cols, tuple(by_id[id(e)] for e in ranked),
                            (sort,) if sort else DEFAULT_RANKING, h == main))
    return tables
