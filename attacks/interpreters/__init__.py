"""Interpreters of an IDLS, all returning ``[N, 1, H, W]`` maps in [0, 1]: GRAD, CAM, MASK, RTS, SmoothGrad,
Integrated Gradients and Grad-CAM. Each registers itself in :data:`INTERPRETERS` where it is defined, and every
module of this package is imported here, so a new interpreter is one new module (and its test)."""
from __future__ import annotations

import importlib
import pkgutil

from .base import INTERPRETERS, Interpreter, get_interpreter, minmax, record_forward, resize_map, resolve_target
# importing registers: the order of the registry is grad, cam, mask, rts, then the others (ruff keeps this order: per-file-ignores I001)
from .grad import GradInterpreter, GradTerm
from .cam import CAMInterpreter, cam_and_logits, raw_cam
from .mask import MaskInterpreter, MaskTerm
from .rts import RTSInterpreter, RTSNetwork, RTSTerm
from .rts_objective import rts_objective
from .smoothgrad import SmoothGrad
from .integrated_gradients import IntegratedGradients
from .gradcam import GradCAM
from .surrogate import ReluModifier, relu_as_softplus, relu_surrogate

__all__ = [
    "Interpreter", "GradInterpreter", "CAMInterpreter", "MaskInterpreter", "RTSInterpreter", "RTSNetwork",
    "SmoothGrad", "IntegratedGradients", "GradCAM", "GradTerm", "MaskTerm", "RTSTerm", "rts_objective", "INTERPRETERS",
    "get_interpreter", "minmax", "resize_map", "resolve_target", "record_forward", "raw_cam", "cam_and_logits", "relu_surrogate", "relu_as_softplus",
    "ReluModifier",
]


for _module in pkgutil.iter_modules(__path__):  # a new interpreter module registers itself on import
    importlib.import_module(f"{__name__}.{_module.name}")
