"""``defend evaluate``: the model card validates and round-trips, its figures are in range and match independent
computations, bad inputs are one-line errors that write nothing, saved adversarial sets re-score to the same success,
an image-folder classifier is evaluated from paths only, and a detector adds adaptive rows judged by its booster."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _tiny import card_maps, fit_small_cnn, shape_folder, train_tiny_classifier

from defend import DigitsDataModule, ImageFolderDataModule, load_card, save_classifier, validate_card
from defend.evaluate import card_errors, main
from defend.inputs import take_split
from defend.models.small import small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = str(Path(__file__).parent / "data" / "evaluate_tiny.yaml")
FAST = ["--battery.autoattack.eps=[]", "--battery.topk.interpreters=[]"]


def run(*args: str) -> int:
    return main([*args, "--battery", TINY, "--no-progress"] if "--battery" not in args else [*args, "--no-progress"])


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory, one_thread):
    model, _, _ = train_tiny_classifier(steps=60, width=4)
    path = tmp_path_factory.mktemp("clf") / "tiny.pt"
    save_classifier(model, path, {"width": 4})
    return model, path


@pytest.fixture(scope="module")
def card_run(tiny_clf, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "out"
    assert run("--classifier", str(tiny_clf[1]), "--out", str(out)) == 0
    return out


def test_card_validates_and_round_trips(card_run):
    raw = json.loads((card_run / "card.json").read_text())
    validate_card(raw)
    assert load_card(card_run) == raw and raw["schema_version"] == "2.0.0"
    bad = copy.deepcopy(raw)
    bad["results"]["attacks"][0]["asr"] = 1.5
    del bad["system"]["classifier"]["sha256"]
    errors = card_errors(bad)
    assert any("asr" in e and "maximum" in e for e in errors) and any("sha256" in e for e in errors)
    files = raw["files"]
    for f in [files["report"], *files["tables"], *files["figures"], *files["adversarial"]]:
        assert (card_run / f).is_file(), f
    assert {"maps.png", "attacks.png"} <= set(files["figures"])


def test_figures_are_in_range_and_match_independent_computations(card_run, tiny_clf):
    card = load_card(card_run)
    res = card["results"]
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    test = take_split(dm, "test", 64)
    with torch.no_grad():
        acc = float((tiny_clf[0](test["image"]).argmax(1) == test["label"]).float().mean())
    assert res["clean_accuracy"]["value"] == pytest.approx(acc, abs=1e-9) and res["clean_accuracy"]["n"] == 64
    assert [a["eps"] for a in res["autoattack"]] == [pytest.approx(8 / 255)]
    assert 0 <= res["autoattack"][0]["robust_accuracy"] <= 1
    assert {t["interpreter"] for t in res["interpretation_robustness"]} == {"cam"}
    kinds = {(a["attack"], a["interpreter"], a["kind"], a["read_by"]) for a in res["attacks"]}
    assert ("adv2", "cam", "standard", "cam") in kinds and ("adv2_ensemble", "cam+grad", "adaptive", "grad") in kinds
    for a in res["attacks"]:
        assert a["n"] == card["data"]["n_attack_inputs"] and a["seed"] == 0 and a["budget"]["eps"] == pytest.approx(8 / 255)
        assert a["linf"] <= 8 / 255 + 1e-6 and a["seconds"] >= 0
    assert {(t["source"], t["read_by"]) for t in res["transfer"]} == {(s, r) for s in ("cam", "grad") for r in ("cam", "grad")}
    saved = torch.load(card_run / "adversarial" / "adv2_cam.pt", weights_only=True)["state"]
    with torch.no_grad():  # the stored success is the classifier's on the saved inputs
        asr = float((tiny_clf[0](saved["x_adv"]).argmax(1) == saved["target"]).float().mean())
    row = next(a for a in res["attacks"] if a["attack"] == "adv2" and a["interpreter"] == "cam")
    assert row["asr"] == pytest.approx(asr)


def test_rescoring_saved_inputs_gives_the_same_success(card_run, tiny_clf, tmp_path):
    out = tmp_path / "rescore"
    assert run("--classifier", str(tiny_clf[1]), "--inputs", str(card_run), "--out", str(out)) == 0
    first, again = load_card(card_run), load_card(out)
    assert again["mode"] == "rescore" and len(again["inputs"]["sets"]) == len(first["files"]["adversarial"])
    orig = {(a["attack"], a["read_by"]): a for a in first["results"]["attacks"]}
    for a in again["results"]["attacks"]:
        o = orig[(a["attack"], a["read_by"])]
        assert a["asr"] == pytest.approx(o["asr"]) and a["l1"] == pytest.approx(o["l1"], abs=1e-5)


@pytest.mark.parametrize("case", ["missing", "classes", "battery", "data", "detector", "rts"])
def test_bad_inputs_are_one_line_errors_and_write_nothing(case, tiny_clf, tmp_path, capsys):
    out = tmp_path / "out"
    clf = str(tiny_clf[1])
    if case == "classes":
        clf = str(tmp_path / "five.pt")
        save_classifier(small_cnn(num_classes=5, width=4), clf, {"width": 4})
    args = {"missing": ["--classifier", str(tmp_path / "nope.pt")], "classes": ["--classifier", clf],
            "battery": ["--classifier", clf, "--battery.attacks.interpreters=[cma]"],
            "data": ["--classifier", clf, "--data", "folder:" + str(tmp_path / "no_such_folder")],
            "detector": ["--classifier", clf, "--detector", str(tmp_path)],
            "rts": ["--classifier", clf, "--rts", str(tiny_clf[1])]}[case]
    assert run(*args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("defend evaluate: error: ") and "\n" not in err, err
    assert not out.exists()
    want = {"missing": "no such file", "classes": "class count mismatch", "battery": "did you mean 'cam'",
            "data": "does not exist", "detector": "detector.json", "rts": "'classifier' artifact, expected 'rts'"}[case]
    assert want in err, err


def test_refuses_to_overwrite_user_files(tiny_clf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("mine")
    assert run("--classifier", str(tiny_clf[1]), "--out", str(out), *FAST) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and (out / "report.md").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


def test_image_folder_classifier_from_paths_only(tmp_path):
    root = shape_folder(tmp_path / "images")
    dm = ImageFolderDataModule(str(root), image_size=32, resize=32, val_fraction=0.15, test_fraction=0.15, seed=0)
    dm.setup("fit")
    model = fit_small_cnn(take_split(dm, "train"), 2, steps=30)
    save_classifier(model, tmp_path / "folder.pt", {"width": 4})
    out = tmp_path / "card"
    args = ["--classifier", str(tmp_path / "folder.pt"), "--data", f"folder:{root}", "--out", str(out), *FAST,
            "--battery.n_images=2", "--battery.n_figure=1", "--battery.attacks.interpreters=[cam]"]
    assert run(*args) == 0
    card = load_card(out)
    assert card["data"]["spec"]["class_path"] == "ImageFolderDataModule" and card["data"]["class_names"] == ["disc", "square"]
    test = take_split(dm, "test")
    with torch.no_grad():
        acc = float((model(test["image"]).argmax(1) == test["label"]).float().mean())
    assert card["results"]["clean_accuracy"]["value"] == pytest.approx(acc)


def test_detector_adds_adaptive_rows_judged_by_the_booster(card_run, tiny_clf, tmp_path, capsys):
    from defend.detector import train_detector

    saved = torch.load(card_run / "adversarial" / "adv2_cam.pt", weights_only=True)["state"]
    data, labels = card_maps(tiny_clf[0], saved)
    assert len(labels) == 12
    det, _ = train_detector(data, labels, epochs=0, trainable="none", booster={"n_estimators": 5})
    with pytest.raises(ValueError, match="reads 2 channels, not 3 interpreters"):
        det.save(tmp_path / "bad", ["grad", "cam", "mask"])
    det.save(tmp_path / "det", ["grad", "cam"])  # recorded: the card stacks these, in this order
    det.surrogate = None  # as saved before the distilled surrogate existed: asking for it is refused up front
    det.save(tmp_path / "old", ["grad", "cam"])
    assert run("--classifier", str(tiny_clf[1]), "--detector", str(tmp_path / "old"), "--out", str(tmp_path / "y"),
               "--battery.adaptive.detector_surrogate=distilled", *FAST) == 2
    assert "has no distilled surrogate" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert run("--classifier", str(tiny_clf[1]), "--detector", str(tmp_path / "det"), "--out", str(tmp_path / "x"),
               "--battery.detector.interpreters=[cam,grad]", *FAST) == 2  # the channels swapped: refused
    assert "was trained on the maps of ['grad', 'cam'] (in that order), not ['cam', 'grad']" in capsys.readouterr().err
    out = tmp_path / "card"
    assert run("--classifier", str(tiny_clf[1]), "--detector", str(tmp_path / "det"), "--out", str(out), *FAST) == 0
    card = load_card(out)
    det_card = card["results"]["detection"]
    assert card["system"]["detector"]["interpreters"] == ["grad", "cam"] and "roc.png" in card["files"]["figures"]
    rows = {(r["attack"], r["kind"]): r for r in det_card["rows"]}
    assert ("adaptive_detector", "adaptive") in rows and ("adv2", "standard") in rows
    assert {r["attack"] for r in card["results"]["attacks"]} >= {"adaptive_detector"}
    aware = [r for r in card["results"]["attacks"] if r["attack"] == "adaptive_detector"]
    # 12 training maps: the distilled surrogate does not reproduce the booster on fresh maps, so the head stands in
    assert aware and {r["budget"]["surrogate"] for r in aware} == {"head"}
    fit = card["system"]["detector"]["surrogate"]
    assert fit["surrogate_r2"] <= 1 and 0 <= fit["surrogate_sign_agreement"] <= 1 and fit["surrogate_alpha"] > 0
    for r in det_card["rows"]:
        assert r["evasion_rate"] <= 1 and r["n_adversarial"] <= r["n"]
    fpr5 = det_card["thresholds"]["fpr5"]  # 8 development benign inputs cannot set a 5 % FPR threshold (200 can)
    assert fpr5["supported"] is False and fpr5["threshold"] is None and det_card["n_benign_dev"] == 8
    assert "not enough benign inputs for 5 % FPR (8 on the development split, 200 needed)" == fpr5["note"]
    assert all(r["detection_rate_fpr5"] is None for r in det_card["rows"])
    assert "not enough benign inputs for 5 % FPR" in (out / "report.md").read_text()
    assert "VGG-16 trunk randomly initialised (no pre-trained weights available; the paper uses ImageNet weights)" in (out / "report.md").read_text()  # no pretrained weights: said, not hidden


def test_help_lists_evaluate_and_explains_every_option(capsys):
    from defend.cli import main as defend_main

    assert defend_main(["--help"]) == 0
    assert "\n  evaluate " in capsys.readouterr().out
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--classifier", "--rts", "--detector", "--data", "--battery", "--out", "--inputs",
                   "--overwrite", "--no-progress", "--print_config", "--name", "--source", "--defence", "bench-v1"):
        assert option in text, option
    assert "folder:PATH" in text and "card.json" in text


def _constant_classifier(cls: int) -> torch.nn.Module:
    """A small CNN whose output bias (100 on ``cls``) outweighs everything its features can add within an 8/255 ball
    (output weights scaled to 1e-4): it predicts ``cls`` for every input, yet every map has an input gradient."""
    torch.manual_seed(0)
    model = small_cnn(num_classes=10, width=4)
    with torch.no_grad():
        weight, bias = list(model.parameters())[-2:]
        weight.mul_(1e-4)
        bias.zero_()
        bias[cls] = 100.0
    return model.eval()


def test_a_card_of_a_classifier_at_chance_says_its_figures_mean_nothing(tmp_path, capsys):
    """A constant classifier (about 1/10 right): the card keeps its figures but flags them, the report says "not
    meaningful: the classifier is at chance" in the robust and interpretation sections, and the console warns."""
    dm = DigitsDataModule(seed=0)
    first = int(take_split(dm, "test", 1)["label"][0])
    clf = tmp_path / "constant.pt"
    save_classifier(_constant_classifier(first), clf, {"width": 4})
    out = tmp_path / "card"
    assert run("--classifier", str(clf), "--out", str(out), "--battery.topk.interpreters=[cam]") == 0
    card = load_card(out)
    c = card["results"]["clean_accuracy"]
    assert c["at_chance"] is True and c["value_ci_low"] <= 0.2 and c["chance_level"] == 0.1
    assert card["validity"]["meaningful"] is False and "at chance" in card["validity"]["reason"]
    assert set(card["validity"]["sections"]) >= {"autoattack", "interpretation_robustness", "attacks"}
    assert card["results"]["attacks"] and card["results"]["autoattack"]  # the numbers stay, flagged
    report = (out / "report.md").read_text()
    assert report.count("Not meaningful: the classifier is at chance") >= 3
    assert "warning: the classifier is at chance" in capsys.readouterr().err


def test_robust_accuracy_counts_a_clean_error_as_a_failure(tmp_path):
    """RobustBench's robust accuracy is over the first n test inputs, a misclassified one a failure; the conditional
    figure is over the correctly classified ones. A constant classifier cannot be moved by any attack, so both are
    known in closed form: (inputs of its class) / n and 1."""
    from types import SimpleNamespace

    from defend.evaluate.battery import Battery
    from defend.evaluate.measure import autoattack_rows

    dm = DigitsDataModule(seed=0)
    labels = take_split(dm, "test", 16)["label"]
    cls = int(labels[0])
    battery = Battery()
    battery.autoattack.eps, battery.autoattack.n, battery.batch_size = [8 / 255], 16, 16
    row = autoattack_rows(SimpleNamespace(data=dm, classifier=_constant_classifier(cls)), battery)[0]
    right = int((labels == cls).sum())
    assert row["n"] == 16 and row["n_correct"] == right
    assert row["robust_accuracy"] == pytest.approx(right / 16) and right < 16
    assert row["robust_accuracy_on_correct"] == 1.0
    lo, hi = row["robust_accuracy_ci_low"], row["robust_accuracy_ci_high"]
    from scipy.stats import binomtest

    ci = binomtest(right, 16).proportion_ci(method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


def test_autoattack_n_is_a_cap_the_first_n_or_all_where_fewer():
    """bench-v1's rule (RobustBench's): ``autoattack.n`` 1000 on a test split of 20 measures all 20 and says so."""
    from types import SimpleNamespace

    from defend.evaluate.battery import Battery
    from defend.evaluate.measure import autoattack_rows

    dm = DigitsDataModule(seed=0, limit_test=20)
    dm.setup("test")
    labels = take_split(dm, "test")["label"]
    battery = Battery()
    battery.autoattack.eps, battery.autoattack.n, battery.batch_size = [8 / 255], 1000, 20
    row = autoattack_rows(SimpleNamespace(data=dm, classifier=_constant_classifier(int(labels[0]))), battery)[0]
    assert row["n"] == len(dm.test_dataset) == 20 and row["note"].startswith("inputs: the first n test inputs")


def test_cw_and_stadv_enter_the_card_with_the_battery_key_alone(tiny_clf, tmp_path):
    """``attacks.frameworks: [pgd, cw, stadv]`` gives a valid card with one row per framework, each set saved on the
    grid; an L-inf eps is recorded for PGD only (C&W and StAdv are not L-inf balls)."""
    out = tmp_path / "card"
    assert run("--classifier", str(tiny_clf[1]), "--out", str(out), "--battery", TINY, *FAST,
               "--battery.attacks.frameworks=[pgd, cw, stadv]", "--battery.attacks.interpreters=[cam]") == 0
    card = load_card(out)
    standard = [r for r in card["results"]["attacks"] if r["kind"] == "standard"]
    assert sorted(r["framework"] for r in standard) == ["cw", "pgd", "stadv"]
    for r in standard:
        assert r["budget"]["framework"] == r["framework"] and ("eps" in r["budget"]) == (r["framework"] == "pgd")
        saved = torch.load(out / r["file"], weights_only=True)["state"]
        assert torch.equal(saved["x_adv"], torch.round(saved["x_adv"] * 255) / 255)


def test_results_that_break_the_schema_leave_no_half_written_card(tiny_clf, tmp_path, monkeypatch, capsys):
    """The measured results are checked against the card schema before any table, figure or set is written."""
    import defend.evaluate.card as card_module
    schema = card_module.card_schema()
    strict = copy.deepcopy(schema)
    strict["$defs"]["budget"]["required"] = ["a_key_no_budget_has"]
    monkeypatch.setattr(card_module, "card_schema", lambda: strict)
    out = tmp_path / "card"
    assert run("--classifier", str(tiny_clf[1]), "--out", str(out), *FAST) != 0
    assert "a_key_no_budget_has" in capsys.readouterr().err
    written = [p.name for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [n for n in written if n.endswith((".csv", ".md", ".png", ".pt", ".json", ".yaml"))
                and not n.startswith(".")], written
