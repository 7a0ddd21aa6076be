"""The command line of ``defend experiment`` and ``defend evaluate``: jsonargparse, with the override rule of
``defend fit`` (LightningCLI): a config value is set by its dotted path, ``--KEY.PATH=VALUE``, after the config files.

A command's own options (``-c``, ``--out``, ``--battery``...) are parsed by one jsonargparse parser
(:func:`command_parser`); every other option of the command line is a config override, parsed by a second one built
from the config's dataclass with the config files as its defaults (:func:`apply_overrides`): jsonargparse merges the
overrides into the files, checks their keys (an unknown one is one line with a did-you-mean) and types, reads their
values as YAML under :mod:`defend.safe_yaml`'s limits (no tag builds an object) and resolves a ``class_path`` only
within :mod:`defend.class_paths`' allowlist. README.md, section "Overrides", documents the rule.
"""
from __future__ import annotations

import argparse
import copy
import json
import typing
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

from jsonargparse import ArgumentParser

from .class_paths import check_argv, check_class_paths, enforce_in_jsonargparse
from .safe_yaml import loads
from .typed_config import check_known_keys, config_error

__all__ = ["command_parser", "split_argv", "parse_command", "override_parser", "apply_overrides", "OVERRIDES_HELP"]

#: the one sentence every --help says about overrides
OVERRIDES_HELP = ("config overrides: --KEY.PATH=VALUE sets the config key KEY.PATH (its dotted path in the YAML) after "
                  "the config files;\nVALUE is YAML (e.g. --attack.eps=8/255 --evaluation.interpreters=[cam,grad]); "
                  "see README.md, section Overrides.")


def command_parser(prog: str, description: str, epilog: str) -> ArgumentParser:
    """A jsonargparse parser for a command's own options (errors raise, :func:`parse_command` makes them one line)."""
    return ArgumentParser(prog=prog, description=description, epilog=epilog, exit_on_error=False,
                          formatter_class=argparse.RawDescriptionHelpFormatter, print_config=None,
                          allow_abbrev=False)


def _takes_value(parser: ArgumentParser, name: str) -> bool | None:
    """Whether the option ``name`` of ``parser`` takes a value; ``None`` when ``parser`` has no such option."""
    for action in parser._actions:
        if name in action.option_strings:
            return action.nargs != 0
    return None


def split_argv(parser: ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` as (the options ``parser`` knows, with their values; every other option: the config overrides)."""
    own: list[str] = []
    over: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, _ = arg.partition("=")
        takes = _takes_value(parser, name)
        target = own if takes is not None or not arg.startswith("-") else over
        target.append(arg)
        has_next = i + 1 < len(args) and not (args[i + 1].startswith("--") or args[i + 1] == "-c")
        if not eq and has_next and (takes or (takes is None and arg.startswith("--"))):
            target.append(args[i + 1])
            i += 1
        i += 1
    return own, over


def _refuse_set(argv: Sequence[str], new_key: Callable[[str], str]) -> None:
    """``--set KEY=VALUE`` (the old spelling): one line with the new one, ``--{new_key(KEY)}=VALUE``."""
    for i, arg in enumerate(argv):
        if arg == "--set" or arg.startswith("--set="):
            item = arg[6:] if "=" in arg[:6] else (argv[i + 1] if i + 1 < len(argv) else "KEY=VALUE")
            key, _, value = item.partition("=")
            raise ValueError(f"--set is gone: write --{new_key(key)}={value or 'VALUE'} (the dotted path of the config key; "
                             "see README.md, Overrides)")


def parse_command(parser: ArgumentParser, argv: Sequence[str],
                  new_key: Callable[[str], str] = str) -> tuple[argparse.Namespace, list[str]]:
    """The command's own options (as a namespace with every default) and the override arguments left over;
    ``new_key``: the dotted path an old ``--set KEY=...`` is now written with."""
    _refuse_set(argv, new_key)
    own, over = split_argv(parser, argv)
    try:
        ns = parser.parse_args(own)
    except argparse.ArgumentError as exc:
        raise ValueError(f"{' '.join(str(exc).split())} (see `{parser.prog} --help`)") from None
    return ns, over


def override_parser(cls: type, nested_key: str | None = None, extra: dict[str, Any] | None = None) -> ArgumentParser:
    """A parser of the keys of the dataclass ``cls`` (under ``nested_key``) and of ``extra`` (name -> type)."""
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    parser.add_class_arguments(cls, nested_key)
    for name, type_ in (extra or {}).items():
        parser.add_argument(f"--{name}", type=type_, default={})
    return parser


def _check_section(arg: str, option: str, head: str, cls: type, nested_key: str, sections: set[str]) -> None:
    """An override outside the parser's sections (``nested_key`` and its extras, e.g. ``battery`` and ``data``): a
    bare key of ``cls`` gets its ``--nested_key.`` spelling, anything else the rule (one line)."""
    if head in sections:
        return
    if head in {f.name for f in fields(cls)}:
        raise ValueError(f"--{option} is a {nested_key} key: write --{nested_key}.{arg[2:]}")
    raise ValueError(f"unknown option --{option}; the overrides are " + ", ".join(
        f"--{s}.KEY=VALUE" for s in sorted(sections)))


def _check_keys(args: Sequence[str], cls: type, nested_key: str | None, sections: set[str]) -> None:
    """Every override names a key of ``cls`` (under ``nested_key``, or another of the parser's ``sections``): one
    line worded as for a config file's key, with a did-you-mean and the valid keys
    (:func:`defend.typed_config.check_known_keys`)."""
    for arg in args:
        if not arg.startswith("--"):
            continue
        option = arg[2:].partition("=")[0].rstrip("+")
        path = option.split(".")
        if nested_key is not None:
            _check_section(arg, option, path[0], cls, nested_key, sections)
            if path[0] != nested_key:
                continue
            path = path[1:]
        nested: dict[str, Any] = {}
        for part in reversed(path):
            nested = {part: nested}
        try:
            check_known_keys(cls, nested)
        except ValueError as exc:
            raise ValueError(f"--{option}: {exc}") from None


def _mapping_depth(cls: Any, path: list[str]) -> int | None:
    """How many parts of ``path`` lead, through the dataclass ``cls``, to a plain mapping field (a ``dict`` whose
    values are not dataclasses, e.g. ``trainer``, a ``module:`` section); ``None`` if it leads to none."""
    for i, part in enumerate(path):
        options = [t for t in typing.get_args(cls) if t is not type(None)] if typing.get_origin(cls) is not dict else []
        cls = options[0] if len(options) == 1 else cls
        if not (isinstance(cls, type) and is_dataclass(cls)):
            return None
        hint = typing.get_type_hints(cls).get(part)
        options = [t for t in typing.get_args(hint) if t is not type(None)] if typing.get_origin(hint) is not dict else []
        hint = options[0] if len(options) == 1 else hint
        if typing.get_origin(hint) is dict or hint is dict:
            value = (typing.get_args(hint) or (str, Any))[-1]
            if not (isinstance(value, type) and is_dataclass(value)):
                return i + 1
            if i + 2 < len(path):  # dict[str, Dataclass]: the key, then that dataclass's fields
                return (lambda d: None if d is None else i + 2 + d)(_mapping_depth(value, path[i + 2:]))
            return None
        cls = hint
    return None


def _child(node: dict[str, Any], key: str) -> dict[str, Any]:
    """``node[key]``, made an empty mapping first unless it is one."""
    if not isinstance(node.get(key), dict):
        node[key] = {}
    return node[key]


def _deep_mapping_overrides(args: Sequence[str], cls: type, nested_key: str | None,
                            defaults: dict[str, Any]) -> list[str]:
    """jsonargparse merges ``--a.KEY=VALUE`` into a plain mapping ``a`` one level deep only; an override two or more
    levels into one (``--training.module.inner.eps=8/255``) is given to it as the whole mapping with that value
    changed (the value read by :func:`defend.safe_yaml.loads`), so the mapping's other keys are kept."""
    current = copy.deepcopy(defaults)
    out: list[str] = []
    for arg in args:
        option, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        path = option.split(".")
        inner = path[1:] if nested_key is not None and path[0] == nested_key else path
        depth = _mapping_depth(cls, inner) if eq and (nested_key is None or path[0] == nested_key) else None
        if depth is None or len(inner) - depth < 2:
            out.append(arg)
            continue
        prefix = path[:len(path) - len(inner) + depth]
        node = current
        for part in prefix:
            node = _child(node, part)
        target = node
        for part in path[len(prefix):-1]:
            target = _child(target, part)
        target[path[-1]] = loads(text, f"--{option}")
        out.append(f"--{'.'.join(prefix)}={json.dumps(node, default=str)}")
    return out


def apply_overrides(parser: ArgumentParser, defaults: dict[str, Any], args: Sequence[str], cls: type,
                    nested_key: str | None = None) -> dict[str, Any]:
    """``defaults`` (the config files, as a mapping) with the override ``args`` merged in by ``parser`` (the config
    dataclass ``cls`` under ``nested_key``); a key that does not exist (with a did-you-mean), a value of the wrong
    type, refused YAML or a class path outside the allowlist is one line, worded as for the config files."""
    enforce_in_jsonargparse()  # values read by defend.safe_yaml; import paths outside the allowlist denied
    _check_keys(args, cls, nested_key, {k.split(".")[0] for k in parser.get_defaults().keys()})
    check_argv(args)  # class paths given on the command line, before jsonargparse imports anything
    check_class_paths(defaults, "")
    try:
        parser.set_defaults(defaults)
        return parser.parse_args(_deep_mapping_overrides(args, cls, nested_key, defaults)).as_dict()
    except argparse.ArgumentError as exc:
        prefix = f'Parser key "{nested_key}.' if nested_key else 'Parser key "'
        error = ValueError(config_error(ValueError(str(exc).replace(prefix, 'Parser key "cfg.')), cls))
        error.valid_keys = sorted(parser.get_defaults().keys())  # for defend.errors.one_line's did-you-mean
        raise error from None
