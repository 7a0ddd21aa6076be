"""Experiment ``attacks``: ADV2 / AdvEdge / AdvEdge+ and plain attacks on PGD, C&W and StAdv against GRAD, CAM, MASK.

Writes one row per attack x framework x interpreter (ASR, confidence, map L1 / L2 / IoU to the benign map,
noise rate, seconds per input), the papers' tables in ``report.md``, a transferability table
(inputs crafted against interpreter A, read by interpreter B) and ``maps.png`` (the papers' Figure 4).
"""
from __future__ import annotations

import hashlib
import json
import time

from pathlib import Path
from typing import Any

import torch

from attacks import ATTACKS, build_attack, random_targets
from attacks.frameworks import FRAMEWORKS
from attacks.interpreters import INTERPRETERS
from ..interpreters import build_interpreter

from ..detection_data import code_fingerprint
from ..evaluation import PlanItem, evaluate_plan, interpret
from .common import deep_get, get_classifier, make_trainer, markdown_table, select_correct, setup_data, write_outputs
from ..figures import map_grid

__all__ = ["run", "attack_options"]


def attack_options(cfg: dict[str, Any], attack: str, framework: str, interpreter: str) -> dict[str, Any]:
    """Shared ``attack:`` options, then ``per_framework.<fw>``, then ``per_interpreter.<interp>`` overrides."""
    opts = dict(cfg.get("attack") or {})
    fw_opts = dict(opts.pop("framework_options", {}) or {})
    layers = [deep_get(cfg, f"per_framework.{framework}")]
    if attack != "pgd":
        layers += [deep_get(cfg, f"per_interpreter.{interpreter}"),
                   deep_get(cfg, f"per_interpreter_framework.{interpreter}_{framework}")]
    for layer in layers:
        layer = dict(layer or {})
        fw_opts.update(layer.pop("framework_options", {}) or {})
        opts.update(layer)
    eps, alpha = opts.pop("eps", 0.031), opts.pop("alpha", 1 / 255)
    if framework == "pgd":
        fw_opts = {"eps": eps, "alpha": alpha, **fw_opts}
    opts["framework_options"] = fw_opts
    opts["interpreter_options"] = deep_get(cfg, "interpreter_options") or {}
    return opts


def _validate(ecfg: dict[str, Any]) -> None:
    for key, known in (("attacks", ATTACKS), ("frameworks", FRAMEWORKS), ("interpreters", INTERPRETERS)):
        for name in ecfg.get(key, []):
            if name not in known:
                raise ValueError(f"unknown {key[:-1]} '{name}' in evaluation.{key}; choose from: {', '.join(known)}")


def run(cfg: dict[str, Any], out: Path, progress: bool = True) -> list[dict[str, Any]]:
    ecfg = dict(cfg.get("evaluation") or {})
    ecfg.setdefault("attacks", ["pgd", "adv2", "advedge", "advedge_plus"])
    ecfg.setdefault("frameworks", ["pgd", "cw", "stadv"])
    ecfg.setdefault("interpreters", ["grad", "cam", "mask"])
    _validate(ecfg)
    seed = int(cfg.get("seed", 0))
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    data = select_correct(model, dm, int(ecfg.get("n_images", 64)))
    x, y = data["image"], data["label"]
    y_t = random_targets(y, dm.num_classes, torch.Generator().manual_seed(seed))
    bs = int(ecfg.get("batch_size", 64))
    interps = {n: build_interpreter(n, **(deep_get(cfg, f"interpreter_options.{n}") or {})) for n in ecfg["interpreters"]}
    transfer_fw = ecfg.get("transfer_framework", "pgd")
    plan: list[PlanItem] = []
    for fw in ecfg["frameworks"]:
        for attack in ecfg["attacks"]:
            for target_interp in (ecfg["interpreters"] if attack != "pgd" else [None]):
                opts = attack_options(cfg, attack, fw, target_interp or "cam")
                engine = build_attack(attack, fw, interps[target_interp] if target_interp else "cam", seed=seed, **opts)
                readers = ecfg["interpreters"] if (target_interp is None or fw == transfer_fw) else [target_interp]
                plan.append(PlanItem(attack, fw, target_interp, engine, list(readers)))
    n_show = int(ecfg.get("n_figure", 3))
    trainer = make_trainer(cfg, 1, inference_mode=False, use_distributed_sampler=False, enable_progress_bar=False,
                           logger=False)
    # per-batch resume cache: a re-run skips finished batches. AttackEvaluation keys every entry on the batch's
    # tensors, the classifier's weights and the engine's settings; this key adds what those cannot see: the code
    cache = ecfg.get("cache_dir", str(Path(cfg.get("output_dir") or out) / "attack_cache"))
    key = hashlib.sha256(json.dumps({"attack_code": code_fingerprint(), "format": 2}).encode()).hexdigest()[:16]
    start = time.perf_counter()
    ev = evaluate_plan(model, interps, plan, {"image": x, "label": y, "target": y_t}, trainer, batch_size=bs,
                       keep=n_show, cache_dir=cache, cache_key=key, progress=progress)
    wall = time.perf_counter() - start
    if not trainer.is_global_zero:  # one rank publishes; the figures are already synced on every rank
        return []
    rows: list[dict[str, Any]] = []
    transfer: list[dict[str, Any]] = []
    for item in plan:
        for reader in item.readers:
            res = ev.results[(item.key, reader)]
            if item.interpreter is None or reader == item.interpreter:
                rows.append({"attack": item.attack, "framework": item.framework, "interpreter": reader, **res,
                             "processes": trainer.world_size, "evaluation_wall_seconds": wall})
            if item.interpreter is not None and item.framework == transfer_fw:
                transfer.append({"attack": item.attack, "source": item.interpreter, "target": reader,
                                 "l1": res["l1"], "iou": res["iou"]})
    for t in transfer:
        rows.append({"attack": t["attack"], "framework": transfer_fw, "interpreter": t["source"],
                     "read_by": t["target"], "transfer_l1": t["l1"], "transfer_iou": t["iou"]})
    adv_store = {}
    for item in plan:
        if item.framework != transfer_fw or item.key not in ev.examples:
            continue
        for name in (ecfg["interpreters"] if item.interpreter is None else [item.interpreter]):
            adv_store[(item.attack, item.framework, name)] = ev.examples[item.key]
    _figure(out, model, x[:n_show], y_t[:n_show], ev.benign, interps, adv_store, transfer_fw, n_show)
    write_outputs(out, rows, _report(cfg, info, ecfg, rows, x.shape[0], trainer.world_size, wall))
    return rows


def _figure(out, model, x, y_t, benign, interps, adv_store, fw, n_show: int = 3) -> None:
    columns = []
    for name, g in interps.items():
        columns.append((f"{name.upper()} benign", benign[name][:n_show]))
        for attack in ("pgd", "adv2", "advedge", "advedge_plus"):
            key = (attack, fw, name)
            if key in adv_store:
                columns.append((f"{name.upper()} {attack}", interpret(g, model, adv_store[key][:n_show], y_t[:n_show])))
    columns.insert(0, ("image", x[:n_show]))
    # transpose: one row per interpreter x example would be large; keep examples as rows
    map_grid(out / "maps.png", columns, rows=n_show)


#: figures that describe successful adversarial inputs: meaningless for a row where every input failed
_SUCCESS_FIGURES = ("l1", "l2", "iou", "noise_rate")


def _cell(row: dict[str, Any], field: str) -> Any:
    """A table cell; "not measured" where the figure would describe adversarial inputs that all failed."""
    if field in _SUCCESS_FIGURES and row.get("asr", 1.0) == 0:
        return "not measured (0 % success)"
    return row.get(field, float("nan"))


def _report(cfg, info, ecfg, rows, n, processes: int = 1, wall: float = float("nan")) -> str:
    main = [r for r in rows if "read_by" not in r]
    interps = ecfg["interpreters"]
    lines = [f"# Attack evaluation ({n} correctly classified test inputs, random target classes)", "",
             f"Classifier checkpoint: `{info['checkpoint']}`. Attack options: `{cfg.get('attack')}`.", "",
             f"Evaluated by {processes} process(es) in {wall:.0f} s of wall time (each input attacked once; "
             "seconds per input = attack compute time summed over processes / inputs).", ""]

    def table(field: str, title: str) -> None:
        lines.extend([f"## {title}", ""])
        headers = ["framework", "attack"] + [i.upper() for i in interps]
        body = []
        for fw in ecfg["frameworks"]:
            for a in ecfg["attacks"]:
                vals = []
                for i in interps:
                    hit = [r for r in main if r["attack"] == a and r["framework"] == fw and r["interpreter"] == i]
                    vals.append(_cell(hit[0], field) if hit else "-")
                body.append([fw, a] + vals)
        lines.extend([markdown_table(headers, body), ""])

    table("asr", "Attack success rate (AdvEdge Table I)")
    table("confidence", "Misclassification confidence (AdvEdge Table II)")
    table("l1", "L1 distance of adversarial to benign maps (ADV2 Figure 5 / Table 12; lower is stealthier)")
    table("iou", "IoU of top-k binarised adversarial and benign maps (ADV2 Figure 6 / AdvEdge Figure 4; higher is stealthier)")
    table("noise_rate", "Noise rate 1 - SSIM (AdvEdge Figure 5)")
    table("seconds_per_input", "Seconds per adversarial input (AdvEdge Table III)")
    tr = [r for r in rows if "read_by" in r]
    if tr:
        lines.extend(["## Transferability: L1 to the benign map, rows = interpreter attacked, columns = interpreter reading (ADV2 Table 9 / AdvEdge Table IV)", ""])
        for a in ecfg["attacks"]:
            if a == "pgd":
                continue
            body = []
            for s in interps:
                body.append([a, s.upper()] + [next((r["transfer_l1"] for r in tr if r["attack"] == a and r["interpreter"] == s
                                                    and r["read_by"] == t), "-") for t in interps])
            lines.extend([markdown_table(["attack", "source"] + [t.upper() for t in interps], body), ""])
    lines.extend(["![maps](maps.png)", ""])
    return "\n".join(lines)
