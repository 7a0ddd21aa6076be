"""Artifacts: atomic writes, safe checkpoint loading (``torch.load(weights_only=True)``, no code runs), the output
manifest that keeps ``defend experiment`` from overwriting files it did not write, and stable content digests for
caches.

Every file the framework writes goes through :func:`atomic_path`: the data go to a temporary file next to the target
(mode ``0o666 & ~umask`` like a plain ``open()``, or the mode of the file it replaces), are flushed to disk, and the
temporary file is renamed onto the target only when everything succeeded. A failed write (disk full, permission
denied) raises :class:`WriteError` (``cannot write <file>: <reason>``, one line), removes the temporary file and
leaves the previous file intact. While an :class:`OutputGuard` is active (``defend experiment``), a write into its
directory that would replace a file the guard's manifest does not list with its current content is refused
(:class:`OutputConflictError`) and every completed write is recorded in ``DIR/.defend-manifest.json``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "write_json", "save_artifact", "load_artifact",
           "CheckpointError", "WriteError", "write_error", "OutputConflictError", "OutputGuard", "guarded_outputs",
           "refuse_conflicts", "MANIFEST",
           "FORMAT_VERSION", "project_version", "state_digest", "file_sha256", "describe", "settings_digest",
           "Undescribable", "cache_notice", "load_cache_entry", "save_cache_entry"]

FORMAT_VERSION = 1
#: the manifest of a ``defend experiment`` output directory: the files the framework wrote there, with their sha256
MANIFEST = ".defend-manifest.json"


class CheckpointError(ValueError):
    """A checkpoint is corrupt, truncated, foreign or does not fit the model / data it is used with."""


class WriteError(OSError):
    """Writing a file failed (disk full, permission denied, ...): ``cannot write <file>: <reason>`` on one line.

    ``errno`` is the original error's, ``reason`` its text, ``path`` the file that could not be written."""


class OutputConflictError(FileExistsError):
    """A write would replace a file that the output manifest does not list with its current content (the user's own
    file, or an output the user edited since): refused unless overwriting was allowed (``--overwrite``)."""


def project_version() -> str:
    try:
        from importlib.metadata import version

        return version("idls-defend")
    except Exception:  # pragma: no cover - running from a source tree
        return "0+unknown"


# --------------------------------------------------------------------------------------------- atomic writes
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # pragma: no cover - non-Linux fallback
        old = os.umask(0o077)
        os.umask(old)
    return old


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would leave: the existing file's, else ``0o666 & ~umask``."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, WriteError):
        return exc.reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def write_error(path: str | os.PathLike, exc: BaseException) -> WriteError:
    """``exc`` (a failed write of ``path``) as a one-line :class:`WriteError`."""
    return _write_error(Path(path), exc)


def _write_error(path: Path, exc: BaseException) -> WriteError:
    reason = _reason(exc)
    err = WriteError(f"cannot write {path}: {reason}")
    err.errno = getattr(exc, "errno", None)
    err.reason, err.path = reason, path
    return err


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_bytes(tmp: Path, data: bytes) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike, *, guard: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it is renamed onto ``path`` only if the block succeeds.

    The file ends with the mode a plain ``open()`` would give it (``0o666 & ~umask``, or the replaced file's mode).
    An ``OSError`` in the block or in the rename becomes a one-line :class:`WriteError` naming ``path``; the temporary
    file is always removed and the previous ``path`` (if any) left intact. ``guard=False`` (caches, the manifest)
    bypasses the active :class:`OutputGuard`."""
    path = Path(path)
    active = [g for g in _active_guards() if g.covers(path)] if guard else []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    tmp = Path(name)
    digest = None
    try:
        try:
            os.chmod(tmp, _new_file_mode(path))
            yield tmp
            _fsync(tmp)
            for g in active:
                g.check(path)
            if active:
                digest = file_sha256(tmp)
            os.replace(tmp, path)
        except (OutputConflictError, WriteError):
            raise
        except OSError as exc:
            raise _write_error(path, exc) from None
        if digest is not None:
            for g in active:
                g.record(path, digest)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError:  # pragma: no cover - the directory became unwritable; nothing more to do
            pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, guard: bool = True) -> str:
    """Write ``data`` atomically; returns their sha256."""
    with atomic_path(path, guard=guard) as tmp:
        _write_bytes(tmp, bytes(data))
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str, *, guard: bool = True) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"), guard=guard)


def write_json(path: str | os.PathLike, obj: Any, *, guard: bool = True) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", guard=guard)


# --------------------------------------------------------------------------------------------- output manifest
class OutputGuard:
    """The manifest of an output directory: which files the framework wrote there, with their sha256.

    A file may be replaced when the manifest lists it with its current content (the framework's own, unedited
    output) or when ``overwrite`` is set; any other existing file is refused (:class:`OutputConflictError`).
    Paths outside ``root`` are not guarded."""

    def __init__(self, root: str | os.PathLike, overwrite: bool = False) -> None:
        self.root = Path(os.path.abspath(root))
        self.overwrite = bool(overwrite)
        self.path = self.root / MANIFEST
        self.files: dict[str, str] = self._read()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
            files = data["files"] if data.get("format") == "idls-defend-manifest" else {}
            return {str(k): str(v["sha256"]) for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # no (usable) manifest: no file counts as the framework's own

    def relative(self, path: str | os.PathLike) -> str | None:
        p = Path(os.path.abspath(path))
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return None
        return None if str(rel) in (".", MANIFEST) else rel.as_posix()

    def covers(self, path: str | os.PathLike) -> bool:
        return self.relative(path) is not None

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is an output of the framework, unchanged since it was written."""
        rel = self.relative(path)
        if rel is None or rel not in self.files or not os.path.isfile(path) or os.path.islink(path):
            return False
        try:
            return file_sha256(path) == self.files[rel]
        except OSError:
            return False

    def conflicts(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """The paths (relative to ``root``) that exist and may not be replaced."""
        if self.overwrite:
            return []
        out = []
        for p in paths:
            rel = self.relative(p)
            if rel is not None and os.path.lexists(p) and not self.owns(p) and rel not in out:
                out.append(rel)
        return out

    def refuse(self, paths: Iterable[str | os.PathLike]) -> None:
        """Raise :class:`OutputConflictError` (one line) when any of ``paths`` may not be replaced."""
        bad = self.conflicts(paths)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise OutputConflictError(
                f"refusing to overwrite {len(bad)} file(s) in {self.root} that defend did not write or that were "
                f"edited since: {shown}; move them away, choose another --out, or pass --overwrite to replace them")

    def check(self, path: str | os.PathLike) -> None:
        self.refuse([path])

    def record(self, path: str | os.PathLike, digest: str) -> None:
        rel = self.relative(path)
        if rel is None:
            return
        self.files[rel] = digest
        write_json(self.path, {"format": "idls-defend-manifest", "version": 1,
                               "files": {k: {"sha256": v} for k, v in sorted(self.files.items())}}, guard=False)


_GUARD: OutputGuard | None = None


_OUTER: list[OutputGuard] = []  # guards whose blocks enclose the active one's (a run inside a run)


@contextmanager
def guarded_outputs(guard: OutputGuard) -> Iterator[OutputGuard]:
    """Make ``guard`` check and record every :func:`atomic_path` write into its directory while the block runs.
    Nested blocks (``defend evaluate`` inside an experiment) keep the enclosing guards: a write is checked against
    and recorded in every active guard whose directory holds it, so a later run of the outer one owns it too."""
    global _GUARD
    previous, _GUARD = _GUARD, guard
    if previous is not None:
        _OUTER.append(previous)
    try:
        yield guard
    finally:
        if previous is not None:
            _OUTER.pop()
        _GUARD = previous


def _active_guards() -> list[OutputGuard]:
    return ([_GUARD] if _GUARD is not None else []) + [g for g in reversed(_OUTER) if g is not _GUARD]


def refuse_conflicts(*paths: str | os.PathLike) -> None:
    """Check several outputs against the active guards at once (so a pair is written entirely or not at all)."""
    for g in _active_guards():
        g.refuse(paths)


# --------------------------------------------------------------------------------------------- digests
def state_digest(state: Any) -> str:
    """SHA-256 of a (nested) state: keys, dtypes, shapes and the bytes of every tensor, in key order."""
    h = hashlib.sha256()

    def feed(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            for k in sorted(node, key=str):
                h.update(f"K{k!s}".encode())
                feed(node[k])
        elif isinstance(node, (list, tuple)):
            h.update(f"L{len(node)}".encode())
            for v in node:
                feed(v)
        else:
            h.update(f"V{node!r}".encode())

    feed(state)
    return h.hexdigest()


class Undescribable(TypeError):
    """An object whose configuration has no stable description (a cache keyed on it cannot be trusted)."""


#: attributes that do not change what an object computes (progress callbacks)
_NOT_SETTINGS = frozenset({"progress"})


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _code_digest(code: types.CodeType) -> str:
    h = hashlib.sha256(code.co_code)
    for c in code.co_consts:
        h.update(_code_digest(c).encode() if isinstance(c, types.CodeType) else repr(c).encode())
    h.update(repr(code.co_names).encode())
    return h.hexdigest()[:16]


def _public_attrs(obj: Any, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and k not in _NOT_SETTINGS | skip}


def describe(obj: Any, _where: str = "", _seen: tuple[int, ...] = ()) -> Any:
    """A JSON-serialisable, process-independent description of an object's configuration.

    Numbers, strings, containers; tensors by :func:`state_digest`; ``nn.Module`` by class, weights and the public
    attributes of every submodule; functions by name, byte code, defaults and closure; any other object by class and
    its public attributes (``_private`` runtime state such as optimiser buffers, and progress callbacks, are
    skipped). Raises :class:`Undescribable` for objects with no such description (e.g. a ``torch.Generator``).
    Limits: a function's globals are not described (only its name, code and closure)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, torch.Tensor):
        return {"tensor": state_digest(obj)}
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if id(obj) in _seen:
        return "<cycle>"
    seen = (*_seen, id(obj))

    def sub(v: Any, name: str) -> Any:
        return describe(v, f"{_where}.{name}" if _where else name, seen)

    if isinstance(obj, dict):
        return {"dict": {json.dumps(sub(k, "key"), sort_keys=True): sub(v, str(k)) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return [sub(v, str(i)) for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return {"set": sorted(json.dumps(sub(v, "item"), sort_keys=True) for v in obj)}
    if isinstance(obj, type):
        return {"class": _qualname(obj)}
    if isinstance(obj, types.MethodType):
        return {"method": sub(obj.__func__, "__func__"), "self": sub(obj.__self__, "__self__")}
    if isinstance(obj, types.FunctionType):
        closure = []
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                closure.append(sub(cell.cell_contents, f"<closure {i}>"))
            except ValueError:  # an empty cell
                closure.append("<empty>")
        return {"function": _qualname(obj), "code": _code_digest(obj.__code__), "closure": closure,
                "defaults": sub(obj.__defaults__ or (), "__defaults__"),
                "kwdefaults": sub(obj.__kwdefaults__ or {}, "__kwdefaults__")}
    if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return {"function": _qualname(obj)}
    if isinstance(obj, nn.Module):
        return {"module": _qualname(type(obj)), "state": state_digest(obj.state_dict()),
                "modules": {name or "<root>": {"class": _qualname(type(m)),
                                               "attrs": {k: sub(v, f"{name}.{k}" if name else k)
                                                         for k, v in _public_attrs(m, frozenset({"training"})).items()}}
                            for name, m in obj.named_modules()}}
    if hasattr(obj, "__dict__") and not isinstance(obj, types.ModuleType):
        return {"class": _qualname(type(obj)), "attrs": {k: sub(v, k) for k, v in _public_attrs(obj).items()}}
    raise Undescribable(f"{_where or 'the object'} is a {_qualname(type(obj))}, which has no stable description")


def settings_digest(obj: Any) -> str:
    """SHA-256 of :func:`describe` (raises :class:`Undescribable`)."""
    return hashlib.sha256(json.dumps(describe(obj), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- artifacts
def save_artifact(path: str | os.PathLike, kind: str, state: dict[str, Any], meta: dict[str, Any], *,
                  guard: bool = True) -> str:
    """Save ``{"format", "kind", "meta", "state", "sha256"}`` atomically; loadable with ``weights_only=True``.

    ``sha256`` (:func:`state_digest`) lets :func:`load_artifact` detect corrupted weights, which a zip archive
    whose bytes were damaged in place still yields without complaint. The archive is built in memory and written
    with plain file writes, so a full disk is an ``OSError`` (a :class:`WriteError` naming ``path``). Returns the
    sha256 of the file's bytes."""
    payload = {"format": "idls-defend", "format_version": FORMAT_VERSION, "kind": kind,
               "version": project_version(), "meta": meta, "state": state, "sha256": state_digest(state)}
    with atomic_path(path, guard=guard) as tmp:
        buf = BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        _write_bytes(tmp, data)
    return hashlib.sha256(data).hexdigest()


def load_artifact(path: str | os.PathLike, kind: str, *, data: bytes | None = None) -> dict[str, Any]:
    """Load an artifact written by :func:`save_artifact` (or a Lightning checkpoint) without running code.

    ``data``: the file's bytes, already read (and checked) by the caller; ``path`` then only names it."""
    path = Path(path)
    if data is None and not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path if data is None else BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle that wants to run code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {path} safely: {first[:200]}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not an idls-defend checkpoint (got {type(payload).__name__})")
    if payload.get("format") == "idls-defend":
        if payload.get("kind") != kind:
            raise CheckpointError(f"{path} holds a '{payload.get('kind')}' artifact, expected '{kind}'")
        digest = payload.get("sha256")  # absent in artifacts written before checksums
        if digest is not None and digest != state_digest(payload.get("state")):
            raise CheckpointError(f"{path} is corrupt: its weights do not match the checksum stored with them")
        return payload
    meta = payload.get("idls_meta")  # a Lightning checkpoint written by one of our modules
    if isinstance(meta, dict) and meta.get("kind") == kind:
        return {"format": "lightning", "kind": kind, "meta": meta, "state": payload.get("state_dict", {}),
                "version": meta.get("version")}
    if isinstance(meta, dict):
        raise CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, expected '{kind}'")
    raise CheckpointError(f"{path} is not an idls-defend checkpoint (foreign file: no format marker)")


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keys under ``prefix`` with the prefix removed (Lightning stores ``model.<key>``)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_state_checked(module: nn.Module, state: dict[str, Any], path: str | os.PathLike) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path} does not fit the model: {first[:300]}") from None


# --------------------------------------------------------------------------------------------- caches
def cache_notice(path: str | os.PathLike, why: str) -> None:
    """``[defend] cache entry <file> is <why>; recomputing`` on stderr."""
    print(f"[defend] cache entry {path} is {why}; recomputing", file=sys.stderr, flush=True)


def load_cache_entry(path: str | os.PathLike, kind: str) -> dict[str, Any] | None:
    """A cache entry's payload, or ``None`` (with a notice) when it is unreadable, truncated or foreign."""
    try:
        return load_artifact(path, kind)
    except FileNotFoundError:
        return None
    except (CheckpointError, OSError) as exc:
        text = " ".join(str(exc).split())
        cache_notice(path, f"unreadable ({text[:160]})")
        return None


def save_cache_entry(path: str | os.PathLike, kind: str, state: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Write a cache entry atomically (complete or absent); a failed write (disk full) is a one-line notice, not
    an error: the caller goes on with the result it computed. Returns whether the entry was written."""
    try:
        save_artifact(path, kind, state, meta, guard=False)
        return True
    except OSError as exc:
        print(f"[defend] cannot write cache entry {path}: {_reason(exc)}; going on without caching it",
              file=sys.stderr, flush=True)
        return False
