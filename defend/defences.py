"""The defences of this project as registered objects (``DEFENCES``), each registered where it is defined.

A :class:`Defence` says what a defended system is made of and how the project measures it: what it trains (the
training family ``trains`` and its module options ``module``), the artifact it loads (:class:`ArtifactKind`: a
classifier, an RTS network, a detector folder; ``None`` when it reuses the plain classifier), the interpreters whose
maps its lines report, the adaptive attacks that apply to it, the model-card sections it fills, what it changes in
an evaluation battery and its scorecard description. The scorecard (:mod:`defend.experiments.scorecard`) and the
other consumers ask the registered object and never branch on a defence's name; a new defence is one
``DEFENCES.register`` next to its code (plus its training family, when it brings a new one).

:func:`load_defences` imports the modules that define the defences (so the registry is complete).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from attacks.registry import Registry

__all__ = ["Defence", "ArtifactKind", "DEFENCES", "load_defences", "defence_names", "defence", "register_defence", "CLASSIFIER", "RTS_NETWORK"]

#: where a defence's artifact plugs into ``defend evaluate`` (its ``classifier`` / ``--rts`` / ``--detector``)
Role = Literal["classifier", "rts", "detector"]
#: the sections of a model card (``card.json``'s ``results``)
Section = Literal["clean_accuracy", "autoattack", "topk", "attacks", "detection"]


@dataclass(frozen=True)
class ArtifactKind:
    """A kind of trained artifact: its ``role`` in an evaluated system, ``files(path)`` (every file its save may write,
    from the code that writes them), whether the artifact at ``path`` is there, and its file name for a defence."""

    role: Role
    folder: bool = False
    files_of: Callable[[Path], list[Path]] | None = None

    def path(self, directory: Path, name: str) -> Path:
        """Where the artifact of defence ``name`` is written under ``directory``."""
        return directory / (name if self.folder else f"{name}.pt")

    def files(self, path: Path) -> list[Path]:
        """Every file a save at ``path`` may write (the first is the one that marks it complete)."""
        return self.files_of(path) if self.files_of is not None else [path]

    def present(self, path: Path) -> bool:
        return self.files(path)[0].is_file()


#: a classifier artifact (:func:`defend.classifier.save_classifier`)
CLASSIFIER = ArtifactKind("classifier")
#: an RTS network artifact (:func:`defend.aid.save_rts`)
RTS_NETWORK = ArtifactKind("rts")


def _no_change(battery: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Defence:
    """One defence (module docstring).

    Args:
        name: its registered name (a scorecard row, a ``reuse:`` key).
        description: what it is, for reports (``{split}``: the detector's training split).
        trains: the training family that makes its artifact (the scorecard section of that name: ``robust``, ``aid``,
            ``detector``), ``None`` when it trains nothing.
        module: the options of that training (e.g. ``{"mode": "trades"}``; for ``aid``: ``{"plan": "rts"}``).
        artifact: the kind of artifact it loads, ``None`` when the system is the plain classifier.
        interpreters: the interpreters whose maps its lines report; ``None``: those the battery attacks.
        adaptive: the adaptive attacks that apply to it (``defend evaluate``'s names).
        sections: the card sections it fills.
        battery: ``(battery, options) -> dotted overrides`` it lays over the battery (``options``: the scorecard's
            ``beta``, ``detector_interpreters``, ``detector_product``).
        note: ``(card, artifact info) -> notes`` for its report line.
    """

    name: str
    description: str
    trains: str | None = None
    module: Mapping[str, Any] = field(default_factory=dict)
    artifact: ArtifactKind | None = None
    interpreters: tuple[str, ...] | None = None
    adaptive: tuple[str, ...] = ("adv2_ensemble",)
    sections: tuple[Section, ...] = ("clean_accuracy", "autoattack", "topk", "attacks")
    battery: Callable[[Any, Mapping[str, Any]], dict[str, Any]] = _no_change
    note: Callable[[dict[str, Any], Mapping[str, Any] | None], list[str]] | None = None

    @property
    def role(self) -> Role:
        """Where its artifact plugs into ``defend evaluate`` (the plain classifier's place when it has none)."""
        return self.artifact.role if self.artifact is not None else "classifier"

    @property
    def detects(self) -> bool:
        """Whether it is scored by detection (its card's ``detection`` section) rather than by the maps."""
        return "detection" in self.sections


#: every defence, by name, in the scorecard's row order (``@register_defence`` / ``DEFENCES.register`` where defined)
DEFENCES: Registry = Registry("defence")
#: the modules that register defences, in row order
_DEFINED_IN = ("defend.robust", "defend.interpreters", "defend.aid", "defend.detector")


_WHERE: dict[str, str] = {}


def register_defence(defence: Defence, where: str) -> Defence:
    """Add ``defence`` to :data:`DEFENCES` (its factory returns it), defined in module ``where`` (one of
    ``_DEFINED_IN``: it places the defence's row); returns it."""
    if where not in _DEFINED_IN:
        raise ValueError(f"defence {defence.name}: module {where} is not listed in defend.defences._DEFINED_IN")
    DEFENCES.register(defence.name)(lambda: defence)
    _WHERE[defence.name] = where
    return defence


def load_defences() -> Registry:
    """:data:`DEFENCES`, complete: imports every module that registers one."""
    for module in _DEFINED_IN:
        importlib.import_module(module)
    return DEFENCES


def defence_names() -> list[str]:
    """Every defence's name in row order: by defining module (``_DEFINED_IN``), then as registered there (the same
    order whichever module was imported first)."""
    names = load_defences().names()
    return sorted(names, key=lambda n: (_DEFINED_IN.index(_WHERE[n]), names.index(n)))


def defence(name: str) -> Defence:
    """The registered defence ``name`` (an unknown name fails with the choices)."""
    return load_defences().build(name)
