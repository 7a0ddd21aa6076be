"""The leaderboard entry of a card (``card.json``'s ``entry``, :class:`defend.rows.BenchEntry`), RobustBench-style:
:func:`entry_from_card` builds it from the card's own sections (``system``, ``data``, ``battery``, ``results``,
``provenance``) alone, so ``defend evaluate`` and ``defend card upgrade`` make the same entry of the same card.

Dual robustness (docs/card.md): an attacked input is *broken* by an attack when it reaches the target class (the
attack row's per-input ``asr``), and for a system with a detector when it reaches the target and evades the detector
(the detection row's per-input ``evasion``). ``dual_robustness``: the share of the attacked inputs that no standard
attack on the defence's interpreters breaks; ``dual_robustness_adaptive``: the share that no standard *or* adaptive
attack breaks (so it is never above the plain figure); ``adaptive_gap``: the first minus the second on the same
inputs (>= 0), with a paired bootstrap interval and McNemar's exact p.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from .. import stats
from ..rows import BenchAttack, BenchEntry, Fig

__all__ = ["entry_from_card", "inputs_sha256", "dual_robustness", "certified_fields", "THIS_RUN"]

#: the ``source`` of an entry measured by the run that wrote the card
THIS_RUN = "this run"


def inputs_sha256(dm: Any) -> str:
    """sha256 (hex) of the test split's images as uint8 bytes (``round(255 x)``), in split order; the read is
    noted for the provenance's ``data_read`` like every other (:func:`defend.inputs.take_split`)."""
    from ..inputs import take_split

    images = take_split(dm, "test")["image"]
    as_bytes = (images.detach().cpu().float() * 255).round().clamp(0, 255).to(torch.uint8).contiguous()
    return hashlib.sha256(as_bytes.numpy().tobytes()).hexdigest()


def entry_from_card(card: dict[str, Any], *, name: str, source: str | None = None, defence: str | None = None,
                    inputs_sha256: str | None = None) -> dict[str, Any]:
    """The ``entry`` of ``card`` (schema 2.x; every other section filled): ``name`` and ``source`` (default
    :data:`THIS_RUN`) as given, ``defence`` a registered defence name or ``None``, ``inputs_sha256`` as
    :func:`inputs_sha256` computed it (``None``: not recorded)."""
    system, battery, results, prov = card["system"], card["battery"], card["results"], card["provenance"]
    eps = threat_eps(battery)
    clean = results["clean_accuracy"]
    aa = next((r for r in results.get("autoattack") or [] if abs(float(r["eps"]) - eps) < 1e-9), None)
    topk = _topk_row(results, battery)
    return BenchEntry(
        name=name, source=source or THIS_RUN, architecture=_architecture(system["classifier"]["meta"]),
        training_data=_training_data(system["classifier"]["meta"], card["data"]),
        defence={"name": defence, "recipe": _recipe(system)}, threat_model={"norm": "Linf", "eps": eps},
        clean_acc=Fig.get(clean, "value"), clean_n=int(clean["n"]),
        autoattack_acc=Fig.get(aa or {}, "robust_accuracy"), autoattack_n=None if aa is None else int(aa["n"]),
        topk_tau=Fig.get(topk or {}, "kendall_tau"), topk_n=None if topk is None else int(topk["n_kept"]),
        topk_interpreter=None if topk is None else topk["interpreter"],
        topk_protocol=None if topk is None else topk.get("protocol"),
        attacks=_attacks(results), **dual_robustness(card, _defence_interpreters(defence)),
        **certified_fields(results),
        number_forward_passes=1, eval_seconds=float(prov["seconds"]), device=_device(prov.get("device") or {}),
        external_evaluations=[], inputs_sha256=inputs_sha256,
        weights_sha256={k: (system[k] or {}).get("sha256") for k in ("classifier", "rts", "detector")}).to_dict()


def threat_eps(battery: dict[str, Any]) -> float:
    """The entry's L-inf radius: the battery's largest AutoAttack radius, else its top-k attack's."""
    radii = [float(e) for e in (battery.get("autoattack") or {}).get("eps") or []]
    return max(radii) if radii else float(battery["topk"]["eps"])


def certified_fields(results: dict[str, Any]) -> dict[str, Any]:
    """The entry's certificate fields: the dual-certified accuracy of the first certified interpreter at the first
    radius > 0 of its rows, that radius, its n and the sigma (all ``None`` where the card has no certificates)."""
    rows = results.get("certification") or []
    first = [r for r in rows if r["interpreter"] == rows[0]["interpreter"] and r["radius"] > 0]
    if not first:
        return {"dual_certified_acc": Fig(None), "certified_radius": None, "certified_n": None,
                "certify_sigma": float(rows[0]["sigma"]) if rows else None}
    r = first[0]
    return {"dual_certified_acc": Fig.get(r, "dual_certified_accuracy"), "certified_radius": float(r["radius"]),
            "certified_n": int(r["n"]), "certify_sigma": float(r["sigma"])}


def _topk_row(results: dict[str, Any], battery: dict[str, Any]) -> dict[str, Any] | None:
    """The top-k row of the battery's first top-k interpreter (``None``: not measured)."""
    names = (battery.get("topk") or {}).get("interpreters") or []
    rows = results.get("interpretation_robustness") or []
    return next((r for r in rows if names and r["interpreter"] == names[0]), None)


def _architecture(meta: dict[str, Any]) -> str:
    """``small_cnn (width 32)``: the architecture and its model options."""
    opts = ", ".join(f"{k} {v}" for k, v in sorted((meta.get("model_options") or {}).items()))
    return f"{meta['arch']} ({opts})" if opts else str(meta["arch"])


def _training_data(meta: dict[str, Any], data: dict[str, Any]) -> str | None:
    """The data the classifier's artifact says it was trained on, else the evaluated data's name."""
    for key in ("training_data", "data"):
        if isinstance(meta.get(key), str) and meta[key]:
            return meta[key]
    return data.get("name")


def _recipe(system: dict[str, Any]) -> dict[str, Any] | None:
    """The training metadata the artifacts record (``None`` when none does)."""
    recipe = {"classifier": system["classifier"]["meta"].get("robust_training"),
              "rts": (system.get("rts") or {}).get("network"),
              "detector": (system.get("detector") or {}).get("hparams")}
    return {k: v for k, v in recipe.items() if v} or None


def _device(device: dict[str, Any]) -> str:
    """The GPU that ran the evaluation, else the CPU (``cpu x86_64, 2 threads``)."""
    if device.get("gpus"):
        return str(device["gpus"][0])
    return f"cpu {device.get('processor') or '?'}, {device.get('cpu_threads', '?')} threads"


def _attacks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """A :class:`BenchAttack` per attack row read by the interpreter it attacked (an ensemble's by each reader)."""
    rows = [r for r in results.get("attacks") or []
            if r["read_by"] == r["interpreter"] or "+" in r["interpreter"]]
    return [BenchAttack(attack=r["attack"], interpreter=r["read_by"], kind=r["kind"], success=Fig.get(r, "asr"),
                        l1=Fig.get(r, "l1"), iou=Fig.get(r, "iou"), n=int(r["n"]),
                        budget_preset=r["budget_preset"]).to_dict() for r in rows]


def _defence_interpreters(defence: str | None) -> list[str] | None:
    """The registered defence's interpreters (``None``: no defence named, or it reports those the battery
    attacks)."""
    if defence is None:
        return None
    from ..defences import defence as registered

    names = registered(defence).interpreters
    return None if names is None else list(names)


def _broken(card: dict[str, Any], interpreters: list[str] | None) -> tuple[list[Any], dict[str, Any]]:
    """Per-input "broken" lists of the standard attacks on ``interpreters`` (``None``: every attacked one) and of
    each adaptive run by name; a list is ``None`` where the row has no per-input values."""
    detection = (card["results"].get("detection") or {}) if card["system"].get("detector") else None
    if detection is not None:
        rows, key = detection.get("rows") or [], "evasion"
    else:
        rows = [r for r in card["results"].get("attacks") or []
                if r["read_by"] == r["interpreter"] or "+" in r["interpreter"]]
        key = "asr"
    standard, adaptive = [], {}
    for r in rows:
        values = (r.get("per_input") or {}).get(key)
        if r["kind"] == "standard" and (interpreters is None or r["interpreter"] in interpreters):
            standard.append(values)
        elif r["kind"] == "adaptive":
            adaptive.setdefault(f"{r['attack']} ({r['interpreter']})", values)
    return standard, adaptive


_NULL_DUAL = {"dual_robustness": Fig(None), "dual_robustness_adaptive": Fig(None), "adaptive_gap": Fig(None),
              "adaptive_gap_p": None, "dual_n": None}


def dual_robustness(card: dict[str, Any], interpreters: list[str] | None = None) -> dict[str, Any]:
    """The entry's dual robustness fields (module docstring) from the card's per-input values; the figures are
    ``None`` where a row lacks them or the rows disagree on the inputs, the adaptive ones where no adaptive attack
    ran."""
    standard, adaptive = _broken(card, interpreters)
    lists = standard + list(adaptive.values())
    if not standard or any(v is None for v in lists) or len({len(v) for v in lists}) != 1 or not standard[0]:
        return {**_NULL_DUAL, "adaptive_attacks": sorted(adaptive)}
    plain = np.max(np.asarray(standard, dtype=float), axis=0) > 0
    out = {**_NULL_DUAL, "dual_robustness": Fig.of(stats.proportion(~plain)), "dual_n": int(plain.size),
           "adaptive_attacks": sorted(adaptive)}
    if adaptive:
        every = plain | (np.max(np.asarray(list(adaptive.values()), dtype=float), axis=0) > 0)
        robust_plain, robust_every = (~plain).astype(float), (~every).astype(float)
        seed = int(card["battery"].get("seed", 0))
        out.update(dual_robustness_adaptive=Fig.of(stats.proportion(~every)),
                   adaptive_gap=Fig.of(stats.paired_bootstrap(robust_plain, robust_every, seed).difference),
                   adaptive_gap_p=float(stats.mcnemar(robust_plain, robust_every, seed).p_value))
    return out
