"""Model weights as constants: a cheaper double backward w.r.t. the input.

ADV2's GRAD and MASK terms differentiate a gradient (``grad_x`` of a map, ``grad_m`` of the MASK objective)
once more w.r.t. the input. PyTorch's double backward of a convolution computes the gradient w.r.t. the
convolution's *weight* whenever the incoming gradient is defined, even when the weight does not require
grad (measured here: about a third of the lookahead's time on a small CNN), and eval-mode BatchNorm goes
through the general batch-statistics formula. Inside :func:`constant_weights`,

- ``conv2d`` with a weight that does not require grad runs as :class:`ConstantWeightConv2d`, whose backward
  is a differentiable ``conv_transpose2d`` of the incoming gradient: its own backward is one convolution;
- eval-mode ``batch_norm`` (running statistics, no grad on its affine parameters) is the per-channel affine
  map it is: ``x * scale + shift``.

The values and all input derivatives are those of the original ops (tests compare them in float64). A weight
that requires grad is left to PyTorch, so the context never drops a gradient somebody asked for; attacks run
with frozen parameters (:func:`attacks.state.frozen`), where every convolution takes the fast path.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

__all__ = ["constant_weights", "ConstantWeightConv2d"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = (None, None, None, None, None, False, 0.1, 1e-5)


def _bind(names: tuple[str, ...], defaults: tuple, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, defaults))
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class ConstantWeightConv2d(torch.autograd.Function):
    """``conv2d(x, w, b)`` differentiable w.r.t. ``x`` only, to any order (``w`` and ``b`` are constants).

    Under autocast it computes in the autocast dtype like ``F.conv2d`` does and returns input gradients in
    the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,  # type: ignore[override]
                groups: int) -> Tensor:
        dtype = _compute_dtype(x)
        w = weight.detach().to(dtype)
        b = None if bias is None else bias.detach().to(dtype)
        ctx.save_for_backward(w)
        ctx.conf = (_pair(stride), _pair(padding), _pair(dilation), groups, tuple(x.shape[-2:]), x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.to(dtype), w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        stride, padding, dilation, groups, size, x_dtype = ctx.conf
        out_pad = tuple(s - ((o - 1) * st - 2 * p + d * (k - 1) + 1)
                        for s, o, st, p, d, k in zip(size, grad.shape[-2:], stride, padding, dilation, w.shape[-2:]))
        with torch.autocast(grad.device.type, enabled=False):
            gx = F.conv_transpose2d(grad.to(w.dtype), w, None, stride, padding, out_pad, groups, dilation)
        return gx.to(x_dtype), None, None, None, None, None, None


def _affine_batch_norm(b: dict[str, Any]) -> Tensor:
    x = b["input"]
    scale = torch.rsqrt(b["running_var"] + b["eps"])
    if b["weight"] is not None:
        scale = scale * b["weight"]
    shift = -b["running_mean"] * scale
    if b["bias"] is not None:
        shift = shift + b["bias"]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


class _ConstantWeightMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            b = _bind(_CONV_ARGS, _CONV_DEFAULTS, args, kwargs)
            if (b["input"].dim() == 4 and not isinstance(b["padding"], str)
                    and not _needs_grad(b["weight"], b["bias"])):
                return ConstantWeightConv2d.apply(*(b[n] for n in _CONV_ARGS))
        elif func is F.batch_norm:
            b = _bind(_BN_ARGS, _BN_DEFAULTS, args, kwargs)
            if (not b["training"] and b["running_mean"] is not None and b["running_var"] is not None
                    and not _needs_grad(b["weight"], b["bias"], b["running_mean"], b["running_var"])):
                return _affine_batch_norm(b)
        return func(*args, **kwargs)


@contextmanager
def constant_weights() -> Iterator[None]:
    """Record ``conv2d`` / eval ``batch_norm`` with constant weights (see the module docstring)."""
    with _ConstantWeightMode():
        yield
