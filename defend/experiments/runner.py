"""``defend experiment``: load and merge YAML configs, dispatch to the experiment, write artifacts atomically."""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..distributed import is_global_zero

__all__ = ["main", "load_config", "deep_merge", "EXPERIMENTS"]

EXPERIMENTS = {
    "classifier": "defend.experiments.classifier",
    "attacks": "defend.experiments.attacks",
    "gap": "defend.experiments.gap",
    "robust": "defend.experiments.robust",
    "detector": "defend.experiments.detector",
    "aid": "defend.experiments.aid",
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _set_path(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def load_config(paths: Sequence[str], overrides: Sequence[str] = (), quick: bool = False) -> dict[str, Any]:
    """Merge config files left to right, then ``quick:`` overrides (if asked), then ``--set key=value``."""
    cfg: dict[str, Any] = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping at top level")
        cfg = deep_merge(cfg, data)
    if quick:
        cfg = deep_merge(cfg, cfg.get("quick", {}) or {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        _set_path(cfg, key, yaml.safe_load(value))
    cfg.pop("quick", None)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="defend experiment",
        description="Run an experiment config end to end and write DIR/metrics.json, DIR/report.md and figures.")
    parser.add_argument("-c", "--config", action="append", required=True,
                        help="YAML config; repeat to compose (e.g. an experiment then a trainer preset)")
    parser.add_argument("--out", required=True, help="output directory (created; existing files are replaced atomically)")
    parser.add_argument("--quick", action="store_true", help="apply the config's `quick:` section (small, fast run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path, e.g. --set attack.steps=50")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, args.quick)
        name = cfg.get("experiment")
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r} in {args.config}; choose one of: {', '.join(EXPERIMENTS)}")
        module = importlib.import_module(EXPERIMENTS[name])
        out = Path(args.out)
        cfg["output_dir"] = str(out)  # where rank 0 publishes (other ranks run in a scratch directory)
        start = time.perf_counter()
        if is_global_zero():
            out.mkdir(parents=True, exist_ok=True)
            module.run(cfg, out, progress=not args.no_progress)
            print(f"[defend] experiment '{name}' finished in {time.perf_counter() - start:.1f}s -> {out}")
        else:  # DDP: the other ranks train / attack their shards; only rank 0 publishes into --out
            with tempfile.TemporaryDirectory(prefix="defend-rank-") as scratch:
                module.run(cfg, Path(scratch), progress=False)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"defend experiment: error: {exc}", file=sys.stderr)
        return 2
    return 0
