"""Experiment ``robust``: interpretation-robust training vs normal and PGD adversarial training (AdvEdge Table VII,
Boopathy et al. ICML 2020).

Each model of ``models:`` is trained from the same seed with :class:`defend.robust.RobustClassifierModule`, then
evaluated for every eps of ``evaluation.eps`` (1/255 units) with :mod:`defend.robust_eval`:

* accuracy under untargeted PGD on the cross-entropy (``evaluation.pgd``: steps, step = eps * step_ratio, random
  start) on the first ``n_images`` test images, and under AutoAttack (standard version, the authors' code) on the first
  ``autoattack.n_images`` of them at the radii of ``autoattack.eps``, with PGD's accuracy on the same inputs beside it;
* interpretation robustness of ``interpretation.interpreter`` (CAM) on the first ``interpretation.n_images``: benign vs
  attacked maps under the top-k attack, the discrepancy attack and uniform noise of the same radius (Kendall's tau-b,
  Spearman's rho, top-k intersection, cosine, centre-of-mass shift), and captum-style max-sensitivity at that radius.

Every ``metrics.json`` row names its measure, attack, eps, steps / restarts, n and seed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from attacks.interpreters import get_interpreter

from ..autoattack import autoattack_accuracy
from ..classifier import save_classifier
from ..models import GapClassifier
from ..robust import RobustClassifierModule
from ..robust_eval import INTERPRETATION_ATTACKS, interpretation_robustness, pgd_accuracy, sensitivity
from .common import make_trainer, setup_data, take_split, write_outputs
from ..figures import line_plot
from .robust_report import report

__all__ = ["run", "validate", "EpochTimer", "evaluate_model", "DEFAULT_MODELS"]

DEFAULT_MODELS = [{"name": "normal", "mode": "normal"}, {"name": "pgd_at", "mode": "pgd_at"},
                  {"name": "int_adv", "mode": "int_adv"}]


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


def _eps_value(e: Any) -> int | float:
    return int(e) if float(e).is_integer() else float(e)


def _accuracy_rows(model: GapClassifier, x, y, e, ecfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    pcfg = dict(ecfg.get("pgd") or {})
    steps, ratio, bs = int(pcfg.get("steps", 20)), float(pcfg.get("step_ratio", 0.25)), int(ecfg.get("batch_size", 256))
    eps = float(e) / 255
    gen = torch.Generator(device=x.device).manual_seed(seed)
    correct = pgd_accuracy(model, x, y, eps, steps, eps * ratio, gen, bs)
    base = {"measure": "accuracy", "eps": _eps_value(e), "seed": seed}
    rows = [{**base, "attack": "clean" if eps == 0 else "pgd-ce", "steps": steps if eps else 0, "restarts": 1,
             "step": eps * ratio, "n": int(x.shape[0]), "accuracy": float(correct.float().mean())}]
    acfg = dict(ecfg.get("autoattack") or {})
    if eps > 0 and float(e) in [float(v) for v in acfg.get("eps", [])]:
        n = min(int(acfg.get("n_images", 64)), x.shape[0])
        start = time.perf_counter()
        aa = autoattack_accuracy(model, x[:n], y[:n], eps, seed=seed, batch_size=bs)
        rows.append({**base, "attack": "autoattack-" + str(aa.settings["version"]),
                     "steps": "apgd 100 / fab 100 / square 5000 queries", "restarts": 1, "n": n,
                     "accuracy": aa.accuracy, "pgd_accuracy_same_inputs": float(correct[:n].float().mean()),
                     "attacks": "+".join(aa.settings["attacks"]), "target_classes": aa.settings["target_classes"],
                     **{f"accuracy_after_{k}": v for k, v in aa.stages.items()},
                     "autoattack_flags": " | ".join(aa.flags) or "-", "seconds": time.perf_counter() - start})
    return rows


def _interpretation_rows(model: GapClassifier, x, e, ecfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    icfg = dict(ecfg.get("interpretation") or {})
    name = icfg.get("interpreter", "cam")
    interp = get_interpreter(name)
    xi = x[:int(icfg.get("n_images", 128))]
    ks = [int(k) for k in icfg.get("ks", [4, 8, 16])]
    eps = float(e) / 255
    rows = []
    for attack in icfg.get("attacks", list(INTERPRETATION_ATTACKS)):
        opts = dict(icfg.get(attack) or {})
        res = interpretation_robustness(model, interp, xi, eps, attack, options=opts, ks=ks, seed=seed,
                                        batch_size=int(ecfg.get("batch_size", 256)))
        rows.append({"measure": "interpretation", "eps": _eps_value(e), "attack": attack, "interpreter": name,
                     "settings": ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "-", "seed": seed, **res})
    if eps > 0:
        samples = int(icfg.get("sensitivity_samples", 10))
        rows.append({"measure": "max_sensitivity", "eps": _eps_value(e), "attack": "uniform-noise", "interpreter": name,
                     "radius": eps, "samples": samples, "n": int(xi.shape[0]), "seed": seed,
                     "max_sensitivity": sensitivity(model, interp, xi, eps, samples, seed)})
    return rows


def evaluate_model(model: GapClassifier, x: torch.Tensor, y: torch.Tensor, ecfg: dict[str, Any], seed: int,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Every accuracy and interpretation row of one model, eps by eps (module docstring)."""
    dev = ecfg.get("device", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev in (None, "auto") else dev)
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    rows: list[dict[str, Any]] = []
    for e in ecfg.get("eps", [0, 2, 4, 6, 8, 10]):
        start = time.perf_counter()
        rows += _accuracy_rows(model, x, y, e, ecfg, seed) + _interpretation_rows(model, x, e, ecfg, seed)
        if progress:
            acc = {r["attack"]: r["accuracy"] for r in rows if r["measure"] == "accuracy" and r["eps"] == _eps_value(e)}
            tau = {r["attack"]: r.get("kendall_tau", float("nan")) for r in rows
                   if r["measure"] == "interpretation" and r["eps"] == _eps_value(e)}
            print(f"[robust]   eps {e}/255 ({time.perf_counter() - start:.0f} s): accuracy "
                  + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + "; Kendall tau "
                  + ", ".join(f"{k} {v:.3f}" for k, v in tau.items()), flush=True)
    return rows


def _module_kwargs(cfg: dict[str, Any], spec: dict[str, Any], num_classes: int) -> dict[str, Any]:
    mcfg = dict(cfg.get("model") or {})
    train = dict(cfg.get("training") or {})
    kw = {"arch": mcfg.get("arch", "small_cnn"), "num_classes": num_classes,
          "model_options": mcfg.get("model_options")}
    keys = ("interpretation", "gamma", "eps", "inner_steps", "inner_alpha", "eps_ramp_epochs", "random_start",
            "ce_attack", "optimizer", "lr", "weight_decay", "momentum", "lr_milestones", "lr_decay")
    unknown = sorted(set(spec) - set(keys) - {"name", "mode", "max_epochs"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in model {spec.get('name')!r}; allowed: name, mode, max_epochs, "
                         f"{', '.join(keys)}")
    merged = {**train, **{k: v for k, v in spec.items() if k not in ("name", "max_epochs")}}
    for k in ("eps", "inner_alpha"):  # configs give radii in 1/255 units
        if k in merged:
            merged[k] = float(merged[k]) / 255
    # the flat keys of the experiment YAML -> the module's option groups (the groups' defaults fill the rest)
    groups = {"inner": {"eps": "eps", "inner_steps": "steps", "inner_alpha": "alpha", "eps_ramp_epochs": "ramp_epochs",
                        "random_start": "random_start"},
              "optimiser": {"optimizer": "name", "lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum",
                            "lr_milestones": "milestones", "lr_decay": "decay"}}
    for group, names in groups.items():
        kw[group] = {new: merged[old] for old, new in names.items() if old in merged}
    if kw["optimiser"].get("milestones"):
        kw["optimiser"]["schedule"] = "multistep"
    kw.update({k: merged[k] for k in ("interpretation", "gamma", "ce_attack") if k in merged})
    kw["mode"] = spec.get("mode", spec["name"])
    return kw


def validate(cfg: dict[str, Any], dm: Any) -> None:
    """Build every model of ``models:`` once, so a bad mode, interpretation or radius fails before any training."""
    for spec in cfg.get("models") or DEFAULT_MODELS:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"every entry of models: needs a name, got {spec}")
        with torch.random.fork_rng(devices=[]):
            RobustClassifierModule(**_module_kwargs(cfg, dict(spec), dm.num_classes))
    icfg = (cfg.get("evaluation") or {}).get("interpretation") or {}
    for attack in icfg.get("attacks", []):
        if attack not in INTERPRETATION_ATTACKS:
            raise ValueError(f"unknown interpretation attack {attack!r} in evaluation.interpretation.attacks; "
                             f"choose from {', '.join(INTERPRETATION_ATTACKS)}")


def _train(cfg: dict[str, Any], spec: dict[str, Any], dm, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    kw = _module_kwargs(cfg, spec, dm.num_classes)
    epochs = int(spec.get("max_epochs", (cfg.get("training") or {}).get("max_epochs", 5)))
    if progress:
        print(f"[robust] training {spec['name']} ({kw['mode']}, {epochs} epochs)", flush=True)
    pl.seed_everything(seed, workers=True)
    module = RobustClassifierModule(**kw)
    timer = EpochTimer()
    trainer = make_trainer(cfg, epochs, out / "logs" / spec["name"], enable_progress_bar=progress, callbacks=[timer],
                           num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    save_classifier(module.model.eval(), out / f"{spec['name']}.pt", kw.get("model_options"),
                    extra={"train_seconds": seconds, "robust_training": module.robust_meta()})
    return {"model": module.model.eval(), "mode": kw["mode"], "epochs": epochs, "train_seconds": seconds,
            "epoch_seconds": sum(timer.seconds) / max(len(timer.seconds), 1), "gamma": float(kw.get("gamma", 0.0)),
            "ce_attack": kw.get("ce_attack", "pgd")}


def run(cfg: dict[str, Any], out: Path, progress: bool = True) -> list[dict[str, Any]]:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    start = time.perf_counter()
    seed = int(cfg.get("seed", 0))
    dm = setup_data(cfg)
    ecfg = dict(cfg.get("evaluation") or {})
    data = take_split(dm, "test", int(ecfg.get("n_images", 256)))
    results: dict[str, dict[str, Any]] = {}
    for spec in [dict(s) for s in (cfg.get("models") or DEFAULT_MODELS)]:
        res = _train(cfg, spec, dm, out, seed, progress)
        if progress:
            print(f"[robust] {spec['name']}: {res['train_seconds']:.0f} s training; evaluating", flush=True)
        res["rows"] = evaluate_model(res.pop("model"), data["image"], data["label"], ecfg, seed, progress)
        results[spec["name"]] = res
    ref = next((r["epoch_seconds"] for r in results.values() if r["mode"] == "normal"), None)
    rows: list[dict[str, Any]] = []
    for name, res in results.items():
        res["clean"] = next(r["accuracy"] for r in res["rows"] if r["measure"] == "accuracy" and r["eps"] == 0) \
            if any(r["eps"] == 0 and r["measure"] == "accuracy" for r in res["rows"]) else float("nan")
        res["ratio"] = res["epoch_seconds"] / ref if ref else float("nan")
        meta = {"model": name, "mode": res["mode"], "clean_accuracy": res["clean"], "epochs": res["epochs"],
                "epoch_seconds": res["epoch_seconds"], "epoch_time_ratio": res["ratio"],
                "train_seconds": res["train_seconds"]}
        rows += [{**meta, **r} for r in res["rows"]]
    _figure(out, ecfg, results)
    total = time.perf_counter() - start
    write_outputs(out, rows, report(cfg, dm, results, rows, dm.num_classes, total))
    return rows


def _figure(out: Path, ecfg: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    eps = [float(e) for e in ecfg.get("eps", [0, 2, 4, 6, 8, 10])]
    series = {}
    for name, res in results.items():
        def pick(measure, attack, field):
            val = {float(r["eps"]): r.get(field, float("nan")) for r in res["rows"]
                   if r["measure"] == measure and r["attack"] in attack}
            return [val.get(e, float("nan")) for e in eps]
        series[f"{name}: PGD accuracy"] = pick("accuracy", ("clean", "pgd-ce"), "accuracy")
        series[f"{name}: top-k Kendall tau"] = pick("interpretation", ("topk",), "kendall_tau")
    line_plot(out / "robust.png", eps, series, "eps (x/255)", "accuracy / Kendall's tau",
              "PGD accuracy and CAM Kendall's tau under the top-k attack")
