"""GRAD of the softplus-smoothed network (Dombrowski et al., NeurIPS 2019, "Explanations can be manipulated and
geometry is to blame"): the gradient map computed with every ReLU replaced by ``softplus(beta z) / beta``.

A training-free defence baseline: the classifier still predicts with its ReLUs, only the explanation reads the smooth
network, whose curvature bounds how fast the map can change. Its map is smooth, so ADV2 attacks it through the
default map term with no surrogate (the attack sees exactly the map that is measured).
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import INTERPRETERS, Interpreter
from .grad import GradInterpreter
from .surrogate import relu_as_softplus

__all__ = ["SoftplusGrad"]


@INTERPRETERS.register("grad_softplus")
class SoftplusGrad(Interpreter):
    """``|d f_c / dx|`` (max over channels) of the network with ReLU -> ``softplus(beta z) / beta``.

    Args:
        beta: the smoothing (Dombrowski et al. use beta ~ 0.8-30 on VGG-16; smaller is smoother; ``inf`` is GRAD).
        score: ``"prob"`` (as this project's GRAD) or ``"logit"``.
    """

    name = "grad_softplus"
    second_order = True
    attack_defaults = dict(GradInterpreter.attack_defaults)

    def __init__(self, beta: float = 2.0, score: str = "prob") -> None:
        if not beta > 0:
            raise ValueError(f"softplus beta must be > 0, got {beta}")
        self.beta, self.grad = float(beta), GradInterpreter(score)

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        with relu_as_softplus(self.beta):
            return self.grad.explain(model, x, target, create_graph=create_graph)

    def __repr__(self) -> str:
        return f"SoftplusGrad(beta={self.beta}, score={self.grad.score!r})"
