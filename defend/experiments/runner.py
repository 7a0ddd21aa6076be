"""``defend experiment``: load and merge YAML configs, dispatch to the experiment, write artifacts atomically.

Nothing the user made is overwritten: every run records the files it writes in ``DIR/.defend-manifest.json``
(relative path + sha256, :class:`defend.io.OutputGuard`). A later run may replace the files listed there whose
content is unchanged (the framework's own outputs); before anything runs it refuses, on one line, to write over any
other existing file among the outputs the experiment will write (:func:`planned_outputs`), unless ``--overwrite``
is given, and every write into ``DIR`` is checked against the manifest again when it happens.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..class_paths import IMPORT_HELP, allow_imports
from ..distributed import is_global_zero
from ..io import OutputGuard, atomic_write_text, guarded_outputs, write_error, write_json
from ..provenance import noted_data, provenance
from ..safe_yaml import loads, read_mapping
from .config import EXPERIMENTS, parse_experiment

__all__ = ["main", "load_config", "deep_merge", "planned_outputs", "load_experiments"]


def load_experiments() -> None:
    """Import every module of this package, so each experiment registers itself (one module per experiment)."""
    import pkgutil

    from .. import experiments

    for mod in pkgutil.iter_modules(experiments.__path__):
        importlib.import_module(f"{experiments.__name__}.{mod.name}")


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
        cfg = deep_merge(cfg, read_mapping(p))
    if quick:
        cfg = deep_merge(cfg, cfg.get("quick", {}) or {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        _set_path(cfg, key, loads(value, f"--set {key}"))
    cfg.pop("quick", None)
    return cfg


EPILOG = """experiments: {names}

examples:
  defend experiment -c configs/experiments/classifier.yaml --out runs/classifier
  defend experiment -c configs/experiments/attacks.yaml -c configs/trainer/cpu.yaml --out runs/attacks --quick
  defend experiment -c configs/experiments/attacks.yaml --out runs/a --set attack.eps=0.02 --set evaluation.n_images=8

The config is checked before anything runs (names of attacks / frameworks / interpreters / models, radii, step
counts, the data and a reused classifier checkpoint): an invalid config exits with status 2 and one error line,
and writes nothing into --out. So is --out: a run refuses to overwrite files in it that it did not write (listed
with their sha256 in DIR/.defend-manifest.json) unless --overwrite is given. A full disk or a permission error is
one line too (`cannot write <file>: <reason>`), leaving the previous file intact. A class_path (e.g. data:) may
name registered classes and classes of defend, attacks, torch, torchvision and (pytorch_)lightning; give
--import MODULE (repeatable) to use your own module's classes: no config file makes defend import a module.
Set DEFEND_DEBUG=1 to see full tracebacks.
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (``defend experiment: error: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="defend experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an experiment config end to end and write DIR/metrics.json, DIR/report.md and figures.",
        epilog=EPILOG.format(names=", ".join(EXPERIMENTS) or "(none loaded)"))
    parser.add_argument("-c", "--config", action="append", required=True, metavar="FILE",
                        help="experiment YAML; repeat to compose, later files win (e.g. an experiment, then a trainer "
                             "preset from configs/trainer/)")
    parser.add_argument("--out", metavar="DIR", type=_out_dir,
                        help="output directory for metrics.json, report.md and figures (created; files are replaced "
                             "atomically; nothing is written when the config is invalid). The files a run writes "
                             "are listed in DIR/.defend-manifest.json; a later run replaces only those (unchanged "
                             "since) and refuses, before anything runs, to overwrite any other file")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow replacing existing files in --out that defend did not write or that were edited "
                             "since it wrote them (e.g. your own report.md); without it the run refuses up front")
    parser.add_argument("--quick", action="store_true",
                        help="apply the config's `quick:` section: fewer inputs, steps and epochs (a fast smoke run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path, after the files and --quick; the value is read "
                             "as YAML (e.g. --set attack.eps=0.02 --set evaluation.interpreters=[cam,grad]); "
                             "repeatable")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved, checked config (every default filled in) and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--import", action="append", default=[], metavar="MODULE", dest="imports", help=IMPORT_HELP)
    return parser


#: what every run writes beside the experiment's own outputs
RUN_FILES = ("metrics.json", "report.md", "config.yaml", "provenance.json")


def planned_outputs(spec: Any, cfg: Any, out: Path) -> list[Path]:
    """The files a run of ``spec`` with ``cfg`` will write: ``metrics.json``, ``report.md``, ``config.yaml``,
    ``provenance.json`` and what the experiment declares (``spec.outputs``: its figures, the checkpoints it trains).
    Caches (hash-named entries, never replacing a file of the user's) and Lightning's versioned log folders are not
    listed; any write the list misses is still checked against the manifest when it happens."""
    return [out / f for f in RUN_FILES] + [Path(p) for p in (spec.outputs(cfg, out) if spec.outputs else [])]


def _out_dir(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError(f"--out must name a directory, got {value!r} (an empty --out would write "
                                         "into the working directory); pass e.g. --out runs/NAME")
    return value


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _threads(cfg: Any) -> None:
    """The config's ``threads:`` (torch's intra-op threads; results of some models depend on it), for every rank."""
    if getattr(cfg, "threads", None):
        import torch

        torch.set_num_threads(int(cfg.threads))


def _publish(spec: Any, cfg: Any, resolved: str, out: Path, args: argparse.Namespace, argv: list[str]) -> None:
    """Rank 0: refuse to overwrite what the user made, run, then write the resolved config and the provenance."""
    guard = OutputGuard(out, overwrite=args.overwrite)
    guard.refuse(planned_outputs(spec, cfg, out))  # before anything trains or is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. permission denied: one line naming the directory
        raise write_error(out, exc) from None
    wall, start = time.time(), time.perf_counter()
    noted_data(reset=True)
    with guarded_outputs(guard):
        spec.run(cfg, out, progress=not args.no_progress)
        atomic_write_text(out / "config.yaml", resolved)
        write_json(out / "provenance.json", provenance(wall, int(cfg.seed), noted_data(), ["defend", "experiment", *argv]))
    print(f"[defend] experiment '{spec.name}' finished in {time.perf_counter() - start:.1f}s -> {out}")


def main(argv: Sequence[str] | None = None) -> int:
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from ..errors import USER_ERRORS, debug_enabled, one_line

    load_experiments()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.out is None and not args.print_config:
            parser.error("the following arguments are required: --out")
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    out = Path(args.out or ".")
    created = args.out is not None and not out.exists()
    try:
        allow_imports(args.imports)
        raw = load_config(args.config, args.set, args.quick)
        raw["output_dir"] = str(out)  # where rank 0 publishes (other ranks run in a scratch directory)
        if args.print_config:  # resolved and type-checked; the data and checkpoints it names need not exist here
            print(parse_experiment(raw, instantiate=False)[2], end="")
            return 0
        spec, cfg, resolved = parse_experiment(raw)
        _threads(cfg)
        if is_global_zero():
            _publish(spec, cfg, resolved, out, args, argv)
        else:  # DDP: the other ranks train / attack their shards; only rank 0 publishes into --out
            with tempfile.TemporaryDirectory(prefix="defend-rank-") as scratch:
                spec.run(cfg, Path(scratch), progress=False)
    except BaseException as exc:
        if created and _is_empty_dir(out):  # a run that failed before writing anything leaves no directory
            out.rmdir()
        if not isinstance(exc, (*USER_ERRORS, MisconfigurationException)) or debug_enabled():
            raise
        print(f"defend experiment: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
