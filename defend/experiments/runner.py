"""``defend experiment``: load and merge YAML configs, dispatch to the experiment, write artifacts atomically."""
from __future__ import annotations

import argparse
import copy
import importlib
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


EPILOG = """experiments: {names}

examples:
  defend experiment -c configs/experiments/classifier.yaml --out runs/classifier
  defend experiment -c configs/experiments/attacks.yaml -c configs/trainer/cpu.yaml --out runs/attacks --quick
  defend experiment -c configs/experiments/attacks.yaml --out runs/a --set attack.eps=0.02 --set evaluation.n_images=8

The config is checked before anything runs (names of attacks / frameworks / interpreters / models, radii, step
counts, the data and a reused classifier checkpoint): an invalid config exits with status 2 and one error line,
and writes nothing into --out. Set DEFEND_DEBUG=1 to see full tracebacks.
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (``defend experiment: error: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="defend experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an experiment config end to end and write DIR/metrics.json, DIR/report.md and figures.",
        epilog=EPILOG.format(names=", ".join(EXPERIMENTS)))
    parser.add_argument("-c", "--config", action="append", required=True, metavar="FILE",
                        help="experiment YAML; repeat to compose, later files win (e.g. an experiment, then a trainer "
                             "preset from configs/trainer/)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory for metrics.json, report.md and figures (created; files are replaced "
                             "atomically; nothing is written when the config is invalid)")
    parser.add_argument("--quick", action="store_true",
                        help="apply the config's `quick:` section: fewer inputs, steps and epochs (a fast smoke run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path, after the files and --quick; the value is read "
                             "as YAML (e.g. --set attack.eps=0.02 --set evaluation.interpreters=[cam,grad]); "
                             "repeatable")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def main(argv: Sequence[str] | None = None) -> int:
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from ..errors import USER_ERRORS, debug_enabled, one_line
    from .preflight import preflight

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    out = Path(args.out)
    created = False
    try:
        cfg = load_config(args.config, args.set, args.quick)
        name = cfg.get("experiment")
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r} in {args.config}; choose one of: {', '.join(EXPERIMENTS)}")
        module = importlib.import_module(EXPERIMENTS[name])
        dm = preflight(cfg)
        validate = getattr(module, "validate", None)
        if callable(validate):
            validate(cfg, dm)
        cfg["output_dir"] = str(out)  # where rank 0 publishes (other ranks run in a scratch directory)
        start = time.perf_counter()
        if is_global_zero():
            created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            module.run(cfg, out, progress=not args.no_progress)
            print(f"[defend] experiment '{name}' finished in {time.perf_counter() - start:.1f}s -> {out}")
        else:  # DDP: the other ranks train / attack their shards; only rank 0 publishes into --out
            with tempfile.TemporaryDirectory(prefix="defend-rank-") as scratch:
                module.run(cfg, Path(scratch), progress=False)
    except BaseException as exc:
        if created and _is_empty_dir(out):  # a run that failed before writing anything leaves no directory
            out.rmdir()
        if not isinstance(exc, (*USER_ERRORS, MisconfigurationException)) or debug_enabled():
            raise
        print(f"defend experiment: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
