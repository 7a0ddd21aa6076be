"""The ``defend`` command line.

- ``defend fit|validate|test|predict -c configs/<x>.yaml``: LightningCLI over any defence module + data module;
- ``defend experiment -c configs/experiments/<name>.yaml [-c configs/trainer/<preset>.yaml] --out DIR``:
  run a table end to end (metrics.json, report.md, figures).
"""
from __future__ import annotations

import sys
from typing import Sequence

__all__ = ["main"]

HELP = """usage: defend {fit,validate,test,predict,experiment} [options]

Defence training for interpretable deep learning systems (IDLS = classifier + interpreter).

commands:
  fit         train a LightningModule (classifier, RTS / AID, robust classifier, detector) from YAML:
              defend fit -c configs/classifier/digits.yaml [--trainer.max_epochs=5] [--print_config]
  validate    evaluate a module on the validation split   (same options as fit)
  test        evaluate a module on the test split         (same options as fit)
  predict     run predict_step over the predict split     (same options as fit)
  experiment  reproduce a table end to end:
              defend experiment -c configs/experiments/classifier.yaml --out runs/classifier [--quick]

Run `defend <command> --help` for every option of a command.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] == "experiment":
        from .experiments.runner import main as run_experiment

        return run_experiment(argv[1:])
    if argv[0] not in ("fit", "validate", "test", "predict"):
        print(f"defend: unknown command '{argv[0]}'\n\n{HELP}", file=sys.stderr)
        return 2
    from .lightning_cli import run_lightning_cli

    try:
        run_lightning_cli(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"defend {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
