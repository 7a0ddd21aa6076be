"""Interpreters from config values: the attack core's registry plus checkpoint paths resolved on the defend side.

``attacks`` reads no checkpoint formats; a config that names an RTS checkpoint (``network: path``) is resolved
here with :func:`defend.aid.load_rts` (``weights_only``, metadata checked).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from attacks.interpreters import Interpreter, get_interpreter

from .aid import load_rts
from .defences import Defence, register_defence

__all__ = ["build_interpreter"]


def build_interpreter(name: str | Interpreter, **options: Any) -> Interpreter:
    """``get_interpreter(name, **options)``, with ``network`` given as a checkpoint path loaded for ``rts``."""
    if name == "rts" and isinstance(options.get("network"), (str, os.PathLike)):

        path = Path(options["network"])
        if not path.is_file():
            raise FileNotFoundError(f"interpreter 'rts': no RTS checkpoint at {path} (train one with "
                                    "`defend fit -c configs/aid/digits_rts.yaml`)")
        options = {**options, "network": load_rts(path)}
    return get_interpreter(name, **options)


# --------------------------------------------------------------------------------------------- the defence
def _swap(names: list[str], old: str, new: str) -> list[str]:
    return [new if n == old else n for n in names]


def _softplus_battery(battery: Any, options: Any) -> dict[str, Any]:
    """``grad_softplus`` (at the scorecard's ``beta``) wherever GRAD is attacked, measured or ensembled."""
    attacked = _swap(list(battery.attacks.interpreters), "grad", "grad_softplus")
    return {"attacks.interpreters": attacked if "grad_softplus" in attacked else attacked + ["grad_softplus"],
            "topk.interpreters": _swap(list(battery.topk.interpreters), "grad", "grad_softplus"),
            "adaptive.ensemble_interpreters": _swap(list(battery.adaptive.ensemble_interpreters), "grad",
                                                    "grad_softplus"),
            "interpreter_options.grad_softplus.beta": float(options["beta"])}


def _softplus_note(card: dict[str, Any], art: Any) -> list[str]:
    return [f"beta = {(card['battery'].get('interpreter_options') or {}).get('grad_softplus', {}).get('beta')}"]


register_defence(Defence(
    "beta_smoothing", "the normal classifier explained by GRAD of its softplus-smoothed copy (Dombrowski et al. "
    "NeurIPS 2019: ReLU -> softplus(beta z) / beta in the explanation only; interpreter grad_softplus) instead of GRAD: "
    "a training-free baseline. Its CAM line would repeat normal's.", interpreters=("grad_softplus",),
    battery=_softplus_battery, note=_softplus_note), __name__)
