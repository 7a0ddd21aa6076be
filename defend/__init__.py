"""Lightning side of the framework: data, model zoo, defence modules, evaluation, metrics and the CLI.

A flat namespace for notebooks (see ``docs/api.md``)::

    import attacks, defend
    model = defend.load_classifier("checkpoints/digits_small_cnn.pt")
    dm = defend.DigitsDataModule(seed=0)
    adv = attacks.build_attack("adv2", "pgd", "cam", eps=8 / 255)(model, x, target)
    defend.map_l1(cam(model, adv.x_adv, target), cam(model, x, y))

Submodules hold the rest: :mod:`defend.metrics` (every metric), :mod:`defend.stats` (the interval and the paired
test of every figure), :mod:`defend.selection` (choices on the development split only), :mod:`defend.robust_eval`,
:mod:`defend.experiments` (the registered experiments), :mod:`defend.figures`.
"""
from __future__ import annotations

from . import selection, stats
from .aid import AIDModule, AIDSchedule, InnerAttack, RTSObjective, load_rts, save_rts
from .autoattack import autoattack_accuracy
from .classifier import ClassifierModule, load_classifier, save_classifier
from .data import BaseDataModule, CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from .detector import DetectorModule
from .evaluate import evaluate_system, load_card, validate_card  # noqa: E402  (model cards: defend evaluate)
from .figures import bar_chart, line_plot, map_grid, roc_plot
from .metrics import (
                      centre_of_mass_shift,
                      kendall_tau,
                      map_cosine_similarity,
                      map_l1,
                      map_l2,
                      max_sensitivity,
                      noise_rate,
                      spearman_rho,
                      topk_intersection,
                      topk_iou,
)
from .models import ARCHITECTURES, GapClassifier, build_classifier
from .module_base import DefenceModule, Optimiser
from .robust import InnerMaximisation, RobustClassifierModule
from .robust_eval import interpretation_robustness, pgd_accuracy, sensitivity

__version__ = "0.1.0"

__all__ = [
    "__version__", "stats", "selection",
    # defences (LightningModules) and their option groups
    "DefenceModule", "Optimiser", "ClassifierModule", "RobustClassifierModule", "InnerMaximisation",
    "AIDModule", "RTSObjective", "AIDSchedule", "InnerAttack", "DetectorModule",
    # data and models
    "BaseDataModule", "DigitsDataModule", "CIFAR10DataModule", "ImageFolderDataModule",
    "GapClassifier", "ARCHITECTURES", "build_classifier", "load_classifier", "save_classifier", "load_rts", "save_rts",
    # measurement
    "map_l1", "map_l2", "topk_iou", "noise_rate", "kendall_tau", "spearman_rho", "topk_intersection",
    "map_cosine_similarity", "centre_of_mass_shift", "max_sensitivity",
    "autoattack_accuracy", "pgd_accuracy", "interpretation_robustness", "sensitivity",
    # model cards (defend evaluate)
    "evaluate_system", "validate_card", "load_card",
    # figures
    "map_grid", "line_plot", "roc_plot", "bar_chart",
]
