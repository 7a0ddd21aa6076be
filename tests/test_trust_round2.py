"""Files a stranger can write are not trusted: re-scored adversarial sets are checked against the data they claim
(budget, targets, clean images) and only the sets the earlier run wrote are read; a detector's surrogate fit is
re-measured; artifact metadata is bounded by the stored tensors before anything is built; class names travel with
the classifier and a data set whose classes differ is refused."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import card_maps, train_tiny_classifier
from PIL import Image

from defend import save_classifier
from defend.evaluate import main
from defend.io import OutputGuard, load_artifact, save_artifact
from defend.models.small import small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = str(Path(__file__).parent / "data" / "evaluate_tiny.yaml")
FAST = ["--battery.autoattack.eps=[]", "--battery.topk.interpreters=[]", "--battery.adaptive.ensemble=[]",
        "--battery.attacks.interpreters=[cam]", "--battery.n_figure=0"]
DIGITS = [str(i) for i in range(10)]


def run(*args: str) -> int:
    return main([*args, "--battery", TINY, "--no-progress"])


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory, one_thread):
    model, _, _ = train_tiny_classifier(steps=60, width=4)
    path = tmp_path_factory.mktemp("clf") / "tiny.pt"
    save_classifier(model, path, {"width": 4}, class_names=DIGITS)
    return model, path


@pytest.fixture(scope="module")
def card_run(tiny_clf, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "out"
    assert run("--classifier", str(tiny_clf[1]), "--out", str(out), *FAST) == 0
    return out


def _tampered(card_run: Path, tmp_path: Path, change) -> Path:
    """A copy of the run whose ``adv2_cam`` set was rewritten by ``change(state)`` with its checksum and manifest
    entry recomputed (what anyone can do: neither is a signature)."""
    copy = tmp_path / "run"
    shutil.copytree(card_run, copy)
    f = copy / "adversarial" / "adv2_cam.pt"
    payload = load_artifact(f, "adversarial-set")
    state = change({k: v.clone() for k, v in payload["state"].items()})
    OutputGuard(copy).record(f, save_artifact(f, "adversarial-set", state, payload["meta"], guard=False))
    return copy


def _refused(tiny_clf, inputs: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "rescored"
    assert run("--classifier", str(tiny_clf[1]), "--inputs", str(inputs), "--out", str(out), *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert not out.exists() and len(err.splitlines()) == 1, err
    return err


def test_far_off_images_with_an_8_255_budget_are_refused(card_run, tiny_clf, tmp_path, capsys):
    def far(st):
        st["x_adv"] = torch.where(st["x"] > 0.5, st["x"] - 0.9, st["x"] + 0.9).clamp(0, 1).mul(255).round().div(255)
        return st

    err = _refused(tiny_clf, _tampered(card_run, tmp_path, far), tmp_path, capsys)
    assert "adv2_cam.pt: the adversarial inputs are outside the attack's L-inf ball" in err and "0.03137" in err


def test_targets_equal_to_the_labels_are_refused(card_run, tiny_clf, tmp_path, capsys):
    def same(st):
        st["target"], st["x_adv"] = st["label"].clone(), st["x"].clone()
        return st

    err = _refused(tiny_clf, _tampered(card_run, tmp_path, same), tmp_path, capsys)
    assert "target(s) equal the true label" in err


def test_labels_that_disagree_with_the_data_are_refused(card_run, tiny_clf, tmp_path, capsys):
    def relabel(st):
        st["label"] = (st["label"] + 1) % 10
        return st

    err = _refused(tiny_clf, _tampered(card_run, tmp_path, relabel), tmp_path, capsys)
    assert "labels differ from the data's labels" in err


def test_a_set_crafted_on_other_data_is_refused(card_run, tiny_clf, tmp_path, capsys):
    def other(st):  # the same digits drawn one pixel to the right: not test inputs of this data
        st["x"] = torch.roll(st["x"], 1, dims=3)
        st["x_adv"] = st["x"].clone()
        return st

    err = _refused(tiny_clf, _tampered(card_run, tmp_path, other), tmp_path, capsys)
    assert "clean inputs are not test inputs of the data" in err and "crafted on other data" in err


def test_only_the_sets_the_run_wrote_are_rescored(card_run, tiny_clf, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(card_run, copy)
    listed = json.loads((copy / "card.json").read_text())["files"]["adversarial"]
    shutil.copy(copy / listed[0], copy / "adversarial" / "old_run.pt")  # left there by an earlier run
    out = tmp_path / "rescored"
    assert run("--classifier", str(tiny_clf[1]), "--inputs", str(copy), "--out", str(out), *FAST) == 0
    err = capsys.readouterr().err
    assert "ignoring 1 file(s)" in err and "old_run.pt" in err
    sets = json.loads((out / "card.json").read_text())["inputs"]["sets"]
    assert sorted(Path(s["file"]).name for s in sets) == sorted(Path(f).name for f in listed)
    f = copy / listed[0]  # a listed set changed after the run (manifest not updated): refused
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    err = _refused(tiny_clf, copy, tmp_path / "again", capsys)
    assert "was changed since defend wrote it" in err and ".defend-manifest.json" in err


def _detector_dir(tiny_clf, card_run, tmp_path, zero: bool) -> Path:
    from defend.detector import train_detector

    saved = torch.load(card_run / "adversarial" / "adv2_cam.pt", weights_only=True)["state"]
    data, labels = card_maps(tiny_clf[0], saved)
    det, _ = train_detector(data, labels, epochs=0, trainable="none", booster={"n_estimators": 5})
    if zero:
        det.surrogate.weight.zero_()
    det.surrogate_fit = {"surrogate_r2": 0.99999, "surrogate_sign_agreement": 1.0, "surrogate_alpha": 1.0}
    det.save(tmp_path / "det", ["grad", "cam"])  # the checksums of detector.json are recomputed
    return tmp_path / "det"


def test_a_zeroed_surrogate_is_not_reported_as_distilled(card_run, tiny_clf, tmp_path, capsys):
    from defend.evaluate.battery import load_battery
    from defend.evaluate.system import load_system

    d = _detector_dir(tiny_clf, card_run, tmp_path, zero=True)
    out = tmp_path / "card"
    assert run("--classifier", str(tiny_clf[1]), "--detector", str(d), "--out", str(out), *FAST,
               "--battery.adaptive.detector_surrogate=distilled") == 2
    err = capsys.readouterr().err.strip()
    assert "its distilled surrogate is constant" in err and len(err.splitlines()) == 1 and not out.exists()
    battery, _ = load_battery(TINY)
    system = load_system(str(tiny_clf[1]), None, battery, detector=str(d))  # auto: the head stands in, said once
    system.say_notices()
    assert "the trunk's head stands in" in capsys.readouterr().err
    fit = system.describe()["detector"]["surrogate"]
    assert system.detector.surrogate_kind("auto") == "head" and fit["surrogate_r2"] < 0.5  # measured, not 0.99999
    assert fit["surrogate_sign_agreement"] <= 1 and fit["surrogate_n"] == 64


def test_metadata_asking_for_a_huge_width_is_refused_before_anything_is_built(tiny_clf, tmp_path, capsys):
    from attacks import RTSNetwork
    from defend.aid import load_rts, save_rts
    from defend.io import CheckpointError

    model = small_cnn(num_classes=10, width=4)
    save_classifier(model, tmp_path / "huge.pt", {"width": 30000}, class_names=DIGITS)  # a 2 KB-ish file
    save_classifier(model, tmp_path / "wide.pt", {"width": 4000}, class_names=DIGITS)
    start = time.perf_counter()
    assert run("--classifier", str(tmp_path / "huge.pt"), "--out", str(tmp_path / "a"), *FAST) == 2
    assert "model_options.width = 30000 is outside [0, 4096]" in capsys.readouterr().err
    assert run("--classifier", str(tmp_path / "wide.pt"), "--out", str(tmp_path / "b"), *FAST) == 2
    err = capsys.readouterr().err  # within the bound, but the stored tensors say width 4: compared before building
    assert "its weights do not fit the 'small_cnn' classifier" in err and "checkpoint [4, 3, 3, 3], model [4000, 3, 3, 3]" in err
    assert time.perf_counter() - start < 20 and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    net = RTSNetwork([4, 8, 16], 10, width=4)
    save_rts(net, tmp_path / "rts.pt")
    payload = load_artifact(tmp_path / "rts.pt", "rts")
    save_artifact(tmp_path / "rts.pt", "rts", payload["state"], {**payload["meta"],
                                                                  "network": {**net.config(), "width": 3000}})
    with pytest.raises(CheckpointError, match=r"its weights do not fit the RTS network .*model \[3000"):
        load_rts(tmp_path / "rts.pt")


def _three_classes(root: Path, names: tuple[str, ...]) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(10):
            img = np.full((32, 32, 3), 40 + 90 * c, np.uint8) + rng.integers(0, 20, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    return root


def test_a_renamed_class_folder_is_refused_naming_both_lists(tmp_path, capsys):
    from defend.evaluate.battery import load_battery
    from defend.evaluate.system import load_system

    root = _three_classes(tmp_path / "images", ("apple", "banana", "cherry"))
    model = small_cnn(num_classes=3, width=4)
    save_classifier(model, tmp_path / "fruit.pt", {"width": 4}, class_names=["apple", "banana", "cherry"])
    (root / "apple").rename(root / "zucchini")  # same count, another sorted order: labels would be shuffled
    out = tmp_path / "card"
    assert run("--classifier", str(tmp_path / "fruit.pt"), "--data", f"folder:{root}", "--out", str(out), *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on the classes [apple, banana, cherry], the data has [banana, cherry, zucchini]" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    save_classifier(model, tmp_path / "old.pt", {"width": 4})  # saved before class names were stored
    battery, _ = load_battery(TINY)
    load_system(str(tmp_path / "old.pt"), f"folder:{root}", battery).say_notices()
    warning = capsys.readouterr().err.strip()
    assert "does not record its class names" in warning and "cannot be checked" in warning
    assert len(warning.splitlines()) == 1
