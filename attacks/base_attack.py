"""The one contract of every attack (after torchattacks): ``attack(model, x, y) -> result``, where ``result.x_adv``
are images on the uint8 grid inside the attack's constraint and ``result.success`` says per input whether the attack
reached its goal, and ``attack.budget``: the plain dict the attack describes itself with (framework, eps, steps,
restarts, ...; what a card records).

``goal`` says what ``success`` means, so a caller can recompute it from the model's logits on ``x_adv``:
``"reach"``: the prediction is ``y`` (targeted attacks: ``y`` is the target class; the interpretation attacks that
keep the prediction: ``y`` is the class kept); ``"leave"``: the prediction is not ``y`` (untargeted: ``y`` the label).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from .registry import Registry

__all__ = ["Attack", "AttackResult", "Result", "BALL_ATTACKS", "goal_reached", "linf_within", "unit_box", "prob_of"]

#: attacks with a fixed L-inf ball and no framework or warm / joint schedule (the interpretation attacks that keep the
#: prediction, AutoAttack): ``factory(eps, interpreter=None, **options) -> Attack``. A second registry beside
#: :data:`attacks.ATTACKS` because the call differs: ``ATTACKS`` factories take ``(framework, interpreter, **ADV2
#: options)`` and every one of them accepts the shared schedule options (``warm_steps``, ``steps``, ``c``, ...).
BALL_ATTACKS: Registry = Registry("ball attack")


class Result(Protocol):
    """What every attack returns: adversarial images and per-input success."""

    x_adv: Tensor
    success: Tensor


@dataclass
class AttackResult:
    """Best (uint8-quantised) adversarial inputs and what the classifier says about them."""

    x_adv: Tensor
    target: Tensor
    success: Tensor
    target_prob: Tensor
    int_loss: Tensor | None
    seconds: float
    steps: int


def goal_reached(logits: Tensor, y: Tensor, goal: str, confidence: float = 0.0) -> Tensor:
    """Per-input success for ``goal`` (module docstring) from the model's logits on the adversarial images; a
    ``"reach"`` goal with ``confidence`` also needs the softmax probability of ``y`` to reach it."""
    hit = logits.argmax(1) == y
    if goal != "reach":
        return ~hit
    return hit & (logits.float().softmax(1).gather(1, y.view(-1, 1)).squeeze(1) >= confidence)


class Attack(ABC):
    """An attack: ``attack(model, x, y)`` -> :class:`Result`, ``attack.budget`` -> plain dict (module docstring)."""

    #: what ``success`` means: ``"reach"`` (prediction == y) or ``"leave"`` (prediction != y)
    goal: ClassVar[str] = "reach"

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Result:
        """Attack ``x`` (images in [0, 1]) with ``y`` (target, kept class or label: see ``goal``)."""

    @property
    @abstractmethod
    def budget(self) -> dict[str, Any]:
        """The attack's own description: ``framework`` and its constraint (``eps`` for an L-inf ball), steps, ..."""

    def within(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Per input, whether ``x_adv`` satisfies the attack's constraint (default: its threat model's)."""
        return self.threat.within(x, x_adv)  # type: ignore[attr-defined]


def linf_within(x: Tensor, x_adv: Tensor, eps: float) -> Tensor:
    """Per input: ``|x_adv - x|_inf <= eps`` (to float tolerance) and inside [0, 1]."""
    d = (x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6
    return d & (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)


def unit_box(x_adv: Tensor) -> Tensor:
    """Per input: inside [0, 1] (the constraint of a threat model without a pixel ball)."""
    return (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)


def prob_of(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, softmax probability of y)`` of ``model`` on ``x`` (no gradient)."""
    with torch.no_grad():
        logits = model(x)
    return logits, logits.float().softmax(1).gather(1, y.view(-1, 1)).squeeze(1)
