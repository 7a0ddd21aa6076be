"""PGD in the L-inf ball (Madry et al.), as used by ADV2 / AdvEdge (Eqn 4 / Eqn 10)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..base_attack import linf_within
from ..checks import check_positive
from ..optim import expand_like
from .base import FRAMEWORKS, ThreatModel, clip01, grid_levels, quantise_linf

__all__ = ["PGD", "pgd_maximise"]


@FRAMEWORKS.register("pgd")
class PGD(ThreatModel):
    """``x = clip(x0 + delta)``, ``|delta|_inf <= eps``, sign steps of size ``alpha`` (times the edge weight)."""

    name = "pgd"
    supports_step_search = True
    options = {"eps": 0.031, "alpha": 2 / 255, "random_start": False}
    settings = ("eps", "alpha", "random_start")

    def __init__(self, eps: float = 0.031, alpha: float = 1 / 255, random_start: bool = False) -> None:
        check_positive(eps, "eps")
        check_positive(alpha, "alpha")
        self.eps, self.alpha, self.random_start = eps, alpha, random_start

    def init(self, x0: Tensor, generator: torch.Generator | None, weight: Tensor | None = None) -> Tensor:
        """Zero, or a uniform random start in the ball; AdvEdge weights it by the edges like every step."""
        if not self.random_start:
            return torch.zeros_like(x0)
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        z = (x0 + (2 * u - 1) * self.eps).clamp(0, 1) - x0
        return z if weight is None else z * weight

    def apply(self, x0: Tensor, z: Tensor, weight: Tensor | None) -> Tensor:
        return clip01(x0 + z)  # project() keeps x0 + z in [0, 1]; the clip is a guard with identity gradient

    def step(self, z: Tensor, grad: Tensor, active: Tensor, weight: Tensor | None, alpha: Tensor | float | None = None) -> Tensor:
        a = self.alpha if alpha is None else alpha
        if isinstance(a, Tensor):
            a = expand_like(a, z)
        upd = a * grad.sign()
        if weight is not None:
            upd = upd * weight
        upd = upd * expand_like(active.to(z.dtype), z)
        return (z.detach() - upd).clamp(-self.eps, self.eps)

    def check_grid_budget(self) -> None:
        if grid_levels(self.eps) == 0:
            raise ValueError(f"eps {self.eps:g} is below one uint8 level (1/255 = 0.00392): an 8-bit image cannot "
                             "move inside this ball; use eps >= 1/255")

    def within(self, x0: Tensor, x: Tensor) -> Tensor:
        """Per input: inside the L-inf ball of radius ``eps`` around ``x0`` and [0, 1]."""
        return linf_within(x0, x, self.eps)

    def project(self, x0: Tensor, z: Tensor) -> Tensor:
        """Keep ``x0 + z`` inside [0, 1]."""
        return (x0 + z).clamp(0, 1) - x0

    def quantise(self, x0: Tensor, x: Tensor) -> Tensor:
        """Nearest uint8 level, at most ``floor(eps * 255)`` levels from ``x0`` (:func:`quantise_linf`)."""
        return quantise_linf(x0, x, self.eps)


def pgd_maximise(loss_fn: Callable[[Tensor], Tensor], x0: Tensor, eps: float, alpha: float, steps: int,
                 random_start: bool = True, generator: torch.Generator | None = None,
                 start: Tensor | None = None) -> Tensor:
    """Generic L-inf PGD ascent on ``loss_fn(x) -> Tensor[N]`` (e.g. an interpretation discrepancy).

    Gradients are taken w.r.t. the input only (``torch.autograd.grad``); returns the detached last iterate.
    ``start``: the starting perturbation (clipped to the ball and to [0, 1]; e.g. TRADES' ``0.001 * N(0, 1)``),
    in place of zero / the uniform random start.
    """
    threat = PGD(eps, alpha, random_start)
    x0 = x0.detach()
    z = threat.init(x0, generator) if start is None else threat.project(x0, start.detach().clamp(-eps, eps))
    active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    with torch.enable_grad():
        for _ in range(steps):
            x = threat.apply(x0, z.requires_grad_(True), None)
            (g,) = torch.autograd.grad(loss_fn(x).sum(), z)
            z = threat.project(x0, threat.step(z, -g, active, None))
    return threat.apply(x0, z, None).detach()
