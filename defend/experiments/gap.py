"""Experiment ``gap``: the prediction-interpretation gap (ADV2 paper section 5 Q1, Tables 6-8).

ADV2 is asked to reach an arbitrary target map m_t (a random circle, a random rotated rectangle, or the map of
an input of another class) while being classified as the target class. Rows report the attack success and
the L1 distance of the adversarial map to the target map next to its distance to the benign map: when the
first is much smaller, the interpreter's output can be steered away from what the classifier does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from attacks import INTERPRETERS, build_attack, random_targets
from attacks.targets import other_class_maps, random_patch_maps

from .. import stats
from ..attack_options import AttackSections
from ..evaluation import interpret, run_attack
from ..figures import map_grid
from ..inputs import select_correct
from ..interpreters import build_interpreter
from ..metrics import map_l1
from ..tables import markdown_table
from ..typed_config import check_names
from ..types import PositiveCount
from .common import (
    ClassifierExperimentConfig,
    classifier_outputs,
    default_data,
    get_classifier,
    setup_data,
    write_outputs,
)
from .config import register_experiment

__all__ = ["run", "GapExperiment", "GapEvaluation"]

TargetMap = Literal["circle", "rectangle", "other_class"]


@dataclass
class GapEvaluation:
    """``n_images`` correctly classified test inputs (random target classes) attacked in batches of ``batch_size``
    by ADV2 on PGD towards each kind of target map, for each interpreter."""

    n_images: PositiveCount = PositiveCount(32)
    batch_size: PositiveCount = PositiveCount(32)
    interpreters: list[str] = field(default_factory=lambda: ["grad", "cam", "mask"])
    targets: list[TargetMap] = field(default_factory=lambda: ["circle", "rectangle", "other_class"])


@dataclass
class GapExperiment(ClassifierExperimentConfig, AttackSections):
    """ADV2 steered to arbitrary target maps (ADV2 section 5 Q1)."""

    evaluation: GapEvaluation = field(default_factory=GapEvaluation)


def check(cfg: GapExperiment) -> None:
    check_names(cfg.evaluation.interpreters, INTERPRETERS, "evaluation.interpreters")
    if not cfg.evaluation.targets:
        raise ValueError("evaluation.targets is empty; give at least one of: circle, rectangle, other_class")
    cfg.check_attack_sections()
    cfg.classifier.check(default_data(cfg))


def outputs(cfg: GapExperiment, out: Path) -> list[Path]:
    return [out / "gap.png", *classifier_outputs(cfg, out)]


@register_experiment("gap", GapExperiment, outputs=outputs, check=check)
def run(cfg: GapExperiment, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    ecfg = cfg.evaluation
    interps, kinds, seed = ecfg.interpreters, ecfg.targets, int(cfg.seed)
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    data = select_correct(model, dm, int(ecfg.n_images))
    x, y = data["image"], data["label"]
    y_t = random_targets(y, dm.num_classes, torch.Generator().manual_seed(seed))
    bs = int(ecfg.batch_size)
    rows, figure = [], [("image", x[:4])]
    bar = tqdm(total=len(interps) * len(kinds) * x.shape[0], desc="gap", unit="input", disable=not progress)
    for name in interps:
        g = build_interpreter(name, **cfg.interpreter_options.get(name, {}))
        benign = interpret(g, model, x, y)
        for kind in kinds:
            gen = torch.Generator().manual_seed(seed + 1)
            if kind == "other_class":
                m_t = other_class_maps(benign, y, gen)
            else:
                m_t = random_patch_maps(x.shape[0], tuple(x.shape[-2:]), kind, generator=gen)
            atk = build_attack("adv2", "pgd", name, seed=seed, **cfg.attack_options("adv2", "pgd", name))
            x_adv, seconds = run_attack(atk, model, x, y_t, m_t, bs, bar)
            adv_map = interpret(g, model, x_adv, y_t)
            with torch.no_grad():
                success = model(x_adv).argmax(1) == y_t
            rows.append({"interpreter": name, "target": kind, **stats.proportion(success).fields("asr"),
                         **stats.bootstrap_mean(map_l1(adv_map, m_t), seed).fields("l1_to_target"),
                         **stats.bootstrap_mean(map_l1(adv_map, benign), seed).fields("l1_to_benign"),
                         **stats.bootstrap_mean(map_l1(benign, m_t), seed).fields("l1_benign_to_target"),
                         "seconds_per_input": seconds / x.shape[0], "n": x.shape[0], "split": "test",
                         "bootstrap_seed": seed})
            figure += [(f"{name} target {kind}", m_t[:4]), (f"{name} ADV2", adv_map[:4])]
    bar.close()
    map_grid(out / "gap.png", figure, rows=4)
    def fig(r: dict[str, Any], k: str) -> str:
        return stats.format_value(r[k], r[f"{k}_ci_low"], r[f"{k}_ci_high"])
    body = [[r["interpreter"].upper(), r["target"], *(fig(r, k) for k in ("asr", "l1_to_target", "l1_to_benign",
                                                                          "l1_benign_to_target"))] for r in rows]
    report = "\n".join([
        "# Prediction-interpretation gap (ADV2 Tables 6-8)", "",
        f"{x.shape[0]} correctly classified test inputs, random target classes, ADV2 on PGD "
        f"(classifier `{info['checkpoint']}`). Value [95 % interval] (Wilson for ASR, a percentile bootstrap over "
        f"inputs with seed {seed} otherwise)" + ("; fewer than 100 inputs: indicative only." if stats.indicative(
            int(x.shape[0])) else "."), "",
        markdown_table(["interpreter", "target map", "ASR", "L1 adv map to target", "L1 adv map to benign",
                        "L1 benign to target"], body), "",
        "A small L1 to the target next to a large L1 to the benign map means the interpreter was steered to an",
        "arbitrary explanation while the classifier predicts the attacker's class.", "", "![gap](gap.png)", ""])
    write_outputs(out, rows, report)
    return rows
