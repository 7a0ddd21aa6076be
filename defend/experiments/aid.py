"""Experiment ``aid``: plain RTS vs AID-trained RTS on the same classifier (ADV2 section 5 Q3, Figures 15-16, Table 10).

1. Train the fair baseline (``training.rts_selector``): a plain RTS (:class:`defend.aid.AIDModule`, ``aid.weight =
   0``) whose class selector is trained (``objective.fake_label_prob`` > 0, as Dabkowski and Gal); the baseline of
   the ratio (null: the baseline is the plain RTS below).
2. Train the plain RTS (``training.rts``, class selector untrained), the start of the AID run.
3. Train RTS with AID (``aid.weight > 0``): by default fine-tuning the plain RTS weights (``training.aid.init: rts``;
   ``scratch`` trains from scratch). Every run takes its :class:`~defend.aid.AIDModule` arguments from
   ``training.module``, overridden group by group by ``training.<run>.module`` (the ``defend fit`` dialect of
   ``configs/aid/*.yaml``, checked against the module's signature before anything runs). A run with ``checkpoint``
   reuses that saved network instead (checked before anything runs; the report names the file and its sha256).
4. On ``evaluation.n_images`` correctly classified test inputs with random target classes, run ADV2 with the
   *same budget* against each interpreter (``evaluation.attack``: PGD eps / step, warm start, joint stage with the
   RTS term = map MSE + encoder CE) and measure: ``l1_benign_vs_adv2`` / ``iou_benign_vs_adv2`` (benign map of the
   true class vs the map of the adversarial input for the target class), ``asr``, ``localisation`` (map energy
   inside the object mask, with ``mask_area`` the share a uniform map would get), ``class_query_l1`` (map of the
   clean input for its true class vs for the target class), ``benign_drift_l1`` (benign maps vs the baseline's),
   ``l1_benign_rts_vs_rts_aid``, and the L1 between clean and noisy maps under Gaussian noise at two levels
   chosen to cause about ``evaluation.noise.misclassification`` (3 % and 30 %) errors (Figure 15). A CAM row gives
   the localisation of CAM on the same classifier.
5. With ``evaluation.adaptive``: the adaptive attack (``adaptive_rts``: restarts, a c sweep, a longer run and, against
   RTS-AID, the transfer from the plain RTS) on the first inputs of every interpreter, per input the strongest of
   its runs and the plain ADV2 run (``adaptive_*`` figures, the runs kept), and the AID ratio under it
   (``adaptive_l1_ratio``), the report's headline.

Every attacked row carries ``budget_preset`` (:func:`defend.presets.preset_of`) and ``seconds_per_input``.
``epoch_seconds`` is the mean training-batch time times the number of batches of a full epoch (so runs with
``limit_train_batches`` still compare whole epochs); ``epoch_time_ratio`` is relative to plain RTS.
Outputs: ``metrics.json``, ``report.md``, ``aid.png`` (Figure 16 columns, then Figure 15 columns), and each trained
network, ``rts_selector.pt``, ``rts.pt`` and ``rts_aid.pt`` (safe RTS artifacts, :func:`defend.aid.load_rts`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from attacks import build_attack, get_framework
from attacks.adv2 import ADV2, random_targets
from attacks.interpreters import CAMInterpreter
from attacks.interpreters.rts import RTSInterpreter, RTSNetwork

from .. import stats
from ..aid import AID_OPTIMISER, AIDModule, AIDSchedule, InnerAttack, RTSObjective, load_rts
from ..callbacks import KeepBest
from ..classifier import load_classifier
from ..data import BaseDataModule
from ..data.base import split_name
from ..evaluation import interpret, run_attack
from ..figures import map_grid
from ..inputs import select_correct
from ..io import file_sha256
from ..metrics import DEFAULT_FRACTIONS, localisation, map_l1, topk_iou
from ..module_base import as_options
from ..presets import preset_of
from ..tables import markdown_table
from ..typed_config import check_class_options
from ..types import Count, Fraction01, NonNegative, PositiveCount, Radius
from .common import (
    ClassifierSpec,
    classifier_outputs,
    default_data,
    get_classifier,
    setup_data,
    train_rts,
    write_outputs,
)
from .config import ExperimentConfig, register_experiment
from .runner import deep_merge

__all__ = ["run", "AIDExperiment", "AIDTrainingPlan", "RTSTraining", "AIDTraining", "AIDSelection", "AIDEvaluation",
           "AIDAttack",
           "NoiseLevels", "BatchTimer", "noise_levels", "check_rts_module", "MODULE_SKIP"]

#: the AIDModule arguments an experiment sets itself (not in a config's ``module:`` sections)
MODULE_SKIP = ("classifier", "num_classes", "init_from", "seed")

#: the validation figures kept for each epoch of a selected AID run (report.md, metrics.json)
SELECTION_RECORD = ("val/l1_adv", "val/localisation", "val/localisation_anchor", "val/attack_asr")

PLAIN = {"aid": {"weight": 0.0}}  # what makes an AIDModule a plain RTS


# --------------------------------------------------------------------------------------------- config
def check_rts_module(options: dict[str, Any], where: str, init_from: str | None = None) -> None:
    """``options`` (AIDModule arguments) fit its signature, its option groups' own checks and the checks across
    groups (``init_from``: whether the run fine-tunes; a placeholder is enough)."""
    check_class_options(AIDModule, options, where, skip=MODULE_SKIP)
    try:
        groups = SimpleNamespace(objective=as_options(options.get("objective"), RTSObjective(), "objective"),
                                 aid=as_options(options.get("aid"), AIDSchedule(), "aid"),
                                 attack=as_options(options.get("attack"), InnerAttack(), "attack"),
                                 optimiser=as_options(options.get("optimiser"), AID_OPTIMISER, "optimiser"),
                                 val_max_localisation_drop=options.get("val_max_localisation_drop", 0.1))
        AIDModule._check_options(groups, options.get("explain", "label"), init_from)  # the module's own rules
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check_rts_file(path: str, where: str, classifier: ClassifierSpec) -> None:
    """A reused RTS network loads safely and fits the classifier (checked here when that is reused too)."""
    try:
        net = load_rts(path)
    except (OSError, ValueError) as exc:  # a missing file, a CheckpointError
        raise ValueError(f"{where}: {exc}") from None
    if classifier.reuses():
        try:
            net.check_model(load_classifier(classifier.checkpoint))
        except ValueError as exc:
            raise ValueError(f"{where} {path} does not fit classifier {classifier.checkpoint}: {exc}") from None


def _check_reuse(path: str, where: str, classifier: ClassifierSpec) -> None:
    """A network reused instead of trained explains one given classifier: that classifier is reused too, and the
    file loads safely and fits it."""
    _check_rts_file(path, where, classifier)
    if not classifier.reuses():
        raise ValueError(f"{where} reuses an RTS network, which explains one classifier: set classifier.checkpoint "
                         f"to the existing classifier it was trained for (none at {classifier.checkpoint})")


@dataclass
class RTSTraining:
    """One RTS training run: :class:`~defend.aid.AIDModule` with ``module`` (its arguments) for ``max_epochs``
    epochs of at most ``limit_train_batches`` batches each; with ``checkpoint`` the saved network is reused (no
    training; its sha256 is reported)."""

    max_epochs: PositiveCount = PositiveCount(1)
    limit_train_batches: PositiveCount | None = None
    module: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass
class AIDSelection:
    """Early stopping by selection (not in the paper): validate after every AID epoch, the inner ADV2 on
    ``attack_batches`` validation batches, and keep the epoch with the best ``val/aid_score``
    (:func:`defend.aid.aid_score`: the largest benign-vs-ADV2 map L1 among the epochs whose validation localisation
    is within ``max_localisation_drop`` of the plain RTS's). ``val_batches``: validation batches for localisation
    (null: the whole split). Candidates are epoch ends only: the localisation swings with the phase of the
    ``aid.every`` cycle (lowest right after an ``l_aid`` step), so candidates must share it (docs/results.md)."""

    attack_batches: PositiveCount = PositiveCount(2)
    max_localisation_drop: Fraction01 = Fraction01(0.1)
    val_batches: PositiveCount | None = None


@dataclass
class AIDTraining(RTSTraining):
    """The AID run (``aid.weight > 0``): ``init: rts`` fine-tunes the plain RTS of this experiment, ``scratch``
    trains from scratch; ``select``: keep the best epoch on a validation figure (:class:`AIDSelection`; null: the
    last epoch)."""

    init: Literal["rts", "scratch"] = "rts"
    select: AIDSelection | None = None


@dataclass
class AIDTrainingPlan:
    """``module``: the AIDModule arguments every interpreter shares (``classifier``, ``num_classes``, ``init_from``
    and ``seed`` are set by the experiment); ``rts``: the plain RTS (``aid.weight`` is 0, its class selector
    untrained: the start of the AID run), ``rts_selector``: the plain RTS with its class selector trained
    (``objective.fake_label_prob`` > 0; the fair baseline of the ratio; null: none, the baseline is ``rts``),
    ``aid``: the AID-trained one; ``noise``: the RTS trained with the noise distillation term (``aid.noise_sigma``
    > 0, :class:`~defend.aid.AIDSchedule`; the scorecard's ``rts_noise`` row; this experiment neither trains nor
    reports it; null: none); each merges its own ``module`` over the shared one, group by group."""

    module: dict[str, Any] = field(default_factory=dict)
    rts: RTSTraining = field(default_factory=RTSTraining)
    rts_selector: RTSTraining | None = None
    aid: AIDTraining = field(default_factory=AIDTraining)
    noise: AIDTraining | None = None

    def options(self, which: Literal["rts", "rts_selector", "aid", "noise"]) -> dict[str, Any]:
        """The AIDModule arguments of the plain (``rts``), the fair-baseline (``rts_selector``), the AID or the noise
        run."""
        if which in ("aid", "noise"):
            return deep_merge(self.module, getattr(self, which).module)
        run = self.rts if which == "rts" else self.rts_selector
        return deep_merge(deep_merge(self.module, run.module if run is not None else {}), PLAIN)

    def runs(self) -> dict[str, RTSTraining]:
        """The interpreters of the experiment by row name, in training order (``rts_selector`` first when set)."""
        first = {} if self.rts_selector is None else {"rts_selector": self.rts_selector}
        return {**first, "rts": self.rts, "rts_aid": self.aid}

    def init_of(self, part: str) -> str | None:
        """The part of the plan that run ``part`` fine-tunes: ``rts`` for a fine-tuning run (``aid`` / ``noise``)
        with ``init: rts``; None when it trains from scratch."""
        return "rts" if getattr(getattr(self, part, None), "init", None) == "rts" else None

    def check(self, classifier: ClassifierSpec) -> None:
        """Every section fits AIDModule; the plain runs are plain, the selector's trains its selector, the AID run
        trains ``l_aid``; a reused network loads and fits the classifier."""
        for where, opts in (("training.module", self.module), ("training.rts.module", self.rts.module),
                            ("training.aid.module", self.aid.module)):
            check_class_options(AIDModule, opts, where, skip=MODULE_SKIP)
        if float((self.rts.module.get("aid") or {}).get("weight", 0.0)) != 0:
            raise ValueError("training.rts is the plain RTS: leave out training.rts.module.aid.weight (it is 0)")
        self._check_selector()
        for name, run in self.runs().items():
            if run.checkpoint is not None:
                _check_reuse(run.checkpoint, f"training.{'aid' if name == 'rts_aid' else name}.checkpoint",
                             classifier)
        check_rts_module(self.options("rts"), "training.rts")
        aid = self.options("aid")
        check_rts_module(aid, "training.aid", init_from="rts.pt" if self.aid.init == "rts" else None)
        if not float((aid.get("aid") or {}).get("weight", 0.0)) > 0:
            raise ValueError("training.aid.module.aid.weight must be > 0 (it is the AID-trained interpreter)")
        anchor = (aid.get("aid") or {}).get("anchor_from")
        if anchor:
            _check_rts_file(anchor, "training.aid.module.aid.anchor_from", classifier)
        if float((aid.get("aid") or {}).get("noise_sigma", 0.0)) > 0:
            raise ValueError("training.aid is the AID run: leave out training.aid.module.aid.noise_sigma (the noise run "
                             "is training.noise)")
        self.check_noise(classifier)
        sched = aid.get("aid") or {}
        if self.aid.select is not None and not float(self.aid.select.max_localisation_drop) < 1:
            raise ValueError("training.aid.select.max_localisation_drop must be < 1 (1 admits any localisation)")
        if self.aid.select is not None and not (float(sched.get("anchor_weight", 0)) > 0
                                                or float(sched.get("anchor_aid_weight", 0)) > 0):
            raise ValueError("training.aid.select measures localisation against the anchor network: set "
                             "training.aid.module.aid.anchor_weight (or anchor_aid_weight) > 0, or select: null")

    def check_noise(self, classifier: ClassifierSpec) -> None:
        """The noise run (when set) fits AIDModule, trains the noise term and fine-tunes without selection."""
        run = self.noise
        if run is None:
            return
        check_class_options(AIDModule, run.module, "training.noise.module", skip=MODULE_SKIP)
        if run.checkpoint is not None:
            _check_reuse(run.checkpoint, "training.noise.checkpoint", classifier)
        opts = self.options("noise")
        check_rts_module(opts, "training.noise", init_from="rts.pt" if run.init == "rts" else None)
        if not float((opts.get("aid") or {}).get("noise_sigma", 0.0)) > 0:
            raise ValueError("training.noise trains the noise distillation term: set training.noise.module.aid."
                             "noise_sigma > 0 (e.g. 0.25) and aid.weight > 0")
        if run.select is not None:
            raise ValueError("training.noise.select: selection measures the ADV2 map L1 of the AID run; use select: "
                             "null for the noise run")

    def _check_selector(self) -> None:
        """The fair baseline is a plain RTS that trains its class selector (``objective.fake_label_prob`` > 0)."""
        sel = self.rts_selector
        if sel is None:
            return
        check_class_options(AIDModule, sel.module, "training.rts_selector.module", skip=MODULE_SKIP)
        if float((sel.module.get("aid") or {}).get("weight", 0.0)) != 0:
            raise ValueError("training.rts_selector is a plain RTS: leave out training.rts_selector.module.aid.weight")
        opts = self.options("rts_selector")
        check_rts_module(opts, "training.rts_selector")
        if not float((opts.get("objective") or {}).get("fake_label_prob", 0.0)) > 0:
            raise ValueError("training.rts_selector trains the class selector: set training.rts_selector.module."
                             "objective.fake_label_prob > 0 (e.g. 0.3), or rts_selector: null for no fair baseline")


@dataclass
class AIDAttack:
    """ADV2 on PGD against each interpreter, the same budget for both: radius ``eps`` and step ``alpha`` (image
    units, ``1/255`` accepted), ``warm_steps`` warm-start + ``steps`` joint steps, ``c`` on the RTS term = map MSE +
    ``enc_weight`` x CE of the encoder's class head toward the target."""

    eps: Radius = Radius(0.031)
    alpha: Radius = Radius(1 / 255)
    warm_steps: Count = Count(300)
    steps: Count = Count(300)
    c: NonNegative = NonNegative(1.0)
    enc_weight: NonNegative = NonNegative(0.1)


@dataclass
class NoiseLevels:
    """Figure 15: of the Gaussian noise ``sigmas``, those whose misclassification rates come closest to each of
    ``misclassification``."""

    misclassification: list[Fraction01] = field(default_factory=lambda: [Fraction01(r) for r in (0.03, 0.30)])
    sigmas: list[NonNegative] = field(
        default_factory=lambda: [NonNegative(s) for s in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)])


@dataclass
class AdaptiveAttack:
    """The adaptive attack (attack ``adaptive_rts``) on the first ``n_images`` evaluated inputs, same targets, the
    budget of ``evaluation.attack`` per run: its plain ADV2 run, ``restarts`` runs with encoder weight
    ``enc_weight``, one run per ``c`` of ``c_values`` (null: none), one ``long_factor`` times longer (null: none)
    and, against RTS-AID with ``transfer``, the inputs crafted on the plain RTS it was fine-tuned from. Per input
    the run kept is the successful one whose map is closest to the benign map, the evaluation's plain ADV2 run
    included (so it is never weaker than plain ADV2 on the same inputs)."""

    n_images: PositiveCount = PositiveCount(64)
    restarts: PositiveCount = PositiveCount(2)
    enc_weight: NonNegative = NonNegative(0.2)
    c_values: list[NonNegative] | None = None
    long_factor: NonNegative | None = None
    transfer: bool = True


@dataclass
class AIDEvaluation:
    """``n_images`` correctly classified inputs of ``split`` (a random target class each) in batches of
    ``batch_size``; ``n_figure`` of them in ``aid.png``. ``split: test`` for final figures; a run that tunes the
    recipe (a sweep, a trajectory) evaluates on ``dev``. ``adaptive``: the adaptive attack on every interpreter
    (:class:`AdaptiveAttack`; null: off)."""

    split: Literal["test", "dev", "val"] = "test"
    n_images: PositiveCount = PositiveCount(256)
    batch_size: PositiveCount = PositiveCount(64)
    n_figure: PositiveCount = PositiveCount(4)
    attack: AIDAttack = field(default_factory=AIDAttack)
    noise: NoiseLevels = field(default_factory=NoiseLevels)
    adaptive: AdaptiveAttack | None = field(default_factory=AdaptiveAttack)


@dataclass
class AIDExperiment(ExperimentConfig):
    """Plain RTS vs AID-trained RTS on the same classifier, attacked by ADV2 with the same budget."""

    data: BaseDataModule | None = None
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    training: AIDTrainingPlan = field(default_factory=AIDTrainingPlan)
    evaluation: AIDEvaluation = field(default_factory=AIDEvaluation)


def check(cfg: AIDExperiment) -> None:
    """Every cross-field check, before anything runs."""
    ev = cfg.evaluation
    if ev.n_figure > ev.n_images:
        raise ValueError(f"evaluation.n_figure ({ev.n_figure}) cannot exceed evaluation.n_images ({ev.n_images})")
    if not ev.noise.misclassification or not ev.noise.sigmas:
        raise ValueError("evaluation.noise.misclassification and evaluation.noise.sigmas need at least one value each")
    try:
        get_framework("pgd", eps=float(ev.attack.eps), alpha=float(ev.attack.alpha)).check_grid_budget()
    except ValueError as exc:
        raise ValueError(f"evaluation.attack: {exc}") from None
    ad = ev.adaptive
    if ad is not None and ad.long_factor is not None and not float(ad.long_factor) > 1:
        raise ValueError(f"evaluation.adaptive.long_factor must be > 1 (a longer run), got {float(ad.long_factor):g};"
                         " null for none")
    if ad is not None and ad.c_values is not None and not ad.c_values:
        raise ValueError("evaluation.adaptive.c_values is empty: list the c values to sweep, or null for none")
    if cfg.training.noise is not None:
        raise ValueError("training.noise is the scorecard's rts_noise run: the aid experiment neither trains nor "
                         "reports it; remove training.noise (or run it with defend experiment -c "
                         "configs/experiments/scorecard.yaml --defences=[rts,rts_noise])")
    cfg.training.check(cfg.classifier)
    cfg.classifier.check(default_data(cfg))


def outputs(cfg: AIDExperiment, out: Path) -> list[Path]:
    """The files besides metrics / report / config / provenance: the figure, every RTS network trained here (not
    the reused ones), the classifier."""
    nets = [out / f"{name}.pt" for name, run in cfg.training.runs().items() if run.checkpoint is None]
    return [out / "aid.png", *nets, *classifier_outputs(cfg, out)]


# --------------------------------------------------------------------------------------------- training
class BatchTimer(pl.Callback):
    """Wall time of every training batch (forward, inner attack, backward, optimiser step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    @property
    def mean(self) -> float:
        return sum(self.seconds) / max(len(self.seconds), 1)


def _train(cfg: ExperimentConfig, run: RTSTraining, options: dict[str, Any], clf_path: str, dm: BaseDataModule,
           init_from: str | None, out_path: Path, progress: bool) -> dict[str, Any]:
    """Train one RTS variant (``options``: AIDModule arguments) and export it (:func:`.common.train_rts`); return
    the network and its timing."""
    timer = BatchTimer()
    select = getattr(run, "select", None)
    callbacks: list[pl.Callback] = [timer]
    if select is not None:
        options = {**options, "val_attack_batches": int(select.attack_batches),
                   "val_max_localisation_drop": float(select.max_localisation_drop)}
        callbacks.append(KeepBest("val/aid_score", "max", record=SELECTION_RECORD))
    module, seconds = train_rts(cfg, dm, clf_path, options, out_path, int(run.max_epochs), run.limit_train_batches,
                                init_from, progress, callbacks=callbacks,
                                val_batches=0 if select is None else select.val_batches)
    weight = float(module.aid.weight)
    if weight > 0 and module.aid_steps == 0:
        raise ValueError(f"the AID run trained no l_aid step ({len(timer.seconds)} batches): it would be a plain RTS "
                         "labelled AID; train more batches or lower aid.every")
    full = len(dm.train_dataloader())
    res = {"network": load_rts(out_path), "train_seconds": seconds, "batch_seconds": timer.mean,
           "batches": len(timer.seconds), "epoch_seconds": timer.mean * full, "full_epoch_batches": full,
           "aid_weight": weight, "aid_steps": module.aid_steps, "epochs": int(run.max_epochs)}
    if select is not None:
        keep = callbacks[-1]
        res.update({"selected_epoch": keep.best_epoch, "selected_batches": keep.best_batches,
                    "selection": keep.history})
    return res


def _reused(path: str) -> dict[str, Any]:
    """A saved RTS network loaded instead of trained: the network, its file and sha256 (no training figures)."""
    return {"network": load_rts(path), "reused": str(path), "sha256": file_sha256(path)}


def _train_all(cfg: AIDExperiment, dm: BaseDataModule, clf_path: str, out: Path,
               progress: bool) -> dict[str, dict[str, Any]]:
    """The fair baseline (``out/rts_selector.pt``), the plain RTS (``out/rts.pt``), then the AID-trained one
    (``out/rts_aid.pt``), each trained or, with its ``checkpoint``, reused; the AID run fine-tunes the plain RTS
    (``init: rts``: the one trained here or the reused file)."""
    plan = cfg.training
    trained: dict[str, dict[str, Any]] = {}
    for name, run in plan.runs().items():
        if run.checkpoint is not None:
            if progress:
                print(f"[aid] reusing {name} from {run.checkpoint}")
            trained[name] = _reused(run.checkpoint)
            continue
        init = None
        if name == "rts_aid" and plan.aid.init == "rts":
            init = plan.rts.checkpoint or str(out / "rts.pt")
        if progress:
            what = {"rts_selector": "plain RTS with its class selector trained (fair baseline)",
                    "rts": "plain RTS (class selector untrained)"}.get(
                name, f"RTS with AID ({'fine-tuning ' + init if init else 'from scratch'})")
            print(f"[aid] training {what}")
        options = plan.options("aid" if name == "rts_aid" else name)
        trained[name] = _train(cfg, run, options, clf_path, dm, init, out / f"{name}.pt", progress)
    return trained


# --------------------------------------------------------------------------------------------- evaluation
def noise_levels(model, x: torch.Tensor, y: torch.Tensor, sigmas: list[float], rates: list[float],
                 seed: int) -> list[tuple[float, float]]:
    """For each wanted misclassification rate, the sigma of the grid whose Gaussian noise comes closest
    (``(sigma, measured rate)``)."""
    measured = []
    with torch.no_grad():
        for s in sigmas:
            gen = torch.Generator().manual_seed(seed)
            xn = (x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1)
            measured.append((float(s), float((model(xn).argmax(1) != y).float().mean())))
    return [min(measured, key=lambda sm: abs(sm[1] - r)) for r in rates]


def _noisy_inputs(model, x: torch.Tensor, y: torch.Tensor, noise: NoiseLevels,
                  seed: int) -> tuple[list[tuple[float, float]], list[torch.Tensor], list[torch.Tensor]]:
    """The chosen noise levels, the noisy inputs at each and the classifier's predictions on them."""
    levels = noise_levels(model, x, y, [float(s) for s in noise.sigmas], [float(r) for r in noise.misclassification],
                          seed)
    noisy = []
    for s, _ in levels:
        gen = torch.Generator().manual_seed(seed)
        noisy.append((x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1))
    with torch.no_grad():
        pred_noisy = [model(xn).argmax(1) for xn in noisy]
    return levels, noisy, pred_noisy


def _success(model, x_adv: torch.Tensor, y_t: torch.Tensor, bs: int) -> torch.Tensor:
    """Per input, whether the classifier predicts the target class."""
    with torch.no_grad():
        return torch.cat([model(x_adv[i:i + bs]).argmax(1) for i in range(0, x_adv.shape[0], bs)]) == y_t


def _attack_one(model, net: RTSNetwork, x: torch.Tensor, y: torch.Tensor, y_t: torch.Tensor, gt: torch.Tensor | None,
                a: AIDAttack, bs: int, seed: int) -> dict[str, Any]:
    """Benign maps, ADV2 against one RTS interpreter and the measures of its row, with its class-query sensitivity
    (map L1 between the true class and the target class queried on the clean input)."""
    g = RTSInterpreter(net, enc_weight=float(a.enc_weight))
    attack = ADV2(g, "pgd", framework_options={"eps": float(a.eps), "alpha": float(a.alpha)}, seed=seed,
                  warm_steps=int(a.warm_steps), steps=int(a.steps), c=float(a.c))
    benign = interpret(g, model, x, y, bs)
    x_adv, seconds = run_attack(attack, model, x, y_t, benign, bs)
    adv = interpret(g, model, x_adv, y_t, bs)
    success = _success(model, x_adv, y_t, bs)
    per = {"l1_benign_vs_adv2": map_l1(benign, adv), "iou_benign_vs_adv2": topk_iou(benign, adv).mean(1),
           "asr": success.float(), "class_query_l1": map_l1(benign, interpret(g, model, x, y_t, bs))}
    if gt is not None:
        per.update(localisation=localisation(benign, gt)[0], localisation_adv2=localisation(adv, gt)[0])
    r: dict[str, Any] = {
        "interpreter": g, "benign": benign, "adv": adv, "x_adv": x_adv, "per_input": per,
        **{k: float(v.double().mean()) for k, v in per.items()},
        "linf": float((x_adv - x).abs().amax()),
        "attack_seconds_per_input": seconds / x.shape[0], "seconds_per_input": seconds / x.shape[0],
        "budget_preset": preset_of("rts", attack.budget),
        "map_mean": float(benign.mean()),
    }
    if gt is not None:
        r["mask_area"] = float(gt.mean())
    return r


def _adaptive_attack(net: RTSNetwork, source: RTSNetwork | None, a: AIDAttack, ad: AdaptiveAttack,
                     seed: int) -> Any:
    """``adaptive_rts`` against ``net`` with the budget of ``a`` per run (plus the transfer from ``source``)."""
    opts: dict[str, Any] = {"restarts": int(ad.restarts), "enc_weight": float(ad.enc_weight), "seed": seed,
                            "framework_options": {"eps": float(a.eps), "alpha": float(a.alpha)},
                            "warm_steps": int(a.warm_steps), "steps": int(a.steps), "c": float(a.c)}
    if ad.c_values is not None:
        opts["c_values"] = [float(c) for c in ad.c_values]
    if ad.long_factor is not None:
        opts["long_factor"] = float(ad.long_factor)
    if source is not None:
        opts["sources"] = [RTSInterpreter(source, enc_weight=float(a.enc_weight))]
    return build_attack("adaptive_rts", "pgd", RTSInterpreter(net, enc_weight=float(a.enc_weight)), **opts)


def _adaptive_one(model, attack: Any, r: dict[str, Any], g: RTSInterpreter, x: torch.Tensor, y_t: torch.Tensor,
                  bs: int) -> dict[str, Any]:
    """The adaptive attack on ``x`` (the first inputs of the plain evaluation ``r``, same targets). Per input the
    strongest of its runs and the plain evaluation run: a success before a failure, then the map closest (L1) to
    the benign map. Returns the per-input figures, which run was kept and the attack's cost."""
    n = x.shape[0]
    benign, plain = r["benign"][:n], {k: v[:n] for k, v in r["per_input"].items()}
    outs, choice, seconds = [], [], 0.0
    for i in range(0, n, bs):
        start = time.perf_counter()
        res = attack(model, x[i:i + bs], y_t[i:i + bs], benign[i:i + bs])
        seconds += time.perf_counter() - start
        outs.append(res.x_adv)
        choice.append(torch.as_tensor(attack.last_choice).view(-1).cpu())
    adv = interpret(g, model, torch.cat(outs), y_t, bs)
    success, l1 = _success(model, torch.cat(outs), y_t, bs), map_l1(benign, adv)
    plain_ok = plain["asr"].bool()
    take = (success & ~plain_ok) | ((success == plain_ok) & (l1 < plain["l1_benign_vs_adv2"]))
    adv = torch.where(take.view(-1, 1, 1, 1), adv, r["adv"][:n])
    kept = torch.where(take.cpu(), torch.cat(choice) + 1, 0)
    names = ["adv2 (evaluation run)", *attack.run_names]
    per = {"adaptive_l1_benign_vs_adv2": torch.where(take, l1, plain["l1_benign_vs_adv2"]),
           "adaptive_iou_benign_vs_adv2": topk_iou(benign, adv).mean(1),
           "adaptive_asr": torch.where(take, success, plain_ok).float(),
           "plain_l1_benign_vs_adv2": plain["l1_benign_vs_adv2"], "plain_asr": plain["asr"]}
    weaker = plain_ok & ((per["adaptive_asr"] < 1) | (per["adaptive_l1_benign_vs_adv2"] > plain["l1_benign_vs_adv2"]))
    return {"per_input": per, "adv": adv, "adaptive_n": n, "adaptive_weaker_inputs": int(weaker.sum()),
            "adaptive_kept": "; ".join(f"{name}: {int((kept == k).sum())}" for k, name in enumerate(names)),
            "adaptive_seconds_per_input": seconds / n, "adaptive_budget_preset": preset_of("rts", attack.budget),
            "adaptive_runs": len(names)}


def _evaluate(model, nets: dict[str, RTSNetwork], data: dict[str, torch.Tensor], ev: AIDEvaluation, seed: int,
              num_classes: int, progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """ADV2 (and the adaptive attack) against each interpreter, their maps of the noisy inputs, and CAM's
    localisation."""
    x, y = data["image"], data["label"]
    gt = (data["mask"] > 0.5).float() if "mask" in data else None
    y_t = random_targets(y, num_classes, torch.Generator().manual_seed(seed))
    bs = int(ev.batch_size)
    levels, noisy, pred_noisy = _noisy_inputs(model, x, y, ev.noise, seed)
    res: dict[str, dict[str, Any]] = {}
    for name, net in nets.items():
        if progress:
            print(f"[aid] ADV2 against {name} ({x.shape[0]} inputs)")
        r = _attack_one(model, net, x, y, y_t, gt, ev.attack, bs, seed)
        g = r.pop("interpreter")
        r["noisy_maps"] = [interpret(g, model, xn, pn, bs) for xn, pn in zip(noisy, pred_noisy)]
        for k, m in enumerate(r["noisy_maps"]):
            r[f"l1_clean_vs_noise{k + 1}"] = map_l1(r["benign"], m)
        if ev.adaptive is not None:
            n_ad = min(int(ev.adaptive.n_images), x.shape[0])
            source = nets["rts"] if name == "rts_aid" and ev.adaptive.transfer else None
            if progress:
                print(f"[aid] adaptive attack against {name} ({n_ad} inputs)")
            r["adaptive"] = _adaptive_one(model, _adaptive_attack(net, source, ev.attack, ev.adaptive, seed), r, g,
                                          x[:n_ad], y_t[:n_ad], bs)
        res[name] = r
    cam = interpret(CAMInterpreter(), model, x, y, bs)
    extra = {"cam": cam, "y_t": y_t, "noisy": noisy, "pred_noisy": pred_noisy,
             "noise_levels": levels, "n": int(x.shape[0])}
    if gt is not None:
        extra["cam_localisation"] = localisation(cam, gt)[0]
        extra["mask_area"] = float(gt.mean())
    return res, extra


#: the per-input figures of an interpreter's row and their interval (Wilson for the success rate)
_FIGURES = ("l1_benign_vs_adv2", "iou_benign_vs_adv2", "asr", "localisation", "localisation_adv2", "class_query_l1")


def _estimate(name: str, values: torch.Tensor, seed: int) -> stats.Estimate:
    return stats.proportion(values) if name.endswith("asr") else stats.bootstrap_mean(values, seed)


def _intervals(r: dict[str, Any], seed: int) -> dict[str, Any]:
    """Every per-input figure of one interpreter with its 95 % interval (``<figure>_ci_low`` / ``_ci_high``)."""
    out: dict[str, Any] = {}
    for name in _FIGURES:
        if name in r["per_input"]:
            out.update(_estimate(name, r["per_input"][name], seed).fields(name))
    return out


def compare(rts: dict[str, Any], aid: dict[str, Any], seed: int) -> dict[str, Any]:
    """RTS-AID against the plain RTS on the same inputs and targets: the ratio of the benign-vs-ADV2 map L1 (and its
    paired bootstrap interval), the paired bootstrap test of that L1, the relative localisation change and McNemar's
    test of the attack's success."""
    a, b = aid["per_input"], rts["per_input"]
    out = {**stats.bootstrap_ratio(a["l1_benign_vs_adv2"], b["l1_benign_vs_adv2"], seed).fields("l1_ratio"),
           **stats.paired_bootstrap(a["l1_benign_vs_adv2"], b["l1_benign_vs_adv2"], seed).fields("l1"),
           **stats.mcnemar(a["asr"], b["asr"], seed).fields("asr")}
    if "localisation" in a:
        change = stats.bootstrap_ratio(a["localisation"], b["localisation"], seed)
        out.update(stats.Estimate(change.value - 1, change.low - 1, change.high - 1, change.n, change.method,
                                  change.seed, change.resamples).fields("localisation_change"))
        out.update(stats.paired_bootstrap(a["localisation"], b["localisation"], seed).fields("localisation"))
    return out


#: the report's name of each interpreter row
LABEL = {"rts_selector": "RTS (selector trained)", "rts": "RTS (selector untrained)", "rts_aid": "RTS-AID"}

#: the figure's column names of each interpreter
SHORT = {"rts_selector": "RTS+sel", "rts": "RTS", "rts_aid": "RTS-AID"}

#: the class selector of each plain RTS row (RTS-AID fine-tunes ``rts``)
SELECTOR = {"rts_selector": "trained", "rts": "untrained"}


def baseline_of(res: dict[str, Any]) -> str:
    """The baseline of the ratio: the plain RTS with its class selector trained when the experiment has one."""
    return "rts_selector" if "rts_selector" in res else "rts"


def _training_fields(t: dict[str, Any], ref_epoch: float | None) -> dict[str, Any]:
    """A row's training figures, or the reused file and its sha256 (no training figures for it)."""
    if "reused" in t:
        return {"reused_checkpoint": t["reused"], "checkpoint_sha256": t["sha256"]}
    out = {"epoch_seconds": t["epoch_seconds"],
           "epoch_time_ratio": t["epoch_seconds"] / ref_epoch if ref_epoch else float("nan"),
           "batch_seconds": t["batch_seconds"], "train_batches": t["batches"], "aid_steps": t["aid_steps"],
           "train_seconds": t["train_seconds"], "aid_weight": t["aid_weight"]}
    if "selected_epoch" in t:
        out.update({"selected_epoch": t["selected_epoch"], "selected_batches": t["selected_batches"],
                    "epochs": t["epochs"]})
    return out


def _adaptive_fields(ad: dict[str, Any], seed: int) -> dict[str, Any]:
    """One interpreter's figures under the adaptive attack (with intervals), which run was kept and its cost."""
    out = {k: v for k, v in ad.items() if k not in ("per_input", "adv")}
    for name, values in ad["per_input"].items():
        out.update(_estimate(name, values, seed).fields(name))
    return out


def _adaptive_compare(base: dict[str, Any], aid: dict[str, Any], seed: int) -> dict[str, Any]:
    """The AID ratio under the adaptive attack (paired bootstrap over the same inputs), its paired test, and the
    plain ratio on those same inputs."""
    a, b = aid["adaptive"]["per_input"], base["adaptive"]["per_input"]
    key, plain = "adaptive_l1_benign_vs_adv2", "plain_l1_benign_vs_adv2"
    return {**stats.bootstrap_ratio(a[key], b[key], seed).fields("adaptive_l1_ratio"),
            **stats.paired_bootstrap(a[key], b[key], seed).fields("adaptive_l1"),
            **stats.bootstrap_ratio(a[plain], b[plain], seed).fields("l1_ratio_on_adaptive_inputs")}


def _rows(res: dict[str, dict[str, Any]], extra: dict[str, Any], trained: dict[str, dict[str, Any]],
          seed: int, split: str) -> list[dict[str, Any]]:
    """One row per interpreter (rts_selector, rts, rts_aid, then cam), then one per noise level; every figure with
    its interval; the rts_aid row with its paired comparison to the baseline (:func:`compare`, and under the
    adaptive attack) and, where the baseline is the selector's, to the untrained-selector RTS (``vs_rts_*``)."""
    base = baseline_of(res)
    pair = map_l1(res["rts"]["benign"], res["rts_aid"]["benign"])
    ref_epoch = trained["rts"].get("epoch_seconds")
    common = {"split": split, "bootstrap_seed": seed, "bootstrap_resamples": stats.RESAMPLES}
    rows: dict[str, dict[str, Any]] = {}
    for name, r in res.items():
        row = {"interpreter": name, "n": extra["n"], "baseline": name == base, **common,
               "budget_preset": r["budget_preset"]}
        if name in SELECTOR:
            row["selector"] = SELECTOR[name]
        row.update({k: v for k, v in r.items() if isinstance(v, (int, float))})
        row.update(_intervals(r, seed))
        row.update(stats.bootstrap_mean(pair, seed).fields("l1_benign_rts_vs_rts_aid"))
        if name != base:
            row.update(stats.bootstrap_mean(map_l1(r["benign"], res[base]["benign"]), seed).fields("benign_drift_l1"))
        row.update(_training_fields(trained[name], ref_epoch))
        if "adaptive" in r:
            row.update(_adaptive_fields(r["adaptive"], seed))
        rows[name] = row
    aid = rows["rts_aid"]
    aid.update({**compare(res[base], res["rts_aid"], seed), "baseline_interpreter": base})
    if base != "rts":
        aid.update({f"vs_rts_{k}": v for k, v in compare(res["rts"], res["rts_aid"], seed).items()})
    if "adaptive" in res["rts_aid"]:
        aid.update(_adaptive_compare(res[base], res["rts_aid"], seed))
    cam_row = {"interpreter": "cam", "n": extra["n"], **common}
    if "cam_localisation" in extra:
        cam_row.update({**stats.bootstrap_mean(extra["cam_localisation"], seed).fields("localisation"),
                        "mask_area": extra["mask_area"]})
    out = [*rows.values(), cam_row]
    for k, (s, rate) in enumerate(extra["noise_levels"]):
        noise = {"interpreter": "noise", "level": k + 1, "sigma": s, "misclassification": rate, "n": extra["n"],
                 **common}
        for name in res:
            noise.update(stats.bootstrap_mean(res[name][f"l1_clean_vs_noise{k + 1}"], seed)
                         .fields(f"l1_clean_vs_noisy_{name}"))
        out.append(noise)
    return out


@register_experiment("aid", AIDExperiment, outputs=outputs, check=check)
def run(cfg: AIDExperiment, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Train (or reuse) the interpreters, attack them with the same budget, write the rows, the report and the
    figure."""
    t_start = time.perf_counter()
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    trained = _train_all(cfg, dm, str(info["checkpoint"]), out, progress)
    ev = cfg.evaluation
    split = split_name(ev.split)
    data = select_correct(model, dm, int(ev.n_images), split=split)
    res, extra = _evaluate(model, {k: v["network"] for k, v in trained.items()}, data, ev, int(cfg.seed),
                           dm.num_classes, progress)
    rows = _rows(res, extra, trained, int(cfg.seed), split)
    total = time.perf_counter() - t_start
    for r in rows:
        if r["interpreter"] in res:
            r["experiment_seconds"] = total
    _figure(out, data, res, extra, int(ev.n_figure))
    write_outputs(out, rows, _report(cfg, info, rows, extra, trained, total))
    return rows


def _figure(out: Path, data: dict[str, torch.Tensor], res: dict[str, dict[str, Any]], extra: dict[str, Any],
            n_show: int) -> None:
    """``aid.png``: inputs, benign and ADV2 maps of every interpreter (Figure 16), then the noise columns
    (Figure 15). Columns name the interpreters briefly: RTS+sel is the RTS with its class selector trained."""
    n_show = min(n_show, extra["n"])
    sl = slice(0, n_show)
    cols = [("input", data["image"][sl])] + [(f"{SHORT[k]} benign", r["benign"][sl]) for k, r in res.items()]
    for k, r in res.items():
        cols += [(f"ADV2 vs {SHORT[k]}", r["x_adv"][sl]), (f"{SHORT[k]} ADV2", r["adv"][sl])]
    for j, (s, rate) in enumerate(extra["noise_levels"]):
        cols.append((f"noise s={s:g} ({rate:.0%} err)", extra["noisy"][j][sl]))
        cols += [(f"{SHORT[k]} noise {j + 1}", r["noisy_maps"][j][sl]) for k, r in res.items()]
    labels = [f"y={int(a)} -> {int(b)}" for a, b in zip(data["label"][sl], extra["y_t"][sl])]
    map_grid(out / "aid.png", cols, rows=n_show, row_labels=labels)


def _check_line(what: str, a: float | None, b: float | None, ok, shown: str) -> str:
    """``PASS`` / ``FAIL`` when both figures exist, else ``not measured`` (never a verdict on missing numbers)."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b):
        return f"- not measured: {what} (this data has no object masks or the figure is missing)"
    return f"- {'PASS' if ok(a, b) else 'FAIL'}: {what} ({shown.format(a=a, b=b)})"


def _fig(row: dict[str, Any], name: str, digits: int = 3) -> str:
    """``value [low, high]`` of a row's figure (``-`` when missing)."""
    return stats.format_value(row.get(name), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high"), digits=digits)


def _checks(rts: dict, aid: dict, cam: dict, total: float) -> list[str]:
    """The report's targets: PASS / FAIL / not measured on the point estimates, and whether the 95 % interval clears
    the target too. The localisation drop is RTS-AID's against the plain RTS it fine-tunes (``vs_rts_*`` where the
    baseline is another network)."""
    ratio, low = aid.get("l1_ratio"), aid.get("l1_ratio_ci_low")
    own = "vs_rts_" if "vs_rts_localisation_change" in aid else ""
    change, change_low = aid.get(f"{own}localisation_change"), aid.get(f"{own}localisation_change_ci_low")
    drop = None if change is None else -100 * change
    lines = [
        _check_line("plain RTS localises at least as well as CAM", rts.get("localisation"), cam.get("localisation"),
                    lambda a, b: a >= b, "{a:.3f} vs {b:.3f}"),
        _check_line(f"L1 benign vs ADV2 (plain): RTS-AID >= 3x {LABEL[aid['baseline_interpreter']]}", ratio, 3.0, lambda a, b: a >= b,
                    f"{_fig(aid, 'l1_ratio', 2)}x; 95 % interval "
                    + ("above 3x" if low is not None and low >= 3 else "not entirely above 3x")),
        *_adaptive_target(aid),
        _check_line("localisation drop of RTS-AID vs the plain RTS it fine-tunes <= 10 % relative", drop, 10.0, lambda a, b: a <= b,
                    "{a:.1f} %" + (f"; 95 % interval of the change [{100 * change_low:.1f}, "
                                   f"{100 * aid[own + 'localisation_change_ci_high']:.1f}] %" if change_low is not None
                                   else "")),
        _check_line("experiment time <= 20 min", total / 60, 20.0, lambda a, b: a <= b, "{a:.1f} min"),
        f"- l_aid steps trained by RTS-AID: {aid.get('aid_steps', 'none (reused network)')}",
    ]
    return lines


def _adaptive_target(aid: dict[str, Any]) -> list[str]:
    """The 3x target under the strongest (adaptive) attack, where it was measured."""
    if "adaptive_l1_ratio" not in aid:
        return ["- not measured: the ratio under the adaptive attack (evaluation.adaptive is null)"]
    low = aid.get("adaptive_l1_ratio_ci_low")
    return [_check_line(f"L1 benign vs adversarial under the adaptive attack: RTS-AID >= 3x "
                        f"{LABEL[aid['baseline_interpreter']]}", aid["adaptive_l1_ratio"], 3.0, lambda a, b: a >= b,
                        f"{_fig(aid, 'adaptive_l1_ratio', 2)}x; 95 % interval "
                        + ("above 3x" if low is not None and low >= 3 else "not entirely above 3x"))]


def _paired_lines(rts: dict[str, Any], aid: dict[str, Any]) -> list[str]:
    """The paired tests of RTS-AID against the plain RTS on the same inputs."""
    def verdict(p: float | None, what: str) -> str:
        if p is None:
            return f"{what}: not measured"
        return f"{what}: {'p = ' + format(p, '.2g') if p >= 1e-4 else 'p < 1e-4'}" + (
            " (within noise)" if stats.within_noise(p) else "")
    lines = ["## Paired comparison on the same inputs and targets", "",
             f"Baseline: {LABEL[rts['interpreter']]}.", "",
             f"- map L1 benign vs ADV2, RTS-AID minus baseline: {_fig(aid, 'l1_diff', 4)}; "
             + verdict(aid.get("l1_p"), "paired bootstrap"),
             f"- ADV2 success, RTS-AID minus baseline: {_fig(aid, 'asr_diff')}; "
             + verdict(aid.get("asr_p"), "McNemar exact")]
    if aid.get("localisation_p") is not None:
        lines.append(f"- localisation, RTS-AID minus baseline: {_fig(aid, 'localisation_diff')}; "
                     + verdict(aid.get("localisation_p"), "paired bootstrap"))
    return lines + [""]


def _report(cfg: AIDExperiment, info: dict[str, Any], rows: list[dict[str, Any]], extra: dict[str, Any],
            trained: dict[str, dict[str, Any]], total: float) -> str:
    """``report.md``: the headline under the strongest attack, the paper's Table 10 layout, the fair-baseline and
    adaptive figures, every measure with its 95 % interval, the paired tests, the noise sensitivity, targets and
    cost."""
    by = {r["interpreter"]: r for r in rows if r["interpreter"] != "noise"}
    nets = [by[k] for k in trained]
    rts, aid, cam = by["rts"], by["rts_aid"], by["cam"]
    base = by[aid["baseline_interpreter"]]
    noise = [r for r in rows if r["interpreter"] == "noise"]
    a = cfg.evaluation.attack
    n = extra["n"]
    where = "test" if rts["split"] == "test" else "development (dev)"
    names = [LABEL[r["interpreter"]] for r in nets]
    lines = [
        "# AID: adversarial interpretation distillation of RTS (ADV2 section 5 Q3, Appendix A2)",
        "",
        f"Classifier `{info['checkpoint']}`; {n} correctly classified inputs of the **{where} split**, random target "
        f"classes. ADV2 with the same budget against every interpreter: PGD eps {float(a.eps):g}, step "
        f"{float(a.alpha):.4f}, {a.warm_steps} warm-start + {a.steps} joint steps, c = {float(a.c)}, "
        f"RTS term = map MSE + {float(a.enc_weight)} x encoder CE (budget preset `{rts['budget_preset']}`). Every "
        f"figure: mean [95 % interval] over the "
        f"inputs (Wilson for the success rate, a percentile bootstrap over inputs with seed {rts['bootstrap_seed']} "
        f"and {rts['bootstrap_resamples']} resamples otherwise)" + ("; fewer than 100 inputs: indicative only."
                                                                    if stats.indicative(n) else "."),
        "",
        *_headline(cfg, base, aid, nets),
        *_reuse_lines(trained),
        "## L1 distance to the benign maps (layout of the paper's Table 10)",
        "",
        markdown_table(["", *names], [
            [f"Benign (vs {LABEL[base['interpreter']]})", *[_fig(r, "benign_drift_l1", 4) for r in nets]],
            ["ADV2 (benign vs adversarial)", *[_fig(r, "l1_benign_vs_adv2", 4) for r in nets]],
            ["adaptive (benign vs adversarial)", *[_fig(r, "adaptive_l1_benign_vs_adv2", 4) for r in nets]],
        ]),
        "",
        f"Paper (ResNet-50, ImageNet): benign 0.03, ADV2 0.01 (RTS) vs 0.10 (RTS-AID). Here the plain ADV2 ratio "
        f"RTS-AID / {LABEL[base['interpreter']]} is {_fig(aid, 'l1_ratio', 2)}x (paired bootstrap over the same "
        "inputs).",
        "",
        *_baseline_lines(base, nets),
        *_adaptive_lines(nets),
        *_paired_lines(base, aid),
        *_measure_lines(nets, cam, noise, extra),
        "## Targets",
        "",
    ]
    lines += _checks(rts, aid, cam, total)
    lines += _selection_lines(cfg, trained["rts_aid"])
    return "\n".join(lines + _cost_lines(trained, total))


def _measure_lines(nets: list[dict[str, Any]], cam: dict[str, Any], noise: list[dict[str, Any]],
                   extra: dict[str, Any]) -> list[str]:
    """Every measure of every interpreter, then the noise sensitivity (Figure 15)."""
    names = [LABEL[r["interpreter"]] for r in nets]
    return [
        "## All measures",
        "",
        markdown_table(
            ["interpreter", "L1 benign vs ADV2", "IoU benign vs ADV2", "ASR", "localisation", "localisation (ADV2)",
             "object area", "map mean", "s / epoch", "epoch time vs RTS"],
            [[r["interpreter"], _fig(r, "l1_benign_vs_adv2", 4), _fig(r, "iou_benign_vs_adv2"), _fig(r, "asr"),
              _fig(r, "localisation"), _fig(r, "localisation_adv2"), r.get("mask_area", "-"),
              r.get("map_mean", "-"), r.get("epoch_seconds", "-"), r.get("epoch_time_ratio", "-")]
             for r in (*nets, cam)]),
        "",
        "Localisation = share of the map's energy inside the digit's ground-truth mask (a uniform map scores the "
        f"object area). IoU = top-k IoU averaged over k = 5-50 % of the pixels; two unrelated maps score "
        f"{stats.topk_iou_chance(DEFAULT_FRACTIONS, _pixels(extra)):.3f} by chance.",
        "",
        "## Sensitivity to random noise (Figure 15): L1 between clean and noisy maps",
        "",
        markdown_table(["noise sigma", "misclassified", *names],
                       [[n_["sigma"], n_["misclassification"],
                         *[_fig(n_, f"l1_clean_vs_noisy_{r['interpreter']}", 4) for r in nets]] for n_ in noise]),
        "",
    ]


def _headline(cfg: AIDExperiment, base: dict[str, Any], aid: dict[str, Any], nets: list[dict[str, Any]]) -> list[str]:
    """The AID ratio under the strongest (adaptive) attack, the plain one beside it, and the check that the adaptive
    attack is never weaker than plain ADV2 on the same inputs."""
    name = LABEL[base["interpreter"]]
    lines = ["## Headline", ""]
    if "adaptive_l1_ratio" in aid:
        lines.append(f"Map L1 benign vs adversarial, RTS-AID / {name}, under the **strongest attack** (adaptive, "
                     f"first {aid['adaptive_n']} inputs): **{_fig(aid, 'adaptive_l1_ratio', 2)}x**; under plain "
                     f"ADV2 {_fig(aid, 'l1_ratio_on_adaptive_inputs', 2)}x on the same inputs "
                     f"({_fig(aid, 'l1_ratio', 2)}x on all {aid['n']}).")
    else:
        lines.append(f"Map L1 benign vs ADV2, RTS-AID / {name}: {_fig(aid, 'l1_ratio', 2)}x under plain ADV2 only "
                     "(evaluation.adaptive is null: no adaptive attack, so this is not the strongest attack's ratio).")
    if "vs_rts_l1_ratio" in aid:
        lines.append(f"Against {LABEL['rts']} (the start of the AID run) the plain ADV2 ratio is "
                     f"{_fig(aid, 'vs_rts_l1_ratio', 2)}x.")
    measured = [r for r in nets if "adaptive_n" in r]
    if measured:
        weaker = {r["interpreter"]: r["adaptive_weaker_inputs"] for r in measured}
        lines += ["", f"- {'PASS' if not any(weaker.values()) else 'FAIL'}: adaptive L1 <= plain ADV2 L1 (and "
                      "success kept) on every input plain ADV2 brought to the target (inputs where it was weaker: "
                      + ", ".join(f"{LABEL[k]} {v}" for k, v in weaker.items()) + ")"]
    return lines + [""]


def _reuse_lines(trained: dict[str, dict[str, Any]]) -> list[str]:
    """The networks loaded from saved files instead of trained (file and sha256; no training figures for them)."""
    reused = [f"- {LABEL[k]}: reused `{t['reused']}` (sha256 `{t['sha256']}`), not trained in this run"
              for k, t in trained.items() if "reused" in t]
    return ["## Reused networks", "", *reused, ""] if reused else []


def _baseline_lines(base: dict[str, Any], nets: list[dict[str, Any]]) -> list[str]:
    """The fair-baseline table: class selector, class-query sensitivity and benign drift of every interpreter."""
    return ["## Fair baseline: what the class query and AID change without an attack", "",
            f"Baseline of the ratio: {LABEL[base['interpreter']]}. Class-query sensitivity = map L1 between the "
            "clean input explained for its true class and for the random target class (no perturbation); benign "
            "drift = map L1 between an interpreter's benign maps and the baseline's.", "",
            markdown_table(["interpreter", "class selector", "class-query sensitivity", "benign drift vs baseline"],
                           [[LABEL[r["interpreter"]], r.get("selector", "from RTS (selector untrained)"),
                             _fig(r, "class_query_l1", 4), _fig(r, "benign_drift_l1", 4)] for r in nets]), ""]


def _adaptive_lines(nets: list[dict[str, Any]]) -> list[str]:
    """The adaptive attack's figures per interpreter beside plain ADV2 on the same inputs, and the runs kept."""
    measured = [r for r in nets if "adaptive_n" in r]
    if not measured:
        return []
    return ["## Under the adaptive attack (same inputs and targets as plain ADV2)", "",
            markdown_table(["interpreter", "n", "L1 plain ADV2", "L1 adaptive", "IoU adaptive", "ASR plain",
                            "ASR adaptive", "s / input plain", "s / input adaptive", "budget", "runs kept"],
                           [[LABEL[r["interpreter"]], r["adaptive_n"], _fig(r, "plain_l1_benign_vs_adv2", 4),
                             _fig(r, "adaptive_l1_benign_vs_adv2", 4), _fig(r, "adaptive_iou_benign_vs_adv2"),
                             _fig(r, "plain_asr"), _fig(r, "adaptive_asr"), r["seconds_per_input"],
                             r["adaptive_seconds_per_input"], r["adaptive_budget_preset"], r["adaptive_kept"]]
                            for r in measured]), "",
            "Per input the adaptive figure keeps, among the evaluation's plain ADV2 run and every adaptive run, a "
            "success before a failure, then the map closest to the benign map (the defender's own figure).", ""]


def _pixels(extra: dict[str, Any]) -> int:
    """Pixels of the maps the IoU compares (the input grid)."""
    return int(extra["cam"].shape[-1] * extra["cam"].shape[-2])


def _selection_lines(cfg: AIDExperiment, t: dict[str, Any]) -> list[str]:
    """The validation figure of every epoch and the one kept (``training.aid.select``)."""
    sel = cfg.training.aid.select
    if "reused" in t:
        return []
    if sel is None or "selection" not in t:
        return ["", f"The RTS-AID weights are those of the last of {t['epochs']} epochs (no selection)."]
    drop = float(sel.max_localisation_drop)
    rows = [[h["epoch"], h["batches"], h.get("val/l1_adv", "-"), h.get("val/localisation", "-"),
             h.get("val/localisation_anchor", "-"), h["val/aid_score"],
             "kept" if h["batches"] == t["selected_batches"] else ""] for h in t["selection"]]
    where = "the development split" if sel.val_batches is None else f"{int(sel.val_batches)} development batch(es)"
    kept = next(h for h in t["selection"] if h["batches"] == t["selected_batches"])
    at = f"the weights after {t['selected_batches']} batches (epoch {t['selected_epoch']} of {t['epochs']})"
    verdict = (f"Kept: {at}." if kept["val/aid_score"] >= 0 else
               f"No candidate kept its validation localisation within the budget: kept the closest, {at}.")
    return ["", "## Epoch selection on the development split (dev, Lightning's validation split)", "",
            f"After each AID epoch: the inner ADV2 on {int(sel.attack_batches)} development batch(es) and the "
            f"localisation on {where}; kept: the weights with the largest benign-vs-ADV2 L1 among those whose "
            f"localisation is within {100 * drop:.0f} % of the plain RTS's (`val/aid_score`; outside the "
            f"budget the score is the shortfall, < 0). {verdict}", "",
            markdown_table(["epoch", "batches trained", "val L1 benign vs inner ADV2", "val localisation",
                            "plain RTS", "score", ""], rows)]


def _cost_lines(trained: dict[str, dict[str, Any]], total: float) -> list[str]:
    """The report's training-cost table (trained networks only) and the figure."""
    done = {k: t for k, t in trained.items() if "reused" not in t}
    ref = trained["rts"].get("epoch_seconds")
    table = [[k, t["aid_weight"], t["batches"], t["batch_seconds"], t["epoch_seconds"],
              t["epoch_seconds"] / ref if ref else "-", t["train_seconds"]] for k, t in done.items()]
    full = next(iter(done.values()))["full_epoch_batches"] if done else None
    return [
        "",
        "## Training cost",
        "",
        markdown_table(["interpreter", "aid_weight", "batches trained", "s / batch", "s / full epoch (est.)",
                        "epoch time vs RTS", "training s"], table) if table else "Every network was reused.",
        "",
        (f"A full epoch has {full} batches; s / epoch = mean s / batch x that. " if full else "")
        + f"Total experiment time: {total:.0f} s.",
        "",
        "![RTS vs RTS-AID: benign, ADV2 and noisy maps](aid.png)",
        "",
        "Columns: input; benign maps of every interpreter (RTS+sel: the plain RTS with its class selector trained; "
        "RTS: selector untrained); the ADV2 input crafted against each and its map (Figure 16); then two Gaussian "
        "noise levels with the maps of every interpreter (Figure 15). "
        "Row labels: true class -> ADV2 target class.",
        "",
    ]
