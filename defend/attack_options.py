"""Options of a named attack in layers: :class:`AttackOptions` (one layer: the keys of :func:`attacks.build_attack`
it sets), :func:`layered_options` (later layers win) and :class:`AttackSections` (the ``attack`` / ``per_framework``
/ ``per_interpreter`` / ``per_interpreter_framework`` / ``interpreter_options`` sections of a config).

Shared by ``defend experiment`` and ``defend evaluate`` (a battery's attack options); radii and step sizes in image
units ([0, 1]), ``8/255`` accepted and exact.

The annotations here are evaluated when the classes are made (no ``from __future__ import annotations``): an
experiment config inherits :class:`AttackSections` as its second base, and jsonargparse resolves postponed
annotations only in the modules of a dataclass's first-base chain, where ``AttackOptions`` is not defined.
"""
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from attacks import FRAMEWORKS, INTERPRETERS, get_framework, uses_interpreter
from attacks.frameworks import foreign_options

from .typed_config import check_names
from .types import Count, Fraction01, NonNegative, Radius, StepSize

__all__ = ["AttackOptions", "layered_options", "AttackSections"]


@dataclass
class AttackOptions:
    """Options of a named attack (:func:`attacks.build_attack`); unset (``None``) keys fall through to the next layer
    and finally to the attack's tuned defaults. Radii and steps in image units (``8/255`` accepted)."""

    eps: Radius | None = None
    alpha: StepSize | None = None
    random_start: bool | None = None
    warm_steps: Count | None = None
    steps: Count | None = None
    c: NonNegative | None = None
    c_end: NonNegative | None = None
    confidence: Fraction01 | None = None
    edge_threshold: Fraction01 | None = None
    edge_stages: str | None = None
    term_options: dict[str, dict[str, Any]] | None = None
    framework_options: dict[str, Any] | None = None
    mask_search_steps: Count | None = None
    mask_alpha_max: StepSize | None = None
    autocast: str | None = None

    def set_options(self) -> dict[str, Any]:
        """The keys this layer sets."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def layered_options(framework: str, *layers: AttackOptions | None) -> dict[str, Any]:
    """Merge attack-option layers left to right (later layers win; ``framework_options`` merge key by key). The
    top-level options a framework declares (:attr:`attacks.ThreatModel.options`: PGD's radius / step / random start)
    apply to the frameworks that declare them only."""
    out: dict[str, Any] = {}
    fw: dict[str, Any] = {}
    for layer in layers:
        opts = layer.set_options() if layer is not None else {}
        fw.update(opts.pop("framework_options", None) or {})
        out.update(opts)
    foreign = foreign_options(framework, out)
    out = {k: v for k, v in out.items() if k not in foreign}
    if fw:
        out["framework_options"] = fw
    return out


@dataclass
class AttackSections:
    """The attack sections of the experiments that run the attack core: shared ``attack`` options, overridden by
    ``per_framework.<fw>``, ``per_interpreter.<name>`` and ``per_interpreter_framework.<name>_<fw>`` (in that order;
    the interpreter layers apply to attacks with an interpretation term), and ``interpreter_options.<name>`` (the
    measuring and attacked interpreters' constructor options)."""

    interpreter_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack: AttackOptions = field(default_factory=AttackOptions)
    per_interpreter: dict[str, AttackOptions] = field(default_factory=dict)
    per_framework: dict[str, AttackOptions] = field(default_factory=dict)
    per_interpreter_framework: dict[str, AttackOptions] = field(default_factory=dict)

    def attack_options(self, attack: str, framework: str, interpreter: str | None) -> dict[str, Any]:
        """The :func:`attacks.build_attack` keywords of one attack x framework x target interpreter (over the
        experiment's budget preset, :meth:`preset_layer`, where it names one)."""
        layers = [self.preset_layer(interpreter), self.attack, self.per_framework.get(framework)]
        if uses_interpreter(attack) and interpreter is not None:
            layers += [self.per_interpreter.get(interpreter),
                       self.per_interpreter_framework.get(f"{interpreter}_{framework}")]
        return {**layered_options(framework, *layers), "interpreter_options": self.interpreter_options}

    def preset_layer(self, interpreter: str | None) -> AttackOptions | None:
        """The budget preset under these sections for attacks on ``interpreter`` (none here; an experiment with an
        ``attack_preset`` key returns :func:`defend.presets.preset_options`' layer)."""
        return None

    def check_attack_sections(self) -> None:
        """Every name in the sections exists (interpreters, frameworks) and every option builds."""
        for section, known in (("interpreter_options", INTERPRETERS), ("per_interpreter", INTERPRETERS),
                               ("per_framework", FRAMEWORKS)):
            for name in getattr(self, section):
                check_names([name], known, section)
        for name, opts in self.interpreter_options.items():
            if name != "rts":  # RTS needs its trained network (checked where it is loaded)
                _build(lambda: INTERPRETERS.build(name, **opts), f"interpreter_options.{name}")
        for fw in FRAMEWORKS:
            fw_opts = layered_options(fw, self.attack, self.per_framework.get(fw)).get("framework_options", {})
            _build(lambda: get_framework(fw, **fw_opts), f"framework_options of '{fw}'")


def _build(make: Callable[[], Any], where: str) -> Any:
    try:
        return make()
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None
