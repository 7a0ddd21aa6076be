"""Attack frameworks / threat models: PGD (L-inf), C&W (L2, tanh space) and StAdv (flow), registered in
:data:`FRAMEWORKS` where they are defined."""
from __future__ import annotations

from typing import Any

from .base import FRAMEWORKS, ThreatModel, grid_levels, quantise, quantise_linf
# importing registers: the order of the registry is pgd, cw, stadv (ruff keeps this order: per-file-ignores I001)
from .pgd import PGD, pgd_maximise
from .cw import CW
from .stadv import StAdv, flow_loss, flow_warp

__all__ = ["ThreatModel", "PGD", "CW", "StAdv", "FRAMEWORKS", "get_framework", "threat_options", "foreign_options", "pgd_maximise", "quantise",
           "quantise_linf", "grid_levels", "flow_warp", "flow_loss"]


def get_framework(name: str | ThreatModel, **kwargs: Any) -> ThreatModel:
    """Build a framework by name (or pass an instance through); unknown names fail with the list of choices."""
    if isinstance(name, ThreatModel):
        return name
    return FRAMEWORKS.build(name, **kwargs)


def threat_options(framework: str | ThreatModel) -> dict[str, Any]:
    """The top-level attack options a framework declares (:attr:`ThreatModel.options`) with their defaults."""
    cls = type(framework) if isinstance(framework, ThreatModel) else FRAMEWORKS.get(framework)
    return dict(cls.options)


def foreign_options(framework: str | ThreatModel, keys: Any) -> dict[str, list[str]]:
    """Of ``keys``, those that other registered frameworks declare but ``framework`` does not -> their owners."""
    own = threat_options(framework)
    return {k: [n for n in FRAMEWORKS if k in FRAMEWORKS.get(n).options] for k in keys
            if k not in own and any(k in FRAMEWORKS.get(n).options for n in FRAMEWORKS)}
