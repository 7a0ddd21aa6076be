"""Context managers that leave the caller's modules exactly as they were."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["frozen", "eval_mode", "flush_denormals"]


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


def _flushing() -> bool:
    """Whether this thread flushes denormal floats to zero now (then a float32 denormal does not survive conversion)."""
    return torch.tensor([1e-39], dtype=torch.float32).item() == 0.0


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero on the CPU for the block (``torch.set_flush_denormal``), restored on exit.

    The second-order terms (GRAD's surrogate curvature, MASK's lookahead) multiply gradients by factors far below 1
    layer after layer; on a deep network at 224 px their values sink below 1.2e-38, where x86 arithmetic takes a
    microcode slow path (an ADV2-GRAD step on an untrained resnet50 at batch 4: about 6x slower). The flag is per
    thread: it covers the calling thread (all of a one-thread run)."""
    before = _flushing()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
