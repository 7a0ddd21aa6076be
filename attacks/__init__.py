"""Attack core: interpreters of IDLSes and the ADV2 / AdvEdge attacks against them. Pure PyTorch."""
from __future__ import annotations

from .interpreters import Interpreter, get_interpreter

__all__ = ["Interpreter", "get_interpreter"]
