"""Attack frameworks / threat models: PGD (L-inf), C&W (L2, tanh space) and StAdv (flow)."""
from __future__ import annotations

from typing import Any

from .base import ThreatModel, grid_levels, quantise, quantise_linf
from .cw import CW
from .pgd import PGD, pgd_maximise
from .stadv import StAdv, flow_loss, flow_warp

__all__ = ["ThreatModel", "PGD", "CW", "StAdv", "FRAMEWORKS", "get_framework", "pgd_maximise", "quantise", "quantise_linf", "grid_levels",
           "flow_warp", "flow_loss"]

FRAMEWORKS = {"pgd": PGD, "cw": CW, "stadv": StAdv}


def get_framework(name: str | ThreatModel, **kwargs: Any) -> ThreatModel:
    """Build a framework by name; unknown names fail with the list of choices."""
    if isinstance(name, ThreatModel):
        return name
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework '{name}'; choose one of: {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[name](**kwargs)
