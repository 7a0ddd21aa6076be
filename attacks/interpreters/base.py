"""The interpreter interface: ``g(model, x, target) -> maps [N, 1, H, W]`` in [0, 1] at input resolution."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_images, check_labels
from ..maps import minmax, resize_map
from ..registry import Registry
from ..terms import InterpretationTerm, MapTerm
from .surrogate import first_order_exact

__all__ = ["Interpreter", "INTERPRETERS", "get_interpreter", "minmax", "resize_map", "resolve_target", "record_forward"]

#: every interpreter, registered where it is defined (``@INTERPRETERS.register("name")``)
INTERPRETERS: Registry = Registry("interpreter")


_TAPE: ContextVar[list | None] = ContextVar("attacks_forward_tape", default=None)


def record_forward(x: Tensor, **outputs: Tensor | None) -> None:
    """Publish what an :meth:`Interpreter.explain` forward pass of ``x`` computed (``logits=``: the classifier's exact
    logits of ``x``; RTS adds ``enc_logits=``) to the attack term reading the map, so the term need not run the
    classifier again. Kept only while a term records (:meth:`Interpreter.recorded_map`), only for this very tensor
    ``x`` and only when no ReLU modifier changes the forward value or first derivative; a subclass whose ``explain``
    calls ``super().explain(model, x, ...)`` inherits it."""
    tape = _TAPE.get()
    if tape is not None and first_order_exact():
        tape.append((x, outputs))


@contextmanager
def _recording() -> Iterator[list]:
    token = _TAPE.set([])
    try:
        yield _TAPE.get()
    finally:
        _TAPE.reset(token)


def _recorded_for(tape: list, x: Tensor) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for xi, outputs in tape:
        if xi is x:
            out.update({k: v for k, v in outputs.items() if v is not None})
    return out


def resolve_target(model: nn.Module, x: Tensor, target: Tensor | int | None) -> Tensor:
    """Class to explain: the given labels, a single int for the whole batch, or the model's prediction."""
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    if isinstance(target, int):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    return target.to(x.device)


class Interpreter(ABC):
    """An interpreter g of an IDLS. The classifier is passed at call time; the caller's state is untouched.

    ONE hook defines the map: :meth:`explain` (raw maps at their native resolution, differentiable w.r.t. ``x`` when
    ``create_graph``). Everything reads it: :meth:`__call__` / :meth:`map` (validate, resample to the input grid with
    :func:`attacks.maps.resize_map`, :meth:`normalise` to [0, 1]), the measuring code, the detectors' map stacking,
    robust training (:meth:`explain_classes`) and every attack term built by default (:meth:`attack_term`: map MSE on
    :meth:`attack_map`, i.e. :meth:`explain` with ``create_graph`` under :meth:`attack_modifier`). A subclass that
    overrides :meth:`explain` (``super().explain(...) ** 2``) is explained, measured and attacked on its own map.

    Optional hooks: :meth:`normalise`; :meth:`attack_modifier` (a context around :meth:`explain` when an attack
    differentiates the map: gradient interpreters return :func:`~attacks.interpreters.surrogate.relu_surrogate` with
    exact first order, since a ReLU network's exact gradient map has a zero input gradient); :meth:`attack_term`
    only for an interpreter whose attack needs a dedicated term (MASK's bilevel term, RTS's encoder term). An :meth:`explain` that runs the
    classifier on ``x`` may :func:`record_forward` the logits so the attack shares that forward pass. Register with
    ``@INTERPRETERS.register("name")``.
    """

    name: str = "interpreter"
    #: False when the map is an optimisation result with no input gradient (MASK): attacks need a dedicated term.
    differentiable: bool = True
    #: True when the map is itself a gradient, so attacking it differentiates twice (recorded under constant_weights).
    second_order: bool = False
    #: ADV2 options tuned on the embedded default for this interpreter (``attacks.build_attack`` applies them).
    attack_defaults: dict = {}

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor | int | None = None, *,
                 create_graph: bool = False, raw: bool = False) -> Tensor:
        check_images(x)
        target = resolve_target(model, x, target)
        num_classes = getattr(model, "num_classes", None)
        if num_classes is not None:
            check_labels(target, num_classes, x.shape[0], name="target classes")
        out = (self.explain if raw else self.map)(model, x, target, create_graph=create_graph)
        return out if create_graph else out.detach()

    def map(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        """Unchecked fast path (no validation, no host sync): normalised maps on the input grid.

        Attack loops call this every step; ``__call__`` validates and then calls it.
        """
        return self.normalise(resize_map(self.explain(model, x, target, create_graph=create_graph),
                                         tuple(x.shape[-2:])))

    def normalise(self, m: Tensor) -> Tensor:
        """Map a raw map on the input grid to [0, 1] (per-example min-max by default)."""
        return minmax(m)

    def attack_modifier(self) -> AbstractContextManager:
        """The context an attack differentiates :meth:`explain` under (default: none). Gradient interpreters return
        ``relu_surrogate(tau, exact_first_order=True)``: the map and the logits stay exact (the attack is on the
        measured map) while its input gradient flows through the ReLUs' smooth curvature (non-zero on a ReLU net)."""
        return nullcontext()

    def recorded_map(self, model: nn.Module, x: Tensor, target: Tensor, *,
                     native: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The normalised map from :meth:`explain` with ``create_graph`` (on the input grid, or the interpreter's own
        with ``native``) and what its forward pass of ``x`` recorded (:func:`record_forward`; ``{}`` if nothing).
        Runs under the caller's modifiers only: attack terms call it inside the ones they need."""
        if not self.differentiable:
            raise ValueError(f"interpreter '{self.name}' has no input gradient (its map is an optimisation result); "
                             "gradient attacks on its map need a dedicated term (ADV2's bilevel MASK term)")
        with _recording() as tape:
            raw = self.explain(model, x, target, create_graph=True)
        return self.normalise(raw if native else resize_map(raw, tuple(x.shape[-2:]))), _recorded_for(tape, x)

    def attack_map_and_logits(self, model: nn.Module, x: Tensor, target: Tensor, *,
                              native: bool = False) -> tuple[Tensor, Tensor | None]:
        """The normalised map as an attack loss sees it (:meth:`recorded_map` under :meth:`attack_modifier`) and the
        exact logits of ``x`` when the map's forward pass recorded them, else ``None``. Unchecked fast path, like
        :meth:`map`; non-differentiable interpreters raise."""
        with self.attack_modifier():
            m, recorded = self.recorded_map(model, x, target, native=native)
        return m, recorded.get("logits")

    def attack_map(self, model: nn.Module, x: Tensor, target: Tensor, *, native: bool = False) -> Tensor:
        """:meth:`attack_map_and_logits` without the logits."""
        return self.attack_map_and_logits(model, x, target, native=native)[0]

    def explain_classes(self, model: nn.Module, x: Tensor, *,
                        create_graph: bool = False) -> tuple[Tensor, Tensor | None]:
        """Raw maps of every class ``[N, K, h, w]`` and, when the maps' pass computed them, the logits (else ``None``):
        what interpretation-robust training compares. Default: one :meth:`explain` per class."""
        k = getattr(model, "num_classes", None)
        if k is None:
            with torch.no_grad():
                k = model(x[:1]).shape[1]
        maps = [self.explain(model, x, torch.full((x.shape[0],), c, dtype=torch.long, device=x.device),
                             create_graph=create_graph) for c in range(k)]
        return torch.cat(maps, 1), None

    def attack_term(self, **options) -> InterpretationTerm:
        """The ADV2 term against this interpreter (default: map MSE on :meth:`attack_map`; no options)."""
        if options:
            raise ValueError(f"interpreter '{self.name}' takes no attack-term options, got {sorted(options)}")
        return MapTerm(self)

    @abstractmethod
    def explain(self, model: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool = False) -> Tensor:
        """THE map: raw (un-normalised) maps ``[N, 1, h, w]`` of classes ``target`` at the interpreter's resolution,
        differentiable w.r.t. ``x`` when ``create_graph`` (else they may be detached). Every reader of the map goes
        through it (see the class docstring)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def get_interpreter(name: str | Interpreter, **kwargs: Any) -> Interpreter:
    """Build an interpreter by (case-insensitive) name, or pass an instance through; unknown names list the choices."""
    if isinstance(name, Interpreter):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} given for an interpreter instance ({name!r}); pass a name")
        return name
    return INTERPRETERS.build(str(name).lower(), **kwargs)
