"""Batched, per-example optimisers for attack loops (no host syncs, examples can be frozen or reset)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BatchAdam", "expand_like"]


def expand_like(v: Tensor, ref: Tensor) -> Tensor:
    """Reshape a per-example vector ``[N]`` to broadcast against ``ref`` ``[N, ...]``."""
    return v.view(-1, *([1] * (ref.dim() - 1)))


class BatchAdam:
    """Adam on a batch of independent problems: element-wise moments, a step counter per example.

    ``step(p, grad, active)`` returns the updated tensor; examples with ``active == False`` keep their
    value and their moments. ``reset(which)`` restarts the moments of the selected examples
    (used by ADV2's periodic MASK reset).
    """

    def __init__(self, like: Tensor, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = torch.zeros(like.shape[0], device=like.device, dtype=like.dtype)

    def step(self, p: Tensor, grad: Tensor, active: Tensor | None = None, lr: Tensor | float | None = None) -> Tensor:
        grad = grad.detach()
        act = torch.ones_like(self.t, dtype=torch.bool) if active is None else active
        a = expand_like(act.to(p.dtype), p)
        self.t = self.t + act.to(self.t.dtype)
        self.m = torch.where(a.bool(), self.b1 * self.m + (1 - self.b1) * grad, self.m)
        self.v = torch.where(a.bool(), self.b2 * self.v + (1 - self.b2) * grad * grad, self.v)
        t = expand_like(self.t.clamp_min(1), p)
        mhat = self.m / (1 - self.b1 ** t)
        vhat = self.v / (1 - self.b2 ** t)
        step_lr = self.lr if lr is None else (expand_like(lr, p) if isinstance(lr, Tensor) else lr)
        return p.detach() - a * step_lr * mhat / (vhat.sqrt() + self.eps)

    def reset(self, which: Tensor) -> None:
        """Forget the moments and step count of the examples where ``which`` (a bool ``[N]``) is set."""
        w = expand_like(which.to(self.m.dtype), self.m).bool()
        self.m = torch.where(w, torch.zeros_like(self.m), self.m)
        self.v = torch.where(w, torch.zeros_like(self.v), self.v)
        self.t = torch.where(which, torch.zeros_like(self.t), self.t)
