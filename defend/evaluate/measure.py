"""The measurements of ``defend evaluate``: clean accuracy, AutoAttack, top-k interpretation robustness, the
interpretation attacks (standard and adaptive) with their transfer matrix, detection at fixed false-positive rates,
and the re-scoring of saved adversarial sets. Each returns plain rows that record their attack, budget, n, seed and
seconds (the card's ``results``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attacks import build_attack, random_targets
from attacks.state import frozen

from ..evaluation import AttackMeter, PlanItem, check_adversarial, evaluate_plan
from ..interpreters import build_interpreter
from .battery import Battery
from .system import System

__all__ = ["AttackSet", "interpreters_for", "attack_inputs", "clean_accuracy", "autoattack_rows", "topk_rows",
           "build_plan", "run_attacks", "detection_rows", "rescore_sets", "engine_budget", "fpr_threshold"]


@dataclass
class AttackSet:
    """One crafted adversarial set: what crafted it (attack, target interpreter label, kind, budget) and the tensors."""

    attack: str
    interpreter: str
    kind: str
    budget: dict[str, Any]
    x: Tensor
    x_adv: Tensor
    label: Tensor
    target: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.attack}_{self.interpreter.replace('+', '-')}"


def interpreters_for(system: System, names: list[str]) -> dict[str, Any]:
    """Interpreters by name, built with the battery's ``interpreter_options.<name>``; ``rts`` is the system's RTS
    network."""
    opts = system.interpreter_options
    return {n: build_interpreter(n, **{**opts.get(n, {}), "network": system.rts}) if n == "rts"
            else build_interpreter(n, **opts.get(n, {})) for n in names}


def attack_inputs(system: System, battery: Battery) -> dict[str, Tensor]:
    """The first ``n_images`` correctly classified test inputs and a seeded random target class each."""
    from ..experiments.common import select_correct

    data = select_correct(system.classifier, system.data, int(battery.n_images), split="test")
    if data["image"].shape[0] == 0:
        raise ValueError("the classifier gets no test input right: nothing to attack")
    gen = torch.Generator().manual_seed(int(battery.seed))
    return {"image": data["image"], "label": data["label"],
            "target": random_targets(data["label"], system.data.num_classes, gen)}


def clean_accuracy(system: System, battery: Battery) -> dict[str, Any]:
    """Accuracy on the first ``clean_n`` test inputs (all when unset), in batches."""
    from ..experiments.common import take_split

    start = time.perf_counter()
    test = take_split(system.data, "test", None if battery.clean_n is None else int(battery.clean_n))
    x, y = test["image"], test["label"]
    with torch.no_grad(), frozen(system.classifier):
        pred = torch.cat([system.classifier(x[i:i + 256]).argmax(1) for i in range(0, x.shape[0], 256)])
    return {"metric": "clean_accuracy", "value": float((pred == y).float().mean()), "n": int(y.numel()),
            "split": "test", "attack": None, "budget": None, "seed": int(battery.seed),
            "seconds": time.perf_counter() - start}


def autoattack_rows(system: System, inputs: dict[str, Tensor], battery: Battery) -> list[dict[str, Any]]:
    """Robust accuracy under AutoAttack (standard, L-inf) at each radius, on the first ``autoattack.n`` inputs."""
    from ..autoattack import autoattack_accuracy

    n = int(battery.autoattack.n)
    x, y = inputs["image"][:n], inputs["label"][:n]
    rows = []
    for eps in battery.autoattack.eps:
        start = time.perf_counter()
        res = autoattack_accuracy(system.classifier, x, y, float(eps), seed=int(battery.seed),
                                  batch_size=int(battery.batch_size))
        rows.append({"attack": "autoattack-standard", "eps": float(eps), "robust_accuracy": res.accuracy,
                     "n": int(y.numel()), "budget": {"eps": float(eps), "norm": "Linf",
                                                     "attacks": list(res.settings.get("attacks", []))},
                     "stages": {k: float(v) for k, v in res.stages.items()}, "flags": list(res.flags),
                     "seed": int(battery.seed), "seconds": time.perf_counter() - start,
                     "note": "inputs: correctly classified test inputs (clean accuracy 1 on them)"})
    return rows


def topk_rows(system: System, inputs: dict[str, Tensor], battery: Battery) -> list[dict[str, Any]]:
    """Top-k interpretation robustness per interpreter (:func:`defend.robust_eval.interpretation_robustness`)."""
    from ..robust_eval import interpretation_robustness

    t = battery.topk
    names = list(t.interpreters) + (["rts"] if system.rts is not None and t.with_rts and t.interpreters else [])
    x = inputs["image"][: int(t.n or battery.n_images)]
    rows = []
    for name, interp in interpreters_for(system, names).items():
        start = time.perf_counter()
        options = {"k": int(t.k), "steps": int(t.steps), "restarts": int(t.restarts)}
        res = interpretation_robustness(system.classifier, interp, x, float(t.eps), "topk", options=options,
                                        ks=[int(k) for k in t.ks], seed=int(battery.seed),
                                        batch_size=int(battery.batch_size))
        rows.append({"interpreter": name, "attack": "topk", "budget": {"eps": float(t.eps), **options},
                     "ks": [int(k) for k in t.ks], "n": int(res["n"]), "n_kept": int(res["n_kept"]),
                     "kendall_tau": res.get("kendall_tau"), "spearman": res.get("spearman"),
                     "topk_intersection": res.get("topk_intersection"), "seed": int(battery.seed),
                     "seconds": time.perf_counter() - start})
    return rows


def engine_budget(engine: Any) -> dict[str, Any]:
    """The budget of an attack engine: L-inf radius, step, warm-start and joint steps (and restarts)."""
    threat = engine.threat
    out = {"eps": float(threat.eps), "alpha": float(threat.alpha), "warm_steps": int(engine.warm_steps),
           "steps": int(engine.steps), "restarts": len(getattr(engine, "attacks", [engine]))}
    return out


def build_plan(system: System, interps: dict[str, Any], battery: Battery) -> list[tuple[PlanItem, dict[str, Any]]]:
    """Every attack x target interpreter, the ensemble attacks, and the adaptive attacks the system calls for."""
    a, ad, seed = battery.attacks, battery.adaptive, int(battery.seed)
    readers = list(interps)
    plan = []
    for attack in a.attacks:
        for target in readers:
            engine = build_attack(attack, a.framework, interps[target], seed=seed, **a.options_for(target))
            plan.append((PlanItem(attack, a.framework, target, engine, readers),
                         {"kind": "standard", "interpreter": target}))
    ens = list(ad.ensemble_interpreters)
    ens_interps = [interps.get(n) or interpreters_for(system, [n])[n] for n in ens]
    for attack in ad.ensemble:
        engine = build_attack(attack, a.framework, ens_interps, seed=seed, **a.options_for(None, ad.options))
        plan.append((PlanItem(f"{attack}_ensemble", a.framework, None, engine, [r for r in readers if r in ens] or readers),
                     {"kind": "adaptive", "interpreter": "+".join(ens), "base_attack": attack}))
    if system.rts is not None:
        engine = build_attack("adaptive_rts", a.framework, interps["rts"], seed=seed, restarts=int(ad.rts_restarts),
                              enc_weight=float(ad.rts_enc_weight), **a.options_for("rts", ad.options))
        plan.append((PlanItem("adaptive_rts", a.framework, "rts", engine, readers),
                     {"kind": "adaptive", "interpreter": "rts", "base_attack": "adv2"}))
    if system.detector is not None:
        names = system.detector_interpreters
        det_interps = [interps.get(n) or interpreters_for(system, [n])[n] for n in names]
        engine = build_attack("adaptive_detector", a.framework, det_interps,
                              detector=system.detector.attack_surrogate(ad.detector_surrogate),
                              detector_weight=float(ad.detector_weight), product=system.detector_product, seed=seed,
                              **a.options_for(None, ad.options))
        plan.append((PlanItem("adaptive_detector", a.framework, None, engine, [r for r in readers if r in names] or readers),
                     {"kind": "adaptive", "interpreter": "+".join(names), "base_attack": "adv2",
                      "detector_weight": float(ad.detector_weight),
                      "surrogate": system.detector.surrogate_kind(ad.detector_surrogate)}))
    return plan


def run_attacks(system: System, inputs: dict[str, Tensor], battery: Battery,
                progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[AttackSet], Any]:
    """Run the plan (:func:`defend.evaluation.evaluate_plan`, one process); returns the attack rows, the transfer
    rows, the adversarial sets and the benign maps (for the figure)."""
    from ..experiments.common import make_trainer

    names = list(battery.attacks.interpreters) + (["rts"] if system.rts is not None else [])
    interps = interpreters_for(system, names)
    plan = build_plan(system, interps, battery)
    n = int(inputs["image"].shape[0])
    trainer = make_trainer({}, 1, inference_mode=False, use_distributed_sampler=False, enable_progress_bar=False,
                           logger=False)
    ev = evaluate_plan(system.classifier, interps, [p for p, _ in plan], inputs, trainer,
                       batch_size=int(battery.batch_size), keep=n, cache_dir=None, progress=progress)
    system.classifier.cpu().eval()
    rows, transfer, sets = [], [], []
    for item, info in plan:
        budget = {**engine_budget(item.engine), **{k: info[k] for k in ("detector_weight", "surrogate") if k in info}}
        main = [r for r in item.readers if r in info["interpreter"].split("+")] or item.readers[:1]
        for reader in item.readers:
            res = ev.results[(item.key, reader)]
            base = {"attack": item.attack, "framework": item.framework, "interpreter": info["interpreter"],
                    "kind": info["kind"], "read_by": reader}
            if reader in main:
                rows.append({**base, **_figures(res), "budget": budget, "seed": int(battery.seed),
                             "seconds": float(res["seconds_per_input"]) * res["n"],
                             "file": f"adversarial/{item.attack}_{info['interpreter'].replace('+', '-')}.pt"})
            if info["kind"] == "standard":
                transfer.append({"attack": item.attack, "source": info["interpreter"], "read_by": reader,
                                 "l1": res.get("l1"), "iou": res.get("iou"), "asr": res["asr"], "n": res["n"],
                                 "budget": budget, "seed": int(battery.seed)})
        sets.append(AttackSet(item.attack, info["interpreter"], info["kind"], budget, inputs["image"],
                              ev.examples[item.key], inputs["label"], inputs["target"]))
    return rows, transfer, sets, ev.benign


def _figures(res: dict[str, Any]) -> dict[str, Any]:
    keys = ("asr", "confidence", "l1", "l2", "iou", "noise_rate", "seconds_per_input", "linf", "n")
    return {k: res.get(k) for k in keys}


# ------------------------------------------------------------------------------------------------ detection
def fpr_threshold(benign: Tensor, fpr: float) -> tuple[float, float]:
    """The lowest threshold ``t`` among the benign scores (and their maximum) with ``mean(benign > t) <= fpr``, and
    the false-positive rate it gives."""
    cand = torch.unique(benign.double())
    for t in cand.tolist():
        rate = float((benign.double() > t).double().mean())
        if rate <= fpr:
            return float(t), rate
    return float(cand[-1]), 0.0  # pragma: no cover - the maximum always qualifies


def detector_scores(system: System, x: Tensor, batch_size: int) -> Tensor:
    """The detector's probability that each input is adversarial (maps of its interpreters for the prediction)."""
    from ..detection_data import compute_maps, stack_maps

    interps = interpreters_for(system, system.detector_interpreters)
    out = []
    for i in range(0, x.shape[0], batch_size):
        maps, _ = compute_maps(system.classifier, x[i:i + batch_size], interps)
        out.append(system.detector.predict_proba(stack_maps(maps, system.detector_interpreters,
                                                            system.detector_product)))
    return torch.cat(out) if out else torch.zeros(0)


def detection_rows(system: System, sets: list[AttackSet], battery: Battery) -> dict[str, Any]:
    """Detection of each adversarial set's successful inputs at the 1 % / 5 % FPR thresholds set on benign inputs,
    at the detector's own threshold (0.5), AUC and ROC; ``evasion_rate``: share of all inputs that reach the target
    class and are not flagged at the detector's own threshold (the end-to-end success of the attack)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from ..experiments.common import select_correct

    start = time.perf_counter()
    bs = int(battery.batch_size)
    n_b = int(battery.detector.n_benign or battery.n_images)
    benign_x = select_correct(system.classifier, system.data, n_b, split="test")["image"]
    benign = detector_scores(system, benign_x, bs)
    thresholds = {f: fpr_threshold(benign, f) for f in (0.01, 0.05)}
    rows = []
    for s in sets:
        with torch.no_grad():
            hit = torch.cat([system.classifier(s.x_adv[i:i + bs]).argmax(1) for i in range(0, s.x_adv.shape[0], bs)]) == s.target
        adv = detector_scores(system, s.x_adv[hit], bs)
        flagged = torch.zeros_like(hit)
        flagged[hit] = adv > 0.5
        row = {"attack": s.attack, "interpreter": s.interpreter, "kind": s.kind, "n": int(hit.numel()),
               "n_adversarial": int(hit.sum()), "budget": s.budget, "seed": int(battery.seed),
               "evasion_rate": float((hit & ~flagged).float().mean()),
               "detection_rate_default": float((adv > 0.5).float().mean()) if adv.numel() else None,
               "detection_rate_fpr1": float((adv > thresholds[0.01][0]).float().mean()) if adv.numel() else None,
               "detection_rate_fpr5": float((adv > thresholds[0.05][0]).float().mean()) if adv.numel() else None,
               "auc": None, "roc": None}
        if adv.numel():
            labels = torch.cat([torch.zeros(benign.numel()), torch.ones(adv.numel())]).numpy()
            scores = torch.cat([benign, adv]).numpy()
            fpr, tpr, _ = roc_curve(labels, scores)
            row.update(auc=float(roc_auc_score(labels, scores)), roc={"fpr": [float(v) for v in fpr],
                                                                     "tpr": [float(v) for v in tpr]})
        rows.append(row)
    return {"interpreters": list(system.detector_interpreters), "product": bool(system.detector_product),
            "n_benign": int(benign.numel()), "default_threshold": 0.5,
            "thresholds": {"fpr1": {"threshold": thresholds[0.01][0], "benign_fpr": thresholds[0.01][1]},
                           "fpr5": {"threshold": thresholds[0.05][0], "benign_fpr": thresholds[0.05][1]}},
            "benign_fpr_default": float((benign > 0.5).float().mean()), "rows": rows,
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ re-scoring
def rescore_sets(system: System, sets: list[AttackSet], battery: Battery) -> list[dict[str, Any]]:
    """Success, confidence, map L1 / IoU to the benign map and noise rate of ``system`` on saved adversarial sets
    (no attack is run: the saved inputs are read as they are). Each set is read by its own interpreter(s) where the
    system has them, else by the battery's interpreters."""
    have = list(battery.attacks.interpreters) + (["rts"] if system.rts is not None else [])
    interps = interpreters_for(system, have)
    bs, rows = int(battery.batch_size), []
    for s in sets:
        own = [n for n in s.interpreter.split("+") if n in interps] or have
        meters = {n: AttackMeter() for n in own}
        with frozen(system.classifier):
            for i in range(0, s.x.shape[0], bs):
                x, xa = s.x[i:i + bs], s.x_adv[i:i + bs]
                y, yt = s.label[i:i + bs], s.target[i:i + bs]
                with torch.no_grad():
                    logits = system.classifier(xa)
                for n in own:
                    g = interps[n]
                    meters[n].update(logits, yt, x, xa, g.map(system.classifier, x, y).detach(),
                                     g.map(system.classifier, xa, yt).detach(), 0.0)
        for n, m in meters.items():
            res = m.compute()
            rows.append({"attack": s.attack, "framework": "pgd", "interpreter": s.interpreter, "kind": "rescored",
                         "read_by": n, **_figures(res), "budget": s.budget, "seed": int(s.meta.get("seed", 0)),
                         "seconds": 0.0, "file": s.meta.get("file")})
    return rows


def check_set(s: AttackSet, system: System, where: str) -> None:
    """A saved set fits the system's data: shapes, labels / targets in range, adversarial inputs plausible."""
    shape = tuple(system.data.image_shape)
    if s.x.dim() != 4 or tuple(s.x.shape[1:]) != shape or s.x_adv.shape != s.x.shape:
        raise ValueError(f"{where}: images of shape {tuple(s.x.shape)} / {tuple(s.x_adv.shape)} do not fit the data "
                         f"({shape})")
    k = int(system.data.num_classes)
    for t, what in ((s.label, "labels"), (s.target, "targets")):
        if t.shape != (s.x.shape[0],) or int(t.min()) < 0 or int(t.max()) >= k:
            raise ValueError(f"{where}: {what} do not fit the data's {k} classes")
    why = check_adversarial(s.x_adv, s.x)
    if why is not None:
        raise ValueError(f"{where}: the adversarial inputs are {why}")
