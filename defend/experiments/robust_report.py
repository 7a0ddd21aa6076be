"""``report.md`` of the ``robust`` experiment: AdvEdge Table VII's layout, every row naming its attack, and the checks."""
from __future__ import annotations

from typing import Any

from .common import markdown_table

__all__ = ["report", "near_chance", "LABELS"]

LABELS = {"normal": "NT (normal)", "pgd_at": "PGD-AT", "int": "Int", "int_adv": "Int-Adv"}
HEADLINE_EPS = 8


def near_chance(clean: float, num_classes: int) -> bool:
    """A model whose clean accuracy is below twice chance has learnt too little for a robustness comparison."""
    return not clean >= 2.0 / num_classes


def _eps_label(e: Any) -> str:
    v = float(e)
    return "0" if v == 0 else (f"{int(v)}/255" if v.is_integer() else f"{v:g}/255")


def _pick(res: dict[str, Any], measure: str, attack: str, eps: Any) -> dict[str, Any] | None:
    return next((r for r in res["rows"] if r["measure"] == measure and r["attack"] == attack
                 and float(r["eps"]) == float(eps)), None)


def _grid(results, eps_list, measure: str, attacks: tuple[str, ...], field: str, label: str) -> list[list[Any]]:
    rows = []
    for name, res in results.items():
        vals = []
        for e in eps_list:
            hit = next((r for a in attacks if (r := _pick(res, measure, a, e)) is not None), None)
            vals.append(hit.get(field, "not measured") if hit else "-")
        rows.append([f"{LABELS.get(res['mode'], name)} `{name}`", label] + vals)
    return rows


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
    aa = lambda res: _pick(res, "accuracy", "autoattack-standard", at)  # noqa: E731
    topk = lambda res: _pick(res, "interpretation", "topk", at)  # noqa: E731
    for name, res in results.items():
        if ref is None or res is ref or res["mode"] not in ("int", "int_adv"):
            continue
        if aa(res) and aa(ref):
            d = aa(res)["accuracy"] - aa(ref)["accuracy"]
            lines.append(f"- {'PASS' if d >= 0.10 else 'FAIL'}: `{name}` AutoAttack accuracy at {_eps_label(at)} >= "
                         f"normal + 0.10 ({aa(res)['accuracy']:.3f} vs {aa(ref)['accuracy']:.3f}, {d:+.3f})")
        if topk(res) and topk(ref) and "kendall_tau" in topk(res) and "kendall_tau" in topk(ref):
            d = topk(res)["kendall_tau"] - topk(ref)["kendall_tau"]
            lines.append(f"- {'PASS' if d >= 0.2 else 'FAIL'}: `{name}` top-k-attack Kendall tau at {_eps_label(at)} >= "
                         f"normal + 0.2 ({topk(res)['kendall_tau']:.3f} vs {topk(ref)['kendall_tau']:.3f}, {d:+.3f})")
        d = res["clean"] - ref["clean"]
        lines.append(f"- {'PASS' if d >= -0.15 else 'FAIL'}: `{name}` clean accuracy within 15 points of normal "
                     f"({res['clean']:.3f} vs {ref['clean']:.3f}, {100 * d:+.1f} points)")
    return lines


def _versus(results: dict[str, Any], at: float = HEADLINE_EPS) -> list[str]:
    """Int-Adv against PGD-AT at the headline radius (Boopathy et al.'s claim: Int-Adv keeps explanations better)."""
    ia = next((r for r in results.values() if r["mode"] == "int_adv"), None)
    at_ = next((r for r in results.values() if r["mode"] == "pgd_at"), None)
    if ia is None or at_ is None:
        return []
    out = []
    for label, measure, attack, field in (("AutoAttack accuracy", "accuracy", "autoattack-standard", "accuracy"),
                                          ("PGD accuracy", "accuracy", "pgd-ce", "accuracy"),
                                          ("top-k-attack Kendall tau", "interpretation", "topk", "kendall_tau"),
                                          ("top-k-attack top-k intersection", "interpretation", "topk", "topk_intersection"),
                                          ("discrepancy-attack Kendall tau", "interpretation", "discrepancy", "kendall_tau")):
        a, b = _pick(ia, measure, attack, at), _pick(at_, measure, attack, at)
        if a and b and field in a and field in b:
            winner = "Int-Adv" if a[field] > b[field] else ("PGD-AT" if b[field] > a[field] else "tie")
            out.append(f"- {label}: Int-Adv {a[field]:.3f} vs PGD-AT {b[field]:.3f} ({winner} ahead)")
    return out


def _full_table(results: dict[str, Any], at: float = HEADLINE_EPS) -> list[str]:
    body = []
    for name, res in results.items():
        for r in res["rows"]:
            if r["measure"] == "interpretation" and float(r["eps"]) == at:
                body.append([name, r["attack"]] + [r.get(k, "not measured") for k in
                            ("kendall_tau", "spearman", "topk_intersection_k4", "topk_intersection_k8",
                             "topk_intersection_k16", "cosine", "com_shift", "kendall_tau_input_grid", "n_kept")])
        s = _pick(res, "max_sensitivity", "uniform-noise", at)
        if s:
            body.append([name, f"max-sensitivity (radius {s['radius']:.4f}, {s['samples']} samples)", s["max_sensitivity"]]
                        + ["-"] * 8)
    return [markdown_table(["model", "attack", "Kendall tau", "Spearman", "top-4 inter.", "top-8 inter.",
                            "top-16 inter.", "cosine", "CoM shift (px)", "tau (input grid)", "n kept"], body)]


def report(cfg: dict[str, Any], dm, results: dict[str, Any], rows: list[dict[str, Any]], num_classes: int,
           total: float) -> str:
    ecfg = cfg.get("evaluation") or {}
    eps_list = ecfg.get("eps", [0, 2, 4, 6, 8, 10])
    icfg = ecfg.get("interpretation") or {}
    pcfg, acfg = ecfg.get("pgd") or {}, ecfg.get("autoattack") or {}
    headers = ["model", "attack"] + [_eps_label(e) for e in eps_list]
    lines = [f"# Interpretation-robust training: {(cfg.get('model') or {}).get('arch', 'small_cnn')} on "
             f"{dm.describe()['name']}", ""]
    chance = [n for n, r in results.items() if near_chance(r["clean"], num_classes)]
    if chance:
        lines += [f"> **Smoke run: not a measurement.** {', '.join(chance)} reached clean accuracy below twice chance "
                  f"({2 / num_classes:.2f}); the figures below compare models that have not learnt the task.", ""]
    lines += [
        f"Accuracy: untargeted PGD on the cross-entropy ({pcfg.get('steps', 20)} steps of eps x "
        f"{pcfg.get('step_ratio', 0.25)}, random start, 1 restart) on the first {ecfg.get('n_images', 256)} test images; "
        f"AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; pyautoattack, the authors' code) on the first "
        f"{acfg.get('n_images', 64)} of them at {', '.join(_eps_label(e) for e in acfg.get('eps', [])) or 'no radius'}. "
        f"Seed {cfg.get('seed', 0)}.", "",
        f"Interpretation robustness of {icfg.get('interpreter', 'cam').upper()} on the first {icfg.get('n_images', 128)} "
        f"test images, maps compared on the CAM's own grid; the class is the benign prediction and only inputs whose "
        f"prediction the attack kept are scored. Top-k attack: {icfg.get('topk') or {}}; discrepancy attack: "
        f"{icfg.get('discrepancy') or {}}; noise: uniform in the ball, rounded to 8 bits.", "",
        "## Accuracy (AdvEdge Table VII, upper part)", "",
        markdown_table(headers, _grid(results, eps_list, "accuracy", ("clean", "pgd-ce"), "accuracy", "PGD-CE")
                       + _grid(results, eps_list, "accuracy", ("clean", "autoattack-standard"), "accuracy",
                               "AutoAttack")), "",
        "## Kendall's tau of benign vs attacked CAM (AdvEdge Table VII, lower part)", "",
        markdown_table(headers, _grid(results, eps_list, "interpretation", ("topk",), "kendall_tau", "top-k attack")
                       + _grid(results, eps_list, "interpretation", ("discrepancy",), "kendall_tau", "discrepancy attack")
                       + _grid(results, eps_list, "interpretation", ("noise",), "kendall_tau", "uniform noise")), "",
        f"## Every interpretation measure at {_eps_label(HEADLINE_EPS)}", "", *_full_table(results), "",
        f"## Int-Adv against PGD-AT at {_eps_label(HEADLINE_EPS)}", "", *(_versus(results) or ["- not measured"]), "",
        "## Checks", "", *(_checks(results) or ["- nothing to check (no AutoAttack or no normal model)"]), "",
        "## Training cost", "",
        markdown_table(["model", "mode", "epochs", "gamma", "CE input", "clean accuracy", "s / epoch",
                        "epoch time vs normal", "training s"],
                       [[n, r["mode"], r["epochs"], r["gamma"] if r["mode"] in ("int", "int_adv") else "-",
                         r["ce_attack"] if r["mode"] == "int_adv" else "-", r["clean"], r["epoch_seconds"], r["ratio"],
                         r["train_seconds"]] for n, r in results.items()]), "",
        f"Total experiment time {total:.0f} s.", "", "![accuracy and Kendall's tau](robust.png)", ""]
    return "\n".join(lines)
