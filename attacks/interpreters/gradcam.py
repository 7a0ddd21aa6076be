"""Grad-CAM (Selvaraju et al., ICCV 2017): ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of
``d score_c / d A_k`` on the last convolutional features ``A`` (``model.forward_features``).

On this project's GAP -> linear classifiers the weights are ``W[c, k] / (h w)``, so Grad-CAM is the ReLU of CAM up to
a constant (the tests check it); on other heads they differ. Differentiable; attacked with ADV2's default term.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import INTERPRETERS, Interpreter

__all__ = ["GradCAM"]


@INTERPRETERS.register("gradcam")
class GradCAM(Interpreter):
    """Grad-CAM of the logit of class ``c`` (``score="prob"``: of its probability), on the feature grid.

    Needs a classifier exposing ``forward_features(x)`` and ``head(pool(features))`` (the zoo's contract)."""

    name = "gradcam"
    second_order = True

    def __init__(self, score: str = "logit") -> None:
        if score not in ("prob", "logit"):
            raise ValueError(f"Grad-CAM score must be 'prob' or 'logit', got {score!r}")
        self.score = score

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        if not (hasattr(model, "forward_features") and hasattr(model, "head") and hasattr(model, "pool")):
            raise ValueError(f"Grad-CAM needs a classifier with forward_features(), pool and head; "
                             f"{type(model).__name__} has not (interpreter 'gradcam' is unsupported by this model)")
        with torch.enable_grad():
            feats = model.forward_features(x)
            if not feats.requires_grad:
                feats.requires_grad_(True)
            logits = model.head(model.pool(feats))
            scores = logits.softmax(1) if self.score == "prob" else logits
            (g,) = torch.autograd.grad(scores.gather(1, target.view(-1, 1)).sum(), feats, create_graph=create_graph)
            cam = (g.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True).clamp_min(0)
        return cam if create_graph else cam.detach()

    def __repr__(self) -> str:
        return f"GradCAM(score={self.score!r})"
