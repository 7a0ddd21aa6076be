"""The ``robust`` experiment's typed config (configs/experiments/robust.yaml, robust_cifar10.yaml): what it resolves
to (radii in image units), the files it plans, and one-line errors for bad keys and values before anything trains."""
from __future__ import annotations

from pathlib import Path

import pytest

from defend.experiments.config import parse_experiment
from defend.experiments.runner import load_experiments, planned_outputs, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "experiments" / "robust.yaml")


@pytest.fixture(autouse=True)
def _loaded():
    load_experiments()


def parse(*sets: str, quick: bool = True, config: str = CONFIG):
    return parse_experiment(resolve_config([config], [f"--{s}" for s in sets], quick=quick))


def test_quick_config_resolves_to_the_module_arguments_of_every_model():
    from defend.experiments.robust import module_options

    spec, cfg, text = parse()
    shared = {"arch": "small_cnn", "model_options": {"width": 16}, "interpretation": "cam", "gamma": 1.0,
              "inner": {"eps": 8 / 255, "steps": 3, "alpha": 3 / 255, "ramp_epochs": 0.5, "random_start": True},
              "optimiser": {"name": "adam", "lr": 0.003, "schedule": "multistep", "milestones": [6], "decay": 0.1}}
    assert [m.name for m in cfg.models] == ["normal", "pgd_at", "int_adv"]
    assert module_options(cfg, cfg.models[0]) == {**shared, "mode": "normal"}
    assert module_options(cfg, cfg.models[2]) == {**shared, "mode": "int_adv", "ce_attack": "pgd"}
    assert cfg.training.max_epochs == 1 and cfg.models[0].max_epochs is None
    ev = cfg.evaluation
    assert [float(e) for e in ev.eps] == [0.0, 4 / 255, 8 / 255]  # image units, 8/255 exact
    assert [float(e) for e in ev.autoattack.eps] == [8 / 255] and ev.autoattack.n_images == 8
    assert (ev.pgd.steps, ev.interpretation.discrepancy.steps, ev.interpretation.topk["steps"]) == (5, 5, 10)
    names = {p.name for p in planned_outputs(spec, cfg, Path("runs/robust"))}
    assert {"robust.png", "normal.pt", "pgd_at.pt", "int_adv.pt", "metrics.json", "config.yaml"} <= names
    assert "eps: 8/255" in text


def test_full_config_keeps_its_values():
    _, cfg, _ = parse(quick=False)
    assert [round(float(e) * 255, 9) for e in cfg.evaluation.eps] == [0, 2, 4, 6, 8, 9, 10]  # AdvEdge Table VII
    assert [round(float(e) * 255, 9) for e in cfg.evaluation.autoattack.eps] == [4, 8]
    assert cfg.training.max_epochs == 8 and cfg.training.module["inner"]["ramp_epochs"] == 3


def test_cifar10_config_resolves(tmp_path):
    """The GPU config parses (its data module is checked, so it needs the CIFAR-10 batches: a tiny stand-in)."""
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(entry))
    _, cfg, _ = parse(f"data.init_args.root={tmp_path}", config=str(ROOT / "configs/experiments/robust_cifar10.yaml"))
    assert cfg.evaluation.pgd.steps == 10 and cfg.evaluation.interpretation.discrepancy.steps == 10
    assert cfg.training.module["inner"]["alpha"] == "2/255" and cfg.data.num_classes == 10


@pytest.mark.parametrize("setting, pattern", [
    ("evaluaton.n_images=2", r"unknown key 'evaluaton' in the top level; did you mean 'evaluation'\?"),
    ("evaluation.pgd.stpes=2", r"unknown key 'stpes' in evaluation.pgd; did you mean 'steps'\?"),
    ("training.module.gama=2", r"training.module \(RobustClassifierModule\): unknown option 'gama'; "
                               r"did you mean 'gamma'\?"),
    ("models=[{name: a, module: {mdoe: normal}}]", r"models\[0\].module \(RobustClassifierModule\): unknown option "
                                                    r"'mdoe'; did you mean 'mode'\?"),
    ("models=[{name: a, module: {inner: {stesp: 2}}}]", r"unknown option 'inner.stesp'; did you mean 'inner.steps'\?"),
    ("models=[{name: a, modul: 3}]", r"unknown key 'modul' in models; did you mean 'module'\?"),
    ("models=[{name: a, module: {mode: normal}}, {name: a, module: {mode: pgd_at}}]", r"model names must be unique"),
    ("models=[{name: x, module: {mode: adversarial}}]", r"unknown name 'adversarial' in models\[0\].module.mode"),
    ("training.module.interpretation=gard", r"unknown name 'gard' in models\[0\].module.interpretation"),
    ("training.module.inner.eps=8", r"inner.eps and inner.alpha are radii in image units"),  # the old 1/255 units
    ("evaluation.eps=[0,8]", r"evaluation.eps.*a radius must lie in \[0, 1\]"),
    ("evaluation.autoattack.eps=[6/255]", r"evaluation.autoattack.eps: .*must be > 0 and one of evaluation.eps"),
    ("evaluation.eps=[8/255]", r"evaluation.eps must include 0 \(the clean accuracy"),  # was a NaN crash at the end
    ("evaluation.interpretation.attacks=[topk,foo]", r"unknown name 'foo' in evaluation.interpretation.attacks"),
    ("evaluation.interpretation.topk={stpes: 3}", r"evaluation.interpretation.topk \(TopKAttack\): unknown option "
                                                   r"'stpes'; did you mean 'steps'\?"),
    ("evaluation.interpretation.n_images=100", r"cannot exceed evaluation.n_images"),
    ("training.module.inner.eps=0", r"models\[1\].module \(pgd_at\): mode 'pgd_at' needs inner.eps > 0"),
])
def test_bad_settings_are_one_line_errors(setting, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        parse(setting)
    assert "\n" not in str(err.value)
