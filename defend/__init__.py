"""Lightning side of the framework: data, model zoo, defence modules, evaluation, metrics and the CLI."""
from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
