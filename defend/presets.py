"""Named ADV2-style attack budgets per interpreter: ``paper`` (the official ``alps-lab/adv2`` scripts) and ``cpu``
(the scaled-down budgets our CPU configs run), and :func:`preset_of`, which names the preset a budget matches.

``paper`` (ADV2, Zhang et al., USENIX Security 2020; ``expr_attacks_fixed/*_attack_acid*.py``): eps 0.031 and PGD
step 1/255 everywhere; CAM 400 PGD warm-start steps + 1,200 joint steps with the interpretation weight ``c``
ramped linearly 5 -> 10; RTS 300 + 1,000 (the same ramp); MASK 100 + 400 (its script weights the prediction loss
instead, on a log ramp, so our tuned MASK ``c`` is kept); GRAD and every other interpreter have no official script
and take CAM's budget. ``cpu``: eps 0.031, step 2/255, 60 warm-start steps and the attack core's tuned ``c`` /
joint steps per interpreter (``Interpreter.attack_defaults``; 80 / 60 / 40 joint steps for CAM / GRAD / MASK) -
what ``configs/experiments/attacks.yaml`` and the attack core run by default.

A budget's preset is read from the keys the attack's ``budget`` reports (:func:`preset_of`): the battery, the
experiments and the card label each ADV2-style row with it (``budget_preset``), so a row never passes a CPU budget
off as the paper's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from attacks import INTERPRETERS

__all__ = ["ATTACK_PRESETS", "PRESET_KEYS", "PRESETS", "preset_options", "preset_of"]

#: the budget keys a preset fixes (compared by :func:`preset_of`)
PRESET_KEYS = ("eps", "alpha", "warm_steps", "steps", "c", "c_end")
#: the named presets (``custom``: a budget matching none of them)
PRESETS = ("paper", "cpu")

_PAPER_CAM = {"eps": 0.031, "alpha": 1 / 255, "warm_steps": 400, "steps": 1200, "c": 5.0, "c_end": 10.0}
_PAPER: dict[str, dict[str, float]] = {
    "cam": _PAPER_CAM,
    "rts": {**_PAPER_CAM, "warm_steps": 300, "steps": 1000},
    "mask": {"eps": 0.031, "alpha": 1 / 255, "warm_steps": 100, "steps": 400, "c": 500.0, "c_end": 500.0},
}
_CPU_BASE = {"eps": 0.031, "alpha": 2 / 255, "warm_steps": 60, "steps": 80, "c": 1.0}


def _cpu(name: str) -> dict[str, float]:
    """The CPU budget of ``name``: the shared base and the interpreter's tuned ``c`` / joint steps, ``c`` constant."""
    tuned = {k: v for k, v in getattr(INTERPRETERS.get(name), "attack_defaults", {}).items() if k in PRESET_KEYS}
    out = {**_CPU_BASE, **tuned}
    return {**out, "c_end": out["c"]}


#: ``{preset: {interpreter: {eps, alpha, warm_steps, steps, c, c_end}}}`` for every registered interpreter
ATTACK_PRESETS: dict[str, dict[str, dict[str, float]]] = {
    "paper": {name: dict(_PAPER.get(name, _PAPER_CAM)) for name in INTERPRETERS},
    "cpu": {name: _cpu(name) for name in INTERPRETERS},
}


def preset_options(preset: str, interpreter: str) -> dict[str, float]:
    """The budget keys (:data:`PRESET_KEYS`) preset ``preset`` gives attacks on ``interpreter`` (an unregistered
    interpreter, e.g. an ensemble, takes CAM's). A bad preset name is a one-line ``ValueError``."""
    if preset not in ATTACK_PRESETS:
        raise ValueError(f"attack preset '{preset}' is unknown; use one of {', '.join(PRESETS)} (or null for none)")
    table = ATTACK_PRESETS[preset]
    return dict(table.get(str(interpreter).lower(), table["cam"]))


def preset_of(interpreter: str, budget: Mapping[str, Any]) -> str:
    """``"paper"``, ``"cpu"`` or ``"custom"``: the preset of :data:`ATTACK_PRESETS` whose budget for ``interpreter``
    ``budget`` matches on every key of :data:`PRESET_KEYS` (an attack's ``budget`` dict, or the options it was built
    with; ``c_end`` missing or ``None`` means a constant ``c``; numbers compared to 1e-6 relative, so ``8/255`` is
    not ``0.031``). A budget without an interpretation term (no ``c``: the plain PGD attack) is matched on its
    ``eps`` / ``alpha`` / ``warm_steps`` only; an ensemble label (``cam+grad``) on CAM's budget, the one the battery
    and the experiments give it. Other budget keys (``restarts``, ``framework``, ...) are not compared."""
    for name in PRESETS:
        if _matches(preset_options(name, interpreter), budget):
            return name
    return "custom"


def _matches(preset: Mapping[str, float], budget: Mapping[str, Any]) -> bool:
    """Whether ``budget`` has ``preset``'s value on every key it should carry (see :func:`preset_of`)."""
    joint = budget.get("c") is not None
    for key in PRESET_KEYS:
        if not joint and key in ("steps", "c", "c_end"):
            continue
        got = budget.get(key)
        if key == "c_end" and got is None:
            got = budget.get("c")
        if got is None or not isinstance(got, (int, float)) or isinstance(got, bool):
            return False
        if not math.isclose(float(got), float(preset[key]), rel_tol=1e-6):
            return False
    return True
