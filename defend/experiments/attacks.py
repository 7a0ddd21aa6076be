"""Experiment ``attacks``: ADV2 / AdvEdge / AdvEdge+ and plain attacks on PGD, C&W and StAdv against GRAD, CAM, MASK.

Writes one row per attack x framework x interpreter (ASR, confidence, map L1 / L2 / IoU to the benign map,
noise rate, seconds per input), the papers' tables in ``report.md``, a transferability table
(inputs crafted against interpreter A, read by interpreter B) and ``maps.png`` (the papers' Figure 4).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from attacks import ATTACKS, FRAMEWORKS, INTERPRETERS, build_attack, random_targets, uses_interpreter

from .. import stats
from ..attack_options import AttackOptions, AttackSections
from ..detection_data import code_fingerprint
from ..evaluation import PlanItem, evaluate_plan, interpret
from ..figures import map_grid
from ..inputs import select_correct
from ..interpreters import build_interpreter
from ..presets import preset_of, preset_options
from ..tables import markdown_table
from ..trainer import make_trainer
from ..typed_config import check_names
from ..types import Count, PositiveCount
from .common import (
    ClassifierExperimentConfig,
    classifier_outputs,
    default_data,
    get_classifier,
    setup_data,
    write_outputs,
)
from .config import register_experiment

__all__ = ["run", "AttacksExperiment", "AttacksEvaluation"]


@dataclass
class AttacksEvaluation:
    """``n_images`` correctly classified test inputs (a random target class each), attacked in batches of
    ``batch_size`` by every attack x framework x interpreter; ``transfer_framework``'s inputs are also read by the other
    interpreters (transferability); ``n_figure`` examples in ``maps.png``; ``cache_dir``: the per-batch resume cache
    (``auto``: ``<out>/attack_cache``; ``null``: off)."""

    n_images: PositiveCount = PositiveCount(24)
    batch_size: PositiveCount = PositiveCount(24)
    attacks: list[str] = field(default_factory=lambda: ["pgd", "adv2", "advedge", "advedge_plus"])
    frameworks: list[str] = field(default_factory=lambda: ["pgd", "cw", "stadv"])
    interpreters: list[str] = field(default_factory=lambda: ["grad", "cam", "mask"])
    transfer_framework: str = "pgd"
    n_figure: Count = Count(3)
    cache_dir: str | None = "auto"


@dataclass
class AttacksExperiment(ClassifierExperimentConfig, AttackSections):
    """ADV2 / AdvEdge / AdvEdge+ and plain attacks on PGD, C&W and StAdv against the configured interpreters.
    ``attack_preset``: ``paper`` (ADV2's official budgets) or ``cpu`` (our CPU budgets) sets eps / alpha /
    warm_steps / steps / c / c_end per target interpreter (:data:`defend.presets.ATTACK_PRESETS`; the plain attack
    takes CAM's) under the attack sections, which still override it; ``null``: the sections and the core's tuned
    values only. Every row says which budget it ran (``budget_preset``)."""

    evaluation: AttacksEvaluation = field(default_factory=AttacksEvaluation)
    attack_preset: Literal["paper", "cpu"] | None = None

    def preset_layer(self, interpreter: str | None) -> AttackOptions | None:
        """The preset's budget for attacks on ``interpreter`` (``None`` without a preset)."""
        if self.attack_preset is None:
            return None
        return AttackOptions(**preset_options(self.attack_preset, interpreter or "cam"))


def check(cfg: AttacksExperiment) -> None:
    ev = cfg.evaluation
    check_names(ev.attacks, ATTACKS, "evaluation.attacks")
    check_names(ev.frameworks, FRAMEWORKS, "evaluation.frameworks")
    check_names(ev.interpreters, INTERPRETERS, "evaluation.interpreters")
    check_names([ev.transfer_framework], FRAMEWORKS, "evaluation.transfer_framework")
    if ev.n_figure > ev.n_images:
        raise ValueError(f"evaluation.n_figure ({ev.n_figure}) cannot exceed evaluation.n_images ({ev.n_images})")
    cfg.check_attack_sections()
    cfg.classifier.check(default_data(cfg))


def outputs(cfg: AttacksExperiment, out: Path) -> list[Path]:
    return [out / "maps.png", *classifier_outputs(cfg, out)]


def _plan(cfg: AttacksExperiment, interps: dict[str, Any]) -> list[PlanItem]:
    """Every attack x framework x target interpreter (the plain attack once per framework), with its readers."""
    ev, plan = cfg.evaluation, []
    for fw in ev.frameworks:
        for attack in ev.attacks:
            for target in (ev.interpreters if uses_interpreter(attack) else [None]):
                opts = cfg.attack_options(attack, fw, target)
                engine = build_attack(attack, fw, interps[target] if target else "cam", seed=int(cfg.seed), **opts)
                readers = ev.interpreters if (target is None or fw == ev.transfer_framework) else [target]
                plan.append(PlanItem(attack, fw, target, engine, list(readers)))
    return plan


@register_experiment("attacks", AttacksExperiment, outputs=outputs, check=check)
def run(cfg: AttacksExperiment, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    ecfg = cfg.evaluation
    seed = int(cfg.seed)
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    data = select_correct(model, dm, int(ecfg.n_images))
    x, y = data["image"], data["label"]
    y_t = random_targets(y, dm.num_classes, torch.Generator().manual_seed(seed))
    bs = int(ecfg.batch_size)
    interps = {n: build_interpreter(n, **cfg.interpreter_options.get(n, {})) for n in ecfg.interpreters}
    transfer_fw = ecfg.transfer_framework
    plan = _plan(cfg, interps)
    n_show = int(ecfg.n_figure)
    trainer = make_trainer(cfg.trainer, 1, inference_mode=False, use_distributed_sampler=False,
                           enable_progress_bar=False, logger=False)
    # per-batch resume cache: a re-run skips finished batches. AttackEvaluation keys every entry on the batch's
    # tensors, the classifier's weights and the engine's settings; this key adds what those cannot see: the code
    cache = str(Path(cfg.output_dir or out) / "attack_cache") if ecfg.cache_dir == "auto" else ecfg.cache_dir
    key = hashlib.sha256(json.dumps({"attack_code": code_fingerprint(), "format": 2}).encode()).hexdigest()[:16]
    start = time.perf_counter()
    ev = evaluate_plan(model, interps, plan, {"image": x, "label": y, "target": y_t}, trainer, batch_size=bs,
                       keep=n_show, cache_dir=cache, cache_key=key, progress=progress, seed=seed)
    wall = time.perf_counter() - start
    if not trainer.is_global_zero:  # one rank publishes; the figures are already synced on every rank
        return []
    rows: list[dict[str, Any]] = []
    transfer: list[dict[str, Any]] = []
    for item in plan:
        budget = item.engine.budget
        preset = preset_of(item.interpreter or "cam", budget)
        flat = {f"budget_{k}": v for k, v in budget.items() if not isinstance(v, (dict, list))}
        for reader in item.readers:
            res = ev.results[(item.key, reader)]
            if item.interpreter is None or reader == item.interpreter:
                rows.append({"attack": item.attack, "framework": item.framework, "interpreter": reader, **res,
                             **flat, "budget_preset": preset,
                             "split": "test", "bootstrap_seed": seed, "processes": trainer.world_size,
                             "evaluation_wall_seconds": wall})
            if item.interpreter is not None and item.framework == transfer_fw:
                transfer.append({"attack": item.attack, "source": item.interpreter, "target": reader,
                                 "seconds_per_input": res.get("seconds_per_input"), "budget_preset": preset,
                                 **{f"transfer_{k}{c}": res.get(f"{k}{c}") for k in ("l1", "iou")
                                    for c in ("", "_ci_low", "_ci_high")}})
    for t in transfer:
        rows.append({"attack": t.pop("attack"), "framework": transfer_fw, "interpreter": t.pop("source"),
                     "read_by": t.pop("target"), "split": "test", **t})
    adv_store = {}
    for item in plan:
        if item.framework != transfer_fw or item.key not in ev.examples:
            continue
        for name in (ecfg.interpreters if item.interpreter is None else [item.interpreter]):
            adv_store[(item.attack, item.framework, name)] = ev.examples[item.key]
    names = list(getattr(dm, "class_names", []) or [])
    _figure(out, model, x[:n_show], y[:n_show], y_t[:n_show], ev.benign, interps, adv_store, transfer_fw, n_show,
            names)
    write_outputs(out, rows, _report(cfg, info, ecfg, rows, x.shape[0], trainer.world_size, wall))
    return rows


def _label(c: int, names: list[str]) -> str:
    return f"{c} ({names[c]})" if names and names[c] != str(c) else str(c)


def _figure(out, model, x, y, y_t, benign, interps, adv_store, fw, n_show: int, names: list[str]) -> None:
    """``maps.png``: per example (row, true -> target class) the input, each interpreter's benign map, and the
    adversarial image of ADV2 next to the maps of every attack against that interpreter (the papers' Figure 4)."""
    columns = [("input", x[:n_show])]
    adv_images = adv_store.get(("adv2", fw, next(iter(interps))))
    if adv_images is not None:
        columns.append(("ADV2 input", adv_images[:n_show]))
    for name, g in interps.items():
        columns.append((f"{name.upper()} benign", benign[name][:n_show]))
        for attack in ("pgd", "adv2", "advedge", "advedge_plus"):
            key = (attack, fw, name)
            if key in adv_store:
                columns.append((f"{name.upper()} {attack}", interpret(g, model, adv_store[key][:n_show], y_t[:n_show])))
    labels = [f"{_label(int(a), names)} -> {_label(int(b), names)}" for a, b in zip(y[:n_show], y_t[:n_show])]
    map_grid(out / "maps.png", columns, rows=n_show, row_labels=labels,
             title=f"Benign and adversarial maps ({fw.upper()} framework; rows: true -> target class)")


#: figures that describe successful adversarial inputs: meaningless for a row where every input failed
_SUCCESS_FIGURES = ("l1", "l2", "iou", "noise_rate")


def _cell(row: dict[str, Any], field: str) -> Any:
    """A table cell with its 95 % interval; "not measured" where the figure would describe adversarial inputs that
    all failed."""
    if field in _SUCCESS_FIGURES and row.get("asr", 1.0) == 0:
        return "not measured (0 % success)"
    if f"{field}_ci_low" in row:
        return stats.format_value(row.get(field), row.get(f"{field}_ci_low"), row.get(f"{field}_ci_high"))
    return row.get(field, float("nan"))


def _report(cfg, info, ecfg, rows, n, processes: int = 1, wall: float = float("nan")) -> str:
    main = [r for r in rows if "read_by" not in r]
    interps = ecfg.interpreters
    lines = [f"# Attack evaluation ({n} correctly classified test inputs, random target classes)", "",
             f"Classifier checkpoint: `{info['checkpoint']}`. Attack options: `{cfg.attack.set_options()}`.", "",
             f"Budget preset: `{cfg.attack_preset}`; the rows ran "
             f"{', '.join(sorted({str(r.get('budget_preset')) for r in main}))} budgets (`budget_preset` in "
             "metrics.json: `paper` = ADV2's official scripts, `cpu` = our scaled-down CPU budget, `custom` = "
             "neither).", "",
             f"Every figure: value [95 % interval] over the {n} inputs (Wilson for the success rate, a percentile "
             f"bootstrap over inputs otherwise, seed {cfg.seed})"
             + ("; fewer than 100 inputs: indicative only." if stats.indicative(n) else ".")
             + (f" Two unrelated maps score an IoU of {main[0]['iou_chance']:.3f} by chance."
                if main and main[0].get("iou_chance") is not None else ""), "",
             f"Evaluated by {processes} process(es) in {wall:.0f} s of wall time (each input attacked once; "
             "seconds per input = attack compute time summed over processes / inputs).", ""]

    def table(field: str, title: str) -> None:
        lines.extend([f"## {title}", ""])
        headers = ["framework", "attack"] + [i.upper() for i in interps]
        body = []
        for fw in ecfg.frameworks:
            for a in ecfg.attacks:
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
        for a in ecfg.attacks:
            if a == "pgd":
                continue
            body = []
            for s in interps:
                body.append([a, s.upper()] + [next((_cell(r, "transfer_l1") for r in tr if r["attack"] == a
                                                    and r["interpreter"] == s and r["read_by"] == t), "-")
                                              for t in interps])
            lines.extend([markdown_table(["attack", "source"] + [t.upper() for t in interps], body), ""])
    lines.extend(["![maps](maps.png)", ""])
    return "\n".join(lines)
