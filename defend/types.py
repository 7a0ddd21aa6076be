"""Value types of configs and option groups, registered with jsonargparse: a config gets a one-line error for a
NaN, an infinite, a negative or an out-of-range value before anything runs. Radii are in image units ([0, 1]) and may
be written as fractions (``8/255``, exact)."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from jsonargparse.typing import register_type

from .safe_yaml import loads

__all__ = ["Radius", "StepSize", "Positive", "NonNegative", "Fraction01", "Count", "PositiveCount"]


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool):
        raise ValueError(f"{what} must be a number, got {v!r}")
    try:
        v = float(Fraction(v.replace(" ", ""))) if isinstance(v, str) and "/" in v else float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"{what} must be a number, got {v!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v}")
    return v


class Radius(float):
    """An L-inf radius or step in image units, ``0 <= r <= 1``; ``"8/255"`` is accepted (and exact)."""

    def __new__(cls, v: Any) -> Radius:
        v = _number(v, "a radius")
        if not 0 <= v <= 1:
            raise ValueError(f"a radius must lie in [0, 1] (images are in [0, 1]; write 8/255 for 8 levels), got {v}")
        return super().__new__(cls, v)


class StepSize(Radius):
    """An attack's step size in image units, ``0 < a <= 1``; ``"2/255"`` is accepted (and exact)."""

    def __new__(cls, v: Any) -> StepSize:
        out = super().__new__(cls, v)
        if not out > 0:
            raise ValueError(f"a step size must be positive (write e.g. 1/255), got {float(out)}")
        return out


class Positive(float):
    """A finite number > 0 (learning rates, weights, step sizes)."""

    def __new__(cls, v: Any) -> Positive:
        v = _number(v, "this value")
        if not v > 0:
            raise ValueError(f"must be positive, got {v}")
        return super().__new__(cls, v)


class NonNegative(float):
    """A finite number >= 0."""

    def __new__(cls, v: Any) -> NonNegative:
        v = _number(v, "this value")
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return super().__new__(cls, v)


class Fraction01(float):
    """A share in [0, 1]."""

    def __new__(cls, v: Any) -> Fraction01:
        v = _number(v, "a share")
        if not 0 <= v <= 1:
            raise ValueError(f"must lie in [0, 1], got {v}")
        return super().__new__(cls, v)


class Count(int):
    """A whole number >= 0 (steps, epochs, images)."""

    def __new__(cls, v: Any) -> Count:
        if isinstance(v, bool) or not float(v).is_integer() or int(v) < 0:
            raise ValueError(f"must be a whole number >= 0, got {v!r}")
        return super().__new__(cls, int(v))


class PositiveCount(Count):
    """A whole number >= 1 (batch sizes, input counts)."""

    def __new__(cls, v: Any) -> PositiveCount:
        out = super().__new__(cls, v)
        if out < 1:
            raise ValueError(f"must be a whole number >= 1, got {v!r}")
        return out


def _from_yaml(t: type) -> Any:
    """``t`` of a value as jsonargparse hands it over: a command-line override's text is read as YAML first (by
    :func:`defend.safe_yaml.loads`, as a config file's value is: ``.nan`` is NaN, ``2.5`` a float; ``8/255`` stays
    text, a fraction)."""
    def build(v: Any) -> Any:
        if isinstance(v, str):

            try:
                v = loads(v, "value")
            except ValueError:
                pass  # not YAML: the type names the problem
        return t(v)
    return build


for _t in (Radius, StepSize, Positive, NonNegative, Fraction01):
    register_type(_t, serializer=float, deserializer=_from_yaml(_t))
for _t in (Count, PositiveCount):
    register_type(_t, serializer=int, deserializer=_from_yaml(_t))

