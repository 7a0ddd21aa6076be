"""The ``aid`` experiment's typed config (configs/experiments/aid.yaml): what it resolves to, the files it plans,
and one-line errors for bad keys and values before anything runs (no training here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from defend.experiments.config import parse_experiment
from defend.experiments.runner import load_experiments, planned_outputs, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "experiments" / "aid.yaml")


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Run where no classifier checkpoint exists (the config is checked, nothing is reused or trained)."""
    monkeypatch.chdir(tmp_path)
    load_experiments()


def parse(*sets: str, quick: bool = True):
    return parse_experiment(resolve_config([CONFIG], [f"--{s}" for s in sets], quick=quick))


def test_quick_config_resolves_to_the_module_arguments_of_both_runs():
    spec, cfg, text = parse()
    plan = cfg.training
    shared = {"width": 32, "explain": "label", "optimiser": {"name": "adam", "lr": 0.001},
              "objective": {"tv_weight": 1.0, "area_weight": 8.0, "area_power": 0.3, "destroyer_weight": 5.0,
                            "destroyer_power": 0.3, "preserver_weight": 1.0, "replacement": "random",
                            "class_weight": 1.0}}
    assert plan.options("rts") == {**shared, "aid": {"weight": 0.0}}
    assert plan.options("aid") == {**shared, "aid": {"weight": 1.0, "every": 4, "mode": "alternate", "lr": 0.0015,
                                                     "batch_size": 32, "anchor_weight": 100.0},
                                   "attack": {"eps": 0.031, "alpha": 0.00784, "warm_steps": 10, "steps": 20,
                                              "c": 20.0, "enc_weight": 0.1}}
    assert (plan.rts.max_epochs, plan.rts.limit_train_batches) == (1, 40)
    assert (plan.aid.max_epochs, plan.aid.limit_train_batches, plan.aid.init) == (1, 23, "rts")
    ev = cfg.evaluation
    assert (ev.n_images, ev.batch_size, ev.n_figure) == (16, 16, 4)
    assert ev.attack.alpha == 1 / 255 and (ev.attack.warm_steps, ev.attack.steps) == (20, 30)
    assert "training:" in text and "init: rts" in text
    out = Path("runs/aid")
    names = {p.name for p in planned_outputs(spec, cfg, out)}
    assert {"aid.png", "rts.pt", "rts_aid.pt", "digits_small_cnn.pt", "metrics.json"} <= names


@pytest.mark.parametrize("setting, pattern", [
    ("evaluaton.n_images=2", r"unknown key 'evaluaton' in the top level; did you mean 'evaluation'\?"),
    ("evaluation.n_imgaes=2", r"unknown key 'n_imgaes' in evaluation; did you mean 'n_images'\?"),
    ("training.rts.max_epoch=2", r"unknown key 'max_epoch' in training.rts; did you mean 'max_epochs'\?"),
    ("training.aid.init=scrach", r"training.aid.init"),
    ("training.module.widht=3", r"training.module \(AIDModule\): unknown option 'widht'; did you mean 'width'\?"),
    ("training.aid.module.aid.evry=2", r"training.aid.module \(AIDModule\): unknown option 'aid.evry'; "
                                       r"did you mean 'aid.every'\?"),
    ("training.aid.module.init_from=x.pt", r"unknown option 'init_from'"),
    ("training.aid.module.aid.weight=0", r"training.aid.module.aid.weight must be > 0"),
    ("training.rts.module.aid.weight=1", r"training.rts is the plain RTS"),
    ("training.aid.select.max_localisation_drop=1.5", r"training.aid.select.*must lie in \[0, 1\]"),
    ("training.aid.select.max_localisation_drop=1", r"training.aid.select.max_localisation_drop must be < 1"),
    ("training.aid.module.val_max_localisation_drop=1.5", r"val_max_localisation_drop must lie in \[0, 1\)"),
    ("training.aid.module.aid.every=0", r"training.aid: need aid.every >= 1"),
    ("training.aid.init=scratch", r"aid.anchor_weight or aid.anchor_aid_weight > 0 needs aid.anchor_from or init_from"),
    ("training.aid.module.aid.anchor_from=missing.pt", r"anchor_from: checkpoint not found"),
    ("training.module.optimiser.schedule=onecycle", r"optimiser.schedule must be 'constant'"),
    ("evaluation.attack.alpha=-1", r"evaluation.attack.alpha.*radius must lie in \[0, 1\]"),
    ("evaluation.attack.eps=0.001", r"evaluation.attack: eps 0.001 is below one uint8 level"),
    ("evaluation.n_figure=20", r"evaluation.n_figure \(20\) cannot exceed evaluation.n_images \(16\)"),
    ("evaluation.noise.sigmas=[]", r"evaluation.noise"),
])
def test_bad_settings_are_one_line_errors(setting, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        parse(setting)
    assert "\n" not in str(info.value)


def test_selection_needs_the_anchor_and_resolves():
    _, cfg, _ = parse()
    sel = cfg.training.aid.select
    assert sel is not None and (sel.attack_batches, sel.max_localisation_drop, sel.val_batches) == (1, 0.1, 2)
    full = parse(quick=False)[1].training.aid
    assert (full.max_epochs, full.limit_train_batches) == (10, None)  # 79-batch epochs: 3 l_int steps after the last l_aid
    with pytest.raises(ValueError, match=r"training.aid.select measures localisation against the anchor network"):
        parse("training.aid.module.aid.anchor_weight=0")
    _, cfg, _ = parse("training.aid.module.aid.anchor_weight=0", "training.aid.select=null")
    assert cfg.training.aid.select is None


def test_selection_report_marks_the_kept_candidate_by_its_batch_count():
    """Two candidates inside one epoch: the row kept is the one with the selected batch count, and a run whose
    best candidate is outside the budget says so."""
    from defend.experiments.aid import _selection_lines

    _, cfg, _ = parse(quick=False)
    hist = [{"epoch": 1, "batches": 30, "val/l1_adv": 0.02, "val/localisation": 0.63, "val/aid_score": 0.02},
            {"epoch": 1, "batches": 60, "val/l1_adv": 0.03, "val/localisation": 0.60, "val/aid_score": 0.03},
            {"epoch": 2, "batches": 90, "val/l1_adv": 0.04, "val/localisation": 0.50, "val/aid_score": -0.1}]
    text = "\n".join(_selection_lines(cfg, {"epochs": 6, "selected_epoch": 1, "selected_batches": 60,
                                            "selection": hist}))
    kept = [row for row in text.splitlines() if row.endswith("| kept |")]
    assert len(kept) == 1 and kept[0].startswith("| 1 | 60 |")
    assert "after 60 batches (epoch 1 of 6)" in text
    bad = [{**h, "val/aid_score": -0.05} for h in hist[:1]]
    text = "\n".join(_selection_lines(cfg, {"epochs": 6, "selected_epoch": 1, "selected_batches": 30,
                                            "selection": bad}))
    assert "No candidate kept its validation localisation within the budget" in text


# --------------------------------------------------------------------------------------------- issue 27 (H3b)
# The adaptive figures, the fair baseline and the reuse of saved networks, on a tiny classifier and random-init RTS
# networks with tiny budgets (seconds, no RTS training).
def _tiny_setup():
    import torch
    from _tiny import train_tiny_classifier

    from attacks import RTSNetwork

    model, test, _ = train_tiny_classifier(steps=60, n_test=64)
    ok = model(test["image"]).argmax(1) == test["label"]
    data = {k: v[ok][:8] for k, v in test.items()}

    def net(seed: int) -> RTSNetwork:
        torch.manual_seed(seed)
        return RTSNetwork(model.stage_channels, model.num_classes, width=8).eval()

    return model, data, {"rts_selector": net(1), "rts": net(2), "rts_aid": net(3)}


@pytest.fixture(scope="module")
def evaluated(one_thread):
    """Every interpreter attacked by plain ADV2 and the adaptive attack on the same inputs (tiny budgets)."""
    from defend.experiments.aid import AdaptiveAttack, AIDAttack, AIDEvaluation, _evaluate

    model, data, nets = _tiny_setup()
    ev = AIDEvaluation(n_images=8, batch_size=8, attack=AIDAttack(eps=16 / 255, alpha=2 / 255, warm_steps=4, steps=4,
                                                                  c=20.0),
                       adaptive=AdaptiveAttack(n_images=6, restarts=1, enc_weight=0.5, c_values=[5.0], transfer=True))
    res, extra = _evaluate(model, nets, data, ev, seed=0, num_classes=10, progress=False)
    return model, data, nets, res, extra


def test_adaptive_figures_are_never_weaker_than_plain_adv2_on_the_same_inputs(evaluated):
    """Per input where plain ADV2 reached the target: adaptive L1 <= plain L1 and success kept; the plain figures
    are those of the evaluation's own run on the same first inputs; every run of adaptive_rts is offered (the
    transfer from the plain RTS against RTS-AID only)."""
    _, _, _, res, _ = evaluated
    bit = 0
    for name, r in res.items():
        ad = r["adaptive"]
        per, n = ad["per_input"], ad["adaptive_n"]
        assert n == 6
        assert torch.equal(per["plain_l1_benign_vs_adv2"], r["per_input"]["l1_benign_vs_adv2"][:6])
        ok = per["plain_asr"].bool()
        bit += int(ok.sum())
        assert bool((per["adaptive_asr"] >= per["plain_asr"]).all())
        assert bool((per["adaptive_l1_benign_vs_adv2"][ok] <= per["plain_l1_benign_vs_adv2"][ok]).all())
        assert ad["adaptive_weaker_inputs"] == 0
        kept = dict(part.rsplit(": ", 1) for part in ad["adaptive_kept"].split("; "))
        assert sum(int(v) for v in kept.values()) == n
        assert ("transfer[0]" in kept) == (name == "rts_aid") and {"adv2 (evaluation run)", "enc", "c=5"} <= set(kept)
        assert ad["adaptive_budget_preset"] == "custom" and ad["adaptive_seconds_per_input"] > 0
    assert bit >= 6  # the property bites on enough inputs


def test_a_weaker_adaptive_run_never_replaces_the_plain_figure(evaluated):
    """An adaptive attack that does nothing (returns the clean input) leaves every figure at plain ADV2's: the
    evaluation run is kept on every input it won."""
    from types import SimpleNamespace

    from defend.experiments.aid import _adaptive_one

    model, data, nets, res, extra = evaluated
    r = res["rts"]

    class NoOp:
        run_names = ["noop"]
        budget: dict = {}

        def __call__(self, model, x, target, target_map=None):
            self.last_choice = torch.zeros(x.shape[0], dtype=torch.long)
            return SimpleNamespace(x_adv=x.clone())

    from attacks import RTSInterpreter

    ad = _adaptive_one(model, NoOp(), r, RTSInterpreter(nets["rts"], enc_weight=0.1), data["image"][:6],
                       extra["y_t"][:6], 8)
    per = ad["per_input"]
    ok = per["plain_asr"].bool()
    assert torch.equal(per["adaptive_l1_benign_vs_adv2"][ok], per["plain_l1_benign_vs_adv2"][ok])
    assert torch.equal(per["adaptive_asr"], per["plain_asr"].float())
    assert ad["adaptive_kept"].startswith(f"adv2 (evaluation run): {int(ok.sum())}")


def test_fair_baseline_row_class_query_sensitivity_and_drift_are_the_hand_computed_ones(evaluated):
    """The selector-trained RTS is the baseline of the ratio; each row's class-query sensitivity is the map L1
    between the clean input explained for its true class and for the target class, computed here by calling the
    networks directly; the benign drift and the ratios are against the baseline's maps."""
    from attacks import RTSInterpreter
    from defend.experiments.aid import _rows

    model, data, nets, res, extra = evaluated
    x, y, y_t = data["image"], data["label"], extra["y_t"]
    trained = {k: {"reused": f"{k}.pt", "sha256": "0" * 64} for k in nets}
    by = {r["interpreter"]: r for r in _rows(res, extra, trained, 0, "test")}
    assert by["rts_selector"]["baseline"] is True and by["rts"]["baseline"] is False
    assert (by["rts_selector"]["selector"], by["rts"]["selector"]) == ("trained", "untrained")
    assert by["rts_aid"]["baseline_interpreter"] == "rts_selector"

    def maps(name, cls):
        with torch.no_grad():
            return RTSInterpreter(nets[name])(model, x, cls)

    for name in nets:
        hand = float((maps(name, y) - maps(name, y_t)).abs().flatten(1).mean(1).mean())
        assert by[name]["class_query_l1"] == pytest.approx(hand, rel=1e-5)
        assert by[name]["class_query_l1_ci_low"] <= by[name]["class_query_l1"] <= by[name]["class_query_l1_ci_high"]
        assert by[name]["budget_preset"] == "custom" and by[name]["seconds_per_input"] > 0
        assert by[name]["checkpoint_sha256"] == "0" * 64 and "train_seconds" not in by[name]
    drift = float((maps("rts_aid", y) - maps("rts_selector", y)).abs().flatten(1).mean(1).mean())
    assert by["rts_aid"]["benign_drift_l1"] == pytest.approx(drift, rel=1e-5)
    assert "benign_drift_l1" not in by["rts_selector"]
    l1 = {k: float(res[k]["per_input"]["l1_benign_vs_adv2"].double().mean()) for k in nets}
    assert by["rts_aid"]["l1_ratio"] == pytest.approx(l1["rts_aid"] / l1["rts_selector"], rel=1e-6)
    assert by["rts_aid"]["vs_rts_l1_ratio"] == pytest.approx(l1["rts_aid"] / l1["rts"], rel=1e-6)
    ad = {k: float(res[k]["adaptive"]["per_input"]["adaptive_l1_benign_vs_adv2"].double().mean()) for k in nets}
    assert by["rts_aid"]["adaptive_l1_ratio"] == pytest.approx(ad["rts_aid"] / ad["rts_selector"], rel=1e-6)


def test_fair_baseline_must_train_its_selector():
    with pytest.raises(ValueError, match=r"training.rts_selector trains the class selector: set training.rts_selector"
                                         r".module.objective.fake_label_prob > 0") as info:
        parse("training.rts_selector.module.objective.fake_label_prob=0")
    assert "\n" not in str(info.value)
    _, cfg, _ = parse()
    assert cfg.training.options("rts_selector")["objective"]["fake_label_prob"] == 0.3
    assert cfg.training.options("rts_selector")["aid"] == {"weight": 0.0}
    assert "fake_label_prob" not in cfg.training.options("rts")["objective"]  # the AID start stays recipe 3's
    assert cfg.evaluation.adaptive is not None and cfg.evaluation.adaptive.restarts == 1


@pytest.mark.parametrize("setting, pattern", [
    ("training.rts.checkpoint=missing.pt", r"training.rts.checkpoint: checkpoint not found"),
    ("training.aid.checkpoint=missing.pt", r"training.aid.checkpoint: checkpoint not found"),
    ("training.rts_selector.checkpoint=missing.pt", r"training.rts_selector.checkpoint: checkpoint not found"),
    ("evaluation.adaptive.long_factor=1", r"evaluation.adaptive.long_factor must be > 1"),
])
def test_reuse_refuses_a_missing_file_in_one_line(setting, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        parse(setting)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_thread) -> dict[str, Path]:
    """A tiny classifier and three RTS networks saved as an earlier run would have (rts_selector.pt, rts.pt,
    rts_aid.pt)."""
    from defend.aid import save_rts
    from defend.classifier import save_classifier

    tmp_path = tmp_path_factory.mktemp("saved")
    model, _, nets = _tiny_setup()
    save_classifier(model, tmp_path / "clf.pt", {"width": 8})
    files = {"classifier": tmp_path / "clf.pt"}
    for name, net in nets.items():
        files[name] = tmp_path / "saved" / f"{name}.pt"
        files[name].parent.mkdir(exist_ok=True)
        save_rts(net, files[name])
    return files


def test_reuse_loads_saved_networks_reports_their_sha256_and_trains_nothing(tmp_path, monkeypatch, capsys, saved):
    from defend.experiments import aid as aid_experiment
    from defend.experiments.runner import main
    from defend.io import file_sha256

    files = saved
    overlay = tmp_path / "reuse.yaml"
    overlay.write_text(
        f"classifier: {{checkpoint: {files['classifier']}, module: {{model_options: {{width: 8}}}}}}\n"
        "training:\n"
        f"  rts_selector: {{checkpoint: {files['rts_selector']}}}\n"
        f"  rts: {{checkpoint: {files['rts']}}}\n"
        f"  aid: {{checkpoint: {files['rts_aid']}}}\n"
        "evaluation: {n_images: 4, batch_size: 4, n_figure: 2, attack: {warm_steps: 2, steps: 2},\n"
        "             adaptive: {n_images: 2, restarts: 1, c_values: null, long_factor: null}}\n")

    def no_training(*args, **kwargs):
        raise AssertionError("a reused network was trained")

    monkeypatch.setattr(aid_experiment, "train_rts", no_training)
    rc = main(["-c", CONFIG, "-c", str(overlay), "--out", str(tmp_path / "out"), "--quick", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert not any((out / f"{k}.pt").exists() for k in ("rts_selector", "rts", "rts_aid"))
    rows = {r["interpreter"]: r for r in json.loads((out / "metrics.json").read_text())}
    report = (out / "report.md").read_text()
    for name in ("rts_selector", "rts", "rts_aid"):
        sha = file_sha256(files[name])
        assert rows[name]["checkpoint_sha256"] == sha and rows[name]["reused_checkpoint"] == str(files[name])
        assert "train_seconds" not in rows[name] and "epoch_seconds" not in rows[name]
        assert f"reused `{files[name]}` (sha256 `{sha}`)" in report
    assert "Every network was reused." in report and "l_aid steps trained by RTS-AID: none (reused network)" in report
    assert rows["rts_aid"]["adaptive_l1_ratio"] is not None and "strongest attack" in report


def test_reuse_refuses_a_network_that_does_not_fit_the_classifier(tmp_path, capsys, saved):
    """A saved RTS built for another classifier is refused in one line before anything runs (no output)."""
    from attacks import RTSNetwork
    from defend.aid import save_rts
    from defend.experiments.runner import main

    files = saved
    save_rts(RTSNetwork([4, 8, 16], 3, width=8).eval(), tmp_path / "other.pt")
    rc = main(["-c", CONFIG, "--out", str(tmp_path / "out"), "--quick", "--no-progress",
               f"--classifier.checkpoint={files['classifier']}", f"--training.rts.checkpoint={tmp_path / 'other.pt'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "training.rts.checkpoint" in err and "does not fit classifier" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
