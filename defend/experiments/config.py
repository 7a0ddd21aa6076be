"""Typed experiment configs: one dataclass per experiment, parsed and checked by jsonargparse before anything runs.

An experiment is one module that registers its run function with its config class::

    @register_experiment("attacks", AttacksConfig, outputs=planned_outputs)
    def run(cfg: AttacksConfig, out: Path, progress: bool = True) -> list[dict]: ...

:func:`parse_experiment` turns the merged YAML (plus ``--quick`` and the ``--KEY.PATH=VALUE`` overrides) into that dataclass: unknown or misspelt
keys anywhere, wrong types, NaN / Inf / negative radii and step sizes, zero counts are one-line errors with the valid
choices (:mod:`defend.typed_config`). Sections that hold a LightningModule's or a data module's arguments are checked
against that class's own signature (:func:`defend.typed_config.check_class_options`), so no config copies a module's
signature by hand; attack sections are :class:`defend.attack_options.AttackSections`. Radii are in image units
([0, 1]); ``8/255`` is accepted and exact.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from attacks.registry import Registry

from ..typed_config import parse_typed
from ..types import Count, PositiveCount

__all__ = ["ExperimentConfig", "EXPERIMENTS", "ExperimentSpec", "register_experiment", "parse_experiment",
           "experiment_spec",
           "TrainerOptions"]


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


def experiment_spec(raw: dict[str, Any]) -> ExperimentSpec:
    """The registered experiment ``raw['experiment']`` names (an unknown name is one line with the choices)."""
    name = raw.get("experiment")
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS.get(name)


def parse_experiment(raw: dict[str, Any], instantiate: bool = True) -> tuple[ExperimentSpec, Any, str]:
    """The registered experiment named in ``raw['experiment']``, ``raw`` as its typed and checked config, and that
    config resolved as YAML (every default filled in: ``--print_config`` and ``DIR/config.yaml``).
    ``instantiate=False``: keys and types only (the config is then ``None``; nothing is built or checked further)."""
    spec = experiment_spec(raw)
    cfg, yaml_text = parse_typed(spec.config, raw, instantiate)
    if instantiate and spec.check is not None:
        spec.check(cfg)
    return spec, cfg, yaml_text
