"""Named attacks (:data:`ATTACKS`) with the options the configs use and the values tuned on the embedded default.

``build_attack("adv2", "pgd", "cam", eps=8 / 255)`` is the same attack as the ``attacks`` experiment's row: shared
defaults (:data:`DEFAULTS`), then the interpreter's own tuned values (``Interpreter.attack_defaults``: its ``c``, its
joint steps, its term options), then the caller's options. The options a framework declares
(:attr:`attacks.ThreatModel.options`: PGD's ``eps`` / ``alpha`` / ``random_start``) may be given at the top level and go
to it; every other framework option goes in ``framework_options``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .adv2 import ADV2
from .frameworks import PGD, foreign_options, threat_options
from .interpreters import INTERPRETERS, Interpreter
from .registry import Registry

__all__ = ["ATTACKS", "build_attack", "DEFAULTS", "PGD_DEFAULTS", "uses_interpreter", "interpretation_attacks"]

#: every named attack, registered where it is defined
ATTACKS: Registry = Registry("attack")

#: shared ADV2 options of the embedded default (ADV2 Appendix B scaled to 32 px / CPU; configs/experiments/attacks.yaml)
DEFAULTS: dict[str, Any] = {"warm_steps": 60, "steps": 80, "confidence": 0.0, "edge_threshold": 0.02}
#: PGD's top-level defaults (declared by the framework: :attr:`attacks.PGD.options`)
PGD_DEFAULTS: dict[str, Any] = PGD.options
_JOINT_ONLY = ("edge", "edge_threshold", "edge_stages", "c", "c_end", "term_options", "steps", "smoothing",
               "mask_search_steps", "mask_alpha_max")


def _interpreter_defaults(interpreter: Any) -> dict[str, Any]:
    """The tuned ADV2 options of one interpreter (none for an ensemble); ``term_options`` keyed by its name."""
    if interpreter is None or isinstance(interpreter, (list, tuple)):
        return {}
    cls = type(interpreter) if isinstance(interpreter, Interpreter) else INTERPRETERS.get(str(interpreter).lower())
    out = {k: v for k, v in cls.attack_defaults.items() if k != "term_options"}
    if "term_options" in cls.attack_defaults:
        out["term_options"] = {cls.name: dict(cls.attack_defaults["term_options"])}
    return out


def _options(framework: Any, interpreter: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Defaults, the interpreter's tuned values, then ``options``; the top-level options the framework declares
    (:attr:`attacks.ThreatModel.options`, with their defaults) go to it, another framework's are refused."""
    own = threat_options(framework)
    foreign = foreign_options(framework, options)
    if foreign:
        owners = sorted({n.upper() for names in foreign.values() for n in names})
        raise ValueError(f"{sorted(foreign)} are {'/'.join(owners)} options; framework '{framework}' takes "
                         "framework_options")
    given_fw = {k: options.pop(k) for k in own if k in options}
    merged = {**DEFAULTS, **_interpreter_defaults(interpreter), **options}
    fw_opts = dict(merged.pop("framework_options", None) or {})
    merged["framework_options"] = {**own, **given_fw, **fw_opts}
    return merged


def uses_interpreter(name: str) -> bool:
    """Whether the named attack has an interpretation term (the plain attack has none)."""
    return bool(getattr(ATTACKS.get(name), "uses_interpreter", True))


def interpretation_attacks() -> list[str]:
    """The registered attacks a battery may run against any interpreter: an interpretation term, and no knowledge of
    a particular defence (an adaptive attack marks its factory ``adaptive = True``; the battery adds those itself)."""
    return [n for n in ATTACKS if uses_interpreter(n) and not getattr(ATTACKS.get(n), "adaptive", False)]


def build_attack(name: str, framework: str = "pgd", interpreter: str | Interpreter | Sequence | None = "cam",
                 **options: Any) -> ADV2:
    """``pgd`` (the plain attack in any framework), ``adv2``, ``advedge`` or ``advedge_plus`` by name (see the module
    docstring for how options are filled in)."""
    return ATTACKS.get(name)(framework, interpreter, **options)


@ATTACKS.register("pgd")
def plain(framework: str = "pgd", interpreter: Any = None, **options: Any) -> ADV2:
    """The plain targeted attack on the classifier alone (ADV2's warm start; no interpretation term)."""
    opts = _options(framework, None, options)
    opts = {k: v for k, v in opts.items() if k not in _JOINT_ONLY}
    return ADV2(None, framework, **opts, steps=0)


plain.uses_interpreter = False  # type: ignore[attr-defined]


@ATTACKS.register("adv2")
def adv2(framework: str = "pgd", interpreter: Any = "cam", **options: Any) -> ADV2:
    """ADV2 (Zhang et al. 2020): warm start, then the joint prediction + interpretation loss."""
    return ADV2(interpreter, framework, **_options(framework, interpreter, options))


@ATTACKS.register("advedge")
def advedge(framework: str = "pgd", interpreter: Any = "cam", **options: Any) -> ADV2:
    """AdvEdge: ADV2 with every step / perturbation / flow weighted by the benign image's Sobel edges."""
    return ADV2(interpreter, framework, **{**_options(framework, interpreter, options), "edge": "soft"})


@ATTACKS.register("advedge_plus")
def advedge_plus(framework: str = "pgd", interpreter: Any = "cam", **options: Any) -> ADV2:
    """AdvEdge+: ADV2 restricted to the edge pixels ``E(x) > edge_threshold``."""
    return ADV2(interpreter, framework, **{**_options(framework, interpreter, options), "edge": "binary"})
