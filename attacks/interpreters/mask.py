"""MASK: meaningful perturbation (Fong & Vedaldi; ADV2 Eqn 9), solved as one batched optimisation.

A low-resolution mask ``m`` in [0, 1] (1 = keep, 0 = replace by a blurred copy) minimises, per example,

    l_map(m; x) = f_c(phi(x; m)) + l1 * mean(1 - m) + tv * TV(m),   phi(x; m) = x * M + blur(x) * (1 - M)

with ``M`` the mask upsampled to the image. The attribution map is the deleted region ``1 - M``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import BatchAdam
from .base import Interpreter, to_input_size

__all__ = ["MaskInterpreter", "gaussian_blur"]


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding (batched, on the input's device)."""
    radius = max(1, int(math.ceil(2 * sigma)))
    radius = min(radius, min(x.shape[-2:]) - 1)
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(pad, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def total_variation(m: Tensor, beta: float = 3.0) -> Tensor:
    """Per-example mean of ``|grad m|^beta`` over horizontal and vertical neighbours."""
    dh = (m[..., 1:, :] - m[..., :-1, :]).abs().pow(beta).flatten(1).mean(1)
    dw = (m[..., :, 1:] - m[..., :, :-1]).abs().pow(beta).flatten(1).mean(1)
    return dh + dw


class MaskInterpreter(Interpreter):
    """Batched MASK solver.

    Args:
        size: side of the optimised mask (default ``max(8, H // 8)``: 28 for 224 px, 8 for 32 px).
        iterations: Adam steps (reference: 300-500).
        lr: Adam learning rate (reference: 0.1).
        l1: weight of the deleted area ``mean(1 - m)``.
        tv: weight of the total variation term; ``tv_beta`` its exponent.
        blur_sigma: sigma of the Gaussian blur used as the "deleted" image (default ``max(2, H / 10)``).
        init: initial mask value. 0.5 (half blurred) rather than 1: on a confident classifier the softmax is
            saturated at the intact image, its gradient w.r.t. the mask vanishes and the solve stays empty.
    """

    name = "mask"
    differentiable = False

    def __init__(self, size: int | None = None, iterations: int = 300, lr: float = 0.1, l1: float = 0.05,
                 tv: float = 0.2, tv_beta: float = 3.0, blur_sigma: float | None = None, init: float = 0.5) -> None:
        if iterations < 1:
            raise ValueError(f"MASK iterations must be >= 1, got {iterations}")
        self.size, self.iterations, self.lr = size, iterations, lr
        if not 0 <= init <= 1:
            raise ValueError(f"MASK init must lie in [0, 1], got {init}")
        self.l1, self.tv, self.tv_beta, self.blur_sigma, self.init = l1, tv, tv_beta, blur_sigma, init

    # -- pieces shared with the ADV2 bilevel attack -------------------------------------------------
    def mask_size(self, x: Tensor) -> int:
        return self.size or max(8, x.shape[-1] // 8)

    def blurred(self, x: Tensor) -> Tensor:
        return gaussian_blur(x, self.blur_sigma or max(2.0, x.shape[-1] / 10))

    def init_mask(self, x: Tensor) -> Tensor:
        s = self.mask_size(x)
        return torch.full((x.shape[0], 1, s, s), self.init, device=x.device, dtype=x.dtype)

    def objective(self, model: nn.Module, x: Tensor, target: Tensor, m: Tensor, blurred: Tensor | None = None) -> Tensor:
        """Per-example ``l_map(m; x)``, differentiable w.r.t. both ``m`` and ``x``."""
        blurred = self.blurred(x) if blurred is None else blurred
        up = to_input_size(m, tuple(x.shape[-2:]))
        probs = model(x * up + blurred * (1 - up)).softmax(1)
        p = probs.gather(1, target.view(-1, 1)).squeeze(1)
        return p + self.l1 * (1 - m).flatten(1).mean(1) + self.tv * total_variation(m, self.tv_beta)

    def solve(self, model: nn.Module, x: Tensor, target: Tensor, m0: Tensor | None = None,
              iterations: int | None = None) -> Tensor:
        """Run Adam on ``l_map`` for a batch; returns the detached mask (1 = keep)."""
        x = x.detach()
        blurred = self.blurred(x)
        m = self.init_mask(x) if m0 is None else m0.detach().clone()
        opt = BatchAdam(m, lr=self.lr)
        with torch.enable_grad():
            for _ in range(iterations or self.iterations):
                m.requires_grad_(True)
                loss = self.objective(model, x, target, m, blurred).sum()
                (g,) = torch.autograd.grad(loss, m)
                m = opt.step(m, g).clamp(0, 1)
        return m.detach()

    # -- Interpreter API ---------------------------------------------------------------------------
    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        return 1 - self.solve(model, x, target)

    def normalise(self, m: Tensor) -> Tensor:
        return m.clamp(0, 1)

    def __repr__(self) -> str:
        return (f"MaskInterpreter(size={self.size}, iterations={self.iterations}, lr={self.lr}, l1={self.l1}, "
                f"tv={self.tv})")
