"""Interpretation loss terms ``l_int(g(x), m_t)`` of ADV2, one per interpreter family (ADV2 section 3).

A term turns an interpreter into a per-example loss that is differentiable w.r.t. the input:

- :class:`MapTerm` (CAM and any differentiable interpreter): ``mean((g(x) - m_t)^2)``;
- :class:`GradTerm` (GRAD): the same map computed with the smooth ReLU-derivative surrogate (section 3.2);
- :class:`MaskTerm` (MASK): the bilevel lookahead of Algorithm 1 with a running mask and periodic reset;
- :class:`EnsembleTerm`: the mean of several terms (the adaptive attack on a multi-interpreter defence).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .interpreters import GradInterpreter, Interpreter, MaskInterpreter, get_interpreter
from .interpreters.base import to_input_size
from .optim import BatchAdam

__all__ = ["InterpretationTerm", "MapTerm", "GradTerm", "MaskTerm", "EnsembleTerm", "make_term", "map_mse"]


def map_mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-example mean squared difference of two maps on the same grid."""
    return (a - b).pow(2).flatten(1).mean(1)


class InterpretationTerm:
    """Base term: ``init`` once per attack, ``loss`` at every joint step, ``refresh`` after each update."""

    def __init__(self, interpreter: Interpreter) -> None:
        self.interpreter = interpreter

    @property
    def name(self) -> str:
        return self.interpreter.name

    def target_map(self, model: nn.Module, x: Tensor, cls: Tensor) -> Tensor:
        """The map the attack aims at by default: the benign map of the measuring interpreter."""
        with torch.enable_grad():
            return self.interpreter(model, x, cls).detach()

    def init(self, model: nn.Module, x: Tensor, y_t: Tensor, m_t: Tensor) -> dict[str, Any]:
        return {}

    def loss(self, model: nn.Module, x: Tensor, y_t: Tensor, m_t: Tensor, state: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def refresh(self, model: nn.Module, x: Tensor, y_t: Tensor, state: dict[str, Any], step: int) -> None:
        """Hook after an input update (MASK moves its running mask here)."""


class MapTerm(InterpretationTerm):
    """``l_int = mean((g(x) - m_t)^2)`` for a differentiable interpreter (CAM, RTS, ...)."""

    def loss(self, model, x, y_t, m_t, state):
        return map_mse(self.interpreter(model, x, y_t, create_graph=True), m_t)


class GradTerm(MapTerm):
    """GRAD term: the map inside the loss uses the surrogate ReLU derivative; measurements do not."""

    def __init__(self, interpreter: GradInterpreter, tau: float = 1e-4) -> None:
        super().__init__(interpreter)
        self.surrogate = interpreter.with_surrogate(tau)

    def loss(self, model, x, y_t, m_t, state):
        return map_mse(self.surrogate(model, x, y_t, create_graph=True), m_t)


class MaskTerm(InterpretationTerm):
    """ADV2 against MASK (Algorithm 1, section 3.6).

    Each step first moves the running mask ``inner_steps`` Adam steps on ``l_map(m; x)``; the loss then
    unrolls ``inner_steps`` differentiable gradient steps of size ``lookahead_lr`` (the follower's next
    moves, with ``create_graph``) and averages the interpretation loss over the unrolled maps. Every
    ``reset_every`` steps the running mask is replaced by a fresh MASK solve of the current input.
    """

    def __init__(self, interpreter: MaskInterpreter, inner_steps: int = 4, lookahead_lr: float = 0.1,
                 reset_every: int = 50, reset_iterations: int | None = None) -> None:
        super().__init__(interpreter)
        self.inner_steps, self.lookahead_lr = inner_steps, lookahead_lr
        self.reset_every = reset_every
        self.reset_iterations = reset_iterations

    def init(self, model, x, y_t, m_t):
        m = self.interpreter.solve(model, x, y_t, iterations=self.reset_iterations)
        return {"m": m, "adam": BatchAdam(m, lr=self.interpreter.lr)}

    def _grad_m(self, model, x, y_t, m, create_graph: bool) -> Tensor:
        m = m if m.requires_grad else m.detach().requires_grad_(True)
        obj = self.interpreter.objective(model, x, y_t, m).sum()
        (g,) = torch.autograd.grad(obj, m, create_graph=create_graph)
        return g

    def loss(self, model, x, y_t, m_t, state):
        xd = x.detach()
        m = state["m"]
        for _ in range(self.inner_steps):  # line 3: update the running mask
            m = state["adam"].step(m, self._grad_m(model, xd, y_t, m, False)).clamp(0, 1)
        state["m"] = m.detach()
        total = x.new_zeros(x.shape[0])
        look = m.detach().requires_grad_(True)
        for _ in range(self.inner_steps):  # line 4: differentiable lookahead
            look = (look - self.lookahead_lr * self._grad_m(model, x, y_t, look, True)).clamp(0, 1)
            total = total + map_mse(1 - to_input_size(look, tuple(x.shape[-2:])), m_t)
        return total / self.inner_steps

    def refresh(self, model, x, y_t, state, step):
        if self.reset_every and (step + 1) % self.reset_every == 0:
            state["m"] = self.interpreter.solve(model, x.detach(), y_t, iterations=self.reset_iterations)
            state["adam"] = BatchAdam(state["m"], lr=self.interpreter.lr)


class EnsembleTerm(InterpretationTerm):
    """Adaptive attack: the mean of the terms of several interpreters, each with its own target map."""

    def __init__(self, terms: Sequence[InterpretationTerm]) -> None:
        self.terms = list(terms)
        self.interpreter = terms[0].interpreter

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.terms)

    def target_map(self, model, x, cls):
        return torch.cat([t.target_map(model, x, cls) for t in self.terms], dim=1)

    def init(self, model, x, y_t, m_t):
        return {i: t.init(model, x, y_t, m_t[:, i:i + 1]) for i, t in enumerate(self.terms)}

    def loss(self, model, x, y_t, m_t, state):
        losses = [t.loss(model, x, y_t, m_t[:, i:i + 1], state[i]) for i, t in enumerate(self.terms)]
        return torch.stack(losses).mean(0)

    def refresh(self, model, x, y_t, state, step):
        for i, t in enumerate(self.terms):
            t.refresh(model, x, y_t, state[i], step)


def make_term(interpreter: str | Interpreter | Sequence[str | Interpreter], *, surrogate_tau: float = 1e-4,
              mask_options: dict[str, Any] | None = None, interpreter_options: dict[str, dict] | None = None) -> InterpretationTerm:
    """The ADV2 term for an interpreter (or the ensemble term for a list of them)."""
    if isinstance(interpreter, (list, tuple)):
        if len(interpreter) == 1:
            interpreter = interpreter[0]
        else:
            return EnsembleTerm([make_term(i, surrogate_tau=surrogate_tau, mask_options=mask_options,
                                           interpreter_options=interpreter_options) for i in interpreter])
    opts = (interpreter_options or {}).get(str(interpreter), {}) if isinstance(interpreter, str) else {}
    g = get_interpreter(interpreter, **opts)
    if isinstance(g, GradInterpreter):
        return GradTerm(g, surrogate_tau)
    if isinstance(g, MaskInterpreter):
        return MaskTerm(g, **(mask_options or {}))
    attack_term = getattr(g, "attack_term", None)  # interpreters may bring their own (RTS: encoder term)
    if callable(attack_term):
        return attack_term()
    return MapTerm(g)
