"""The ``aid`` experiment's typed config (configs/experiments/aid.yaml): what it resolves to, the files it plans,
and one-line errors for bad keys and values before anything runs (no training here)."""
from __future__ import annotations

from pathlib import Path

import pytest

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
