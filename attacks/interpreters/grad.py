"""GRAD: vanilla gradient saliency ``m = |d f_c(x) / dx|`` (ADV2 Eqn 5), max over colour channels."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Interpreter
from .surrogate import relu_surrogate

__all__ = ["GradInterpreter"]


class GradInterpreter(Interpreter):
    """Gradient saliency of the class score.

    Args:
        score: ``"prob"`` differentiates the softmax probability ``f_c`` as in the paper,
            ``"logit"`` the pre-softmax score (captum's Saliency).
        surrogate_tau: when set, the map is computed with the smooth ReLU-derivative surrogate
            (ADV2 section 3.2) so that it has a non-zero gradient w.r.t. the input. Attacks use
            a surrogate instance only inside their interpretation loss; measurements use ``None``.
    """

    name = "grad"

    def __init__(self, score: str = "prob", surrogate_tau: float | None = None) -> None:
        if score not in ("prob", "logit"):
            raise ValueError(f"GRAD score must be 'prob' or 'logit', got {score!r}")
        self.score = score
        self.surrogate_tau = surrogate_tau

    def with_surrogate(self, tau: float = 1e-4) -> "GradInterpreter":
        return GradInterpreter(self.score, tau)

    def attack_map(self, model: nn.Module, x: Tensor, target: Tensor, *, native: bool = False) -> Tensor:
        """The map through the smooth ReLU-derivative surrogate (section 3.2): a ReLU net's exact GRAD map has a
        zero input gradient, so an attack on the exact map would not move."""
        g = self if self.surrogate_tau is not None else self.with_surrogate()
        return g.normalise(g.explain(model, x, target, create_graph=True))

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        inp = x if x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            if self.surrogate_tau is not None:
                with relu_surrogate(self.surrogate_tau):
                    g = self._input_grad(model, inp, target, create_graph)
            else:
                g = self._input_grad(model, inp, target, create_graph)
        return g.abs().amax(1, keepdim=True)

    def _input_grad(self, model: nn.Module, x: Tensor, target: Tensor, create_graph: bool) -> Tensor:
        logits = model(x)
        scores = logits.softmax(1) if self.score == "prob" else logits
        picked = scores.gather(1, target.view(-1, 1)).sum()
        (g,) = torch.autograd.grad(picked, x, create_graph=create_graph)
        return g

    def __repr__(self) -> str:
        return f"GradInterpreter(score={self.score!r}, surrogate_tau={self.surrogate_tau})"
