"""The measurements of ``defend evaluate``: clean accuracy, AutoAttack, top-k interpretation robustness, the
interpretation attacks (standard and adaptive) with their transfer matrix, detection at fixed false-positive rates,
and the re-scoring of saved adversarial sets. Each returns plain rows that record their attack, budget, n, seed and
seconds (the card's ``results``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from weakref import WeakKeyDictionary

import torch
from sklearn.metrics import roc_curve
from torch import Tensor

from attacks import PGD, build_attack, random_targets
from attacks.state import frozen

from .. import stats
from ..autoattack import autoattack_accuracy
from ..data.base import image_digests, require_development
from ..detection_data import compute_maps, stack_maps
from ..detector_sweep import SweepSetup, detector_sweep
from ..evaluation import AttackMeter, PlanItem, check_adversarial, evaluate_plan
from ..inputs import select_correct, take_split
from ..presets import preset_of
from ..progress import track
from ..robust_eval import REFERENCE_ATTACK, interpretation_robustness
from ..rows import (
    AttackRow,
    AutoAttackRow,
    CleanAccuracyRow,
    DetectionRow,
    DetectionSummary,
    DetectionThreshold,
    DetectorSweep,
    DetectorSweepRow,
    Fig,
    TopKRow,
    TransferRow,
    figure_names,
)
from ..trainer import make_trainer
from .battery import Battery
from .system import System, interpreters_for

__all__ = ["AttackSet", "attack_inputs", "clean_accuracy", "autoattack_rows", "autoattack_row", "topk_rows",
           "topk_attack", "build_plan", "run_attacks", "detection_rows", "rescore_sets", "fpr_threshold"]


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
    #: set by a battery of several frameworks: the framework, appended to the file name
    tag: str = ""

    @property
    def name(self) -> str:
        return f"{self.attack}_{self.interpreter.replace('+', '-')}" + (f"_{self.tag}" if self.tag else "")

    @property
    def framework(self) -> str:
        """The threat model that crafted the set, as its budget records it (sets saved before budgets named it were
        crafted on PGD, the battery's only framework then)."""
        return str(self.budget.get("framework", PGD.name))


def attack_inputs(system: System, battery: Battery) -> dict[str, Tensor]:
    """The first ``n_images`` correctly classified test inputs and a seeded random target class each."""
    data = select_correct(system.classifier, system.data, int(battery.n_images), split="test")
    if data["image"].shape[0] == 0:
        raise ValueError("the classifier gets no test input right: nothing to attack")
    gen = torch.Generator().manual_seed(int(battery.seed))
    return {"image": data["image"], "label": data["label"],
            "target": random_targets(data["label"], system.data.num_classes, gen)}


def clean_accuracy(system: System, battery: Battery) -> dict[str, Any]:
    """Accuracy on the first ``clean_n`` test inputs (all when unset), in batches, with its Wilson interval, and
    whether the classifier is at chance (:func:`defend.stats.at_chance`: then its robust and interpretation figures
    mean nothing; the card flags them)."""
    system.say_notices()  # the first measurement: every pre-flight check has passed
    start = time.perf_counter()
    test = take_split(system.data, "test", None if battery.clean_n is None else int(battery.clean_n))
    x, y = test["image"], test["label"]
    with torch.no_grad(), frozen(system.classifier):
        pred = torch.cat([system.classifier(x[i:i + 256]).argmax(1) for i in range(0, x.shape[0], 256)])
    correct = pred == y
    est = stats.proportion(correct)
    k = int(system.data.num_classes)
    return CleanAccuracyRow(value=Fig.of(est), n=int(y.numel()), split="test", seed=int(battery.seed),
                            seconds=time.perf_counter() - start, chance_level=stats.chance_level(k),
                            at_chance=stats.at_chance(int(correct.sum()), int(y.numel()), k)).to_dict()


def autoattack_rows(system: System, battery: Battery) -> list[dict[str, Any]]:
    """Robust accuracy under AutoAttack (L-inf; standard, or reduced below 4 classes) at each radius on the first ``autoattack.n`` test inputs,
    RobustBench's way (a clean error counts as a failure: ``robust_accuracy``), and on the correctly classified ones
    among them (``robust_accuracy_on_correct``), each with its Wilson interval."""
    first = take_split(system.data, "test", int(battery.autoattack.n))
    x, y = first["image"], first["label"]
    with torch.no_grad(), frozen(system.classifier):
        clean_ok = torch.cat([system.classifier(x[i:i + 256]).argmax(1) == y[i:i + 256]
                              for i in range(0, x.shape[0], 256)])
    return [autoattack_row(system.classifier, x, y, clean_ok, float(eps), int(battery.seed), int(battery.batch_size),
                           int(system.data.num_classes))[0].to_dict()
            for eps in track(battery.autoattack.eps, "AutoAttack", per=int(y.numel()))]


def autoattack_row(classifier: Any, x: Tensor, y: Tensor, clean_ok: Tensor, eps: float, seed: int, batch_size: int,
                   num_classes: int) -> tuple[AutoAttackRow, Any]:
    """AutoAttack at radius ``eps`` on ``(x, y)`` as a card row (robust accuracy over all inputs and over those
    ``clean_ok`` marks correctly classified, each with its Wilson interval), and AutoAttack's result (per-input
    robustness, settings). The robust experiment's AutoAttack rows are a view of the same row."""
    start = time.perf_counter()
    res = autoattack_accuracy(classifier, x, y, eps, seed=seed, batch_size=batch_size)
    robust = res.robust.cpu()
    version, attacks = str(res.settings["version"]), list(res.settings["attacks"])
    return AutoAttackRow(
        attack=f"autoattack-{version}", eps=eps, robust_accuracy=Fig.of(stats.proportion(robust)), n=int(y.numel()),
        robust_accuracy_on_correct=Fig.of(stats.proportion(robust[clean_ok])), n_correct=int(clean_ok.sum()),
        budget={"eps": eps, "norm": "Linf", "version": version, "attacks": attacks},
        stages={k: float(v) for k, v in res.stages.items()}, flags=list(res.flags), seed=seed,
        seconds=time.perf_counter() - start, note=_autoattack_note(version, attacks, num_classes)), res


def _autoattack_note(version: str, attacks: list[str], num_classes: int) -> str:
    """The note of an AutoAttack row: its inputs, its convention and, for the reduced version, why and what ran."""
    note = ("inputs: the first n test inputs; robust_accuracy counts a clean error as a failure (RobustBench), "
            "robust_accuracy_on_correct is over the correctly classified ones")
    if version == "standard":
        return note
    return (f"{note}; reduced version: with {num_classes} classes the targeted DLR loss of APGD-T is not defined "
            f"(it needs 4), so {', '.join(a.upper() for a in attacks)} ran instead of the standard version")


def topk_rows(system: System, inputs: dict[str, Tensor], battery: Battery) -> list[dict[str, Any]]:
    """Top-k interpretation robustness per interpreter (:func:`defend.robust_eval.interpretation_robustness`) under
    the battery's ``topk.protocol`` (``boopathy``: the true label explained, flipped inputs dropped)."""
    t = battery.topk
    names = list(t.interpreters) + (["rts"] if system.rts is not None and t.with_rts and t.interpreters else [])
    n = int(t.n or battery.n_images)
    x = inputs["image"][:n]
    labels = inputs["label"][:n] if t.protocol == "boopathy" else None
    attack, options = topk_attack(battery)
    rows = []
    for name, interp in track(interpreters_for(system, names).items(), "top-k attack", per=int(x.shape[0])):
        start = time.perf_counter()
        res = interpretation_robustness(system.classifier, interp, x, float(t.eps), attack, options=options,
                                        ks=[int(k) for k in t.ks], seed=int(battery.seed),
                                        batch_size=int(battery.batch_size), labels=labels)
        rows.append(TopKRow(interpreter=name, attack=attack, protocol=str(t.protocol),
                            budget={"eps": float(t.eps), **options}, ks=[int(k) for k in t.ks],
                            n=int(res["n"]), n_kept=int(res["n_kept"]), kendall_tau=Fig.get(res, "kendall_tau"),
                            spearman=Fig.get(res, "spearman"), topk_intersection=Fig.get(res, "topk_intersection"),
                            seed=int(battery.seed), seconds=time.perf_counter() - start).to_dict())
    return rows


def topk_attack(battery: Battery) -> tuple[str, dict[str, Any]]:
    """The registered ball attack of the battery's ``topk.protocol`` and its options besides ``eps``: ``topk``
    (:class:`attacks.TopKAttack`, our variant) or ``aai_topk`` (Boopathy's, signed steps of 0.01)."""
    t = battery.topk
    if t.protocol == "boopathy":
        return REFERENCE_ATTACK, {"k": int(t.k), "steps": int(t.steps), "alpha": 0.01}
    return "topk", {"k": int(t.k), "steps": int(t.steps), "restarts": int(t.restarts)}


def build_plan(system: System, interps: dict[str, Any], battery: Battery) -> list[tuple[PlanItem, dict[str, Any]]]:
    """Every framework of ``attacks.frameworks`` x (attack x target interpreter, the ensemble attacks, the adaptive
    attacks the system calls for). With several frameworks each item's ``tag`` is its framework (set file names)."""
    fws = list(battery.attacks.frameworks)
    plan = []
    for fw in fws:
        for item, info in _framework_plan(system, interps, battery, fw):
            plan.append((item, {**info, "tag": fw if len(fws) > 1 else ""}))
    return plan


def _framework_plan(system: System, interps: dict[str, Any], battery: Battery,
                    fw: str) -> list[tuple[PlanItem, dict[str, Any]]]:
    """The plan items of one framework (:func:`build_plan`)."""
    a, ad, seed = battery.attacks, battery.adaptive, int(battery.seed)
    readers = list(interps)
    plan = []
    for attack in a.attacks:
        for target in readers:
            engine = build_attack(attack, fw, interps[target], seed=seed, **a.options_for(fw, target))
            plan.append((PlanItem(attack, fw, target, engine, readers), {"kind": "standard", "interpreter": target}))
    ens = list(ad.ensemble_interpreters)
    ens_interps = [interps.get(n) or interpreters_for(system, [n])[n] for n in ens]
    for attack in ad.ensemble:
        engine = build_attack(attack, fw, ens_interps, seed=seed, **a.options_for(fw, None, ad.options))
        plan.append((PlanItem(f"{attack}_ensemble", fw, None, engine, [r for r in readers if r in ens] or readers),
                     {"kind": "adaptive", "interpreter": "+".join(ens), "base_attack": attack}))
    if system.rts is not None:
        engine = build_attack("adaptive_rts", fw, interps["rts"], seed=seed, restarts=int(ad.rts_restarts),
                              enc_weight=float(ad.rts_enc_weight), c_values=[float(c) for c in ad.rts_c_values],
                              long_factor=float(ad.rts_long_factor), **a.options_for(fw, "rts", ad.options))
        plan.append((PlanItem("adaptive_rts", fw, "rts", engine, readers),
                     {"kind": "adaptive", "interpreter": "rts", "base_attack": "adv2"}))
    if system.detector is not None:
        names = system.detector_interpreters
        det_interps = [interps.get(n) or interpreters_for(system, [n])[n] for n in names]
        engine = build_attack("adaptive_detector", fw, det_interps,
                              detector=system.detector.attack_surrogate(ad.detector_surrogate),
                              detector_weight=float(ad.detector_weight), product=system.detector_product, seed=seed,
                              **a.options_for(fw, None, ad.options))
        plan.append((PlanItem("adaptive_detector", fw, None, engine, [r for r in readers if r in names] or readers),
                     {"kind": "adaptive", "interpreter": "+".join(names), "base_attack": "adv2",
                      "detector_weight": float(ad.detector_weight),
                      "surrogate": system.detector.surrogate_kind(ad.detector_surrogate)}))
    return plan


def run_attacks(system: System, inputs: dict[str, Tensor], battery: Battery,
                progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[AttackSet], Any]:
    """Run the plan (:func:`defend.evaluation.evaluate_plan`, one process); returns the attack rows, the transfer
    rows, the adversarial sets and the benign maps (for the figure)."""
    names = list(battery.attacks.interpreters) + (["rts"] if system.rts is not None else [])
    interps = interpreters_for(system, names)
    plan = build_plan(system, interps, battery)
    n = int(inputs["image"].shape[0])
    trainer = make_trainer({}, 1, inference_mode=False, use_distributed_sampler=False, enable_progress_bar=False,
                           logger=False)
    ev = evaluate_plan(system.classifier, interps, [p for p, _ in plan], inputs, trainer,
                       batch_size=int(battery.batch_size), keep=n, cache_dir=None, progress=progress,
                       seed=int(battery.seed))
    system.classifier.cpu().eval()
    rows, transfer, sets = [], [], []
    for item, info in plan:
        budget = {**item.engine.budget, **{k: info[k] for k in ("detector_weight", "surrogate") if k in info}}
        crafted = AttackSet(item.attack, info["interpreter"], info["kind"], budget, inputs["image"],
                            ev.examples[item.key], inputs["label"], inputs["target"], tag=info["tag"])
        # the attack's time per input (the detector sweep's plain baseline reports it)
        crafted.meta["seconds_per_input"] = float(ev.results[(item.key, item.readers[0])]["seconds_per_input"])
        main = [r for r in item.readers if r in info["interpreter"].split("+")] or item.readers[:1]
        for reader in item.readers:
            res = ev.results[(item.key, reader)]
            if reader in main:
                per = ev.per_input[(item.key, reader)]
                rows.append(attack_row(res, attack=item.attack, framework=item.framework,
                                       interpreter=info["interpreter"], kind=info["kind"], read_by=reader,
                                       budget=budget, seed=int(battery.seed),
                                       seconds=float(res["seconds_per_input"]) * res["n"],
                                       file=f"adversarial/{crafted.name}.pt",
                                       per_input={k: [float(v) for v in per[k]] for k in PER_INPUT if k in per}))
            if info["kind"] == "standard":
                transfer.append(TransferRow(attack=item.attack, source=info["interpreter"], read_by=reader,
                                            **{k: Fig.get(res, k) for k in ("l1", "iou", "asr")}, n=res["n"],
                                            seconds_per_input=res["seconds_per_input"], budget=budget,
                                            budget_preset=preset_of(info["interpreter"], budget),
                                            seed=int(battery.seed)).to_dict())
        sets.append(crafted)
    return rows, transfer, sets, ev.benign


#: the per-input values an attack row keeps (in input order: paired tests between the rows of one card)
PER_INPUT = ("asr", "l1", "iou")
#: the figures of an attack row that carry a 95 % interval (``<figure>_ci_low`` / ``_ci_high``)
INTERVAL_FIGURES = figure_names(AttackRow)


def attack_row(res: dict[str, Any], **info: Any) -> dict[str, Any]:
    """The :class:`~defend.rows.AttackRow` of an :class:`~defend.evaluation.AttackMeter` result (its figures with
    their intervals, seconds per input, L-inf, n and the IoU's chance level) and ``info`` (the row's other fields;
    ``budget_preset`` defaults to :func:`defend.presets.preset_of` of its interpreter and budget)."""
    info.setdefault("budget_preset", preset_of(info["interpreter"], info["budget"]))
    return AttackRow(**{k: Fig.get(res, k) for k in INTERVAL_FIGURES},
                     **{k: res.get(k) for k in ("seconds_per_input", "linf", "n", "iou_chance")}, **info).to_dict()


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


def detector_maps(system: System, x: Tensor, batch_size: int) -> Tensor:
    """The stacked maps the detector reads for ``x`` (its interpreters, for the prediction)."""
    interps = interpreters_for(system, system.detector_interpreters)
    out = []
    for i in range(0, x.shape[0], batch_size):
        maps, _ = compute_maps(system.classifier, x[i:i + batch_size], interps)
        out.append(stack_maps(maps, system.detector_interpreters, system.detector_product))
    return torch.cat(out) if out else torch.zeros(0, 0, 0, 0)


def detector_scores(system: System, x: Tensor, batch_size: int) -> Tensor:
    """The detector's probability that each input is adversarial (maps of its interpreters for the prediction)."""
    return system.detector.predict_proba(detector_maps(system, x, batch_size)) if x.shape[0] else torch.zeros(0)


#: the false-positive rates the card sets detection thresholds at, and their keys (the ``detection_rate_<key>``
#: fields of :class:`defend.rows.DetectionRow`)
FPRS = {"fpr1": 0.01, "fpr5": 0.05}


def _thresholds(dev: Tensor, test: Tensor, seed: int) -> dict[str, Any]:
    """Per FPR of :data:`FPRS`: the threshold set on the development benign scores ``dev`` where they are enough
    (``10 / FPR`` of them), the FPR it gives there, and the realised FPR on the test benign scores (Wilson)."""
    out = {}
    for key, f in FPRS.items():
        if not stats.fpr_supported(dev.numel(), f):
            out[key] = DetectionThreshold(
                threshold=None, benign_fpr=None, test_fpr=Fig(None), supported=False,
                note=f"not enough benign inputs for {100 * f:g} % FPR ({dev.numel()} on the development split, "
                     f"{stats.min_benign_for_fpr(f)} needed)").to_dict()
            continue
        t, rate = fpr_threshold(dev, f)
        out[key] = DetectionThreshold(threshold=t, benign_fpr=rate, test_fpr=Fig.of(stats.proportion(test > t)),
                                      supported=True, note=f"set on {dev.numel()} development benign inputs").to_dict()
    return out


def _rate(flags: Tensor) -> Fig:
    """The share of true ``flags`` with its Wilson interval (empty without flags)."""
    return Fig.of(stats.proportion(flags)) if flags.numel() else Fig(None)


def _detection_row(s: AttackSet, hit: Tensor, adv: Tensor, benign: Tensor, thresholds: dict[str, Any],
                   seed: int) -> dict[str, Any]:
    """The figures of one adversarial set: detection rates (Wilson) at each supported threshold and at 0.5, the
    end-to-end evasion, AUC (bootstrap) and ROC against the test benign inputs."""
    flagged = torch.zeros_like(hit)
    flagged[hit] = adv > 0.5
    evaded = hit & ~flagged
    rates = {k: _rate(adv > t["threshold"]) if t["supported"] else Fig(None) for k, t in thresholds.items()}
    auc, roc = Fig(None), None
    if adv.numel() and benign.numel():
        labels = torch.cat([torch.zeros(benign.numel()), torch.ones(adv.numel())])
        scores = torch.cat([benign, adv])
        fpr, tpr, _ = roc_curve(labels.numpy(), scores.numpy())
        auc = Fig.of(stats.bootstrap_auc(labels, scores, seed))
        roc = {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}
    return DetectionRow(attack=s.attack, interpreter=s.interpreter, kind=s.kind, n=int(hit.numel()),
                        n_adversarial=int(hit.sum()), budget=s.budget, seed=seed,
                        evasion_rate=Fig.of(stats.proportion(evaded)), auc=auc, roc=roc,
                        per_input={"evasion": [float(v) for v in evaded.double()]},
                        detection_rate_default=_rate(adv > 0.5), detection_rate_fpr1=rates["fpr1"],
                        detection_rate_fpr5=rates["fpr5"]).to_dict()


def detection_rows(system: System, sets: list[AttackSet], battery: Battery, sweep: bool = False) -> dict[str, Any]:
    """Detection of each adversarial set's successful inputs. The 1 % / 5 % FPR thresholds are set on ``n_benign``
    correctly classified inputs of the development split (selection never reads the test split) and reported only
    where those are at least ``10 / FPR``; the false-positive rate they give is measured on as many test inputs
    other than the attacked ones, which also give the AUC and ROC. ``evasion_rate``: share of all inputs that reach
    the target class and are not flagged at the detector's own threshold (the end-to-end success of the attack).
    Every rate carries its Wilson interval, the AUC a bootstrap one. With ``sweep`` (sets crafted by this run), the
    detector-aware sweep of the battery's ``adaptive.detector_*`` keys (:func:`detector_sweep_summary`)."""
    start = time.perf_counter()
    bs, seed = int(battery.batch_size), int(battery.seed)
    n_b, n_att = int(battery.detector.n_benign or battery.n_images), int(battery.n_images)
    dev_x = select_correct(system.classifier, system.data, n_b, split=require_development("dev", "the FPR thresholds"))
    test_x = select_correct(system.classifier, system.data, n_att + n_b, split="test")["image"][n_att:]
    dev, benign = detector_scores(system, dev_x["image"], bs), detector_scores(system, test_x, bs)
    thresholds = _thresholds(dev, benign, seed)
    rows = []
    for s in track(sets, "detection", unit="adversarial set"):
        with torch.no_grad():
            hit = torch.cat([system.classifier(s.x_adv[i:i + bs]).argmax(1) for i in range(0, s.x_adv.shape[0], bs)]) == s.target
        rows.append(_detection_row(s, hit, detector_scores(system, s.x_adv[hit], bs), benign, thresholds, seed))
    swept = (detector_sweep_summary(system, sets, battery, thresholds["fpr5"], test_x)
             if sweep and battery.adaptive.detector_weights else None)
    return DetectionSummary(interpreters=list(system.detector_interpreters), product=bool(system.detector_product),
                            n_benign=int(benign.numel()), n_benign_dev=int(dev.numel()), default_threshold=0.5,
                            thresholds=thresholds, benign_fpr_default=Fig.of(stats.proportion(benign > 0.5)),
                            rows=rows, seconds=time.perf_counter() - start, sweep=swept).to_dict()


def _plain_set(sets: list[AttackSet], names: list[str]) -> AttackSet | None:
    """The plain attack the sweep is compared with: a standard set against one of the detector's interpreters,
    ADV2 first, in battery order (``None``: no such set)."""
    own = [s for s in sets if s.kind == "standard" and s.interpreter in names]
    return next((s for s in own if s.attack == "adv2"), own[0] if own else None)


def detector_sweep_summary(system: System, sets: list[AttackSet], battery: Battery, fpr5: dict[str, Any],
                           benign_test: Tensor) -> dict[str, Any]:
    """The detector-aware attack swept over ``adaptive.detector_weights`` (:func:`defend.detector_sweep.detector_sweep`)
    on the attacked inputs, at the 5 % FPR threshold ``fpr5`` (set on development benign inputs), the plain ADV2 set
    (:func:`_plain_set`) as the baseline and first candidate; the surrogate's held-out fit on the maps of the test
    benign inputs ``benign_test`` and of the plain set's successful inputs. Not measured (the row says why) without
    a 5 % FPR threshold or a plain set."""
    ad, start = battery.adaptive, time.perf_counter()
    kind = system.detector.surrogate_kind(ad.detector_surrogate)
    plain = _plain_set(sets, list(system.detector_interpreters))
    why = (None if fpr5["supported"] else f"not measured: {fpr5['note']} (set detector.n_benign)") or (
        None if plain is not None else "not measured: no standard attack against an interpreter the detector reads")
    if why is not None:
        return DetectorSweep(status=why, threshold_fpr5=None, surrogate=kind, rows=[], strongest_weight=None,
                             evasion_vs_plain_diff=Fig(None), evasion_vs_plain_p=None, budget_check=None,
                             surrogate_held_out=None, surrogate_along_iterates=None, seconds=0.0).to_dict()
    fw, bs = plain.framework, int(battery.batch_size)
    setup = SweepSetup(system.classifier, system.detector, interpreters_for(system, system.detector_interpreters),
                       bool(system.detector_product), float(fpr5["threshold"]), plain.x, plain.target,
                       system.detector.attack_surrogate(ad.detector_surrogate), framework=fw,
                       options=battery.attacks.options_for(fw, None, ad.options), seed=int(battery.seed), batch_size=bs)
    with torch.no_grad():
        hit = torch.cat([system.classifier(plain.x_adv[i:i + bs]).argmax(1) for i in range(0, plain.x.shape[0], bs)])
    held = detector_maps(system, torch.cat([benign_test, plain.x_adv[hit == plain.target]]), bs)
    res = detector_sweep(setup, plain.x_adv, plain_attack=plain.attack, plain_budget=plain.budget,
                         weights=[float(w) for w in ad.detector_weights], restarts=int(ad.detector_restarts),
                         budget_check=bool(ad.detector_budget_check), held_out_maps=held,
                         plain_seconds=float(plain.meta.get("seconds_per_input", 0.0)) * int(plain.x.shape[0]))
    rows = [DetectorSweepRow(**{k: v for k, v in p.items() if k in _SWEEP_PLAIN},
                             **{k: Fig.get(p, k) for k in figure_names(DetectorSweepRow)}).to_dict()
            for p in res["points"]]
    return DetectorSweep(status="measured", threshold_fpr5=res["threshold"], surrogate=kind, rows=rows,
                         strongest_weight=res["strongest"],
                         evasion_vs_plain_diff=Fig.get(res["versus_plain"], "evasion_vs_plain_diff"),
                         evasion_vs_plain_p=res["versus_plain"]["evasion_vs_plain_p"],
                         budget_check=res["budget_check"], surrogate_held_out=res["surrogate"]["held_out"],
                         surrogate_along_iterates=res["surrogate"]["along_iterates"],
                         seconds=time.perf_counter() - start).to_dict()


#: the fields of a :class:`~defend.rows.DetectorSweepRow` copied as they are from a sweep point
_SWEEP_PLAIN = ("attack", "detector_weight", "restarts", "n", "n_success", "pareto", "budget", "budget_preset",
                "seconds_per_input", "per_input")


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
            res = m.compute(int(battery.seed))
            rows.append(attack_row(res, attack=s.attack, framework=s.framework, interpreter=s.interpreter,
                                   kind="rescored", read_by=n, budget=s.budget, seed=int(s.meta.get("seed", 0)),
                                   seconds=0.0, file=s.meta.get("file")))
    return rows


def check_set(s: AttackSet, system: System, where: str) -> None:
    """A saved set is what it claims, checked against the data before anything is measured: its clean images are
    test inputs of the data (by the sha256 of their bytes), its labels are the data's (they replace the file's),
    its targets differ from them, and every adversarial image is finite, in [0, 1], on the uint8 grid and inside
    the L-inf ball its budget records. Raises ``ValueError`` (one line naming the file) otherwise."""
    shape = tuple(system.data.image_shape)
    if s.x.dim() != 4 or tuple(s.x.shape[1:]) != shape or s.x_adv.shape != s.x.shape:
        raise ValueError(f"{where}: images of shape {tuple(s.x.shape)} / {tuple(s.x_adv.shape)} do not fit the data "
                         f"({shape})")
    n, k = int(s.x.shape[0]), int(system.data.num_classes)
    if n < 1:
        raise ValueError(f"{where}: the set holds no inputs")
    for t, what in ((s.label, "labels"), (s.target, "targets")):
        if t.shape != (n,) or int(t.min()) < 0 or int(t.max()) >= k:
            raise ValueError(f"{where}: {what} do not fit the data's {k} classes")
    why = _clean_images_problem(s.x)
    if why is not None:
        raise ValueError(f"{where}: the clean inputs are {why}")
    s.label = _labels_from_data(s, system.data, where)
    if bool((s.target == s.label).any()):
        raise ValueError(f"{where}: {int((s.target == s.label).sum())} target(s) equal the true label (an untouched "
                         "input would count as a success); the set was not crafted by defend evaluate")
    eps = s.budget.get("eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < float(eps) <= 1:
        raise ValueError(f"{where}: its budget records no L-inf radius eps in (0, 1] (got {eps!r})")
    why = check_adversarial(s.x_adv, s.x, SimpleNamespace(threat=SimpleNamespace(eps=float(eps))))
    if why is not None:
        raise ValueError(f"{where}: the adversarial inputs are {why}")


def _clean_images_problem(x: Tensor) -> str | None:
    """Why ``x`` cannot be images read from a data set (finite, in [0, 1], on the uint8 grid), else ``None``."""
    if not bool(torch.isfinite(x).all()):
        return "not finite (NaN or Inf values)"
    if float(x.min()) < 0 or float(x.max()) > 1:
        return f"outside [0, 1] (range [{float(x.min()):.4g}, {float(x.max()):.4g}])"
    off = int(((x * 255 - (x * 255).round()).abs() > 1e-3).sum())
    return f"off the uint8 grid ({off} values)" if off else None


#: the test split's index per data module: sha256 of each image's bytes -> its label
_TEST_INDEX: WeakKeyDictionary = WeakKeyDictionary()


def held_out_index(dm: Any) -> dict[str, int]:
    """The sha256 of every test image of ``dm`` (as the data module gives it to the model) and its label."""
    if dm not in _TEST_INDEX:
        ds = dm.test_dataset
        images, labels = getattr(ds, "images", None), getattr(ds, "labels", None)
        if isinstance(images, Tensor) and isinstance(labels, Tensor) and getattr(ds, "transform", None) is None:
            keys, ys = image_digests(images), labels.tolist()
        else:
            items = [ds[i] for i in range(len(ds))]
            keys = image_digests(torch.stack([it["image"] for it in items])) if items else []
            ys = [int(it["label"]) for it in items]
        _TEST_INDEX[dm] = {key: int(y) for key, y in zip(keys, ys)}
    return _TEST_INDEX[dm]


def _labels_from_data(s: AttackSet, dm: Any, where: str) -> Tensor:
    """The data's labels of the set's clean images; refused when an image is not a test input of ``dm`` or the file's
    label disagrees with the data's."""
    index = held_out_index(dm)
    keys = image_digests(s.x)
    foreign = [i for i, key in enumerate(keys) if key not in index]
    name = str(getattr(dm, "name", type(dm).__name__))
    if foreign:
        raise ValueError(f"{where}: {len(foreign)} of its {len(keys)} clean inputs are not test inputs of the data "
                         f"({name}; first: input {foreign[0]}): the set was crafted on other data; give that data "
                         "with --data")
    labels = torch.tensor([index[key] for key in keys], dtype=torch.long)
    wrong = int((labels != s.label).sum())
    if wrong:
        raise ValueError(f"{where}: {wrong} of its labels differ from the data's labels for the same images ({name})")
    return labels
