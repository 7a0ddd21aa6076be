"""Sobel edge weights of AdvEdge / AdvEdge+ (AdvEdge paper section IV), computed on the input's device."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sobel_edges", "edge_weights"]

_FLAT = 1e-5
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_edges(x: Tensor) -> Tensor:
    """Sobel gradient magnitude of the luminance, per-image normalised to [0, 1]: ``E(x)`` ``[N, 1, H, W]``."""
    gray = x.mean(1, keepdim=True) if x.shape[1] != 3 else (
        0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    kx = _SOBEL_X.to(x.device, x.dtype).view(1, 1, 3, 3)
    ky = kx.transpose(-1, -2)
    pad = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    sq = F.conv2d(pad, kx) ** 2 + F.conv2d(pad, ky) ** 2
    mag = torch.sqrt(sq + 1e-12)
    # magnitudes below 1e-5 (the sqrt floor, conv round-off) are flat: zero them, or the per-image normalisation
    # would blow them up to 1 and a constant image would get full edge weight everywhere. (A one-grey-level step
    # of a uint8 image has a magnitude >= 4e-4.)
    mag = mag * (mag > _FLAT).to(mag.dtype)
    return mag / mag.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)


def edge_weights(x: Tensor, mode: str | None, threshold: float = 0.1) -> Tensor | None:
    """``None`` (ADV2), soft weights ``E(x)`` (``"soft"``, AdvEdge) or the binary ``E(x) > delta`` (``"binary"``, AdvEdge+)."""
    if mode is None:
        return None
    e = sobel_edges(x.detach())
    if mode == "soft":
        return e
    if mode == "binary":
        return (e > threshold).to(x.dtype)
    raise ValueError(f"unknown edge mode {mode!r}; choose None, 'soft' or 'binary'")
