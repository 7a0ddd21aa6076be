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
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..distributed import is_global_zero
from ..io import OutputGuard, guarded_outputs, write_error

__all__ = ["main", "load_config", "deep_merge", "EXPERIMENTS", "planned_outputs"]

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
and writes nothing into --out. So is --out: a run refuses to overwrite files in it that it did not write (listed
with their sha256 in DIR/.defend-manifest.json) unless --overwrite is given. A full disk or a permission error is
one line too (`cannot write <file>: <reason>`), leaving the previous file intact. Set DEFEND_DEBUG=1 to see full
tracebacks.
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
    parser.add_argument("--out", required=True, metavar="DIR", type=_out_dir,
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
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


#: figures each experiment writes into --out (next to metrics.json and report.md)
FIGURES = {"classifier": ["maps.png"], "attacks": ["maps.png"], "gap": ["gap.png"], "robust": ["robust.png"],
           "aid": ["aid.png"], "detector": []}
#: experiments that train (and save) the classifier when ``classifier.checkpoint`` is not a file to reuse
USES_CLASSIFIER = ("classifier", "attacks", "gap", "detector", "aid")


def _will_train(section: dict[str, Any], default: Path) -> Path | None:
    """Where a ``classifier:`` / ``rts:``-style section saves what it trains, or ``None`` when it reuses a file."""
    ckpt = section.get("checkpoint")
    if ckpt and Path(ckpt).is_file() and not section.get("retrain", False):
        return None
    return Path(ckpt) if ckpt else default


def planned_outputs(name: str, cfg: dict[str, Any], out: Path, module: Any = None) -> list[Path]:
    """The files experiment ``name`` will write for ``cfg``: ``metrics.json``, ``report.md``, its figure and the
    checkpoints it trains (``classifier.pt``, ``rts.pt`` / ``rts_aid.pt``, the robust models' ``<name>.pt``).
    Caches (hash-named entries, never replacing a file of the user's) and Lightning's versioned log folders are not
    listed; any write the list misses is still checked against the manifest when it happens."""
    files = [out / "metrics.json", out / "report.md"] + [out / f for f in FIGURES.get(name, [])]
    if name in USES_CLASSIFIER:
        ccfg = dict(cfg.get("classifier") or {})
        target = _will_train(ccfg, out / "classifier.pt")
        if target is not None:
            files.append(target)
    if name == "aid":
        files += [out / "rts.pt", out / "rts_aid.pt"]
    if name == "detector":
        dcfg = dict(cfg.get("detection") or {})
        rts_opts = ((cfg.get("interpreter_options") or {}).get("rts") or {})
        if "rts" in (dcfg.get("interpreters") or ["grad", "cam", "mask"]) and not rts_opts.get("network"):
            target = _will_train(dict(cfg.get("rts") or {}), out / "rts.pt")
            if target is not None:
                files.append(target)
    if name == "robust":
        specs = cfg.get("models") or getattr(module, "DEFAULT_MODELS", [])
        files += [out / f"{spec['name']}.pt" for spec in specs if isinstance(spec, dict) and "name" in spec]
    return files


def _out_dir(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError(f"--out must name a directory, got {value!r} (an empty --out would write "
                                         "into the working directory); pass e.g. --out runs/NAME")
    return value


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
            guard = OutputGuard(out, overwrite=args.overwrite)
            guard.refuse(planned_outputs(name, cfg, out, module))  # before anything trains or is written
            created = not out.exists()
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # e.g. permission denied: one line naming the directory
                raise write_error(out, exc) from None
            with guarded_outputs(guard):
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
