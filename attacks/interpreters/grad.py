"""GRAD: vanilla gradient saliency ``m = |d f_c(x) / dx|`` (ADV2 Eqn 5), max over colour channels, and its ADV2 term."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from ..constant_weights import constant_weights
from ..terms import InterpretationTerm, map_mse
from .base import INTERPRETERS, Interpreter, record_forward
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
            the surrogate only inside their interpretation loss (:meth:`attack_modifier`, :class:`GradTerm`);
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

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        """Raw map ``|grad_x score_c|`` (max over channels); records the logits of its forward pass of ``x``."""
        with relu_surrogate(self.surrogate_tau) if self.surrogate_tau is not None else nullcontext():
            inp = x if x.requires_grad else x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inp)
                record_forward(x, logits=logits)
                scores = logits.softmax(1) if self.score == "prob" else logits
                (g,) = torch.autograd.grad(scores.gather(1, target.view(-1, 1)).sum(), inp, create_graph=create_graph)
        return g.abs().amax(1, keepdim=True)

    def attack_modifier(self) -> AbstractContextManager:
        """The smooth ReLU-derivative surrogate (section 3.2; tau ``surrogate_tau`` or 1e-4) with exact first order:
        the attack differentiates the measured map, through the surrogate's curvature ``h'`` (a ReLU net's exact GRAD
        map has a zero input gradient, so an attack on it would not move)."""
        return relu_surrogate(self.surrogate_tau if self.surrogate_tau is not None else 1e-4, exact_first_order=True)

    def attack_term(self, tau: float = 1e-4) -> GradTerm:
        return GradTerm(self, tau)

    def __repr__(self) -> str:
        return f"GradInterpreter(score={self.score!r}, surrogate_tau={self.surrogate_tau})"


class GradTerm(InterpretationTerm):
    """GRAD term (ADV2 section 3.2) with one forward pass, on the interpreter's :meth:`~Interpreter.explain` (a
    subclass's own map; the logits come from its forward pass when it goes through GRAD's, else the engine runs one).

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
            state["map"], recorded = self.interpreter.recorded_map(model, x, y_t)
        return map_mse(state["map"], m_t), recorded.get("logits")
