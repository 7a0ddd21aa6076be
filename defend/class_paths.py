"""Which classes a config may name: nothing read from disk imports a module the user did not ask for.

A ``class_path`` (in a YAML config, a battery, ``--data FILE.yaml``, a ``--KEY.PATH=VALUE`` override, ``--model`` / ``--data`` on the
command line) is resolved by jsonargparse, which imports the module it names, and importing runs that module's code.
So a class path may only be a registered short name (``DigitsDataModule``: resolved among the classes already
imported) or a dotted path into :data:`ALLOWED_PACKAGES`; a user's own module needs ``--import MODULE`` on the
command line (:func:`allow_imports`), never a file. :func:`check_class_paths` walks a config for its class paths and
refuses any other one on one line, before jsonargparse sees it; :func:`enforce_in_jsonargparse` makes jsonargparse
itself deny every other import path (a backstop for the class paths no walk can see, e.g. in a nested config file).
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["ALLOWED_PACKAGES", "IMPORT_HELP", "allow_imports", "allowed", "check_class_paths", "check_argv",
           "split_imports", "enforce_in_jsonargparse", "import_denied"]

#: the packages whose classes a config may name without ``--import``
ALLOWED_PACKAGES = ("defend", "attacks", "torch", "torchvision", "pytorch_lightning", "lightning", "lightning_fabric")
#: ``--help`` text of ``--import``, shared by the three commands
IMPORT_HELP = ("import MODULE (your own data module, model or callback) so that a config may name its classes by "
               "class_path; repeatable. Without it a class path may only name registered classes or classes of "
               f"{', '.join(ALLOWED_PACKAGES)}: a config file never makes defend import a module")

#: command-line options whose value may be a bare class path
_CLASS_OPTIONS = ("model", "data", "optimizer", "lr_scheduler", "class_path")
_TRAINER_CLASS_OPTIONS = ("logger", "callbacks", "plugins", "strategy", "profiler", "accelerator")

_opted_in: list[str] = []  # module paths given with --import in this process


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def allowed(class_path: str) -> bool:
    """Whether ``class_path`` may be resolved: a short (registered) name, or a dotted path in an allowed package
    or in a module given with ``--import``."""
    if "." not in class_path:
        return True
    return any(_under(class_path, p) for p in (*ALLOWED_PACKAGES, *_opted_in))


def allow_imports(modules: Iterable[str]) -> None:
    """Import each of ``modules`` (the user asked for it on the command line) and let configs name its classes
    (and the modules of its package they are defined in); a module that does not import is one line."""
    for name in modules:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"--import {name!r}: give a module's dotted name, e.g. --import my_pkg.data")
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"--import {name}: cannot import it ({exc}); put its folder on PYTHONPATH") from None
        top = name.split(".")[0]
        defined = {obj.__module__ for obj in vars(module).values()
                   if inspect.isclass(obj) and _under(getattr(obj, "__module__", ""), top)}
        for path in sorted({name, *defined}):
            if path not in _opted_in:
                _opted_in.append(path)
    enforce_in_jsonargparse()


def _refusal(path: str, where: str) -> ValueError:
    top = path.split(".")[0]
    module = path.rpartition(".")[0]
    return ValueError(f"{where}: class_path '{path}' is not importable from a config (only registered names and "
                      f"classes of {', '.join(ALLOWED_PACKAGES[:6])}); if '{top}' is your own code, give "
                      f"--import {module} on the command line")


def import_denied(text: str) -> str | None:
    """jsonargparse's refusal of an import path (:func:`enforce_in_jsonargparse`) as this module's one line."""
    import re

    hit = re.search(r"Importing '([\w.]+)' is not allowed", text)
    if hit is None:
        return None
    key = re.search(r'(?:Parser|config) key "([\w.]+)"', text)
    return str(_refusal(hit.group(1), key.group(1) if key else "config"))


def check_class_paths(config: Any, where: str = "config") -> None:
    """Refuse (one ``ValueError`` line, nothing imported) any ``class_path`` in ``config`` (mappings and lists,
    recursively: ``init_args``, callbacks, loggers) that :func:`allowed` does not accept."""
    if isinstance(config, dict):
        for key, value in config.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "class_path" and isinstance(value, str) and not allowed(value):
                raise _refusal(value, here.rpartition(".")[0] or here)
            check_class_paths(value, here)
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_class_paths(value, f"{where}[{i}]")


def split_imports(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--import MODULE`` / ``--import=MODULE`` options, and those modules."""
    rest: list[str] = []
    modules: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--import":
            modules.append(next(args, ""))
        elif arg.startswith("--import="):
            modules.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, modules


def check_argv(argv: Sequence[str]) -> None:
    """The class paths of command-line values (``--model X``, ``--data=X``, ``--trainer.callbacks+={...}``,
    ``--model.class_path X``, a config file given as an option's value): each is checked as above."""
    from pathlib import Path

    from .safe_yaml import load_file, loads

    args = list(argv)
    for i, arg in enumerate(args):
        if not arg.startswith("--") and arg != "-c":
            continue
        key, eq, value = ("config", "", "") if arg == "-c" else arg[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
        key = key.rstrip("+")
        if not value:
            continue
        if (key == "config" or _class_option(key)) and Path(value).suffix in (".yaml", ".yml") and Path(value).is_file():
            try:
                check_class_paths(load_file(value), "")
            except ValueError as exc:
                raise ValueError(f"{value}: {exc}") from None
        elif _class_option(key) and all(part.isidentifier() for part in value.split(".")) and not allowed(value):
            raise _refusal(value, f"--{key}")
        elif "class_path" in value:
            try:
                parsed = loads(value, f"--{key}")
            except ValueError:
                continue  # not YAML: jsonargparse reports it
            check_class_paths(parsed, f"--{key}")


def _class_option(key: str) -> bool:
    """Whether the command-line option ``key`` takes a bare class path."""
    return (key in _CLASS_OPTIONS or key.endswith((".class_path", ".help"))
            or (key.startswith("trainer.") and key[len("trainer."):] in _TRAINER_CLASS_OPTIONS))


def enforce_in_jsonargparse() -> None:
    """jsonargparse denies every import path a value names except the allowed packages and ``--import``-ed
    modules (its import-path policy), and reads YAML under :mod:`defend.safe_yaml`'s limits."""
    from jsonargparse import set_parsing_settings

    from .safe_yaml import use_for_jsonargparse

    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=[*ALLOWED_PACKAGES, *_opted_in])
    use_for_jsonargparse()
