"""``defend evaluate``: one command that measures a defended system and writes its model card."""
from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..class_paths import IMPORT_HELP, allow_imports, split_imports

__all__ = ["main", "EPILOG", "evaluate_command"]

EPILOG = """data (--data):
  digits (default)      the embedded digits, DigitsDataModule(seed=0)
  folder:PATH | PATH    an image folder root/<class>/<images> at the classifier's input size, split as
                        configs/finetune/*.yaml do (val/test fraction 0.15, seed 0); change an option with
                        --data.KEY=VALUE (e.g. --data.resize=256)
  cifar10:PATH          CIFAR-10 in its on-disk format
  FILE.yaml             data: {class_path: ImageFolderDataModule, init_args: {root: ...}} as the experiment configs;
                        a class_path may name registered classes and classes of defend, attacks, torch,
                        torchvision and (pytorch_)lightning: for your own data module give --import MODULE

examples:
  defend evaluate --classifier checkpoints/digits_small_cnn.pt --battery quick --out runs/card_quick
  defend evaluate --classifier checkpoints/folder_classifier.pt --data folder:data/my_images --out runs/card_folder
  defend evaluate --classifier C.pt --rts R.pt --detector runs/detector/det --out runs/card --battery.n_images=200
  defend evaluate --classifier other.pt --inputs runs/card --out runs/card_other   # re-score on the same inputs
  defend evaluate --classifier C.pt --battery bench-v1 --defence normal --name my-cnn --source https://... \
      --out runs/bench/my-cnn                       # a leaderboard entry under the frozen protocol bench-v1
  defend evaluate --arch resnet50 --weights resnet50.pth --num-classes 1000 --data folder:data/imagenet_val \\
      --out runs/card_resnet50                      # a torchvision state dict instead of an artifact

{overrides}
Here the battery's keys are under battery. (--battery.n_images=8, --battery.autoattack.eps=[4/255]) and the data
module's arguments under data. (--data.resize=256).

Writes DIR/card.json (schema docs/card.md, defend/card_schema.json), DIR/report.md, one CSV per table, maps.png,
attacks.png, roc.png (with a detector), battery.yaml and DIR/adversarial/<attack>_<interpreter>.pt. Everything is
checked before anything runs (paths, the classifier against the data, the RTS against the classifier, the detector's
channels, the battery): an error is one line, exit status 2, and nothing is written. Files in DIR that defend did not
write are never replaced unless --overwrite is given. DEFEND_DEBUG=1 shows tracebacks.
"""


def evaluate_command(classifier: str | Path, out: str | Path, *, rts: str | Path | None = None,
                     detector: str | Path | None = None, data: str | None = None) -> str:
    """The ``defend evaluate`` command a run prints as its next step, shell-quoted, complete (``--out`` included)."""
    args = ["defend", "evaluate", "--classifier", str(classifier)]
    for flag, value in (("--rts", rts), ("--detector", detector), ("--data", data)):
        if value is not None:
            args += [flag, str(value)]
    return shlex.join([*args, "--out", str(out)])


def _parser() -> Any:
    from ..frontend import OVERRIDES_HELP, command_parser

    p = command_parser("defend evaluate", "Measure a defended system (classifier [+ RTS] [+ detector]) and write its "
                       "model card.", EPILOG.replace("{overrides}", OVERRIDES_HELP))
    p.add_argument("--classifier", metavar="PATH", help="classifier artifact (save_classifier / defend fit export)")
    p.add_argument("--arch", metavar="NAME", help="instead of --classifier: a torchvision architecture of the zoo "
                                                  "(resnet18/34/50/101, wide_resnet50_2, densenet121/169) ...")
    p.add_argument("--weights", metavar="PATH", help="... and its local state dict (torchvision or RobustBench-format, "
                                                     "keys maybe prefixed model. / module.)")
    p.add_argument("--num-classes", type=int, metavar="K", help="with --arch: the weights' class count (default: "
                                                                "the data's)")
    p.add_argument("--input-size", type=int, default=224, metavar="S", help="with --arch: input side in px "
                                                                             "(default 224)")
    p.add_argument("--mean", type=float, nargs=3, metavar="M", help="with --arch: the normalisation the weights "
                                                                    "expect (default: inside the file, else ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, metavar="S", help="with --arch: see --mean")
    p.add_argument("--rts", metavar="PATH", help="RTS interpreter artifact (save_rts / AIDModule export): adds RTS "
                                                 "to the attacked interpreters and the adaptive RTS attack")
    p.add_argument("--detector", metavar="DIR", help="saved detector directory (DetectorModule.save): adds detection "
                                                     "rates at 1 %% / 5 %% FPR and the detector-aware attack")
    p.add_argument("--data", metavar="SPEC", help="digits (default), folder:PATH, cifar10:PATH or a YAML file")
    p.add_argument("--battery", default="standard", metavar="NAME|FILE",
                   help="quick (CPU smoke run, ~1-2 min on the digits), standard (default), paper (the official ADV2 "
                        "budgets, GPU), bench-v1 (the frozen IDLS-Bench protocol), bench-v1-quick (its CPU smoke "
                        "version) or a YAML file")
    p.add_argument("--out", metavar="DIR", help="output directory (created)")
    p.add_argument("--inputs", metavar="DIR", help="re-score the system on the adversarial sets saved in an earlier "
                                                   "--out (DIR/adversarial/*.pt) instead of attacking")
    p.add_argument("--name", metavar="NAME", help="the card's leaderboard entry name (default: the --out folder's "
                                                  "name)")
    p.add_argument("--source", metavar="TEXT", help="where the system comes from: a paper or URL (default: this run)")
    p.add_argument("--defence", metavar="NAME", help="the registered defence the system is (its interpreters count "
                                                     "for the dual robustness; default: none)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing files in --out that defend did not write")
    p.add_argument("--no-progress", action="store_true", help="hide progress output")
    p.add_argument("--print_config", action="store_true", help="print the resolved battery and exit")
    p.add_argument("--import", action="append", default=[], metavar="MODULE", dest="imports", help=IMPORT_HELP)
    return p


def _battery(spec: str, args: list[str]) -> tuple[Any, str, dict[str, Any]]:
    """The battery ``spec`` names with the ``--battery.KEY=VALUE`` overrides merged in, checked, as YAML, and the
    ``--data.KEY=VALUE`` data module arguments (merged by :func:`defend.frontend.apply_overrides`)."""
    from ..frontend import apply_overrides, override_parser
    from ..typed_config import check_known_keys
    from .battery import Battery, battery_mapping, load_battery, parse_battery

    if not args:
        return (*load_battery(spec), {})
    raw = battery_mapping(spec)
    check_known_keys(Battery, raw)
    parser = override_parser(Battery, "battery", {"data": dict[str, Any]})
    try:
        merged = apply_overrides(parser, {"battery": raw}, args, Battery, "battery")
    except ValueError as exc:  # a value's problem worded as parse_battery words the battery file's
        if "config key" in str(exc):
            exc.args = (f"battery: {str(exc).replace('config key', 'key')}",)
        raise
    return (*parse_battery(merged["battery"]), merged["data"])


def _new_key(key: str) -> str:
    """Where an old ``--set KEY=VALUE`` goes now: ``data.KEY`` stays, a battery key is under ``battery.``."""
    return key if key.startswith("data.") else f"battery.{key}"


def _check_args(args: Any) -> None:
    """--out and --classifier (or --arch + --weights; the options of --arch only with it), one line each."""
    if args.print_config:
        return
    if not args.out or not (args.classifier or args.arch):
        missing = ["--out"] if not args.out else ["--classifier"]
        raise ValueError(f"the following arguments are required: {', '.join(missing)} (or --arch NAME --weights PATH "
                         "for a torchvision state dict)")
    if args.classifier and args.arch:
        raise ValueError("give --classifier (an artifact) or --arch with --weights (a state dict), not both")
    if bool(args.arch) != bool(args.weights):
        raise ValueError("--arch and --weights go together (a torchvision architecture and its local state dict)")
    extra = [f"--{k.replace('_', '-')}" for k in ("num_classes", "mean", "std") if getattr(args, k) is not None]
    if not args.arch and (extra or args.input_size != 224):
        raise ValueError(f"{', '.join(extra or ['--input-size'])} only go with --arch (an artifact carries its own)")
    if not args.out.strip():
        raise ValueError("--out must name a directory")


def _classifier(args: Any) -> Any:
    """The classifier to evaluate: an artifact's path or an ``ArchSpec``."""
    if not args.arch:
        return args.classifier
    from .system import ArchSpec

    return ArchSpec(args.arch, args.weights, args.num_classes, args.input_size, args.mean, args.std)


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import USER_ERRORS, debug_enabled, one_line
    from ..frontend import parse_command

    argv = list(sys.argv[1:] if argv is None else argv)
    out, created = None, False
    try:
        argv_own, modules = split_imports(argv)
        args, over = parse_command(_parser(), argv_own, _new_key)
        _check_args(args)
        out = Path(args.out) if args.out else None
        created = out is not None and not out.exists()
        allow_imports(modules)
        battery, battery_yaml, data_over = _battery(args.battery, over)
        if args.print_config:
            print(battery_yaml, end="")
            return 0
        from .run import evaluate_system

        evaluate_system(_classifier(args), out, rts=args.rts, detector=args.detector, data=args.data,
                        battery=battery, data_overrides=data_over, inputs=args.inputs,
                        overwrite=args.overwrite, progress=not args.no_progress, argv=["defend", "evaluate", *argv],
                        name=args.name, source=args.source, defence=args.defence)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except BaseException as exc:
        if created and out is not None and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        from lightning_fabric.utilities.exceptions import MisconfigurationException  # not at start: fast --help

        if not isinstance(exc, (*USER_ERRORS, MisconfigurationException)) or debug_enabled():
            raise
        print(f"defend evaluate: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
