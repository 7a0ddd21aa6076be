"""Experiment ``detector``: the multi-interpreter adversarial detector (AdvEdge section VIII, Tables V-VI).

For every target interpreter: benign inputs and adversarial inputs (ADV2 / AdvEdge / AdvEdge+ against that
interpreter), the maps of every configured interpreter (GRAD, CAM, MASK, and RTS when a trained RTS checkpoint is
configured), a seeded stratified train / test split, then one detector per combination:

* ``single``: one interpreter (1 channel) - the baseline that measures the gain of stacking;
* ``stacked``: every pair (2 channels), every pair plus the product channel (3 channels), every triple (3 channels);
* ``squeeze``: feature squeezing on the inputs themselves (Xu et al.; ADV2 Table 4).

The best triple (the best pair when fewer than three interpreters are read) is then attacked adaptively (ADV2 with
the ensemble of the interpreters it reads) and its detection rate on those inputs is reported next to the
non-adaptive one. That detector is saved to ``<out>/detectors/<target>/`` with the interpreters it reads, for
``defend evaluate --detector`` (which adds the detector-aware attack).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from attacks import FRAMEWORKS, INTERPRETERS, build_attack, random_targets

from ..data import BaseDataModule
from ..detection_data import build_detection_data, select, stack_maps
from ..detector import DETECTOR_FILES, FeatureSqueezer, train_detector, xgb_device
from ..interpreters import build_interpreter
from ..types import Count, Fraction01, Positive, PositiveCount
from .common import (
    ClassifierExperimentConfig,
    classifier_outputs,
    default_data,
    get_classifier,
    markdown_table,
    select_correct,
    setup_data,
    train_rts,
    write_outputs,
)
from .config import (
    AttackOptions,
    AttackSections,
    TrainerOptions,
    check_class_options,
    check_names,
    layered_options,
    register_experiment,
)

__all__ = ["run", "combinations", "MIN_ADVERSARIAL", "DetectorExperiment", "Detection", "AdaptiveAttack",
           "DetectorOptions", "SqueezeOptions", "PlainRTS", "plain_rts"]

#: fewest successful adversarial inputs a detector is trained and scored on (below it the row says "not measured")
MIN_ADVERSARIAL = 10

#: the attacks with an interpretation term (what the detector is meant to catch)
InterpretationAttack = Literal["adv2", "advedge", "advedge_plus"]
Split = Literal["train", "val", "test"]


@dataclass
class AdaptiveAttack(AttackOptions):
    """The adaptive attack on the best detector: ``attack`` against the ensemble of the interpreters that detector
    reads; these options override the detection attack's layered ones (shared, per framework, per target)."""

    attack: InterpretationAttack = "adv2"

    def set_options(self) -> dict[str, Any]:
        """The attack options this layer sets (the attack's name is not one)."""
        return {k: v for k, v in super().set_options().items() if k != "attack"}


@dataclass
class Detection:
    """The detector's data: the first ``n_benign + n_adversarial + n_adaptive`` correctly classified inputs of
    ``split`` (several splits are concatenated in order); ``attack`` on ``framework`` crafts the adversarial inputs
    against each of ``target_interpreters`` (one table each); the maps of ``interpreters`` are stacked as channels;
    ``test_fraction`` of the benign + successful adversarial inputs is held out (stratified). ``cache_dir``: the
    per-batch cache of maps and attacks (default ``<out>/cache``)."""

    n_benign: PositiveCount = PositiveCount(200)
    n_adversarial: PositiveCount = PositiveCount(200)
    n_adaptive: Count = Count(40)
    split: Split | list[Split] = "test"
    attack: InterpretationAttack = "advedge"
    framework: str = "pgd"
    target_interpreters: list[str] = field(default_factory=lambda: ["cam"])
    interpreters: list[str] = field(default_factory=lambda: ["grad", "cam", "mask"])
    test_fraction: Fraction01 = Fraction01(0.3)
    batch_size: PositiveCount = PositiveCount(50)
    cache_dir: str | None = None
    adaptive: AdaptiveAttack = field(default_factory=AdaptiveAttack)


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
    from ..aid import AID_OPTIMISER, AIDModule, load_rts
    from ..module_base import as_options

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
            from ..classifier import load_classifier

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
    if len(d.interpreters) < 2 or len(set(d.interpreters)) < len(d.interpreters):
        raise ValueError(f"detection.interpreters needs at least two different interpreters to stack (each once), "
                         f"got {d.interpreters}")
    missing = [t for t in d.target_interpreters if t not in d.interpreters]
    if missing:
        raise ValueError(f"detection.target_interpreters {missing} are not in detection.interpreters {d.interpreters}")
    if not 0 < d.test_fraction < 1:
        raise ValueError(f"detection.test_fraction must lie strictly between 0 and 1, got {d.test_fraction}")
    cfg.check_attack_sections()
    cfg.classifier.check(default_data(cfg))
    _check_files(cfg)


def outputs(cfg: DetectorExperiment, out: Path) -> list[Path]:
    """The checkpoints the run trains and saves: the classifier and the plain RTS (each unless reused), and the
    detector of each target interpreter that was attacked adaptively (``detectors/<target>/``)."""
    rts = [cfg.rts.path(out)] if _trains_rts(cfg) and not cfg.rts.reuses(out) else []
    detectors = [out / "detectors" / t / f for t in cfg.detection.target_interpreters
                 for f in ("detector.json", *DETECTOR_FILES)]
    return [*classifier_outputs(cfg, out), *rts, *detectors]


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
    from ..aid import load_rts
    from ..classifier import load_classifier

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


def _split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(labels.shape[0]).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=labels.numpy(), random_state=seed)
    return torch.as_tensor(tr), torch.as_tensor(te)


def _scores(prob: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    pred = (prob > threshold).long()
    adv = labels == 1
    return {"accuracy": float((pred == labels).float().mean()),
            "auc": float(roc_auc_score(labels.numpy(), prob.numpy())) if labels.unique().numel() == 2 else float("nan"),
            "detection_rate": float(pred[adv].float().mean()) if adv.any() else float("nan"),
            "false_positive_rate": float(pred[~adv].float().mean()) if (~adv).any() else float("nan")}


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


def _inputs(cfg: DetectorExperiment, model: Any, dm: BaseDataModule) -> dict[str, torch.Tensor]:
    """Benign, to-be-attacked and adaptive inputs (disjoint, correctly classified) and random target classes."""
    d = cfg.detection
    n_b, n_a, n_ad = int(d.n_benign), int(d.n_adversarial), int(d.n_adaptive)
    pool = select_correct(model, dm, n_b + n_a + n_ad, split=d.split)
    x, y = pool["image"], pool["label"]
    if x.shape[0] < n_b + n_a + n_ad:
        raise ValueError(f"only {x.shape[0]} correctly classified inputs in split {d.split}; "
                         f"need n_benign + n_adversarial + n_adaptive = {n_b + n_a + n_ad} (add a split: [test, val])")
    gen = torch.Generator().manual_seed(int(cfg.seed))
    ys, yad = y[n_b:n_b + n_a], y[n_b + n_a:]
    yt_s, yt_ad = random_targets(ys, dm.num_classes, gen), random_targets(yad, dm.num_classes, gen)
    return {"benign": x[:n_b], "source": x[n_b:n_b + n_a], "target": yt_s, "adaptive": x[n_b + n_a:],
            "adaptive_target": yt_ad}


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
    base_spec = {"data": _data_spec(dm), "n_benign": int(d.n_benign), "n_adversarial": int(d.n_adversarial),
                 "split": d.split, "seed": seed, "batch_size": int(d.batch_size)}
    ctx = _Run(cfg, model, interps, Path(d.cache_dir or out / "cache"), base_spec, progress, out)
    benign = ctx.data("benign maps", {"set": "benign"}, benign=inputs["benign"])
    rows: list[dict[str, Any]] = []
    adaptive_rows: list[dict[str, Any]] = []
    for target in d.target_interpreters:
        target_rows, adaptive = _target(ctx, target, benign, inputs)
        rows += target_rows
        adaptive_rows += [adaptive] if adaptive is not None else []
    rows.extend(adaptive_rows)
    notes += [f"The {r['target_interpreter'].upper()}-target detector ({r['interpreters']}) is saved to "
              f"{r['saved_to']}: `defend evaluate --classifier {info['checkpoint']} --detector {r['saved_to']}` "
              "scores it, detector-aware attack included." for r in rows if "saved_to" in r]
    total = time.perf_counter() - t_start
    for r in rows:
        r["experiment_seconds"] = total
        r["data_seconds"] = ctx.data_seconds
    write_outputs(out, rows, _report(cfg, info, rows, notes, total, ctx.data_seconds))
    return rows


def _target(ctx: _Run, target: str, benign: dict[str, Any],
            inputs: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The rows of one target interpreter (squeezing, every combination) and its adaptive row (if any)."""
    d, seed = ctx.cfg.detection, int(ctx.cfg.seed)
    names, attack, fw = d.interpreters, d.attack, d.framework
    opts = ctx.attack_options(attack, target)
    atk = build_attack(attack, fw, target, seed=seed, **opts)
    adv = ctx.data(f"{attack}/{target} adversarial maps",
                   {"set": "adversarial", "attack": attack, "framework": fw, "target": target, "options": opts},
                   source=inputs["source"], target=inputs["target"], attack=atk)
    ok = adv["success"].bool()
    asr, attack_seconds, n_ok = float(ok.float().mean()), float(adv["attack_seconds"].sum()), int(ok.sum())
    common = {"target_interpreter": target, "attack": attack, "framework": fw, "attack_success": asr,
              "attack_seconds": attack_seconds}
    if n_ok < MIN_ADVERSARIAL:
        return [{"detector": "not measured", "interpreters": "-", **common, "n_adversarial": n_ok,
                 "status": f"not measured: the attack succeeded on {n_ok} of {int(d.n_adversarial)} inputs "
                           f"(a detector needs >= {MIN_ADVERSARIAL} adversarial inputs)"}], None
    adv = select(adv, ok.nonzero().flatten())
    both = {"label": torch.cat([benign["label"], adv["label"]]), "image": torch.cat([benign["image"], adv["image"]]),
            "maps": {n: torch.cat([benign["maps"][n], adv["maps"][n]]) for n in names}}
    tr, te = _split(both["label"], float(d.test_fraction), seed)
    common.update({"n_train": int(tr.numel()), "n_test": int(te.numel())})
    rows = [_squeeze_row(ctx, both, tr, te, common)]
    best, best_det = None, None
    for combo, product in combinations(names):
        row, det = _detector_row(ctx, both, tr, te, combo, product, common)
        rows.append(row)
        # the detector attacked adaptively: the best triple, the best pair (product channel included) without one
        size = 3 if len(names) >= 3 else 2
        if len(combo) == size and (best is None or row["accuracy"] > best["accuracy"]):
            best, best_det = row, det
    if best_det is None:
        return rows, None
    _save_detector(ctx, target, best, best_det)
    if int(d.n_adaptive) == 0:
        return rows, None
    return rows, _adaptive(ctx, best, best_det, inputs, target, common)


def _save_detector(ctx: _Run, target: str, row: dict[str, Any], det: Any) -> None:
    """The detector the adaptive attack faces (the best of its size) to ``<out>/detectors/<target>/``, with the
    interpreters it reads (what ``defend evaluate --detector`` needs); the row says where."""
    path = ctx.out / "detectors" / target
    det.save(path, row["interpreters"].split("+"), bool(row["product"]))
    row["saved_to"] = str(path)


def _squeeze_row(ctx: _Run, both: dict[str, Any], tr: torch.Tensor, te: torch.Tensor,
                 common: dict[str, Any]) -> dict[str, Any]:
    """Feature squeezing on the images: fitted on the training inputs, scored on the held-out ones."""
    sq_cfg = ctx.cfg.squeeze
    sq = FeatureSqueezer(ctx.model, bits=[int(b) for b in sq_cfg.bits], median=[int(m) for m in sq_cfg.median])
    start = time.perf_counter()
    sq.fit(both["image"][tr], both["label"][tr])
    fit_s = time.perf_counter() - start
    res = _scores(sq.score(both["image"][te]), both["label"][te], sq.threshold)
    return {"detector": "squeeze", "interpreters": "-", "channels": 3, "product": False, **common, **res,
            "threshold": sq.threshold, "feature_seconds": fit_s, "booster_seconds": 0.0, "train_seconds": 0.0}


def _detector_row(ctx: _Run, both: dict[str, Any], tr: torch.Tensor, te: torch.Tensor, combo: tuple[str, ...],
                  product: bool, common: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Train the detector of one interpreter combination on the training maps; its scores on the held-out ones."""
    dc = ctx.cfg.detector
    maps = stack_maps(both["maps"], combo, product)
    det, times = train_detector(maps[tr], both["label"][tr], epochs=int(dc.epochs), batch_size=int(dc.batch_size),
                                trainable=dc.trainable, pretrained=dc.pretrained, lr=float(dc.lr),
                                booster=dc.booster, seed=int(ctx.cfg.seed), progress=False,
                                trainer_options=dc.trainer, feature_stages=dc.feature_stages)
    res = _scores(det.predict_proba(maps[te]), both["label"][te])
    row = {"detector": "single" if len(combo) == 1 else "stacked", "interpreters": "+".join(combo),
           "channels": int(maps.shape[1]), "product": bool(product), **common, **res, **times}
    if ctx.progress:
        print(f"[detector] {common['target_interpreter']}: {row['interpreters']}{' (+product)' if product else ''} "
              f"acc={res['accuracy']:.3f} auc={res['auc']:.3f}", flush=True)
    return row, det


def _adaptive(ctx: _Run, best: dict[str, Any], det: Any, inputs: dict[str, torch.Tensor], target: str,
              common: dict[str, Any]) -> dict[str, Any]:
    """The adaptive attack against the ensemble of every interpreter the detector reads; its detection rate."""
    ad = ctx.cfg.detection.adaptive
    combo = best["interpreters"].split("+")
    opts = ctx.attack_options(ad.attack, target, ad)
    atk = build_attack(ad.attack, ctx.cfg.detection.framework, [ctx.interps[n] for n in combo],
                       seed=int(ctx.cfg.seed), **opts)
    start = time.perf_counter()
    adv = ctx.data(f"adaptive {ad.attack} on {'+'.join(combo)}",
                   {"set": "adaptive", "attack": ad.attack, "ensemble": combo, "options": opts},
                   source=inputs["adaptive"], target=inputs["adaptive_target"], attack=atk)
    wall = time.perf_counter() - start
    seconds = float(adv["attack_seconds"].sum())  # recorded when crafted, so a cached re-run reports it too
    ok = adv["success"].bool()
    adv = select(adv, ok.nonzero().flatten())
    rate = float("nan")
    if ok.any():
        prob = det.predict_proba(stack_maps(adv["maps"], combo, best["product"]))
        rate = float((prob > 0.5).float().mean())
    return {"detector": "stacked-adaptive", "interpreters": best["interpreters"], "channels": best["channels"],
            "product": best["product"], **{**common, "attack": f"{ad.attack}-ensemble",
                                          "attack_success": float(ok.float().mean()),
                                          "n_train": best["n_train"], "n_test": int(ok.sum())},
            "adaptive_detection_rate": rate, "detection_rate": best["detection_rate"], "accuracy": best["accuracy"],
            "auc": best["auc"], "feature_seconds": 0.0, "booster_seconds": 0.0, "train_seconds": 0.0,
            "attack_seconds": seconds, "wall_seconds": wall}


def _report(cfg: DetectorExperiment, info: dict[str, Any], rows: list[dict[str, Any]], notes: list[str],
            total: float, data_seconds: float) -> str:
    d, names = cfg.detection, cfg.detection.interpreters
    lines = ["# Multi-interpreter adversarial detector (AdvEdge section VIII, Tables V-VI)", "",
             f"Classifier `{info['checkpoint']}`; attack `{d.attack}` / `{d.framework}`; "
             f"interpreters {', '.join(n.upper() for n in names)}; held-out fraction {float(d.test_fraction)}; "
             f"booster device `{xgb_device()}`; trunk layers trained: `{cfg.detector.trainable}`.",
             f"Total experiment time {total:.0f} s (data: maps + attacks {data_seconds:.0f} s in this run; "
             "data already in the cache are not recomputed).", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    for t in d.target_interpreters:
        lines += _target_report(t, names, [r for r in rows if r["target_interpreter"] == t])
    return "\n".join(lines)


def _target_report(t: str, names: list[str], tr: list[dict[str, Any]]) -> list[str]:
    """The tables of one target interpreter (Tables V and VI, every detector, the adaptive attack)."""
    if not tr:
        return []
    r0 = tr[0]
    if r0["detector"] == "not measured":
        return [f"## Adversarial inputs crafted against {t.upper()}: {r0['status']}", ""]
    lines = [f"## Adversarial inputs crafted against {t.upper()} (attack success {r0['attack_success']:.2f}; "
             f"{r0['n_train']} train / {r0['n_test']} test inputs; crafting took {r0['attack_seconds']:.0f} s)", ""]

    def acc(combo, product, key="accuracy"):
        hit = [r for r in tr if r["detector"] in ("stacked", "single") and r["interpreters"] == "+".join(combo)
               and r["product"] == product]
        return hit[0][key] if hit else "-"

    for product, title in ((False, "Table V (upper): 2-channel samples, accuracy"),
                           (True, "Table V (lower): 3-channel samples (pair + product), accuracy")):
        body = [[a.upper()] + [acc((b, a), product) if j < i else "-" for j, b in enumerate(names)]
                for i, a in enumerate(names)]
        lines += [f"### {title}", "", markdown_table([""] + [n.upper() for n in names], body), ""]
    triples = list(itertools.combinations(names, 3))
    if triples:
        body = [[", ".join(n.upper() for n in c), acc(c, False), acc(c, False, "auc")] for c in triples]
        lines += ["### Table VI: three-interpreter detector", "", markdown_table(["interpreters", "accuracy", "AUC"], body), ""]
    body = [[r["detector"], r["interpreters"], r["channels"], r["product"], r["accuracy"], r["auc"],
             r["detection_rate"], r["false_positive_rate"], r["train_seconds"], r["feature_seconds"],
             r["booster_seconds"]] for r in tr if r["detector"] in ("single", "stacked", "squeeze")]
    lines += ["### All detectors (single-interpreter and feature-squeezing baselines included)", "",
              markdown_table(["detector", "interpreters", "C", "product", "accuracy", "AUC", "detection rate",
                              "false positives", "CE train s", "feature s", "booster s"], body), ""]
    return lines + _adaptive_report([r for r in tr if r["detector"] == "stacked-adaptive"])


def _adaptive_report(ad: list[dict[str, Any]]) -> list[str]:
    if not ad:
        return []
    a = ad[0]
    return ["### Adaptive attack (ADV2 against the ensemble of the interpreters the detector reads)", "",
            markdown_table(["detector", "non-adaptive detection rate", "adaptive detection rate",
                            "adaptive attack success", "adaptive inputs", "attack s"],
                           [[a["interpreters"] + (" +product" if a["product"] else ""), a["detection_rate"],
                             a["adaptive_detection_rate"] if a["n_test"] else "not measured (no successful "
                             "adaptive input)", a["attack_success"], a["n_test"], a["attack_seconds"]]]), "",
            "Detection rate = share of successful adversarial inputs the detector flags (probability > 0.5). "
            "The adaptive inputs are new source images; only successful ones are scored.", ""]
