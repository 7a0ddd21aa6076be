"""Experiment ``scorecard``: every defence of this project trained (or reused) on the same data and scored by the same
battery of ``defend evaluate`` (:func:`defend.evaluate.evaluate_system`), in one table: defences as rows, attacks as
columns, the non-adaptive and the adaptive figure side by side.

Rows (``defences:``): the registered defences (:data:`defend.defences.DEFENCES`, in
:func:`~defend.defences.defence_names` order); each row asks its :class:`~defend.defences.Defence` what it trains (the
config section of its training family: ``robust``, ``aid``, ``detector``), which artifact it loads, what it changes in
the battery, which lines and cells it reports and how it is described. Today:

* ``normal``: the plain classifier (``classifier:``, reused from its checkpoint) explained by CAM and GRAD;
* ``pgd_at`` / ``int_adv`` / ``trades``: :class:`defend.robust.RobustClassifierModule` (modes ``pgd_at`` /
  ``int_adv`` / ``trades``), trained by the ``robust`` experiment's training function from the entries of
  ``robust.models`` named so;
* ``beta_smoothing``: the normal classifier explained by ``grad_softplus`` (Dombrowski et al., NeurIPS 2019: GRAD of
  the network with softplus(beta) in place of ReLU) instead of GRAD (a training-free baseline);
* ``gaussian_aug``: the classifier trained with Gaussian noise augmentation (mode ``gaussian``, Cohen et al. 2019),
  a ``robust.models`` entry like the others;
* ``rts`` / ``rts_aid`` / ``rts_noise``: the normal classifier explained by the plain RTS interpreter vs one trained
  with AID vs one trained with the noise distillation term (:class:`defend.aid.AIDModule`, the ``aid`` experiment's
  training function, ``aid:`` its training plan, ``aid.noise`` the noise run);
* ``detector``: the normal classifier behind the multi-interpreter detector (:class:`defend.detector.DetectorModule`
  on the stacked maps of ``detector.interpreters``, trained on benign and adversarial inputs of ``detector.split``,
  the training split: the development split sets the card's FPR thresholds, the test split reports), scored by its detection rates at 1 % / 5 % false positives on the battery's non-adaptive
  sets and on the detector-aware adaptive ADV2 (``adaptive_detector``).

Every row is one :func:`~defend.evaluate.evaluate_system` run into ``<out>/cards/<row>/`` (its ``card.json``,
report, tables, figures and adversarial sets) with the battery of ``battery:`` (``quick`` / ``standard`` / a file,
plus dotted ``overrides``), what the row's defence needs (the interpreter swap of ``beta_smoothing``, the RTS
network, the detector) and ``rows.<row>`` (dotted overrides for that row only). Every figure of the table is read
from the cards; a figure a card does not hold is "not measured". Trained artifacts are written under
``<out>/models/`` unless ``reuse.<artifact>`` names a file (a directory for the detector) that exists.

Resume: a run into the same ``--out`` after an interruption reuses what the earlier run finished, content-checked as
the attack cache is, and says so (one line per item): a trained model when its record ``models/<name>.settings.json``
holds the same training-settings digest (:func:`model_settings`) and the sha256 of every file, which still match and
which the output manifest lists; a row's card when it validates, its battery, data and system (the sha256 of every
network) are this run's and its files are the manifest's, unedited (:func:`finished_card`).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from attacks import INTERPRETERS, build_attack, interpretation_attacks, random_targets

from .. import evaluate, stats
from ..attack_options import AttackOptions, layered_options
from ..bench.cli import OUTPUTS as BENCH_OUTPUTS
from ..bench.cli import bench
from ..data import BaseDataModule
from ..defences import DEFENCES, Defence, defence_names, load_defences
from ..detection_data import build_detection_data, select, stack_maps
from ..detector import DETECTOR_INDEX, train_detector, trunk_description
from ..evaluate.battery import Battery, load_battery
from ..evaluate.card import validate_card
from ..evaluate.run import card_files
from ..figures import bar_chart
from ..inputs import select_correct
from ..interpreters import build_interpreter
from ..io import OutputGuard, Undescribable, atomic_write_text, file_sha256, settings_digest, write_json
from ..presets import preset_of
from ..tables import markdown_table
from ..typed_config import check_names
from ..types import Count, Positive, PositiveCount, Radius
from .aid import AIDExperiment, AIDTrainingPlan
from .aid import _train as train_rts
from .aid import check as check_aid
from .common import ClassifierSpec, classifier_outputs, default_data, get_classifier, setup_data, write_outputs
from .config import ExperimentConfig, TrainerOptions, register_experiment
from .detector import DetectorOptions
from .robust import RobustExperiment, RobustModel, RobustTraining, eps_255, module_options
from .robust import _train as train_robust
from .robust import check as check_robust
from .runner import deep_merge

__all__ = ["run", "ScorecardExperiment", "ScorecardBattery", "RobustDefences", "DetectorDefence", "DEFENCES",
           "row_battery", "scorecard_table", "NOT_MEASURED", "model_settings", "finished_card"]

#: the literal of a cell whose figure the card does not hold
NOT_MEASURED = "not measured"
load_defences()  # the rows are the registered defences (defend.defences.DEFENCES), in defence_names() order


def _defence(row: str) -> Defence:
    return DEFENCES.build(row)


def _artifact_names() -> list[str]:
    """The defences with a trained artifact (what ``reuse:`` may name)."""
    return [n for n in defence_names() if _defence(n).artifact is not None]


Split = Literal["train", "val", "test"]


# --------------------------------------------------------------------------------------------- config
@dataclass
class ScorecardBattery:
    """The battery every row is scored with: ``name`` (``quick``, ``standard`` or a YAML file of
    ``configs/evaluate/``'s form) and dotted ``overrides`` (as ``defend evaluate --battery.KEY=VALUE``)."""

    name: str = "standard"
    overrides: dict[str, Any] = field(default_factory=dict)


def _robust_models() -> list[RobustModel]:
    """One entry per defence the ``robust`` family trains, with that defence's module options."""
    return [RobustModel(n, module=dict(_defence(n).module)) for n in defence_names() if _defence(n).trains == "robust"]


@dataclass
class RobustDefences:
    """The rows of the defences trained by the ``robust`` family (a RobustClassifierModule each): the entries of
    ``models`` named so (the ``robust`` experiment's :class:`~defend.experiments.robust.RobustModel`), each with
    ``training.module`` under its own ``module``, trained for ``max_epochs`` with ``trainer`` laid over the
    experiment's Trainer options."""

    training: RobustTraining = field(default_factory=RobustTraining)
    models: list[RobustModel] = field(default_factory=_robust_models)
    trainer: TrainerOptions = field(default_factory=dict)


@dataclass
class DetectorDefence:
    """The ``detector`` row: ``detector`` (the ``detector`` experiment's trunk / booster options) trained on the
    stacked maps of ``interpreters`` (+ their product channel when ``product``) of ``n_benign`` benign and the
    successful ones of ``n_adversarial`` inputs per target (each of ``attacks`` against each of
    ``target_interpreters``, options ``attack``), all correctly classified inputs of ``split`` (the training split:
    the card sets the FPR thresholds on the development split and measures on the test split), in batches of
    ``batch_size``; the training set is balanced (as many benign as successful adversarial inputs)."""

    interpreters: list[str] = field(default_factory=lambda: ["grad", "cam"])
    product: bool = False
    n_benign: PositiveCount = PositiveCount(200)
    n_adversarial: PositiveCount = PositiveCount(100)
    split: Split | list[Split] = "train"
    attacks: list[str] = field(default_factory=lambda: ["adv2", "advedge"])
    target_interpreters: list[str] = field(default_factory=lambda: ["cam", "grad"])
    batch_size: PositiveCount = PositiveCount(50)
    attack: AttackOptions = field(default_factory=lambda: AttackOptions(eps=Radius("8/255")))
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    min_adversarial: Count = Count(4)


@dataclass
class ScorecardExperiment(ExperimentConfig):
    """Every defence trained (or reused) and scored by the same ``defend evaluate`` battery (module docstring)."""

    data: BaseDataModule | None = None
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    defences: list[str] = field(default_factory=defence_names)
    reuse: dict[str, str] = field(default_factory=dict)
    battery: ScorecardBattery = field(default_factory=ScorecardBattery)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    beta: Positive = Positive(2.0)
    robust: RobustDefences = field(default_factory=RobustDefences)
    aid: AIDTrainingPlan = field(default_factory=AIDTrainingPlan)
    detector: DetectorDefence = field(default_factory=DetectorDefence)


# --------------------------------------------------------------------------------------------- batteries
def _dotted(prefix: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (a row's overrides may be written nested or dotted)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_dotted(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def row_battery(cfg: ScorecardExperiment, row: str) -> tuple[Battery, dict[str, Any]]:
    """The battery of one row: ``battery`` (name + overrides), what the row's defence needs, then ``rows.<row>``;
    returns it and the overrides laid over the named battery."""
    over = _dotted("", dict(cfg.battery.overrides)) if cfg.battery.overrides else {}
    base, _ = load_battery(cfg.battery.name, over)
    need = _defence(row).battery(base, {"beta": cfg.beta, "detector_interpreters": cfg.detector.interpreters,
                                        "detector_product": cfg.detector.product})
    extra = _dotted("", dict(cfg.rows.get(row) or {})) if cfg.rows.get(row) else {}
    overrides = {**over, **need, **extra}
    battery, _ = load_battery(cfg.battery.name, overrides)
    return battery, overrides


# --------------------------------------------------------------------------------------------- checks / outputs
def _family(cfg: ScorecardExperiment, family: str) -> list[str]:
    """The rows asked for whose defence the training ``family`` trains."""
    return [d for d in cfg.defences if _defence(d).trains == family]


def _robust_cfg(cfg: ScorecardExperiment) -> RobustExperiment:
    models = [m for m in cfg.robust.models if m.name in cfg.defences]
    return RobustExperiment(seed=cfg.seed, threads=cfg.threads, trainer=deep_merge(cfg.trainer, cfg.robust.trainer),
                            output_dir=cfg.output_dir, data=default_data(cfg), training=cfg.robust.training,
                            models=models)


def _aid_cfg(cfg: ScorecardExperiment) -> AIDExperiment:
    """The ``aid`` experiment's config of the RTS rows (its plan without the noise run, which that experiment does not
    train: :func:`check` checks it, :func:`_fits` trains it)."""
    return AIDExperiment(seed=cfg.seed, threads=cfg.threads, trainer=cfg.trainer, output_dir=cfg.output_dir,
                         data=default_data(cfg), classifier=cfg.classifier,
                         training=dataclasses.replace(cfg.aid, noise=None))


def _reused(cfg: ScorecardExperiment, name: str) -> Path | None:
    """The configured artifact to reuse for ``name``, when it exists."""
    path = cfg.reuse.get(name)
    if not path:
        return None
    p, kind = Path(path), _defence(name).artifact
    return p if kind is not None and kind.present(p) else None


def _check_battery_fits(battery: Battery, dm: BaseDataModule) -> None:
    """What ``defend evaluate``'s preflight would refuse about the data once every model is trained: more attacked
    inputs than the test split holds (said here, before any training)."""
    dm.setup("test")
    n_test = len(dm.test_dataset)
    if int(battery.n_images) > n_test:
        raise ValueError(f"n_images ({battery.n_images}) exceeds the {n_test} test inputs of the data; lower n_images")


def check(cfg: ScorecardExperiment) -> None:
    """Before anything trains: the rows, the reused artifacts' names, every row's battery, and the training sections
    of the rows asked for (with the robust and aid experiments' own checks)."""
    check_names(list(cfg.defences), DEFENCES, "defences")
    check_names(list(cfg.detector.attacks), interpretation_attacks(), "detector.attacks", "interpretation attack")
    dup = sorted({d for d in cfg.defences if cfg.defences.count(d) > 1})
    if dup:
        raise ValueError(f"defences lists {', '.join(dup)} more than once")
    for key in cfg.reuse:
        check_names([key], _artifact_names(), "reuse")
    for key in cfg.rows:
        check_names([key], DEFENCES, "rows")
    dm = default_data(cfg)
    for row in cfg.defences:
        try:
            _check_battery_fits(row_battery(cfg, row)[0], dm)
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"battery of row {row}: {exc}") from None
    cfg.classifier.check(dm)
    robust = _family(cfg, "robust")
    for name in robust:
        model = next((m for m in cfg.robust.models if m.name == name), None)
        if model is None:
            raise ValueError(f"defences lists {name} but robust.models has no entry named {name} "
                             "(e.g. {name: " + name + ", module: {" + ", ".join(f"{k}: {v}" for k, v in _defence(name).module.items())
                             + "}})")
    if any(_reused(cfg, n) is None for n in robust):
        check_robust(_robust_cfg(cfg))
    for name in _family(cfg, "aid"):
        if getattr(cfg.aid, _defence(name).module["plan"]) is None:
            raise ValueError(f"defences lists {name} but aid.{_defence(name).module['plan']} is null: set it (e.g. "
                             "{init: rts, max_epochs: 1, module: {aid: {weight: 1.0, every: 1, mode: joint, "
                             "noise_sigma: 0.25}}})")
    if any(_reused(cfg, d) is None for d in _family(cfg, "aid")):
        check_aid(_aid_cfg(cfg))
        cfg.aid.check_noise(cfg.classifier)
    if _family(cfg, "detector"):
        d = cfg.detector
        check_names(list(d.interpreters), INTERPRETERS, "detector.interpreters")
        check_names(list(d.target_interpreters), INTERPRETERS, "detector.target_interpreters")
        if "rts" in d.interpreters:
            raise ValueError("detector.interpreters: the scorecard's detector row reads maps of the classifier's "
                             "own interpreters (no RTS network is given to it); use e.g. [grad, cam]")
        splits = [d.split] if isinstance(d.split, str) else list(d.split)
        if any(s != "train" for s in splits):
            raise ValueError(f"detector.split {d.split}: the detector trains on the training split only (the card sets "
                             "its FPR thresholds on the development split and reports on the test split); use train")


def _artifacts(cfg: ScorecardExperiment, out: Path) -> dict[str, Path]:
    """Where each trained artifact of the rows asked for lives (reused or ``<out>/models/``)."""
    need = {d for d in cfg.defences if _defence(d).artifact is not None}
    start = _aid_start(cfg)
    if start is not None and any(cfg.aid.init_of(_defence(d).module["plan"]) for d in need & set(_family(cfg, "aid"))):
        need.add(start)
    paths = {}
    for name in (n for n in defence_names() if n in need):  # row order: an artifact after the one it starts from
        paths[name] = _reused(cfg, name) or _defence(name).artifact.path(out / "models", name)
    return paths


def _aid_start(cfg: ScorecardExperiment) -> str | None:
    """The defence whose RTS network the fine-tuned ones (AID, noise) start from: that of the plan's ``rts`` part."""
    return next((n for n in defence_names() if _defence(n).trains == "aid" and _defence(n).module.get("plan") == "rts"),
                None)


def outputs(cfg: ScorecardExperiment, out: Path) -> list[Path]:
    """The table's CSV and chart, every trained artifact not reused, the classifier (when trained) and every file
    each row's evaluation may write under ``cards/<row>/``."""
    files = [out / "scorecard.csv", out / "scorecard.png", out / "data.yaml", *classifier_outputs(cfg, out)]
    for name, path in _artifacts(cfg, out).items():
        if _reused(cfg, name) is None:
            files += [*_artifact_files(name, path), _record_path(path)]
    for row in cfg.defences:
        battery, _ = row_battery(cfg, row)
        role = _defence(row).role
        det = list(cfg.detector.interpreters) if role == "detector" else None
        files += card_files(out / "cards" / row, battery, rts=role == "rts", detector=det)
    return files + [out / "bench" / name for name in BENCH_OUTPUTS]


# --------------------------------------------------------------------------------------------- resume
def _record_path(path: Path) -> Path:
    """The record of a trained artifact: ``models/<name>.settings.json`` (beside the file, or the detector folder)."""
    return path.with_name(f"{path.stem if path.suffix == '.pt' else path.name}.settings.json")


def _artifact_files(name: str, path: Path) -> list[Path]:
    """Every file the save of defence ``name``'s artifact at ``path`` may write (from its artifact kind, which the
    code that writes them defines)."""
    return _defence(name).artifact.files(path)


def model_settings(cfg: ScorecardExperiment, name: str, clf_path: str, init: str | None = None) -> str | None:
    """The digest of everything that decides how artifact ``name`` is trained: its section of the config, the Trainer
    options, seed, data, the classifier's bytes (and the RTS it starts from); ``None`` when undescribable."""
    section: Any = getattr(cfg, str(_defence(name).trains))
    try:
        return settings_digest({"artifact": name, "seed": int(cfg.seed), "trainer": cfg.trainer, "section": section,
                                "data": _data_spec(cfg), "classifier": file_sha256(clf_path),
                                "init": file_sha256(init) if init else None})
    except (Undescribable, OSError):
        return None


def _reusable_model(out: Path, name: str, path: Path, digest: str | None) -> bool:
    """Whether the artifact of ``name`` at ``path`` was trained here with settings ``digest`` and is unchanged since
    (its record lists every file of it there is)."""
    if digest is None:
        return False
    guard = OutputGuard(out)
    try:
        rec = json.loads(_record_path(path).read_text())
        files = {out / k: v for k, v in rec["files"].items()}
        ok = rec["settings"] == digest and guard.owns(_record_path(path)) and \
            set(files) == {f for f in _artifact_files(name, path) if f.is_file()}
        return ok and all(guard.owns(f) and file_sha256(f) == sha for f, sha in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _record_model(out: Path, name: str, path: Path, digest: str | None) -> None:
    """Write the record that lets a later run into ``out`` reuse this freshly trained artifact (every file of it the
    save wrote)."""
    if digest is not None:
        write_json(_record_path(path), {"settings": digest, "files": {f.relative_to(out).as_posix(): file_sha256(f)
                                                                      for f in _artifact_files(name, path)
                                                                      if f.is_file()}})


def _card_files(card: dict[str, Any]) -> list[str]:
    """The files a card names (``files``: report, tables, figures, adversarial sets), relative to its folder."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(card.get("files"))
    return found


def _sha(path: str | None, name: str = "") -> str | None:
    return None if path is None else file_sha256(Path(path) / name if name else path)


def finished_card(out: Path, row: str, battery_yaml: str, data: dict[str, Any], clf: str, rts: str | None,
                  det: str | None) -> dict[str, Any] | None:
    """The card an earlier run finished for ``row``, when it can stand for this run's: valid, made with this
    battery, data and system (the sha256 of the classifier, RTS network and detector), and every file of it the
    output manifest's, unedited; else ``None``."""
    folder, guard = out / "cards" / row, OutputGuard(out)
    try:
        card = json.loads((folder / "card.json").read_text())
        validate_card(card)
        system = card["system"]
        same = (card["mode"] == "evaluate" and card["battery"] == yaml.safe_load(battery_yaml)
                and card["data"]["spec"] == data and system["classifier"]["sha256"] == _sha(clf)
                and (system["rts"] or {}).get("sha256") == _sha(rts)
                and (system["detector"] or {}).get("sha256") == _sha(det, DETECTOR_INDEX))
        files = [folder / f for f in ("card.json", "battery.yaml", *_card_files(card))]
        return card if same and all(guard.owns(f) for f in files) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------- training
def _train_artifacts(cfg: ScorecardExperiment, dm: BaseDataModule, model: Any, clf_path: str, out: Path,
                     progress: bool) -> dict[str, dict[str, Any]]:
    """Train (or reuse) every artifact the rows need; returns ``{name: {path, trained, seconds}}``."""
    paths = _artifacts(cfg, out)
    info: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        if _reused(cfg, name) is not None:
            info[name] = {"path": str(path), "trained": False, "seconds": 0.0}
    start = _aid_start(cfg)
    init = str(paths[start]) if start in paths else None
    fits = _fits(cfg, dm, model, clf_path, out, paths, init, progress)
    for name, path in paths.items():  # row order: the RTS an AID-trained one starts from first
        if name in info:
            continue
        d = _defence(name)
        starts = init if d.trains == "aid" and cfg.aid.init_of(d.module["plan"]) else None
        digest = model_settings(cfg, name, clf_path, starts)
        if _reusable_model(out, name, path, digest):
            print(f"[scorecard] reusing {path}: trained by an earlier run with the same settings "
                  "(settings digest and sha256 verified)", flush=True)
            info[name] = {"path": str(path), "trained": False, "seconds": 0.0, "resumed": True}
            continue
        info[name] = {"path": str(path), "trained": True, **fits[str(d.trains)](name)}
        _record_model(out, name, path, digest)
    return info


def _fits(cfg: ScorecardExperiment, dm: BaseDataModule, model: Any, clf_path: str, out: Path,
          paths: dict[str, Path], init: str | None, progress: bool) -> dict[str, Any]:
    """``{training family: train(name) -> info}``: how each family of the scorecard's config sections (``robust``,
    ``aid``, ``detector``) trains the artifact of defence ``name`` into ``paths[name]``."""
    robust, aid_cfg, plan = _robust_cfg(cfg), _aid_cfg(cfg), cfg.aid

    def fit_robust(name: str) -> dict[str, Any]:
        m = next(m for m in robust.models if m.name == name)
        return _robust_info(train_robust(robust, m, dm, out / "models", progress))

    def fit_aid(name: str) -> dict[str, Any]:
        part = _defence(name).module["plan"]
        res = train_rts(aid_cfg, getattr(plan, part), plan.options(part), clf_path, dm,
                        init if plan.init_of(part) else None, paths[name], progress)
        return _rts_info(res, name, progress)

    return {"robust": fit_robust, "aid": fit_aid,
            "detector": lambda name: _train_detector(cfg, dm, model, paths[name], progress)}


def _robust_info(res: dict[str, Any]) -> dict[str, Any]:
    return {"seconds": res["train_seconds"], "mode": res["mode"]}


def _rts_info(res: dict[str, Any], name: str, progress: bool) -> dict[str, Any]:
    if progress:
        print(f"[scorecard] trained the RTS network of {name}", flush=True)
    return {"seconds": res["train_seconds"], **({"aid_steps": res["aid_steps"]} if "aid_steps" in res else {})}


def _train_detector(cfg: ScorecardExperiment, dm: BaseDataModule, model: Any, path: Path,
                    progress: bool) -> dict[str, Any]:
    """Benign and adversarial maps of inputs of ``detector.split``, one DetectorModule on them, saved at ``path``."""
    d, seed = cfg.detector, int(cfg.seed)
    start = time.perf_counter()
    n_sets = len(d.attacks) * len(d.target_interpreters)
    pool = select_correct(model, dm, int(d.n_benign) + int(d.n_adversarial) * n_sets, split=d.split)
    x, y = pool["image"], pool["label"]
    nb, na = int(d.n_benign), int(d.n_adversarial)
    if x.shape[0] < nb + na * n_sets:
        raise ValueError(f"detector: only {x.shape[0]} correctly classified inputs in split {d.split}; need "
                         f"n_benign + n_adversarial x {n_sets} sets = {nb + na * n_sets} (add a split: [val, train])")
    interps = {n: build_interpreter(n) for n in d.interpreters}
    kw = {"batch_size": int(d.batch_size), "cache_dir": None, "progress": progress}
    parts = [build_detection_data(model, interps, benign=x[:nb], desc="detector: benign maps", **kw)]
    gen = torch.Generator().manual_seed(seed)
    k = nb
    for attack in d.attacks:
        for target in d.target_interpreters:
            src = x[k:k + na]
            k += na
            atk = build_attack(attack, "pgd", target, seed=seed, **layered_options("pgd", d.attack))
            adv = build_detection_data(model, interps, source=src, target=random_targets(y[k - na:k], dm.num_classes,
                                                                                         gen),
                                       attack=atk, desc=f"detector: {attack} vs {target}", **kw)
            parts.append(select(adv, adv["success"].bool().nonzero().flatten()))
    n_adv = sum(int(p["label"].shape[0]) for p in parts[1:])
    if n_adv < int(d.min_adversarial):
        raise ValueError(f"detector: only {n_adv} successful adversarial training inputs (need "
                         f">= {int(d.min_adversarial)}); raise detector.n_adversarial or the attack's steps")
    maps, labels = _balanced([stack_maps(p["maps"], d.interpreters, d.product) for p in parts],
                             [p["label"] for p in parts])
    nb, n_adv = int((labels == 0).sum()), int((labels == 1).sum())
    o = d.detector
    det, times = train_detector(maps, labels, epochs=int(o.epochs), batch_size=int(o.batch_size),
                                trainable=o.trainable, pretrained=o.pretrained, lr=float(o.lr), booster=o.booster,
                                seed=seed, progress=progress, trainer_options=o.trainer,
                                feature_stages=o.feature_stages)
    det.save(path, list(d.interpreters), bool(d.product))
    return {"path": str(path), "trained": True, "seconds": time.perf_counter() - start, "n_benign": nb,
            "n_adversarial": n_adv, **times}


def _balanced(maps: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The benign part (first) and the adversarial parts, cut to as many adversarial inputs as benign ones or the
    reverse (the first of each): a balanced training set."""
    benign, adv = maps[0], torch.cat(maps[1:])
    m = min(benign.shape[0], adv.shape[0])
    return torch.cat([benign[:m], adv[:m]]), torch.cat([labels[0][:m], torch.cat(labels[1:])[:m]])


# --------------------------------------------------------------------------------------------- the table
def _base(attack: str) -> str:
    """The interpretation attack an adaptive attack builds on (``adv2_ensemble`` -> ``adv2``)."""
    if attack.endswith("_ensemble"):
        return attack[: -len("_ensemble")]
    return "adv2" if attack in ("adaptive_rts", "adaptive_detector") else attack


def _lines(row: str, card: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, interpreter)`` of each line of one row: the interpreters whose maps the row reports (for the
    detector: the interpreter each non-adaptive set was crafted against)."""
    d = _defence(row)
    attacked = list(d.interpreters or card["battery"]["attacks"]["interpreters"])
    if d.detects:
        reads = "+".join(n.upper() for n in card["results"]["detection"]["interpreters"]) \
            if card["results"].get("detection") else "?"
        return [(f"{row} ({reads}) · vs {n.upper()}", n) for n in attacked]
    return [(f"{row} · {n.upper()}", n) for n in attacked]


def _interp_cell(card: dict[str, Any], attack: str, interp: str, adaptive: bool) -> dict[str, Any] | None:
    rows = card["results"]["attacks"]
    if not adaptive:
        hit = [r for r in rows if r["attack"] == attack and r["kind"] == "standard" and r["interpreter"] == interp
               and r["read_by"] == interp]
    else:  # the strongest adaptive attack on this interpreter's maps (highest success, then IoU)
        hit = sorted((r for r in rows if r["kind"] == "adaptive" and _base(r["attack"]) == attack
                      and r["read_by"] == interp), key=lambda r: (r["asr"] or 0, r["iou"] or 0), reverse=True)
    if not hit or hit[0].get("asr") is None or hit[0].get("iou") is None:
        return None
    r = hit[0]
    return {"asr": float(r["asr"]), "iou": float(r["iou"]), "l1": r.get("l1"), "run": r["attack"],
            "n": int(r["n"]), "budget": r["budget"], "budget_preset": _preset(r), **{k: r.get(k) for k in _CI},
            "per_input": r.get("per_input") or {}}


#: the interval fields a cell carries from its card row
_CI = ("asr_ci_low", "asr_ci_high", "iou_ci_low", "iou_ci_high", "evasion_rate_ci_low", "evasion_rate_ci_high",
       "detection_rate_fpr5_ci_low", "detection_rate_fpr5_ci_high", "detection_rate_default_ci_low",
       "detection_rate_default_ci_high")


def _detector_cell(card: dict[str, Any], attack: str, interp: str, adaptive: bool) -> dict[str, Any] | None:
    det = card["results"].get("detection")
    if not det:
        return None
    if not adaptive:
        hit = [r for r in det["rows"] if r["attack"] == attack and r["kind"] == "standard" and r["interpreter"] == interp]
    else:  # the strongest adaptive attack on the detector (highest evasion)
        hit = sorted((r for r in det["rows"] if r["kind"] == "adaptive" and _base(r["attack"]) == attack),
                     key=lambda r: -(r["evasion_rate"] or 0.0))
    if not hit or hit[0].get("evasion_rate") is None:
        return None
    r = hit[0]
    num = lambda v: None if v is None else float(v)  # noqa: E731  (a threshold without enough benign inputs: None)
    return {"dr1": num(r["detection_rate_fpr1"]), "dr5": num(r["detection_rate_fpr5"]),
            "dr_default": num(r["detection_rate_default"]), "evasion": float(r["evasion_rate"]), "run": r["attack"],
            "n": int(r["n"]), "n_adversarial": int(r["n_adversarial"]), "budget": r["budget"],
            "budget_preset": _preset(r), **{k: r.get(k) for k in _CI}, "per_input": r.get("per_input") or {}}


def _preset(r: dict[str, Any]) -> str:
    """The ADV2 budget preset a card row ran (its ``budget_preset``; a detection row has none: read from its
    interpreter and budget by :func:`defend.presets.preset_of`)."""
    return r.get("budget_preset") or preset_of(r["interpreter"], r["budget"])


def _frac(v: float) -> str:
    e = eps_255(v)
    return f"{e}/255" if isinstance(e, int) else f"{v:.4g}"


def _columns(cards: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's columns: clean accuracy, AutoAttack at each radius of any card, each attack and its adaptive
    counterpart; each names its attack, budget and n (from the cards)."""
    any_card = next(iter(cards.values()))
    cols: list[dict[str, Any]] = [{"key": "clean", "kind": "clean", "title": "clean accuracy"}]
    eps = sorted({float(a["eps"]) for c in cards.values() for a in c["results"]["autoattack"]})
    eps = eps or [float(e) for e in next((c["battery"]["autoattack"]["eps"] for c in cards.values()), [])]
    for e in eps:
        cols.append({"key": f"autoattack_{_frac(e)}", "kind": "autoattack", "eps": e,
                     "title": "AutoAttack robust acc."})
    for attack in any_card["battery"]["attacks"]["attacks"]:
        cols.append({"key": attack, "kind": "attack", "attack": attack, "adaptive": False, "title": attack.upper()})
        cols.append({"key": f"{attack}_adaptive", "kind": "attack", "attack": attack, "adaptive": True,
                     "title": f"{attack.upper()} adaptive"})
    return cols


def _budget_text(cells: list[dict[str, Any]]) -> str:
    """The budgets and n of a column's measured cells (distinct values joined by 'or')."""
    texts = []
    for c in cells:
        b = c.get("budget") or {}
        t = f"eps {_frac(float(b['eps']))}" if b.get("eps") is not None else ""
        if b.get("steps") is not None:
            t += f", {int(b.get('warm_steps') or 0)}+{int(b['steps'])} steps"
        if (b.get("restarts") or 1) > 1:
            t += f" x {int(b['restarts'])} restarts"
        if c.get("budget_preset"):
            t += f", {c['budget_preset']} budget"
        t = f"{t}, n={c['n']}" if t else f"n={c['n']}"
        if t not in texts:
            texts.append(t)
    return " or ".join(texts) if texts else NOT_MEASURED


def scorecard_table(cards: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]], list[dict[str, Any]],
                                                                list[dict[str, Any]]]:
    """From the rows' cards: the headers and cells of the table (one line per row x reported interpreter), the
    flat ``metrics.json`` rows (one per line x column) and the lines' details (for the verdicts and the chart)."""
    cols = _columns(cards)
    lines: list[dict[str, Any]] = []
    for row, card in cards.items():
        for label, interp in _lines(row, card):
            cells: dict[str, Any] = {}
            res = card["results"]
            for col in cols:
                if col["kind"] == "clean":
                    ca = res["clean_accuracy"]
                    cells[col["key"]] = {"value": float(ca["value"]), "value_ci_low": ca.get("value_ci_low"),
                                         "value_ci_high": ca.get("value_ci_high"), "n": int(ca["n"]), "budget": None}
                elif col["kind"] == "autoattack":
                    aa = next((a for a in res["autoattack"] if abs(float(a["eps"]) - col["eps"]) < 1e-9), None)
                    cells[col["key"]] = None if aa is None else {
                        "value": float(aa["robust_accuracy"]), "value_ci_low": aa.get("robust_accuracy_ci_low"),
                        "value_ci_high": aa.get("robust_accuracy_ci_high"), "n": int(aa["n"]), "budget": aa["budget"]}
                else:
                    pick = _detector_cell if _defence(row).detects else _interp_cell
                    cells[col["key"]] = pick(card, col["attack"], interp, col["adaptive"])
            lines.append({"row": row, "label": label, "interpreter": interp, "cells": cells,
                          "detects": _defence(row).detects})
    headers = ["defence · interpreter"]
    for col in cols:
        measured = [ln["cells"][col["key"]] for ln in lines if ln["cells"][col["key"]] is not None]
        headers.append(f"{col['title']} ({_budget_text(measured)})")
    body, metrics = [], []
    for ln in lines:
        out = [ln["label"]]
        for col in cols:
            c = ln["cells"][col["key"]]
            out.append(_cell_text(ln["detects"], col, c))
            metrics.append(_metric_row(ln, col, c))
        body.append(out)
    return headers, body, metrics, lines


def _ci_text(c: dict[str, Any], key: str, field: str | None = None, digits: int = 2) -> str:
    """A cell's figure with its 95 % interval."""
    field = field or key
    return stats.format_value(c.get(key), c.get(f"{field}_ci_low"), c.get(f"{field}_ci_high"), digits=digits)


def _cell_text(detects: bool, col: dict[str, Any], c: dict[str, Any] | None) -> str:
    if c is None:
        return NOT_MEASURED
    if col["kind"] in ("clean", "autoattack"):
        return _ci_text(c, "value", digits=3)
    run = f" ({c['run']})" if col.get("adaptive") else ""
    if detects:
        dr = (f"DR@5% {_ci_text(c, 'dr5', 'detection_rate_fpr5')}" if c["dr5"] is not None
              else f"DR@0.5 {_ci_text(c, 'dr_default', 'detection_rate_default')}")
        return f"{dr} · evades {_ci_text(c, 'evasion', 'evasion_rate')}{run}"
    return f"ASR {_ci_text(c, 'asr')} · IoU {_ci_text(c, 'iou')}{run}"


def _metric_row(ln: dict[str, Any], col: dict[str, Any], c: dict[str, Any] | None) -> dict[str, Any]:
    row = {"defence": ln["row"], "line": ln["label"], "interpreter": ln["interpreter"], "column": col["key"],
           "split": "test",
           "attack": col.get("attack", col["kind"]), "kind": "adaptive" if col.get("adaptive") else "non-adaptive",
           "status": "measured" if c is not None else NOT_MEASURED}
    if c is None:
        return row
    b = c.get("budget") or {}
    row.update({"n": c["n"], "eps": b.get("eps"), "warm_steps": b.get("warm_steps"), "steps": b.get("steps"),
                "restarts": b.get("restarts"), "budget_preset": c.get("budget_preset"),
                "run": c.get("run", col.get("attack", col["kind"]))})
    for k in ("value", "asr", "iou", "l1", "dr1", "dr5", "dr_default", "evasion", "n_adversarial", "value_ci_low",
              "value_ci_high", *_CI):
        if k in c:
            row[k] = c[k]
    return row


def _paired(a: dict[str, Any], b: dict[str, Any], key: str, seed: int, proportion: bool) -> stats.PairedTest | None:
    """The paired test of an adaptive cell ``b`` against the non-adaptive ``a`` on the same inputs (McNemar for 0 / 1
    outcomes, a paired bootstrap otherwise); ``None`` without per-input values of both."""
    x, y = (a.get("per_input") or {}).get(key), (b.get("per_input") or {}).get(key)
    if not x or not y or len(x) != len(y):
        return None
    return stats.mcnemar(y, x, seed) if proportion else stats.paired_bootstrap(y, x, seed)


def _test_text(name: str, t: stats.PairedTest | None) -> str:
    """One paired test as the verdict names it: within noise, or significant and in which direction."""
    if t is None:
        return f"{name}: no paired test"
    if not t.significant:
        return f"{name} within noise (p = {t.p_value:.2g})"
    return f"{name} {'higher' if t.difference.value > 0 else 'lower'} (p = {t.p_value:.2g})"


def _verdict(ln: dict[str, Any], cols: list[dict[str, Any]], seed: int = 0) -> str:
    """Whether the adaptive attacks did better than the non-adaptive ones on this line, by paired tests on the same
    inputs (the rule is stated in the report), naming the figures."""
    gains, holds = [], []
    for col in cols:
        if col["kind"] != "attack" or col["adaptive"]:
            continue
        a, b = ln["cells"][col["key"]], ln["cells"][f"{col['key']}_adaptive"]
        if a is None or b is None:
            continue
        if ln["detects"]:
            tests = [("evasion", _paired(a, b, "evasion", seed, True), True)]
            text = (f"{col['attack'].upper()}: evasion {a['evasion']:.2f} -> {b['evasion']:.2f} ({b['run']})")
        else:
            tests = [("ASR", _paired(a, b, "asr", seed, True), True), ("IoU", _paired(a, b, "iou", seed, False), True)]
            text = (f"{col['attack'].upper()}: ASR {a['asr']:.2f} -> {b['asr']:.2f}, IoU {a['iou']:.2f} -> "
                    f"{b['iou']:.2f} ({b['run']})")
        won = [f"{name} p = {t.p_value:.2g}" for name, t, up in tests
               if t is not None and t.significant and (t.difference.value > 0) == up]
        noted = "; ".join(_test_text(name, t) for name, t, _ in tests) or "no paired test"
        (gains if won else holds).append(f"{text}, {', '.join(won) if won else noted}")
    if not gains and not holds:
        return "no adaptive figure was measured for this line."
    if gains:
        return ("**loses under the adaptive attack**: " + "; ".join(gains)
                + (f" (no significant gain: {'; '.join(holds)})" if holds else "") + ".")
    return "no adaptive attack did significantly better than the non-adaptive one: " + "; ".join(holds) + "."


# --------------------------------------------------------------------------------------------- run
@register_experiment("scorecard", ScorecardExperiment, outputs=outputs, check=check)
def run(cfg: ScorecardExperiment, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    start = time.perf_counter()
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    clf_path = str(info["checkpoint"])
    art = _train_artifacts(cfg, dm, model, clf_path, out, progress)
    data = _data_file(cfg, out)
    cards: dict[str, dict[str, Any]] = {}
    eval_seconds: dict[str, float] = {}
    for row in cfg.defences:
        _, overrides = row_battery(cfg, row)
        role = _defence(row).role if row in art else "none"  # where the row's own artifact plugs in
        clf = art[row]["path"] if role == "classifier" else clf_path
        rts = art[row]["path"] if role == "rts" else None
        det = art[row]["path"] if role == "detector" else None
        t = time.perf_counter()
        done = finished_card(out, row, load_battery(cfg.battery.name, overrides)[1], _data_spec(cfg), clf, rts, det)
        if done is not None:
            print(f"[scorecard] reusing {out / 'cards' / row / 'card.json'}: finished by an earlier run with the same "
                  "battery, data and system (files verified against the manifest)", flush=True)
            cards[row] = done
        else:
            if progress:
                print(f"[scorecard] evaluating {row}", flush=True)
            cards[row] = evaluate.evaluate_system(clf, out / "cards" / row, rts=rts, detector=det, data=data,
                                                  battery=cfg.battery.name, overrides=overrides, progress=progress,
                                                  argv=["defend", "experiment", "scorecard", row], name=row,
                                                  defence=row)
        eval_seconds[row] = time.perf_counter() - t
    headers, body, metrics, lines = scorecard_table(cards)
    _write_csv(out / "scorecard.csv", headers, body)
    _chart(out / "scorecard.png", lines, _columns(cards))
    ranked, _ = bench([out / "cards" / row / "card.json" for row in cards], out / "bench", overwrite=True)
    total = time.perf_counter() - start
    text = _report(cfg, clf_path, info, art, cards, headers, body, lines, eval_seconds, total)
    write_outputs(out, metrics, text + _bench_section(cards, ranked))
    return metrics


def _data_file(cfg: ScorecardExperiment, out: Path) -> str:
    """The experiment's data module as a ``--data`` file of ``defend evaluate`` (``<out>/data.yaml``), so every row
    is measured on exactly the data the defences were trained on."""
    path = out / "data.yaml"
    atomic_write_text(path, yaml.safe_dump({"data": _data_spec(cfg)}, sort_keys=False))
    return str(path)


def _data_spec(cfg: ScorecardExperiment) -> dict[str, Any]:
    """The experiment's data module as ``{"class_path", "init_args"}`` (plain YAML values)."""
    dm = default_data(cfg)
    init = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(getattr(dm, "hparams", {}) or {}).items()}
    spec = {"class_path": f"{type(dm).__module__}.{type(dm).__name__}", "init_args": init}
    return yaml.safe_load(yaml.safe_dump(spec))


def _write_csv(path: Path, headers: list[str], body: list[list[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    w.writerows(body)
    atomic_write_text(path, buf.getvalue())


def _chart(path: Path, lines: list[dict[str, Any]], cols: list[dict[str, Any]]) -> None:
    """Attack success against each line's system: ASR (the detector: evasion rate), non-adaptive and adaptive."""
    series: dict[str, list[float | None]] = {}
    for col in cols:
        if col["kind"] != "attack":
            continue
        vals = []
        for ln in lines:
            c = ln["cells"][col["key"]]
            vals.append(None if c is None else c["evasion"] if ln["detects"] else c["asr"])
        series[col["title"]] = vals
    bar_chart(path, [ln["label"] for ln in lines], series, "attack success (ASR; detector: evasion rate)",
              "Scorecard: success of each attack against each defended system (missing bar: not measured)")


def _report(cfg: ScorecardExperiment, clf_path: str, info: dict[str, Any], art: dict[str, dict[str, Any]],
            cards: dict[str, dict[str, Any]], headers: list[str], body: list[list[str]],
            lines: list[dict[str, Any]], eval_seconds: dict[str, float], total: float) -> str:
    cols = _columns(cards)
    any_card = next(iter(cards.values()))
    b = any_card["battery"]
    out = ["# Scorecard: every defence, the same battery", "",
           f"Data `{any_card['data']['name']}` (test split; {any_card['data']['n_attack_inputs']} correctly "
           f"classified test inputs attacked per row, a seeded random target class each); battery "
           f"`{cfg.battery.name}`" + (f" with overrides {dict(cfg.battery.overrides)}" if cfg.battery.overrides else "")
           + f", seed {b['seed']}. Every figure is read from the row's model card `cards/<row>/card.json` "
           "(`defend evaluate`); the column headers give each attack's budget (L-inf eps in image units, warm-start + "
           "joint steps), which ADV2 budget it ran (`paper`: the official ADV2 scripts' budgets, `cpu`: our "
           "scaled-down CPU budget, `custom`: neither; `budget_preset` in metrics.json) and n.", "",
           markdown_table(headers, body), "",
           "How to read a cell: **ASR** = share of the attacked inputs classified as the target class; **IoU** = "
           "top-k IoU of the interpreter's map of the adversarial input with its benign map (high: the map still "
           "looks benign, the attack fooled the interpreter too; low: the map gives the attack away). Detector lines: "
           "**DR** = share of the successful adversarial inputs the detector flags at the threshold giving 5 % false "
           "positives on benign development inputs (at its own threshold 0.5 where there are fewer than the 200 "
           "benign inputs a 5 % threshold needs); **evades** = share of all attacked inputs that reach the target "
           "and are not flagged at the detector's own threshold. An *adaptive* cell is the strongest adaptive attack "
           "the battery ran against that line (named in brackets): the ensemble attack on all the row's "
           "interpreters at once, `adaptive_rts` (restarts, heavier encoder term) for RTS, the detector-aware ADV2 "
           "(`adaptive_detector`, the detector's differentiable score in the loss) for the detector. "
           f"\"{NOT_MEASURED}\": the battery ran no such attack for that row (no number is made up).", "",
           "A line *loses under the adaptive attack* when, on the same inputs and targets, an adaptive attack raises "
           "the ASR (McNemar's exact test) or the IoU (paired bootstrap) with p < 0.05; a detector line, when it "
           "raises the evasion rate (McNemar). Otherwise the difference is within noise. Every figure: value [95 % "
           "interval] (Wilson for rates, bootstrap over inputs for IoU); fewer than 100 inputs: indicative only.", "",
           "## The rows", ""]
    for row in cards:
        desc = _defence(row).description.format(split=cfg.detector.split)
        if _defence(row).trains == "robust":
            model = next(m for m in cfg.robust.models if m.name == row)
            opts = module_options(_robust_cfg(cfg), model)
            epochs = int(model.max_epochs or cfg.robust.training.max_epochs)
            desc += (f" Fine-tuned from `{opts['init_from']}`" if opts.get("init_from") else " Trained from scratch") \
                + f" for {epochs} epoch(s)" + (f" of at most {lim} batches" if (lim := _robust_cfg(cfg).trainer.get(
                    "limit_train_batches")) else "") + (" (a reused checkpoint)."
                                                        if not art.get(row, {}).get("trained", True) else ".")
        if _defence(row).trains == "detector":
            desc += f" {trunk_description(cfg.detector.detector.pretrained)}."
        out.append(f"- **{row}**: {desc}" + _row_note(row, cards[row], art.get(row), eval_seconds[row]))
        for ln in (x for x in lines if x["row"] == row):
            out.append(f"  - {ln['label']}: {_verdict(ln, cols, int(b['seed']))}")
    out += ["", "![attack success per defence](scorecard.png)", "",
            "## Artifacts", "",
            markdown_table(["artifact", "path", "trained here", "training s"],
                           [["classifier (normal)", clf_path, bool(info.get("trained")),
                             info.get("train_seconds", 0.0)]]
                           + [[k, v["path"], v["trained"], v["seconds"]] for k, v in art.items()]), "",
            f"Total time {total:.0f} s (evaluation: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in eval_seconds.items()) + ").", ""]
    return "\n".join(out)


def _bench_section(cards: dict[str, dict[str, Any]], ranked: list[Path]) -> str:
    """Where the leaderboard of the rows' cards is (``defend bench``) and under which protocol they were measured."""
    protocols = sorted({str(c["protocol"]["name"] or "custom protocol " + c["protocol"]["sha256"][:12])
                        for c in cards.values()})
    files = ", ".join(f"`bench/{p.name}`" for p in ranked)
    return ("\n## Leaderboard (IDLS-Bench)\n\n"
            f"Every row's card ranked by `defend bench` under protocol {', '.join(protocols)} (each defence's adapted "
            f"battery keys left out of the protocol hash, docs/bench.md): {files}.\n")


def _row_note(row: str, card: dict[str, Any], art: dict[str, Any] | None, seconds: float) -> str:
    note = _defence(row).note
    notes = note(card, art) if note is not None else []
    notes.append(f"evaluated in {seconds:.0f} s, card `cards/{row}/card.json`")
    return " (" + "; ".join(notes) + ")"
