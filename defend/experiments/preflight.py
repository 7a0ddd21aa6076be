"""Checks of an experiment config before anything runs or is written (``defend experiment`` calls :func:`preflight`).

Generic rules that hold in every experiment config:

* names: ``attacks`` / ``attack`` (a string), ``frameworks`` / ``framework`` / ``attack_framework``,
  ``interpreters`` / ``target_interpreters`` / ``interpreter``, ``arch`` and ``interpretation`` must be known;
* numbers: ``eps`` (also lists of radii) must be >= 0, step sizes and learning rates > 0, step / epoch / image
  counts non-negative integers, batch sizes positive;
* ``data``: the data module is built (unknown dataset, missing / empty / unreadable folder, bad options);
* ``classifier``: a checkpoint that will be reused must load safely and fit the data (class count, input size);
  a classifier that will be trained must build from ``arch`` and ``model_options``.

An experiment module may add its own ``validate(cfg, datamodule)`` (called by the runner after these).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from attacks import ATTACKS
from attacks.frameworks import FRAMEWORKS
from attacks.interpreters import INTERPRETERS

from ..data import BaseDataModule, build_datamodule
from ..models import ARCHITECTURES, build_classifier
from ..robust import INTERPRETATIONS
from ..robust_eval import INTERPRETATION_ATTACKS

__all__ = ["preflight", "check_values", "check_data", "check_classifier"]

_NAMES: dict[str, tuple[str, Any]] = {
    "attacks": ("attack", ATTACKS), "attack": ("attack", ATTACKS),
    "frameworks": ("framework", FRAMEWORKS), "framework": ("framework", FRAMEWORKS),
    "attack_framework": ("framework", FRAMEWORKS), "transfer_framework": ("framework", FRAMEWORKS),
    "interpreters": ("interpreter", INTERPRETERS), "target_interpreters": ("interpreter", INTERPRETERS),
    "interpreter": ("interpreter", INTERPRETERS),
    "arch": ("model", ARCHITECTURES),
    "interpretation": ("interpretation (interpretation-robust training)", INTERPRETATIONS),
}
_PATH_NAMES: dict[str, tuple[str, Any]] = {
    "evaluation.interpretation.attacks": ("interpretation attack", INTERPRETATION_ATTACKS),
}
_LISTS = {"attacks", "frameworks", "interpreters", "target_interpreters"}  # keys that hold a list of names
_NON_NEGATIVE = {"eps", "attack_eps", "epsilon"}
_POSITIVE = {"alpha", "attack_alpha", "inner_alpha", "lr", "aid_lr"}
_COUNTS = {"steps", "warm_steps", "attack_steps", "attack_warm_steps", "inner_steps", "max_epochs", "epochs",
           "n_images", "n_benign", "n_adversarial", "n_adaptive", "iterations"}
_SKIP = {"quick"}  # already merged (or not asked for)


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """``(dotted path, key, value)`` of every mapping entry, depth first (lists of mappings included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _SKIP and not path:
                continue
            p = f"{path}.{k}" if path else str(k)
            yield p, str(k), v
            yield from _walk(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _numbers(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_values(cfg: dict[str, Any]) -> None:
    """Names and numeric ranges anywhere in the config (see the module docstring)."""
    for path, key, value in _walk(cfg):
        names = _PATH_NAMES.get(path) or _NAMES.get(key)
        if names and key in _LISTS and not isinstance(value, list):
            raise ValueError(f"{path} must be a list of names, e.g. [{value}] (got {value!r})")
        if names and (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            what, known = names
            for name in _numbers(value):
                if name not in known:
                    raise ValueError(f"unknown {what} '{name}' in {path}; choose one of: {', '.join(known)}")
        if key in _NON_NEGATIVE | _POSITIVE | _COUNTS | {"batch_size"} and value is not None:
            for v in _numbers(value):
                if not _is_number(v):
                    raise ValueError(f"{path} must be a number, got {v!r}")
                if key in _NON_NEGATIVE and v < 0:
                    raise ValueError(f"negative epsilon: {path} = {v} (radii must be >= 0)")
                if key in _POSITIVE and v <= 0:
                    raise ValueError(f"{path} must be > 0, got {v}")
                if key in _COUNTS and (v < 0 or float(v) != int(v)):
                    raise ValueError(f"{path} must be a non-negative integer, got {v}")
                if key == "batch_size" and (v < 1 or float(v) != int(v)):
                    raise ValueError(f"{path} must be a positive integer, got {v}")


def check_data(cfg: dict[str, Any]) -> BaseDataModule:
    """Build (not set up) the data module of ``cfg['data']``; bad names, options and folders fail here."""
    opts = dict(cfg.get("data") or {"name": "digits"})
    name = opts.pop("name", "digits")
    try:
        return build_datamodule(name, **opts)
    except TypeError as exc:
        raise ValueError(f"data: {exc}") from None


def check_classifier(cfg: dict[str, Any], dm: BaseDataModule) -> None:
    """A classifier checkpoint that the experiment will reuse must load (``weights_only``), hold the classifier the
    ``classifier:`` section describes (``arch``, ``model_options``) and fit the data (the same check as
    :func:`defend.experiments.common.get_classifier`); one that will be trained must be buildable from ``arch``
    and ``model_options``."""
    ccfg = cfg.get("classifier")
    if not isinstance(ccfg, dict):
        return
    ckpt = ccfg.get("checkpoint")
    if ckpt and Path(ckpt).is_file() and not ccfg.get("retrain", False):
        from ..classifier import load_reused_classifier

        load_reused_classifier(ckpt, ccfg, num_classes=dm.num_classes, input_size=dm.image_shape[-1])
        return
    options = {k: v for k, v in (ccfg.get("model_options") or {}).items() if k != "pretrained"}
    try:
        with torch.random.fork_rng(devices=[]):
            build_classifier(ccfg.get("arch", "small_cnn"), dm.num_classes, **options)
    except TypeError as exc:
        raise ValueError(f"classifier.model_options: {exc}") from None


def preflight(cfg: dict[str, Any]) -> BaseDataModule:
    """Run every generic check; returns the data module built for them (not set up)."""
    check_values(cfg)
    dm = check_data(cfg)
    check_classifier(cfg, dm)
    return dm
