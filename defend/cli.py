"""The ``defend`` command line.

- ``defend fit|validate|test|predict -c configs/<x>.yaml``: LightningCLI over any defence module + data module;
- ``defend experiment -c configs/experiments/<name>.yaml [-c configs/trainer/<preset>.yaml] --out DIR``:
  run a table end to end (metrics.json, report.md, figures);
- ``defend evaluate --classifier PATH [--rts PATH] [--detector DIR] [--data SPEC] --out DIR``: measure a defended
  system and write its model card (card.json, report.md, tables, figures, adversarial sets);
- ``defend bench CARDS... --out DIR``: validate model cards and write the leaderboard (leaderboard.md / .csv, a
  static index.html, the robustness scatter);
- ``defend card upgrade CARD... --out DIR``: convert 1.x model cards to schema 2.0.

Errors a user can cause (bad config values, unusable data or checkpoints) print one line,
``defend <command>: error: <what is wrong>``, and exit with status 2.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main", "HELP"]

HELP = """usage: defend {fit,validate,test,predict,experiment,evaluate,bench,card} [options]

Defence training for interpretable deep learning systems (IDLS = classifier + interpreter).

commands:
  fit         train a LightningModule (classifier, RTS / AID, robust classifier) from YAML (LightningCLI):
                defend fit -c configs/classifier/digits.yaml [--trainer.max_epochs=5] [--print_config]
              -c FILE             YAML config (repeatable; later files and --KEY.PATH=VALUE overrides win)
              --model.*           the module: class_path + init_args (e.g. --model.init_args.lr=0.001)
              --data.*            the data module: class_path + init_args (e.g. --data.init_args.root=DIR)
              --trainer.*         pytorch_lightning.Trainer arguments (max_epochs, accelerator, devices, ...)
              --ckpt_path last    resume from the last checkpoint (last.ckpt) of the config's ModelCheckpoint;
                                  ends with the same weights as an uninterrupted run with the same seed
                                  (or --ckpt_path FILE; loaded with weights_only, and refused unless it was
                                  written for the configured model: nothing in it changes the config)
              --seed_everything N  seed of the run (every epoch is reseeded from it)
              --print_config      print the merged config and exit
              --import MODULE     let the config name classes of your own module (repeatable; also on experiment
                                  and evaluate): a config names only defend / attacks / torch(vision) / Lightning
                                  classes otherwise, and never makes defend import a module
  validate    evaluate a module on the validation split   (same options as fit; --ckpt_path PATH loads weights)
  test        evaluate a module on the test split         (same options as fit)
  predict     run predict_step over the predict split     (same options as fit)
  experiment  reproduce a table end to end, writing DIR/metrics.json, DIR/report.md and figures:
                defend experiment -c configs/experiments/classifier.yaml --out runs/classifier [--quick]
              -c FILE             experiment YAML (repeatable: e.g. an experiment, then configs/trainer/cpu.yaml)
              --out DIR           output directory; nothing is written there when the config is invalid
              --quick             apply the config's `quick:` section (small, fast run)
              --KEY.PATH=VALUE    override a config key by its dotted path, e.g. --attack.eps=0.02
              --no-progress       hide progress bars
  evaluate    measure a defended system and write its model card (card.json, report.md, CSV tables, figures,
              the adversarial sets it crafted):
                defend evaluate --classifier checkpoints/digits_small_cnn.pt --battery quick --out runs/card
              --classifier PATH   the classifier artifact          --rts PATH       an RTS interpreter artifact
              --detector DIR      a saved detector directory       --data SPEC      digits | folder:PATH | FILE.yaml
              --battery NAME|FILE quick, standard, paper or a YAML file
              --battery.KEY=VALUE  override a battery key by its dotted path, e.g. --battery.n_images=8
              --data.KEY=VALUE    set an argument of the data module (e.g. --data.resize=256)
              --inputs DIR        re-score on the adversarial sets of an earlier --out (no attack is run)
              --out DIR           output directory; nothing is written when an input is invalid (--overwrite)
              --name, --source, --defence  the leaderboard entry's name, its source and registered defence
  bench       validate model cards (files or folders of card.json) and write the IDLS-Bench leaderboard:
                defend bench runs/scorecard/cards --out runs/bench
              --protocol NAME|SHA the protocol of the main ranking (default bench-v1 where present)
              --sort COLUMN       the ranking column            --out DIR  (--overwrite)
  card        defend card upgrade CARD... --out DIR: 1.x cards to schema 2.0 (fields it cannot fill stay null)

Overrides, one rule for fit, experiment and evaluate: --KEY.PATH=VALUE after the config files sets the config
key KEY.PATH (its dotted path in the YAML); VALUE is YAML. See README.md, section Overrides.
Errors print one line (`defend <command>: error: ...`) and exit with status 2; DEFEND_DEBUG=1 shows tracebacks.
Run `defend <command> --help` for every option of a command.
"""


def _lightning_errors() -> tuple[type[BaseException], ...]:
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from .errors import USER_ERRORS

    return (*USER_ERRORS, MisconfigurationException)


def _card_command(argv: list[str]) -> int:
    """``defend card upgrade ...`` (the one ``card`` subcommand so far)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: defend card upgrade CARD... --out DIR [--overwrite]")
        return 0 if argv else 2
    if argv[0] != "upgrade":
        print(f"defend card: error: unknown subcommand '{argv[0]}' (the one subcommand is: upgrade)", file=sys.stderr)
        return 2
    from .evaluate.upgrade import main as run_upgrade

    return run_upgrade(argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .errors import quiet_lightning

    quiet_lightning()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] == "experiment":
        from .experiments.runner import main as run_experiment

        return run_experiment(argv[1:])
    if argv[0] == "evaluate":
        from .evaluate import main as run_evaluate

        return run_evaluate(argv[1:])
    if argv[0] == "bench":
        from .bench.cli import main as run_bench

        return run_bench(argv[1:])
    if argv[0] == "card":
        return _card_command(argv[1:])
    if argv[0] not in ("fit", "validate", "test", "predict"):
        print(f"defend: unknown command '{argv[0]}'\n\n{HELP}", file=sys.stderr)
        return 2
    from .errors import debug_enabled, one_line
    from .lightning_cli import run_lightning_cli

    try:
        run_lightning_cli(argv)
    except SystemExit as exc:  # --help / --print_config exit 0; Lightning exits 1 on Ctrl+C
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _lightning_errors() as exc:
        if debug_enabled():
            raise
        print(f"defend {argv[0]}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
