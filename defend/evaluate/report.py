"""What ``defend evaluate`` writes besides ``card.json``: ``report.md`` (readable tables), one CSV per table, the
figures (``maps.png``, ``attacks.png``, ``roc.png``, ``certified.png``) and the adversarial sets (``adversarial/<attack>_<interp>.pt``)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import stats
from ..detector import trunk_description
from ..evaluation import interpret
from ..figures import bar_panels, certified_plot, map_grid, roc_plot
from ..io import MANIFEST, OutputGuard, atomic_write_text, load_artifact, save_artifact
from ..rows import TABLES as ROW_TABLES
from ..rows import DetectorSweepRow, Row, csv_columns, markdown_cells, markdown_headers, radius_text
from ..tables import markdown_table
from .measure import AttackSet
from .system import interpreters_for

__all__ = ["TABLES", "table_rows", "write_tables", "write_report", "write_figures", "save_sets", "load_sets",
           "SET_KIND"]

#: artifact kind of a saved adversarial set
SET_KIND = "adversarial-set"

#: the CSV tables: file -> (results key, columns); every figure with its 95 % interval columns (from
#: :data:`defend.rows.TABLES`: the row types are the one source of the columns)
TABLES = {name: (key, csv_columns(cls)) for name, (key, cls) in ROW_TABLES.items()}


def table_rows(results: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The flat rows of one table (the budget's eps / steps / k lifted to columns)."""
    value = results.get(key)
    if value is None:
        return []
    rows = value["rows"] if key == "detection" else (value if isinstance(value, list) else [value])
    out = []
    for r in rows:
        budget = r.get("budget") or {}
        out.append({**{k: v for k, v in r.items() if k not in ("budget", "roc")},
                    **{k: budget.get(k) for k in ("eps", "steps", "k") if k in budget}})
    return out


def write_tables(out: Path, results: dict[str, Any]) -> list[str]:
    """One CSV per table with rows; returns the file names."""
    names = []
    for name, (key, cls) in ROW_TABLES.items():
        rows, columns = table_rows(results, key), csv_columns(cls)
        if not rows:
            continue
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        atomic_write_text(out / name, buf.getvalue())
        names.append(name)
    return names


def _detector_line(det: dict[str, Any] | None) -> str:
    """The detector's path, the interpreters it reads and what its trunk started from."""
    if not det:
        return "none"
    return (f"`{det['path']}` reading {'+'.join(det['interpreters'])}; "
            f"{trunk_description(det.get('hparams', {}).get('pretrained'))}")


def _md(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table (:func:`defend.tables.markdown_table`) as report lines, then a blank line."""
    return [*markdown_table(headers, rows).splitlines(), ""]


def _v(row: dict[str, Any], name: str, n: int | None = None) -> str:
    """``0.480 [0.42, 0.54]`` (with ``n`` where given: ``, n 256`` or ``, indicative (n = 32)``)."""
    return stats.format_value(row.get(name), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high"), n)


def _table(key: str, rows: list[dict[str, Any]], section: Any = None) -> list[str]:
    """The report.md table of the rows of results ``key``: the columns its row type declares
    (:func:`defend.rows.markdown_headers`)."""
    cls: type[Row] = next(c for k, c in ROW_TABLES.values() if k == key)
    return _md(markdown_headers(cls), [markdown_cells(cls, r, section) for r in rows])


def _not_meaningful(card: dict[str, Any], section: str) -> list[str]:
    """The banner of a section whose figures mean nothing (the classifier is at chance), else nothing."""
    v = card["validity"]
    if v["meaningful"] or section not in v["sections"]:
        return []
    return [f"> **Not meaningful: the classifier is at chance.** {v['reason']}; the figures below are kept for the "
            "record only.", ""]


def write_report(out: Path, card: dict[str, Any]) -> None:
    """``report.md``: what was evaluated, then one table per measurement (every figure with its 95 % interval, n and
    budget; figures on fewer than 100 inputs marked indicative; sections flagged when the classifier is at
    chance)."""
    s, d, r = card["system"], card["data"], card["results"]
    lines = [f"# Model card: `{s['classifier']['path']}`", "",
             f"Schema {card['schema_version']}, mode `{card['mode']}`, battery `{card['battery']['name']}` "
             f"(seed {card['battery']['seed']}). Data: {d['name']} ({d['num_classes']} classes, "
             f"{'x'.join(str(v) for v in d['image_shape'])}), digest `{d['digest']}`; {d['n_attack_inputs']} "
             "correctly classified test inputs attacked, random target classes.", "",
             f"- classifier sha256 `{s['classifier']['sha256'][:16]}`, arch `{s['classifier']['meta'].get('arch')}`",
             f"- RTS: {'`' + s['rts']['path'] + '`' if s['rts'] else 'none'}",
             f"- detector: {_detector_line(s['detector'])}",
             f"- wall time {card['provenance']['seconds']:.0f} s; command `{card['provenance']['command']}`",
             "- every figure: value [95 % interval] (Wilson for rates and accuracies, a percentile bootstrap over "
             f"inputs for means, seed {card['battery']['seed']}); fewer than 100 inputs: indicative only", ""]
    c = r["clean_accuracy"]
    lines += ["## Clean accuracy", "", *_table("clean_accuracy", [c])]
    if not card["validity"]["meaningful"]:
        lines += [f"> **Warning: {card['validity']['reason']}.**", ""]
    if r["autoattack"]:
        lines += [f"## Robust accuracy under AutoAttack ({_autoattack_version(r['autoattack'])}, L-inf)", "",
                  *_not_meaningful(card, "autoattack"),
                  "On the first n test inputs, a clean error counting as a failure (RobustBench's convention); the "
                  "last column is over the correctly classified ones among them.", "",
                  *_table("autoattack", r["autoattack"])]
    if r["interpretation_robustness"]:
        lines += ["## Interpretation robustness under the top-k attack (benign vs attacked maps, prediction kept)", "",
                  *_not_meaningful(card, "interpretation_robustness"),
                  *_table("interpretation_robustness", r["interpretation_robustness"])]
    lines += (_attack_section(card, r["attacks"]) + _transfer_section(card, r["transfer"])
              + _detection_section(card, r["detection"]) + _certify_section(card, r.get("certification") or [])
              + _entry_section(card))
    figures = card["files"]["figures"]
    lines += [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def _entry_section(card: dict[str, Any]) -> list[str]:
    """The card's leaderboard entry (``defend bench`` ranks it with the cards of the same protocol)."""
    e, p = card.get("entry"), card.get("protocol")
    if e is None or p is None:
        return []
    proto = f"`{p['name']}`" if p["name"] else "a battery of your own (no frozen protocol)"
    return ["## Leaderboard entry", "",
            f"`{e['name']}` ({e['source']}), protocol {proto}, hash `{p['sha256'][:16]}`; "
            f"{e['architecture']}, defence {e['defence']['name'] or 'not named'}, L-inf eps "
            f"{radius_text(e['threat_model']['eps'])}. Dual robustness: an attacked input counts as broken when an "
            "attack reaches its target class (with a detector: and evades it); adaptive: by any standard or "
            "adaptive attack.", "",
            *_md(["clean", "AutoAttack", f"Kendall tau ({e['topk_interpreter'] or '-'})", "dual robustness",
                  "dual robustness (adaptive)", "adaptive gap"],
                 [[_v(e, "clean_acc", e["clean_n"]), _v(e, "autoattack_acc", e["autoattack_n"]),
                   _v(e, "topk_tau", e["topk_n"]), _v(e, "dual_robustness", e["dual_n"]),
                   _v(e, "dual_robustness_adaptive", e["dual_n"]),
                   _v(e, "adaptive_gap") + ("" if e["adaptive_gap_p"] is None
                                            else f" (McNemar p {e['adaptive_gap_p']:.2g})")]])]


def _certify_section(card: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The randomized-smoothing certificates (``results.certification``), their settings and how an L2 radius
    relates to L-inf."""
    if not rows:
        return []
    c, shape = rows[0], card["data"]["image_shape"]
    d = int(np.prod(shape))
    return ["## Certified robustness (randomized smoothing, L2)", "",
            f"Certificates of the smoothed system (majority under N(0, sigma^2 I) noise, not the base classifier): "
            f"sigma {c['sigma']:g}, n0 {c['n0']}, n {c['n_noise']} noise samples, alpha {c['alpha']:g} per "
            f"certificate, top {c['k_percent']:g} % of each map with the {c['correction']} correction over its "
            f"pixels, a map certified when {c['share']:g} of its top-k pixels are; on the first {c['n']} test inputs, "
            "correctly classified or not (a wrong or abstained prediction is not certified); each certificate holds "
            f"with probability >= 1 - alpha (the dual one >= 1 - 2 alpha). Radii are L2 in image units: an L-inf "
            f"ball of eps lies inside the L2 ball of eps * sqrt(d) (d = {'x'.join(str(v) for v in shape)} = {d}), "
            "so radius r covers L-inf eps <= r / sqrt(d), given in brackets in 1/255 (docs/certify.md).", "",
            *_table("certification", rows)]


def _autoattack_version(rows: list[dict[str, Any]]) -> str:
    """``standard``, or the reduced version with the attacks it ran (the class count rules out the targeted DLR)."""
    b = rows[0]["budget"]
    if b.get("version", "standard") == "standard":
        return "standard"
    return f"{b['version']} version: {', '.join(a.upper() for a in b.get('attacks', []))}; see the rows' note"


def _attack_section(card: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    return ["## Interpretation attacks (success = target class reached; maps compared to the benign map)", "",
            *_not_meaningful(card, "attacks"),
            "IoU: top-k IoU averaged over k = 5, 10, 20, 30, 50 % of the pixels; `IoU by chance` is what two "
            "unrelated maps score.", "",
            f"Budget: eps, warm-start + joint steps and which ADV2 budget the row ran (battery `attacks.attack_preset`"
            f" {_preset_name(card)}): `paper` = the official ADV2 scripts' (step 1/255, CAM 400 + 1,200 steps with c "
            "ramped 5 -> 10, ...), `cpu` = our scaled-down CPU budget, `custom` = neither (docs/card.md).", "",
            *_table("attacks", rows)]


def _preset_name(card: dict[str, Any]) -> str:
    """The battery's attack preset as report.md names it (``null`` when the battery set none)."""
    preset = (card["battery"].get("attacks") or {}).get("attack_preset")
    return f"`{preset}`" if preset else "`null`"


def _transfer_section(card: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    readers = list(dict.fromkeys(t["read_by"] for t in rows))
    keys = list(dict.fromkeys((t["attack"], t["source"]) for t in rows))
    body = [[a, s] + [next((_v(t, "l1") for t in rows if (t["attack"], t["source"], t["read_by"]) == (a, s, rd)),
                           None) for rd in readers] for a, s in keys]
    n = rows[0]["n"]
    return [f"## Transfer matrix: map L1 to the benign map (rows: crafted against, columns: read by; n {n}"
            + (", indicative" if stats.indicative(n) else "") + ")", "", *_not_meaningful(card, "transfer"),
            *_md(["attack", "crafted against"] + readers, body)]


def _threshold_text(key: str, t: dict[str, Any]) -> str:
    label = {"fpr1": "1 %", "fpr5": "5 %"}.get(key, key)
    if not t["supported"]:
        return f"{label} FPR: {t['note']}"
    return (f"{label} FPR -> threshold {t['threshold']:.3f} ({t['note']}; realised on the test benign inputs "
            f"{_v(t, 'test_fpr')})")


def _detection_section(card: dict[str, Any], det: dict[str, Any] | None) -> list[str]:
    if not det:
        return []
    th = det["thresholds"]
    return [f"## Detection ({'+'.join(det['interpreters'])}{' +product' if det['product'] else ''})", "",
            *_not_meaningful(card, "detection"),
            *[f"- {_threshold_text(k, t)}" for k, t in th.items()],
            f"- benign false-positive rate at 0.5 on {det['n_benign']} test inputs: {_v(det, 'benign_fpr_default')}",
            "",
            *_table("detection", det["rows"], det), *_sweep_section(det.get("sweep"))]


def _fit_text(fit: dict[str, Any] | None) -> str:
    if not fit:
        return "not measured"
    num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"R^2 {num(fit['r2'])}, sign agreement {num(fit['sign_agreement'])}, Spearman {num(fit['spearman'])} "
            f"(n {fit['n']})")


def _sweep_section(sweep: dict[str, Any] | None) -> list[str]:
    """The detector-aware attack swept over its weight (``results.detection.sweep``): its points (the Pareto front
    marked), the strongest weight against the plain attack, the budget check and the surrogate's fit."""
    if not sweep:
        return []
    head = ["### Detector-aware attack, swept over `detector_weight`", ""]
    if sweep["status"] != "measured":
        return [*head, f"Not measured: {sweep['status']}.", ""]
    p = sweep.get("evasion_vs_plain_p")
    verdict = (sweep.get("budget_check") or {}).get("verdict", "not run")
    return [*head, f"Evasion is judged by the real booster at its 5 % FPR threshold ({sweep['threshold_fpr5']:.3f}); "
            f"the attack's stand-in is the `{sweep['surrogate']}` surrogate.", "",
            *_md(markdown_headers(DetectorSweepRow), [markdown_cells(DetectorSweepRow, r, sweep) for r in sweep["rows"]]),
            f"- strongest weight {sweep['strongest_weight']}: evasion minus the plain attack's on the same inputs "
            f"{_v(sweep, 'evasion_vs_plain_diff')}, McNemar p = {'-' if p is None else f'{p:.3g}'}",
            f"- twice the steps: {verdict}",
            f"- surrogate fit on held-out maps: {_fit_text(sweep.get('surrogate_held_out'))}; on the attack's inputs: "
            f"{_fit_text(sweep.get('surrogate_along_iterates'))}", ""]


def _label(c: int, names: list[str]) -> str:
    return f"{c} ({names[c]})" if names and names[c] != str(c) else str(c)


def write_figures(out: Path, system: Any, sets: list[Any], benign: dict[str, Any], results: dict[str, Any],
                  n_show: int) -> list[str]:
    """``maps.png`` (benign and adversarial images and maps), ``attacks.png``, with a detector ``roc.png`` and with
    certificates ``certified.png``."""
    files = []
    std = [s for s in sets if s.kind == "standard"]
    if std and n_show > 0:
        x, y, yt = std[0].x[:n_show], std[0].label[:n_show], std[0].target[:n_show]
        names = list(getattr(system.data, "class_names", []) or [])
        columns = [("input", x), (f"{std[0].attack} vs {std[0].interpreter}", std[0].x_adv[:n_show])]
        interps = interpreters_for(system, list(benign))
        for name, g in interps.items():
            columns.append((f"{name.upper()} benign", benign[name][:n_show]))
            for s in std:
                if s.interpreter == name:
                    columns.append((f"{name.upper()} {s.attack}", interpret(g, system.classifier, s.x_adv[:n_show], yt)))
        labels = [f"{_label(int(a), names)} -> {_label(int(b), names)}" for a, b in zip(y, yt)]
        map_grid(out / "maps.png", columns, rows=min(n_show, x.shape[0]), row_labels=labels,
                 title="Benign and adversarial inputs and maps (rows: true -> target class)")
        files.append("maps.png")
    main = [a for a in results["attacks"] if a["read_by"] in a["interpreter"].split("+")]
    if main:
        groups = [f"{a['attack']} / {a['interpreter']}" + (f" ({a['read_by']})" if "+" in a["interpreter"] else "")
                  for a in main]
        bar_panels(out / "attacks.png", groups, {
            "success rate\n(higher: stronger attack)": {"success": [a["asr"] for a in main]},
            "map L1 to benign\n(higher: map moved more)": {"map L1": [a["l1"] for a in main]},
            "IoU with benign map\n(lower: map moved more)": {"IoU": [a["iou"] for a in main]}},
            title="Interpretation attacks (success, map L1 and IoU to benign; one measure per panel)")
        files.append("attacks.png")
    det = results.get("detection")
    if det and any(d["roc"] for d in det["rows"]):
        curves = {f"{d['attack']} / {d['interpreter']}": (d["roc"]["fpr"], d["roc"]["tpr"], d["auc"])
                  for d in det["rows"] if d["roc"]}
        roc_plot(out / "roc.png", curves, title=f"Detector ROC ({det['n_benign']} benign inputs)")
        files.append("roc.png")
    if results.get("certification"):
        certified_figure(out / "certified.png", results["certification"])
        files.append("certified.png")
    return files


def certified_figure(path: Path, rows: list[dict[str, Any]]) -> None:
    """``certified.png``: certified accuracy against the L2 radius (Cohen et al.'s Figure 1) for the prediction,
    and per interpreter for the map (inputs with ``share`` of their top-k pixels certified) and both."""
    names = list(dict.fromkeys(r["interpreter"] for r in rows))
    by = {n: [r for r in rows if r["interpreter"] == n] for n in names}
    radii = [r["radius"] for r in by[names[0]]]
    series = {"prediction": [r["certified_accuracy"] for r in by[names[0]]]}
    for n in names:
        series[f"map ({n})"] = [r["map_certified"] for r in by[n]]
        series[f"prediction and map ({n})"] = [r["dual_certified_accuracy"] for r in by[n]]
    c = rows[0]
    certified_plot(path, radii, series, f"Certified accuracy (sigma {c['sigma']:g}, n {c['n_noise']}, alpha "
                                        f"{c['alpha']:g}, {c['n']} inputs)")


def save_sets(out: Path, sets: list[Any], meta: dict[str, Any]) -> list[str]:
    """Each set as ``adversarial/<attack>_<interpreter>.pt`` (:func:`defend.io.save_artifact`: tensors only, loaded
    with ``weights_only``), so another system can be scored on exactly these inputs (``--inputs``)."""
    files = []
    for s in sets:
        rel = f"adversarial/{s.name}.pt"
        state = {"x": s.x.cpu(), "x_adv": s.x_adv.cpu(), "label": s.label.cpu(), "target": s.target.cpu()}
        save_artifact(out / rel, SET_KIND, state, {"attack": s.attack, "interpreter": s.interpreter, "kind": s.kind,
                                                   "budget": s.budget, "file": rel, **meta})
        files.append(rel)
    return files


def load_sets(directory: str | Path) -> list[Any]:
    """The adversarial sets an earlier ``defend evaluate`` wrote into ``directory`` (its ``--out``, or that folder's
    ``adversarial/``): only those its ``card.json`` lists (``files.adversarial``) and its output manifest records
    with the sha256 they still have; any other ``*.pt`` there is ignored with a notice, a listed set that was
    changed or is not recorded is refused (one line). The sets' content is checked against the data by
    :func:`~defend.evaluate.measure.check_set`."""
    root = _run_dir(Path(directory))
    listed = _listed_sets(root)
    stray = sorted(p.name for p in (root / "adversarial").glob("*.pt") if f"adversarial/{p.name}" not in listed) \
        if (root / "adversarial").is_dir() else []
    sets = []
    for rel in listed:
        f = root / rel
        payload = load_artifact(f, SET_KIND, data=_recorded_bytes(root, rel))
        st, meta = payload["state"], dict(payload["meta"])
        missing = [k for k in ("x", "x_adv", "label", "target") if not isinstance(st.get(k), torch.Tensor)]
        if missing:
            raise ValueError(f"--inputs: {f} lacks {', '.join(missing)}")
        meta["file"] = str(f)
        sets.append(AttackSet(str(meta.get("attack", f.stem)), str(meta.get("interpreter", "?")), "rescored",
                              dict(meta.get("budget") or {}), st["x"].float(), st["x_adv"].float(), st["label"].long(),
                              st["target"].long(), meta))
    if stray:
        print(f"[evaluate] notice: ignoring {len(stray)} file(s) in {root / 'adversarial'} that the run's card does "
              f"not list: {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}", file=sys.stderr, flush=True)
    return sets


def _run_dir(d: Path) -> Path:
    """The output directory of the earlier run ``--inputs`` names (``d`` or, for its ``adversarial/``, the parent)."""
    if not d.is_dir():
        raise FileNotFoundError(f"--inputs: no such directory '{d}'")
    for root in (d, d.parent):
        if (root / "card.json").is_file():
            return root
    raise FileNotFoundError(f"--inputs: {d} holds no card.json: give the --out directory of an earlier defend "
                            "evaluate run")


def _listed_sets(root: Path) -> list[str]:
    """``files.adversarial`` of ``root/card.json`` (the card itself unchanged since the run wrote it)."""
    _recorded_bytes(root, "card.json")
    try:
        listed = json.loads((root / "card.json").read_text())["files"]["adversarial"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--inputs: {root / 'card.json'} does not list its adversarial sets "
                         f"({type(exc).__name__}): re-run defend evaluate") from None
    good = isinstance(listed, list) and all(isinstance(r, str) and re.fullmatch(r"adversarial/[\w.+-]+\.pt", r)
                                            and ".." not in r for r in listed)
    if not good or not listed:
        raise ValueError(f"--inputs: {root / 'card.json'} lists no saved adversarial sets (files.adversarial: "
                         f"{str(listed)[:80]}); give the --out directory of a defend evaluate run that crafted them")
    return list(dict.fromkeys(listed))


def _recorded_bytes(root: Path, rel: str) -> bytes:
    """The bytes of ``root/rel`` when the run's output manifest records them with this sha256; refused otherwise."""
    f, recorded = root / rel, OutputGuard(root).files.get(rel)
    if recorded is None:
        raise ValueError(f"--inputs: {f} is not recorded in {root / MANIFEST}: defend did not write it there; "
                         "re-run defend evaluate to craft the sets")
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"--inputs: cannot read {f} ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != recorded:
        raise ValueError(f"--inputs: {f} was changed since defend wrote it (its sha256 differs from the one in "
                         f"{root / MANIFEST}); re-run defend evaluate to craft the sets again")
    return data
