"""CAM: class activation mapping ``m_c[i, j] = sum_k w_kc a_k[i, j]`` (ADV2 Eqn 7).

Requires a GAP -> linear classifier exposing ``forward_features(x)`` (the last conv activations)
and ``head`` (the linear layer). The weights of the whole batch are gathered at once.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import INTERPRETERS, Interpreter, record_forward

__all__ = ["CAMInterpreter", "raw_cam", "cam_and_logits"]


def raw_cam(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Un-normalised CAM ``[N, 1, h, w]`` at the feature resolution; its spatial mean is ``logit - bias``."""
    return cam_and_logits(model, x, target)[0]


def cam_and_logits(model: nn.Module, x: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Raw CAM and the logits ``[N, K]`` from one pass of the features (ADV2 Eqn 7): ``[N, 1, h, w]`` for one class per
    example (``target [N]``), or ``[N, K, h, w]`` for every class (``target=None``: robust training's maps)."""
    if not (hasattr(model, "forward_features") and isinstance(getattr(model, "head", None), nn.Linear)):
        raise ValueError(
            f"CAM needs a GAP -> linear classifier exposing forward_features() and a linear `head`; "
            f"{type(model).__name__} does not (interpreter 'cam' is unsupported by this model)"
        )
    feats = model.forward_features(x)
    logits = model.head(model.pool(feats))
    if target is None:
        return torch.einsum("ck,nkhw->nchw", model.head.weight, feats), logits
    return torch.einsum("nk,nkhw->nhw", model.head.weight[target], feats).unsqueeze(1), logits


@INTERPRETERS.register("cam")
class CAMInterpreter(Interpreter):
    """Class activation map, bilinearly resampled to the input grid and min-max normalised.

    Its ADV2 term is the default map MSE, sharing the classifier's forward pass (:func:`record_forward`).

    Example::

        maps = CAMInterpreter()(model, x, labels)              # [N, 1, H, W] in [0, 1]
        native = CAMInterpreter()(model, x, labels, raw=True)  # raw CAM on the feature grid
    """

    name = "cam"
    attack_defaults = {"c": 20.0, "steps": 80}

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        """Raw CAM on the feature grid; records the logits of the same pass of the features."""
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            cam, logits = cam_and_logits(model, x, target)
        record_forward(x, logits=logits)
        return cam

    def explain_classes(self, model: nn.Module, x: Tensor, *,
                        create_graph: bool = False) -> tuple[Tensor, Tensor | None]:
        """Every class's CAM from one pass (``cam_and_logits``) while :meth:`explain` is CAM's own; a subclass that
        redefines the map gets the default (one :meth:`explain` per class), so it is trained on its own map."""
        if type(self).explain is not CAMInterpreter.explain:
            return super().explain_classes(model, x, create_graph=create_graph)
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            return cam_and_logits(model, x)
