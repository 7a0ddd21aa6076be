"""The interpreter interface: ``g(model, x, target) -> maps [N, 1, H, W]`` in [0, 1] at input resolution."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_images, check_labels
from ..registry import Registry
from ..terms import InterpretationTerm, MapTerm

__all__ = ["Interpreter", "INTERPRETERS", "get_interpreter", "minmax", "to_input_size", "resolve_target"]

#: every interpreter, registered where it is defined (``@INTERPRETERS.register("name")``)
INTERPRETERS: Registry = Registry("interpreter")


def minmax(m: Tensor, eps: float = 1e-12) -> Tensor:
    """Differentiable per-example min-max normalisation to [0, 1]; a constant map becomes zeros."""
    flat = m.flatten(1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(m)


def to_input_size(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resampling of ``[N, 1, h, w]`` maps to the input grid (identity if already there)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


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

    A new interpreter is one class: :meth:`explain` (raw maps at their native resolution, differentiable when
    ``create_graph``), optionally :meth:`normalise`, :meth:`attack_map` (a map with a useful input gradient) and
    :meth:`attack_term` (its ADV2 term; the default is map MSE on :meth:`attack_map`), registered with
    ``@INTERPRETERS.register("name")``. :meth:`__call__` validates, resamples to the input grid, normalises to
    [0, 1] and returns detached maps unless ``create_graph``.
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
        return self.normalise(to_input_size(self.explain(model, x, target, create_graph=create_graph),
                                            tuple(x.shape[-2:])))

    def normalise(self, m: Tensor) -> Tensor:
        """Map a raw map on the input grid to [0, 1] (per-example min-max by default)."""
        return minmax(m)

    def attack_map(self, model: nn.Module, x: Tensor, target: Tensor, *, native: bool = False) -> Tensor:
        """The normalised map as an attack loss sees it: differentiable w.r.t. ``x`` with a useful gradient
        (GRAD overrides it with the ReLU-derivative surrogate). ``native=True`` keeps the interpreter's own grid
        (CAM: the feature grid). Unchecked fast path, like :meth:`map`; non-differentiable interpreters raise."""
        raw = self.attack_explain(model, x, target)
        return self.normalise(raw if native else to_input_size(raw, tuple(x.shape[-2:])))

    def attack_explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """Raw maps with a useful input gradient (default: :meth:`explain` with ``create_graph``; GRAD-like
        interpreters go through the ReLU-derivative surrogate). Non-differentiable interpreters raise."""
        if not self.differentiable:
            raise ValueError(f"interpreter '{self.name}' has no input gradient (its map is an optimisation result); "
                             "gradient attacks on its map need a dedicated term (ADV2's bilevel MASK term)")
        return self.explain(model, x, target, create_graph=True)

    def attack_map_and_logits(self, model: nn.Module, x: Tensor, target: Tensor, *,
                              native: bool = False) -> tuple[Tensor, Tensor | None]:
        """:meth:`attack_map` and, where the map's forward pass already computed them, the exact logits of ``x``
        (CAM shares the classifier's pass), else ``None``."""
        return self.attack_map(model, x, target, native=native), None

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
        """Raw (un-normalised) maps ``[N, 1, h, w]`` for classes ``target``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def get_interpreter(name: str | Interpreter, **kwargs: Any) -> Interpreter:
    """Build an interpreter by (case-insensitive) name, or pass an instance through; unknown names list the choices."""
    if isinstance(name, Interpreter):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} given for an interpreter instance ({name!r}); pass a name")
        return name
    return INTERPRETERS.build(str(name).lower(), **kwargs)
