"""Attack frameworks / threat models: PGD (L-inf), C&W (L2, tanh space) and StAdv (flow), registered in
:data:`FRAMEWORKS` where they are defined."""
from __future__ import annotations

from typing import Any

from .base import FRAMEWORKS, ThreatModel, grid_levels, quantise, quantise_linf
from .pgd import PGD, pgd_maximise  # noqa: I001 - registration order: pgd, cw, stadv
from .cw import CW
from .stadv import StAdv, flow_loss, flow_warp

__all__ = ["ThreatModel", "PGD", "CW", "StAdv", "FRAMEWORKS", "get_framework", "pgd_maximise", "quantise",
           "quantise_linf", "grid_levels", "flow_warp", "flow_loss"]


def get_framework(name: str | ThreatModel, **kwargs: Any) -> ThreatModel:
    """Build a framework by name (or pass an instance through); unknown names fail with the list of choices."""
    if isinstance(name, ThreatModel):
        return name
    return FRAMEWORKS.build(name, **kwargs)
