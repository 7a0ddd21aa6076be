"""Experiment ``attacks``: ADV2 / AdvEdge / AdvEdge+ and plain attacks on PGD, C&W and StAdv against GRAD, CAM, MASK.

Writes one row per attack x framework x interpreter (ASR, confidence, map L1 / L2 / IoU to the benign map,
noise rate, seconds per input), the papers' tables in ``report.md``, a transferability table
(inputs crafted against interpreter A, read by interpreter B) and ``maps.png`` (the papers' Figure 4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from attacks.adv2 import ATTACKS, build_attack, random_targets
from attacks.frameworks import FRAMEWORKS
from attacks.interpreters import INTERPRETERS
from ..interpreters import build_interpreter

from ..evaluation import AttackMeter, interpret, run_attack
from .common import deep_get, get_classifier, markdown_table, select_correct, setup_data, write_outputs
from .figures import map_grid

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
    benign = {n: interpret(g, model, x, y) for n, g in interps.items()}
    transfer_fw = ecfg.get("transfer_framework", "pgd")
    plan = [(a, fw, i) for fw in ecfg["frameworks"] for a in ecfg["attacks"]
            for i in (ecfg["interpreters"] if a != "pgd" else [None])]
    total = len(plan) * x.shape[0]
    bar = tqdm(total=total, desc="attacks", unit="input", disable=not progress)
    rows: list[dict[str, Any]] = []
    adv_store: dict[tuple, torch.Tensor] = {}
    transfer: list[dict[str, Any]] = []
    for attack, fw, target_interp in plan:
        opts = attack_options(cfg, attack, fw, target_interp or "cam")
        atk = build_attack(attack, fw, target_interp or "cam", seed=seed, **opts)
        bar.set_postfix_str(f"{attack}/{fw}/{target_interp or '-'}")
        x_adv, seconds = run_attack(atk, model, x, y_t, None if target_interp is None else benign[target_interp], bs, bar)
        adv_store[(attack, fw, target_interp)] = x_adv
        with torch.no_grad():
            logits = model(x_adv)
        read_by = ecfg["interpreters"] if (target_interp is None or fw == transfer_fw) else [target_interp]
        for reader in read_by:
            adv_map = interpret(interps[reader], model, x_adv, y_t)
            meter = AttackMeter()
            meter.update(logits, y_t, x, x_adv, benign[reader], adv_map, seconds)
            res = meter.compute()
            res["linf"] = float((x_adv - x).abs().amax().item())
            if target_interp is None or reader == target_interp:
                rows.append({"attack": attack, "framework": fw, "interpreter": reader, **res})
            if target_interp is not None and fw == transfer_fw:
                transfer.append({"attack": attack, "source": target_interp, "target": reader, "l1": res["l1"], "iou": res["iou"]})
            if target_interp is None and fw == transfer_fw:
                adv_store[(attack, fw, reader)] = x_adv
    bar.close()
    for t in transfer:
        rows.append({"attack": t["attack"], "framework": transfer_fw, "interpreter": t["source"],
                     "read_by": t["target"], "transfer_l1": t["l1"], "transfer_iou": t["iou"]})
    _figure(out, model, x, y, y_t, benign, interps, adv_store, transfer_fw, ecfg)
    write_outputs(out, rows, _report(cfg, info, ecfg, rows, x.shape[0]))
    return rows


def _figure(out, model, x, y, y_t, benign, interps, adv_store, fw, ecfg, n_show: int = 3) -> None:
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


def _report(cfg, info, ecfg, rows, n) -> str:
    main = [r for r in rows if "read_by" not in r]
    interps = ecfg["interpreters"]
    lines = [f"# Attack evaluation ({n} correctly classified test inputs, random target classes)", "",
             f"Classifier checkpoint: `{info['checkpoint']}`. Attack options: `{cfg.get('attack')}`.", ""]

    def table(field: str, title: str) -> None:
        lines.extend([f"## {title}", ""])
        headers = ["framework", "attack"] + [i.upper() for i in interps]
        body = []
        for fw in ecfg["frameworks"]:
            for a in ecfg["attacks"]:
                vals = []
                for i in interps:
                    hit = [r for r in main if r["attack"] == a and r["framework"] == fw and r["interpreter"] == i]
                    vals.append(hit[0].get(field, float("nan")) if hit else "-")
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
