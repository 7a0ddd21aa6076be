"""Selection reads the development split only: the one place that chooses among candidates (the detector's
interpreters, a sweep's configuration, an epoch) and refuses to do it on the test split, which is sealed for final
figures (``defend.data.base.require_development``)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .data.base import SealedSplitError, require_development

__all__ = ["select_best", "require_development", "SealedSplitError"]

T = TypeVar("T")


def select_best(candidates: Sequence[T], score: Callable[[T], Any], split: str, what: str,
                higher_is_better: bool = True) -> T:
    """The candidate with the best ``score`` (the first on ties), where every score was measured on ``split``;
    refuses (:class:`SealedSplitError`) unless ``split`` is the development split, and refuses a candidate without
    a finite score. ``what`` names the choice in the error."""
    require_development(split, what)
    if not candidates:
        raise ValueError(f"{what}: no candidate to choose from")
    scored = []
    for c in candidates:
        value = score(c)
        if value is None or not float(value) == float(value):
            raise ValueError(f"{what}: a candidate has no score on the development split ({c!r:.80})")
        scored.append(float(value))
    best = max(scored) if higher_is_better else min(scored)
    return candidates[scored.index(best)]
