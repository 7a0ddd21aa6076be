"""The detector-aware attack on a saved detector, swept over its ``detector_weight``, with restarts, its Pareto front,
a convergence check and the surrogate's fit on held-out maps (issue 27, item 1: the detector).

Tramer et al. 2020 ("On adaptive attacks to adversarial example defenses"): attack the function the defence computes
(the booster, through its distilled surrogate: :class:`~attacks.adaptive.DetectorAwareTerm`), keep per input the
iterate that is best by the defender's own figure, use restarts, and check convergence (a larger budget must not
help). For each weight ``w`` of the sweep (``0``: the plain ensemble ADV2 on the interpreters the detector reads),
``restarts`` seeded runs (the first from the benign input, the others from random starts where the threat model has
one) and the plain attack's own adversarial inputs are the candidates; per input the candidate kept is the one that
**evades the real booster** (reaches the target and is not flagged at the 5 %-FPR threshold), then the one whose
maps are closest to the benign maps (top-k IoU, averaged over the interpreters the detector reads). The plain
attack is a candidate of every weight, so the detector-aware attack never evades less than the plain one on the same
inputs.

:func:`detector_sweep` returns, per weight and for the plain attack: attack success and evasion at 5 % FPR (of all
inputs, Wilson), the detection rate at that threshold (of the inputs that reach the target, Wilson), the map IoU to
benign (of those inputs, bootstrap), ``n``, seconds per input and the budget with its preset
(:func:`defend.presets.preset_of`); the Pareto front over (evasion up, IoU up); McNemar's test of the strongest
weight's evasion against the plain attack's; the convergence check (:func:`budget_verdict`) and the surrogate's fit
(:func:`defend.booster_surrogate.surrogate_agreement`) on held-out maps and on the maps of the attack's final inputs.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attacks import build_attack
from attacks.frameworks import threat_options

from . import stats
from .booster_surrogate import surrogate_agreement
from .detection_data import compute_maps, stack_maps
from .metrics import topk_iou
from .presets import preset_of

__all__ = ["DEFAULT_WEIGHTS", "SWEEP_FPR", "Judged", "SweepSetup", "detector_sweep", "pareto_front", "budget_verdict",
           "judge", "keep_best", "surrogate_fit", "run_weight", "figures"]

#: the detector weights swept by default (0: the plain ensemble attack)
DEFAULT_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
#: the false-positive rate of the threshold the sweep judges evasion at
SWEEP_FPR = 0.05


@dataclass
class Judged:
    """What the real detector and the classifier say about adversarial inputs (per input): ``hit`` (the target is
    reached), ``flagged`` (the booster's probability is above the threshold), ``iou`` (top-k IoU of the maps to the
    benign maps, mean over the detector's interpreters) and the stacked maps the detector read."""

    hit: Tensor
    flagged: Tensor
    iou: Tensor
    maps: Tensor

    @property
    def evaded(self) -> Tensor:
        """Reached the target and not flagged: the end-to-end success against the real detector."""
        return self.hit & ~self.flagged


@dataclass
class SweepSetup:
    """The detector under attack and the inputs: ``detector`` (a :class:`~defend.detector.DetectorModule` with its
    booster), the ``interpreters`` it reads in channel order (name -> interpreter) and ``product``, the booster
    ``threshold`` (5 % FPR on benign development inputs), the inputs ``x`` with their ``target`` classes, the attack
    options (``framework``, ``options`` of :func:`attacks.build_attack`, the runs seeded from ``seed``), the
    differentiable ``surrogate``, ``batch_size`` and the benign maps (computed when not given)."""

    classifier: nn.Module
    detector: Any
    interpreters: Mapping[str, Any]
    product: bool
    threshold: float
    x: Tensor
    target: Tensor
    surrogate: nn.Module
    framework: str = "pgd"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 50
    benign_maps: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.benign_maps:
            self.benign_maps = self.maps_of(self.x)[0]

    def maps_of(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The maps of every interpreter the detector reads, for the prediction, and the predictions (batched)."""
        parts = [compute_maps(self.classifier, x[i:i + self.batch_size], self.interpreters)
                 for i in range(0, x.shape[0], self.batch_size)]
        return {n: torch.cat([p[0][n] for p in parts]) for n in self.interpreters}, torch.cat([p[1] for p in parts])


def judge(setup: SweepSetup, x_adv: Tensor) -> Judged:
    """The real detector's verdict on ``x_adv`` (maps for the prediction, as the detector reads inputs)."""
    maps, pred = setup.maps_of(x_adv)
    names = list(setup.interpreters)
    stacked = stack_maps(maps, names, setup.product)
    prob = setup.detector.predict_proba(stacked)
    iou = torch.stack([topk_iou(maps[n], setup.benign_maps[n]).mean(1) for n in names]).mean(0)
    return Judged(pred.cpu() == setup.target.cpu(), prob > setup.threshold, iou.cpu(), stacked)


def keep_best(candidates: Sequence[tuple[Tensor, Judged]]) -> tuple[Tensor, Judged]:
    """Per input, the candidate ``(x_adv, judged)`` that evades the real detector, then reaches the target, then has
    the highest IoU to benign; on a tie the earlier candidate (the plain attack first)."""
    score = torch.stack([j.evaded.double() * 4 + j.hit.double() * 2 + j.iou.double() for _, j in candidates])
    pick = score.argmax(0)  # the first maximum
    take = lambda ts: torch.stack(ts)[pick, torch.arange(pick.numel())]  # noqa: E731
    x = take([c[0] for c in candidates])
    j = Judged(take([c[1].hit for c in candidates]), take([c[1].flagged for c in candidates]),
               take([c[1].iou for c in candidates]), take([c[1].maps for c in candidates]))
    return x, j


def _engine(setup: SweepSetup, weight: float, restart: int, steps_factor: int) -> Any:
    """The detector-aware ADV2 of one run (``restart`` 0 from the benign input, later ones from random starts)."""
    opts = dict(setup.options, seed=setup.seed + restart)
    if "random_start" in threat_options(setup.framework):
        opts["random_start"] = restart > 0
    if steps_factor != 1:
        base = build_attack("adaptive_detector", setup.framework, list(setup.interpreters.values()),
                            detector=setup.surrogate, detector_weight=weight, product=setup.product, **opts).budget
        opts.update(warm_steps=steps_factor * int(base["warm_steps"]), steps=steps_factor * int(base["steps"]))
    return build_attack("adaptive_detector", setup.framework, list(setup.interpreters.values()),
                        detector=setup.surrogate, detector_weight=weight, product=setup.product, **opts)


def run_weight(setup: SweepSetup, weight: float, restarts: int, plain: tuple[Tensor, Judged],
               steps_factor: int = 1) -> dict[str, Any]:
    """The restarts of one weight, the plain attack's inputs as the first candidate, the best kept per input.
    Returns ``x_adv``, ``judged`` (the kept), ``runs`` (each run's :class:`Judged`), ``seconds`` and ``budget``."""
    candidates, runs, start, budget = [plain], [], time.perf_counter(), {}
    for r in range(restarts):
        engine = _engine(setup, weight, r, steps_factor)
        budget = dict(engine.budget)
        x_adv = torch.cat([engine(setup.classifier, setup.x[i:i + setup.batch_size],
                                  setup.target[i:i + setup.batch_size]).x_adv.detach()
                           for i in range(0, setup.x.shape[0], setup.batch_size)])
        runs.append(judge(setup, x_adv))
        candidates.append((x_adv, runs[-1]))
    x_best, best = keep_best(candidates)
    budget.update(restarts=int(restarts), detector_weight=float(weight), plain_candidate=True)
    return {"x_adv": x_best, "judged": best, "runs": runs, "seconds": time.perf_counter() - start, "budget": budget}


def figures(j: Judged, seed: int) -> dict[str, Any]:
    """Attack success and evasion (of all inputs, Wilson), detection rate (of the inputs that reach the target,
    Wilson) and map IoU to benign (of those, bootstrap), each with its 95 % interval, and the counts."""
    hit = j.hit.bool()
    some = bool(hit.any())
    return {**stats.proportion(hit).fields("attack_success"), **stats.proportion(j.evaded).fields("evasion_rate_fpr5"),
            **stats.interval_fields("detection_rate_fpr5", stats.proportion(j.flagged[hit]) if some else None),
            **stats.interval_fields("iou", stats.bootstrap_mean(j.iou[hit], seed) if some else None),
            "n": int(hit.numel()), "n_success": int(hit.sum())}


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Per point ``(evasion, iou)``: whether no other point is at least as good on both and better on one (both
    figures higher is better); a point with a missing figure is never on the front."""
    ok = [p[0] is not None and p[1] is not None for p in points]
    out = []
    for i, p in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(ok[k] and q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1])
                        for k, q in enumerate(points) if k != i)
        out.append(not dominated)
    return out


def budget_verdict(normal: Judged, doubled: Judged, seed: int, factor: int = 2) -> dict[str, Any]:
    """The convergence check: the same weight with ``factor`` x the steps against the normal budget on the same
    inputs. The budget was too small when the longer attack evades more (McNemar on evasion) or is detected less
    (McNemar on the inputs both reach) beyond noise (p < 0.05)."""
    ev = stats.mcnemar(doubled.evaded.double(), normal.evaded.double(), seed)
    both = normal.hit & doubled.hit
    det = stats.mcnemar(doubled.flagged[both].double(), normal.flagged[both].double(), seed)
    rate = lambda t: float(t.double().mean()) if t.numel() else float("nan")  # noqa: E731
    e0, e1 = rate(normal.evaded), rate(doubled.evaded)
    d0, d1 = rate(normal.flagged[both]), rate(doubled.flagged[both])
    too_small = (ev.significant and e1 > e0) or (det.significant and d1 < d0)
    said = (f"evasion {e0:.3f} -> {e1:.3f} (n {normal.evaded.numel()}, McNemar p = {ev.p_value:.2g}); detection "
            f"{d0:.3f} -> {d1:.3f} (n {int(both.sum())} reached by both, p = {det.p_value:.2g})")
    verdict = (f"budget too small: {factor}x the steps helps the attack beyond noise ({said})" if too_small else
               f"converged: {factor}x the steps does not help the attack beyond noise ({said})")
    return {"steps_factor": factor, "evasion": e0, "evasion_longer": e1, "evasion_p": ev.p_value,
            "detection_rate": d0, "detection_rate_longer": d1, "detection_p": det.p_value,
            "n": int(normal.evaded.numel()), "n_both": int(both.sum()), "too_small": bool(too_small),
            "verdict": verdict}


def _point(setup: SweepSetup, attack: str, weight: float | None, judged: Judged, seconds: float,
           budget: dict[str, Any]) -> dict[str, Any]:
    """One point of the sweep (a weight, or the plain attack): its figures, budget, preset and time per input."""
    n = max(int(setup.x.shape[0]), 1)
    label = "+".join(setup.interpreters)
    return {"attack": attack, "detector_weight": weight, "restarts": int(budget.get("restarts", 1)),
            **figures(judged, setup.seed), "budget": budget, "budget_preset": preset_of(label, budget),
            "seconds_per_input": seconds / n, "per_input": {"evasion": [float(v) for v in judged.evaded.double()]}}


def surrogate_fit(detector: Any, maps: Tensor) -> dict[str, Any] | None:
    """The distilled surrogate's fit to the booster on stacked ``maps`` (:func:`surrogate_agreement`); ``None`` for a
    detector without one."""
    if getattr(detector, "surrogate", None) is None:
        return None
    return surrogate_agreement(*detector.surrogate_scores(maps))


def _strongest(points: list[dict[str, Any]]) -> int:
    """The index of the strongest weight: the highest evasion, then the highest IoU, then the lowest weight."""
    key = lambda i: (points[i]["evasion_rate_fpr5"] or 0.0, points[i]["iou"] or 0.0, -points[i]["detector_weight"])  # noqa: E731
    return max(range(len(points)), key=key)


def detector_sweep(setup: SweepSetup, plain_x_adv: Tensor, *, plain_attack: str, plain_budget: dict[str, Any],
                   weights: Sequence[float] = DEFAULT_WEIGHTS, restarts: int = 2, budget_check: bool = True,
                   held_out_maps: Tensor | None = None, plain_seconds: float = 0.0) -> dict[str, Any]:
    """The sweep of the module docstring on ``setup``'s inputs, the plain attack's adversarial inputs
    ``plain_x_adv`` (crafted by ``plain_attack`` with ``plain_budget`` on the same inputs and targets) as the first
    candidate of every weight. ``held_out_maps``: stacked maps the booster was not trained on (the surrogate's
    held-out fit). Returns ``points`` (the plain attack, then one per weight, each with ``pareto``), ``strongest``
    (its weight), ``versus_plain`` (McNemar of its evasion against the plain attack's), ``budget_check`` (``None``
    when off) and ``surrogate`` (``held_out`` and ``along_iterates`` fits)."""
    if restarts < 1 or not weights or any(float(w) < 0 for w in weights):
        raise ValueError(f"the detector sweep needs restarts >= 1 and weights >= 0, got {restarts} and {list(weights)}")
    plain = (plain_x_adv, judge(setup, plain_x_adv))
    runs = {float(w): run_weight(setup, float(w), int(restarts), plain) for w in weights}
    points = [_point(setup, "adaptive_detector", w, r["judged"], r["seconds"], r["budget"]) for w, r in runs.items()]
    for p, on in zip(points, pareto_front([(p["evasion_rate_fpr5"], p["iou"]) for p in points])):
        p["pareto"] = on
    best = float(points[_strongest(points)]["detector_weight"])
    base = _point(setup, plain_attack, None, plain[1], plain_seconds, dict(plain_budget))
    base["pareto"] = False
    versus = stats.mcnemar(runs[best]["judged"].evaded.double(), plain[1].evaded.double(), setup.seed)
    check = None
    if budget_check:
        longer = run_weight(setup, best, int(restarts), plain, steps_factor=2)
        check = budget_verdict(runs[best]["judged"], longer["judged"], setup.seed, 2)
    iterates = torch.cat([j.maps for r in runs.values() for j in r["runs"]])
    surrogate = {"held_out": None if held_out_maps is None else surrogate_fit(setup.detector, held_out_maps),
                 "along_iterates": surrogate_fit(setup.detector, iterates)}
    return {"points": [base, *points], "strongest": best, "threshold": float(setup.threshold),
            "versus_plain": versus.fields("evasion_vs_plain"), "budget_check": check, "surrogate": surrogate}
