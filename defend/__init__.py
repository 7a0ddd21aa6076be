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

import importlib
from typing import Any

#: where each public name lives; imported on first use (PEP 562), so ``defend --help`` loads no torch / Lightning
_WHERE = {
    **dict.fromkeys(["selection", "stats"], ""),
    **dict.fromkeys(["AIDModule", "AIDSchedule", "InnerAttack", "RTSObjective", "load_rts", "save_rts"], ".aid"),
    "autoattack_accuracy": ".autoattack",
    **dict.fromkeys(["ClassifierModule", "load_classifier", "save_classifier"], ".classifier"),
    **dict.fromkeys(["BaseDataModule", "CIFAR10DataModule", "DigitsDataModule", "ImageFolderDataModule"], ".data"),
    "DetectorModule": ".detector",
    **dict.fromkeys(["evaluate_system", "load_card", "validate_card"], ".evaluate"),
    **dict.fromkeys(["bar_chart", "line_plot", "map_grid", "roc_plot"], ".figures"),
    **dict.fromkeys(["centre_of_mass_shift", "kendall_tau", "map_cosine_similarity", "map_l1", "map_l2",
                     "max_sensitivity", "noise_rate", "spearman_rho", "topk_intersection", "topk_iou"], ".metrics"),
    **dict.fromkeys(["ARCHITECTURES", "GapClassifier", "build_classifier", "wrap_classifier"], ".models"),
    **dict.fromkeys(["DefenceModule", "Optimiser"], ".module_base"),
    **dict.fromkeys(["InnerMaximisation", "RobustClassifierModule"], ".robust"),
    **dict.fromkeys(["interpretation_robustness", "pgd_accuracy", "sensitivity"], ".robust_eval"),
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module 'defend' has no attribute {name!r}")
    where = _WHERE[name]
    value = importlib.import_module(f"{__name__}{where or '.' + name}")
    value = getattr(value, name) if where else value
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "__version__", "stats", "selection",
    # defences (LightningModules) and their option groups
    "DefenceModule", "Optimiser", "ClassifierModule", "RobustClassifierModule", "InnerMaximisation",
    "AIDModule", "RTSObjective", "AIDSchedule", "InnerAttack", "DetectorModule",
    # data and models
    "BaseDataModule", "DigitsDataModule", "CIFAR10DataModule", "ImageFolderDataModule",
    "GapClassifier", "ARCHITECTURES", "build_classifier", "wrap_classifier", "load_classifier", "save_classifier", "load_rts", "save_rts",
    # measurement
    "map_l1", "map_l2", "topk_iou", "noise_rate", "kendall_tau", "spearman_rho", "topk_intersection",
    "map_cosine_similarity", "centre_of_mass_shift", "max_sensitivity",
    "autoattack_accuracy", "pgd_accuracy", "interpretation_robustness", "sensitivity",
    # model cards (defend evaluate)
    "evaluate_system", "validate_card", "load_card",
    # figures
    "map_grid", "line_plot", "roc_plot", "bar_chart",
]
