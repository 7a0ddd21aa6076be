"""Experiment ``robust``: interpretation-robust training vs normal and PGD adversarial training (AdvEdge Table VII).

Each model of ``models:`` is trained from the same seed with :class:`defend.robust.RobustClassifierModule`, then
evaluated on the first ``evaluation.n_images`` test images, for every eps of ``evaluation.eps`` (in 1/255 units):

* ``accuracy``: accuracy under untargeted L-inf PGD on the cross-entropy (random start, ``pgd_steps`` steps of
  ``eps * pgd_step_ratio``); at eps 0 the clean accuracy.
* ``kendall_tau``: Kendall's tau-b between the benign and the attacked CAM (input-resolution maps of the
  CAM interpreter, class = the benign prediction). The attack is PGD maximising the discrepancy D of
  :mod:`defend.robust` (random start, ``interp_steps`` steps of ``eps * interp_step_ratio``); per image it keeps
  the iterate with the largest D among those whose prediction did not change; images whose prediction changed
  at every iterate are left out (``n_tau`` counts the others). At eps 0 the maps are identical (tau = 1).

Rows of ``metrics.json``: ``model, mode, eps (x/255), accuracy, kendall_tau, kendall_tau_cam_grid (tau of the raw maps
on the CAM's own grid), discrepancy (mean D reached), attack, n, n_tau``,
plus the model's clean accuracy, mean epoch time and its ratio to the normal model's.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from attacks._state import frozen
from attacks.frameworks.pgd import PGD
from attacks.interpreters import CAMInterpreter

from ..classifier import save_classifier
from ..metrics import kendall_tau
from ..models import GapClassifier
from ..robust import RobustClassifierModule, maps_and_logits, discrepancy, pgd_ce_attack
from .common import make_trainer, markdown_table, setup_data, take_split, write_outputs
from .figures import line_plot

__all__ = ["run", "validate", "EpochTimer", "pgd_accuracy", "interpretation_attack", "DEFAULT_MODELS"]

DEFAULT_MODELS = [{"name": "normal", "mode": "normal"}, {"name": "pgd_at", "mode": "pgd_at"},
                  {"name": "int_adv", "mode": "int_adv"}]
LABELS = {"normal": "NT (normal)", "pgd_at": "PGD-AT", "int": "Int", "int_adv": "Int-Adv"}


class EpochTimer(pl.Callback):
    """Wall time of every training epoch (the training loop only, validation excluded)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0
        self._val = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._val = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training:
            self._val += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start - self._val)


def pgd_accuracy(model: GapClassifier, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, alpha: float,
                 generator: torch.Generator | None = None, batch_size: int = 256) -> torch.Tensor:
    """Per-image correctness ``[N]`` under untargeted PGD (clean correctness at eps 0)."""
    out = []
    with frozen(model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if eps > 0:
                xb = pgd_ce_attack(model, xb, yb, eps, alpha, steps, random_start=True, generator=generator)
            with torch.no_grad():
                out.append(model(xb).argmax(1) == yb)
    return torch.cat(out)


def interpretation_attack(model: GapClassifier, x: torch.Tensor, cls: torch.Tensor, eps: float, alpha: float,
                          steps: int, interpretation: str = "cam", generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PGD ascent on ``D(x, x')`` (class ``cls``) keeping, per image, the prediction-preserving iterate with the largest D.

    Returns ``(x_best, kept, d_best)``: ``kept`` is False where no iterate kept the prediction ``cls``.
    The model must be frozen / in eval mode (the caller's business).
    """
    threat = PGD(eps, alpha, random_start=True)
    x0 = x.detach()
    with torch.no_grad() if interpretation == "cam" else torch.enable_grad():
        maps_x = maps_and_logits(model, x0, interpretation)[0].detach()
    z = threat.init(x0, generator)
    best_x, best_d = x0.clone(), torch.full((x0.shape[0],), -1.0, device=x0.device)
    active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    with torch.enable_grad():
        for it in range(steps + 1):
            xz = threat.apply(x0, z.requires_grad_(True), None)
            maps_z, logits_z = maps_and_logits(model, xz, interpretation)
            d = discrepancy(maps_x, maps_z, logits_z, cls)
            with torch.no_grad():
                better = (logits_z.argmax(1) == cls) & (d > best_d)
                best_d = torch.where(better, d.detach(), best_d)
                best_x[better] = xz.detach()[better]
            if it == steps:
                break
            (g,) = torch.autograd.grad(d.sum(), z)
            z = threat.project(x0, threat.step(z, -g, active, None))
    kept = best_d >= 0
    return best_x, kept, best_d.clamp_min(0)


def _evaluate(model: GapClassifier, x: torch.Tensor, y: torch.Tensor, ecfg: dict[str, Any], seed: int,
              progress: bool) -> list[dict[str, Any]]:
    cam = CAMInterpreter()
    pgd_steps = int(ecfg.get("pgd_steps", 10))
    int_steps = int(ecfg.get("interp_steps", 10))
    pgd_ratio = float(ecfg.get("pgd_step_ratio", 0.25))
    int_ratio = float(ecfg.get("interp_step_ratio", 0.25))
    bs = int(ecfg.get("batch_size", 256))
    rows = []
    dev = ecfg.get("device", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev in (None, "auto") else dev)
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, x.shape[0], bs)])
    for e in ecfg.get("eps", [0, 2, 4, 6, 8, 10]):
        eps = float(e) / 255
        gen = torch.Generator(device=device).manual_seed(seed)
        correct = pgd_accuracy(model, x, y, eps, pgd_steps, eps * pgd_ratio, gen, bs)
        taus, taus_native, ds, kept_n = [], [], [], 0
        with frozen(model):
            for i in range(0, x.shape[0], bs):
                xb, cb = x[i:i + bs], pred[i:i + bs]
                if eps > 0:
                    xa, kept, d = interpretation_attack(model, xb, cb, eps, eps * int_ratio, int_steps, "cam", gen)
                else:
                    xa, kept, d = xb, torch.ones(xb.shape[0], dtype=torch.bool, device=device), torch.zeros(xb.shape[0], device=device)
                if kept.any():
                    with torch.no_grad():
                        m0 = cam(model, xb[kept], cb[kept])
                        m1 = cam(model, xa[kept], cb[kept])
                    taus.append(kendall_tau(m0, m1))
                    taus_native.append(kendall_tau(cam(model, xb[kept], cb[kept], raw=True),
                                                   cam(model, xa[kept], cb[kept], raw=True)))
                    ds.append(d[kept])
                kept_n += int(kept.sum())
        tau = float(torch.cat(taus).mean()) if taus else float("nan")
        tau_native = float(torch.cat(taus_native).mean()) if taus_native else float("nan")
        rows.append({"eps": int(e) if float(e).is_integer() else float(e), "accuracy": float(correct.float().mean()),
                     "kendall_tau": tau, "kendall_tau_cam_grid": tau_native, "discrepancy": float(torch.cat(ds).mean()) if ds else float("nan"),
                     "attack": f"acc: PGD-CE {pgd_steps} steps of eps*{pgd_ratio:g}; tau: PGD-D(CAM) {int_steps} "
                               f"steps of eps*{int_ratio:g}, prediction kept",
                     "n": int(x.shape[0]), "n_tau": kept_n})
        if progress:
            print(f"[robust]   eps {e}/255: accuracy {rows[-1]['accuracy']:.3f}  tau {tau:.3f} "
                  f"(CAM grid {tau_native:.3f}, n_tau {kept_n})")
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
    for k in keys:
        if k in merged:
            kw[k] = merged[k]
    for k in ("eps", "inner_alpha"):  # configs give radii in 1/255 units
        if k in kw:
            kw[k] = float(kw[k]) / 255
    kw["mode"] = spec.get("mode", spec["name"])
    return kw


def validate(cfg: dict[str, Any], dm: Any) -> None:
    """Build every model of ``models:`` once, so a bad mode, interpretation or radius fails before any training."""
    for spec in cfg.get("models") or DEFAULT_MODELS:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"every entry of models: needs a name, got {spec}")
        with torch.random.fork_rng(devices=[]):
            RobustClassifierModule(**_module_kwargs(cfg, dict(spec), dm.num_classes))


def run(cfg: dict[str, Any], out: Path, progress: bool = True) -> list[dict[str, Any]]:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg.get("seed", 0))
    dm = setup_data(cfg)
    train = dict(cfg.get("training") or {})
    ecfg = dict(cfg.get("evaluation") or {})
    specs = [dict(s) for s in (cfg.get("models") or DEFAULT_MODELS)]
    data = take_split(dm, "test", int(ecfg.get("n_images", 256)))
    x, y = data["image"], data["label"]
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if "name" not in spec:
            raise ValueError(f"every entry of models: needs a name, got {spec}")
        name = spec["name"]
        kw = _module_kwargs(cfg, spec, dm.num_classes)
        epochs = int(spec.get("max_epochs", train.get("max_epochs", 5)))
        if progress:
            print(f"[robust] training {name} ({kw['mode']}, {epochs} epochs)")
        pl.seed_everything(seed, workers=True)
        module = RobustClassifierModule(**kw)
        timer = EpochTimer()
        trainer = make_trainer(cfg, epochs, out / "logs" / name, enable_progress_bar=progress, callbacks=[timer], num_sanity_val_steps=0)
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - start
        model = module.model.eval()
        save_classifier(model, out / f"{name}.pt", kw.get("model_options"),
                        extra={"train_seconds": seconds, "robust_training": module.robust_meta()})
        epoch_s = sum(timer.seconds) / max(len(timer.seconds), 1)
        if progress:
            print(f"[robust] {name}: {seconds:.0f} s training, {epoch_s:.1f} s/epoch; evaluating")
        rows = _evaluate(model, x, y, ecfg, seed, progress)
        results[name] = {"mode": kw["mode"], "rows": rows, "epoch_seconds": epoch_s, "train_seconds": seconds,
                         "epochs": epochs, "gamma": float(kw.get("gamma", 0.0))}
    ref = next((r["epoch_seconds"] for r in results.values() if r["mode"] == "normal"), None)
    out_rows: list[dict[str, Any]] = []
    for name, res in results.items():
        clean = next((r["accuracy"] for r in res["rows"] if float(r["eps"]) == 0), float("nan"))
        ratio = res["epoch_seconds"] / ref if ref else float("nan")
        res["ratio"], res["clean"] = ratio, clean
        for r in res["rows"]:
            out_rows.append({"model": name, "mode": res["mode"], **r, "clean_accuracy": clean,
                             "epoch_seconds": res["epoch_seconds"], "epoch_time_ratio": ratio,
                             "train_seconds": res["train_seconds"], "epochs": res["epochs"]})
    eps_list = [r["eps"] for r in next(iter(results.values()))["rows"]]
    _figure(out, eps_list, results)
    write_outputs(out, out_rows, _report(cfg, dm, results, eps_list))
    return out_rows


def _eps_label(e: Any) -> str:
    v = float(e)
    return "0" if v == 0 else (f"{int(v)}/255" if v.is_integer() else f"{v:g}/255")


def _figure(out: Path, eps_list: list[Any], results: dict[str, dict[str, Any]]) -> None:
    series = {}
    for name, res in results.items():
        series[f"{name}: accuracy"] = [r["accuracy"] for r in res["rows"]]
    for name, res in results.items():
        series[f"{name}: Kendall tau"] = [r["kendall_tau"] for r in res["rows"]]
    line_plot(out / "robust.png", [float(e) for e in eps_list], series, "eps (x/255)", "accuracy / Kendall's tau",
              "PGD accuracy and CAM Kendall's tau (benign vs attacked)")


def _comparison(results: dict[str, dict[str, Any]], at: float = 8.0) -> list[str]:
    """Lines comparing every model with the normal one at eps ``at``/255 (accuracy ratio, tau gain, clean drop)."""
    ref = next((r for r in results.values() if r["mode"] == "normal"), None)
    if ref is None:
        return []
    pick = lambda res: next((r for r in res["rows"] if float(r["eps"]) == at), None)  # noqa: E731
    r0 = pick(ref)
    if r0 is None:
        return []
    lines = [f"## Against normal training at eps {_eps_label(at)}", ""]
    for name, res in results.items():
        r = pick(res)
        if res is ref or r is None:
            continue
        ratio = r["accuracy"] / r0["accuracy"] if r0["accuracy"] > 0 else float("inf")
        lines.append(f"- `{name}`: accuracy {r['accuracy']:.3f} vs {r0['accuracy']:.3f} ({ratio:.1f}x), "
                     f"Kendall tau {r['kendall_tau']:.3f} vs {r0['kendall_tau']:.3f} "
                     f"({r['kendall_tau'] - r0['kendall_tau']:+.3f}), clean accuracy "
                     f"{res['clean']:.3f} vs {ref['clean']:.3f} ({100 * (res['clean'] - ref['clean']):+.1f} points)")
    return lines + [""]


def _report(cfg: dict[str, Any], dm, results: dict[str, dict[str, Any]], eps_list: list[Any]) -> str:
    mcfg = cfg.get("model") or {}
    headers = ["eps"] + [_eps_label(e) for e in eps_list]
    acc_rows = [[LABELS.get(res["mode"], name) + f" `{name}`"] + [r["accuracy"] for r in res["rows"]]
                for name, res in results.items()]
    tau_rows = [[LABELS.get(res["mode"], name) + f" `{name}`"] + [r["kendall_tau"] for r in res["rows"]]
                for name, res in results.items()]
    sep = [["**Attack against interpretability (Kendall's tau, CAM)**"] + [""] * len(eps_list)]
    time_rows = [[name, res["mode"], res["epochs"], res["gamma"] if res["mode"] in ("int", "int_adv") else "-",
                  res["clean"], res["epoch_seconds"], res["ratio"], res["train_seconds"]] for name, res in results.items()]
    first = next(iter(results.values()))["rows"][0]
    lines = [
        f"# Interpretation-robust training: {mcfg.get('arch', 'small_cnn')} on {dm.describe()['name']}",
        "",
        "Layout of AdvEdge Table VII: rows are models, columns the L-inf radius. Upper part: accuracy under untargeted "
        "PGD; lower part: Kendall's tau between the benign CAM and the CAM of an input attacked to maximise the "
        "interpretation discrepancy D while keeping the prediction.",
        "",
        f"Test images: {first['n']} (first of the test split). Attacks: {first['attack']}.",
        "",
        "**Testing accuracy**",
        "",
        markdown_table(headers, acc_rows + sep + tau_rows),
        "",
        "## Training cost",
        "",
        markdown_table(["model", "mode", "epochs", "gamma", "clean accuracy", "s / epoch", "epoch time vs normal",
                        "training s"], time_rows),
        "",
        *_comparison(results),
        "Images evaluated for tau per eps (prediction kept): " + ", ".join(
            f"{name}: " + "/".join(str(r["n_tau"]) for r in res["rows"]) for name, res in results.items()),
        "",
        "![accuracy and Kendall's tau](robust.png)",
        "",
    ]
    return "\n".join(lines)
