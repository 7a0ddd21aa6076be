"""The one min-max normaliser and the one map resize, shared by the interpreters, the attacks, the metrics and
interpretation-robust training (``defend`` imports them from here; ``attacks`` never imports ``defend``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["minmax", "resize_map"]


def minmax(m: Tensor, eps: float = 1e-12, start_dim: int = 1) -> Tensor:
    """Differentiable min-max normalisation to [0, 1] over the dims from ``start_dim`` on (1: per example; 2: per
    example and channel, e.g. the per-class maps ``[N, K, h, w]`` of robust training).

    Near-constant maps: a value range below ``eps`` is treated as ``eps`` (the divisor is ``max(range, eps)``), so a
    constant map becomes all zeros and a map whose range is ``r < eps`` becomes ``(m - min) / eps``, whose values
    stay in ``[0, r / eps]``: numerical noise is never stretched to [0, 1], the result is continuous in ``r`` and its
    gradient is finite everywhere.
    """
    flat = m.flatten(start_dim)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(m)


def resize_map(m: Tensor, size: int | Sequence[int]) -> Tensor:
    """Bilinear resampling (``align_corners=False``) of maps ``[N, C, h, w]`` to ``size`` (an int or ``(H, W)``);
    the identity (the same tensor) when already there. Maps in [0, 1] stay in [0, 1] (bilinear weights are convex),
    so nothing is clamped: raw, un-normalised maps are resized too."""
    if m.dim() != 4:
        raise ValueError(f"maps must be [N, C, H, W], got shape {tuple(m.shape)}; add the missing dims first")
    out = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(out) != 2:
        raise ValueError(f"size must be an int or a pair (H, W), got {tuple(size)}")
    if tuple(m.shape[-2:]) == out:
        return m
    return F.interpolate(m if m.is_floating_point() else m.float(), size=out, mode="bilinear", align_corners=False)
