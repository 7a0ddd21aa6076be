"""``make demo``: quick versions of every embedded-default experiment, printing their headline tables.

Each experiment trains what it needs (the classifier once, shared through ``checkpoints/``) and writes its
``metrics.json``, ``report.md`` and figures under ``--out``/<name>.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .errors import quiet_lightning
from .experiments.config import EXPERIMENTS
from .experiments.runner import load_experiments
from .experiments.runner import main as run_experiment

__all__ = ["main", "DEMO_EXPERIMENTS", "demo_commands"]

#: embedded experiments in the order they build on each other
DEMO_EXPERIMENTS = ["classifier", "attacks", "gap", "aid", "robust", "detector", "scorecard"]


def demo_commands(root: str | Path) -> dict[str, list[str]]:
    """``{experiment: the defend experiment arguments it runs with}`` (configs present and registered only); the
    demo prints each as it runs it."""
    load_experiments()
    commands = {}
    for name in DEMO_EXPERIMENTS:
        cfg = Path("configs/experiments") / f"{name}.yaml"
        if name in EXPERIMENTS and cfg.is_file():
            commands[name] = ["-c", str(cfg), "--out", str(Path(root) / name), "--quick", "--no-progress"]
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defend.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output root (default runs/demo)")
    args = parser.parse_args(argv)
    quiet_lightning()
    start = time.perf_counter()
    for name, command in demo_commands(args.out).items():
        print(f"\n=== {name}: {shlex.join(['defend', 'experiment', *command])}", flush=True)
        code = run_experiment(command)
        if code:
            return code
        print((Path(args.out) / name / "report.md").read_text())
    print(f"[defend] demo finished in {time.perf_counter() - start:.0f}s; reports under {args.out}/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
