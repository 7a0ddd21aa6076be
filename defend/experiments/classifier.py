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
from attacks.interpreters import MaskInterpreter
from attacks.maps import resize_map

from .. import stats
from ..figures import map_grid
from ..inputs import take_split
from ..metrics import Localisation
from ..progress import Progress
from ..tables import markdown_table
from ..typed_config import check_class_options
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


def _accuracy(model, dm, batch_size: int = 256) -> stats.Estimate:
    """Accuracy on the whole test split with its Wilson interval."""
    correct = total = 0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dm.test_dataset, batch_size=batch_size):
            correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
            total += batch["label"].numel()
    return stats.wilson(correct, total)


def deletion_test(model, interp, x, cls, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-input class probability: intact, with MASK's region blurred out, with a random equal-area region blurred
    out."""
    m = interp.solve(model, x, cls)  # 1 = keep
    blurred = interp.blurred(x)
    up = resize_map(m, tuple(x.shape[-2:]))
    deleted = (1 - up).flatten(1)
    # random mask with the same amount of deletion: a shuffled copy of the same low-resolution mask
    perm = torch.stack([torch.randperm(m[0].numel(), generator=generator) for _ in range(m.shape[0])])
    m_rand = m.flatten(1).gather(1, perm).view_as(m)
    up_r = resize_map(m_rand, tuple(x.shape[-2:]))
    assert torch.allclose(deleted.mean(1), (1 - up_r).flatten(1).mean(1), atol=0.05)

    def prob(img):
        return model(img).softmax(1).gather(1, cls.view(-1, 1)).squeeze(1)

    with torch.no_grad():
        return prob(x), prob(x * up + blurred * (1 - up)), prob(x * up_r + blurred * (1 - up_r))


@register_experiment("classifier", ClassifierExperiment, outputs=outputs, check=check)
def run(cfg: ClassifierExperiment, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    ecfg = cfg.evaluation
    seed = int(cfg.seed)
    acc = _accuracy(model, dm)
    rows: list[dict[str, Any]] = [{"setting": "classifier", "metric": "test_accuracy", **acc.fields("value"),
                                   "n": acc.n, "split": "test", "train_seconds": info.get("train_seconds", 0.0)}]
    data = take_split(dm, "test", int(ecfg.n_images))
    x, y = data["image"], data["label"]
    gen = torch.Generator().manual_seed(seed)
    maps = {}

    def localisation_row(name: str, m: torch.Tensor, masks: torch.Tensor) -> dict[str, Any]:
        loc = Localisation()
        loc.update(m, masks)
        return {"setting": name, "metric": "localisation", **loc.estimate(seed).fields("value"),
                "mask_area": float(loc.compute()["mask_area"]), "n": int(m.shape[0]), "split": "test"}

    with frozen(model):
        for name in ("cam", "grad"):
            interp = get_interpreter(name)
            maps[name] = interp(model, x, y).detach()
            if "mask" in data:
                rows.append(localisation_row(name, maps[name], data["mask"]))
        n_mask = int(ecfg.n_mask)
        mask = get_interpreter("mask", **ecfg.mask)
        n_show = int(x[:8].shape[0])
        with Progress("MASK solves", n_mask * (2 if "mask" in data else 1) + n_show, enabled=progress) as bar:
            p0, p_mask, p_rand = deletion_test(model, mask, x[:n_mask], y[:n_mask], gen)
            bar.update(n_mask)
            maps["mask"] = mask(model, x[:8], y[:8])
            bar.update(n_show)
            if "mask" in data:
                rows.append(localisation_row("mask", mask(model, x[:n_mask], y[:n_mask]), data["mask"][:n_mask]))
                bar.update(n_mask)
    rows.append({"setting": "mask", "metric": "deletion_prob", **stats.bootstrap_mean(p_mask, seed).fields("value"),
                 **stats.bootstrap_mean(p_rand, seed).fields("random_deletion_prob"),
                 **stats.bootstrap_mean(p0, seed).fields("intact_prob"),
                 **stats.paired_bootstrap(p_mask, p_rand, seed).fields("mask_vs_random"), "n": int(p0.numel()),
                 "split": "test"})
    fig = lambda r, k="value": stats.format_value(r.get(k), r.get(f"{k}_ci_low"), r.get(f"{k}_ci_high"))  # noqa: E731
    d = rows[-1]
    report = [f"# Classifier: {cfg.classifier.arch()} on {dm.describe()['name']}", "",
              f"Test accuracy: **{acc.text()}** (Wilson 95 % interval; training {info.get('train_seconds', 0.0):.0f} "
              f"s; checkpoint `{info['checkpoint']}`)", "",
              "## Interpretations are meaningful", "",
              f"Value [95 % bootstrap interval over inputs, seed {seed}].", "",
              markdown_table(["interpreter", "energy inside object mask", "mask area share", "n"],
                             [[r["setting"].upper(), fig(r), r["mask_area"], r["n"]] for r in rows
                              if r["metric"] == "localisation"]),
              "", f"Deletion test (mean probability of the true class, {d['n']} inputs):", "",
              markdown_table(["intact", "MASK region deleted", "random equal-area region deleted",
                              "MASK minus random (paired bootstrap)"],
                             [[fig(d, "intact_prob"), fig(d), fig(d, "random_deletion_prob"),
                               f"{fig(d, 'mask_vs_random_diff')}, p = {d['mask_vs_random_p']:.2g}"]]),
              "", "![maps](maps.png)", ""]
    columns = [("image", x[:8])] + ([("object mask", data["mask"][:8])] if "mask" in data else []) + \
              [(k.upper(), v[:8]) for k, v in maps.items()]
    map_grid(out / "maps.png", columns, rows=8)
    write_outputs(out, rows, "\n".join(report))
    return rows
