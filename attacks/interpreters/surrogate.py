"""Smooth ReLU-derivative surrogate for attacking gradient maps (ADV2 paper section 3.2).

A ReLU network's input gradient is piecewise constant in x, so the gradient of a GRAD map is zero.
Inside :func:`relu_surrogate` every ReLU keeps its exact forward value but back-propagates
``h(z) = 1 + z / sqrt(z^2 + tau)`` for ``z < 0`` and ``z / sqrt(z^2 + tau)`` for ``z >= 0``,
which is differentiable, so second derivatives are non-zero.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["relu_surrogate", "relu_as_softplus", "smooth_relu_grad", "smooth_relu_grad_derivative", "SurrogateReLU",
           "ExactFirstOrderReLU"]


def smooth_relu_grad(z: Tensor, tau: float) -> Tensor:
    """The surrogate derivative ``h(z)`` of ADV2 section 3.2."""
    s = z / torch.sqrt(z * z + tau)
    return torch.where(z < 0, 1 + s, s)


class _ExactReLU(torch.autograd.Function):
    """Forward: the exact ReLU, keeping ``z`` and ``tau`` for a surrogate backward (defined by the subclasses)."""

    @staticmethod
    def forward(ctx, z: Tensor, tau: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.tau = tau
        return z.clamp_min(0)


class SurrogateReLU(_ExactReLU):
    """Forward: exact ReLU. Backward: ``grad * h(z)``, itself differentiable (double backward works)."""

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return grad * smooth_relu_grad(z, ctx.tau), None


def smooth_relu_grad_derivative(z: Tensor, tau: float) -> Tensor:
    """``h'(z) = tau / (z^2 + tau)^1.5`` (both branches of h share it)."""
    return tau / (z * z + tau).pow(1.5)


class _SmoothStep(torch.autograd.Function):
    """Forward: the exact ReLU derivative ``1[z > 0]``. Backward: ``h'(z)``, the surrogate's curvature."""

    @staticmethod
    def forward(ctx, z: Tensor, tau: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.tau = tau
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return grad * smooth_relu_grad_derivative(z, ctx.tau), None


class ExactFirstOrderReLU(_ExactReLU):
    """Forward and first derivative exact; second derivative ``h'(z)`` from the surrogate.

    With it one forward pass serves both the prediction loss (exact gradient) and the exact GRAD map,
    whose input gradient is non-zero through the surrogate's curvature. Its second derivative equals
    that of :class:`SurrogateReLU`.
    """

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return grad * _SmoothStep.apply(z, ctx.tau), None


_original_relu = F.relu  # what every replacement below restores (tests check it)


@contextmanager
def _relu_replaced(fn) -> Iterator[None]:
    """Route every ``F.relu`` / ``nn.ReLU`` (also in-place ones) through ``fn(input)`` for the block; restores what
    was there on exit (also on error), so nested blocks keep the outer replacement. Not thread-safe."""

    def patched(input: Tensor, inplace: bool = False) -> Tensor:  # noqa: A002 - mirrors F.relu
        return fn(input)

    previous = F.relu
    F.relu = patched
    try:
        yield
    finally:
        F.relu = previous


def relu_surrogate(tau: float = 1e-4, exact_first_order: bool = False):
    """Route every ``F.relu`` / ``nn.ReLU`` through :class:`SurrogateReLU` (the paper's h as first derivative) or,
    with ``exact_first_order``, :class:`ExactFirstOrderReLU`. Works on any model built from ``nn.ReLU`` modules or
    ``F.relu`` calls (torchvision included)."""
    fn = ExactFirstOrderReLU if exact_first_order else SurrogateReLU
    return _relu_replaced(lambda z: fn.apply(z, tau))


def relu_as_softplus(beta: float):
    """Every ReLU computed as ``softplus(beta z) / beta`` (forward and backward): the smoothed network of Dombrowski
    et al. (NeurIPS 2019), whose gradient explanations are much harder to manipulate. ``beta -> inf`` is the ReLU."""
    if not beta > 0:
        raise ValueError(f"softplus beta must be > 0, got {beta}")
    return _relu_replaced(lambda z: F.softplus(z, beta=beta))
