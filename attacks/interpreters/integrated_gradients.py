"""Integrated Gradients (Sundararajan et al., ICML 2017): ``(x - x') * integral_0^1 grad f_c(x' + a (x - x')) da``.

The integral is the midpoint Riemann sum over ``steps`` points, all evaluated in one batch; the map is the absolute
attribution summed over colour channels (captum's ``visualize_image_attr(sign="absolute_value")`` convention).
Attacked through the smooth ReLU-derivative surrogate (a ReLU network's gradients are piecewise constant), with
ADV2's default term.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from .base import INTERPRETERS, Interpreter
from .surrogate import relu_surrogate

__all__ = ["IntegratedGradients"]


@INTERPRETERS.register("ig")
class IntegratedGradients(Interpreter):
    """Integrated Gradients from a constant baseline.

    Args:
        steps: points of the midpoint Riemann sum (captum's default: 50).
        baseline: the value of the reference image ``x'`` (0 = black).
        score: ``"prob"`` (as this project's GRAD) or ``"logit"`` (captum on a logit model).
        surrogate_tau: tau of the smooth ReLU derivative an attack differentiates the map under (:meth:`attack_modifier`).

    Completeness: ``sum_pixels (x - x') * mean_k grad f_c(...)`` tends to ``f_c(x) - f_c(x')`` as ``steps`` grows.
    """

    name = "ig"
    second_order = True

    def __init__(self, steps: int = 16, baseline: float = 0.0, score: str = "prob", surrogate_tau: float = 1e-4) -> None:
        if steps < 1 or not 0 <= baseline <= 1 or score not in ("prob", "logit"):
            raise ValueError(f"IG needs steps >= 1, baseline in [0, 1], score 'prob' or 'logit'; got {steps}, "
                             f"{baseline}, {score!r}")
        self.steps, self.baseline, self.score, self.surrogate_tau = int(steps), float(baseline), score, surrogate_tau

    def attributions(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        """Per-channel attributions ``[N, C, H, W]`` (their sum approximates ``f_c(x) - f_c(x')``)."""
        n = x.shape[0]
        alphas = (torch.arange(self.steps, device=x.device, dtype=x.dtype) + 0.5) / self.steps
        base = torch.full_like(x, self.baseline)
        path = (base.unsqueeze(0) + alphas.view(-1, 1, 1, 1, 1) * (x - base).unsqueeze(0)).flatten(0, 1)
        with torch.enable_grad():
            if not path.requires_grad:
                path.requires_grad_(True)
            logits = model(path)
            scores = logits.softmax(1) if self.score == "prob" else logits
            picked = scores.gather(1, target.repeat(self.steps).view(-1, 1)).sum()
            (g,) = torch.autograd.grad(picked, path, create_graph=create_graph)
        return (x - base) * g.view(self.steps, n, *x.shape[1:]).mean(0)

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        return self.attributions(model, x, target, create_graph=create_graph).sum(1, keepdim=True).abs()

    def attack_modifier(self) -> AbstractContextManager:
        """Exact map and first derivative, the surrogate's curvature as second derivative (as GRAD's)."""
        return relu_surrogate(self.surrogate_tau, exact_first_order=True)

    def __repr__(self) -> str:
        return f"IntegratedGradients(steps={self.steps}, baseline={self.baseline}, score={self.score!r})"
