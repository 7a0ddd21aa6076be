"""Interpretation loss terms ``l_int(g(x), m_t)`` of ADV2, one per interpreter family (ADV2 section 3).

A term turns an interpreter into a per-example loss that is differentiable w.r.t. the input. Terms that
differentiate a gradient again record the model under :func:`~attacks.constant_weights.constant_weights`
(same values and input derivatives, no wasted weight-gradient convolutions in the double backward):

- :class:`MapTerm` (CAM and any differentiable interpreter): ``mean((g(x) - m_t)^2)``;
- :class:`GradTerm` (GRAD): the same map computed with the smooth ReLU-derivative surrogate (section 3.2);
- :class:`MaskTerm` (MASK): the bilevel lookahead of Algorithm 1 with a running mask and periodic reset;
- :class:`EnsembleTerm`: the mean of several terms (the adaptive attack on a multi-interpreter defence).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .constant_weights import constant_weights
from .interpreters import CAMInterpreter, GradInterpreter, Interpreter, MaskInterpreter, get_interpreter
from .interpreters.surrogate import relu_surrogate
from .interpreters.base import to_input_size
from .optim import BatchAdam

__all__ = ["InterpretationTerm", "MapTerm", "CAMTerm", "GradTerm", "MaskTerm", "EnsembleTerm", "make_term", "map_mse"]


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
        """Per-example interpretation loss, differentiable w.r.t. ``x``."""
        return self.loss_and_logits(model, x, y_t, m_t, state)[0]

    def loss_and_logits(self, model: nn.Module, x: Tensor, y_t: Tensor, m_t: Tensor,
                        state: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """The loss and, when the term's forward pass already produced them, the exact logits of ``x``
        (so the engine does not run the classifier twice). Terms override one of the two methods."""
        if type(self).loss is InterpretationTerm.loss:
            raise NotImplementedError(f"{type(self).__name__} must implement loss() or loss_and_logits()")
        return self.loss(model, x, y_t, m_t, state), None

    #: True when the term scores iterates itself (``state["selection_loss"]`` set in :meth:`refresh`) because
    #: its per-step loss is only an estimate of the measured map distance (MASK).
    selects_on_refresh: bool = False

    def refresh(self, model: nn.Module, x: Tensor, y_t: Tensor, m_t: Tensor, state: dict[str, Any],
                step: int | None) -> None:
        """Hook after an input update (MASK moves its running mask here); ``step=None`` after the last step."""


class MapTerm(InterpretationTerm):
    """``l_int = mean((g(x) - m_t)^2)`` for a differentiable interpreter (RTS, or any other)."""

    def loss(self, model, x, y_t, m_t, state):
        with constant_weights():
            return map_mse(self.interpreter.map(model, x, y_t, create_graph=True), m_t)


class CAMTerm(InterpretationTerm):
    """CAM term sharing the classifier's forward pass: features -> (logits, CAM of y_t) in one go."""

    def loss_and_logits(self, model, x, y_t, m_t, state):
        feats = model.forward_features(x)
        logits = model.head(model.pool(feats))
        cam = torch.einsum("nk,nkhw->nhw", model.head.weight[y_t], feats).unsqueeze(1)
        return map_mse(self.interpreter.normalise(to_input_size(cam, tuple(x.shape[-2:]))), m_t), logits


class GradTerm(InterpretationTerm):
    """GRAD term (ADV2 section 3.2) with one forward pass.

    Inside ``relu_surrogate(exact_first_order=True)`` the logits and the GRAD map are exact (so the prediction
    loss and the map match the true model) while the map's input gradient flows through the surrogate's
    curvature ``h'(z)``, the same second derivative as the paper's h. ``paper_map=True`` computes the map
    with h itself as the ReLU derivative instead (two forward passes per step).
    """

    def __init__(self, interpreter: GradInterpreter, tau: float = 1e-4, paper_map: bool = False) -> None:
        super().__init__(interpreter)
        self.tau, self.paper_map = tau, paper_map
        self.surrogate = interpreter.with_surrogate(tau)

    def loss_and_logits(self, model, x, y_t, m_t, state):
        if self.paper_map:
            with constant_weights():
                return map_mse(self.surrogate.map(model, x, y_t, create_graph=True), m_t), None
        with relu_surrogate(self.tau, exact_first_order=True), constant_weights():
            logits = model(x)
        scores = logits.softmax(1) if self.interpreter.score == "prob" else logits
        (g,) = torch.autograd.grad(scores.gather(1, y_t.view(-1, 1)).sum(), x, create_graph=True)
        m = self.interpreter.normalise(g.abs().amax(1, keepdim=True))
        return map_mse(m, m_t), logits


class MaskTerm(InterpretationTerm):
    """ADV2 against MASK (Algorithm 1, section 3.6).

    Each step first moves the running mask ``inner_steps`` Adam steps on ``l_map(m; x)``; the loss then
    unrolls ``lookahead_steps`` differentiable gradient steps of size ``lookahead_lr`` (the follower's next
    moves, with ``create_graph``) and averages the interpretation loss over the unrolled maps. Every
    ``reset_every`` steps the running mask is replaced by a fresh MASK solve of the current input.
    ``target_deletion_weight`` (an addition of this framework, 0 = the paper) adds the target-class
    probability of the input with the *target* map's region blurred out, which makes the target map a
    good MASK solution directly.
    """

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

    def loss(self, model, x, y_t, m_t, state):
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
            total = total + map_mse(1 - to_input_size(look, tuple(x.shape[-2:])), m_t)
        total = total / self.lookahead_steps
        if self.target_deletion_weight:
            # make the target map a good MASK solution: deleting the target region must remove the prediction
            keep = 1 - m_t
            probs = model(x * keep + blurred_x * m_t).softmax(1)
            total = total + self.target_deletion_weight * probs.gather(1, y_t.view(-1, 1)).squeeze(1)
        return total

    selects_on_refresh = True

    def refresh(self, model, x, y_t, m_t, state, step):
        """Periodic reset to a fresh MASK solve; that solve is the real map, so it also scores the iterate."""
        if step is None or (self.reset_every and (step + 1) % self.reset_every == 0):
            state["m"] = self.interpreter.solve(model, x.detach(), y_t, iterations=self.reset_iterations)
            state["adam"] = BatchAdam(state["m"], lr=self.interpreter.lr)
            state["selection_loss"] = map_mse(1 - to_input_size(state["m"], tuple(x.shape[-2:])), m_t)


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

    def loss_and_logits(self, model, x, y_t, m_t, state):
        losses, logits = [], None
        for i, t in enumerate(self.terms):
            l_i, lg = t.loss_and_logits(model, x, y_t, m_t[:, i:i + 1], state[i])
            losses.append(l_i)
            logits = lg if logits is None else logits
        return torch.stack(losses).mean(0), logits

    def refresh(self, model, x, y_t, m_t, state, step):
        for i, t in enumerate(self.terms):
            t.refresh(model, x, y_t, m_t[:, i:i + 1], state[i], step)
            state[i].pop("selection_loss", None)  # the ensemble selects on its per-step loss


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
    if isinstance(g, CAMInterpreter):
        return CAMTerm(g)
    attack_term = getattr(g, "attack_term", None)  # interpreters may bring their own (RTS: encoder term)
    if callable(attack_term):
        return attack_term()
    return MapTerm(g)
