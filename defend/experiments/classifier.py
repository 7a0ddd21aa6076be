"""Experiment ``classifier``: train (or reuse) the classifier, then check that its interpretations are meaningful.

Rows: test accuracy; for CAM and GRAD the share of map energy inside the ground-truth object mask next to
the mask's area share; for MASK the class probability after deleting MASK's region vs a random region of
equal area (deletion test).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attacks import frozen, get_interpreter
from attacks.interpreters import MaskInterpreter, to_input_size

from ..figures import map_grid
from ..metrics import Localisation
from ..types import PositiveCount
from .common import (
    ClassifierExperimentConfig,
    classifier_outputs,
    default_data,
    get_classifier,
    markdown_table,
    setup_data,
    take_split,
    write_outputs,
)
from .config import check_class_options, register_experiment

__all__ = ["run", "deletion_test", "ClassifierExperiment", "ClassifierEvaluation"]


@dataclass
class ClassifierEvaluation:
    """How the interpretations are checked: ``n_images`` test images (localisation), ``n_mask`` of them for the MASK
    deletion test, ``mask``: :class:`~attacks.interpreters.MaskInterpreter` options."""

    n_images: PositiveCount = PositiveCount(256)
    n_mask: PositiveCount = PositiveCount(64)
    mask: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClassifierExperiment(ClassifierExperimentConfig):
    """Train (or reuse) the classifier and check that its interpretations are meaningful."""

    evaluation: ClassifierEvaluation = field(default_factory=ClassifierEvaluation)


def check(cfg: ClassifierExperiment) -> None:
    cfg.classifier.check(default_data(cfg))
    check_class_options(MaskInterpreter, cfg.evaluation.mask, "evaluation.mask")
    if cfg.evaluation.n_mask > cfg.evaluation.n_images:
        raise ValueError(f"evaluation.n_mask ({cfg.evaluation.n_mask}) cannot exceed evaluation.n_images "
                         f"({cfg.evaluation.n_images})")


def outputs(cfg: ClassifierExperiment, out: Path) -> list[Path]:
    return [out / "maps.png", *classifier_outputs(cfg, out)]


def _accuracy(model, dm, batch_size: int = 256) -> float:
    correct = total = 0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dm.test_dataset, batch_size=batch_size):
            correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
            total += batch["label"].numel()
    return correct / max(total, 1)


def deletion_test(model, interp, x, cls, generator: torch.Generator) -> tuple[float, float, float]:
    """Mean class probability: intact, with MASK's region blurred out, with a random equal-area region blurred out."""
    m = interp.solve(model, x, cls)  # 1 = keep
    blurred = interp.blurred(x)
    up = to_input_size(m, tuple(x.shape[-2:]))
    deleted = (1 - up).flatten(1)
    # random mask with the same amount of deletion: a shuffled copy of the same low-resolution mask
    perm = torch.stack([torch.randperm(m[0].numel(), generator=generator) for _ in range(m.shape[0])])
    m_rand = m.flatten(1).gather(1, perm).view_as(m)
    up_r = to_input_size(m_rand, tuple(x.shape[-2:]))
    assert torch.allclose(deleted.mean(1), (1 - up_r).flatten(1).mean(1), atol=0.05)

    def prob(img):
        return model(img).softmax(1).gather(1, cls.view(-1, 1)).mean().item()

    with torch.no_grad():
        return prob(x), prob(x * up + blurred * (1 - up)), prob(x * up_r + blurred * (1 - up_r))


@register_experiment("classifier", ClassifierExperiment, outputs=outputs, check=check)
def run(cfg: ClassifierExperiment, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    ecfg = cfg.evaluation
    rows: list[dict[str, Any]] = [{"setting": "classifier", "metric": "test_accuracy", "value": _accuracy(model, dm),
                                   "train_seconds": info.get("train_seconds", 0.0)}]
    data = take_split(dm, "test", int(ecfg.n_images))
    x, y = data["image"], data["label"]
    gen = torch.Generator().manual_seed(int(cfg.seed))
    maps = {}
    with frozen(model):
        for name in ("cam", "grad"):
            interp = get_interpreter(name)
            maps[name] = interp(model, x, y).detach()
            if "mask" in data:
                loc = Localisation()
                loc.update(maps[name], data["mask"])
                res = loc.compute()
                rows.append({"setting": name, "metric": "localisation", "value": float(res["energy_in_mask"]),
                             "mask_area": float(res["mask_area"])})
        n_mask = int(ecfg.n_mask)
        mask = get_interpreter("mask", **ecfg.mask)
        p0, p_mask, p_rand = deletion_test(model, mask, x[:n_mask], y[:n_mask], gen)
        maps["mask"] = mask(model, x[:8], y[:8])
        if "mask" in data:
            loc = Localisation()
            loc.update(mask(model, x[:n_mask], y[:n_mask]), data["mask"][:n_mask])
            res = loc.compute()
            rows.append({"setting": "mask", "metric": "localisation", "value": float(res["energy_in_mask"]),
                         "mask_area": float(res["mask_area"])})
    rows.append({"setting": "mask", "metric": "deletion_prob", "value": p_mask, "random_deletion_prob": p_rand,
                 "intact_prob": p0})
    report = [f"# Classifier: {cfg.classifier.arch()} on {dm.describe()['name']}", "",
              f"Test accuracy: **{rows[0]['value']:.4f}** (training {info.get('train_seconds', 0.0):.0f} s; "
              f"checkpoint `{info['checkpoint']}`)", "",
              "## Interpretations are meaningful", "",
              markdown_table(["interpreter", "energy inside object mask", "mask area share"],
                             [[r["setting"].upper(), r["value"], r["mask_area"]] for r in rows if r["metric"] == "localisation"]),
              "", "Deletion test (mean probability of the true class):", "",
              markdown_table(["intact", "MASK region deleted", "random equal-area region deleted"], [[p0, p_mask, p_rand]]),
              "", "![maps](maps.png)", ""]
    columns = [("image", x[:8])] + ([("object mask", data["mask"][:8])] if "mask" in data else []) + \
              [(k.upper(), v[:8]) for k, v in maps.items()]
    map_grid(out / "maps.png", columns, rows=8)
    write_outputs(out, rows, "\n".join(report))
    return rows
