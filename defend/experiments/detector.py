"""Experiment ``detector``: the multi-interpreter adversarial detector (AdvEdge section VIII, Tables V-VI).

For every target interpreter: benign inputs and adversarial inputs (ADV2 / AdvEdge / AdvEdge+ against that
interpreter), the maps of every configured interpreter (GRAD, CAM, MASK, and RTS when a trained RTS checkpoint is
configured), a seeded stratified train / test split, then one detector per combination:

* ``single``: one interpreter (1 channel) - the baseline that measures the gain of stacking;
* ``stacked``: every pair (2 channels), every pair plus the product channel (3 channels), every triple (3 channels);
* ``squeeze``: feature squeezing on the inputs themselves (Xu et al.; ADV2 Table 4).

The best triple is then attacked adaptively (ADV2 with the ensemble of the interpreters it reads) and its
detection rate on those inputs is reported next to the non-adaptive one.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from attacks import ATTACKS, build_attack, random_targets
from ..interpreters import build_interpreter

from ..detection_data import build_detection_data, select, stack_maps
from ..detector import FeatureSqueezer, train_detector, xgb_device
from .attacks import attack_options
from .common import deep_get, get_classifier, markdown_table, select_correct, setup_data, write_outputs

__all__ = ["run", "combinations", "MIN_ADVERSARIAL"]

#: fewest successful adversarial inputs a detector is trained and scored on (below it the row says "not measured")
MIN_ADVERSARIAL = 10


def combinations(names: list[str]) -> list[tuple[tuple[str, ...], bool]]:
    """``(interpreters, product)``: singles, pairs, pairs + product, triples."""
    out = [((n,), False) for n in names]
    out += [(p, False) for p in itertools.combinations(names, 2)]
    out += [(p, True) for p in itertools.combinations(names, 2)]
    out += [(t, False) for t in itertools.combinations(names, 3)]
    return out


def _interpreters(cfg: dict[str, Any], names: list[str], dm, clf_path: str, out_dir: Path, notes: list[str],
                  progress: bool) -> dict[str, Any]:
    """The interpreters the detector reads. RTS uses ``interpreter_options.rts.network`` when given, else the plain
    RTS of ``rts.checkpoint``, trained there first when missing (:func:`defend.experiments.aid.get_rts`)."""
    out = {}
    for n in names:
        opts = dict(deep_get(cfg, f"interpreter_options.{n}") or {})
        if n == "rts" and not opts.get("network"):
            from .aid import get_rts

            net, rinfo = get_rts(cfg, dm, clf_path, out_dir, progress)
            opts["network"] = net
            notes.append(f"RTS: plain RTS {'trained and saved to' if rinfo['trained'] else 'loaded from'} "
                         f"{rinfo['checkpoint']}" + (f" ({rinfo['train_seconds']:.0f} s)" if rinfo["trained"] else "") + ".")
        out[n] = build_interpreter(n, **opts)
    return out


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


def run(cfg: dict[str, Any], out: Path, progress: bool = True) -> list[dict[str, Any]]:
    t_start = time.perf_counter()
    dcfg = dict(cfg.get("detection") or {})
    det_cfg = dict(cfg.get("detector") or {})
    seed = int(cfg.get("seed", 0))
    attack_name = dcfg.get("attack", "advedge")
    if attack_name not in ATTACKS or attack_name == "pgd":
        raise ValueError(f"detection.attack must be one of adv2, advedge, advedge_plus; got {attack_name!r}")
    framework = dcfg.get("framework", "pgd")
    names = list(dcfg.get("interpreters", ["grad", "cam", "mask"]))
    notes: list[str] = []
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, progress)
    interps = _interpreters(cfg, names, dm, str(info["checkpoint"]), out, notes, progress)
    names = [n for n in names if n in interps]
    targets = [t for t in dcfg.get("target_interpreters", ["cam"]) if t in interps]
    if len(names) < 2 or not targets:
        raise ValueError(f"need >= 2 usable interpreters and a usable target interpreter; have {names}, targets {targets}")
    n_b, n_a, n_ad = int(dcfg.get("n_benign", 200)), int(dcfg.get("n_adversarial", 200)), int(dcfg.get("n_adaptive", 40))
    pool = select_correct(model, dm, n_b + n_a + n_ad, split=dcfg.get("split", "test"))
    x, y = pool["image"], pool["label"]
    if x.shape[0] < n_b + n_a + n_ad:
        raise ValueError(f"only {x.shape[0]} correctly classified inputs in split {dcfg.get('split', 'test')}; "
                         f"need n_benign + n_adversarial + n_adaptive = {n_b + n_a + n_ad} (add a split: [test, val])")
    xb, xs, xad = x[:n_b], x[n_b:n_b + n_a], x[n_b + n_a:]
    ys, yad = y[n_b:n_b + n_a], y[n_b + n_a:]
    gen = torch.Generator().manual_seed(seed)
    yt_s, yt_ad = random_targets(ys, dm.num_classes, gen), random_targets(yad, dm.num_classes, gen)
    bs = int(dcfg.get("batch_size", 50))
    cache = Path(dcfg.get("cache_dir") or out / "cache")
    # how the inputs were chosen; build_detection_data adds what the data are computed from (the classifier's
    # weights, the interpreters' and the attack's settings, RTS weights included) and keys every batch on its inputs
    base_spec = {"data": cfg.get("data"), "n_benign": n_b, "n_adversarial": n_a,
                 "split": dcfg.get("split", "test"), "seed": seed, "batch_size": bs}
    t0 = time.perf_counter()
    benign = build_detection_data(model, interps, benign=xb, batch_size=bs, cache_dir=cache,
                                  spec={**base_spec, "set": "benign"}, progress=progress, desc="benign maps")
    data_seconds = time.perf_counter() - t0
    squeezer_cfg = dict(cfg.get("squeeze") or {})
    rows: list[dict[str, Any]] = []
    adaptive_rows: list[dict[str, Any]] = []
    for target in targets:
        opts = attack_options(cfg, attack_name, framework, target)
        atk = build_attack(attack_name, framework, target, seed=seed, **opts)
        t0 = time.perf_counter()
        adv = build_detection_data(model, interps, source=xs, target=yt_s, attack=atk, batch_size=bs, cache_dir=cache,
                                   spec={**base_spec, "set": "adversarial", "attack": attack_name, "framework": framework,
                                         "target": target, "options": opts}, progress=progress,
                                   desc=f"{attack_name}/{target} adversarial maps")
        data_seconds += time.perf_counter() - t0
        ok = adv["success"].bool()
        asr = float(ok.float().mean())
        attack_seconds = float(adv["attack_seconds"].sum())
        adv = select(adv, ok.nonzero().flatten())
        if int(ok.sum()) < MIN_ADVERSARIAL:
            rows.append({"detector": "not measured", "interpreters": "-", "target_interpreter": target,
                         "attack": attack_name, "framework": framework, "attack_success": asr,
                         "attack_seconds": attack_seconds, "n_adversarial": int(ok.sum()),
                         "status": f"not measured: the attack succeeded on {int(ok.sum())} of {n_a} inputs "
                                   f"(a detector needs >= {MIN_ADVERSARIAL} adversarial inputs)"})
            continue
        both = {"label": torch.cat([benign["label"], adv["label"]]), "image": torch.cat([benign["image"], adv["image"]]),
                "maps": {n: torch.cat([benign["maps"][n], adv["maps"][n]]) for n in names}}
        tr, te = _split(both["label"], float(dcfg.get("test_fraction", 0.3)), seed)
        lab_tr, lab_te = both["label"][tr], both["label"][te]
        common = {"target_interpreter": target, "attack": attack_name, "framework": framework, "attack_success": asr,
                  "attack_seconds": attack_seconds, "n_train": int(tr.numel()), "n_test": int(te.numel())}
        # feature squeezing on the images
        sq = FeatureSqueezer(model, bits=squeezer_cfg.get("bits", (4, 5)), median=squeezer_cfg.get("median", (2,)))
        t0 = time.perf_counter()
        sq.fit(both["image"][tr], lab_tr)
        fit_s = time.perf_counter() - t0
        s_te = sq.score(both["image"][te])
        res = _scores(s_te, lab_te, sq.threshold)
        rows.append({"detector": "squeeze", "interpreters": "-", "channels": 3, "product": False, **common, **res,
                     "threshold": sq.threshold, "feature_seconds": fit_s, "booster_seconds": 0.0, "train_seconds": 0.0})
        combos = combinations(names)
        best: dict[str, Any] | None = None
        best_det = None
        for combo, product in combos:
            maps = stack_maps(both["maps"], combo, product)
            det, times = train_detector(maps[tr], lab_tr, epochs=int(det_cfg.get("epochs", 3)),
                                        batch_size=int(det_cfg.get("batch_size", 32)),
                                        trainable=det_cfg.get("trainable", "input"), pretrained=det_cfg.get("pretrained"),
                                        lr=float(det_cfg.get("lr", 1e-3)), booster=det_cfg.get("booster"), seed=seed,
                                        progress=False, trainer_options=det_cfg.get("trainer"),
                                        feature_stages=det_cfg.get("feature_stages", "all"))
            prob = det.predict_proba(maps[te])
            res = _scores(prob, lab_te)
            row = {"detector": "single" if len(combo) == 1 else "stacked", "interpreters": "+".join(combo),
                   "channels": int(maps.shape[1]), "product": bool(product), **common, **res, **times}
            rows.append(row)
            if len(combo) == 3 and (best is None or row["accuracy"] > best["accuracy"]):
                best, best_det = row, det
            if progress:
                print(f"[detector] {target}: {row['interpreters']}{' (+product)' if product else ''} "
                      f"acc={res['accuracy']:.3f} auc={res['auc']:.3f}", flush=True)
        if best is None:  # fewer than three interpreters: attack the best pair instead
            pairs = [r for r in rows if r["target_interpreter"] == target and r["detector"] == "stacked"]
            best = max(pairs, key=lambda r: r["accuracy"])
            combo = tuple(best["interpreters"].split("+"))
            maps = stack_maps(both["maps"], combo, best["product"])
            best_det, _ = train_detector(maps[tr], lab_tr, epochs=int(det_cfg.get("epochs", 3)),
                                         trainable=det_cfg.get("trainable", "input"), seed=seed,
                                         feature_stages=det_cfg.get("feature_stages", "all"))
        if n_ad > 0 and best_det is not None:
            adaptive_rows.append(_adaptive(cfg, dcfg, model, interps, best, best_det, xad, yt_ad, target, bs, cache,
                                           base_spec, seed, progress, common))
    rows.extend(adaptive_rows)
    total = time.perf_counter() - t_start
    for r in rows:
        r["experiment_seconds"] = total
        r["data_seconds"] = data_seconds
    write_outputs(out, rows, _report(cfg, info, names, targets, rows, notes, total, data_seconds))
    return rows


def _adaptive(cfg, dcfg, model, interps, best, det, xad, yt_ad, target, bs, cache, base_spec, seed, progress, common):
    """ADV2 against the ensemble of every interpreter the detector reads; detection rate of the best detector."""
    acfg = dict(dcfg.get("adaptive") or {})
    combo = best["interpreters"].split("+")
    name = acfg.pop("attack", "adv2")
    opts = attack_options(cfg, name, dcfg.get("framework", "pgd"), target)
    opts.update({k: v for k, v in acfg.items() if k not in ("framework_options",)})
    opts["framework_options"] = {**opts.get("framework_options", {}), **(acfg.get("framework_options") or {})}
    atk = build_attack(name, dcfg.get("framework", "pgd"), [interps[n] for n in combo], seed=seed, **opts)
    t0 = time.perf_counter()
    adv = build_detection_data(model, interps, source=xad, target=yt_ad, attack=atk, batch_size=bs, cache_dir=cache,
                               spec={**base_spec, "set": "adaptive", "attack": name, "ensemble": combo, "options": opts},
                               progress=progress, desc=f"adaptive {name} on {'+'.join(combo)}")
    wall = time.perf_counter() - t0
    seconds = float(adv["attack_seconds"].sum())  # recorded when crafted, so a cached re-run reports it too
    ok = adv["success"].bool()
    adv = select(adv, ok.nonzero().flatten())
    rate = float("nan")
    if ok.any():
        prob = det.predict_proba(stack_maps(adv["maps"], combo, best["product"]))
        rate = float((prob > 0.5).float().mean())
    return {"detector": "stacked-adaptive", "interpreters": best["interpreters"], "channels": best["channels"],
            "product": best["product"], **{**common, "attack": f"{name}-ensemble", "attack_success": float(ok.float().mean()),
                                          "n_train": best["n_train"], "n_test": int(ok.sum())},
            "adaptive_detection_rate": rate, "detection_rate": best["detection_rate"], "accuracy": best["accuracy"],
            "auc": best["auc"], "feature_seconds": 0.0, "booster_seconds": 0.0, "train_seconds": 0.0,
            "attack_seconds": seconds, "wall_seconds": wall}


def _report(cfg, info, names, targets, rows, notes, total, data_seconds) -> str:
    dcfg = cfg.get("detection") or {}
    lines = ["# Multi-interpreter adversarial detector (AdvEdge section VIII, Tables V-VI)", "",
             f"Classifier `{info['checkpoint']}`; attack `{dcfg.get('attack', 'advedge')}` / `{dcfg.get('framework', 'pgd')}`; "
             f"interpreters {', '.join(n.upper() for n in names)}; held-out fraction {dcfg.get('test_fraction', 0.3)}; "
             f"booster device `{xgb_device()}`; trunk layers trained: `{(cfg.get('detector') or {}).get('trainable', 'input')}`.",
             f"Total experiment time {total:.0f} s (data: maps + attacks {data_seconds:.0f} s in this run; "
             "data already in the cache are not recomputed).", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    for t in targets:
        tr = [r for r in rows if r["target_interpreter"] == t]
        if not tr:
            continue
        r0 = tr[0]
        if r0["detector"] == "not measured":
            lines += [f"## Adversarial inputs crafted against {t.upper()}: {r0['status']}", ""]
            continue
        lines += [f"## Adversarial inputs crafted against {t.upper()} (attack success {r0['attack_success']:.2f}; "
                  f"{r0['n_train']} train / {r0['n_test']} test inputs; crafting took {r0['attack_seconds']:.0f} s)", ""]

        def acc(combo, product, field="accuracy"):
            hit = [r for r in tr if r["detector"] in ("stacked", "single") and r["interpreters"] == "+".join(combo)
                   and r["product"] == product]
            return hit[0][field] if hit else "-"

        for product, title in ((False, "Table V (upper): 2-channel samples, accuracy"),
                               (True, "Table V (lower): 3-channel samples (pair + product), accuracy")):
            body = []
            for i, a in enumerate(names):
                body.append([a.upper()] + [acc((b, a), product) if j < i else "-" for j, b in enumerate(names)])
            lines += [f"### {title}", "", markdown_table([""] + [n.upper() for n in names], body), ""]
        triples = list(itertools.combinations(names, 3))
        if triples:
            body = [[", ".join(n.upper() for n in c), acc(c, False), acc(c, False, "auc")] for c in triples]
            lines += ["### Table VI: three-interpreter detector", "", markdown_table(["interpreters", "accuracy", "AUC"], body), ""]
        det_rows = [r for r in tr if r["detector"] in ("single", "stacked", "squeeze")]
        body = [[r["detector"], r["interpreters"], r["channels"], r["product"], r["accuracy"], r["auc"],
                 r["detection_rate"], r["false_positive_rate"], r["train_seconds"], r["feature_seconds"],
                 r["booster_seconds"]] for r in det_rows]
        lines += ["### All detectors (single-interpreter and feature-squeezing baselines included)", "",
                  markdown_table(["detector", "interpreters", "C", "product", "accuracy", "AUC", "detection rate",
                                  "false positives", "CE train s", "feature s", "booster s"], body), ""]
        ad = [r for r in tr if r["detector"] == "stacked-adaptive"]
        if ad:
            a = ad[0]
            lines += ["### Adaptive attack (ADV2 against the ensemble of the interpreters the detector reads)", "",
                      markdown_table(["detector", "non-adaptive detection rate", "adaptive detection rate",
                                      "adaptive attack success", "adaptive inputs", "attack s"],
                                     [[a["interpreters"] + (" +product" if a["product"] else ""), a["detection_rate"],
                                       a["adaptive_detection_rate"] if a["n_test"] else "not measured (no successful "
                                       "adaptive input)", a["attack_success"], a["n_test"],
                                       a["attack_seconds"]]]), "",
                      "Detection rate = share of successful adversarial inputs the detector flags (probability > 0.5). "
                      "The adaptive inputs are new source images; only successful ones are scored.", ""]
    return "\n".join(lines)
