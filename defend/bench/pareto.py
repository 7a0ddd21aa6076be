"""The Pareto front of points that maximise both coordinates."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pareto_front", "dominates"]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in both coordinates and better in one (maximising both)."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """The indices (ascending) of the non-dominated points of ``[(x, y), ...]``, maximising both coordinates; a
    point equal to another is on the front when that other one is (equal points do not dominate each other)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
