"""Input validation shared by interpreters and attacks: clear errors, never silent wrong answers."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_images", "check_labels", "check_positive"]


def check_images(x: Tensor, name: str = "images") -> None:
    """Raise ``ValueError`` unless ``x`` is a finite float batch ``[N, C, H, W]`` with values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    with torch.no_grad():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contain NaN or Inf values")
        lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{name} must lie in [0, 1] (normalisation lives inside the model), got range [{lo:.4g}, {hi:.4g}]"
        )


def check_labels(y: Tensor, num_classes: int, n: int | None = None, name: str = "labels") -> None:
    """Raise ``ValueError`` unless ``y`` is an integer vector of class indices in ``[0, num_classes)``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of class indices, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries but the batch has {n} images")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}] for a {num_classes}-class model, got [{lo}, {hi}]")


def check_positive(value: float, name: str, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` for a negative (or zero, unless allowed) hyper-parameter."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
