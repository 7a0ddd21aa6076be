"""Leftovers of issue 26 item 4: one list of detector file names used by save, load and every overwrite plan; one
converter to plain data (``defend.typed_config.plain_dict``) for stored hyper-parameters, battery dumps and option
comparisons."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import defend.detector as detector_mod
from defend.aid import AIDModule
from defend.classifier import ClassifierModule, save_classifier
from defend.detector import DETECTOR_FILES, DETECTOR_INDEX, DetectorFileNames, DetectorModule, detector_files
from defend.models import build_classifier
from defend.module_base import Optimiser
from defend.typed_config import plain_dict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_detector() -> DetectorModule:
    det, _ = detector_mod.train_detector(torch.rand(24, 2, 32, 32), torch.arange(24) % 2, epochs=0,
                                         trainable="none", booster={"n_estimators": 5}, seed=0)
    assert det.booster is not None and det.surrogate is not None  # so every named file is written
    return det


# --------------------------------------------------------------------------------------------- detector files
def test_detector_save_writes_exactly_the_files_of_the_one_list(tmp_path, tiny_detector):
    """Every file (and only those) that a save writes is named by DETECTOR_FILES + DETECTOR_INDEX, which is what
    detector_files() plans for the overwrite checks; no scratch file is left behind."""
    d = tmp_path / "det"
    tiny_detector.save(d, ["grad", "cam"])
    written = sorted(p.name for p in d.iterdir())
    assert written == sorted([DETECTOR_INDEX, *DETECTOR_FILES])
    assert sorted(p.name for p in detector_files(d)) == written
    assert detector_files(d)[0] == d / DETECTOR_INDEX  # the index first: a folder is complete when it is there


def test_detector_load_reads_the_names_save_wrote(tmp_path, monkeypatch, tiny_detector):
    """Save and load take every file name from the one list: renamed there, a save writes the new names and a load
    reads them back (a load that spelled "trunk.pt" itself would fail here)."""
    monkeypatch.setattr(detector_mod, "DETECTOR_FILES", DetectorFileNames("weights.pt", "trees.json", "fit.pt"))
    d = tmp_path / "renamed"
    tiny_detector.save(d, ["grad", "cam"])
    assert sorted(p.name for p in d.iterdir()) == ["detector.json", "fit.pt", "trees.json", "weights.pt"]
    back = DetectorModule.load(d)
    maps = torch.rand(6, 2, 32, 32)
    assert torch.allclose(back.predict_proba(maps), tiny_detector.eval().predict_proba(maps), atol=1e-6)
    assert back.surrogate is not None and back.surrogate_fit == tiny_detector.surrogate_fit


# --------------------------------------------------------------------------------------------- plain data
def test_plain_dict_turns_options_into_yaml_like_data():
    """Dataclass instances and mappings -> dicts (str keys), tuples -> lists, paths -> str, 0-d tensors -> numbers;
    a dataclass type and other values stay as they are."""
    value = {"opt": Optimiser(schedule="multistep", milestones=(3, 5)), "sizes": (1, (2, 3)), "p": Path("a/b"),
             "t": torch.tensor(2.5), 7: [Path("c")], "cls": Optimiser, "s": "x", "none": None}
    assert plain_dict(value) == {
        "opt": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "schedule": "multistep",
                "milestones": [3, 5], "decay": 0.1, "pct_start": 0.25},
        "sizes": [1, [2, 3]], "p": "a/b", "t": 2.5, "7": ["c"], "cls": Optimiser, "s": "x", "none": None}
    out = plain_dict(value)
    assert type(out["sizes"]) is list and type(out["t"]) is float and type(out["p"]) is str


def test_stored_hparams_are_the_plain_data_checkpoints_reload(tmp_path):
    """A module stores its options as the hand-written plain dict below; it survives a weights_only checkpoint
    round trip unchanged, and the module rebuilt from it (as load_from_checkpoint does) stores the same dict."""
    torch.manual_seed(0)
    opt = Optimiser(name="sgd", lr=0.1, schedule="multistep", milestones=[2, 4])
    module = ClassifierModule(model_options={"width": 4}, optimiser=opt, label_smoothing=0.1)
    expected = {"_class_path": "defend.classifier.ClassifierModule", "arch": "small_cnn", "num_classes": 10,
                "model_options": {"width": 4},
                "optimiser": {"name": "sgd", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "schedule": "multistep",
                              "milestones": [2, 4], "decay": 0.1, "pct_start": 0.25},
                "label_smoothing": 0.1, "init_from": None, "new_head": False}
    assert dict(module.hparams) == expected
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "hp.ckpt")
    back = torch.load(tmp_path / "hp.ckpt", weights_only=True)["hyper_parameters"]
    assert back == expected
    rebuilt = ClassifierModule(**{k: v for k, v in back.items() if not k.startswith("_")})
    assert dict(rebuilt.hparams) == expected and rebuilt.optimiser == opt
    assert dataclasses.asdict(rebuilt.optimiser) == expected["optimiser"]


def test_a_path_option_is_stored_as_text_so_the_checkpoint_loads_weights_only(tmp_path):
    """A ``Path`` given to a module is stored as its text: a weights_only load (which refuses pathlib objects)
    reads the hyper-parameters back."""
    torch.manual_seed(0)
    clf = tmp_path / "clf.pt"
    save_classifier(build_classifier("small_cnn", 10, width=4), clf, {"width": 4})
    module = AIDModule(clf, width=4)
    assert module.hparams["classifier"] == str(clf) and type(module.hparams["classifier"]) is str
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "hp.ckpt")
    assert torch.load(tmp_path / "hp.ckpt", weights_only=True)["hyper_parameters"] == dict(module.hparams)


def test_trunk_description_names_the_local_weights_or_says_there_are_none():
    from defend.detector import trunk_description

    assert trunk_description(None) == ("VGG-16 trunk randomly initialised (no pre-trained weights available; the "
                                       "paper uses ImageNet weights)")
    assert trunk_description("/data/weights/vgg16-397923af.pth") == (
        "VGG-16 trunk initialised from the local weights `vgg16-397923af.pth`")
