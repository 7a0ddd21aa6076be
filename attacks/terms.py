"""Interpretation loss terms ``l_int(g(x), m_t)`` of ADV2 (section 3): what the engine asks of an interpreter.

Each interpreter builds its own term (:meth:`attacks.interpreters.Interpreter.attack_term`); the engine only reads
the term's flags and calls its hooks, never its type:

- :class:`MapTerm` (the default: CAM, SmoothGrad, Integrated Gradients, Grad-CAM, softplus GRAD and any user's
  differentiable interpreter): ``mean((g(x) - m_t)^2)`` on the interpreter's :meth:`attack_map`, i.e. its one hook
  :meth:`~attacks.interpreters.Interpreter.explain` under its ``attack_modifier``, sharing the classifier's forward
  pass when ``explain`` recorded the logits of ``x`` (CAM, GRAD; ``record_forward``);
- GRAD's surrogate term, MASK's bilevel term and RTS's encoder term live next to their interpreters;
- :class:`EnsembleTerm`: the mean of several terms (the adaptive attack on a multi-interpreter defence).

Terms whose maps are gradients record the model under :func:`~attacks.constant_weights.constant_weights` (same values
and input derivatives, no wasted weight-gradient convolutions in the double backward).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .constant_weights import constant_weights

if TYPE_CHECKING:  # pragma: no cover
    from .interpreters.base import Interpreter

__all__ = ["InterpretationTerm", "MapTerm", "EnsembleTerm", "map_mse"]


def map_mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-example mean squared difference of two maps on the same grid."""
    return (a - b).pow(2).flatten(1).mean(1)


class InterpretationTerm:
    """Base term: ``init`` once per attack stage, ``loss_and_logits`` at every joint step, ``refresh`` after each update.

    Flags the engine reads: ``wants_label_smoothing`` (ADV2 section 3.6: GRAD), ``wants_step_search`` (the per-image
    step-size search of Algorithm 1: MASK; used where the threat model supports it) and ``selects_on_refresh`` (the
    per-step loss only estimates the measured map distance: the term scores iterates itself in :meth:`refresh`)."""

    wants_label_smoothing: bool = False
    wants_step_search: bool = False
    selects_on_refresh: bool = False

    def __init__(self, interpreter: Interpreter) -> None:
        self.interpreter = interpreter

    @property
    def name(self) -> str:
        return self.interpreter.name

    def networks(self) -> list[nn.Module]:
        """Trainable networks the term runs (RTS): frozen and restored by the engine like the classifier."""
        return []

    def target_map(self, model: nn.Module, x: Tensor, cls: Tensor) -> Tensor:
        """The map the attack aims at by default: the benign map of the measuring interpreter."""
        with torch.enable_grad():
            return self.interpreter(model, x, cls).detach()

    def init(self, model: nn.Module, x: Tensor, y_t: Tensor, m_t: Tensor) -> dict[str, Any]:
        return {}

    def loss_and_logits(self, model: nn.Module, x: Tensor, y_t: Tensor, m_t: Tensor,
                        state: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Per-example loss, differentiable w.r.t. ``x``, and the exact logits of ``x`` when the term's forward pass
        produced them (so the engine does not run the classifier twice), else ``None``."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss_and_logits()")

    def refresh(self, model: nn.Module, x: Tensor, y_t: Tensor, m_t: Tensor, state: dict[str, Any],
                step: int | None) -> None:
        """Hook after an input update (MASK moves its running mask here); ``step=None`` after the last step."""

    def last_map(self, state: dict[str, Any]) -> Tensor:
        """The differentiable map ``[N, 1, H, W]`` of the last :meth:`loss_and_logits` call (on the input grid, with
        its graph): what an adaptive attack feeds to a detector that reads this interpreter."""
        if "map" not in state:
            raise ValueError(f"term of '{self.name}' has no map yet: call loss_and_logits first")
        return state["map"]


class MapTerm(InterpretationTerm):
    """``l_int = mean((g(x) - m_t)^2)`` on the interpreter's :meth:`attack_map` (any differentiable interpreter).

    ``init`` checks once that the map carries a gradient: a map with no or an all-zero input gradient (e.g. a ReLU
    network's exact gradient map) would turn ADV2 silently into the plain attack, so it is an error."""

    def _record(self):
        return constant_weights() if getattr(self.interpreter, "second_order", False) else nullcontext()

    def loss_and_logits(self, model, x, y_t, m_t, state):
        with self._record():
            m, logits = self.interpreter.attack_map_and_logits(model, x, y_t)
        state["map"] = m
        return map_mse(m, m_t), logits

    def init(self, model, x, y_t, m_t):
        probe = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_and_logits(model, probe, y_t, m_t, {})[0]
            (g,) = torch.autograd.grad(loss.sum(), probe, allow_unused=True)
        if g is None or not bool(g.abs().sum() > 0):
            raise ValueError(f"the attack map of interpreter '{self.name}' has no input gradient on this model, so "
                             "ADV2 would silently be the plain attack; give the interpreter an attack_modifier() "
                             "that makes it differentiable (gradient maps: attacks.interpreters.relu_surrogate(tau, "
                             "exact_first_order=True), ADV2 section 3.2)")
        return {}


class EnsembleTerm(InterpretationTerm):
    """Adaptive attack: the mean of the terms of several interpreters, each with its own target map (channel)."""

    def __init__(self, terms: Sequence[InterpretationTerm]) -> None:
        self.terms = list(terms)
        self.interpreter = terms[0].interpreter
        self.wants_label_smoothing = any(t.wants_label_smoothing for t in self.terms)
        self.wants_step_search = any(t.wants_step_search for t in self.terms)

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.terms)

    def networks(self) -> list[nn.Module]:
        return [n for t in self.terms for n in t.networks()]

    def target_map(self, model, x, cls):
        return torch.cat([t.target_map(model, x, cls) for t in self.terms], dim=1)

    def init(self, model, x, y_t, m_t):
        return {i: t.init(model, x, y_t, m_t[:, i:i + 1]) for i, t in enumerate(self.terms)}

    def loss_and_logits(self, model, x, y_t, m_t, state):
        losses, logits = [], None
        for i, t in enumerate(self.terms):
            l_i, lg = t.loss_and_logits(model, x, y_t, m_t[:, i:i + 1], state[i])
            losses.append(l_i)
            logits = lg if logits is None else logits
        return torch.stack(losses).mean(0), logits

    def last_map(self, state):
        return torch.cat([t.last_map(state[i]) for i, t in enumerate(self.terms)], dim=1)

    def refresh(self, model, x, y_t, m_t, state, step):
        for i, t in enumerate(self.terms):
            t.refresh(model, x, y_t, m_t[:, i:i + 1], state[i], step)
            state[i].pop("selection_loss", None)  # the ensemble selects on its per-step loss
