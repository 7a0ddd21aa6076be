"""CAM: class activation mapping ``m_c[i, j] = sum_k w_kc a_k[i, j]`` (ADV2 Eqn 7).

Requires a GAP -> linear classifier exposing ``forward_features(x)`` (the last conv activations)
and ``head`` (the linear layer). The weights of the whole batch are gathered at once.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import INTERPRETERS, Interpreter, to_input_size

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

    Its ADV2 term is the default map MSE, sharing the classifier's forward pass (:meth:`attack_map_and_logits`).

    Example::

        maps = CAMInterpreter()(model, x, labels)              # [N, 1, H, W] in [0, 1]
        native = CAMInterpreter()(model, x, labels, raw=True)  # raw CAM on the feature grid
    """

    name = "cam"
    attack_defaults = {"c": 20.0, "steps": 80}

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            return raw_cam(model, x, target)

    def explain_classes(self, model: nn.Module, x: Tensor, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            return cam_and_logits(model, x)

    def attack_map_and_logits(self, model: nn.Module, x: Tensor, target: Tensor, *,
                              native: bool = False) -> tuple[Tensor, Tensor]:
        raw, logits = cam_and_logits(model, x, target)
        return self.normalise(raw if native else to_input_size(raw, tuple(x.shape[-2:]))), logits
