"""``defend evaluate``: measure a defended system (classifier, optionally an RTS interpreter and a detector) with a
battery of attacks and write a model card (``card.json``, schema in ``docs/card.md`` / ``defend/card_schema.json``).

    import defend
    card = defend.evaluate_system("checkpoints/digits_small_cnn.pt", "runs/card", battery="quick")
    defend.validate_card(card)
"""
from __future__ import annotations

import importlib
from typing import Any

#: where each public name lives; imported on first use (PEP 562), so ``defend evaluate --help`` loads no torch
_WHERE = {
    **dict.fromkeys(["BATTERIES", "Battery", "load_battery", "parse_battery"], ".battery"),
    **dict.fromkeys(["CARD_SCHEMA_VERSION", "CardError", "card_errors", "card_schema", "load_card", "validate_card"],
                    ".card"),
    **dict.fromkeys(["entry_from_card", "inputs_sha256"], ".entry"),
    **dict.fromkeys(["protocol_hash", "protocol_record", "FROZEN_PROTOCOLS"], ".protocol"),
    "main": ".cli",
    "evaluate_system": ".run",
}

__all__ = ["evaluate_system", "validate_card", "card_errors", "card_schema", "load_card", "CardError",
           "CARD_SCHEMA_VERSION", "Battery", "BATTERIES", "load_battery", "parse_battery", "main", "entry_from_card",
           "inputs_sha256", "protocol_hash", "protocol_record", "FROZEN_PROTOCOLS"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'defend.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
