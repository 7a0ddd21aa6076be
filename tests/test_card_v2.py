"""Card schema 2.0: the ``protocol`` and leaderboard ``entry`` of a real tiny ``defend evaluate`` run (its figures are
the card's own, the inputs' hash is the test split's), the dual robustness and adaptive gap counted by hand on
hand-made cards (a detector's by evasion), ``--defence`` refused in one line, and ``defend card upgrade`` of a 1.x
card (filled, validated, nulls named, a 2.0 card and an existing output refused, nothing overwritten)."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from _tiny import train_tiny_classifier

from defend import DigitsDataModule, save_classifier, stats, validate_card
from defend.evaluate import main
from defend.evaluate.card import CardError
from defend.evaluate.entry import dual_robustness, entry_from_card
from defend.evaluate.protocol import protocol_hash
from defend.evaluate.upgrade import main as upgrade

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = str(Path(__file__).parent / "data" / "evaluate_tiny.yaml")


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, one_thread):
    """A tiny evaluate run (tests/test_evaluate.py's sizes) labelled with --name / --source / --defence."""
    model, _, _ = train_tiny_classifier(steps=60, width=4)
    root = tmp_path_factory.mktemp("v2")
    save_classifier(model, root / "tiny.pt", {"width": 4})
    out = root / "tiny-entry"
    assert main(["--classifier", str(root / "tiny.pt"), "--out", str(out), "--battery", TINY, "--no-progress",
                 "--source", "https://example.org/paper", "--defence", "normal"]) == 0
    return out


def test_a_2_0_card_holds_its_protocol_and_entry_from_its_own_figures(card_run):
    card = json.loads((card_run / "card.json").read_text())
    validate_card(card)
    assert card["schema_version"] == "2.0.0"
    assert card["protocol"] == {"name": None, "sha256": protocol_hash(card["battery"]), "adapted_keys": []}
    e = card["entry"]
    assert (e["name"], e["source"], e["defence"]["name"]) == ("tiny-entry", "https://example.org/paper", "normal")
    assert e["architecture"] == "small_cnn (width 4)" and e["threat_model"] == {"norm": "Linf", "eps": 8 / 255}
    clean = card["results"]["clean_accuracy"]
    assert (e["clean_acc"], e["clean_acc_ci_low"], e["clean_n"]) == (clean["value"], clean["value_ci_low"], 64)
    aa = card["results"]["autoattack"][0]
    assert (e["autoattack_acc"], e["autoattack_n"]) == (aa["robust_accuracy"], aa["n"])
    tau = card["results"]["interpretation_robustness"][0]
    assert (e["topk_tau"], e["topk_interpreter"], e["topk_n"]) == (tau["kendall_tau"], "cam", tau["n_kept"])
    assert e["weights_sha256"] == {"classifier": card["system"]["classifier"]["sha256"], "rts": None,
                                   "detector": None}
    assert e["eval_seconds"] == card["provenance"]["seconds"] and e["external_evaluations"] == []
    assert {(a["attack"], a["interpreter"]) for a in e["attacks"]} == {
        ("adv2", "cam"), ("adv2", "grad"), ("adv2_ensemble", "cam"), ("adv2_ensemble", "grad")}
    assert e["adaptive_attacks"] == ["adv2_ensemble (cam+grad)"] and e["dual_n"] == card["data"]["n_attack_inputs"]
    assert e["dual_robustness_adaptive"] <= e["dual_robustness"] and e["adaptive_gap"] >= 0
    # a registered defence's interpreters are the ones counted: RTS-AID's (rts) were not attacked here
    assert entry_from_card(card, name="x", defence="rts_aid")["dual_robustness"] is None
    again = entry_from_card(card, name="x", defence="normal", inputs_sha256=e["inputs_sha256"])
    assert again == {**e, "name": "x", "source": "this run"}
    report = (card_run / "report.md").read_text()
    assert "## Leaderboard entry" in report and stats.format_value(
        e["dual_robustness"], e["dual_robustness_ci_low"], e["dual_robustness_ci_high"], e["dual_n"]) in report


def test_inputs_sha256_is_the_test_split_images_as_uint8(card_run):
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    images = torch.stack([dm.test_dataset[i]["image"] for i in range(len(dm.test_dataset))])
    expected = hashlib.sha256((images * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()
    card = json.loads((card_run / "card.json").read_text())
    assert card["entry"]["inputs_sha256"] == expected
    assert any(r["split"] == "test" and r["max_n"] == len(dm.test_dataset) for r in card["provenance"]["data_read"])


def _attack(attack: str, interpreter: str, kind: str, asr: list[int], read_by: str | None = None) -> dict:
    return {"attack": attack, "interpreter": interpreter, "kind": kind, "read_by": read_by or interpreter,
            "per_input": {"asr": [float(v) for v in asr]}}


def _hand_card(rows: list[dict], detection: dict | None = None) -> dict:
    return {"system": {"detector": {"sha256": "0" * 64} if detection else None},
            "battery": {"seed": 0}, "results": {"attacks": rows, "detection": detection}}


def test_dual_robustness_is_the_count_by_hand():
    card = _hand_card([_attack("adv2", "cam", "standard", [1, 0, 0, 0]),
                       _attack("adv2", "grad", "standard", [0, 0, 0, 1]),
                       _attack("adv2", "grad", "standard", [1, 1, 1, 1], read_by="cam"),  # a transfer read: not counted
                       _attack("adv2_ensemble", "cam+grad", "adaptive", [1, 1, 0, 1], read_by="cam"),
                       _attack("adv2_ensemble", "cam+grad", "adaptive", [1, 1, 0, 1], read_by="grad")])
    d = dual_robustness(card)
    assert d["dual_robustness"].value == 0.5 and d["dual_robustness_adaptive"].value == 0.25
    assert d["adaptive_gap"].value == pytest.approx(0.25) and d["dual_n"] == 4
    assert d["adaptive_gap"].low >= 0 and d["adaptive_gap_p"] == 1.0  # one discordant input: McNemar p = 1
    assert d["adaptive_attacks"] == ["adv2_ensemble (cam+grad)"]
    only_cam = dual_robustness(card, ["cam"])  # a defence's interpreters: grad's attack does not count
    assert only_cam["dual_robustness"].value == 0.75 and only_cam["dual_robustness_adaptive"].value == 0.25
    # an adaptive attack weaker than the plain ones cannot raise the adaptive figure above the plain one
    weak = _hand_card([_attack("adv2", "cam", "standard", [1, 1, 0, 0]),
                       _attack("adaptive_rts", "rts", "adaptive", [0, 0, 0, 0])])
    w = dual_robustness(weak)
    assert w["dual_robustness"].value == w["dual_robustness_adaptive"].value == 0.5 and w["adaptive_gap"].value == 0


def test_a_detector_card_counts_evasion_not_success():
    rows = [_attack("adv2", "cam", "standard", [1, 1, 1, 1])]  # every input reaches the target ...
    detection = {"rows": [  # ... but the detector flags most of them
        {"attack": "adv2", "interpreter": "cam", "kind": "standard", "per_input": {"evasion": [0.0, 0.0, 1.0, 0.0]}},
        {"attack": "adaptive_detector", "interpreter": "grad-cam", "kind": "adaptive",
         "per_input": {"evasion": [0.0, 1.0, 0.0, 0.0]}}]}
    d = dual_robustness(_hand_card(rows, detection))
    assert d["dual_robustness"].value == 0.75 and d["dual_robustness_adaptive"].value == 0.5
    assert d["adaptive_attacks"] == ["adaptive_detector (grad-cam)"]


def test_missing_per_input_values_give_null_figures_not_a_guess():
    rows = [_attack("adv2", "cam", "standard", [1, 0]), {**_attack("adv2", "grad", "standard", [0, 0]),
                                                         "per_input": None}]
    d = dual_robustness(_hand_card(rows))
    assert d["dual_robustness"].value is None and d["dual_n"] is None and d["adaptive_gap_p"] is None
    no_adaptive = dual_robustness(_hand_card(rows[:1]))
    assert no_adaptive["dual_robustness"].value == 0.5 and no_adaptive["dual_robustness_adaptive"].value is None


def test_an_unknown_defence_or_an_empty_name_is_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--classifier", str(tmp_path / "missing.pt"), "--out", str(out), "--battery", TINY,
                 "--defence", "no-such", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("defend evaluate: error: --defence: 'no-such' is not a registered defence; choose from ")
    assert "normal" in err and err.count("\n") == 1 and not out.exists()
    assert main(["--classifier", str(tmp_path / "missing.pt"), "--out", str(out), "--battery", TINY,
                 "--name", " ", "--no-progress"]) == 2
    assert capsys.readouterr().err == ("defend evaluate: error: --name is empty: give a non-empty text or leave --name "
                                       "out\n") and not out.exists()


def _one_x(card_run: Path, folder: Path) -> Path:
    """The card of ``card_run`` written back to schema 1.4.0 (no protocol, no entry) in ``folder``/card.json."""
    card = json.loads((card_run / "card.json").read_text())
    old = {k: v for k, v in card.items() if k not in ("protocol", "entry")}
    old["schema_version"] = "1.4.0"
    folder.mkdir(parents=True)
    (folder / "card.json").write_text(json.dumps(old))
    return folder / "card.json"


def test_upgrade_fills_a_1x_card_and_names_what_it_could_not(card_run, tmp_path, capsys):
    _one_x(card_run, tmp_path / "old" / "my-run")
    assert upgrade([str(tmp_path / "old" / "my-run"), "--out", str(tmp_path / "new")]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "my-run" in line and "not filled: " in line and "inputs_sha256" in line
    new = json.loads((tmp_path / "new" / "my-run" / "card.json").read_text())
    validate_card(new)
    original = json.loads((card_run / "card.json").read_text())
    assert new["schema_version"] == "2.0.0" and new["protocol"] == original["protocol"]
    expected = entry_from_card(original, name="my-run", defence=None, inputs_sha256=None)
    assert new["entry"] == json.loads(json.dumps(expected)) and new["entry"]["inputs_sha256"] is None
    assert {k: v for k, v in new.items() if k not in ("protocol", "entry", "schema_version")} == \
        {k: v for k, v in original.items() if k not in ("protocol", "entry", "schema_version")}


def test_upgrade_refuses_a_2_0_card_and_an_existing_output(card_run, tmp_path, capsys):
    assert upgrade([str(card_run), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schema_version 2.0.0" in err and "1.x" in err
    assert not (tmp_path / "new").exists()
    src = _one_x(card_run, tmp_path / "old" / "run")
    target = tmp_path / "new" / "run" / "card.json"
    target.parent.mkdir(parents=True)
    target.write_text("mine")
    assert upgrade([str(src), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and target.read_text() == "mine"
    assert upgrade([str(src), "--out", str(tmp_path / "new"), "--overwrite"]) == 0
    validate_card(json.loads(target.read_text()))


def test_upgrade_refuses_a_card_that_is_not_a_1x_card(card_run, tmp_path, capsys):
    src = _one_x(card_run, tmp_path / "old" / "run")
    broken = json.loads(src.read_text())
    del broken["results"]
    src.write_text(json.dumps(broken))
    assert upgrade([str(src), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results" in err and not (tmp_path / "new").exists()
    with pytest.raises(CardError):
        validate_card(copy.deepcopy(broken))
