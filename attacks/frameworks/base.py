"""Threat models (attack frameworks): how a variable ``z`` becomes an image and how it is updated.

Every framework works on a whole batch with per-example state; ``active`` freezes finished examples
without a host sync. ``weight`` is the AdvEdge edge map (``None`` for ADV2).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..base_attack import unit_box
from ..registry import Registry

__all__ = ["ThreatModel", "FRAMEWORKS", "quantise", "quantise_linf", "grid_levels", "clip01"]

#: every attack framework (threat model), registered where it is defined
FRAMEWORKS: Registry = Registry("framework")

LEVELS = 255


def clip01(x: Tensor) -> Tensor:
    """Clip to [0, 1] with a straight-through (identity) gradient.

    ``Tensor.clamp`` back-propagates zero at exactly 0 and 1, so a pixel sitting on the boundary (every
    saturated pixel of a benign image, at zero perturbation) would get no gradient and never move again.
    """
    return x + (x.clamp(0, 1) - x).detach()


def quantise(x: Tensor) -> Tensor:
    """Round to the uint8 grid: what a saved adversarial image really is."""
    return torch.round(x * LEVELS) / LEVELS


def grid_levels(eps: float) -> int:
    """The largest whole number of uint8 levels inside an L-inf radius: ``floor(eps * 255)`` (robust to
    ``k / 255`` computing as ``k - tiny``)."""
    return int(eps * LEVELS + 1e-6)


def quantise_linf(x0: Tensor, x: Tensor, eps: float) -> Tensor:
    """The uint8-grid image nearest to ``x`` inside the L-inf ball of radius ``eps`` around ``x0``.

    The perturbation is rounded to the nearest whole level and clamped to ``grid_levels(eps)`` levels. Truncating
    toward zero instead would lose a level on almost every pixel: in float32 a sum of steps of ``1/255`` computes
    ``k/255`` as ``k - tiny`` levels. Where ``x0`` is on the grid the result is exactly ``round(x * 255) / 255``'s
    representation of its level; an off-grid ``x0`` keeps its offset (the result stays inside the ball and [0, 1]).
    """
    k = grid_levels(eps)
    steps = torch.round((x - x0) * LEVELS).clamp(-k, k)
    base = torch.round(x0 * LEVELS)
    on_grid = base / LEVELS == x0
    out = torch.where(on_grid, (base + steps) / LEVELS, x0 + steps / LEVELS)
    return out.clamp(0, 1)


class ThreatModel(ABC):
    """Parameterisation, constraint, penalty and update rule of one attack framework.

    Capabilities the engine reads (it never asks for the type): ``supports_step_search`` (``step`` takes a per-example
    ``alpha``: the MASK attack's step-size search) and :meth:`project` (identity unless the framework has a box to
    keep ``x0 + z`` in)."""

    name: str = "threat"
    supports_step_search: bool = False
    #: the options a named attack takes at its top level for this threat model, with the attack core's defaults
    #: there (``build_attack("adv2", "pgd", eps=...)``); every other option goes in ``framework_options``
    options: ClassVar[dict[str, Any]] = {}
    #: the constructor settings :attr:`budget` records
    settings: ClassVar[tuple[str, ...]] = ()

    @property
    def budget(self) -> dict[str, Any]:
        """``{"framework": name, setting: value, ...}``: the threat model as a card records it."""
        values = {k: getattr(self, k) for k in self.settings}
        return {"framework": self.name, **{k: float(v) if isinstance(v, float) else v for k, v in values.items()}}

    def within(self, x0: Tensor, x: Tensor) -> Tensor:
        """Per input, whether ``x`` satisfies the constraint (default: inside [0, 1]; no pixel ball)."""
        return unit_box(x)

    @abstractmethod
    def init(self, x0: Tensor, generator: torch.Generator | None, weight: Tensor | None = None) -> Tensor:
        """The initial optimisation variable for benign images ``x0`` (``weight``: the AdvEdge edge map)."""

    @abstractmethod
    def apply(self, x0: Tensor, z: Tensor, weight: Tensor | None) -> Tensor:
        """The (differentiable) adversarial image in [0, 1] for variable ``z``."""

    def penalty(self, x0: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """Per-example distortion penalty added to the loss (zero for norm-ball frameworks)."""
        return x.new_zeros(x.shape[0])

    @abstractmethod
    def step(self, z: Tensor, grad: Tensor, active: Tensor, weight: Tensor | None) -> Tensor:
        """One descent update of ``z`` (frozen where ``active`` is False)."""

    def project(self, x0: Tensor, z: Tensor) -> Tensor:
        """Bring ``z`` back into the feasible set after a step (default: nothing to do)."""
        return z

    def quantise(self, x0: Tensor, x: Tensor) -> Tensor:
        """The uint8-grid image closest to ``x`` that still satisfies the constraint."""
        return quantise(x)

    def start(self, x0: Tensor) -> None:
        """Reset per-run optimiser state (called once per attack stage)."""

    def check_grid_budget(self) -> None:
        """Raise ``ValueError`` when the constraint admits no uint8 image other than the input (default: it does)."""
