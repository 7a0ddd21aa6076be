"""``defend evaluate``: measure a defended system (classifier, optionally an RTS interpreter and a detector) with a
battery of attacks and write a model card (``card.json``, schema in ``docs/card.md`` / ``defend/card_schema.json``).

    import defend
    card = defend.evaluate_system("checkpoints/digits_small_cnn.pt", "runs/card", battery="quick")
    defend.validate_card(card)
"""
from __future__ import annotations

from .battery import BATTERIES, Battery, load_battery, parse_battery
from .card import CARD_SCHEMA_VERSION, CardError, card_errors, card_schema, load_card, validate_card
from .cli import main
from .run import evaluate_system

__all__ = ["evaluate_system", "validate_card", "card_errors", "card_schema", "load_card", "CardError",
           "CARD_SCHEMA_VERSION", "Battery", "BATTERIES", "load_battery", "parse_battery", "main"]
