"""``report.md`` of the ``robust`` experiment: AdvEdge Table VII's layout, every row naming its attack, and the checks."""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import stats
from ..robust import INTERPRETATION_MODES
from ..tables import markdown_table

__all__ = ["report", "near_chance", "LABELS", "HEADLINE_EPS", "versus", "table_vii", "ATTACK_LABELS"]

LABELS = {"normal": "NT (normal)", "pgd_at": "PGD-AT", "int": "Int", "int_adv": "Int-Adv", "trades": "TRADES"}
#: the radius (image units) of the report's detailed tables and checks: 8/255
HEADLINE_EPS = 8 / 255
#: how the report names each interpretation attack: the protocol it belongs to, ours labelled as such
ATTACK_LABELS = {"aai_topk": "aai_topk (Boopathy et al.'s protocol)", "topk": "top-k (our variant, ghorbani)",
                 "discrepancy": "discrepancy (our variant, ghorbani)", "noise": "uniform noise (our variant, ghorbani)"}


def near_chance(clean: float, num_classes: int, n: int) -> bool:
    """A model whose clean accuracy is not clearly above chance (:func:`defend.stats.at_chance`: the Wilson lower
    bound at or below ``1/K + 0.1``) has learnt too little for a robustness comparison."""
    return stats.at_chance(int(round(clean * n)), n, num_classes)


def _cell(r: dict[str, Any] | None, field: str) -> str:
    """A figure with its 95 % interval (``not measured`` where the row lacks it)."""
    if r is None:
        return "-"
    if r.get(field) is None:
        return "not measured"
    return stats.format_value(r[field], r.get(f"{field}_ci_low"), r.get(f"{field}_ci_high"))


def _same(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) < 1e-9


def _eps_label(e: float) -> str:
    """A radius in image units as the papers write it: ``0``, ``8/255`` (``2.55/255`` when not whole)."""
    v = float(e) * 255
    return "0" if v == 0 else (f"{round(v)}/255" if abs(v - round(v)) < 1e-6 else f"{v:.4g}/255")


def _is_attack(row_attack: str, attack: str) -> bool:
    """``autoattack`` stands for whichever version ran (``autoattack-standard``, or ``-reduced`` under 4 classes)."""
    return row_attack == attack or (attack == "autoattack" and str(row_attack).startswith("autoattack-"))


def _pick(res: dict[str, Any], measure: str, attack: str, eps: float) -> dict[str, Any] | None:
    return next((r for r in res["rows"] if r["measure"] == measure and _is_attack(r["attack"], attack)
                 and _same(r["eps"], eps)), None)


def _grid(results: dict[str, Any], eps_list: list[float], measure: str, attacks: tuple[str, ...], field: str,
          label: str) -> list[list[Any]]:
    """One table row per model: ``field`` of the first of ``attacks`` measured at each radius, with its interval;
    the label says the attacked inputs' n (the last attack's, e.g. AutoAttack's; "indicative" below 100)."""
    rows = []
    for name, res in results.items():
        vals, ns = [], []
        for e in eps_list:
            hit = next((r for a in attacks if (r := _pick(res, measure, a, e)) is not None), None)
            vals.append(_cell(hit, field))
            if hit is not None and _is_attack(hit.get("attack"), attacks[-1]):
                ns.append(int(hit.get("n_correct" if field.endswith("_on_correct") else "n_kept"
                                       if measure == "interpretation" else "n", hit.get("n", 0))))
        n = f" ({'indicative, ' if ns and stats.indicative(min(ns)) else ''}n {min(ns)})" if ns else ""
        rows.append([f"{LABELS.get(res['mode'], name)} `{name}`", label + n] + vals)
    return rows


def table_vii(results: dict[str, Any], eps_list: list[float], attack: str) -> str:
    """AdvEdge Table VII's layout: one row per radius, for each model its accuracy (clean at 0, PGD-CE above) and the
    Kendall tau of benign vs ``attack``-attacked CAM, each with its interval; ``-`` where not measured."""
    headers = ["eps"]
    for name, res in results.items():
        label = f"{LABELS.get(res['mode'], name)} `{name}`"
        headers += [f"{label} accuracy", f"{label} tau"]
    body = []
    for e in eps_list:
        row = [_eps_label(e)]
        for res in results.values():
            acc = next((r for a in ("clean", "pgd-ce") if (r := _pick(res, "accuracy", a, e)) is not None), None)
            row += [_cell(acc, "accuracy"), _cell(_pick(res, "interpretation", attack, e), "kendall_tau")]
        body.append(row)
    return markdown_table(headers, body)


def _table_vii_notes(results: dict[str, Any], eps_list: list[float], attack: str) -> str:
    """The n of Table VII's figures: the accuracy inputs and the kept inputs of ``attack`` (fewest over radii)."""
    n_acc = sorted({int(r["n"]) for res in results.values() for r in res["rows"]
                    if r["measure"] == "accuracy" and r["attack"] in ("clean", "pgd-ce")})
    kept = [(int(r.get("n_kept", 0)), int(r["n"])) for res in results.values() for r in res["rows"]
            if r["measure"] == "interpretation" and r["attack"] == attack and any(_same(r["eps"], e) for e in eps_list)]
    low = min(kept) if kept else None
    return (f"Accuracy on n = {', '.join(map(str, n_acc)) or '-'} inputs; tau: {ATTACK_LABELS.get(attack, attack)}, "
            f"over the inputs whose prediction did not flip (fewest: {low[0]} of {low[1]})" if low else
            f"Accuracy on n = {', '.join(map(str, n_acc)) or '-'} inputs; tau not measured") + "."


def _checks(results: dict[str, Any], at: float = HEADLINE_EPS) -> list[str]:
    """PASS / FAIL lines of the issue's targets, written only where both figures exist."""
    lines = []
    for name, res in results.items():
        for r in res["rows"]:
            if r["measure"] == "accuracy" and r["attack"].startswith("autoattack"):
                ok = r["accuracy"] <= r["pgd_accuracy_same_inputs"] + 1e-9
                lines.append(f"- {'PASS' if ok else 'FAIL'}: AutoAttack <= PGD for `{name}` at {_eps_label(r['eps'])} "
                             f"({r['accuracy']:.3f} vs {r['pgd_accuracy_same_inputs']:.3f} on the same {r['n']} inputs)")
    ref = next((r for r in results.values() if r["mode"] == "normal"), None)
    aa = lambda res: _pick(res, "accuracy", "autoattack", at)  # noqa: E731
    for name, res in results.items():
        if ref is None or res is ref or res["mode"] not in ("int", "int_adv"):
            continue
        if aa(res) and aa(ref):
            d = aa(res)["accuracy"] - aa(ref)["accuracy"]
            lines.append(f"- {'PASS' if d >= 0.10 else 'FAIL'}: `{name}` AutoAttack accuracy at {_eps_label(at)} >= "
                         f"normal + 0.10 ({aa(res)['accuracy']:.3f} vs {aa(ref)['accuracy']:.3f}, {d:+.3f})")
        for attack in ("aai_topk", "topk"):
            a, b = _pick(res, "interpretation", attack, at), _pick(ref, "interpretation", attack, at)
            if a and b and "kendall_tau" in a and "kendall_tau" in b:
                d = a["kendall_tau"] - b["kendall_tau"]
                lines.append(f"- {'PASS' if d >= 0.2 else 'FAIL'}: `{name}` {ATTACK_LABELS[attack]} Kendall tau at "
                             f"{_eps_label(at)} >= normal + 0.2 ({a['kendall_tau']:.3f} vs {b['kendall_tau']:.3f}, "
                             f"{d:+.3f})")
        d = res["clean"] - ref["clean"]
        lines.append(f"- {'PASS' if d >= -0.15 else 'FAIL'}: `{name}` clean accuracy within 15 points of normal "
                     f"({res['clean']:.3f} vs {ref['clean']:.3f}, {100 * d:+.1f} points)")
    return lines


def _paired(a: dict[str, Any], b: dict[str, Any], field: str, seed: int) -> stats.PairedTest | None:
    """The paired test of two models' rows on the same inputs: McNemar on per-input correctness; a paired bootstrap
    on the inputs both kept (interpretation figures); ``None`` when a row lacks per-input values."""
    if "_correct" in a and "_correct" in b:
        return stats.mcnemar(a["_correct"], b["_correct"], seed)
    pa, pb = a.get("_per_input", {}), b.get("_per_input", {})
    if field not in pa or field not in pb or a.get("_kept") is None or b.get("_kept") is None:
        return None
    ka, kb = a["_kept"].tolist(), b["_kept"].tolist()
    both = sorted(set(ka) & set(kb))
    if len(both) < 2:
        return None
    ia = torch.tensor([ka.index(i) for i in both])
    ib = torch.tensor([kb.index(i) for i in both])
    return stats.paired_bootstrap(pa[field][ia], pb[field][ib], seed)


def _model(results: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The result of the model named ``key``, else of the first model of mode ``key``."""
    if key in results:
        return results[key]
    return next((r for r in results.values() if r["mode"] == key), None)


def versus(results: dict[str, Any], first: str, second: str, at: float = HEADLINE_EPS,
           seed: int = 0) -> list[tuple[str, dict[str, Any], dict[str, Any], stats.PairedTest | None]]:
    """``(figure, row of first, row of second, paired test)`` for the models ``first`` and ``second`` (a model's
    name, or a mode: its first model) at
    radius ``at``: accuracy under AutoAttack and PGD (McNemar), Boopathy's ``aai_topk`` and our top-k and discrepancy
    attacks' Kendall tau and top-k intersection (paired bootstrap on the inputs both models kept; each protocol's
    inputs are the same for every model)."""
    a_res, b_res = _model(results, first), _model(results, second)
    if a_res is None or b_res is None:
        return []
    out = []
    for label, measure, attack, field in (("AutoAttack accuracy", "accuracy", "autoattack", "accuracy"),
                                          ("PGD accuracy", "accuracy", "pgd-ce", "accuracy"),
                                          ("aai_topk Kendall tau (Boopathy's protocol)", "interpretation", "aai_topk",
                                           "kendall_tau"),
                                          ("aai_topk top-k intersection (Boopathy's protocol)", "interpretation",
                                           "aai_topk", "topk_intersection"),
                                          ("top-k-attack Kendall tau (our variant)", "interpretation", "topk",
                                           "kendall_tau"),
                                          ("top-k-attack top-k intersection (our variant)", "interpretation", "topk",
                                           "topk_intersection"),
                                          ("discrepancy-attack Kendall tau (our variant)", "interpretation",
                                           "discrepancy", "kendall_tau")):
        a, b = _pick(a_res, measure, attack, at), _pick(b_res, measure, attack, at)
        if a and b and a.get(field) is not None and b.get(field) is not None:
            out.append((label, a, b, _paired(a, b, field, seed)))
    return out


def _versus(results: dict[str, Any], at: float = HEADLINE_EPS, seed: int = 0) -> list[str]:
    """Every Int / Int-Adv model (each variant by its name) against PGD-AT at the headline radius (Boopathy et al.'s
    claim: Int-Adv keeps explanations better), each comparison with its paired test: "ahead" only where p < 0.05,
    else "within noise"."""
    out = []
    for name in [n for n, r in results.items() if r["mode"] in INTERPRETATION_MODES]:
        for label, a, b, test in versus(results, name, "pgd_at", at, seed):
            field = ("accuracy" if "accuracy" in label else
                     "topk_intersection" if "intersection" in label else "kendall_tau")
            head = f"- {label}: `{name}` {_cell(a, field)} vs PGD-AT {_cell(b, field)}"
            if test is None:
                out.append(head + "; no paired test (no per-input values)")
                continue
            shared = "" if test.test == "mcnemar-exact" else f" on the {test.difference.n} inputs both kept"
            out.append(f"{head}; `{name}` minus PGD-AT {test.difference.text(with_n=False)}{shared} ({test.test}): "
                       + test.verdict(f"`{name}`", "PGD-AT"))
    return out


def _full_table(results: dict[str, Any], at: float = HEADLINE_EPS) -> list[str]:
    body = []
    for name, res in results.items():
        for r in res["rows"]:
            if r["measure"] == "interpretation" and _same(r["eps"], at):
                body.append([name, ATTACK_LABELS.get(r["attack"], r["attack"])]
                            + [_cell(r, k) for k in ("kendall_tau", "spearman")]
                            + [r.get(k, "not measured") for k in
                               ("topk_intersection_k4", "topk_intersection_k8", "topk_intersection_k16")]
                            + [_cell(r, "cosine"), _cell(r, "com_shift"), r.get("kendall_tau_input_grid", "-"),
                               r.get("n_kept", "-")])
        s = _pick(res, "max_sensitivity", "uniform-noise", at)
        if s:
            body.append([name, f"max-sensitivity (radius {s['radius']:.4f}, {s['samples']} samples)",
                         _cell(s, "max_sensitivity")] + ["-"] * 8)
    return [markdown_table(["model", "attack", "Kendall tau", "Spearman", "top-4 inter.", "top-8 inter.",
                            "top-16 inter.", "cosine", "CoM shift (px)", "tau (input grid)", "n kept"], body)]


def _intro(cfg: Any, results: dict[str, Any], num_classes: int) -> list[str]:
    """The smoke-run banner (near-chance models) and what was measured, how."""
    ev = cfg.evaluation
    ie, aa = ev.interpretation, ev.autoattack
    lines = []
    chance = [n for n, r in results.items() if near_chance(r["clean"], num_classes, int(ev.n_images))]
    if chance:
        lines += [f"> **Not meaningful: {', '.join(chance)} at chance.** Their clean accuracy is not clearly above "
                  f"chance (Wilson lower bound at or below {1 / num_classes + 0.1:.2f}); the robust and interpretation "
                  "figures below compare models that have not learnt the task.", ""]
    discrepancy = {"steps": int(ie.discrepancy.steps), "step_ratio": float(ie.discrepancy.step_ratio)}
    b = ie.boopathy
    protocols = []
    if "boopathy" in ie.protocols:
        protocols.append(
            f"**Boopathy et al.'s protocol** (their `eval.py` `aai_topk`, the cited reference): {b.n_images} images of "
            f"the {_split(cfg)} split drawn at random with seed {cfg.seed} (the same for every model); the true label "
            f"explained; loss = minus the raw CAM summed over the benign top-{b.k} pixels, uniform random start, "
            f"{b.steps} signed steps of {float(b.alpha):g}, the final iterate (rounded to the uint8 grid: our "
            "addition); inputs whose prediction flipped are dropped.")
    if "ghorbani" in ie.protocols:
        protocols.append(
            f"**Our variant** (protocol `ghorbani`): the first {ie.n_images} of the PGD inputs, the benign prediction "
            f"explained; top-k attack {dict(ie.topk)} (normalised top-k mass plus a kappa logit hinge, benign start, "
            f"best iterate), discrepancy attack {discrepancy}, uniform noise in the ball rounded to 8 bits; inputs "
            "whose prediction the attack changed are not scored.")
    return lines + [
        f"Radii in image units ([0, 1]), written x/255. Accuracy: untargeted PGD on the cross-entropy "
        f"({ev.pgd.steps} steps of eps x {float(ev.pgd.step_ratio)}, random start, 1 restart) on the first "
        f"{ev.n_images} images of the {_split(cfg)} split; AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; pyautoattack, the authors' "
        f"code) on the first {aa.n_images} of them at {', '.join(_eps_label(e) for e in aa.eps) or 'no radius'}. "
        f"Seed {cfg.seed}. Accuracy counts every input, a clean error as a failure (RobustBench's convention); "
        "AutoAttack's accuracy on the correctly classified inputs alone is the row labelled so. Every figure: value "
        "[95 % interval] (Wilson for accuracies, a percentile bootstrap over inputs for map figures); figures on "
        "fewer than 100 inputs are indicative.", "",
        f"Interpretation robustness of {ie.interpreter.upper()}, maps compared on the CAM's own grid, under "
        f"{len(protocols)} protocol(s):", "", *[f"- {p}" for p in protocols], ""]


def _split(cfg: Any) -> str:
    return "test" if str(cfg.evaluation.split) == "test" else "development (dev)"


def _cost(results: dict[str, Any]) -> str:
    """The training-cost table (each Int / Int-Adv variant's D and BatchNorm treatment beside it); a model loaded
    from a checkpoint names the file and its sha256."""
    def shown(r: dict[str, Any], key: str, modes: tuple[str, ...] = INTERPRETATION_MODES) -> Any:
        return r.get(key, "-") if r["mode"] in modes else "-"

    def ratio(r: dict[str, Any]) -> Any:
        return r["ratio"] if math.isfinite(r["ratio"]) else "- (no normal model)"

    return markdown_table(["model", "mode", "epochs", "gamma", "D", "BatchNorm", "CE input", "clean accuracy",
                           "s / epoch", "epoch time vs normal", "training s", "loaded from (sha256)"],
                          [[n, r["mode"], r["epochs"], shown(r, "gamma"), shown(r, "discrepancy"),
                            shown(r, "batchnorm", (*INTERPRETATION_MODES, "trades")),
                            shown(r, "ce_attack", ("int_adv",)), r["clean"],
                            *(["-", "-"] if "checkpoint_sha256" in r else [r["epoch_seconds"], ratio(r)]),
                            r["train_seconds"],
                            f"`{r['checkpoint']}` ({r['checkpoint_sha256']})" if "checkpoint_sha256" in r else "trained"]
                           for n, r in results.items()])


def report(cfg: Any, dm: Any, results: dict[str, Any], total: float) -> str:
    """``report.md`` of a finished run (``cfg``: the experiment's typed config)."""
    eps_list = [float(e) for e in cfg.evaluation.eps]
    headers = ["model", "attack"] + [_eps_label(e) for e in eps_list]
    archs = ", ".join(dict.fromkeys(str(r.get("arch", "?")) for r in results.values()))
    grid = lambda *a: _grid(results, eps_list, *a)  # noqa: E731
    ran = {r["attack"] for res in results.values() for r in res["rows"] if r["measure"] == "interpretation"}
    vii = [line for attack, title in (("aai_topk", "Boopathy et al.'s protocol"),
                                      ("topk", "our variant (ghorbani), not the reference protocol"))
           if attack in ran
           for line in (f"## AdvEdge Table VII layout: accuracy and Kendall tau, {title}", "",
                        table_vii(results, eps_list, attack), "", _table_vii_notes(results, eps_list, attack), "")]
    return "\n".join([
        f"# Interpretation-robust training: {archs} on {dm.describe()['name']}", "",
        *_intro(cfg, results, dm.num_classes), *vii,
        "## Accuracy, every attack", "",
        markdown_table(headers, grid("accuracy", ("clean", "pgd-ce"), "accuracy", "PGD-CE")
                       + grid("accuracy", ("autoattack",), "accuracy", "AutoAttack")
                       + grid("accuracy", ("autoattack",), "accuracy_on_correct",
                              "AutoAttack, on correctly classified inputs")), "",
        "## Kendall's tau of benign vs attacked CAM, every attack", "",
        markdown_table(headers, [row for attack, label in ATTACK_LABELS.items() if attack in ran
                                 for row in grid("interpretation", (attack,), "kendall_tau", label)]), "",
        f"## Every interpretation measure at {_eps_label(HEADLINE_EPS)}", "", *_full_table(results), "",
        f"## Int / Int-Adv (each model) against PGD-AT at {_eps_label(HEADLINE_EPS)} (paired tests on the same "
        "inputs)", "",
        *(_versus(results, seed=int(cfg.seed)) or ["- not measured"]), "",
        "## Checks", "", *(_checks(results) or ["- nothing to check (no AutoAttack or no normal model)"]), "",
        "## Training cost", "", _cost(results), "",
        f"Total experiment time {total:.0f} s.", "", "![accuracy and Kendall's tau](robust.png)", ""])
