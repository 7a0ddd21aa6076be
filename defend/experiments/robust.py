"""Experiment ``robust``: interpretation-robust training vs normal and PGD adversarial training (AdvEdge Table VII,
Boopathy et al. ICML 2020).

Each model of ``models:`` is a :class:`defend.robust.RobustClassifierModule` with the arguments of its ``module:``
(laid over the shared ``training.module:``, option groups key by key; ``num_classes`` comes from the data), trained
from the same seed (or, with ``checkpoint:``, loaded from a saved ``<name>.pt`` of an earlier run), then evaluated for
every radius of ``evaluation.eps`` (default AdvEdge Table VII's 0, 2, 4, 6, 8, 9, 10 / 255) with
:mod:`defend.robust_eval`:

* accuracy under untargeted PGD on the cross-entropy (``evaluation.pgd``: steps, step = eps * step_ratio, random
  start) on the first ``n_images`` test images, and under AutoAttack (standard version, the authors' code) on the first
  ``autoattack.n_images`` of them at the radii of ``autoattack.eps``, with PGD's accuracy on the same inputs beside it;
* interpretation robustness of ``interpretation.interpreter`` (CAM) under each of ``interpretation.protocols``:
  ``boopathy`` (the cited reference, Boopathy et al.'s ``eval.py`` ``aai_topk``: ``interpretation.boopathy.n_images``
  test images drawn at random with the run's seed, the true label explained, inputs whose prediction flipped dropped)
  and ``ghorbani`` (our variant: the first ``interpretation.n_images`` PGD inputs, the benign prediction explained,
  our top-k attack, the discrepancy attack and uniform noise of the same radius, and captum-style max-sensitivity);
  benign vs attacked maps scored by Kendall's tau-b, Spearman's rho, top-k intersection, cosine, centre-of-mass shift.

Every radius (the models' ``inner.eps`` / ``inner.alpha``, ``evaluation.eps``, ``autoattack.eps``) is in image units
([0, 1]); ``8/255`` is accepted and exact. Every ``metrics.json`` row names its measure, attack, eps (image units),
``eps_255`` (the same radius x 255, the label of the report's columns), steps / restarts, n and seed; every
interpretation row its ``protocol`` and the class it explained.
"""
from __future__ import annotations

import importlib.util
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from tqdm.auto import tqdm

from attacks import INTERPRETERS
from attacks.interpreters import get_interpreter
from attacks.topk import ReferenceTopKAttack, TopKAttack

from .. import stats
from ..classifier import load_classifier, save_classifier
from ..data import BaseDataModule
from ..data.base import split_name
from ..evaluate.measure import autoattack_row
from ..figures import line_plot
from ..inputs import take_split
from ..io import CheckpointError, file_sha256, load_artifact
from ..models import GapClassifier
from ..provenance import note_data
from ..robust import INTERPRETATIONS, MODES, RobustClassifierModule
from ..robust_eval import (
    INTERPRETATION_ATTACKS,
    PROTOCOLS,
    REFERENCE_ATTACK,
    interpretation_robustness,
    pgd_accuracy,
    sensitivity,
)
from ..rows import AutoAttackRow
from ..trainer import make_trainer
from ..typed_config import check_class_options, check_names
from ..types import Count, Positive, PositiveCount, Radius
from .common import default_data, setup_data, write_outputs
from .config import ExperimentConfig, register_experiment
from .robust_report import report
from .runner import deep_merge

__all__ = ["run", "RobustExperiment", "RobustTraining", "RobustModel", "RobustEvaluation", "PGDEvaluation",
           "AutoAttackEvaluation", "InterpretationEvaluation", "DiscrepancyAttack", "ReferenceTopK", "EpochTimer",
           "evaluate_model", "module_options", "eps_255", "same_eps", "reference_inputs"]


# --------------------------------------------------------------------------------------------- config
@dataclass
class RobustTraining:
    """What every model of ``models:`` shares: ``max_epochs`` and ``module``, RobustClassifierModule's arguments
    (checked against its signature; radii in image units, fractions such as ``8/255`` accepted)."""

    max_epochs: PositiveCount = PositiveCount(5)
    module: dict[str, Any] = field(default_factory=dict)


@dataclass
class RobustModel:
    """One model of the table: its ``name`` (``<name>.pt``, the report's rows), ``max_epochs`` (default:
    ``training.max_epochs``) and ``module``, RobustClassifierModule arguments laid over ``training.module``.
    ``checkpoint``: a ``<name>.pt`` this experiment saved in an earlier run, loaded instead of training (it must
    hold the architecture and ``model_options`` of ``module`` and the data's class count; its sha256 is reported)."""

    name: str
    max_epochs: PositiveCount | None = None
    module: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


def _default_models() -> list[RobustModel]:
    return [RobustModel(mode, module={"mode": mode}) for mode in ("normal", "pgd_at", "int_adv")]


@dataclass
class PGDEvaluation:
    """Untargeted PGD on the cross-entropy, random start, one restart: ``steps`` steps of ``eps x step_ratio``."""

    steps: PositiveCount = PositiveCount(20)
    step_ratio: Positive = Positive(0.25)


@dataclass
class AutoAttackEvaluation:
    """AutoAttack (standard version, the authors' code) on the first ``n_images`` of the PGD inputs at each radius of
    ``eps`` (image units; each one of ``evaluation.eps`` and > 0; empty: no AutoAttack)."""

    n_images: PositiveCount = PositiveCount(64)
    eps: list[Radius] = field(default_factory=list)


@dataclass
class DiscrepancyAttack:
    """PGD ascent on the CAM discrepancy D of robust training: ``steps`` steps of ``eps x step_ratio``, on our
    ``normalised`` D or the ``reference`` one (raw CAMs, Eqn 20's 1/2; :mod:`defend.robust`)."""

    steps: Count = Count(20)
    step_ratio: Positive = Positive(0.25)
    discrepancy: Literal["normalised", "reference"] = "normalised"


@dataclass
class ReferenceTopK:
    """Boopathy et al.'s protocol (their ``eval.py`` ``aai_topk``): :class:`attacks.topk.ReferenceTopKAttack` of
    ``steps`` signed steps of ``alpha`` (image units) on the benign top-``k`` pixels, on ``n_images`` images of the
    evaluation split drawn at random with the run's seed (the same for every model), the true label explained."""

    n_images: PositiveCount = PositiveCount(200)
    k: PositiveCount = PositiveCount(8)
    steps: PositiveCount = PositiveCount(200)
    alpha: Positive = Positive(0.01)


@dataclass
class InterpretationEvaluation:
    """Benign vs attacked maps of ``interpreter`` under each of ``protocols``: ``boopathy`` (the reference,
    :class:`ReferenceTopK`, options ``boopathy``) and ``ghorbani`` (our variant: on the first ``n_images`` PGD inputs
    under each of ``attacks``, the benign prediction explained; ``topk``: :class:`attacks.topk.TopKAttack` options,
    checked against its signature; max-sensitivity from ``sensitivity_samples`` uniform-noise samples of radius eps).
    Top-k intersection at each of ``ks``."""

    interpreter: str = "cam"
    protocols: list[Literal["boopathy", "ghorbani"]] = field(default_factory=lambda: list(PROTOCOLS))
    boopathy: ReferenceTopK = field(default_factory=ReferenceTopK)
    n_images: PositiveCount = PositiveCount(128)
    attacks: list[str] = field(default_factory=lambda: list(INTERPRETATION_ATTACKS))
    topk: dict[str, Any] = field(default_factory=dict)
    discrepancy: DiscrepancyAttack = field(default_factory=DiscrepancyAttack)
    ks: list[PositiveCount] = field(default_factory=lambda: [PositiveCount(4), PositiveCount(8), PositiveCount(16)])
    sensitivity_samples: PositiveCount = PositiveCount(10)


@dataclass
class RobustEvaluation:
    """Every model is evaluated on the first ``n_images`` images of ``split`` (``test`` for final figures, ``dev``
    for a run that tunes, e.g. a gamma sweep) at each radius of ``eps`` (image units), in batches of ``batch_size``,
    on ``device`` (``auto``: CUDA when available)."""

    split: Literal["test", "dev", "val"] = "test"
    n_images: PositiveCount = PositiveCount(256)
    eps: list[Radius] = field(default_factory=lambda: [Radius(f"{k}/255") for k in (0, 2, 4, 6, 8, 9, 10)])
    batch_size: PositiveCount = PositiveCount(256)
    device: str = "auto"
    pgd: PGDEvaluation = field(default_factory=PGDEvaluation)
    autoattack: AutoAttackEvaluation = field(default_factory=AutoAttackEvaluation)
    interpretation: InterpretationEvaluation = field(default_factory=InterpretationEvaluation)


@dataclass
class RobustExperiment(ExperimentConfig):
    """Normal, PGD-adversarial and interpretation-robust training of the same classifier, then accuracy and
    interpretation robustness under attack (AdvEdge Table VII)."""

    data: BaseDataModule | None = None
    training: RobustTraining = field(default_factory=RobustTraining)
    models: list[RobustModel] = field(default_factory=_default_models)
    evaluation: RobustEvaluation = field(default_factory=RobustEvaluation)


# --------------------------------------------------------------------------------------------- options and checks
_FRACTION = re.compile(r"^\s*[+-]?\d+\s*/\s*\d+\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def exact_fractions(value: Any) -> Any:
    """``value`` with every string of the form ``a/b`` (``8/255``) turned into the float it denotes, exactly as
    :class:`defend.types.Radius` reads it; a module's option groups take plain floats."""
    if isinstance(value, dict):
        return {k: exact_fractions(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exact_fractions(v) for v in value]
    if isinstance(value, str) and _FRACTION.match(value):
        return float(Fraction(value.replace(" ", "")))
    return value


def module_options(cfg: RobustExperiment, model: RobustModel) -> dict[str, Any]:
    """RobustClassifierModule's arguments of one model: ``training.module`` with the model's ``module`` laid over it
    (option groups key by key), fractions read exactly; ``num_classes`` is the data's."""
    return exact_fractions(deep_merge(cfg.training.module, model.module))


def same_eps(a: float, b: float) -> bool:
    """Two radii are the same (``8/255`` and ``0.0313725490196`` both name 8 levels)."""
    return abs(float(a) - float(b)) < 1e-9


def eps_255(eps: float) -> int | float:
    """A radius in 1/255 units (a whole number when it is one): the label of the report's columns."""
    v = float(eps) * 255
    return int(round(v)) if abs(v - round(v)) < 1e-6 else v


def _check_model(cfg: RobustExperiment, i: int, model: RobustModel, num_classes: int) -> None:
    """One model: a file-safe name, module options that fit RobustClassifierModule and build."""
    where = f"models[{i}]"
    if not _NAME.match(model.name):
        raise ValueError(f"{where}.name {model.name!r} must be a plain file name (letters, digits, _ . -): it names "
                         f"<out>/{model.name}.pt")
    opts = module_options(cfg, model)
    checked = check_class_options(RobustClassifierModule, opts, f"{where}.module", skip=("num_classes",))
    check_names([checked["mode"]], MODES, f"{where}.module.mode")
    check_names([checked["interpretation"]], INTERPRETATIONS, f"{where}.module.interpretation")
    try:
        with torch.random.fork_rng(devices=[]):
            RobustClassifierModule(num_classes=num_classes, **opts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}.module ({model.name}): {exc}") from None
    if model.checkpoint is not None:
        load_saved(model, checked, num_classes, where)


def load_saved(model: RobustModel, opts: dict[str, Any], num_classes: int, where: str) -> tuple[GapClassifier, dict]:
    """The classifier of ``model.checkpoint`` and its metadata; a missing file, another architecture /
    ``model_options`` / class count or another training mode than ``opts`` (the model's resolved module options)
    is a one-line error naming ``where``."""
    path = Path(str(model.checkpoint)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{where}.checkpoint: no such file '{path}' (give a <name>.pt saved by an earlier "
                                f"robust run, or remove checkpoint to train {model.name})")
    fix = f"fix {where}.module (arch / model_options) or {where}.checkpoint"
    try:
        clf = load_classifier(path, num_classes=num_classes, arch=opts["arch"],
                              model_options=opts.get("model_options") or {}, fix=fix)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}.checkpoint: {exc}" + ("" if fix in str(exc) else f"; {fix}")) from None
    meta = load_artifact(path, "classifier")["meta"]
    saved = dict(meta.get("robust_training") or {})
    if saved.get("mode") != opts["mode"]:
        raise CheckpointError(f"{where}.checkpoint: {path} was trained in mode {saved.get('mode')!r}, "
                              f"{where}.module.mode is {opts['mode']!r}; point {model.name} at a checkpoint of its mode")
    return clf, meta


def _check_evaluation(ev: RobustEvaluation) -> None:
    """Names, radii and input counts of ``evaluation``."""
    ie = ev.interpretation
    if not ie.protocols or len(set(ie.protocols)) < len(ie.protocols):
        raise ValueError(f"evaluation.interpretation.protocols must name boopathy and / or ghorbani once each, got "
                         f"{list(ie.protocols)}")
    check_names(ie.attacks, INTERPRETATION_ATTACKS, "evaluation.interpretation.attacks")
    for e in ev.eps:
        if "boopathy" in ie.protocols and float(e) > 0:
            try:
                ReferenceTopKAttack(ie.interpreter, eps=float(e), **_reference_options(ie))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"evaluation.interpretation.boopathy at eps {eps_255(e)}/255: {exc}") from None
    check_names([ie.interpreter], INTERPRETERS, "evaluation.interpretation.interpreter")
    check_class_options(TopKAttack, exact_fractions(ie.topk), "evaluation.interpretation.topk",
                        skip=("interpreter", "eps", "seed"))
    if not ev.eps or not ie.ks:
        raise ValueError("evaluation.eps and evaluation.interpretation.ks need at least one value")
    if not any(float(e) == 0 for e in ev.eps):
        raise ValueError("evaluation.eps must include 0 (the clean accuracy every comparison and the at-chance check "
                         "read): e.g. --evaluation.eps=[0,8/255]")
    for n, what in ((ev.autoattack.n_images, "autoattack"), (ie.n_images, "interpretation")):
        if n > ev.n_images:
            raise ValueError(f"evaluation.{what}.n_images ({n}) cannot exceed evaluation.n_images ({ev.n_images}): "
                             f"they are the first of the PGD inputs")
    for e in ev.autoattack.eps:
        if not e > 0 or not any(same_eps(e, v) for v in ev.eps):
            raise ValueError(f"evaluation.autoattack.eps: {float(e):.6g} (= {eps_255(e)}/255) must be > 0 and one of "
                             f"evaluation.eps ({', '.join(f'{eps_255(v)}/255' for v in ev.eps)})")
    if ev.autoattack.eps and importlib.util.find_spec("pyautoattack") is None:
        raise ValueError("evaluation.autoattack.eps needs the pyautoattack package (pip install pyautoattack); "
                         "set evaluation.autoattack.eps=[] to skip AutoAttack")
    if ev.device != "auto":
        try:
            device = torch.device(ev.device)
        except RuntimeError as exc:
            raise ValueError(f"evaluation.device: {exc} (auto, cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"evaluation.device is {ev.device!r} but CUDA is not available here (use auto or cpu)")


def check(cfg: RobustExperiment) -> None:
    """Every cross-field check, before anything trains: model names unique and file-safe, each model's module
    options fit (and build) RobustClassifierModule, the evaluation's names, radii and input counts."""
    if not cfg.models:
        raise ValueError("models is empty; give at least one model (e.g. {name: normal, module: {mode: normal}})")
    names = [m.name for m in cfg.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"model names must be unique (each names <out>/<name>.pt); repeated: {', '.join(dup)}")
    check_class_options(RobustClassifierModule, exact_fractions(cfg.training.module), "training.module",
                        skip=("num_classes",))
    num_classes = default_data(cfg).num_classes
    for i, model in enumerate(cfg.models):
        _check_model(cfg, i, model, num_classes)
    _check_evaluation(cfg.evaluation)


def outputs(cfg: RobustExperiment, out: Path) -> list[Path]:
    """The figure and every trained model's checkpoint (none for a model loaded from ``checkpoint``)."""
    return [out / "robust.png", *[out / f"{m.name}.pt" for m in cfg.models if m.checkpoint is None]]


# --------------------------------------------------------------------------------------------- training
class EpochTimer(pl.Callback):
    """Wall time of every training epoch (the training loop only, validation excluded)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = self._val = self._val_start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._val = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training:
            self._val += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start - self._val)


def _train(cfg: RobustExperiment, model: RobustModel, dm: BaseDataModule, out: Path,
           progress: bool) -> dict[str, Any]:
    """Train one model from the experiment's seed and save it as ``<out>/<name>.pt``."""
    opts = module_options(cfg, model)
    epochs = int(model.max_epochs or cfg.training.max_epochs)
    pl.seed_everything(int(cfg.seed), workers=True)
    module = RobustClassifierModule(num_classes=dm.num_classes, **opts)
    hp = module.hparams
    if progress:
        print(f"[robust] training {model.name} ({hp.mode}, {epochs} epochs)", flush=True)
    timer = EpochTimer()
    trainer = make_trainer(cfg.trainer, epochs, out / "logs" / model.name, enable_progress_bar=progress,
                           callbacks=[timer], num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    save_classifier(module.model.eval(), out / f"{model.name}.pt", opts.get("model_options"),
                    extra={"train_seconds": seconds, "robust_training": module.robust_meta()},
                    class_names=dm.class_names)
    return {"model": module.model.eval(), "mode": hp.mode, "arch": hp.arch, "epochs": epochs,
            "train_seconds": seconds, "epoch_seconds": sum(timer.seconds) / max(len(timer.seconds), 1),
            "gamma": float(hp.gamma), "ce_attack": hp.ce_attack, "discrepancy": hp.discrepancy,
            "batchnorm": hp.batchnorm}


def _reuse(cfg: RobustExperiment, i: int, model: RobustModel, dm: BaseDataModule, progress: bool) -> dict[str, Any]:
    """Load ``model.checkpoint`` (checked again: the file may have changed since the config check) instead of
    training; its training figures are the checkpoint's own, its sha256 goes into the report."""
    opts = check_class_options(RobustClassifierModule, module_options(cfg, model), f"models[{i}].module",
                               skip=("num_classes",))
    clf, meta = load_saved(model, opts, dm.num_classes, f"models[{i}]")
    saved = meta.get("robust_training") or {}
    sha = file_sha256(model.checkpoint)
    if progress:
        print(f"[robust] {model.name}: loaded {model.checkpoint} (sha256 {sha[:12]}), not trained", flush=True)
    seconds = float(meta.get("train_seconds", float("nan")))
    return {"model": clf.eval(), "mode": saved["mode"], "arch": meta["arch"], "epochs": "saved",
            "train_seconds": seconds, "epoch_seconds": float("nan"), "gamma": float(saved.get("gamma", float("nan"))),
            "ce_attack": saved.get("ce_attack", "-"), "checkpoint": str(model.checkpoint), "checkpoint_sha256": sha,
            # checkpoints saved before these options existed were trained the only way there was then
            "discrepancy": saved.get("discrepancy", "normalised"), "batchnorm": saved.get("batchnorm", "joint")}


# --------------------------------------------------------------------------------------------- evaluation
def _accuracy_rows(model: GapClassifier, x: torch.Tensor, y: torch.Tensor, eps: float, ev: RobustEvaluation,
                   seed: int, bar: tqdm) -> list[dict[str, Any]]:
    """Clean / PGD-CE accuracy at ``eps`` and, at the AutoAttack radii, AutoAttack next to PGD on the same inputs;
    every accuracy with its Wilson interval. Accuracy counts every input (a clean error is a failure, RobustBench's
    convention); AutoAttack's conditional accuracy on the correctly classified inputs is labelled as such. Each row
    keeps its per-input correctness under ``_correct`` (for paired tests; not written)."""
    steps, ratio, bs = int(ev.pgd.steps), float(ev.pgd.step_ratio), int(ev.batch_size)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    bar.set_postfix_str(f"eps {eps_255(eps)}/255 PGD")
    correct = pgd_accuracy(model, x, y, eps, steps, eps * ratio, gen, bs)
    bar.update()
    base = {"measure": "accuracy", "eps": eps, "eps_255": eps_255(eps), "seed": seed}
    rows = [{**base, "attack": "clean" if eps == 0 else "pgd-ce", "steps": steps if eps else 0, "restarts": 1,
             "step": eps * ratio, "n": int(x.shape[0]), **stats.proportion(correct).fields("accuracy"),
             "_correct": correct.cpu()}]
    if eps > 0 and any(same_eps(eps, v) for v in ev.autoattack.eps):
        n = min(int(ev.autoattack.n_images), x.shape[0])
        bar.set_postfix_str(f"eps {eps_255(eps)}/255 AutoAttack")
        with torch.no_grad():
            logits = torch.cat([model(x[i:min(i + bs, n)]) for i in range(0, n, bs)])
        clean_ok = (logits.argmax(1) == y[:n]).cpu()
        row, aa = autoattack_row(model, x[:n], y[:n], clean_ok, float(eps), seed, bs, int(logits.shape[1]))
        bar.update()
        rows.append(_autoattack_view(row, aa, base, correct[:n]))
    return rows


def _autoattack_view(row: AutoAttackRow, aa: Any, base: dict[str, Any], pgd_correct: torch.Tensor) -> dict[str, Any]:
    """The experiment's AutoAttack row (its metrics.json keys): a view of the card's
    :class:`~defend.rows.AutoAttackRow` (``accuracy`` is its ``robust_accuracy``, ``accuracy_on_correct`` its
    ``robust_accuracy_on_correct``, ``accuracy_after_<stage>`` its ``stages``), with PGD's accuracy on the same
    inputs beside it and the per-input robustness under ``_correct`` (for paired tests; not written)."""
    return {**base, "attack": row.attack, "steps": "apgd 100 / fab 100 / square 5000 queries", "restarts": 1,
            "n": row.n, **row.robust_accuracy.fields("accuracy"),
            **row.robust_accuracy_on_correct.fields("accuracy_on_correct"), "n_correct": row.n_correct,
            **stats.proportion(pgd_correct).fields("pgd_accuracy_same_inputs"),
            "attacks": "+".join(row.budget["attacks"]), "target_classes": aa.settings["target_classes"],
            **{f"accuracy_after_{k}": v for k, v in row.stages.items()},
            "autoattack_flags": " | ".join(row.flags) or "-", "seconds": row.seconds, "_correct": aa.robust.cpu()}


def _attack_options(ie: InterpretationEvaluation, attack: str) -> dict[str, Any]:
    """The options of one interpretation attack (those the config sets for the top-k attack)."""
    if attack == "topk":
        return exact_fractions(dict(ie.topk))
    if attack == "discrepancy":
        return {"steps": int(ie.discrepancy.steps), "step_ratio": float(ie.discrepancy.step_ratio),
                "discrepancy": ie.discrepancy.discrepancy}
    return {}


def _reference_options(ie: InterpretationEvaluation) -> dict[str, Any]:
    """The :class:`attacks.topk.ReferenceTopKAttack` options of the ``boopathy`` protocol (besides ``eps``)."""
    b = ie.boopathy
    return {"k": int(b.k), "steps": int(b.steps), "alpha": float(b.alpha)}


def reference_inputs(dm: BaseDataModule, split: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Boopathy's inputs: ``n`` images of ``split`` drawn at random (a permutation seeded ``seed``), with their
    labels and positions in the split (``index``); more than the split holds is a one-line error."""
    ds = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}[split_name(split)]
    if n > len(ds):
        raise ValueError(f"evaluation.interpretation.boopathy.n_images ({n}) exceeds the {len(ds)} images of the "
                         f"{split} split; lower it")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(seed)))[:n]
    items = [ds[int(i)] for i in idx]
    out = {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items]),
           "index": idx}
    note_data(out["image"], out["label"], split=split_name(split))
    return out


def _scored(model: GapClassifier, x: torch.Tensor, eps: float, attack: str, opts: dict[str, Any],
            ev: RobustEvaluation, seed: int, bar: tqdm, protocol: str,
            labels: torch.Tensor | None = None) -> dict[str, Any]:
    """One interpretation row: benign vs attacked maps of the inputs ``attack`` did not flip (``labels``: the class
    explained, else the benign prediction), per-input values kept hidden for the paired tests."""
    ie = ev.interpretation
    bar.set_postfix_str(f"eps {eps_255(eps)}/255 {attack} ({protocol})")
    res = interpretation_robustness(model, get_interpreter(ie.interpreter), x, eps, attack, options=opts,
                                    ks=[int(k) for k in ie.ks], seed=seed, batch_size=int(ev.batch_size),
                                    per_input=True, labels=labels)
    bar.update()
    hidden = {"_per_input": res.pop("per_input", {}), "_kept": res.pop("kept", None)}
    return {"measure": "interpretation", "eps": eps, "eps_255": eps_255(eps), "interpreter": ie.interpreter,
            "protocol": protocol, "attack": attack,
            "class_explained": "benign prediction" if labels is None else "true label",
            "settings": ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "-", "seed": seed, **res, **hidden}


def _interpretation_rows(model: GapClassifier, x: torch.Tensor, eps: float, ev: RobustEvaluation, seed: int,
                         bar: tqdm, ref: dict[str, torch.Tensor] | None) -> list[dict[str, Any]]:
    """Benign vs attacked maps at ``eps`` under each protocol: Boopathy's ``aai_topk`` on ``ref`` (true labels), and
    our variant's attacks on the first PGD inputs with max-sensitivity at that radius."""
    ie = ev.interpretation
    rows = []
    if "boopathy" in ie.protocols and ref is not None:
        rows.append(_scored(model, ref["image"], eps, REFERENCE_ATTACK, _reference_options(ie), ev, seed, bar,
                            "boopathy", labels=ref["label"]))
    if "ghorbani" not in ie.protocols:
        return rows
    xi = x[:int(ie.n_images)]
    rows += [_scored(model, xi, eps, attack, _attack_options(ie, attack), ev, seed, bar, "ghorbani")
             for attack in ie.attacks]
    if eps > 0:
        samples = int(ie.sensitivity_samples)
        bar.set_postfix_str(f"eps {eps_255(eps)}/255 max-sensitivity")
        rows.append({"measure": "max_sensitivity", "eps": eps, "eps_255": eps_255(eps), "interpreter": ie.interpreter,
                     "protocol": "ghorbani", "attack": "uniform-noise", "radius": eps, "samples": samples,
                     "n": int(xi.shape[0]), "seed": seed,
                     **sensitivity(model, get_interpreter(ie.interpreter), xi, eps, samples, seed).fields("max_sensitivity")})
        bar.update()
    return rows


def _steps(ev: RobustEvaluation) -> int:
    """Pieces of one model's evaluation (the progress bar's total)."""
    ie = ev.interpretation
    ghorbani = "ghorbani" in ie.protocols
    per_eps = [1 + ("boopathy" in ie.protocols) + ghorbani * (len(ie.attacks) + (e > 0))
               + (e > 0 and any(same_eps(e, v) for v in ev.autoattack.eps)) for e in ev.eps]
    return int(sum(per_eps))


def _summary(rows: list[dict[str, Any]], eps: float, seconds: float) -> str:
    def num(v: Any) -> float:
        return float("nan") if v is None else float(v)
    acc = {r["attack"]: num(r["accuracy"]) for r in rows if r["measure"] == "accuracy" and same_eps(r["eps"], eps)}
    tau = {r["attack"]: num(r.get("kendall_tau")) for r in rows
           if r["measure"] == "interpretation" and same_eps(r["eps"], eps)}
    return (f"[robust]   eps {eps_255(eps)}/255 ({seconds:.0f} s): accuracy "
            + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + "; Kendall tau "
            + ", ".join(f"{k} {v:.3f}" for k, v in tau.items()))


def evaluate_model(model: GapClassifier, x: torch.Tensor, y: torch.Tensor, ev: RobustEvaluation, seed: int,
                   progress: bool = True, name: str = "model",
                   ref: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Every accuracy and interpretation row of one model, eps by eps (module docstring); ``ref``: the ``boopathy``
    protocol's inputs (:func:`reference_inputs`; without them that protocol is not run)."""
    dev = ev.device
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    ref = None if ref is None else {k: v.to(device) for k, v in ref.items() if k != "index"}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=_steps(ev), desc=f"evaluating {name}", unit="step", disable=not progress)
    for e in ev.eps:
        eps, start = float(e), time.perf_counter()
        rows += _accuracy_rows(model, x, y, eps, ev, seed, bar) + _interpretation_rows(model, x, eps, ev, seed, bar, ref)
        if progress:
            tqdm.write(_summary(rows, eps, time.perf_counter() - start))
    bar.close()
    return rows


# --------------------------------------------------------------------------------------------- run
def _rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The flat ``metrics.json`` rows: each model's training figures beside each of its evaluation rows."""
    ref = next((r["epoch_seconds"] for r in results.values() if r["mode"] == "normal"), None)
    rows: list[dict[str, Any]] = []
    for name, res in results.items():
        res["clean"] = next((r["accuracy"] for r in res["rows"] if r["measure"] == "accuracy" and r["eps"] == 0),
                            float("nan"))
        res["ratio"] = res["epoch_seconds"] / ref if ref else float("nan")
        meta = {"model": name, "mode": res["mode"], "split": res["split"], "clean_accuracy": res["clean"],
                "epochs": res["epochs"], "epoch_seconds": res["epoch_seconds"], "epoch_time_ratio": res["ratio"],
                "train_seconds": res["train_seconds"],
                **{k: res[k] for k in ("checkpoint", "checkpoint_sha256") if k in res}}
        rows += [{**meta, **{k: v for k, v in r.items() if not k.startswith("_")}} for r in res["rows"]]
    return rows


def _inputs(dm: BaseDataModule, ev: RobustEvaluation, split: str,
            seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The first ``evaluation.n_images`` of the split (PGD, AutoAttack on the first ``autoattack.n_images`` of them,
    our variant) and Boopathy's random draw; a count the split cannot give is a one-line error before any training
    (no silent cap: the rows' n is what was asked)."""
    data = take_split(dm, split, int(ev.n_images))
    if data["image"].shape[0] < int(ev.n_images):
        raise ValueError(f"evaluation.n_images ({ev.n_images}) exceeds the {data['image'].shape[0]} images of the "
                         f"{split} split; lower it (and autoattack.n_images / interpretation.n_images with it)")
    ref = (reference_inputs(dm, split, int(ev.interpretation.boopathy.n_images), seed)
           if "boopathy" in ev.interpretation.protocols else None)
    return data, ref


@register_experiment("robust", RobustExperiment, outputs=outputs, check=check)
def run(cfg: RobustExperiment, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    start = time.perf_counter()
    seed = int(cfg.seed)
    dm = setup_data(cfg)
    ev = cfg.evaluation
    split = split_name(ev.split)
    data, ref = _inputs(dm, ev, split, seed)
    results: dict[str, dict[str, Any]] = {}
    for i, model in enumerate(cfg.models):
        res = _train(cfg, model, dm, out, progress) if model.checkpoint is None else _reuse(cfg, i, model, dm, progress)
        if progress:
            done = "reused" if model.checkpoint is not None else f"{res['train_seconds']:.0f} s training"
            print(f"[robust] {model.name}: {done}; evaluating", flush=True)
        res["rows"] = evaluate_model(res.pop("model"), data["image"], data["label"], ev, seed, progress, model.name,
                                     ref)
        res["split"] = split
        results[model.name] = res
    rows = _rows(results)
    _figure(out, ev, results)
    write_outputs(out, rows, report(cfg, dm, results, time.perf_counter() - start))
    return rows


def _figure(out: Path, ev: RobustEvaluation, results: dict[str, dict[str, Any]]) -> None:
    """``robust.png``: PGD accuracy and top-k-attack Kendall's tau of every model against eps (x/255)."""
    eps = [float(e) for e in ev.eps]
    series = {}
    for name, res in results.items():
        def pick(measure: str, attacks: tuple[str, ...], field: str) -> list[float]:
            hits = [r for r in res["rows"] if r["measure"] == measure and r["attack"] in attacks]
            return [next((r.get(field, float("nan")) for r in hits if same_eps(r["eps"], e)), float("nan"))
                    for e in eps]
        series[f"{name}: PGD accuracy"] = pick("accuracy", ("clean", "pgd-ce"), "accuracy")
        if "boopathy" in ev.interpretation.protocols:
            series[f"{name}: aai_topk Kendall tau (Boopathy)"] = pick("interpretation", (REFERENCE_ATTACK,),
                                                                     "kendall_tau")
        if "ghorbani" in ev.interpretation.protocols:
            series[f"{name}: top-k Kendall tau (our variant)"] = pick("interpretation", ("topk",), "kendall_tau")
    line_plot(out / "robust.png", [eps_255(e) for e in eps], series, "eps (x/255; images in [0, 1])",
              "accuracy / Kendall's tau", "PGD accuracy and CAM Kendall's tau under the top-k attacks")
