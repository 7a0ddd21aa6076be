"""The model card: ``card.json``, its JSON Schema (``defend/card_schema.json``, package data) and a checker of the
schema subset that file uses (no dependency): ``type``, ``properties``, ``required``, ``additionalProperties``,
``items``, ``enum``, ``const``, ``minimum``, ``maximum``, ``minItems``, ``minLength`` and local ``$ref``."""
from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["CARD_SCHEMA_VERSION", "CardError", "card_schema", "card_errors", "validate_card", "load_card", "plain_json"]

CARD_SCHEMA_VERSION = "1.2.0"


class CardError(ValueError):
    """A card does not follow the schema (the first problems, one line)."""


@lru_cache(maxsize=1)
def card_schema() -> dict[str, Any]:
    """The JSON Schema of ``card.json`` (``defend/card_schema.json``)."""
    return json.loads(resources.files("defend").joinpath("card_schema.json").read_text())


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[kind])


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref are supported, got {ref!r}")
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str, out: list[str]) -> None:
    schema = _resolve(schema, root)
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            out.append(f"{where}: {json.dumps(value)[:60]} is not of type {' or '.join(types)}")
            return
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: {json.dumps(value)[:60]} is not {json.dumps(schema['const'])}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {json.dumps(value)[:60]} is not one of {schema['enum']}")
    if _is(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        out.append(f"{where}: {value!r} is shorter than {schema['minLength']} characters")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{where}: has {len(value)} items, fewer than {schema['minItems']}")
        if "items" in schema:
            for i, v in enumerate(value):
                _check(v, schema["items"], root, f"{where}[{i}]", out)
    if isinstance(value, dict):
        _check_object(value, schema, root, where, out)


def _check_object(value: dict[str, Any], schema: dict[str, Any], root: dict[str, Any], where: str,
                  out: list[str]) -> None:
    props = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in value:
            out.append(f"{where}: missing required field '{key}'")
    extra = schema.get("additionalProperties", True)
    for key, v in value.items():
        sub = f"{where}.{key}" if where else key
        if key in props:
            _check(v, props[key], root, sub, out)
        elif extra is False:
            out.append(f"{where or 'card'}: unknown field '{key}'")
        elif isinstance(extra, dict):
            _check(v, extra, root, sub, out)


def card_errors(card: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every way ``card`` departs from the schema (empty: valid)."""
    root = schema or card_schema()
    out: list[str] = []
    _check(card, root, root, "", out)
    return out


def validate_card(card: Any) -> None:
    """Raise :class:`CardError` (one line, the first three problems) when ``card`` does not follow the schema."""
    errors = card_errors(card)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise CardError(f"the card does not follow schema {CARD_SCHEMA_VERSION}: {'; '.join(errors[:3])}{more}")


def load_card(path: str | Path) -> dict[str, Any]:
    """Read ``card.json`` (a file or the directory holding it) and validate it."""
    p = Path(path)
    p = p / "card.json" if p.is_dir() else p
    try:
        card = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise CardError(f"cannot read {p}: {' '.join(str(exc).split())[:160]}") from None
    validate_card(card)
    return card


def plain_json(obj: Any) -> Any:
    """``obj`` as strict JSON data: tuples -> lists, float subclasses -> float, NaN / Inf -> ``None``."""
    if isinstance(obj, dict):
        return {str(k): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_json(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return plain_json(obj.item())
    return str(obj)
