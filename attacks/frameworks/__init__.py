"""Attack frameworks / threat models: PGD (L-inf), C&W (L2, tanh space) and StAdv (flow), registered in
:data:`FRAMEWORKS` where they are defined."""
from __future__ import annotations

from typing import Any

from .base import FRAMEWORKS, ThreatModel, grid_levels, quantise, quantise_linf
# importing registers: the order of the registry is pgd, cw, stadv (ruff keeps this order: per-file-ignores I001)
from .pgd import PGD, pgd_maximise
from .cw import CW
from .stadv import StAdv, flow_loss, flow_warp

__all__ = ["ThreatModel", "PGD", "CW", "StAdv", "FRAMEWORKS", "get_framework", "pgd_maximise", "quantise",
           "quantise_linf", "grid_levels", "flow_warp", "flow_loss"]


def get_framework(name: str | ThreatModel, **kwargs: Any) -> ThreatModel:
    """Build a framework by name (or pass an instance through); unknown names fail with the list of choices."""
    if isinstance(name, ThreatModel):
        return name
    return FRAMEWORKS.build(name, **kwargs)
