"""Context managers that leave the caller's modules exactly as they were."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["frozen", "eval_mode"]


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode; restore every submodule's own ``training`` flag afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on all parameters, restored on exit (also after an exception).

    Attacks run inside this so that input gradients never leave ``.grad`` on the model's parameters.
    """
    params = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    with eval_mode(*modules):
        try:
            for p, _ in params:
                p.requires_grad_(False)
            with torch.enable_grad():
                yield
        finally:
            for p, flag in params:
                p.requires_grad_(flag)
