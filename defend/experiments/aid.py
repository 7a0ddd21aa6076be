"""Experiment ``aid``: plain RTS vs AID-trained RTS on the same classifier (ADV2 section 5 Q3, Figures 15-16, Table 10).

1. Train plain RTS (:class:`defend.aid.AIDModule`, ``aid_weight = 0``) on the frozen classifier.
2. Train RTS with AID (``aid_weight > 0``): by default fine-tuning the plain RTS weights (``aid.init: rts``;
   ``aid.init: scratch`` trains from scratch).
3. On ``evaluation.n_images`` correctly classified test inputs with random target classes, run ADV2 with the
   *same budget* against each interpreter (PGD eps / step, warm start, joint stage with the RTS term = map MSE +
   encoder CE) and measure: ``l1_benign_vs_adv2`` / ``iou_benign_vs_adv2`` (benign map of the true class vs the
   map of the adversarial input for the target class), ``asr``, ``localisation`` (map energy inside the object
   mask, with ``mask_area`` the share a uniform map would get), ``l1_benign_rts_vs_rts_aid`` (benign maps of the
   two interpreters), and the L1 between clean and noisy maps under Gaussian noise at two levels chosen to cause
   about ``noise.misclassification`` (3 % and 30 %) errors (Figure 15). A CAM row gives the localisation of CAM on
   the same classifier.

``epoch_seconds`` is the mean training-batch time times the number of batches of a full epoch (so runs with
``limit_train_batches`` still compare whole epochs); ``epoch_time_ratio`` is relative to plain RTS.
Outputs: ``metrics.json``, ``report.md``, ``aid.png`` (Figure 16 columns, then Figure 15 columns), ``rts.pt`` and
``rts_aid.pt`` (safe RTS artifacts, :func:`defend.aid.load_rts`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from attacks.adv2 import ADV2, random_targets
from attacks.interpreters import CAMInterpreter
from attacks.interpreters.rts import RTSInterpreter, RTSNetwork

from ..aid import AIDModule, load_rts
from ..evaluation import interpret, run_attack
from ..metrics import localisation, map_l1, topk_iou
from .common import get_classifier, make_trainer, markdown_table, select_correct, setup_data, write_outputs
from ..figures import map_grid

__all__ = ["run", "BatchTimer", "noise_levels", "get_rts"]


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


def _train(cfg: dict[str, Any], clf_path: str, dm, spec: dict[str, Any], init_from: str | None, out_path: Path,
           seed: int, progress: bool) -> dict[str, Any]:
    """Train one RTS variant with Lightning; export it; return timing."""
    base = dict(cfg.get("rts") or {})
    spec = dict(spec)
    epochs = int(spec.pop("max_epochs", 1))
    limit = spec.pop("limit_train_batches", None)
    spec.pop("init", None)
    kw = {**base, **spec}
    # the flat keys of the experiment YAML -> the module's option groups (the groups' defaults fill the rest)
    from dataclasses import fields

    from ..aid import RTSObjective

    flat = dict(kw)
    groups = {"objective": {k: flat.pop(k) for k in [f.name for f in fields(RTSObjective)] if k in flat},
              "attack": {k[len("attack_"):]: flat.pop(k) for k in list(flat) if k.startswith("attack_")},
              "aid": {k[len("aid_"):] if k.startswith("aid_") else k: flat.pop(k) for k in list(flat)
                      if k.startswith(("aid_", "anchor_"))},
              "optimiser": {k: flat.pop(k) for k in ("lr", "weight_decay") if k in flat}}
    pl.seed_everything(seed, workers=True)
    module = AIDModule(classifier=clf_path, num_classes=dm.num_classes, init_from=init_from, seed=seed, **groups,
                       **flat)
    timer = BatchTimer()
    extra: dict[str, Any] = {"callbacks": [timer], "num_sanity_val_steps": 0, "limit_val_batches": 0,
                             "inference_mode": False, "enable_progress_bar": progress}
    if limit is not None:
        extra["limit_train_batches"] = limit
    trainer = make_trainer(cfg, epochs, **extra)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    full = len(dm.train_dataloader())
    module.export(out_path, {"train_seconds": seconds})
    if float(kw.get("aid_weight", 0.0)) > 0 and module.aid_steps == 0:
        raise ValueError(f"the AID run trained no l_aid step ({len(timer.seconds)} batches): it would be a plain RTS "
                         "labelled AID; train more batches or lower aid_every")
    return {"network": load_rts(out_path), "train_seconds": seconds, "batch_seconds": timer.mean,
            "batches": len(timer.seconds), "epoch_seconds": timer.mean * full, "full_epoch_batches": full,
            "aid_weight": float(kw.get("aid_weight", 0.0)), "aid_steps": module.aid_steps}


RTS_RUN_KEYS = ("checkpoint", "retrain", "max_epochs", "limit_train_batches")


def get_rts(cfg: dict[str, Any], dm, clf_path: str, out: Path, progress: bool = True) -> tuple[RTSNetwork, dict[str, Any]]:
    """Reuse ``rts.checkpoint`` if it exists, else train a plain RTS as ``rts`` describes and save it there.

    ``rts`` holds :class:`AIDModule` arguments plus ``checkpoint``, ``max_epochs`` and ``limit_train_batches``
    (like ``classifier:`` for the classifier). A reused checkpoint must fit the classifier (encoder stages, classes).
    """
    rcfg = dict(cfg.get("rts") or {})
    ckpt = Path(rcfg.get("checkpoint") or out / "rts.pt")
    if ckpt.is_file() and not rcfg.get("retrain", False):
        from ..classifier import load_classifier

        net = load_rts(ckpt)
        net.check_model(load_classifier(clf_path))
        return net, {"trained": False, "checkpoint": str(ckpt)}
    spec = {"aid_weight": 0.0, "max_epochs": rcfg.get("max_epochs", 2)}
    if rcfg.get("limit_train_batches") is not None:
        spec["limit_train_batches"] = rcfg["limit_train_batches"]
    module_cfg = {**cfg, "rts": {k: v for k, v in rcfg.items() if k not in RTS_RUN_KEYS}}
    if progress:
        print(f"[rts] no RTS checkpoint at {ckpt}: training a plain RTS on {clf_path}")
    t = _train(module_cfg, clf_path, dm, spec, None, ckpt, int(cfg.get("seed", 0)), progress)
    return t["network"], {"trained": True, "checkpoint": str(ckpt), "train_seconds": t["train_seconds"]}


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


def _evaluate(model, nets: dict[str, RTSNetwork], data: dict[str, torch.Tensor], ecfg: dict[str, Any], seed: int,
              num_classes: int, progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    x, y = data["image"], data["label"]
    gt = (data["mask"] > 0.5).float() if "mask" in data else None
    y_t = random_targets(y, num_classes, torch.Generator().manual_seed(seed))
    acfg = dict(ecfg.get("attack") or {})
    enc_weight = float(acfg.pop("enc_weight", 0.1))
    eps, alpha = float(acfg.pop("eps", 0.031)), float(acfg.pop("alpha", 1 / 255))
    bs = int(ecfg.get("batch_size", 64))
    ncfg = dict(ecfg.get("noise") or {})
    levels = noise_levels(model, x, y, [float(s) for s in ncfg.get("sigmas", [0.02, 0.05, 0.1, 0.15, 0.2, 0.3])],
                          [float(r) for r in ncfg.get("misclassification", [0.03, 0.30])], seed)
    noisy = []
    for k, (s, _) in enumerate(levels):
        gen = torch.Generator().manual_seed(seed)
        noisy.append((x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1))
    with torch.no_grad():
        pred_noisy = [model(xn).argmax(1) for xn in noisy]
    res: dict[str, dict[str, Any]] = {}
    for name, net in nets.items():
        g = RTSInterpreter(net, enc_weight=enc_weight)
        attack = ADV2(g, "pgd", framework_options={"eps": eps, "alpha": alpha}, seed=seed, **acfg)
        if progress:
            print(f"[aid] ADV2 against {name} ({x.shape[0]} inputs)")
        benign = interpret(g, model, x, y, bs)
        x_adv, seconds = run_attack(attack, model, x, y_t, benign, bs)
        adv = interpret(g, model, x_adv, y_t, bs)
        with torch.no_grad():
            success = torch.cat([model(x_adv[i:i + bs]).argmax(1) for i in range(0, x.shape[0], bs)]) == y_t
        r: dict[str, Any] = {
            "benign": benign, "adv": adv, "x_adv": x_adv,
            "l1_benign_vs_adv2": float(map_l1(benign, adv).mean()),
            "iou_benign_vs_adv2": float(topk_iou(benign, adv).mean()),
            "asr": float(success.float().mean()),
            "linf": float((x_adv - x).abs().amax()),
            "attack_seconds_per_input": seconds / x.shape[0],
            "map_mean": float(benign.mean()),
        }
        if gt is not None:
            r["localisation"] = float(localisation(benign, gt)[0].mean())
            r["localisation_adv2"] = float(localisation(adv, gt)[0].mean())
            r["mask_area"] = float(gt.mean())
        r["noisy_maps"] = [interpret(g, model, xn, pn, bs) for xn, pn in zip(noisy, pred_noisy)]
        for k, m in enumerate(r["noisy_maps"]):
            r[f"l1_clean_vs_noise{k + 1}"] = float(map_l1(benign, m).mean())
        res[name] = r
    cam = interpret(CAMInterpreter(), model, x, y, bs)
    extra = {"cam": cam, "y_t": y_t, "noisy": noisy, "pred_noisy": pred_noisy,
             "noise_levels": levels, "n": int(x.shape[0])}
    if gt is not None:
        extra["cam_localisation"] = float(localisation(cam, gt)[0].mean())
        extra["mask_area"] = float(gt.mean())
    return res, extra


def run(cfg: dict[str, Any], out: Path, progress: bool = True) -> list[dict[str, Any]]:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    t_start = time.perf_counter()
    seed = int(cfg.get("seed", 0))
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    clf_path = str(info["checkpoint"])
    tcfg = dict(cfg.get("training") or {})
    rts_spec = {"aid_weight": 0.0, **dict(tcfg.get("rts") or {})}
    aid_spec = dict(tcfg.get("aid") or {})
    if float(aid_spec.get("aid_weight", 0.0)) <= 0:
        raise ValueError("training.aid.aid_weight must be > 0 (it is the AID-trained interpreter)")
    init = str(aid_spec.get("init", "rts"))
    if init not in ("rts", "scratch"):
        raise ValueError(f"training.aid.init must be 'rts' (fine-tune the plain RTS) or 'scratch', got {init!r}")
    if progress:
        print("[aid] training plain RTS")
    trained = {"rts": _train(cfg, clf_path, dm, rts_spec, None, out / "rts.pt", seed, progress)}
    if progress:
        print(f"[aid] training RTS with AID ({'fine-tuning the plain RTS' if init == 'rts' else 'from scratch'})")
    trained["rts_aid"] = _train(cfg, clf_path, dm, aid_spec, str(out / "rts.pt") if init == "rts" else None,
                                out / "rts_aid.pt", seed, progress)
    ecfg = dict(cfg.get("evaluation") or {})
    data = select_correct(model, dm, int(ecfg.get("n_images", 64)))
    res, extra = _evaluate(model, {k: v["network"] for k, v in trained.items()}, data, ecfg, seed, dm.num_classes,
                           progress)
    l1_pair = float(map_l1(res["rts"]["benign"], res["rts_aid"]["benign"]).mean())
    ref_epoch = trained["rts"]["epoch_seconds"]
    rows: list[dict[str, Any]] = []
    for name in ("rts", "rts_aid"):
        r, t = res[name], trained[name]
        row = {"interpreter": name, "n": extra["n"]}
        row.update({k: v for k, v in r.items() if isinstance(v, (int, float))})
        row.update({"l1_benign_rts_vs_rts_aid": l1_pair, "epoch_seconds": t["epoch_seconds"],
                    "epoch_time_ratio": t["epoch_seconds"] / ref_epoch if ref_epoch else float("nan"),
                    "batch_seconds": t["batch_seconds"], "train_batches": t["batches"], "aid_steps": t["aid_steps"],
                    "train_seconds": t["train_seconds"], "aid_weight": t["aid_weight"]})
        rows.append(row)
    cam_row = {"interpreter": "cam", "n": extra["n"]}
    if "cam_localisation" in extra:
        cam_row.update({"localisation": extra["cam_localisation"], "mask_area": extra["mask_area"]})
    rows.append(cam_row)
    for k, (s, rate) in enumerate(extra["noise_levels"]):
        rows.append({"interpreter": "noise", "level": k + 1, "sigma": s, "misclassification": rate,
                     "l1_clean_vs_noisy_rts": res["rts"][f"l1_clean_vs_noise{k + 1}"],
                     "l1_clean_vs_noisy_rts_aid": res["rts_aid"][f"l1_clean_vs_noise{k + 1}"]})
    total = time.perf_counter() - t_start
    for r in rows[:2]:
        r["experiment_seconds"] = total
    _figure(out, data, res, extra, int(ecfg.get("n_figure", 4)))
    write_outputs(out, rows, _report(cfg, info, rows, extra, trained, total))
    return rows


def _figure(out: Path, data: dict[str, torch.Tensor], res, extra, n_show: int) -> None:
    n_show = min(n_show, extra["n"])
    sl = slice(0, n_show)
    cols = [("input", data["image"][sl]), ("RTS benign", res["rts"]["benign"][sl]),
            ("RTS-AID benign", res["rts_aid"]["benign"][sl]), ("ADV2 vs RTS", res["rts"]["x_adv"][sl]),
            ("RTS ADV2", res["rts"]["adv"][sl]), ("ADV2 vs RTS-AID", res["rts_aid"]["x_adv"][sl]),
            ("RTS-AID ADV2", res["rts_aid"]["adv"][sl])]
    for k, (s, rate) in enumerate(extra["noise_levels"]):
        cols += [(f"noise s={s:g} ({rate:.0%} err)", extra["noisy"][k][sl]), (f"RTS noise {k + 1}", res["rts"]["noisy_maps"][k][sl]),
                 (f"RTS-AID noise {k + 1}", res["rts_aid"]["noisy_maps"][k][sl])]
    labels = [f"y={int(a)} -> {int(b)}" for a, b in zip(data["label"][sl], extra["y_t"][sl])]
    map_grid(out / "aid.png", cols, rows=n_show, row_labels=labels)


def _check_line(what: str, a: float | None, b: float | None, ok, shown: str) -> str:
    """``PASS`` / ``FAIL`` when both figures exist, else ``not measured`` (never a verdict on missing numbers)."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b):
        return f"- not measured: {what} (this data has no object masks or the figure is missing)"
    return f"- {'PASS' if ok(a, b) else 'FAIL'}: {what} ({shown.format(a=a, b=b)})"


def _checks(rts: dict, aid: dict, cam: dict, ratio: float, total: float) -> list[str]:
    loc_r, loc_a, loc_c = rts.get("localisation"), aid.get("localisation"), cam.get("localisation")
    drop = None if loc_r is None or loc_a is None or not loc_r > 0 else 100 * (1 - loc_a / loc_r)
    return [
        _check_line("plain RTS localises at least as well as CAM", loc_r, loc_c, lambda a, b: a >= b,
                    "{a:.3f} vs {b:.3f}"),
        _check_line("L1 benign vs ADV2: RTS-AID >= 3x RTS", ratio, 3.0, lambda a, b: a >= b, "{a:.2f}x"),
        _check_line("localisation drop of RTS-AID <= 10 % relative", drop, 10.0, lambda a, b: a <= b, "{a:.1f} %"),
        _check_line("experiment time <= 20 min", total / 60, 20.0, lambda a, b: a <= b, "{a:.1f} min"),
        f"- l_aid steps trained by RTS-AID: {aid.get('aid_steps', 0)}",
    ]


def _report(cfg, info, rows, extra, trained, total) -> str:
    rts, aid, cam = rows[0], rows[1], rows[2]
    noise = [r for r in rows if r["interpreter"] == "noise"]
    ratio = aid["l1_benign_vs_adv2"] / max(rts["l1_benign_vs_adv2"], 1e-12)
    acfg = (cfg.get("evaluation") or {}).get("attack") or {}
    lines = [
        "# AID: adversarial interpretation distillation of RTS (ADV2 section 5 Q3, Appendix A2)",
        "",
        f"Classifier `{info['checkpoint']}`; {extra['n']} correctly classified test inputs, random target classes. "
        f"ADV2 with the same budget against both interpreters: PGD eps {acfg.get('eps', 0.031)}, step "
        f"{acfg.get('alpha', 1 / 255):.4f}, {acfg.get('warm_steps', 300)} warm-start + {acfg.get('steps', 300)} joint "
        f"steps, c = {acfg.get('c', 1.0)}, RTS term = map MSE + {acfg.get('enc_weight', 0.1)} x encoder CE.",
        "",
        "## L1 distance to the benign maps (layout of the paper's Table 10)",
        "",
        markdown_table(["", "RTS", "RTS-AID"], [
            ["Benign (RTS vs RTS-AID)", "-", rts["l1_benign_rts_vs_rts_aid"]],
            ["ADV2 (benign vs adversarial)", rts["l1_benign_vs_adv2"], aid["l1_benign_vs_adv2"]],
        ]),
        "",
        f"Paper (ResNet-50, ImageNet): benign 0.03, ADV2 0.01 (RTS) vs 0.10 (RTS-AID). Here the ratio "
        f"RTS-AID / RTS is **{ratio:.1f}x**.",
        "",
        "## All measures",
        "",
        markdown_table(
            ["interpreter", "L1 benign vs ADV2", "IoU benign vs ADV2", "ASR", "localisation", "localisation (ADV2)",
             "object area", "map mean", "s / epoch", "epoch time vs RTS"],
            [[r["interpreter"], r.get("l1_benign_vs_adv2", "-"), r.get("iou_benign_vs_adv2", "-"), r.get("asr", "-"),
              r.get("localisation", "-"), r.get("localisation_adv2", "-"), r.get("mask_area", "-"),
              r.get("map_mean", "-"), r.get("epoch_seconds", "-"), r.get("epoch_time_ratio", "-")]
             for r in (rts, aid, cam)]),
        "",
        "Localisation = share of the map's energy inside the digit's ground-truth mask (a uniform map scores the "
        "object area).",
        "",
        "## Sensitivity to random noise (Figure 15): L1 between clean and noisy maps",
        "",
        markdown_table(["noise sigma", "misclassified", "RTS", "RTS-AID"],
                       [[n["sigma"], n["misclassification"], n["l1_clean_vs_noisy_rts"], n["l1_clean_vs_noisy_rts_aid"]]
                        for n in noise]),
        "",
        "## Targets",
        "",
    ]
    lines += _checks(rts, aid, cam, ratio, total)
    t_rts, t_aid = trained["rts"], trained["rts_aid"]
    lines += [
        "",
        "## Training cost",
        "",
        markdown_table(["interpreter", "aid_weight", "batches trained", "s / batch", "s / full epoch (est.)",
                        "epoch time vs RTS", "training s"],
                       [["rts", t_rts["aid_weight"], t_rts["batches"], t_rts["batch_seconds"], t_rts["epoch_seconds"], 1.0,
                         t_rts["train_seconds"]],
                        ["rts_aid", t_aid["aid_weight"], t_aid["batches"], t_aid["batch_seconds"], t_aid["epoch_seconds"],
                         aid["epoch_time_ratio"], t_aid["train_seconds"]]]),
        "",
        f"A full epoch has {t_rts['full_epoch_batches']} batches; s / epoch = mean s / batch x that. "
        f"Total experiment time: {total:.0f} s.",
        "",
        "![RTS vs RTS-AID: benign, ADV2 and noisy maps](aid.png)",
        "",
        "Columns: input; benign maps of RTS and RTS-AID; the ADV2 input crafted against each and its map "
        "(Figure 16); then two Gaussian noise levels with the maps of both interpreters (Figure 15). "
        "Row labels: true class -> ADV2 target class.",
        "",
    ]
    return "\n".join(lines)
