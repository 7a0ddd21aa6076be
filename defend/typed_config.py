"""Typed configs below every command: a mapping read from YAML checked against a dataclass by jsonargparse, with
one-line errors (unknown keys with a did-you-mean, wrong types, values refused by their type).

Used by ``defend experiment`` (:mod:`defend.experiments.config`) and ``defend evaluate`` (the battery); a class a
config names is checked against :mod:`defend.class_paths` before jsonargparse imports it.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from jsonargparse import ArgumentParser

from .class_paths import check_class_paths, enforce_in_jsonargparse, import_denied

__all__ = ["parse_typed", "config_error", "check_known_keys", "check_class_options", "plain_dict", "check_names"]


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
    hint = typing.get_type_hints(cls).get(name)
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and is_dataclass(t):
            return t
    return type(None)


def _class_fields(path: str) -> list[str]:
    """Field / argument names of an already imported class named by its dotted path (nothing is imported)."""
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


def plain_dict(obj: Any) -> Any:
    """``obj`` as plain YAML-like data: dataclass instances and mappings -> dicts (keys as ``str``), tuples -> lists,
    paths -> ``str``, 0-d tensors / arrays -> numbers. The one converter: what module hyper-parameters store (so
    checkpoints load with ``weights_only``), what battery dumps read and what options from a config and from a
    checkpoint are compared as (they compare equal when they mean the same)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): plain_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_dict(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
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


def check_names(values: list[str], known: Any, where: str, kind: str | None = None) -> None:
    """Every name of ``values`` is registered in ``known`` (a registry: its kind names the thing, else ``kind``); at
    least one."""
    kind = kind or getattr(known, "kind", "name")
    if not values:
        raise ValueError(f"{where} is empty; give at least one {kind}: {', '.join(known)}")
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown {kind} '{name}' in {where}{hint}; choose one of: {', '.join(known)}")
