"""Interpreters of an IDLS: GRAD, CAM, MASK (and RTS), all returning ``[N, 1, H, W]`` maps in [0, 1]."""
from __future__ import annotations

from typing import Any, Callable

from .base import Interpreter, minmax, resolve_target, to_input_size
from .cam import CAMInterpreter, raw_cam
from .grad import GradInterpreter
from .mask import MaskInterpreter
from .rts import RTSInterpreter, RTSNetwork, rts_objective
from .surrogate import relu_surrogate

__all__ = [
    "Interpreter", "GradInterpreter", "CAMInterpreter", "MaskInterpreter", "RTSInterpreter", "RTSNetwork",
    "rts_objective", "INTERPRETERS",
    "get_interpreter", "register_interpreter", "minmax", "to_input_size", "resolve_target", "raw_cam",
    "relu_surrogate",
]

INTERPRETERS: dict[str, Callable[..., Interpreter]] = {
    "grad": GradInterpreter,
    "cam": CAMInterpreter,
    "mask": MaskInterpreter,
    "rts": RTSInterpreter,  # needs network=<trained RTSNetwork or checkpoint path>
}


def register_interpreter(name: str, factory: Callable[..., Interpreter]) -> None:
    """Make an interpreter available by name (RTS registers itself this way)."""
    INTERPRETERS[name] = factory


def get_interpreter(name: str | Interpreter, **kwargs: Any) -> Interpreter:
    """Build an interpreter by name; unknown names fail with the list of choices."""
    if isinstance(name, Interpreter):
        return name
    key = str(name).lower()
    if key not in INTERPRETERS:
        raise ValueError(f"unknown interpreter '{name}'; choose one of: {', '.join(sorted(INTERPRETERS))}")
    return INTERPRETERS[key](**kwargs)
