"""Detection data for the multi-interpreter detector (AdvEdge section VIII).

Benign inputs and adversarial inputs crafted by the attack core (ADV2 / AdvEdge / AdvEdge+ against one target
interpreter, or the adaptive ensemble), and for every input the maps of the chosen interpreters for the class the
classifier predicts (the adversarial target class for a successful attack). Maps are ``[N, 1, H, W]`` in [0, 1] on the
input grid; :func:`stack_maps` stacks them as channels, optionally with the product of two maps as an extra channel.

Built batch by batch with a progress bar; every batch is cached on disk (``torch.save`` of a dict of tensors plus
metadata, written atomically, read back with ``weights_only=True``) under a key derived from the configuration, so
tables can be re-run without re-attacking and an interrupted build resumes at the first missing batch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attacks._state import frozen
from attacks.interpreters import Interpreter

from .io import CheckpointError, load_artifact, save_artifact

__all__ = ["cache_key", "code_fingerprint", "stack_maps", "compute_maps", "build_detection_data", "combine", "load_detection_data",
           "save_detection_data", "select"]

KIND = "detection-batch"


def cache_key(spec: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable description of how the data are built."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_fingerprint() -> str:
    """Hash of the attack / interpreter sources (``attacks/**.py``): a code change invalidates cached maps."""
    import attacks

    root = Path(attacks.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stack_maps(maps: Mapping[str, Tensor], names: Sequence[str], product: bool | Sequence[str] = False) -> Tensor:
    """Stack the ``[N, 1, H, W]`` maps of ``names`` as channels -> ``[N, C, H, W]``.

    ``product=True`` appends the product of the first two maps (``a * b``, still in [0, 1]) as an extra channel;
    a pair of names picks the two maps explicitly.
    """
    if not names:
        raise ValueError("stack_maps needs at least one interpreter name")
    missing = [n for n in names if n not in maps]
    if missing:
        raise KeyError(f"no maps for interpreter(s) {missing}; have {sorted(maps)}")
    chans = [maps[n].float() for n in names]
    for n, c in zip(names, chans):
        if c.dim() != 4 or c.shape[1] != 1:
            raise ValueError(f"maps of '{n}' must be [N, 1, H, W], got {tuple(c.shape)}")
    if product:
        pair = list(names[:2]) if product is True else list(product)
        if len(pair) != 2:
            raise ValueError(f"the product channel needs two maps, got {pair}")
        chans.append(maps[pair[0]].float() * maps[pair[1]].float())
    return torch.cat(chans, 1).clamp(0, 1)


def compute_maps(model: nn.Module, x: Tensor, interpreters: Mapping[str, Interpreter],
                 cls: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Maps of every interpreter for class ``cls`` (default: the prediction) and the predictions."""
    with frozen(model):
        with torch.no_grad():
            pred = model(x).argmax(1)
        cls = pred if cls is None else cls
        maps = {n: g(model, x, cls).detach().float().clamp(0, 1) for n, g in interpreters.items()}
    return maps, pred


def _batch_path(cache_dir: Path, kind: str, i: int) -> Path:
    return cache_dir / f"{kind}_{i:05d}.pt"


def _build_set(kind: str, x: Tensor, model: nn.Module, interpreters: Mapping[str, Interpreter], batch_size: int,
               make_inputs: Callable[[Tensor, slice], tuple[Tensor, dict[str, Tensor]]] | None,
               cache_dir: Path | None, meta: dict[str, Any], bar: Any) -> dict[str, Tensor]:
    parts: list[dict[str, Tensor]] = []
    for b, i in enumerate(range(0, x.shape[0], batch_size)):
        sl = slice(i, i + batch_size)
        path = None if cache_dir is None else _batch_path(cache_dir, kind, b)
        part = None
        if path is not None and path.is_file():
            try:
                payload = load_artifact(path, KIND)
                if payload["meta"].get("key") == meta.get("key"):
                    part = payload["state"]
            except CheckpointError:
                part = None  # corrupt / foreign: rebuild this batch
        if part is None:
            xb, extra = (x[sl], {}) if make_inputs is None else make_inputs(x[sl], sl)
            maps, pred = compute_maps(model, xb, interpreters)
            part = {"image": xb.detach().float(), "pred": pred, **{f"map_{n}": m for n, m in maps.items()}, **extra}
            if path is not None:
                save_artifact(path, KIND, part, {**meta, "set": kind, "batch": b})
        parts.append(part)
        if bar is not None:
            bar.update(int(part["image"].shape[0]))
    keys = parts[0].keys() if parts else []
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def build_detection_data(model: nn.Module, interpreters: Mapping[str, Interpreter], *, benign: Tensor | None = None,
                         source: Tensor | None = None, target: Tensor | None = None, attack: Any = None,
                         batch_size: int = 32, cache_dir: str | Path | None = None,
                         spec: Mapping[str, Any] | None = None, progress: bool = True,
                         desc: str = "detection data") -> dict[str, Any]:
    """Benign and / or adversarial inputs with the maps of every interpreter.

    Args:
        model: the classifier (frozen while maps and attacks run).
        interpreters: ``{name: interpreter}`` whose maps are recorded (for the predicted class).
        benign: benign inputs (label 0).
        source, target, attack: the attack (an :class:`attacks.adv2.ADV2`) is run on ``source`` toward ``target``
            batch by batch; the adversarial inputs get label 1, with ``success`` (prediction == target) recorded.
        cache_dir: directory for the per-batch cache; the key of ``spec`` (plus the interpreter names and a hash of
            the ``attacks`` sources) names a sub-directory, so a different configuration or changed attack /
            interpreter code never reuses stale batches.
        spec: a JSON-serialisable description of everything that determines the data (cache key).

    Returns ``{"maps": {name: [N,1,H,W]}, "label": [N], "image", "pred", "success" (adversarial only, benign True),
    "attack_seconds", "map_names", "key"}``.
    """
    spec = dict(spec or {})
    spec["interpreters"] = sorted(interpreters)
    spec.setdefault("code", code_fingerprint())
    key = cache_key(spec)
    cdir = None
    if cache_dir is not None:
        cdir = Path(cache_dir) / key
        cdir.mkdir(parents=True, exist_ok=True)
    meta = {"key": key, "spec": json.dumps(spec, sort_keys=True, default=str)}
    total = (0 if benign is None else benign.shape[0]) + (0 if source is None else source.shape[0])
    bar = tqdm(total=total, desc=desc, unit="input", disable=not progress)
    sets: list[dict[str, Tensor]] = []
    if benign is not None:
        part = _build_set("benign", benign, model, interpreters, batch_size, None, cdir, meta, bar)
        part["label"] = torch.zeros(benign.shape[0], dtype=torch.long)
        part["success"] = torch.ones(benign.shape[0], dtype=torch.bool)
        part["attack_seconds"] = torch.zeros(benign.shape[0])
        sets.append(part)
    if source is not None:
        if attack is None or target is None:
            raise ValueError("adversarial data need an attack and target classes")

        def make(xb: Tensor, sl: slice) -> tuple[Tensor, dict[str, Tensor]]:
            res = attack(model, xb, target[sl])
            per = torch.full((xb.shape[0],), res.seconds / max(xb.shape[0], 1))
            return res.x_adv.detach(), {"success": res.success.cpu(), "target": res.target.cpu(), "attack_seconds": per}

        part = _build_set("adversarial", source, model, interpreters, batch_size, make, cdir, meta, bar)
        part["label"] = torch.ones(source.shape[0], dtype=torch.long)
        part.pop("target", None)
        sets.append(part)
    bar.close()
    data = combine(sets) if len(sets) > 1 else sets[0]
    out = _unflatten(data)
    out["key"] = key
    return out


def combine(sets: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate flat sets (``map_<name>`` keys) or structured sets (``maps`` dict) along the batch."""
    flat = [dict(_flatten(s)) for s in sets]
    keys = set(flat[0])
    for f in flat[1:]:
        keys &= set(f)
    return {k: torch.cat([f[k] for f in flat]) for k in sorted(keys) if isinstance(flat[0][k], Tensor)}


def select(data: Mapping[str, Any], idx: Tensor) -> dict[str, Any]:
    """Rows ``idx`` of a structured data dict."""
    out = {k: (v[idx] if isinstance(v, Tensor) else v) for k, v in data.items() if k != "maps"}
    out["maps"] = {n: m[idx] for n, m in data["maps"].items()}
    return out


def _flatten(data: Mapping[str, Any]) -> dict[str, Tensor]:
    flat = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    for n, m in (data.get("maps") or {}).items():
        flat[f"map_{n}"] = m
    return flat


def _unflatten(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in flat.items() if not k.startswith("map_")}
    out["maps"] = {k[4:]: v for k, v in flat.items() if k.startswith("map_")}
    out["map_names"] = sorted(out["maps"])
    return out


def save_detection_data(path: str | Path, data: Mapping[str, Any], meta: dict[str, Any] | None = None) -> None:
    """Save a structured data dict safely (atomic ``torch.save`` of tensors, loadable with ``weights_only``)."""
    save_artifact(path, "detection-data", _flatten(data), dict(meta or {}))


def load_detection_data(path: str | Path) -> dict[str, Any]:
    payload = load_artifact(path, "detection-data")
    out = _unflatten(payload["state"])
    out["meta"] = payload["meta"]
    return out
