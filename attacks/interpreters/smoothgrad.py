"""SmoothGrad (Smilkov et al. 2017): the mean of a gradient interpreter's maps over noisy copies of the input.

A modifier over any interpreter, as captum's ``NoiseTunnel`` wraps an attribution method: ``g_sg(x) = mean_s g(x + u_s)``
with ``u_s ~ N(0, (sigma * (max - min of the image range))^2)``, ``samples`` copies evaluated in one batch. The
noise is drawn from a generator seeded with ``seed`` at every call, so the map is a deterministic function of the
input (measurements repeat; attacks see a fixed expectation, not a moving target). Attacked through the base
interpreter's :meth:`attack_modifier` (GRAD's surrogate), with ADV2's default term.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from .base import INTERPRETERS, Interpreter, get_interpreter

__all__ = ["SmoothGrad"]


@INTERPRETERS.register("smoothgrad")
class SmoothGrad(Interpreter):
    """``mean_s base(x + u_s)`` over ``samples`` Gaussian copies of standard deviation ``sigma`` (images in [0, 1]).

    Args:
        base: the interpreter to smooth (name or instance; default GRAD, which makes this SmoothGrad proper).
        samples: noisy copies per input (Smilkov et al.: 50; batched as ``N * samples`` inputs).
        sigma: noise standard deviation as a share of the [0, 1] range (Smilkov et al.: 0.1-0.2).
        seed: seeds the noise of every call.

    Example::

        maps = SmoothGrad("grad", samples=16, sigma=0.1)(model, x, labels)
    """

    name = "smoothgrad"

    def __init__(self, base: str | Interpreter = "grad", samples: int = 16, sigma: float = 0.1, seed: int = 0,
                 base_options: dict[str, Any] | None = None) -> None:
        if samples < 1 or not sigma >= 0:
            raise ValueError(f"SmoothGrad needs samples >= 1 and sigma >= 0, got {samples}, {sigma}")
        self.base = get_interpreter(base, **(base_options or {}))
        self.samples, self.sigma, self.seed = int(samples), float(sigma), int(seed)
        self.differentiable, self.second_order = self.base.differentiable, self.base.second_order
        self.attack_defaults = dict(self.base.attack_defaults)

    def _noisy(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        u = torch.randn((self.samples, *x.shape), generator=gen).to(x) * self.sigma
        return (x.unsqueeze(0) + u).flatten(0, 1), target.repeat(self.samples)

    def _mean(self, maps: Tensor, n: int) -> Tensor:
        return maps.view(self.samples, n, *maps.shape[1:]).mean(0)

    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        xs, ts = self._noisy(x, target)
        return self._mean(self.base.explain(model, xs, ts, create_graph=create_graph), x.shape[0])

    def attack_modifier(self) -> AbstractContextManager:
        return self.base.attack_modifier()

    def normalise(self, m: Tensor) -> Tensor:
        return self.base.normalise(m)

    def __repr__(self) -> str:
        return f"SmoothGrad(base={self.base!r}, samples={self.samples}, sigma={self.sigma}, seed={self.seed})"
