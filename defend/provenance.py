"""Where a result came from: ``provenance.json`` beside every run's outputs (and inside ``card.json``).

Package versions, the git commit of the source tree (or "not a git checkout", with a dirty flag), the seed, a digest
of the data the run read and which splits it read (``data_read``: train, val = the development split, test), the
command line, the device and the start and end times. Every ``metrics.json`` row names its own split too.
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance", "git_state", "package_versions", "data_digest", "note_data", "noted_data", "noted_splits",
           "PACKAGES"]

_NOTED: list[str] = []  # digests of the inputs a run read (note_data), reset by the runner at the start of a run
_SPLITS: list[dict[str, Any]] = []  # the split and size of each of those reads (provenance.json: "data_read")

PACKAGES = ("idls-defend", "torch", "torchvision", "pytorch-lightning", "torchmetrics", "numpy", "scikit-learn",
            "xgboost", "jsonargparse", "pyautoattack")
_ROOT = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_state(root: Path = _ROOT) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the source tree, or ``{"commit": "not a git checkout"}``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "not a git checkout"}


def data_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the bytes of the tensors a run read (images, labels, ...)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def note_data(*tensors: torch.Tensor, split: str | None = None) -> None:
    """Record the digest of inputs a run reads (the experiments' input selection calls it) and the split they came
    from (``provenance.json``'s ``data_read``: which split every figure was measured on)."""
    digest = data_digest(*tensors)
    _NOTED.append(digest)
    if split is not None:
        _SPLITS.append({"split": split, "n": int(tensors[0].shape[0]) if tensors else 0, "digest": digest})


def noted_splits() -> list[dict[str, Any]]:
    """The splits read since the last reset, merged by split: ``[{"split", "reads", "max_n"}]``."""
    merged: dict[str, dict[str, Any]] = {}
    for entry in _SPLITS:
        m = merged.setdefault(entry["split"], {"split": entry["split"], "reads": 0, "max_n": 0})
        m["reads"] += 1
        m["max_n"] = max(m["max_n"], entry["n"])
    return list(merged.values())


def noted_data(reset: bool = False) -> str | None:
    """One digest over everything noted since the last reset (``None`` if nothing was read)."""
    out = hashlib.sha256("|".join(_NOTED).encode()).hexdigest()[:16] if _NOTED else None
    if reset:
        _NOTED.clear()
        _SPLITS.clear()
    return out


def _device() -> dict[str, Any]:
    out: dict[str, Any] = {"platform": platform.platform(), "processor": platform.machine(),
                           "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    return out


def provenance(start: float, seed: int, data: str | None = None, argv: list[str] | None = None,
               **extra: Any) -> dict[str, Any]:
    """The provenance record of a run that started at ``start`` (``time.time()``) and ends now."""
    return {"format": "idls-defend-provenance", "version": 1,
            "command": " ".join(argv if argv is not None else ["defend", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - start, 1),
            "seed": int(seed), "data_digest": data, "data_read": noted_splits(), "source": git_state(),
            "packages": package_versions(), "device": _device(), **extra}
