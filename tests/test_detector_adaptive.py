"""The detector-aware attack swept over its weight (issue 27, item 1: the detector): never weaker than the plain
attack per input, its Pareto front, the convergence check, the surrogate's held-out fit, and where it runs."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import r2_score

from defend.detector_sweep import Judged, budget_verdict, keep_best, pareto_front

torch.set_num_threads(1)


def test_pareto_front_on_hand_made_points():
    # (evasion, iou): b dominates a; c and d trade off; e equals d on both (neither dominates); f misses a figure
    pts = [(0.2, 0.5), (0.3, 0.6), (0.8, 0.2), (0.5, 0.4), (0.5, 0.4), (None, 0.9)]
    assert pareto_front(pts) == [False, True, True, True, True, False]
    assert pareto_front([(0.1, 0.1)]) == [True]


def _judged(hit, flagged, iou=None):
    hit, flagged = torch.tensor(hit, dtype=torch.bool), torch.tensor(flagged, dtype=torch.bool)
    iou = torch.zeros(hit.numel()) if iou is None else torch.tensor(iou)
    return Judged(hit, flagged, iou, torch.zeros(hit.numel(), 1, 2, 2))


def test_budget_check_says_budget_too_small_when_doubling_the_steps_helps():
    n = 40
    normal = _judged([True] * n, [True] * 30 + [False] * 10)  # evades 10 of 40
    longer = _judged([True] * n, [False] * 35 + [True] * 5)  # evades 35 of 40: 30 inputs only it, 5 only normal
    out = budget_verdict(normal, longer, seed=0)
    assert out["too_small"] and out["verdict"].startswith("budget too small: 2x the steps helps the attack")
    assert out["evasion"] == 0.25 and out["evasion_longer"] == 0.875
    assert out["evasion_p"] == pytest.approx(binomtest(5, 35, 0.5).pvalue)  # McNemar exact on the discordant pairs
    same = budget_verdict(normal, _judged([True] * n, [True] * 29 + [False] * 11), seed=0)  # one input: noise
    assert not same["too_small"] and same["verdict"].startswith("converged: 2x the steps does not help")
    worse = budget_verdict(longer, normal, seed=0)  # a longer run that does worse is not "too small"
    assert not worse["too_small"]


def test_keep_best_prefers_evasion_then_target_then_iou_and_the_plain_attack_on_ties():
    x = [torch.full((4, 1), float(i)) for i in range(3)]
    plain = _judged([True, True, False, True], [False, True, False, True], [0.5, 0.9, 0.1, 0.3])
    a = _judged([True, True, True, True], [True, False, False, True], [0.9, 0.2, 0.0, 0.3])
    b = _judged([True, True, True, True], [False, False, False, True], [0.5, 0.4, 0.2, 0.2])
    xb, j = keep_best([(x[0], plain), (x[1], a), (x[2], b)])
    # input 0: plain evades (tie with b on iou: plain kept); 1: b evades with the higher iou; 2: b reaches the
    # target and evades; 3: nobody evades, all reach: the highest iou, plain first on the tie with a
    assert xb.flatten().tolist() == [0.0, 2.0, 2.0, 0.0]
    assert j.evaded.tolist() == [True, True, True, False] and j.iou.tolist() == pytest.approx([0.5, 0.4, 0.2, 0.3])


@pytest.fixture(scope="module")
def tiny_detector():
    """A tiny digits classifier, a detector (booster + distilled surrogate, CAM + GRAD maps) trained on 25 benign
    inputs and their ADV2 inputs, and 12 other correctly classified inputs with targets to attack."""
    from _tiny import train_tiny_classifier

    from attacks import build_attack, get_interpreter, random_targets
    from defend.detector import train_detector

    model, test, _ = train_tiny_classifier(n_test=None)
    with torch.no_grad():
        ok = model(test["image"]).argmax(1) == test["label"]
    x, y = test["image"][ok], test["label"][ok]
    interps = {n: get_interpreter(n) for n in ("cam", "grad")}

    def stacked(xx, cls):
        return torch.cat([g(model, xx, cls) for g in interps.values()], 1)

    xa, ya = x[:25], y[:25]
    ta = random_targets(ya, 10, torch.Generator().manual_seed(1))
    fit = build_attack("adv2", "pgd", list(interps), **OPTS)(model, xa, ta)
    maps = torch.cat([stacked(xa, ya), stacked(fit.x_adv[fit.success], ta[fit.success])])
    labels = torch.cat([torch.zeros(25), torch.ones(int(fit.success.sum()))]).long()
    det, _ = train_detector(maps, labels, epochs=0, trainable="none", booster={"n_estimators": 40}, seed=0)
    xb, yb = x[25:37], y[25:37]
    return {"model": model, "detector": det, "interps": interps, "x": xb, "y": yb, "benign_dev": x[37:77],
            "target": random_targets(yb, 10, torch.Generator().manual_seed(0)), }


OPTS = dict(eps=16 / 255, alpha=2 / 255, warm_steps=10, steps=15, c=20.0, seed=0)


def test_the_sweep_never_evades_less_than_plain_adv2_per_input_and_reports_its_figures(tiny_detector):
    from attacks import build_attack
    from defend.detection_data import compute_maps, stack_maps
    from defend.detector_sweep import SweepSetup, detector_sweep
    from defend.evaluate.measure import fpr_threshold

    t = tiny_detector
    model, det, x, target = t["model"], t["detector"], t["x"], t["target"]
    dev_maps, _ = compute_maps(model, t["benign_dev"], t["interps"])
    threshold, _ = fpr_threshold(det.predict_proba(stack_maps(dev_maps, ["cam", "grad"])), 0.05)
    plain = build_attack("adv2", "pgd", "cam", **OPTS)
    plain_x = plain(model, x, target).x_adv
    setup = SweepSetup(model, det, t["interps"], False, threshold, x, target, det.attack_surrogate("distilled"),
                       options={k: v for k, v in OPTS.items() if k != "seed"}, batch_size=12)
    held = stack_maps(compute_maps(model, t["benign_dev"], t["interps"])[0], ["cam", "grad"])
    out = detector_sweep(setup, plain_x, plain_attack="adv2", plain_budget=plain.budget, weights=[0.0, 2.0],
                         restarts=2, budget_check=False, held_out_maps=held)
    base, *points = out["points"]
    assert base["attack"] == "adv2" and base["detector_weight"] is None and len(points) == 2
    # what the plain attack's inputs do against the REAL booster at the 5 %-FPR threshold, measured here
    maps, pred = compute_maps(model, plain_x, t["interps"])
    plain_evaded = (pred == target) & ~(det.predict_proba(stack_maps(maps, ["cam", "grad"])) > threshold)
    assert base["per_input"]["evasion"] == [float(v) for v in plain_evaded]
    for p in points:  # the plain attack is a candidate of every weight: never weaker, per input
        assert all(a >= b for a, b in zip(p["per_input"]["evasion"], base["per_input"]["evasion"]))
        assert p["evasion_rate_fpr5"] == sum(p["per_input"]["evasion"]) / 12 and p["n"] == 12
        assert p["evasion_rate_fpr5_ci_low"] <= p["evasion_rate_fpr5"] <= p["evasion_rate_fpr5_ci_high"]
        assert p["budget"]["restarts"] == 2 and p["budget_preset"] == "custom" and p["seconds_per_input"] > 0
    assert out["strongest"] in (0.0, 2.0) and any(p["pareto"] for p in points)
    assert out["budget_check"] is None  # off here (the experiment's test runs it)
    assert out["versus_plain"]["evasion_vs_plain_diff"] >= 0
    # the held-out fit is scikit-learn's r2 of the booster's margins against the surrogate's log-odds on those maps
    z = det.booster.predict(det.features(held).numpy(), output_margin=True)
    s = det.surrogate(det.features(held)).detach().numpy()
    assert out["surrogate"]["held_out"]["r2"] == pytest.approx(r2_score(z.astype(float), s.astype(float)), abs=1e-9)
    assert out["surrogate"]["held_out"]["n"] == 40 and out["surrogate"]["along_iterates"]["n"] == 2 * 2 * 12


def test_the_detector_experiment_sweeps_the_detector_it_saved(tmp_path):
    """The tiny detector run attacks the detector it saved with the detector-aware sweep: every weight evades the
    REAL booster at least as often as the plain attack on the same inputs, the report has the table, the Pareto
    figure, the convergence verdict and the surrogate's held-out fit (on the test maps: 2 x n_test of them)."""
    import json

    from test_detector import _tiny_detector_run

    code, out = _tiny_detector_run(tmp_path, "attack.eps=0.2", "attack.alpha=8/255", "attack.warm_steps=20",
                                   "attack.steps=6", "per_interpreter.grad.steps=6", "per_interpreter.cam.steps=6",
                                   "detection.n_adaptive=10", "detection.adaptive.warm_steps=10",
                                   "detection.adaptive.steps=6", "detection.adaptive.eps=0.2",
                                   "detection.sweep.weights=[0,2]", "detection.sweep.restarts=1",
                                   "detection.sweep.budget_check=true")
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())
    points = [r for r in rows if r["detector"] == "detector-aware"]
    summary = [r for r in rows if r["detector"] == "detector-aware summary"]
    assert [p["detector_weight"] for p in points] == [None, 0.0, 2.0] and len(summary) == 1
    plain = points[0]
    assert plain["attack"] == "advedge" and plain["n"] == 10 and plain["interpreters"] == "grad+cam"
    for p in points[1:]:  # the plain attack's input is a candidate of every weight: never fewer evasions
        assert p["evasion_rate_fpr5"] >= plain["evasion_rate_fpr5"] and p["budget_restarts"] == 1
        assert p["budget_preset"] in ("paper", "cpu", "custom") and p["seconds_per_input"] > 0
    s = summary[0]
    assert s["budget_check_steps_factor"] == 2 and s["budget_check_verdict"].split(":")[0] in (
        "budget too small", "converged")
    assert s["surrogate_held_out_n"] == s["n_test"] and s["surrogate_iterates_n"] == 2 * 10
    assert s["n_benign_dev"] == 20 == s["n_benign_test"] and s["strongest_weight"] in (0.0, 2.0)  # every benign input
    report = (out / "report.md").read_text()
    assert "### Detector-aware attack on grad+cam" in report and s["budget_check_verdict"] in report
    assert "on held-out test maps R^2" in report and (out / "detector_pareto.png").stat().st_size > 0
    _evaluate_sweeps_the_saved_detector(tmp_path, out / "detectors" / "cam")


def _evaluate_sweeps_the_saved_detector(tmp_path, detector):
    """``defend evaluate --detector`` on the detector the run saved runs the same sweep from the battery's keys; its
    rows are typed card rows (the card validates), and the sweep is never weaker than plain ADV2 per input."""
    import json
    from pathlib import Path

    from defend.evaluate.cli import main

    tiny = Path(__file__).parent / "data" / "evaluate_tiny.yaml"
    out = tmp_path / "card"
    keys = ["autoattack.eps=[]", "topk.interpreters=[]", "adaptive.ensemble=[]", "detector.n_benign=200",
            "attacks.options.eps=0.2", "attacks.options.alpha=8/255", "attacks.options.warm_steps=10",
            "adaptive.detector_weights=[0,2]", "adaptive.detector_restarts=1", "adaptive.detector_budget_check=false"]
    assert main(["--classifier", str(tmp_path / "clf.pt"), "--detector", str(detector), "--out", str(out),
                 "--battery", str(tiny), "--no-progress", *[f"--battery.{k}" for k in keys]]) == 0
    sweep = json.loads((out / "card.json").read_text())["results"]["detection"]["sweep"]
    assert sweep["status"] == "measured" and sweep["surrogate"] in ("distilled", "head")
    plain, *points = sweep["rows"]
    assert plain["attack"] == "adv2" and plain["detector_weight"] is None and len(points) == 2
    for p in points:
        assert all(a >= b for a, b in zip(p["per_input"]["evasion"], plain["per_input"]["evasion"]))
        assert p["budget"]["detector_weight"] == p["detector_weight"] and p["budget"]["restarts"] == 1
        assert p["budget_preset"] in ("paper", "cpu", "custom")
    det = json.loads((out / "card.json").read_text())["results"]["detection"]
    # held out: the benign test maps and the plain attack's successful maps (how many depends on the tiny models)
    assert sweep["budget_check"] is None and sweep["surrogate_held_out"]["n"] == det["n_benign"] + plain["n_success"]
    report = (out / "report.md").read_text()  # the card's report shows the sweep, not only card.json
    assert "### Detector-aware attack, swept over `detector_weight`" in report
    assert f"strongest weight {sweep['strongest_weight']}:" in report and "twice the steps: not run" in report


def test_the_card_says_why_the_sweep_was_not_measured():
    """Without a 5 % FPR threshold (fewer than 200 development benign inputs) the sweep is not run and the card row
    says why and what to set; without a standard attack on the detector's interpreters, likewise."""
    from types import SimpleNamespace

    from defend.evaluate.battery import parse_battery
    from defend.evaluate.measure import AttackSet, detector_sweep_summary

    battery, _ = parse_battery({})
    system = SimpleNamespace(detector=SimpleNamespace(surrogate_kind=lambda kind: "head"),
                             detector_interpreters=["grad", "cam"])
    note = "not enough benign inputs for 5 % FPR (8 on the development split, 200 needed)"
    out = detector_sweep_summary(system, [], battery, {"supported": False, "note": note}, torch.zeros(0))
    assert out["status"] == f"not measured: {note} (set detector.n_benign)" and out["rows"] == []
    assert out["threshold_fpr5"] is None and out["evasion_vs_plain_diff"] is None
    foreign = AttackSet("adv2", "mask", "standard", {}, *[torch.zeros(1)] * 4)
    out = detector_sweep_summary(system, [foreign], battery, {"supported": True, "threshold": 0.7}, torch.zeros(0))
    assert out["status"] == "not measured: no standard attack against an interpreter the detector reads"
