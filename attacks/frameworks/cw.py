"""Carlini & Wagner L2 in tanh space, optimised with a batched Adam (AdvEdge paper Eqn 2 / Eqn 11)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_positive
from ..optim import BatchAdam
from .base import FRAMEWORKS, ThreatModel

__all__ = ["CW"]


@FRAMEWORKS.register("cw")
class CW(ThreatModel):
    """``x_w = (tanh(w) + 1) / 2``; the perturbation ``x_w - x0`` is scaled by the edge weight (AdvEdge).

    The loss adds ``l2_weight * ||x - x0||_2^2`` to the attack loss (a fixed trade-off constant, no
    outer binary search over it).
    """

    name = "cw"
    settings = ("lr", "l2_weight")

    def __init__(self, lr: float = 0.01, l2_weight: float = 0.05) -> None:
        check_positive(lr, "lr")
        check_positive(l2_weight, "l2_weight", allow_zero=True)
        self.lr, self.l2_weight = lr, l2_weight
        self._adam: BatchAdam | None = None

    def init(self, x0: Tensor, generator: torch.Generator | None, weight: Tensor | None = None) -> Tensor:
        return torch.atanh((2 * x0 - 1).clamp(-1 + 1e-6, 1 - 1e-6))

    def start(self, x0: Tensor) -> None:
        self._adam = None

    def apply(self, x0: Tensor, z: Tensor, weight: Tensor | None) -> Tensor:
        xw = (torch.tanh(z) + 1) / 2
        if weight is None:
            return xw
        return x0 + weight * (xw - x0)

    def penalty(self, x0: Tensor, x: Tensor, z: Tensor) -> Tensor:
        return self.l2_weight * (x - x0).flatten(1).pow(2).sum(1)

    def step(self, z: Tensor, grad: Tensor, active: Tensor, weight: Tensor | None) -> Tensor:
        if self._adam is None:
            self._adam = BatchAdam(z, lr=self.lr)
        return self._adam.step(z, grad, active)
