"""ADV2 budget presets (issue 27 item 4): ``preset_of`` names the official (``paper``) and CPU budgets per interpreter
and nothing else; ADV2's ``c`` ramp reaches ``c`` and ``c_end`` at the first and last joint step and leaves a
constant ``c`` bit-identical; ``configs/evaluate/paper.yaml`` expands to the official numbers; every battery row,
attacks-experiment row and scorecard cell says which budget it ran."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _tiny import train_tiny_classifier

from attacks import ADV2, build_attack
from defend import load_card, save_classifier
from defend.cli import main as defend_main
from defend.evaluate import load_battery, main
from defend.experiments.scorecard import scorecard_table
from defend.presets import ATTACK_PRESETS, preset_of, preset_options

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = str(Path(__file__).parent / "data" / "evaluate_tiny.yaml")
PAPER_CAM = {"eps": 0.031, "alpha": 1 / 255, "warm_steps": 400, "steps": 1200, "c": 5.0, "c_end": 10.0}


# ------------------------------------------------------------------------------------------------ preset_of
@pytest.mark.parametrize("preset", ["paper", "cpu"])
@pytest.mark.parametrize("interp", ["cam", "grad", "mask", "rts"])
def test_preset_of_names_each_preset_from_the_attacks_own_budget(preset, interp):
    """An attack built with a preset's options reports a budget that preset_of names as that preset (RTS needs a
    trained network: its options on CAM give the same budget keys)."""
    engine = build_attack("adv2", "pgd", "cam" if interp == "rts" else interp, **preset_options(preset, interp))
    assert preset_of(interp, engine.budget) == preset
    other = "cpu" if preset == "paper" else "paper"
    assert preset_of(interp, ATTACK_PRESETS[other][interp]) == other


def test_the_attack_cores_defaults_are_the_cpu_preset_and_a_changed_budget_is_custom():
    for interp in ("cam", "grad", "mask"):
        assert preset_of(interp, build_attack("adv2", "pgd", interp).budget) == "cpu"
    assert preset_of("cam", build_attack("pgd", "pgd", None).budget) == "cpu"  # the plain attack: eps/alpha/warm
    paper = build_attack("adv2", "pgd", "cam", **PAPER_CAM).budget
    assert paper["c_end"] == 10.0 and preset_of("cam", paper) == "paper"
    for change in ({"steps": 1199}, {"warm_steps": 300}, {"alpha": 2 / 255}, {"eps": 8 / 255}, {"c_end": None},
                   {"c": 20.0}):
        budget = build_attack("adv2", "pgd", "cam", **{**PAPER_CAM, **change}).budget
        assert preset_of("cam", budget) == "custom", change
    # the same numbers on another interpreter's preset: RTS's official budget is 300 + 1,000
    assert preset_of("rts", paper) == "custom"
    assert preset_of("cam", build_attack("adv2", "cw", "cam").budget) == "custom"  # no eps / alpha: not PGD's


def test_paper_preset_holds_the_official_numbers_and_an_unknown_preset_is_one_line():
    assert ATTACK_PRESETS["paper"]["cam"] == PAPER_CAM
    assert ATTACK_PRESETS["paper"]["rts"] == {**PAPER_CAM, "warm_steps": 300, "steps": 1000}
    assert ATTACK_PRESETS["paper"]["grad"] == PAPER_CAM  # no official GRAD script: CAM's
    assert {k: ATTACK_PRESETS["paper"]["mask"][k] for k in ("warm_steps", "steps", "alpha")} == {
        "warm_steps": 100, "steps": 400, "alpha": 1 / 255}
    assert ATTACK_PRESETS["cpu"]["cam"] == {"eps": 0.031, "alpha": 2 / 255, "warm_steps": 60, "steps": 80,
                                            "c": 20.0, "c_end": 20.0}
    with pytest.raises(ValueError, match=r"attack preset 'gpu' is unknown; use one of paper, cpu"):
        preset_options("gpu", "cam")


# ------------------------------------------------------------------------------------------------ the c ramp
class _Recording(ADV2):
    """ADV2 recording the interpretation-loss weight each joint step's loss uses."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.used: list[float] = []

    def c_at(self, frac: float) -> float:
        c = super().c_at(frac)
        self.used.append(c)
        return c


class _Constant(ADV2):
    """ADV2 as it was before the ramp: the loss weight is ``c`` at every step."""

    def c_at(self, frac: float) -> float:
        return self.c


def _tiny_attack(cls: type[ADV2], **kw) -> tuple[ADV2, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.round(x * 255) / 255
    attack = cls("grad", "pgd", framework_options={"eps": 8 / 255, "alpha": 2 / 255}, warm_steps=2, steps=5, **kw)
    return attack, attack(model, x, torch.tensor([1, 2])).x_adv


def test_c_ramp_reaches_c_and_c_end_at_the_first_and_last_joint_step():
    attack, _ = _tiny_attack(_Recording, c=5.0, c_end=10.0)
    assert len(attack.used) == 5 and attack.used[0] == 5.0 and attack.used[-1] == 10.0
    assert attack.used == sorted(attack.used) and attack.budget["c_end"] == 10.0


def test_no_c_end_is_bit_identical_to_a_constant_c():
    ramp_off, x_off = _tiny_attack(_Recording, c=5.0)
    _, x_before = _tiny_attack(_Constant, c=5.0)
    assert ramp_off.used == [5.0] * 5 and "c_end" not in ramp_off.budget
    assert torch.equal(x_off, x_before)


# ------------------------------------------------------------------------------------------------ batteries
def test_paper_battery_expands_to_the_official_budgets_per_interpreter():
    battery, _ = load_battery("paper")
    assert battery.attacks.attack_preset == "paper"
    a = battery.attacks
    assert a.options_for("pgd", "cam") == PAPER_CAM
    assert a.options_for("pgd", "grad") == PAPER_CAM
    assert a.options_for("pgd", "rts") == {**PAPER_CAM, "warm_steps": 300, "steps": 1000}
    assert a.options_for("pgd", "mask")["warm_steps"] == 100 and a.options_for("pgd", "mask")["steps"] == 400
    assert a.options_for("pgd", None, battery.adaptive.options) == PAPER_CAM  # the ensemble: CAM's
    for interp in ("cam", "grad", "rts"):  # RTS needs a trained network: its options on CAM, same budget keys
        engine = build_attack("adv2", "pgd", "cam" if interp == "rts" else interp, **a.options_for("pgd", interp))
        assert preset_of(interp, engine.budget) == "paper"
    # explicit options still override the preset
    over, _ = load_battery("paper", {"attacks.per_interpreter": {"cam": {"steps": 10}}})
    assert over.attacks.options_for("pgd", "cam") == {**PAPER_CAM, "steps": 10}
    # quick and standard name no preset: eps 8/255 over the core's values, labelled custom
    for name in ("quick", "standard"):
        b, _ = load_battery(name)
        assert b.attacks.attack_preset is None and b.attacks.options_for("pgd", "cam")["eps"] == 8 / 255
        assert preset_of("cam", build_attack("adv2", "pgd", "cam", **b.attacks.options_for("pgd", "cam")).budget) \
            == "custom"


def test_a_bad_battery_preset_is_a_one_line_error():
    with pytest.raises(ValueError, match="attack_preset") as err:
        load_battery("quick", {"attacks.attack_preset": "gpu"})
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, one_thread):
    model, _, _ = train_tiny_classifier(steps=60, width=4)
    path = tmp_path_factory.mktemp("clf") / "tiny.pt"
    save_classifier(model, path, {"width": 4})
    return path


@pytest.fixture(scope="module")
def preset_card(tiny_path, tmp_path_factory):
    """The tiny battery under the cpu preset, GRAD's joint steps overridden (so its rows are custom)."""
    root = tmp_path_factory.mktemp("card")
    battery = yaml.safe_load(Path(TINY).read_text())
    battery["attacks"] = {**battery["attacks"], "attack_preset": "cpu", "per_interpreter": {"grad": {"steps": 2}}}
    del battery["attacks"]["options"]
    (root / "battery.yaml").write_text(yaml.safe_dump(battery))
    out = root / "out"
    rc = main(["--classifier", str(tiny_path), "--out", str(out), "--battery", str(root / "battery.yaml"),
               "--no-progress", "--battery.autoattack.eps=[]", "--battery.topk.interpreters=[]"])
    assert rc == 0
    return out


def test_every_battery_row_says_which_budget_it_ran(preset_card):
    card = load_card(preset_card)
    rows, transfer = card["results"]["attacks"], card["results"]["transfer"]
    assert rows and transfer
    for r in rows + transfer:
        assert r["budget_preset"] == preset_of(r.get("interpreter") or r["source"], r["budget"]), r
        assert r["seconds_per_input"] >= 0
    std = {r["interpreter"]: r for r in rows if r["kind"] == "standard"}
    assert std["cam"]["budget_preset"] == "cpu" and std["cam"]["budget"]["warm_steps"] == 60
    assert std["cam"]["budget"]["steps"] == 80 and std["cam"]["budget"]["c"] == 20.0
    assert std["grad"]["budget_preset"] == "custom" and std["grad"]["budget"]["steps"] == 2
    ens = next(r for r in rows if r["kind"] == "adaptive")
    assert ens["budget_preset"] == "cpu" and ens["budget"]["c"] == 20.0  # the ensemble takes CAM's budget
    assert {t["budget_preset"] for t in transfer if t["source"] == "grad"} == {"custom"}
    report = (preset_card / "report.md").read_text()
    assert "eps 0.031, 60+80 steps, cpu budget" in report and "eps 0.031, 60+2 steps, custom budget" in report
    assert "`attacks.attack_preset` `cpu`" in report
    header = (preset_card / "attacks.csv").read_text().splitlines()[0].split(",")
    assert "budget_preset" in header


def test_scorecard_cells_carry_the_budget_preset(preset_card):
    card = load_card(preset_card)
    headers, _, metrics, _ = scorecard_table({"normal": card})
    adv2 = next(h for h in headers if h.startswith("ADV2 ("))
    assert "cpu budget" in adv2 and "custom budget" in adv2
    cells = {(m["interpreter"], m["column"]): m for m in metrics}
    assert cells[("cam", "adv2")]["budget_preset"] == "cpu"
    assert cells[("grad", "adv2")]["budget_preset"] == "custom"


# ------------------------------------------------------------------------------------------------ experiments
def _attacks_config(tmp_path: Path, clf: Path, preset: str) -> Path:
    cfg = {"experiment": "attacks", "seed": 0, "attack_preset": preset,
           "data": {"class_path": "DigitsDataModule", "init_args": {"seed": 0, "renders_per_digit": [1, 1, 1]}},
           "classifier": {"checkpoint": str(clf), "module": {"arch": "small_cnn", "model_options": {"width": 4}}},
           "evaluation": {"attacks": ["pgd", "adv2"], "frameworks": ["pgd"], "interpreters": ["cam"],
                          "n_images": 4, "batch_size": 4, "n_figure": 1, "cache_dir": None}}
    path = tmp_path / "attacks.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_attacks_experiment_rows_carry_the_preset_they_ran(tiny_path, tmp_path):
    out = tmp_path / "out"
    assert defend_main(["experiment", "-c", str(_attacks_config(tmp_path, tiny_path, "cpu")), "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert rows and {r["budget_preset"] for r in rows} == {"cpu"}
    adv2 = next(r for r in rows if r["attack"] == "adv2" and "read_by" not in r)
    assert (adv2["budget_warm_steps"], adv2["budget_steps"], adv2["budget_c"]) == (60, 80, 20.0)
    assert all(r["seconds_per_input"] >= 0 for r in rows)
    assert "the rows ran cpu budgets" in (out / "report.md").read_text()


def test_attacks_experiment_paper_preset_sets_the_official_budget_under_the_sections():
    from defend.experiments.attacks import AttacksExperiment
    from defend.typed_config import parse_typed

    raw = yaml.safe_load(Path("configs/experiments/attacks.yaml").read_text())
    raw.pop("quick")
    cfg = parse_typed(AttacksExperiment, {**raw, "attack_preset": "paper"})[0]
    for interp in ("cam", "grad", "mask"):
        opts = cfg.attack_options("adv2", "pgd", interp)
        assert preset_of(interp, build_attack("adv2", "pgd", interp, **opts).budget) == "paper"
    assert preset_of("cam", build_attack("pgd", "pgd", None, **cfg.attack_options("pgd", "pgd", None)).budget) \
        == "paper"
    assert cfg.attack_options("adv2", "pgd", "cam")["steps"] == 1200
    # the shipped config is the cpu preset, and its sections override a preset's keys
    ship = parse_typed(AttacksExperiment, raw)[0]
    assert ship.attack_preset == "cpu"
    for interp in ("cam", "grad", "mask"):
        opts = ship.attack_options("adv2", "pgd", interp)
        assert preset_of(interp, build_attack("adv2", "pgd", interp, **opts).budget) == "cpu"
    over = parse_typed(AttacksExperiment, {**raw, "attack_preset": "paper", "attack": {"warm_steps": 7}})[0]
    assert over.attack_options("adv2", "pgd", "cam")["warm_steps"] == 7
