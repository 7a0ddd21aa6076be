"""MASK: meaningful perturbation (Fong & Vedaldi; ADV2 Eqn 9), solved as one batched optimisation.

A low-resolution mask ``m`` in [0, 1] (1 = keep, 0 = replace by a blurred copy) minimises, per example,

    l_map(m; x) = f_c(phi(x; m)) + l1 * mean(1 - m) + tv * TV(m),   phi(x; m) = x * M + blur(x) * (1 - M)

with ``M`` the mask upsampled to the image. The attribution map is the deleted region ``1 - M``.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constant_weights import constant_weights
from ..maps import resize_map
from ..optim import BatchAdam
from ..terms import InterpretationTerm, map_mse
from .base import INTERPRETERS, Interpreter

__all__ = ["MaskInterpreter", "MaskTerm", "gaussian_blur", "total_variation"]


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


@INTERPRETERS.register("mask")
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
    attack_defaults = {"c": 500.0, "steps": 40, "term_options": {
        "inner_steps": 4, "lookahead_steps": 1, "lookahead_lr": 0.5, "reset_every": 5, "target_deletion_weight": 0.3}}

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
        up = resize_map(m, tuple(x.shape[-2:]))
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

    def attack_term(self, **options: Any) -> MaskTerm:
        """ADV2's bilevel MASK term (Algorithm 1); ``options`` are :class:`MaskTerm`'s. It models MASK's own solver,
        so a subclass that redefines :meth:`explain` must bring its own term (else it would be attacked on MASK's
        map): refused here."""
        if type(self).explain is not MaskInterpreter.explain:
            raise ValueError(f"{type(self).__name__} redefines MASK's map (explain) but not its attack term: ADV2's "
                             "bilevel MASK term attacks MASK's own map; override attack_term() too")
        return MaskTerm(self, **options)

    def __repr__(self) -> str:
        return (f"MaskInterpreter(size={self.size}, iterations={self.iterations}, lr={self.lr}, l1={self.l1}, "
                f"tv={self.tv})")


class MaskTerm(InterpretationTerm):
    """ADV2 against MASK (Algorithm 1, section 3.6).

    Each step first moves the running mask ``inner_steps`` Adam steps on ``l_map(m; x)``; the loss then
    unrolls ``lookahead_steps`` differentiable gradient steps of size ``lookahead_lr`` (the follower's next
    moves, with ``create_graph``) and averages the interpretation loss over the unrolled maps. Every
    ``reset_every`` steps the running mask is replaced by a fresh MASK solve of the current input, which is the map
    the evaluation measures, so it also scores the iterate (``selects_on_refresh``).
    ``target_deletion_weight`` (an addition of this framework, 0 = the paper) adds the target-class
    probability of the input with the *target* map's region blurred out, which makes the target map a
    good MASK solution directly. The engine's per-image step-size search is on (``wants_step_search``).
    """

    wants_step_search = True
    selects_on_refresh = True

    def __init__(self, interpreter: MaskInterpreter, inner_steps: int = 4, lookahead_steps: int = 1,
                 lookahead_lr: float = 0.1, reset_every: int = 50, reset_iterations: int | None = None,
                 target_deletion_weight: float = 0.0) -> None:
        super().__init__(interpreter)
        if inner_steps < 0 or lookahead_steps < 1:
            raise ValueError(f"MASK inner_steps must be >= 0 and lookahead_steps >= 1, got {inner_steps}, {lookahead_steps}")
        self.inner_steps, self.lookahead_steps, self.lookahead_lr = inner_steps, lookahead_steps, lookahead_lr
        self.reset_every = reset_every
        self.reset_iterations = reset_iterations
        self.target_deletion_weight = target_deletion_weight

    def init(self, model, x, y_t, m_t):
        m = self.interpreter.solve(model, x, y_t, iterations=self.reset_iterations)
        return {"m": m, "adam": BatchAdam(m, lr=self.interpreter.lr)}

    def _grad_m(self, model, x, y_t, m, create_graph: bool, blurred: Tensor) -> Tensor:
        m = m if m.requires_grad else m.detach().requires_grad_(True)
        # the lookahead's double backward needs no weight gradients; first-order steps gain nothing from it
        with constant_weights() if create_graph else nullcontext():
            obj = self.interpreter.objective(model, x, y_t, m, blurred).sum()
        (g,) = torch.autograd.grad(obj, m, create_graph=create_graph)
        return g

    def loss_and_logits(self, model, x, y_t, m_t, state):
        xd = x.detach()
        m = state["m"]
        blurred = self.interpreter.blurred(xd)
        for _ in range(self.inner_steps):  # line 3: update the running mask
            m = state["adam"].step(m, self._grad_m(model, xd, y_t, m, False, blurred)).clamp(0, 1)
        state["m"] = m.detach()
        total = x.new_zeros(x.shape[0])
        look = m.detach().requires_grad_(True)
        blurred_x = self.interpreter.blurred(x)
        for _ in range(self.lookahead_steps):  # line 4: differentiable lookahead
            look = (look - self.lookahead_lr * self._grad_m(model, x, y_t, look, True, blurred_x)).clamp(0, 1)
            state["map"] = 1 - resize_map(look, tuple(x.shape[-2:]))
            total = total + map_mse(state["map"], m_t)
        total = total / self.lookahead_steps
        if self.target_deletion_weight:
            # make the target map a good MASK solution: deleting the target region must remove the prediction
            probs = model(x * (1 - m_t) + blurred_x * m_t).softmax(1)
            total = total + self.target_deletion_weight * probs.gather(1, y_t.view(-1, 1)).squeeze(1)
        return total, None

    def refresh(self, model, x, y_t, m_t, state, step):
        """Periodic reset to a fresh MASK solve; that solve is the real map, so it also scores the iterate."""
        if step is None or (self.reset_every and (step + 1) % self.reset_every == 0):
            state["m"] = self.interpreter.solve(model, x.detach(), y_t, iterations=self.reset_iterations)
            state["adam"] = BatchAdam(state["m"], lr=self.interpreter.lr)
            state["selection_loss"] = map_mse(1 - resize_map(state["m"], tuple(x.shape[-2:])), m_t)
