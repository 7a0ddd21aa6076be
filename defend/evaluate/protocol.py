"""Evaluation protocols: a battery's canonical content hash, and the frozen protocols (IDLS-Bench) by name.

Two cards are comparable only when their batteries are the same in every key: the protocol hash is the sha256 of
the resolved battery (every default filled in, as ``card.json``'s ``battery`` holds it) written as canonical JSON
(keys sorted, numbers as floats, no whitespace), with its free-text ``name`` left out. Key order and YAML
formatting do not change it; any value does. A frozen protocol's hash is pinned here and checked against its
config file by the tests, so that an edit of the file or of a battery default is seen.

A registered defence may adapt a few battery keys to what the system is (``Defence.battery``: softplus smoothing
attacks ``grad_softplus`` where the protocol says GRAD; the detector's classifier is the plain one, so it skips
AutoAttack and the top-k attack; an RTS system skips the CAM+GRAD ensemble). Those keys, and only those of the
defence the card names, are its ``adapted_keys``: the hash is then taken with them left out (and empty sections
pruned), and the card is of a frozen protocol when the frozen battery with the same keys left out hashes the same.
So every defence of the scorecard is ranked under one protocol, and a card cannot leave out a key its defence does
not adapt.

The ``certify`` section (randomized-smoothing certificates, docs/certify.md) is left out of the hash too: a
certificate is a guarantee, not an attack's outcome, so a certified accuracy at L2 radius r means the same whatever
sigma, sample counts and alpha measured it (they change how much is certified, never what the figure claims; the card
rows record them). So a frozen protocol's card may carry certificates and still be of that protocol, and the pinned
hashes did not change when the section was added.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

__all__ = ["protocol_hash", "canonical_battery", "FROZEN_PROTOCOLS", "protocol_name", "protocol_record",
           "frozen_hash", "defence_adapted_keys"]

#: keys of a battery that do not define the protocol (free text; the certificates, module docstring)
_NOT_PROTOCOL = ("name", "certify")


def _canonical(value: Any) -> Any:
    """``value`` with every number as a float (``1`` and ``1.0`` are one value) and tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"a battery value is not finite ({value}): no protocol hash")
        return v
    raise TypeError(f"a battery value of type {type(value).__name__} has no canonical form: {value!r}")


def _pruned(value: Any) -> Any:
    """``value`` without empty mappings (a section a left-out key emptied, or one empty in the protocol itself)."""
    if not isinstance(value, Mapping):
        return value
    out = {k: _pruned(v) for k, v in value.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, Mapping) and not v)}


def _without(battery: Mapping[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    """``battery`` without the dotted keys ``ignore`` (deep copy; a key it lacks is no error) and, when any key is
    left out, without empty sections."""
    body = json.loads(json.dumps(_canonical(dict(battery))))
    keys = list(ignore)
    for dotted in keys:
        node: Any = body
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return _pruned(body) if keys else body


def canonical_battery(battery: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """The canonical JSON text of a resolved battery mapping (the text the protocol hash is taken of), the dotted
    keys ``ignore`` (a defence's adapted keys) left out."""
    body = {k: v for k, v in _without(battery, ignore).items() if k not in _NOT_PROTOCOL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def protocol_hash(battery: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """The protocol hash (sha256 hex) of a resolved battery mapping (``card["battery"]``), ``ignore`` left out."""
    return hashlib.sha256(canonical_battery(battery, ignore).encode("ascii")).hexdigest()


#: the frozen protocols: name -> the protocol hash of ``configs/evaluate/<name>.yaml`` resolved (pinned; a test
#: resolves each file and compares)
FROZEN_PROTOCOLS: dict[str, str] = {
    "bench-v1": "157e6c313b75e0a11e90ce64ee487ab388cd9b069a416b2718e45c08a9705b5c",
    "bench-v1-quick": "16327fd310bff8f12e60b98253f031e4c0b0e45ef70adcf7556ac5c0b9c8eed0",
}


@cache
def _frozen_battery(name: str) -> str:
    """The frozen protocol ``name``'s resolved battery (JSON text), read from ``configs/evaluate/<name>.yaml``."""
    import yaml

    from .battery import battery_mapping, parse_battery

    return json.dumps(yaml.safe_load(parse_battery(battery_mapping(name))[1]))


def frozen_hash(name: str, ignore: Iterable[str] = ()) -> str:
    """The protocol hash of the frozen protocol ``name`` with the dotted keys ``ignore`` left out (the pinned hash
    when none is; otherwise its config file, resolved, is needed: a source checkout)."""
    keys = tuple(ignore)
    return FROZEN_PROTOCOLS[name] if not keys else protocol_hash(json.loads(_frozen_battery(name)), keys)


def protocol_name(sha256: str, ignore: Iterable[str] = ()) -> str | None:
    """The frozen protocol with this hash (taken with the keys ``ignore`` left out), else ``None`` (a protocol of
    the user's own)."""
    keys = tuple(ignore)
    for name in FROZEN_PROTOCOLS:
        try:
            if frozen_hash(name, keys) == sha256:
                return name
        except FileNotFoundError:  # an installed package without configs/: only the pinned hashes are known
            continue
    return None


#: what a defence's battery hook is called with when only the keys it sets are asked for
_HOOK_OPTIONS = {"beta": 1.0, "detector_interpreters": ["grad", "cam"], "detector_product": False}


def defence_adapted_keys(defence: str | None) -> list[str]:
    """The dotted battery keys the registered ``defence`` adapts to its system (its ``Defence.battery`` hook, asked
    on the standard battery; sorted); ``[]`` for none (``None``)."""
    if defence is None:
        return []
    from ..defences import defence as registered
    from .battery import load_battery

    return sorted(registered(defence).battery(load_battery("standard")[0], _HOOK_OPTIONS))


def protocol_record(battery: Mapping[str, Any], defence: str | None = None) -> dict[str, Any]:
    """A card's ``protocol``: ``{"name": <frozen protocol or null>, "sha256": <protocol hash>, "adapted_keys":
    [...]}``, the keys the registered ``defence`` adapts left out of the hash."""
    keys = defence_adapted_keys(defence)
    h = protocol_hash(battery, keys)
    return {"name": protocol_name(h, keys), "sha256": h, "adapted_keys": keys}
