"""Artifacts: atomic writes and safe checkpoint loading (``torch.load(weights_only=True)``, no code runs)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["atomic_path", "atomic_write_text", "write_json", "save_artifact", "load_artifact",
           "CheckpointError", "FORMAT_VERSION", "project_version", "state_digest"]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is corrupt, truncated, foreign or does not fit the model / data it is used with."""


def project_version() -> str:
    try:
        from importlib.metadata import version

        return version("idls-defend")
    except Exception:  # pragma: no cover - running from a source tree
        return "0+unknown"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


def save_artifact(path: str | os.PathLike, kind: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Save ``{"format", "kind", "meta", "state", "sha256"}`` atomically; loadable with ``weights_only=True``.

    ``sha256`` (:func:`state_digest`) lets :func:`load_artifact` detect corrupted weights, which a zip archive
    whose bytes were damaged in place still yields without complaint."""
    payload = {"format": "idls-defend", "format_version": FORMAT_VERSION, "kind": kind,
               "version": project_version(), "meta": meta, "state": state, "sha256": state_digest(state)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_artifact(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Load an artifact written by :func:`save_artifact` (or a Lightning checkpoint) without running code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
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
