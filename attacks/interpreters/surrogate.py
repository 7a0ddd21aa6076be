"""Smooth ReLU-derivative surrogate for attacking gradient maps (ADV2 paper section 3.2).

A ReLU network's input gradient is piecewise constant in x, so the gradient of a GRAD map is zero.
Inside :func:`relu_surrogate` (a composable modifier, a ``TorchFunctionMode``) every ReLU keeps its exact forward value but back-propagates
``h(z) = 1 + z / sqrt(z^2 + tau)`` for ``z < 0`` and ``z / sqrt(z^2 + tau)`` for ``z >= 0``,
which is differentiable, so second derivatives are non-zero.
"""
from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["relu_surrogate", "relu_as_softplus", "ReluModifier", "first_order_exact", "smooth_relu_grad",
           "smooth_relu_grad_derivative", "SurrogateReLU", "ExactFirstOrderReLU"]


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


class ExactFirstOrderReLU(_ExactReLU):
    """Forward and first derivative exact; second derivative ``h'(z)`` from the surrogate.

    With it one forward pass serves both the prediction loss (exact gradient) and the exact GRAD map,
    whose input gradient is non-zero through the surrogate's curvature. Its second derivative equals
    that of :class:`SurrogateReLU`.
    """

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return _GatedGrad.apply(grad, z, ctx.tau), None


class _GatedGrad(torch.autograd.Function):
    """``grad * 1[z > 0]`` as one fused ``threshold_backward`` (what ``F.relu``'s own backward runs); its backward:
    ``gg * 1[z > 0]`` to ``grad`` and ``gg * grad * h'(z)`` to ``z`` (the surrogate's curvature)."""

    @staticmethod
    def forward(ctx, grad: Tensor, z: Tensor, tau: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad, z)
        ctx.tau = tau
        return torch.ops.aten.threshold_backward(grad, z, 0)

    @staticmethod
    def backward(ctx, gg: Tensor):  # type: ignore[override]
        grad, z = ctx.saved_tensors
        return _GatedGrad.apply(gg, z, ctx.tau), gg * grad * smooth_relu_grad_derivative(z, ctx.tau), None


_RELUS = (torch.relu, torch.Tensor.relu)
_RELUS_INPLACE = (torch.relu_, torch.Tensor.relu_)  # F.relu_ is torch.relu_

#: nesting depth of active modifiers that change a ReLU's forward value or first derivative (per thread / context)
_INEXACT: ContextVar[int] = ContextVar("attacks_inexact_relu", default=0)


def first_order_exact() -> bool:
    """False inside a ReLU modifier that changes the forward value or the first derivative (logits computed there are
    not the model's, for a prediction loss)."""
    return _INEXACT.get() == 0


class ReluModifier(TorchFunctionMode):
    """Routes every ReLU of the block through ``fn``: ``torch.relu``, ``F.relu``, ``Tensor.relu``, ``nn.ReLU`` and
    their in-place variants (``relu_``, ``inplace=True``: the input is overwritten with ``fn``'s value, as the native
    op would). A :class:`~torch.overrides.TorchFunctionMode`, as :func:`attacks.constant_weights.constant_weights`:
    nothing global is patched, blocks nest (the innermost modifier wins) and compose with other modes.
    ``exact_first_order`` declares that ``fn`` keeps the ReLU's value and first derivative."""

    def __init__(self, fn: Callable[[Tensor], Tensor], exact_first_order: bool) -> None:
        super().__init__()
        self.fn, self.exact_first_order = fn, exact_first_order
        self._tokens: list = []

    def __enter__(self):
        self._tokens.append(None if self.exact_first_order else _INEXACT.set(_INEXACT.get() + 1))
        return super().__enter__()

    def __exit__(self, *exc):
        token = self._tokens.pop()
        if token is not None:
            _INEXACT.reset(token)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.relu:
            inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            return self._inplace(args[0]) if inplace else self.fn(args[0])
        if func in _RELUS:
            return self.fn(args[0])
        if func in _RELUS_INPLACE:
            return self._inplace(args[0])
        return func(*args, **kwargs)

    def _inplace(self, z: Tensor) -> Tensor:
        return z.copy_(self.fn(z.clone()))  # fn may save its input for backward: give it a copy that stays intact


def relu_surrogate(tau: float = 1e-4, exact_first_order: bool = False) -> ReluModifier:
    """Modifier: every ReLU as :class:`SurrogateReLU` (exact value, the paper's h as first derivative) or, with
    ``exact_first_order``, :class:`ExactFirstOrderReLU` (exact value and first derivative, h' as second). The
    forward value is unchanged; the double backward of a ReLU network becomes non-zero. Works on any model built
    from ``nn.ReLU`` modules or ``relu`` calls (torchvision included) and around any interpreter's
    :meth:`~attacks.interpreters.Interpreter.explain`::

        with relu_surrogate(1e-4):
            m = my_interpreter(model, x, y, create_graph=True)   # input gradient through h'
    """
    if not tau > 0:
        raise ValueError(f"surrogate tau must be > 0, got {tau}")
    fn = ExactFirstOrderReLU if exact_first_order else SurrogateReLU
    return ReluModifier(lambda z: fn.apply(z, tau), exact_first_order)


def relu_as_softplus(beta: float) -> ReluModifier:
    """Modifier: every ReLU computed as ``softplus(beta z) / beta`` (forward and backward): the smoothed network of
    Dombrowski et al. (NeurIPS 2019), whose gradient explanations are much harder to manipulate. ``beta -> inf`` is
    the ReLU."""
    if not beta > 0:
        raise ValueError(f"softplus beta must be > 0, got {beta}")
    return ReluModifier(lambda z: F.softplus(z, beta=beta), exact_first_order=False)
