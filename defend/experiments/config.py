"""Typed experiment configs: one dataclass per experiment, parsed and checked by jsonargparse before anything runs.

An experiment is one module that registers its run function with its config class::

    @register_experiment("attacks", AttacksConfig, outputs=planned_outputs)
    def run(cfg: AttacksConfig, out: Path, progress: bool = True) -> list[dict]: ...

:func:`parse_experiment` turns the merged YAML (plus ``--quick`` and ``--set``) into that dataclass: unknown or misspelt
keys anywhere, wrong types, NaN / Inf / negative radii and step sizes, zero counts are one-line errors with the valid
choices. Sections that hold a LightningModule's or a data module's arguments are checked against that class's own
signature (:func:`check_class_options`), so no config copies a module's signature by hand. Radii are in image units
([0, 1]); ``8/255`` is accepted and exact.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable

from jsonargparse import ArgumentParser

from attacks.registry import Registry

from ..types import Count, Fraction01, NonNegative, Positive, PositiveCount, Radius

__all__ = ["Radius", "Positive", "NonNegative", "Count", "PositiveCount", "Fraction01", "ExperimentConfig",
           "EXPERIMENTS", "ExperimentSpec", "register_experiment", "parse_experiment", "dump_config",
           "check_class_options", "TrainerOptions", "AttackOptions", "layered_options"]


TrainerOptions = dict[str, Any]  # pytorch_lightning.Trainer arguments, checked against its signature


@dataclass
class ExperimentConfig:
    """What every experiment has: its name, the seed, torch's intra-op threads, the Trainer options (presets from
    ``configs/trainer/`` compose in) and where rank 0 publishes (set by the runner)."""

    experiment: str = ""
    seed: Count = Count(0)
    threads: PositiveCount | None = None
    trainer: TrainerOptions = field(default_factory=dict)
    output_dir: str | None = None


@dataclass
class ExperimentSpec:
    """A registered experiment: its run function, its config class and the files it will write."""

    name: str
    run: Callable[..., list[dict[str, Any]]]
    config: type
    outputs: Callable[[Any, Any], list[Any]] | None = None
    check: Callable[[Any], None] | None = None


EXPERIMENTS: Registry = Registry("experiment")


def register_experiment(name: str, config: type, outputs: Callable | None = None,
                        check: Callable | None = None) -> Callable:
    """Decorator for an experiment's ``run(cfg, out, progress)``: registers it under ``name`` with its config class,
    the list of files it will write (``outputs(cfg, out)``) and an optional cross-field ``check(cfg)``."""
    def add(run: Callable) -> Callable:
        EXPERIMENTS.register(name)(ExperimentSpec(name, run, config, outputs, check))
        return run
    return add


def _keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls)] if is_dataclass(cls) else []


def _suggest(message: str, cls: type) -> str:
    """Add a did-you-mean to jsonargparse's "does not accept option 'a.b'" using the dataclass's field names."""
    hit = re.search(r"does not accept option '([\w.]+)'", message)
    if not hit:
        return message
    node, parts = cls, hit.group(1).split(".")
    for i, part in enumerate(parts):
        names = _keys(node)
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return f"unknown key '{part}' in {where}{hint} (valid: {', '.join(names)})"
        node = next(f.type for f in fields(node) if f.name == part)
        node = node if isinstance(node, type) else type(None)
    return message


def _one_line(exc: Exception, cls: type) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text.replace('Parser key "cfg.', 'config key "').replace("Group 'cfg' ", "the config ")
    return _suggest(text, cls)


def parse_experiment(raw: dict[str, Any]) -> tuple[ExperimentSpec, Any]:
    """The registered experiment named in ``raw['experiment']`` and ``raw`` as its typed, checked config."""
    name = raw.get("experiment")
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    spec: ExperimentSpec = EXPERIMENTS.get(name)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--cfg", type=spec.config)
    try:
        cfg = parser.instantiate(parser.parse_object({"cfg": raw})).cfg
    except Exception as exc:  # jsonargparse reports nested problems on many lines: one line, with a did-you-mean
        raise ValueError(_one_line(exc, spec.config)) from None
    if spec.check is not None:
        spec.check(cfg)
    return spec, cfg


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML (``--print_config`` and ``DIR/config.yaml``)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--cfg", type=type(cfg))
    text = parser.dump(parser.parse_object({"cfg": _as_dict(cfg)}), skip_none=False)
    return "\n".join(line[2:] if line.startswith("  ") else line for line in text.splitlines()[1:]) + "\n"


def _as_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: _as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_as_dict(v) for v in obj]
    return obj


def check_class_options(cls: type, options: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check ``options`` against ``cls.__init__``'s signature with jsonargparse (unknown keys, types, nested option
    groups); returns them with the class's defaults filled in. ``skip``: arguments the experiment sets itself."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init", skip=set(skip), sub_configs=True)
    try:
        ns = parser.parse_object({"init": dict(options or {})})
    except Exception as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()).replace('"init.', '"')
        valid = sorted(k for k in parser.get_defaults().get("init", {}).keys())
        hit = re.search(r"does not accept option '([\w]+)", text)
        if hit:
            close = difflib.get_close_matches(hit.group(1), valid, n=1, cutoff=0.6)
            text = (f"unknown option '{hit.group(1)}'" + (f"; did you mean '{close[0]}'?" if close else "")
                    + f" (valid: {', '.join(valid)})")
        raise ValueError(f"{where} ({cls.__name__}): {text}") from None
    return {k: v for k, v in _as_dict(ns.as_dict()["init"]).items()}


@dataclass
class AttackOptions:
    """Options of a named attack (:func:`attacks.build_attack`); unset (``None``) keys fall through to the next layer
    and finally to the attack's tuned defaults. Radii and steps in image units (``8/255`` accepted)."""

    eps: Radius | None = None
    alpha: Radius | None = None
    random_start: bool | None = None
    warm_steps: Count | None = None
    steps: Count | None = None
    c: NonNegative | None = None
    c_end: NonNegative | None = None
    confidence: Fraction01 | None = None
    edge_threshold: Fraction01 | None = None
    edge_stages: str | None = None
    term_options: dict[str, dict[str, Any]] | None = None
    framework_options: dict[str, Any] | None = None
    mask_search_steps: Count | None = None
    mask_alpha_max: Radius | None = None
    autocast: str | None = None

    def set_options(self) -> dict[str, Any]:
        """The keys this layer sets."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def layered_options(framework: str, *layers: AttackOptions | None) -> dict[str, Any]:
    """Merge attack-option layers left to right (later layers win; ``framework_options`` merge key by key). The PGD
    radius / step / random start of shared layers apply to the PGD framework only."""
    out: dict[str, Any] = {}
    fw: dict[str, Any] = {}
    for layer in layers:
        opts = layer.set_options() if layer is not None else {}
        fw.update(opts.pop("framework_options", None) or {})
        out.update(opts)
    if framework != "pgd":
        out = {k: v for k, v in out.items() if k not in ("eps", "alpha", "random_start")}
    if fw:
        out["framework_options"] = fw
    return out
