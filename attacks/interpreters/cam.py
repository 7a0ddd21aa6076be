"""CAM: class activation mapping ``m_c[i, j] = sum_k w_kc a_k[i, j]`` (ADV2 Eqn 7).

Requires a GAP -> linear classifier exposing ``forward_features(x)`` (the last conv activations)
and ``head`` (the linear layer). The weights of the whole batch are gathered at once.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Interpreter, to_input_size

__all__ = ["CAMInterpreter", "raw_cam", "cam_and_logits"]


def raw_cam(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Un-normalised CAM ``[N, 1, h, w]`` at the feature resolution; its spatial mean is ``logit - bias``."""
    return cam_and_logits(model, x, target)[0]


def cam_and_logits(model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Raw CAM ``[N, 1, h, w]`` of classes ``target`` and the logits ``[N, K]`` from one pass of the features."""
    if not (hasattr(model, "forward_features") and isinstance(getattr(model, "head", None), nn.Linear)):
        raise ValueError(
            f"CAM needs a GAP -> linear classifier exposing forward_features() and a linear `head`; "
            f"{type(model).__name__} does not (interpreter 'cam' is unsupported by this model)"
        )
    feats = model.forward_features(x)
    w = model.head.weight[target]  # [N, K]
    return torch.einsum("nk,nkhw->nhw", w, feats).unsqueeze(1), model.head(model.pool(feats))


class CAMInterpreter(Interpreter):
    """Class activation map, bilinearly resampled to the input grid and min-max normalised."""

    name = "cam"

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            return raw_cam(model, x, target)

    def attack_map_and_logits(self, model: nn.Module, x: Tensor, target: Tensor, *,
                              native: bool = False) -> tuple[Tensor, Tensor]:
        raw, logits = cam_and_logits(model, x, target)
        return self.normalise(raw if native else to_input_size(raw, tuple(x.shape[-2:]))), logits
