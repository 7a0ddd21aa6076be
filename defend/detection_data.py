"""Detection data for the multi-interpreter detector (AdvEdge section VIII).

Benign inputs and adversarial inputs crafted by the attack core (ADV2 / AdvEdge / AdvEdge+ against one target
interpreter, or the adaptive ensemble), and for every input the maps of the chosen interpreters for the class the
classifier predicts (the adversarial target class for a successful attack). Maps are ``[N, 1, H, W]`` in [0, 1] on the
input grid; :func:`stack_maps` stacks them as channels, optionally with the product of two maps as an extra channel.

Built batch by batch with a progress bar; every batch is cached on disk (``torch.save`` of a dict of tensors plus
metadata, written atomically - an entry is complete or absent - and read back with ``weights_only=True``), so tables
can be re-run without re-attacking and an interrupted build resumes at the first missing batch. The cache is keyed
on content: the directory on the spec, the classifier's weights and the settings of the interpreters and of the
attack (:func:`defend.io.describe`); every entry on a digest of its batch's input tensors (images, and target
classes for adversarial sets), checked on reuse. A reused entry is also validated (shapes, dtypes, finite values,
maps in [0, 1], adversarial images on the uint8 grid and inside the attack's L-inf ball) and recomputed with a
notice otherwise; a cache write that fails (disk full) is a notice and the build goes on.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import attacks
from attacks.interpreters import Interpreter
from attacks.state import frozen

from .evaluation import check_adversarial
from .io import (
    Undescribable,
    cache_notice,
    describe,
    load_artifact,
    load_cache_entry,
    save_artifact,
    save_cache_entry,
    state_digest,
)

__all__ = ["cache_key", "code_fingerprint", "stack_maps", "compute_maps", "build_detection_data", "combine", "load_detection_data",
           "save_detection_data", "select"]

KIND = "detection-batch"


def cache_key(spec: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable description of how the data are built."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_fingerprint() -> str:
    """Hash of the attack / interpreter sources (``attacks/**.py``): a code change invalidates cached maps."""

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


def _check_part(part: Mapping[str, Any], kind: str, x_in: Tensor, names: Sequence[str], attack: Any) -> str | None:
    """Why a cached batch cannot be what :func:`_build_set` computes for inputs ``x_in`` (``None`` when it can)."""
    n = x_in.shape[0]
    need = ["image", "pred", *(f"map_{m}" for m in names)]
    if kind != "benign":
        need += ["success", "target", "attack_seconds"]
    missing = [k for k in need if not isinstance(part.get(k), Tensor)]
    if missing:
        return f"missing {', '.join(missing)}"
    image = part["image"]
    if kind == "benign":
        if image.shape != x_in.shape or image.dtype != torch.float32:
            return (f"holding images of shape {tuple(image.shape)} / {image.dtype}, "
                    f"expected {tuple(x_in.shape)} / float32")
        if not torch.equal(image, x_in.detach().float().cpu()):
            return "holding other images than its inputs"
    else:
        why = check_adversarial(image, x_in.detach().float().cpu(), attack)
        if why is not None:
            return f"holding adversarial images {why}"
    for name in names:
        m = part[f"map_{name}"]
        if m.shape != (n, 1, *x_in.shape[-2:]) or not m.is_floating_point():
            return f"holding '{name}' maps of shape {tuple(m.shape)} / {m.dtype}, expected {(n, 1, *x_in.shape[-2:])}"
        if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
            return f"holding '{name}' maps that are not finite values in [0, 1]"
    vectors = [("pred", False)] + ([("success", None), ("target", False), ("attack_seconds", True)]
                                   if kind != "benign" else [])
    for k, floating in vectors:
        v = part[k]
        ok_dtype = (v.dtype == torch.bool) if floating is None else (v.is_floating_point() == floating
                                                                     and v.dtype != torch.bool)
        if v.shape != (n,) or not ok_dtype:
            return f"holding '{k}' of shape {tuple(v.shape)} / {v.dtype}"
    if kind != "benign" and not bool((torch.isfinite(part["attack_seconds"]) & (part["attack_seconds"] >= 0)).all()):
        return "holding invalid attack times"
    return None


def _build_set(kind: str, x: Tensor, model: nn.Module, interpreters: Mapping[str, Interpreter], batch_size: int,
               make_inputs: Callable[[Tensor, slice], tuple[Tensor, dict[str, Tensor]]] | None,
               cache_dir: Path | None, meta: dict[str, Any], bar: Any, inputs: Mapping[str, Tensor] | None = None,
               attack: Any = None) -> dict[str, Tensor]:
    parts: list[dict[str, Tensor]] = []
    names = sorted(interpreters)
    for b, i in enumerate(range(0, x.shape[0], batch_size)):
        sl = slice(i, i + batch_size)
        path = None if cache_dir is None else _batch_path(cache_dir, kind, b)
        part = None
        # the entry is keyed on the batch's input tensors too: inputs rewritten in place are never served stale
        entry = cache_key({"key": meta.get("key"), "set": kind, "batch": b,
                           "inputs": state_digest({"image": x[sl], **{k: v[sl] for k, v in (inputs or {}).items()}})})
        if path is not None and path.is_file():
            payload = load_cache_entry(path, KIND)
            if payload is not None:
                meta_in, state = payload.get("meta"), payload.get("state")
                if not isinstance(meta_in, dict) or meta_in.get("entry") != entry:
                    why = "stale (built from other inputs or settings)"
                elif not isinstance(state, dict):
                    why = "not a batch of tensors"
                else:
                    why = _check_part(state, kind, x[sl], names, attack)
                if why is None:
                    part = state
                else:
                    cache_notice(path, why)
        if part is None:
            xb, extra = (x[sl], {}) if make_inputs is None else make_inputs(x[sl], sl)
            maps, pred = compute_maps(model, xb, interpreters)
            part = {"image": xb.detach().float().cpu(), "pred": pred.cpu(),
                    **{f"map_{n}": m.cpu() for n, m in maps.items()}, **extra}
            if path is not None:  # a failed write (disk full) is a notice: the batch is used uncached
                save_cache_entry(path, KIND, part, {**meta, "set": kind, "batch": b, "entry": entry})
        parts.append(part)
        if bar is not None:
            bar.update(int(part["image"].shape[0]))
    keys = parts[0].keys() if parts else []
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def _cache_spec(model: nn.Module, interpreters: Mapping[str, Interpreter], attack: Any,
                spec: Mapping[str, Any] | None, cache_dir: str | Path | None,
                desc: str) -> tuple[dict[str, Any], str | Path | None]:
    """The cache key's description (code, weights, interpreter and attack settings) and the cache directory to use
    (``None`` with a notice when a setting has no stable description)."""
    spec = dict(spec or {})
    spec.setdefault("code", code_fingerprint())
    spec["model"] = state_digest(model.state_dict())
    try:
        spec["interpreters"] = {n: describe(g) for n, g in sorted(interpreters.items())}
        spec["attack_settings"] = describe(attack) if attack is not None else None
    except Undescribable as exc:
        if cache_dir is not None:
            print(f"[defend] {desc} is not cached: its settings cannot be described stably ({exc})",
                  file=sys.stderr, flush=True)
        cache_dir = None
        spec["interpreters"] = sorted(interpreters)
    return spec, cache_dir


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
        cache_dir: directory for the per-batch cache; the key of ``spec`` plus the classifier's weights, the
            settings of the interpreters and of the attack (:func:`defend.io.describe`) and a hash of the ``attacks``
            sources names a sub-directory, and every entry records a digest of its batch's inputs, so other inputs,
            weights, settings or attack / interpreter code never reuse stale batches. An object whose settings have
            no stable description disables the cache (with a notice).
        spec: a JSON-serialisable description of how the data were chosen (part of the cache key).

    Returns ``{"maps": {name: [N,1,H,W]}, "label": [N], "image", "pred", "success" (adversarial only, benign True),
    "attack_seconds", "map_names", "key"}``.
    """
    spec, cache_dir = _cache_spec(model, interpreters, attack if source is not None else None, spec, cache_dir, desc)
    key = cache_key(spec)
    cdir = None if cache_dir is None else Path(cache_dir) / key
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

        part = _build_set("adversarial", source, model, interpreters, batch_size, make, cdir, meta, bar,
                          inputs={"target": target}, attack=attack)
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
