"""StAdv: spatially transformed adversarial inputs (Xiao et al.; ADV2 Appendix A1, Eqn 14).

A per-pixel flow ``r`` (in pixels) moves every output pixel's sampling location; the image is warped
with bilinear interpolation and the flow's smoothness ``l_flow`` is penalised. Adam lr 0.01 as in the
paper; AdvEdge scales the flow by the edge weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_positive
from ..optim import BatchAdam
from .base import FRAMEWORKS, ThreatModel, clip01

__all__ = ["StAdv", "flow_warp", "flow_loss"]


def flow_warp(x: Tensor, flow: Tensor) -> Tensor:
    """Bilinear warp: output pixel (u, v) samples ``x`` at ``(u + du, v + dv)``; flow ``[N, 2, H, W]`` in pixels."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    px = xs.unsqueeze(0) + flow[:, 0]
    py = ys.unsqueeze(0) + flow[:, 1]
    grid = torch.stack((2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def flow_loss(flow: Tensor) -> Tensor:
    """``l_flow = sum_i sum_{j in N(i)} sqrt(||du_i - du_j||^2 + ||dv_i - dv_j||^2)`` per example (Eqn 14)."""
    p = F.pad(flow, (1, 1, 1, 1), mode="replicate")
    total = flow.new_zeros(flow.shape[0])
    h, w = flow.shape[-2:]
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb = p[..., dy:dy + h, dx:dx + w]
        total = total + torch.sqrt(((flow - nb) ** 2).sum(1) + 1e-10).flatten(1).sum(1)
    return total


@FRAMEWORKS.register("stadv")
class StAdv(ThreatModel):
    """A flow ``z`` warps the benign image; its smoothness is penalised (weight ``tau``) and, with ``max_flow``, each
    component is clamped. No pixel ball: the constraint is [0, 1] (:meth:`ThreatModel.within`)."""

    name = "stadv"
    settings = ("lr", "tau", "max_flow")

    def __init__(self, lr: float = 0.01, tau: float = 5e-4, max_flow: float | None = None) -> None:
        check_positive(lr, "lr")
        check_positive(tau, "tau", allow_zero=True)
        self.lr, self.tau, self.max_flow = lr, tau, max_flow
        self._adam: BatchAdam | None = None

    def init(self, x0: Tensor, generator: torch.Generator | None, weight: Tensor | None = None) -> Tensor:
        n, _, h, w = x0.shape
        return torch.zeros(n, 2, h, w, device=x0.device, dtype=x0.dtype)

    def start(self, x0: Tensor) -> None:
        self._adam = None

    def apply(self, x0: Tensor, z: Tensor, weight: Tensor | None) -> Tensor:
        flow = z if weight is None else z * weight
        return clip01(flow_warp(x0, flow))

    def penalty(self, x0: Tensor, x: Tensor, z: Tensor) -> Tensor:
        return self.tau * flow_loss(z)

    def step(self, z: Tensor, grad: Tensor, active: Tensor, weight: Tensor | None) -> Tensor:
        if self._adam is None:
            self._adam = BatchAdam(z, lr=self.lr)
        z = self._adam.step(z, grad, active)
        return z if self.max_flow is None else z.clamp(-self.max_flow, self.max_flow)
