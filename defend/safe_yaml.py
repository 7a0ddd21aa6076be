"""The one YAML reader for what a user gives defend (configs, batteries, ``--data FILE.yaml``, override values).

PyYAML's ``SafeLoader`` (plain data only: no tag builds an object) with limits, checked while the document is
composed, before anything is built from it: the file's size (:data:`MAX_BYTES`), the number of nodes the document
holds once every alias is expanded (:data:`MAX_NODES`: a "billion laughs" anchor bomb of a few hundred bytes is
refused at once instead of growing to gigabytes downstream), the nesting depth (:data:`MAX_DEPTH`), recursive
aliases, and a mapping key given twice (PyYAML would silently keep the last value). Every refusal is one
``ValueError`` line naming the source, the line and the fix. :func:`use_for_jsonargparse` makes jsonargparse (``defend
fit -c``, the values of ``--key=value``) read YAML under the same limits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_BYTES", "MAX_NODES", "MAX_DEPTH", "YAMLLimitError", "SafeLimitedLoader", "loads", "load_file",
           "read_mapping", "check_text", "use_for_jsonargparse", "RefusedYAMLError"]

#: largest YAML file or value read (bytes)
MAX_BYTES = 1 << 20
#: most nodes a document may hold with every alias expanded
MAX_NODES = 100_000
#: deepest nesting of sequences / mappings
MAX_DEPTH = 64


class YAMLLimitError(yaml.YAMLError, ValueError):
    """A document over a limit, with a recursive alias or a duplicated key (a ``ValueError``: a user error)."""


def _line(node_or_event: Any) -> int:
    mark = getattr(node_or_event, "start_mark", None)
    return mark.line + 1 if mark is not None else 0


class SafeLimitedLoader(yaml.SafeLoader):
    """``SafeLoader`` that counts the nodes of the document with aliases expanded, its depth, and duplicated keys."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._expanded = 0  # nodes so far, each alias counted as the whole subtree it stands for
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, once the node is complete

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise YAMLLimitError(f"line {_line(event)}: alias *{event.anchor} refers to a node that contains it "
                                     "(a recursive alias); write the value out instead")
            self._count(size, event)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YAMLLimitError(f"line {_line(self.peek_event())}: nested deeper than {MAX_DEPTH} levels; "
                                 "flatten the document")
        before = self._count(1, self.peek_event())
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = self._expanded - before + 1
        return node

    def _count(self, size: int, event: Any) -> Any:
        """Add ``size`` expanded nodes; refuse past :data:`MAX_NODES`. Returns the count before."""
        before = self._expanded
        self._expanded += size
        if self._expanded > MAX_NODES:
            raise YAMLLimitError(f"line {_line(event)}: more than {MAX_NODES} values once its aliases (*name) are "
                                 "expanded (an anchor bomb?); write the values out or make the document smaller")
        return before

    def compose_mapping_node(self, anchor: Any) -> Any:  # noqa: D102 - PyYAML hook
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            ident = (key.tag, key.value)
            if ident in seen:
                raise YAMLLimitError(f"line {_line(key)}: key '{key.value}' is given twice (first on line "
                                     f"{seen[ident]}); keep one")
            seen[ident] = _line(key)
        return node


def _size_check(text: str, source: str) -> None:
    size = len(text.encode("utf-8", "surrogateescape"))
    if size > MAX_BYTES:
        raise YAMLLimitError(f"{source}: {size} bytes is over the {MAX_BYTES}-byte limit of a YAML config; "
                             "split it or keep data out of it")


def _error(source: str, exc: yaml.YAMLError) -> ValueError:
    """One line for a PyYAML error or a limit: the source, the line, the problem."""
    if isinstance(exc, YAMLLimitError):
        return YAMLLimitError(f"{source}: {exc}")
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ValueError(f"{source} is not valid YAML:{where} {problem}".replace(":  ", ": "))


def check_text(text: str, source: str = "YAML") -> None:
    """Compose ``text`` under the limits (nothing is built); a problem is one ``ValueError`` line."""
    _size_check(text, source)
    try:
        loader = SafeLimitedLoader(text)
        try:
            while loader.check_node():
                loader.get_node()
        finally:
            loader.dispose()
    except RecursionError:
        raise YAMLLimitError(f"{source}: nested too deeply; flatten the document") from None
    except yaml.YAMLError as exc:
        raise _error(source, exc) from None


def loads(text: str, source: str = "YAML") -> Any:
    """``text`` as plain data (mappings, lists, scalars) under the limits; a problem is one ``ValueError`` line."""
    _size_check(text, source)
    try:
        return yaml.load(text, Loader=SafeLimitedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise YAMLLimitError(f"{source}: nested too deeply; flatten the document") from None
    except yaml.YAMLError as exc:
        raise _error(source, exc) from None


def load_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML file ``path`` as plain data; missing, too large, not UTF-8 or invalid is one line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    size = p.stat().st_size
    if size > MAX_BYTES:
        raise YAMLLimitError(f"{p}: {size} bytes is over the {MAX_BYTES}-byte limit of a YAML config; split it or "
                             "keep data out of it")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return loads(text, str(p))


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (:func:`load_file`: plain data, size / alias / depth limits, no duplicated key);
    a missing file, bad YAML or anything but a mapping at top level is one line."""
    path = Path(path)
    data = load_file(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping at top level")
    return data


_ORIGINAL_LOADER: Any = None


class RefusedYAMLError(ValueError):
    """YAML that defend refuses (over a limit, a tag that would build an object): not a ``yaml.YAMLError``, so that
    jsonargparse reports it on the option instead of taking a command-line value's text as a plain string."""


def _jsonargparse_yaml(text: str) -> Any:
    """jsonargparse's own YAML reading (its float / timestamp rules) of what :func:`loads` accepts: over a limit or
    with a tag that builds an object is refused (:class:`RefusedYAMLError`); invalid YAML is left to jsonargparse,
    which may take such a command-line value as a plain string."""
    source = "YAML config" if "\n" in text.strip() else f"YAML value {text[:40]!r}"
    try:
        _size_check(text, source)
        yaml.load(text, Loader=SafeLimitedLoader)  # noqa: S506 - a SafeLoader subclass
    except YAMLLimitError as exc:
        raise RefusedYAMLError(str(exc) if str(exc).startswith(source) else f"{source}: {exc}") from None
    except yaml.constructor.ConstructorError as exc:
        raise RefusedYAMLError(f"{source}: {exc.problem}; defend reads plain YAML data only (no tag builds an "
                               "object): write the value as a plain string, number, list or mapping") from None
    except (yaml.YAMLError, RecursionError):
        pass
    return _ORIGINAL_LOADER(text)


def use_for_jsonargparse() -> None:
    """Make jsonargparse read every YAML config file and ``--key=value`` value under the limits (idempotent)."""
    global _ORIGINAL_LOADER
    from jsonargparse import get_loader, set_loader

    if _ORIGINAL_LOADER is None:
        _ORIGINAL_LOADER = get_loader("yaml")
        set_loader("yaml", _jsonargparse_yaml, exceptions=(yaml.YAMLError,))
