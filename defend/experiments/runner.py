"""``defend experiment``: load and merge YAML configs, dispatch to the experiment, write artifacts atomically.

Nothing the user made is overwritten: every run records the files it writes in ``DIR/.defend-manifest.json``
(relative path + sha256, :class:`defend.io.OutputGuard`). A later run may replace the files listed there whose
content is unchanged (the framework's own outputs); before anything runs it refuses, on one line, to write over any
other existing file among the outputs the experiment will write (:func:`planned_outputs`), unless ``--overwrite``
is given, and every write into ``DIR`` is checked against the manifest again when it happens.
"""
from __future__ import annotations

import copy
import importlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..class_paths import IMPORT_HELP, allow_imports, split_imports
from ..distributed import is_global_zero
from ..io import OutputGuard, atomic_write_text, guarded_outputs, write_error, write_json
from ..provenance import noted_data, provenance
from ..safe_yaml import read_mapping
from .config import EXPERIMENTS, experiment_spec, parse_experiment

__all__ = ["main", "load_config", "resolve_config", "deep_merge", "planned_outputs", "load_experiments"]


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


def load_config(paths: Sequence[str], quick: bool = False) -> dict[str, Any]:
    """Merge config files left to right, then the ``quick:`` section (if asked); the command line's overrides come
    after (:func:`defend.frontend.apply_overrides`)."""
    cfg: dict[str, Any] = {}
    for p in paths:
        cfg = deep_merge(cfg, read_mapping(p))
    if quick:
        cfg = deep_merge(cfg, cfg.get("quick", {}) or {})
    cfg.pop("quick", None)
    return cfg


EPILOG = """experiments: {names}

examples:
  defend experiment -c configs/experiments/classifier.yaml --out runs/classifier
  defend experiment -c configs/experiments/attacks.yaml -c configs/trainer/cpu.yaml --out runs/attacks --quick
  defend experiment -c configs/experiments/attacks.yaml --out runs/a --attack.eps=0.02 --evaluation.n_images=8

{overrides}

The config is checked before anything runs (names of attacks / frameworks / interpreters / models, radii, step
counts, the data and a reused classifier checkpoint): an invalid config exits with status 2 and one error line,
and writes nothing into --out. So is --out: a run refuses to overwrite files in it that it did not write (listed
with their sha256 in DIR/.defend-manifest.json) unless --overwrite is given. A full disk or a permission error is
one line too (`cannot write <file>: <reason>`), leaving the previous file intact. A class_path (e.g. data:) may
name registered classes and classes of defend, attacks, torch, torchvision and (pytorch_)lightning; give
--import MODULE (repeatable) to use your own module's classes: no config file makes defend import a module.
Set DEFEND_DEBUG=1 to see full tracebacks.
"""


def _parser() -> Any:
    from ..frontend import OVERRIDES_HELP, command_parser

    parser = command_parser(
        "defend experiment", "Run an experiment config end to end and write DIR/metrics.json, DIR/report.md and "
        "figures.", EPILOG.format(names=", ".join(EXPERIMENTS) or "(none loaded)", overrides=OVERRIDES_HELP))
    parser.add_argument("-c", "--config", action="append", required=True, metavar="FILE",
                        help="experiment YAML; repeat to compose, later files win (e.g. an experiment, then a trainer "
                             "preset from configs/trainer/)")
    parser.add_argument("--out", metavar="DIR", type=str,
                        help="output directory for metrics.json, report.md and figures (created; files are replaced "
                             "atomically; nothing is written when the config is invalid). The files a run writes "
                             "are listed in DIR/.defend-manifest.json; a later run replaces only those (unchanged "
                             "since) and refuses, before anything runs, to overwrite any other file")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow replacing existing files in --out that defend did not write or that were edited "
                             "since it wrote them (e.g. your own report.md); without it the run refuses up front")
    parser.add_argument("--quick", action="store_true",
                        help="apply the config's `quick:` section: fewer inputs, steps and epochs (a fast smoke run)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved, checked config (every default filled in) and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--import", action="append", default=[], metavar="MODULE", dest="imports", help=IMPORT_HELP)
    return parser


def resolve_config(paths: Sequence[str], overrides: Sequence[str] = (), quick: bool = False,
                   out: str | None = None) -> dict[str, Any]:
    """The config files (+ ``quick:``) with the command line's ``--KEY.PATH=VALUE`` ``overrides`` merged in by
    jsonargparse against the experiment's config class (:func:`defend.frontend.apply_overrides`)."""
    from ..frontend import apply_overrides, override_parser
    from ..typed_config import check_known_keys

    raw = load_config(paths, quick)
    raw["output_dir"] = str(Path(out or "."))  # where rank 0 publishes (other ranks: a scratch directory)
    if not overrides:
        return raw
    spec = experiment_spec(raw)
    check_known_keys(spec.config, raw)
    return apply_overrides(override_parser(spec.config), raw, overrides, spec.config)


#: what every run writes beside the experiment's own outputs
RUN_FILES = ("metrics.json", "report.md", "config.yaml", "provenance.json")


def planned_outputs(spec: Any, cfg: Any, out: Path) -> list[Path]:
    """The files a run of ``spec`` with ``cfg`` will write: ``metrics.json``, ``report.md``, ``config.yaml``,
    ``provenance.json`` and what the experiment declares (``spec.outputs``: its figures, the checkpoints it trains).
    Caches (hash-named entries, never replacing a file of the user's) and Lightning's versioned log folders are not
    listed; any write the list misses is still checked against the manifest when it happens."""
    return [out / f for f in RUN_FILES] + [Path(p) for p in (spec.outputs(cfg, out) if spec.outputs else [])]


def _out_dir(value: str | None, print_config: bool) -> Path:
    """``--out`` (required unless ``--print_config``; an empty one would write into the working directory)."""
    if value is None and not print_config:
        raise ValueError("the following arguments are required: --out (see `defend experiment --help`)")
    if value is not None and not value.strip():
        raise ValueError(f"--out must name a directory, got {value!r} (an empty --out would write into the working "
                         "directory); pass e.g. --out runs/NAME")
    return Path(value or ".")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _threads(cfg: Any) -> None:
    """The config's ``threads:`` (torch's intra-op threads; results of some models depend on it), for every rank."""
    if getattr(cfg, "threads", None):
        import torch

        torch.set_num_threads(int(cfg.threads))


def _publish(spec: Any, cfg: Any, resolved: str, out: Path, args: Any, argv: list[str]) -> None:
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
    from ..frontend import parse_command

    load_experiments()
    argv = list(sys.argv[1:] if argv is None else argv)
    out, created = None, False
    try:
        argv_own, modules = split_imports(argv)
        args, overrides = parse_command(_parser(), argv_own)
        out = _out_dir(args.out, args.print_config)
        created = args.out is not None and not out.exists()
        allow_imports(modules)
        raw = resolve_config(args.config, overrides, args.quick, args.out)
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
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except BaseException as exc:
        if created and out is not None and _is_empty_dir(out):  # a run that failed before writing leaves no directory
            out.rmdir()
        if not isinstance(exc, (*USER_ERRORS, MisconfigurationException)) or debug_enabled():
            raise
        print(f"defend experiment: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
