"""Interpreters from config values: the attack core's registry plus checkpoint paths resolved on the defend side.

``attacks`` reads no checkpoint formats; a config that names an RTS checkpoint (``network: path``) is resolved
here with :func:`defend.aid.load_rts` (``weights_only``, metadata checked).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from attacks.interpreters import Interpreter, get_interpreter

__all__ = ["build_interpreter"]


def build_interpreter(name: str | Interpreter, **options: Any) -> Interpreter:
    """``get_interpreter(name, **options)``, with ``network`` given as a checkpoint path loaded for ``rts``."""
    if name == "rts" and isinstance(options.get("network"), (str, os.PathLike)):
        from .aid import load_rts

        path = Path(options["network"])
        if not path.is_file():
            raise FileNotFoundError(f"interpreter 'rts': no RTS checkpoint at {path} (train one with "
                                    "`defend fit -c configs/aid/digits_rts.yaml`)")
        options = {**options, "network": load_rts(path)}
    return get_interpreter(name, **options)
