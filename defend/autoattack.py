"""Robust accuracy under AutoAttack (Croce & Hein, ICML 2020), standard version, from the authors' code.

We call ``pyautoattack`` (the packaging of github.com/fra31/auto-attack that RobustBench itself depends on) rather
than a re-implementation, so that our figures are RobustBench's figures: APGD-CE, APGD-T (DLR loss, 9 target classes),
FAB-T (9 target classes) and Square (5,000 queries), L-inf. The only changes are forced by small label sets: with K < 10
classes the targeted attacks use the K - 1 classes there are; with K < 4 the targeted DLR loss (it reads the third and
fourth largest logits) is not defined, so the ``reduced`` version runs instead (:func:`autoattack_plan`): APGD-DLR
untargeted in place of APGD-T with 3 classes (its loss reads the third largest logit), no DLR attack at all with 2.
The card's rows name the version and the attacks run.

The classifier is wrapped so the package sees the logits of [0, 1] inputs (normalisation stays inside the model), in
eval mode with frozen parameters (no ``.grad`` left on them); the caller's flags are restored.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from attacks.base_attack import BALL_ATTACKS, Attack, AttackResult, prob_of
from attacks.checks import check_images, check_labels
from attacks.frameworks import PGD
from attacks.state import frozen

__all__ = ["AutoAttackResult", "autoattack_accuracy", "autoattack_plan", "AUTOATTACK_VERSION", "AutoAttackAttack"]

AUTOATTACK_VERSION = "standard"
#: the attacks of the standard version, and of the reduced one by class count (the DLR losses need K >= 4 / K >= 3)
STANDARD_ATTACKS = ["apgd-ce", "apgd-t", "fab-t", "square"]
REDUCED_ATTACKS = {3: ["apgd-ce", "apgd-dlr", "fab-t", "square"], 2: ["apgd-ce", "fab-t", "square"]}
#: AutoAttack's own warning about the class count, answered by :func:`autoattack_plan` (not kept among the flags)
_CLASS_COUNT = re.compile(r"with only \d+ classes it is not possible to use the (targeted )?DLR loss")
_STAGE = re.compile(r"robust accuracy after (\S+): ([0-9.]+)%")


class _Logits(nn.Module):
    """The classifier as AutoAttack sees it: float32 logits of [0, 1] images."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).float()


class _Collect(logging.Handler):
    """Keeps AutoAttack's log lines: its per-attack robust accuracy and its own gradient-masking warnings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.stages: dict[str, float] = {}
        self.flags: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        hit = _STAGE.search(msg)
        if hit:
            self.stages[hit.group(1).lower()] = float(hit.group(2)) / 100
        if record.levelno >= logging.WARNING:
            self.flags.append(" ".join(msg.split()))


@dataclass
class AutoAttackResult:
    """Per-input robustness (``robust[i]``: still correct after every attack), the adversarial inputs, the
    accuracy after each attack of the ensemble, AutoAttack's own warnings, and the settings used."""

    robust: Tensor
    x_adv: Tensor
    stages: dict[str, float]
    flags: list[str]
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.robust.float().mean())


def autoattack_plan(num_classes: int) -> tuple[str, list[str], int]:
    """``(version, attacks, target classes)`` AutoAttack runs against ``num_classes`` classes: the standard version
    from 4 classes on, the reduced one below (module docstring); fewer than 2 classes is an error."""
    if num_classes < 2:
        raise ValueError(f"AutoAttack needs at least 2 classes, the classifier has {num_classes}")
    targets = min(9, num_classes - 1)
    if num_classes >= 4:
        return AUTOATTACK_VERSION, list(STANDARD_ATTACKS), targets
    return "reduced", list(REDUCED_ATTACKS[num_classes]), targets


def autoattack_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, seed: int = 0,
                        batch_size: int = 256) -> AutoAttackResult:
    """Run AutoAttack (L-inf radius ``eps``; the version :func:`autoattack_plan` gives for the class count) on ``x``
    with labels ``y``; clean errors count as non-robust."""
    from pyautoattack import AutoAttack

    check_images(x)
    num_classes = getattr(model, "num_classes", None) or int(model(x[:1]).shape[1])
    check_labels(y, num_classes, x.shape[0])
    if not eps > 0:
        raise ValueError(f"AutoAttack needs eps > 0, got {eps}")
    version, attacks, targets = autoattack_plan(num_classes)
    log = logging.getLogger("auto-attack")
    handler, level, propagate = _Collect(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        with frozen(model):
            aa = AutoAttack(_Logits(model), eps=float(eps), norm="Linf", version=AUTOATTACK_VERSION, seed=seed,
                            device=x.device)
            aa.attacks_to_run = attacks  # the standard version's settings, with the attacks the classes allow
            aa.apgd_targeted.n_target_classes = targets
            aa.fab.n_target_classes = targets
            x_adv, y_adv = aa.run_standard_evaluation(x.detach(), y.detach(), batch_size=batch_size)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    settings = {"version": version, "attacks": list(aa.attacks_to_run), "norm": "Linf", "eps": float(eps),
                "target_classes": targets, "square_queries": int(aa.square.n_queries), "seed": seed,
                "n": int(x.shape[0])}
    flags = [f for f in handler.flags if not _CLASS_COUNT.search(f)]
    return AutoAttackResult(y_adv.to(y.device) == y, x_adv.detach(), handler.stages, flags, settings)


@BALL_ATTACKS.register("autoattack")
class AutoAttackAttack(Attack):
    """:func:`autoattack_accuracy` under the attack contract (goal ``"leave"``: ``y`` is the label). Its images are
    brought to the uint8 grid inside the ball (AutoAttack's own are not on it) and ``success`` is read on them, so it
    can differ from ``not robust`` by the rounding; the card's AutoAttack rows keep AutoAttack's own figure."""

    goal = "leave"

    def __init__(self, eps: float, interpreter: Any = None, seed: int = 0, batch_size: int = 256) -> None:
        self.threat = PGD(eps, eps, random_start=False)
        self.threat.check_grid_budget()
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.settings: dict[str, object] = {}

    @property
    def budget(self) -> dict[str, Any]:
        return {"framework": "autoattack", "eps": float(self.threat.eps), "norm": "Linf", "seed": self.seed,
                **{k: self.settings[k] for k in ("version", "attacks") if k in self.settings}}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        start = time.perf_counter()
        res = autoattack_accuracy(model, x, y, float(self.threat.eps), seed=self.seed, batch_size=self.batch_size)
        self.settings = res.settings
        x_adv = self.threat.quantise(x.detach(), res.x_adv.to(x))
        logits, p = prob_of(model, x_adv, y)
        return AttackResult(x_adv, y, logits.argmax(1) != y, p, None, time.perf_counter() - start, 0)
