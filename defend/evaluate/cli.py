"""``defend evaluate``: one command that measures a defended system and writes its model card."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..class_paths import IMPORT_HELP, allow_imports

__all__ = ["main", "EPILOG"]

EPILOG = """data (--data):
  digits (default)      the embedded digits, DigitsDataModule(seed=0)
  folder:PATH | PATH    an image folder root/<class>/<images> at the classifier's input size, split as
                        configs/finetune/*.yaml do (val/test fraction 0.15, seed 0); change an option with
                        --set data.KEY=VALUE (e.g. --set data.resize=256)
  cifar10:PATH          CIFAR-10 in its on-disk format
  FILE.yaml             data: {class_path: ImageFolderDataModule, init_args: {root: ...}} as the experiment configs;
                        a class_path may name registered classes and classes of defend, attacks, torch,
                        torchvision and (pytorch_)lightning: for your own data module give --import MODULE

examples:
  defend evaluate --classifier checkpoints/digits_small_cnn.pt --battery quick --out runs/card_quick
  defend evaluate --classifier checkpoints/folder_classifier.pt --data folder:data/my_images --out runs/card_folder
  defend evaluate --classifier C.pt --rts R.pt --detector runs/detector/det --out runs/card --set n_images=200
  defend evaluate --classifier other.pt --inputs runs/card --out runs/card_other   # re-score on the same inputs
  defend evaluate --arch resnet50 --weights resnet50.pth --num-classes 1000 --data folder:data/imagenet_val \\
      --out runs/card_resnet50                      # a torchvision state dict instead of an artifact

Writes DIR/card.json (schema docs/card.md, defend/card_schema.json), DIR/report.md, one CSV per table, maps.png,
attacks.png, roc.png (with a detector), battery.yaml and DIR/adversarial/<attack>_<interpreter>.pt. Everything is
checked before anything runs (paths, the classifier against the data, the RTS against the classifier, the detector's
channels, the battery): an error is one line, exit status 2, and nothing is written. Files in DIR that defend did not
write are never replaced unless --overwrite is given. DEFEND_DEBUG=1 shows tracebacks.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="defend evaluate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                description="Measure a defended system (classifier [+ RTS] [+ detector]) and write its model card.")
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
                   help="quick (CPU smoke run, ~1-2 min on the digits), standard (default) or a YAML file")
    p.add_argument("--out", metavar="DIR", help="output directory (created)")
    p.add_argument("--inputs", metavar="DIR", help="re-score the system on the adversarial sets saved in an earlier "
                                                   "--out (DIR/adversarial/*.pt) instead of attacking")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a battery value by dotted path (YAML value, e.g. --set n_images=8 --set "
                        "autoattack.eps=[4/255]); data.KEY=VALUE sets a data module argument; repeatable")
    p.add_argument("--overwrite", action="store_true", help="allow replacing files in --out that defend did not write")
    p.add_argument("--no-progress", action="store_true", help="hide progress output")
    p.add_argument("--print_config", action="store_true", help="print the resolved battery and exit")
    p.add_argument("--import", action="append", default=[], metavar="MODULE", dest="imports", help=IMPORT_HELP)
    return p


def _overrides(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    from ..safe_yaml import YAMLLimitError, loads

    battery, data = {}, {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed = loads(value, f"--set {key}")
        except YAMLLimitError:
            raise
        except ValueError:
            raise ValueError(f"--set {key}: {value!r} is not a YAML value") from None
        if key.startswith("data."):
            data[key[5:]] = parsed
        else:
            battery[key] = parsed
    return battery, data


def _check_arch_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--classifier or --arch + --weights; the options of --arch only with it."""
    if args.classifier and args.arch:
        parser.error("give --classifier (an artifact) or --arch with --weights (a state dict), not both")
    if bool(args.arch) != bool(args.weights):
        parser.error("--arch and --weights go together (a torchvision architecture and its local state dict)")
    extra = [f"--{k.replace('_', '-')}" for k in ("num_classes", "mean", "std") if getattr(args, k) is not None]
    if not args.arch and (extra or args.input_size != 224):
        parser.error(f"{', '.join(extra or ['--input-size'])} only go with --arch (an artifact carries its own)")


def _classifier(args: argparse.Namespace) -> Any:
    """The classifier to evaluate: an artifact's path or an ``ArchSpec``."""
    if not args.arch:
        return args.classifier
    from .system import ArchSpec

    return ArchSpec(args.arch, args.weights, args.num_classes, args.input_size, args.mean, args.std)


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import USER_ERRORS, debug_enabled, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not args.print_config:
            missing = [f"--{k}" for k in ("out",) if not getattr(args, k)]
            if missing or not (args.classifier or args.arch):
                parser.error(f"the following arguments are required: {', '.join(missing or ['--classifier'])} "
                             f"(or --arch NAME --weights PATH for a torchvision state dict)")
            _check_arch_args(parser, args)
            if not args.out.strip():
                parser.error("--out must name a directory")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    out = Path(args.out) if args.out else None
    created = out is not None and not out.exists()
    try:
        allow_imports(args.imports)
        battery_over, data_over = _overrides(args.set)
        if args.print_config:
            from .battery import load_battery

            print(load_battery(args.battery, battery_over)[1], end="")
            return 0
        from .run import evaluate_system

        evaluate_system(_classifier(args), out, rts=args.rts, detector=args.detector, data=args.data,
                        battery=args.battery, overrides=battery_over, data_overrides=data_over, inputs=args.inputs,
                        overwrite=args.overwrite, progress=not args.no_progress, argv=["defend", "evaluate", *argv])
    except BaseException as exc:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        from lightning_fabric.utilities.exceptions import MisconfigurationException  # not at start: fast --help

        if not isinstance(exc, (*USER_ERRORS, MisconfigurationException)) or debug_enabled():
            raise
        print(f"defend evaluate: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
