"""Experiment ``detector``: the multi-interpreter adversarial detector (AdvEdge section VIII, Tables V-VI).

For every target interpreter: benign inputs and adversarial inputs (ADV2 / AdvEdge / AdvEdge+ against that
interpreter), the maps of every configured interpreter (GRAD, CAM, MASK, and RTS when a trained RTS checkpoint is
configured), a seeded stratified train / test split, then one detector per combination:

* ``single``: one interpreter (1 channel) - the baseline that measures the gain of stacking;
* ``stacked``: every pair (2 channels), every pair plus the product channel (3 channels), every triple (3 channels);
* ``squeeze``: feature squeezing on the inputs themselves (Xu et al.; ADV2 Table 4).

The best triple (the best pair when fewer than three interpreters are read) is then attacked adaptively (ADV2 with
the ensemble of the interpreters it reads) and its detection rate on those inputs is reported next to the
non-adaptive one; then the detector-aware ADV2 (the booster's distilled surrogate in the loss) is swept over its
``detector_weight`` with restarts on the same inputs (:mod:`defend.detector_sweep`): a table per target in
``report.md``, rows in ``metrics.json`` and the Pareto front (evasion at 5 % FPR vs map IoU to benign) in
``detector_pareto.png``, with McNemar against the plain attack, a convergence check at twice the steps and the
surrogate's fit on held-out maps. That detector is saved to ``<out>/detectors/<target>/`` with the interpreters it
reads, for ``defend evaluate --detector`` (which runs the same sweep).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from attacks import FRAMEWORKS, INTERPRETERS, build_attack, interpretation_attacks, random_targets

from .. import stats
from ..aid import AID_OPTIMISER, AIDModule, load_rts
from ..attack_options import AttackOptions, AttackSections, layered_options
from ..classifier import load_classifier
from ..data import BaseDataModule
from ..data.base import DEV, split_name
from ..detection_data import build_detection_data, select, stack_maps
from ..detector import FeatureSqueezer, detector_files, train_detector, trunk_description, xgb_device
from ..detector_sweep import DEFAULT_WEIGHTS, SWEEP_FPR, SweepSetup, detector_sweep
from ..evaluate.cli import evaluate_command
from ..evaluate.measure import fpr_threshold
from ..figures import pareto_plot
from ..inputs import select_correct
from ..interpreters import build_interpreter
from ..module_base import as_options
from ..presets import preset_of
from ..selection import select_best
from ..tables import markdown_table
from ..typed_config import check_class_options, check_names
from ..types import Count, NonNegative, Positive, PositiveCount
from .common import (
    ClassifierExperimentConfig,
    classifier_outputs,
    default_data,
    get_classifier,
    setup_data,
    train_rts,
    write_outputs,
)
from .config import TrainerOptions, register_experiment

__all__ = ["run", "combinations", "MIN_ADVERSARIAL", "DetectorExperiment", "Detection", "AdaptiveAttack", "DetectorAwareSweep",
           "DetectorOptions", "SqueezeOptions", "PlainRTS", "plain_rts"]

#: fewest successful adversarial inputs a detector is trained and scored on (below it the row says "not measured")
MIN_ADVERSARIAL = 10

#: the attacks with an interpretation term (what the detector is meant to catch)


@dataclass
class AdaptiveAttack(AttackOptions):
    """The adaptive attack on the best detector: ``attack`` against the ensemble of the interpreters that detector
    reads; these options override the detection attack's layered ones (shared, per framework, per target)."""

    attack: str = "adv2"

    def set_options(self) -> dict[str, Any]:
        """The attack options this layer sets (the attack's name is not one)."""
        return {k: v for k, v in super().set_options().items() if k != "attack"}


@dataclass
class DetectorAwareSweep:
    """The detector-aware attack on the chosen detector (:mod:`defend.detector_sweep`), on the same first
    ``n_adaptive`` test sources and targets: for each of ``weights`` (``0``: the plain ensemble ADV2; empty: not run)
    ``restarts`` seeded runs with the ``adaptive`` options, per input the run (or the plain attack's input) that evades
    the real booster at its 5 %-FPR threshold, then the one whose maps are closest to benign; ``budget_check``: the
    strongest weight again with twice the steps (convergence); ``surrogate``: the booster's stand-in (``auto``,
    ``distilled`` or ``head``)."""

    weights: list[NonNegative] = field(default_factory=lambda: [NonNegative(w) for w in DEFAULT_WEIGHTS])
    restarts: PositiveCount = PositiveCount(2)
    budget_check: bool = True
    surrogate: Literal["auto", "distilled", "head"] = "auto"


@dataclass
class Detection:
    """The detector's data: three disjoint sets of correctly classified inputs, each of ``n`` benign inputs and ``n``
    other inputs that ``attack`` on ``framework`` crafts against each of ``target_interpreters`` (one table each):

    * ``fit`` (``n_fit`` of each, from ``fit_split``, the training split by default) trains every detector;
    * ``select`` (``n_select``, from the development split) chooses the detector that is saved and attacked
      adaptively, and nothing else;
    * ``test`` (``n_test``, from the test split) gives every figure of the tables.

    Only successful adversarial inputs are kept and every set is balanced (its first ``m`` benign and ``m``
    adversarial inputs, ``m`` the smaller count): accuracy is balanced accuracy and the majority baseline is 0.5.
    The adaptive attack re-attacks the first ``n_adaptive`` test sources toward the same targets, so its detection
    rate is compared with the non-adaptive one on the same inputs (McNemar); ``sweep``: the detector-aware attack on
    the same inputs (:class:`DetectorAwareSweep`). The maps of ``interpreters`` are
    stacked as channels. ``cache_dir``: the per-batch cache of maps and attacks (default ``<out>/cache``)."""

    n_fit: PositiveCount = PositiveCount(200)
    n_select: PositiveCount = PositiveCount(100)
    n_test: PositiveCount = PositiveCount(200)
    n_adaptive: Count = Count(40)
    fit_split: Literal["train", "dev", "val"] = "train"
    attack: str = "advedge"
    framework: str = "pgd"
    target_interpreters: list[str] = field(default_factory=lambda: ["cam"])
    interpreters: list[str] = field(default_factory=lambda: ["grad", "cam", "mask"])
    batch_size: PositiveCount = PositiveCount(50)
    cache_dir: str | None = None
    adaptive: AdaptiveAttack = field(default_factory=AdaptiveAttack)
    sweep: DetectorAwareSweep = field(default_factory=DetectorAwareSweep)

    def sets(self) -> dict[str, tuple[str, int]]:
        """``{set: (split, n)}`` for ``fit``, ``select`` and ``test``."""
        return {"fit": (split_name(self.fit_split), int(self.n_fit)), "select": (DEV, int(self.n_select)),
                "test": ("test", int(self.n_test))}


@dataclass
class DetectorOptions:
    """Each detector (:func:`defend.detector.train_detector`): a VGG-16 trunk whose ``trainable`` layers are trained
    with cross-entropy for ``epochs`` (``pretrained``: a local torchvision VGG-16 state dict, never downloaded), then
    XGBoost (``booster`` options) on the GAP features of ``feature_stages``; ``trainer``: the CE stage's Trainer."""

    trainable: Literal["input", "all", "head", "none"] = "input"
    pretrained: str | None = None
    epochs: Count = Count(3)
    feature_stages: Literal["all", "last"] = "all"
    batch_size: PositiveCount = PositiveCount(32)
    lr: Positive = Positive(1e-3)
    booster: dict[str, Any] | None = None
    trainer: TrainerOptions | None = None


@dataclass
class SqueezeOptions:
    """The feature-squeezing baseline (Xu et al.): bit depths and median-filter sizes applied to the inputs."""

    bits: list[PositiveCount] = field(default_factory=lambda: [PositiveCount(4), PositiveCount(5)])
    median: list[PositiveCount] = field(default_factory=lambda: [PositiveCount(2)])


@dataclass
class PlainRTS:
    """The plain RTS read when ``rts`` is an interpreter and ``interpreter_options.rts.network`` is unset: reused from
    ``checkpoint`` (default ``<out>/rts.pt``) when that file exists, else an :class:`~defend.aid.AIDModule` with the
    arguments ``module`` (AID weight 0) is trained for ``max_epochs`` (``limit_train_batches`` each) and saved there."""

    checkpoint: str | None = None
    retrain: bool = False
    max_epochs: PositiveCount = PositiveCount(2)
    limit_train_batches: PositiveCount | None = None
    module: dict[str, Any] = field(default_factory=dict)

    def path(self, out: Path) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(out) / "rts.pt"

    def reuses(self, out: Path) -> bool:
        return self.path(out).is_file() and not self.retrain


@dataclass
class DetectorExperiment(ClassifierExperimentConfig, AttackSections):
    """The multi-interpreter adversarial detector (AdvEdge section VIII, Tables V-VI)."""

    detection: Detection = field(default_factory=Detection)
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    squeeze: SqueezeOptions = field(default_factory=SqueezeOptions)
    rts: PlainRTS = field(default_factory=PlainRTS)


#: AIDModule arguments the experiment sets itself (a plain RTS on the experiment's classifier, data and seed)
_RTS_SET = ("classifier", "num_classes", "init_from", "seed", "aid")


def _trains_rts(cfg: DetectorExperiment) -> bool:
    """Whether the detector reads the plain RTS of ``rts:`` (``rts`` is read and no other network is named)."""
    return "rts" in cfg.detection.interpreters and not cfg.interpreter_options.get("rts", {}).get("network")


def _check_files(cfg: DetectorExperiment) -> None:
    """Local files the config names: the trunk's VGG-16 weights, an RTS network, a reused plain RTS."""
    if cfg.detector.pretrained and not Path(cfg.detector.pretrained).is_file():
        raise ValueError(f"detector.pretrained: no such file '{cfg.detector.pretrained}' (local VGG-16 weights only)")
    network = cfg.interpreter_options.get("rts", {}).get("network")
    if "rts" in cfg.detection.interpreters and isinstance(network, str) and not Path(network).is_file():
        raise ValueError(f"interpreter_options.rts.network: no such file '{network}'")
    if _trains_rts(cfg):
        _check_plain_rts(cfg)


def _check_plain_rts(cfg: DetectorExperiment) -> None:
    """The ``rts:`` module options fit AIDModule (a plain RTS: no ``aid`` group, a constant-rate optimiser); a
    checkpoint that will be reused loads safely and fits the classifier (when that is reused too)."""

    module = cfg.rts.module
    if "aid" in module:
        raise ValueError("rts.module.aid: the detector reads a plain RTS (aid weight 0, set by the experiment); "
                         "leave the aid group out or name another network in interpreter_options.rts.network")
    check_class_options(AIDModule, module, "rts.module", skip=_RTS_SET)
    if as_options(module.get("optimiser"), AID_OPTIMISER, "rts.module.optimiser").schedule != "constant":
        raise ValueError("rts.module.optimiser.schedule must be 'constant' (AIDModule steps its optimiser itself)")
    if module.get("explain", "label") not in ("label", "pred"):
        raise ValueError(f"rts.module.explain must be 'label' or 'pred', got {module['explain']!r}")
    out = Path(cfg.output_dir or ".")
    if not cfg.rts.reuses(out):
        return
    path = cfg.rts.path(out)
    try:
        net = load_rts(path)
        if cfg.classifier.reuses():

            net.check_model(load_classifier(cfg.classifier.checkpoint))
    except (OSError, ValueError) as exc:  # a foreign / corrupt file, an RTS of another classifier
        raise ValueError(f"rts.checkpoint {path}: {exc}") from None


def check(cfg: DetectorExperiment) -> None:
    """Every cross-field check, before anything runs: names, the interpreters to stack, the targets among them, the
    held-out share, the attack sections, the classifier and the local files (VGG-16 weights, RTS networks)."""
    d = cfg.detection
    check_names(d.interpreters, INTERPRETERS, "detection.interpreters")
    check_names(d.target_interpreters, INTERPRETERS, "detection.target_interpreters")
    check_names([d.framework], FRAMEWORKS, "detection.framework")
    for name, where in ((d.attack, "detection.attack"), (d.adaptive.attack, "detection.adaptive.attack")):
        check_names([name], interpretation_attacks(), where, "interpretation attack")
    if len(d.interpreters) < 2 or len(set(d.interpreters)) < len(d.interpreters):
        raise ValueError(f"detection.interpreters needs at least two different interpreters to stack (each once), "
                         f"got {d.interpreters}")
    missing = [t for t in d.target_interpreters if t not in d.interpreters]
    if missing:
        raise ValueError(f"detection.target_interpreters {missing} are not in detection.interpreters {d.interpreters}")
    if int(d.n_adaptive) > int(d.n_test):
        raise ValueError(f"detection.n_adaptive ({d.n_adaptive}) re-attacks test sources: it cannot exceed "
                         f"detection.n_test ({d.n_test})")
    cfg.check_attack_sections()
    cfg.classifier.check(default_data(cfg))
    _check_files(cfg)


def outputs(cfg: DetectorExperiment, out: Path) -> list[Path]:
    """The checkpoints the run trains and saves: the classifier and the plain RTS (each unless reused), and the
    detector of each target interpreter that was attacked adaptively (``detectors/<target>/``)."""
    rts = [cfg.rts.path(out)] if _trains_rts(cfg) and not cfg.rts.reuses(out) else []
    detectors = [f for t in cfg.detection.target_interpreters for f in detector_files(out / "detectors" / t)]
    figure = [out / PARETO_FIGURE] if _sweeps(cfg) else []
    return [*classifier_outputs(cfg, out), *rts, *detectors, *figure]


#: the figure of the detector-aware sweep (evasion at 5 % FPR against map IoU to benign, per target)
PARETO_FIGURE = "detector_pareto.png"


def _sweeps(cfg: DetectorExperiment) -> bool:
    """Whether the run sweeps the detector-aware attack (adaptive inputs and weights to sweep)."""
    return int(cfg.detection.n_adaptive) > 0 and bool(cfg.detection.sweep.weights)


def combinations(names: list[str]) -> list[tuple[tuple[str, ...], bool]]:
    """``(interpreters, product)``: singles, pairs, pairs + product, triples."""
    out = [((n,), False) for n in names]
    out += [(p, False) for p in itertools.combinations(names, 2)]
    out += [(p, True) for p in itertools.combinations(names, 2)]
    out += [(t, False) for t in itertools.combinations(names, 3)]
    return out


def plain_rts(cfg: DetectorExperiment, dm: BaseDataModule, clf_path: str, out: Path,
              progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Reuse ``rts.checkpoint`` if it exists (it must fit the classifier), else train the plain RTS ``rts:``
    describes on the classifier and save it there (a safe RTS artifact, :func:`defend.aid.load_rts`)."""

    spec, ckpt = cfg.rts, cfg.rts.path(out)
    if spec.reuses(out):
        net = load_rts(ckpt)
        net.check_model(load_classifier(clf_path))
        return net, {"trained": False, "checkpoint": str(ckpt)}
    if progress:
        print(f"[rts] no RTS checkpoint at {ckpt}: training a plain RTS on {clf_path}")
    _, seconds = train_rts(cfg, dm, clf_path, {**spec.module, "aid": {"weight": 0.0}}, ckpt, int(spec.max_epochs),
                           spec.limit_train_batches, progress=progress)
    return load_rts(ckpt), {"trained": True, "checkpoint": str(ckpt), "train_seconds": seconds}


def _interpreters(cfg: DetectorExperiment, dm: BaseDataModule, clf_path: str, out: Path, notes: list[str],
                  progress: bool) -> dict[str, Any]:
    """The interpreters the detector reads. RTS uses ``interpreter_options.rts.network`` when given, else the plain
    RTS of ``rts:`` (:func:`plain_rts`)."""
    interps = {}
    for n in cfg.detection.interpreters:
        opts = dict(cfg.interpreter_options.get(n) or {})
        if n == "rts" and not opts.get("network"):
            net, rinfo = plain_rts(cfg, dm, clf_path, out, progress)
            opts["network"] = net
            notes.append(f"RTS: plain RTS {'trained and saved to' if rinfo['trained'] else 'loaded from'} "
                         f"{rinfo['checkpoint']}" + (f" ({rinfo['train_seconds']:.0f} s)" if rinfo["trained"] else "") + ".")
        interps[n] = build_interpreter(n, **opts)
    return interps


def _scores(prob: torch.Tensor, labels: torch.Tensor, seed: int, threshold: float = 0.5) -> dict[str, Any]:
    """A detector's figures on one balanced set, each with its 95 % interval: accuracy (Wilson), balanced accuracy
    (mean of the detection and true-negative rates, bootstrap), the majority-class baseline, AUC (bootstrap),
    detection rate and false-positive rate (Wilson); ``_correct`` keeps the per-input correctness (paired tests)."""
    pred = (prob > threshold).long()
    adv = labels == 1
    correct = (pred == labels).double()
    # balanced accuracy per input: each input weighs 1 / (2 x its class size), so the mean is (TPR + TNR) / 2
    weight = torch.where(adv, 0.5 / max(int(adv.sum()), 1), 0.5 / max(int((~adv).sum()), 1)) * labels.numel()
    majority = max(int(adv.sum()), int((~adv).sum())) / max(labels.numel(), 1)
    return {**stats.proportion(correct).fields("accuracy"),
            **stats.bootstrap_mean(correct * weight.double(), seed).fields("balanced_accuracy"),
            "majority_baseline": majority,
            **stats.bootstrap_auc(labels, prob, seed).fields("auc"),
            **stats.proportion(pred[adv]).fields("detection_rate"),
            **stats.proportion(pred[~adv]).fields("false_positive_rate"),
            "n_benign": int((~adv).sum()), "n_adversarial": int(adv.sum()), "_correct": correct}


def balanced(benign: dict[str, Any], adv: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The first ``m`` benign and the first ``m`` (successful) adversarial inputs, ``m`` the smaller count."""
    m = min(int(benign["label"].shape[0]), int(adv["label"].shape[0]))
    b, a = select(benign, torch.arange(m)), select(adv, torch.arange(m))
    return {"label": torch.cat([b["label"], a["label"]]), "image": torch.cat([b["image"], a["image"]]),
            "maps": {n: torch.cat([b["maps"][n], a["maps"][n]]) for n in names}}


def _data_spec(dm: BaseDataModule) -> dict[str, Any]:
    """A stable, JSON-serialisable description of the data module (part of the detection-data cache key)."""
    return {"class_path": type(dm).__name__, "init_args": dict(getattr(dm, "hparams", {}) or {})}


@dataclass
class _Run:
    """What every target interpreter's detectors share: the config, the classifier, the interpreters, the cache."""

    cfg: DetectorExperiment
    model: Any
    interps: dict[str, Any]
    cache: Path
    base_spec: dict[str, Any]
    progress: bool
    out: Path
    data_seconds: float = 0.0

    def data(self, desc: str, spec: dict[str, Any], **inputs: Any) -> dict[str, Any]:
        """Maps (and adversarial inputs) of ``inputs`` from the per-batch cache or computed; time counted."""
        start = time.perf_counter()
        out = build_detection_data(self.model, self.interps, batch_size=int(self.cfg.detection.batch_size),
                                   cache_dir=self.cache, spec={**self.base_spec, **spec}, progress=self.progress,
                                   desc=desc, **inputs)
        self.data_seconds += time.perf_counter() - start
        return out

    def attack_options(self, attack: str, target: str, extra: AttackOptions | None = None) -> dict[str, Any]:
        """The detection attack's layered options against ``target`` (``extra`` last, e.g. the adaptive layer)."""
        c, fw = self.cfg, self.cfg.detection.framework
        layers = [c.attack, c.per_framework.get(fw), c.per_interpreter.get(target),
                  c.per_interpreter_framework.get(f"{target}_{fw}"), extra]
        return {**layered_options(fw, *layers), "interpreter_options": c.interpreter_options}


def _inputs(cfg: DetectorExperiment, model: Any, dm: BaseDataModule) -> dict[str, dict[str, torch.Tensor]]:
    """Per set (``fit``, ``select``, ``test``): benign inputs, attacked sources and their random targets; sets that
    read the same split take consecutive, disjoint inputs of it."""
    d, seed = cfg.detection, int(cfg.seed)
    sets = d.sets()
    need: dict[str, int] = {}
    for split, n in sets.values():
        need[split] = need.get(split, 0) + 2 * n
    pools = {split: select_correct(model, dm, n, split=split) for split, n in need.items()}
    for split, n in need.items():
        if pools[split]["image"].shape[0] < n:
            raise ValueError(f"only {pools[split]['image'].shape[0]} correctly classified inputs in the {split} split; "
                             f"the detection sets need {n} there (lower detection.n_fit / n_select / n_test)")
    gen = torch.Generator().manual_seed(seed)
    taken: dict[str, int] = {}
    out = {}
    for name, (split, n) in sets.items():
        at = taken.get(split, 0)
        x, y = pools[split]["image"][at:at + 2 * n], pools[split]["label"][at:at + 2 * n]
        taken[split] = at + 2 * n
        out[name] = {"benign": x[:n], "source": x[n:], "target": random_targets(y[n:], dm.num_classes, gen),
                     "split": split}
    return out


@register_experiment("detector", DetectorExperiment, outputs=outputs, check=check)
def run(cfg: DetectorExperiment, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    t_start = time.perf_counter()
    d, seed = cfg.detection, int(cfg.seed)
    notes: list[str] = []
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    interps = _interpreters(cfg, dm, str(info["checkpoint"]), out, notes, progress)
    inputs = _inputs(cfg, model, dm)
    # how the inputs were chosen; build_detection_data adds what the data are computed from (the classifier's
    # weights, the interpreters' and the attack's settings, RTS weights included) and keys every batch on its inputs
    base_spec = {"data": _data_spec(dm), "seed": seed, "batch_size": int(d.batch_size)}
    ctx = _Run(cfg, model, interps, Path(d.cache_dir or out / "cache"), base_spec, progress, out)
    benign = {name: ctx.data(f"benign maps ({name})", {"set": "benign", "part": name}, benign=part["benign"])
              for name, part in inputs.items()}
    rows: list[dict[str, Any]] = []
    adaptive_rows: list[dict[str, Any]] = []
    for target in d.target_interpreters:
        target_rows, adaptive = _target(ctx, target, benign, inputs)
        rows += target_rows
        adaptive_rows += adaptive
    rows.extend(adaptive_rows)
    if _sweeps(cfg):
        _pareto_figure(out / PARETO_FIGURE, rows)
    notes += [f"The {r['target_interpreter'].upper()}-target detector ({r['interpreters']}) is saved to "
              f"{r['saved_to']}: `{_evaluate_command(info['checkpoint'], r, out)}` "
              "scores it, detector-aware attack included." for r in rows if "saved_to" in r]
    total = time.perf_counter() - t_start
    for r in rows:
        r["experiment_seconds"] = total
        r["data_seconds"] = ctx.data_seconds
    report = _report(cfg, info, rows, notes, total, ctx.data_seconds)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    write_outputs(out, rows, report)
    return rows


def _craft(ctx: _Run, target: str, inputs: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """The adversarial maps of every set's sources (crafted against ``target``)."""
    d, seed = ctx.cfg.detection, int(ctx.cfg.seed)
    opts = ctx.attack_options(d.attack, target)
    atk = build_attack(d.attack, d.framework, target, seed=seed, **opts)
    return {name: ctx.data(f"{d.attack}/{target} adversarial maps ({name})",
                           {"set": "adversarial", "part": name, "attack": d.attack, "framework": d.framework,
                            "target": target, "options": opts},
                           source=part["source"], target=part["target"], attack=atk)
            for name, part in inputs.items()}


def _target(ctx: _Run, target: str, benign: dict[str, dict[str, Any]],
            inputs: dict[str, dict[str, torch.Tensor]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of one target interpreter (squeezing, every combination; fitted on the fit set, chosen on the
    select set, scored on the test set) and its adaptive rows (the ensemble attack, the detector-aware sweep)."""
    d, seed = ctx.cfg.detection, int(ctx.cfg.seed)
    names = d.interpreters
    adv = _craft(ctx, target, inputs)
    ok = {name: a["success"].bool() for name, a in adv.items()}
    asr = stats.proportion(ok["test"])
    common = {"target_interpreter": target, "attack": d.attack, "framework": d.framework, "split": "test",
              "fit_split": inputs["fit"]["split"], "select_split": inputs["select"]["split"],
              **asr.fields("attack_success"), "n_attacked": asr.n, "attack_seconds": float(sum(float(a["attack_seconds"].sum())
                                                                          for a in adv.values()))}
    budget = build_attack(d.attack, d.framework, target, seed=seed, **ctx.attack_options(d.attack, target)).budget
    common.update(budget_preset=preset_of(target, budget),
                  seconds_per_input=common["attack_seconds"] / max(sum(int(a["success"].numel()) for a in adv.values()), 1))
    short = {name: int(v.sum()) for name, v in ok.items() if int(v.sum()) < MIN_ADVERSARIAL}
    if short:
        return [{"detector": "not measured", "interpreters": "-", **common,
                 "status": "not measured: the attack succeeded on too few inputs of the "
                           + ", ".join(f"{k} set ({v} of {inputs[k]['source'].shape[0]})" for k, v in short.items())
                           + f" (a detector needs >= {MIN_ADVERSARIAL} adversarial inputs per set)"}], []
    parts = {name: balanced(benign[name], select(adv[name], ok[name].nonzero().flatten()), names) for name in adv}
    common.update({f"n_{name}": int(p["label"].numel()) for name, p in parts.items()})
    rows = [_squeeze_row(ctx, parts, common)]
    candidates: list[tuple[dict[str, Any], Any]] = []
    size = 3 if len(names) >= 3 else 2
    for combo, product in combinations(names):
        row, det = _detector_row(ctx, parts, combo, product, common)
        rows.append(row)
        if len(combo) == size:  # the detector attacked adaptively: the best of its size on the development split
            candidates.append((row, det))
    best, best_det = select_best(candidates, lambda c: c[0]["select_accuracy"], DEV,
                                 f"the choice of the {target.upper()}-target detector")
    best["chosen_on"] = DEV
    rows[0].update(_versus_squeeze(best, rows[0], seed))
    _save_detector(ctx, target, best, best_det)
    if int(d.n_adaptive) == 0:
        return rows, []
    later = [_adaptive(ctx, best, best_det, inputs["test"], adv["test"], target, common)]
    if d.sweep.weights:
        later += _sweep(ctx, best, best_det, parts, benign, inputs["test"], adv["test"], common)
    return rows, later


def _versus_squeeze(best: dict[str, Any], squeeze: dict[str, Any], seed: int) -> dict[str, Any]:
    """McNemar's test of the chosen map detector against feature squeezing on the same test inputs."""
    test = stats.mcnemar(best["_correct"], squeeze["_correct"], seed)
    return {"versus": best["interpreters"], **test.fields("accuracy_vs_best")}


def _evaluate_command(classifier: str, row: dict[str, Any], out: Path) -> str:
    """The ``defend evaluate`` command that scores the detector ``row`` saved (its card to ``out/card_<target>``)."""

    return evaluate_command(classifier, out / f"card_{row['target_interpreter']}", detector=row["saved_to"])


def _save_detector(ctx: _Run, target: str, row: dict[str, Any], det: Any) -> None:
    """The detector the adaptive attack faces (the best of its size on the development split) to
    ``<out>/detectors/<target>/``, with the interpreters it reads (what ``defend evaluate --detector`` needs); the
    row says where."""
    path = ctx.out / "detectors" / target
    det.save(path, row["interpreters"].split("+"), bool(row["product"]))
    row["saved_to"] = str(path)


def _squeeze_row(ctx: _Run, parts: dict[str, dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    """Feature squeezing on the images: its threshold fitted on the fit set, scored on the test set."""
    sq_cfg = ctx.cfg.squeeze
    sq = FeatureSqueezer(ctx.model, bits=[int(b) for b in sq_cfg.bits], median=[int(m) for m in sq_cfg.median])
    start = time.perf_counter()
    sq.fit(parts["fit"]["image"], parts["fit"]["label"])
    fit_s = time.perf_counter() - start
    test = parts["test"]
    res = _scores(sq.score(test["image"]), test["label"], int(ctx.cfg.seed), sq.threshold)
    return {"detector": "squeeze", "interpreters": "-", "channels": 3, "product": False, **common, **res,
            "threshold": sq.threshold, "feature_seconds": fit_s, "booster_seconds": 0.0, "train_seconds": 0.0}


def _detector_row(ctx: _Run, parts: dict[str, dict[str, Any]], combo: tuple[str, ...], product: bool,
                  common: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Train the detector of one interpretation combination on the fit set; its accuracy on the select set (for the
    choice) and every figure on the test set."""
    dc, seed = ctx.cfg.detector, int(ctx.cfg.seed)
    fit = parts["fit"]
    det, times = train_detector(stack_maps(fit["maps"], combo, product), fit["label"], epochs=int(dc.epochs),
                                batch_size=int(dc.batch_size), trainable=dc.trainable, pretrained=dc.pretrained,
                                lr=float(dc.lr), booster=dc.booster, seed=seed, progress=False,
                                trainer_options=dc.trainer, feature_stages=dc.feature_stages)
    sel, test = parts["select"], parts["test"]
    select_acc = float(((det.predict_proba(stack_maps(sel["maps"], combo, product)) > 0.5).long()
                        == sel["label"]).float().mean())
    maps = stack_maps(test["maps"], combo, product)
    res = _scores(det.predict_proba(maps), test["label"], seed)
    row = {"detector": "single" if len(combo) == 1 else "stacked", "interpreters": "+".join(combo),
           "channels": int(maps.shape[1]), "product": bool(product), **common, "select_accuracy": select_acc,
           **res, **times}
    if ctx.progress:
        print(f"[detector] {common['target_interpreter']}: {row['interpreters']}{' (+product)' if product else ''} "
              f"dev acc={select_acc:.3f}, test acc={res['accuracy']:.3f}", flush=True)
    return row, det


def _adaptive(ctx: _Run, best: dict[str, Any], det: Any, test: dict[str, torch.Tensor], plain: dict[str, Any],
              target: str, common: dict[str, Any]) -> dict[str, Any]:
    """The adaptive attack (ADV2 against the ensemble of the interpreters the detector reads) on the first
    ``n_adaptive`` test sources, toward the same targets as the plain attack; detection rates of both on the inputs
    where both reached the target, with McNemar's test."""
    ad, n = ctx.cfg.detection.adaptive, int(ctx.cfg.detection.n_adaptive)
    seed = int(ctx.cfg.seed)
    combo = best["interpreters"].split("+")
    opts = ctx.attack_options(ad.attack, target, ad)
    atk = build_attack(ad.attack, ctx.cfg.detection.framework, [ctx.interps[n_] for n_ in combo], seed=seed, **opts)
    start = time.perf_counter()
    adv = ctx.data(f"adaptive {ad.attack} on {'+'.join(combo)}",
                   {"set": "adaptive", "attack": ad.attack, "ensemble": combo, "options": opts},
                   source=test["source"][:n], target=test["target"][:n], attack=atk)
    wall = time.perf_counter() - start
    ok, ok_plain = adv["success"].bool(), plain["success"][:n].bool()
    both = ok & ok_plain
    flag = lambda data: (det.predict_proba(stack_maps(data["maps"], combo, best["product"])) > 0.5).double()  # noqa: E731
    row = {"detector": "stacked-adaptive", "interpreters": best["interpreters"], "channels": best["channels"],
           "product": best["product"], **{**common, "attack": f"{ad.attack}-ensemble"},
           "budget_preset": preset_of("+".join(combo), atk.budget), "seconds_per_input": wall / max(n, 1),
           **stats.proportion(ok).fields("attack_success"), "n_adaptive": n, "n_both_succeeded": int(both.sum()),
           "accuracy": best["accuracy"], "auc": best["auc"], "feature_seconds": 0.0, "booster_seconds": 0.0,
           "train_seconds": 0.0, "attack_seconds": float(adv["attack_seconds"].sum()), "wall_seconds": wall}
    flagged = flag(adv)[both] if bool(both.any()) else torch.zeros(0)
    flagged_plain = flag(select(plain, torch.arange(n)))[both] if bool(both.any()) else torch.zeros(0)
    row.update({**stats.proportion(flagged).fields("adaptive_detection_rate"),
                **stats.proportion(flagged_plain).fields("detection_rate"),
                **stats.proportion(ok & ~(flag(adv).bool())).fields("evasion_rate")})
    if bool(both.any()):
        row.update(stats.mcnemar(flagged, flagged_plain, seed).fields("detection"))
    return row


def _sweep(ctx: _Run, best: dict[str, Any], det: Any, parts: dict[str, dict[str, Any]],
           benign: dict[str, dict[str, Any]], test: dict[str, torch.Tensor], plain: dict[str, Any],
           common: dict[str, Any]) -> list[dict[str, Any]]:
    """The detector-aware sweep (:func:`defend.detector_sweep.detector_sweep`) on the chosen detector and the first
    ``n_adaptive`` test sources, the plain attack's inputs on them as the baseline: the booster's 5 %-FPR threshold
    is set on every benign input of the select set (development split; the realised FPR is measured on those of
    the test set), the surrogate's held-out fit is on the test set's maps (never distilled on). One row per point,
    then a summary row."""
    d, seed = ctx.cfg.detection, int(ctx.cfg.seed)
    n, target = int(d.n_adaptive), common["target_interpreter"]
    combo, product = best["interpreters"].split("+"), bool(best["product"])
    dev = det.predict_proba(stack_maps(benign["select"]["maps"], combo, product))
    threshold, dev_fpr = fpr_threshold(dev, SWEEP_FPR)
    test_fpr = stats.proportion(det.predict_proba(stack_maps(benign["test"]["maps"], combo, product)) > threshold)
    test_maps = stack_maps(parts["test"]["maps"], combo, product)
    setup = SweepSetup(ctx.model, det, {c: ctx.interps[c] for c in combo}, product, threshold, test["source"][:n],
                       test["target"][:n], det.attack_surrogate(d.sweep.surrogate), framework=d.framework,
                       options=ctx.attack_options(d.adaptive.attack, target, d.adaptive), seed=seed,
                       batch_size=int(d.batch_size))
    plain_budget = build_attack(d.attack, d.framework, target, seed=seed, **ctx.attack_options(d.attack, target)).budget
    res = detector_sweep(setup, plain["image"][:n], plain_attack=d.attack, plain_budget=plain_budget,
                         weights=[float(w) for w in d.sweep.weights], restarts=int(d.sweep.restarts),
                         budget_check=bool(d.sweep.budget_check), held_out_maps=test_maps,
                         plain_seconds=float(plain["attack_seconds"][:n].sum()))
    head = {"interpreters": best["interpreters"], "channels": best["channels"], "product": product, **common,
            "surrogate": det.surrogate_kind(d.sweep.surrogate), "threshold_fpr5": threshold,
            "threshold_dev_fpr": dev_fpr, "n_benign_dev": int(dev.numel()),
            **test_fpr.fields("test_fpr"), "n_benign_test": test_fpr.n}
    rows = [{"detector": "detector-aware", **head, **_flat_point(p)} for p in res["points"]]
    summary = {k: v for k, v in head.items() if k not in ("budget_preset", "seconds_per_input")}
    return rows + [{"detector": "detector-aware summary", **summary, **_flat_summary(res)}]


def _flat_point(p: dict[str, Any]) -> dict[str, Any]:
    """A sweep point as a flat metrics row (its budget's keys prefixed ``budget_``)."""
    out = {k: v for k, v in p.items() if k not in ("budget", "per_input")}
    out.update({f"budget_{k}": v for k, v in p["budget"].items() if isinstance(v, (int, float, str, bool))})
    out["_evasion"] = p["per_input"]["evasion"]
    return out


def _flat_summary(res: dict[str, Any]) -> dict[str, Any]:
    """The sweep's summary as a flat metrics row: the strongest weight, its McNemar test against the plain attack,
    the convergence check and the surrogate's fits (``surrogate_held_out_*``, ``surrogate_iterates_*``)."""
    out = {"strongest_weight": res["strongest"], **res["versus_plain"]}
    out.update({f"budget_check_{k}": v for k, v in (res["budget_check"] or {}).items()})
    for key, name in (("held_out", "held_out"), ("along_iterates", "iterates")):
        out.update({f"surrogate_{name}_{k}": v for k, v in (res["surrogate"][key] or {}).items()})
    return out


def _pareto_figure(path: Path, rows: list[dict[str, Any]]) -> None:
    """``detector_pareto.png``: evasion at 5 % FPR against map IoU to benign, one series per target interpreter
    (not written when no point has both figures)."""
    series: dict[str, list[tuple[float, float, str, bool]]] = {}
    for r in rows:
        if r["detector"] == "detector-aware" and r["evasion_rate_fpr5"] is not None and r["iou"] is not None:
            label = "plain" if r["detector_weight"] is None else f"w={r['detector_weight']:g}"
            series.setdefault(f"{r['target_interpreter'].upper()} target ({r['interpreters']})", []).append(
                (r["iou"], r["evasion_rate_fpr5"], label, bool(r["pareto"])))
    if not series:  # no detector was attacked (too few adversarial inputs): no figure
        return
    pareto_plot(path, series, "map IoU to benign (top-k, mean over the detector's interpreters)",
                "evasion at 5 % FPR (target reached, not flagged)", "detector-aware attack: Pareto front")


def _report(cfg: DetectorExperiment, info: dict[str, Any], rows: list[dict[str, Any]], notes: list[str],
            total: float, data_seconds: float) -> str:
    d, names = cfg.detection, cfg.detection.interpreters
    sets = d.sets()
    lines = ["# Multi-interpreter adversarial detector (AdvEdge section VIII, Tables V-VI)", "",
             f"Classifier `{info['checkpoint']}`; attack `{d.attack}` / `{d.framework}`; "
             f"interpreters {', '.join(n.upper() for n in names)}; booster device `{xgb_device()}`; "
             f"{trunk_description(cfg.detector.pretrained)}, layers trained: `{cfg.detector.trainable}`.", "",
             f"Three disjoint sets of correctly classified inputs, each balanced (as many benign as successful "
             f"adversarial inputs, so accuracy is balanced accuracy and the majority baseline 0.5): every detector is "
             f"**trained** on the fit set ({sets['fit'][1]} benign + {sets['fit'][1]} attacked inputs of the "
             f"{sets['fit'][0]} split), the detector that is saved and attacked adaptively is **chosen** on the "
             f"select set (the development split, {sets['select'][1]} + {sets['select'][1]}; its accuracy there is "
             f"the `dev accuracy` column), and **every figure below** is on the test set (the test split, "
             f"{sets['test'][1]} + {sets['test'][1]}). Figures: value [95 % interval] (Wilson for accuracy and rates, "
             f"a percentile bootstrap over inputs for AUC, seed {cfg.seed}); fewer than 100 inputs: indicative.",
             f"Total experiment time {total:.0f} s (data: maps + attacks {data_seconds:.0f} s in this run; "
             "data already in the cache are not recomputed).", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    for t in d.target_interpreters:
        lines += _target_report(t, names, [r for r in rows if r["target_interpreter"] == t])
    return "\n".join(lines)


def _fig(row: dict[str, Any], name: str) -> str:
    return stats.format_value(row.get(name), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high"))


def _target_report(t: str, names: list[str], tr: list[dict[str, Any]]) -> list[str]:
    """The tables of one target interpreter (Tables V and VI, every detector, the adaptive attack)."""
    if not tr:
        return []
    r0 = tr[0]
    if r0["detector"] == "not measured":
        return [f"## Adversarial inputs crafted against {t.upper()}: {r0['status']}", ""]
    lines = [f"## Adversarial inputs crafted against {t.upper()} (attack success on the {r0['n_attacked']} test "
             f"sources {_fig(r0, 'attack_success')}; balanced sets of {r0['n_fit']} fit / {r0['n_select']} select / "
             f"{r0['n_test']} test inputs; crafting took {r0['attack_seconds']:.0f} s)", ""]

    def acc(combo, product, key="accuracy"):
        hit = [r for r in tr if r["detector"] in ("stacked", "single") and r["interpreters"] == "+".join(combo)
               and r["product"] == product]
        return _fig(hit[0], key) if hit else "-"

    for product, title in ((False, "Table V (upper): 2-channel samples, test accuracy"),
                           (True, "Table V (lower): 3-channel samples (pair + product), test accuracy")):
        body = [[a.upper()] + [acc((b, a), product) if j < i else "-" for j, b in enumerate(names)]
                for i, a in enumerate(names)]
        lines += [f"### {title}", "", markdown_table([""] + [n.upper() for n in names], body), ""]
    triples = list(itertools.combinations(names, 3))
    if triples:
        body = [[", ".join(n.upper() for n in c), acc(c, False), acc(c, False, "auc")] for c in triples]
        lines += ["### Table VI: three-interpreter detector (test set)", "",
                  markdown_table(["interpreters", "accuracy", "AUC"], body), ""]
    body = [[r["detector"], r["interpreters"], r["channels"], r["product"], r.get("select_accuracy", "-"),
             _fig(r, "accuracy"), _fig(r, "balanced_accuracy"), r["majority_baseline"], _fig(r, "auc"),
             _fig(r, "detection_rate"), _fig(r, "false_positive_rate"), "chosen" if "saved_to" in r else ""]
            for r in tr if r["detector"] in ("single", "stacked", "squeeze")]
    lines += ["### All detectors (single-interpreter and feature-squeezing baselines included; test set)", "",
              markdown_table(["detector", "interpreters", "C", "product", "dev accuracy", "accuracy",
                              "balanced accuracy", "majority baseline", "AUC", "detection rate", "false positives",
                              ""], body), ""]
    sq = next((r for r in tr if r["detector"] == "squeeze"), None)
    if sq is not None and sq.get("accuracy_vs_best_p") is not None:
        better = "the chosen detector" if sq["accuracy_vs_best_diff"] > 0 else "feature squeezing"
        verdict = ("within noise" if stats.within_noise(sq["accuracy_vs_best_p"])
                   else f"{better} is ahead")
        lines += [f"The chosen detector ({sq['versus']}) against feature squeezing on the same test inputs: accuracy "
                  f"of the detector minus squeezing {_fig(sq, 'accuracy_vs_best_diff')}, McNemar exact p = "
                  f"{sq['accuracy_vs_best_p']:.2g}: {verdict}.", ""]
    return (lines + _adaptive_report([r for r in tr if r["detector"] == "stacked-adaptive"])
            + _sweep_report([r for r in tr if r["detector"] == "detector-aware"],
                            next((r for r in tr if r["detector"] == "detector-aware summary"), None)))


def _adaptive_report(ad: list[dict[str, Any]]) -> list[str]:
    if not ad:
        return []
    a = ad[0]
    p = a.get("detection_p")
    verdict = "not measured (no input reached its target under both attacks)" if p is None else (
        f"McNemar exact p = {p:.2g}" + (" (within noise)" if stats.within_noise(p) else ""))
    return ["### Adaptive attack (ADV2 against the ensemble of the interpreters the detector reads)", "",
            markdown_table(["detector", "non-adaptive detection rate", "adaptive detection rate", "paired test",
                            "adaptive attack success", "evasion (target reached, not flagged)", "inputs (both "
                            "succeeded / attacked)", "attack s"],
                           [[a["interpreters"] + (" +product" if a["product"] else ""), _fig(a, "detection_rate"),
                             _fig(a, "adaptive_detection_rate"), verdict, _fig(a, "attack_success"),
                             _fig(a, "evasion_rate"), f"{a['n_both_succeeded']} / {a['n_adaptive']}",
                             a["attack_seconds"]]]), "",
            "Both detection rates are on the same test sources and targets, over the inputs where both the plain "
            "and the adaptive attack reached the target (probability > 0.5 = flagged).", ""]


def _sweep_report(points: list[dict[str, Any]], summary: dict[str, Any] | None) -> list[str]:
    """The detector-aware sweep of one target: the table (one line per weight and the plain attack), the strongest
    weight against the plain attack, the convergence check and the surrogate's fits."""
    if not points or summary is None:
        return []
    body = [["plain " + p["attack"] if p["detector_weight"] is None else f"detector-aware, weight {p['detector_weight']:g}",
             p["restarts"], _fig(p, "attack_success"), _fig(p, "evasion_rate_fpr5"), _fig(p, "detection_rate_fpr5"),
             _fig(p, "iou"), "yes" if p["pareto"] else "", p["budget_preset"], f"{p['seconds_per_input']:.2f}"]
            for p in points]
    s = summary
    diff = stats.format_value(s["evasion_vs_plain_diff"], s["evasion_vs_plain_diff_ci_low"],
                              s["evasion_vs_plain_diff_ci_high"])
    lines = [f"### Detector-aware attack on {s['interpreters']}{' +product' if s['product'] else ''}: "
             f"sweep of the detector weight ({s['surrogate']} surrogate)", "",
             markdown_table(["attack", "restarts", "attack success", "evasion @5% FPR (target reached, not flagged)",
                             "detected @5% FPR (of those reaching the target)", "map IoU to benign", "Pareto front",
                             "budget", "s / input"], body), "",
             f"Inputs: the first {points[0]['n']} test sources and targets of the plain attack; per input, among the "
             "restarts and the plain attack's input, the one that evades the real booster at its 5 %-FPR threshold "
             f"({s['threshold_fpr5']:.4g}, set on {s['n_benign_dev']} development benign inputs"
             + ("" if stats.fpr_supported(s["n_benign_dev"], SWEEP_FPR) else
                f", fewer than the {stats.min_benign_for_fpr(SWEEP_FPR)} a 5 % FPR needs: indicative")
             + f"; realised FPR on {s['n_benign_test']} test benign inputs {_fig(s, 'test_fpr')}), then the one "
             "whose maps are closest "
             "to benign, is kept: the attack is never weaker than the plain one on the same inputs. Weight 0 is the "
             "plain ensemble ADV2 on the interpreters the detector reads.",
             f"Strongest weight {s['strongest_weight']:g}: evasion minus the plain attack's {diff}, McNemar exact "
             f"p = {s['evasion_vs_plain_p']:.2g}"
             + (" (within noise)." if stats.within_noise(s["evasion_vs_plain_p"]) else "."), ""]
    if s.get("budget_check_verdict"):
        lines += [f"Convergence check (the strongest weight with twice the steps): **{s['budget_check_verdict']}**.",
                  ""]
    lines += [f"Surrogate fit to the booster (log-odds): on held-out test maps {_agreement(s, 'held_out')}; on the "
              f"maps of the attack's final inputs (every weight and restart) {_agreement(s, 'iterates')}.", ""]
    return lines


def _agreement(s: dict[str, Any], name: str) -> str:
    """``R^2 0.61, sign agreement 0.93, Spearman 0.80 (n 80)`` of one surrogate fit of a summary row."""
    get = lambda k: s.get(f"surrogate_{name}_{k}")  # noqa: E731
    if get("n") is None:
        return "not measured (no distilled surrogate)"
    num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"R^2 {num(get('r2'))}, sign agreement {num(get('sign_agreement'))}, Spearman rank correlation "
            f"{num(get('spearman'))} (n {get('n')})")
