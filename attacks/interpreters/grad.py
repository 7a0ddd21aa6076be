"""GRAD: vanilla gradient saliency ``m = |d f_c(x) / dx|`` (ADV2 Eqn 5), max over colour channels, and its ADV2 term."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..constant_weights import constant_weights
from ..terms import InterpretationTerm, map_mse
from .base import INTERPRETERS, Interpreter
from .surrogate import relu_surrogate

__all__ = ["GradInterpreter", "GradTerm"]


@INTERPRETERS.register("grad")
class GradInterpreter(Interpreter):
    """Gradient saliency of the class score.

    Args:
        score: ``"prob"`` differentiates the softmax probability ``f_c`` as in the paper,
            ``"logit"`` the pre-softmax score (captum's Saliency).
        surrogate_tau: when set, the map is computed with the smooth ReLU-derivative surrogate
            (ADV2 section 3.2) so that it has a non-zero gradient w.r.t. the input. Attacks use
            the surrogate only inside their interpretation loss (:meth:`attack_map`, :class:`GradTerm`);
            measurements use ``None``.

    Example::

        maps = GradInterpreter()(model, x, labels)   # [N, 1, H, W] in [0, 1]
    """

    name = "grad"
    second_order = True
    attack_defaults = {"c": 30.0, "steps": 60}

    def __init__(self, score: str = "prob", surrogate_tau: float | None = None) -> None:
        if score not in ("prob", "logit"):
            raise ValueError(f"GRAD score must be 'prob' or 'logit', got {score!r}")
        self.score = score
        self.surrogate_tau = surrogate_tau

    def with_surrogate(self, tau: float = 1e-4) -> GradInterpreter:
        return GradInterpreter(self.score, tau)

    def explain_with_logits(self, model: nn.Module, x: Tensor, target: Tensor, *,
                            create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Raw map ``|grad_x score_c|`` (max over channels) and the logits of the same forward pass."""
        inp = x if x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(inp)
            scores = logits.softmax(1) if self.score == "prob" else logits
            (g,) = torch.autograd.grad(scores.gather(1, target.view(-1, 1)).sum(), inp, create_graph=create_graph)
        return g.abs().amax(1, keepdim=True), logits

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        if self.surrogate_tau is None:
            return self.explain_with_logits(model, x, target, create_graph=create_graph)[0]
        with relu_surrogate(self.surrogate_tau):
            return self.explain_with_logits(model, x, target, create_graph=create_graph)[0]

    def attack_explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """The map through the smooth ReLU-derivative surrogate (section 3.2): a ReLU net's exact GRAD map has a
        zero input gradient, so an attack on the exact map would not move."""
        g = self if self.surrogate_tau is not None else self.with_surrogate()
        return g.explain(model, x, target, create_graph=True)

    def attack_term(self, tau: float = 1e-4) -> GradTerm:
        return GradTerm(self, tau)

    def __repr__(self) -> str:
        return f"GradInterpreter(score={self.score!r}, surrogate_tau={self.surrogate_tau})"


class GradTerm(InterpretationTerm):
    """GRAD term (ADV2 section 3.2) with one forward pass.

    Inside ``relu_surrogate(exact_first_order=True)`` the logits and the GRAD map are exact (so the prediction
    loss and the map match the true model) while the map's input gradient flows through the surrogate's
    curvature ``h'(z)``, the same second derivative as the paper's h. Label smoothing of the prediction loss
    (section 3.6) is on for GRAD.
    """

    wants_label_smoothing = True

    def __init__(self, interpreter: GradInterpreter, tau: float = 1e-4) -> None:
        super().__init__(interpreter)
        self.tau = tau

    def loss_and_logits(self, model, x, y_t, m_t, state):
        with relu_surrogate(self.tau, exact_first_order=True), constant_weights():
            raw, logits = self.interpreter.explain_with_logits(model, x, y_t, create_graph=True)
        state["map"] = self.interpreter.normalise(raw)
        return map_mse(state["map"], m_t), logits
