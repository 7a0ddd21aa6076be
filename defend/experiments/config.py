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
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from jsonargparse import ArgumentParser

from attacks.registry import Registry

from ..class_paths import import_denied
from ..types import Count, Fraction01, NonNegative, Positive, PositiveCount, Radius, StepSize

__all__ = ["Radius", "StepSize", "Positive", "NonNegative", "Count", "PositiveCount", "Fraction01", "ExperimentConfig",
           "EXPERIMENTS", "ExperimentSpec", "register_experiment", "parse_experiment",
           "check_class_options", "parse_typed", "config_error", "plain_dict", "TrainerOptions", "AttackOptions", "layered_options", "AttackSections", "check_names"]


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
        node = _field_class(node, part)
    return message


def _field_class(cls: type, name: str) -> type:
    """The dataclass a field holds (``X`` or ``X | None``), else ``NoneType`` (the annotations are strings)."""
    import typing

    hint = typing.get_type_hints(cls).get(name)
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and is_dataclass(t):
            return t
    return type(None)


def _class_fields(path: str) -> list[str]:
    """Field / argument names of an already imported class named by its dotted path (nothing is imported)."""
    import inspect
    import sys

    module, _, name = path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if cls is None:
        return []
    if is_dataclass(cls):
        return _keys(cls)
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def config_error(exc: Exception, cls: type) -> str:
    """jsonargparse's multi-line report on a config of ``cls`` as one line (value types' own messages, a did-you-mean)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text.replace('Parser key "cfg.', 'config key "').replace("Group 'cfg' ", "the config ")
    denied = import_denied(text)
    if denied:
        return denied
    typed = re.search(r"(config key \"[\w.]+\"): .*?Not of type \w+: (.*?)(?: - Expected a <class 'NoneType'>.*)?$", text)
    if typed:  # a value type's own message ("a radius must lie in [0, 1] ...") without the Union noise
        return f"{typed.group(1)}: {typed.group(2)}"
    union = re.search(r"^(?:(config key \"[\w.]+\"): )?Does not validate against any of the Union subtypes .*?Errors: - "
                      r"(.*?) - Expected a <class 'NoneType'>", text)
    if union and "dot import path" not in union.group(2) and "is not accepted" not in union.group(2):
        return f"{union.group(1)}: {union.group(2)}" if union.group(1) else union.group(2)
    path = re.search(r"config key \"([\w.]+)\": .*Expected a dot import path string: ([\w.]+)", text)
    if path:
        return (f"{path.group(1)}.class_path: cannot resolve '{path.group(2)}'; name a class, e.g. "
                "DigitsDataModule, CIFAR10DataModule, ImageFolderDataModule or a dotted import path")
    listed = re.search(r"(config key \"[\w.]+\"): Expected a <class 'list'>\. Got value: (.*)", text)
    if listed:
        return f"{listed.group(1)} must be a list, e.g. [{listed.group(2)}]"
    nested = re.search(r"config key \"([\w.]+)\".*?class_path '([\w.]+)'.*?Option '([\w.]+)' is not accepted", text)
    if nested:  # an unknown key inside a typed section (a dict of option groups, a data module's init_args)
        where, path, key = nested.groups()
        key = key.split(".")[0]  # 'modul.mode': the unknown key is 'modul'
        names = _class_fields(path)
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        return (f"unknown key '{key}' in {where}" + (f"; did you mean '{close[0]}'?" if close else "")
                + (f" (valid: {', '.join(names)})" if names else ""))
    return _suggest(text, cls)


def parse_typed(cls: type, raw: dict[str, Any], instantiate: bool = True) -> tuple[Any, str]:
    """``raw`` as an instance of the dataclass ``cls`` (types checked, defaults filled in) and as that resolved YAML;
    any problem is one line (:func:`config_error`). ``instantiate=False`` checks and resolves without building the
    classes it names (``--print_config`` of a config whose data is on another machine); the instance is then ``None``."""
    from ..class_paths import check_class_paths, enforce_in_jsonargparse

    check_known_keys(cls, raw)
    check_class_paths(raw, "")  # before jsonargparse imports the module a class_path names
    enforce_in_jsonargparse()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--cfg", type=cls)
    try:
        ns = parser.parse_object({"cfg": raw})
        text = parser.dump(ns, skip_none=False)
        obj = parser.instantiate(ns).cfg if instantiate else None
    except Exception as exc:  # jsonargparse reports nested problems on many lines: one line, with a did-you-mean
        raise ValueError(config_error(exc, cls)) from None
    return obj, "\n".join(line[2:] for line in text.splitlines()[1:]) + "\n"


def check_known_keys(cls: Any, raw: Any, where: str = "the top level") -> None:
    """Every key of ``raw`` is a field of the dataclass ``cls``, recursively through dataclass fields, ``X | None``
    and ``dict[str, X]`` (jsonargparse lets an unknown key whose value is an empty mapping pass)."""
    import typing

    if typing.get_origin(cls) is dict and isinstance(raw, dict):
        value_type = typing.get_args(cls)[1] if len(typing.get_args(cls)) == 2 else Any
        for key, value in raw.items():
            check_known_keys(value_type, value, f"{where}.{key}")
        return
    options = [t for t in typing.get_args(cls) if t is not type(None)] if typing.get_origin(cls) else [cls]
    if len(options) == 1 and options[0] is not cls:
        return check_known_keys(options[0], raw, where)
    if not (isinstance(cls, type) and is_dataclass(cls) and isinstance(raw, dict)):
        return
    names, hints = _keys(cls), typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown key '{key}' in {where}{hint} (valid: {', '.join(names)})")
        check_known_keys(hints[key], value, key if where == "the top level" else f"{where}.{key}")


def parse_experiment(raw: dict[str, Any], instantiate: bool = True) -> tuple[ExperimentSpec, Any, str]:
    """The registered experiment named in ``raw['experiment']``, ``raw`` as its typed and checked config, and that
    config resolved as YAML (every default filled in: ``--print_config`` and ``DIR/config.yaml``).
    ``instantiate=False``: keys and types only (the config is then ``None``; nothing is built or checked further)."""
    name = raw.get("experiment")
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    spec: ExperimentSpec = EXPERIMENTS.get(name)
    cfg, yaml_text = parse_typed(spec.config, raw, instantiate)
    if instantiate and spec.check is not None:
        spec.check(cfg)
    return spec, cfg, yaml_text


def plain_dict(obj: Any) -> Any:
    """A (nested) dataclass as plain dicts and lists."""
    if is_dataclass(obj):
        return {f.name: plain_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: plain_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_dict(v) for v in obj]
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
        hit = re.search(r"does not accept option '([\w.]+)", text)
        if hit:
            close = difflib.get_close_matches(hit.group(1), valid, n=1, cutoff=0.6)
            text = (f"unknown option '{hit.group(1)}'" + (f"; did you mean '{close[0]}'?" if close else "")
                    + f" (valid: {', '.join(valid)})")
        raise ValueError(f"{where} ({cls.__name__}): {text}") from None
    return {k: v for k, v in plain_dict(ns.as_dict()["init"]).items()}


@dataclass
class AttackOptions:
    """Options of a named attack (:func:`attacks.build_attack`); unset (``None``) keys fall through to the next layer
    and finally to the attack's tuned defaults. Radii and steps in image units (``8/255`` accepted)."""

    eps: Radius | None = None
    alpha: StepSize | None = None
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
    mask_alpha_max: StepSize | None = None
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


@dataclass
class AttackSections:
    """The attack sections of the experiments that run the attack core: shared ``attack`` options, overridden by
    ``per_framework.<fw>``, ``per_interpreter.<name>`` and ``per_interpreter_framework.<name>_<fw>`` (in that order;
    the interpreter layers apply to attacks with an interpretation term), and ``interpreter_options.<name>`` (the
    measuring and attacked interpreters' constructor options)."""

    interpreter_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack: AttackOptions = field(default_factory=AttackOptions)
    per_interpreter: dict[str, AttackOptions] = field(default_factory=dict)
    per_framework: dict[str, AttackOptions] = field(default_factory=dict)
    per_interpreter_framework: dict[str, AttackOptions] = field(default_factory=dict)

    def attack_options(self, attack: str, framework: str, interpreter: str | None) -> dict[str, Any]:
        """The :func:`attacks.build_attack` keywords of one attack x framework x target interpreter."""
        layers = [self.attack, self.per_framework.get(framework)]
        if attack != "pgd" and interpreter is not None:
            layers += [self.per_interpreter.get(interpreter),
                       self.per_interpreter_framework.get(f"{interpreter}_{framework}")]
        return {**layered_options(framework, *layers), "interpreter_options": self.interpreter_options}

    def check_attack_sections(self) -> None:
        """Every name in the sections exists (interpreters, frameworks) and every option builds."""
        from attacks import FRAMEWORKS, INTERPRETERS, get_framework

        for section, known in (("interpreter_options", INTERPRETERS), ("per_interpreter", INTERPRETERS),
                               ("per_framework", FRAMEWORKS)):
            for name in getattr(self, section):
                check_names([name], known, section)
        for name, opts in self.interpreter_options.items():
            if name != "rts":  # RTS needs its trained network (checked where it is loaded)
                _build(lambda: INTERPRETERS.build(name, **opts), f"interpreter_options.{name}")
        for fw in FRAMEWORKS:
            fw_opts = layered_options(fw, self.attack, self.per_framework.get(fw)).get("framework_options", {})
            _build(lambda: get_framework(fw, **fw_opts), f"framework_options of '{fw}'")


def _build(make: Callable[[], Any], where: str) -> Any:
    try:
        return make()
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def check_names(values: list[str], known: Any, where: str) -> None:
    """Every name of ``values`` is registered in ``known`` (a registry: its kind names the thing); at least one."""
    kind = getattr(known, "kind", "name")
    if not values:
        raise ValueError(f"{where} is empty; give at least one {kind}: {', '.join(known)}")
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown {kind} '{name}' in {where}{hint}; choose one of: {', '.join(known)}")
