"""Uniform noise of the attack's radius: the floor any interpretation attack must beat (registered as ``"noise"`` in
:data:`attacks.BALL_ATTACKS`)."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from .base_attack import BALL_ATTACKS, Attack, AttackResult, prob_of
from .checks import check_images
from .frameworks import PGD

__all__ = ["NoiseAttack"]


@BALL_ATTACKS.register("noise")
class NoiseAttack(Attack):
    """``x + u``, ``u ~ U[-eps, eps]`` per pixel, on the uint8 grid inside the ball; ``success``: the prediction is
    still ``y`` (the class kept). ``generator`` draws the noise (a fresh seeded one from ``seed`` when not given)."""

    def __init__(self, eps: float, interpreter: Any = None, generator: torch.Generator | None = None,
                 seed: int = 0) -> None:
        self.threat = PGD(eps, eps, random_start=True)
        self.threat.check_grid_budget()
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    @property
    def budget(self) -> dict[str, Any]:
        return {"framework": "noise", "eps": float(self.threat.eps)}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        check_images(x)
        start = time.perf_counter()
        u = (2 * torch.rand(x.shape, generator=self.generator) - 1).to(x) * self.threat.eps
        x_adv = self.threat.quantise(x.detach(), (x.detach() + u).clamp(0, 1))
        logits, p = prob_of(model, x_adv, y)
        return AttackResult(x_adv, y, logits.argmax(1) == y, p, None, time.perf_counter() - start, 0)
