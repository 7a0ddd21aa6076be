"""Bad input, clear errors: every case of issue 8 through the command line.

Each test runs `defend fit` or `defend experiment` in-process and checks the exit status (2), that exactly one
`defend <cmd>: error: ...` line names the problem (no traceback), and that nothing was written: no log directory,
no checkpoint, no --out directory. The same checks at the library level are tested elsewhere and not repeated here:
tests/test_attacks.py::test_bad_inputs_raise / test_unknown_names_fail_with_the_choices / test_bad_budgets_raise,
tests/test_interpreters.py::test_bad_inputs_raise_value_error / test_cam_requires_gap_linear_model,
tests/test_data.py::test_check_batch_rejects_bad_batches / test_folder_module_errors,
tests/test_cli_and_artifacts.py (malicious pickle, corrupt / truncated / foreign checkpoints, class-count and
input-size mismatch of load_classifier, unknown experiment and attack names).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

from attacks.interpreters.rts import RTSNetwork
from defend.aid import save_rts
from defend.classifier import save_classifier
from defend.cli import main as defend_main
from defend.data import BaseDataModule
from defend.errors import one_line
from defend.models import build_classifier

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("DEFEND_DEBUG", raising=False)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------- helpers
def run(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = defend_main(argv)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, command: str, pattern: str) -> None:
    assert rc == 2, f"exit status {rc}, stderr:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.startswith(f"defend {command}: error:")]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


def assert_nothing_written(*paths: Path) -> None:
    for p in paths:
        assert not p.exists() or not any(p.rglob("*")), f"{p} holds {sorted(map(str, p.rglob('*')))}"


def classifier_file(path: Path, num_classes: int = 10, width: int = 4) -> Path:
    torch.manual_seed(0)
    save_classifier(build_classifier("small_cnn", num_classes, width=width), path, {"width": width})
    return path


def fit_config(tmp_path: Path, model: dict, data: dict, name: str = "fit.yaml") -> Path:
    """A `defend fit` YAML whose logs and checkpoints all go under tmp_path/out."""
    out = tmp_path / "out"
    cfg = {"seed_everything": 0, "model": model, "data": data,
           "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2,
                       "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
                       "default_root_dir": str(out),
                       "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                                  "init_args": {"save_dir": str(out / "logs")}},
                       "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                      "init_args": {"dirpath": str(out / "ckpt"), "save_last": True}}]}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


CLASSIFIER = {"class_path": "defend.classifier.ClassifierModule",
              "init_args": {"arch": "small_cnn", "num_classes": 10, "model_options": {"width": 4}}}
DIGITS = {"class_path": "defend.data.DigitsDataModule",
          "init_args": {"seed": 0, "batch_size": 16, "renders_per_digit": [1, 1, 1]}}


# --------------------------------------------------------------------------------------------- bad batches
class _Items(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


class BadData(BaseDataModule):
    """A user data module with one classic mistake (``kind``); ``ok`` follows the batch contract."""

    name = "bad"

    def __init__(self, kind: str = "ok", batch_size: int = 8, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=0, seed=seed)
        self.kind, self.num_classes, self.image_shape = kind, 10, (3, 32, 32)

    def _build(self):
        x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        y = torch.arange(16) % 10
        if self.kind == "range":
            x = x * 255  # forgot to scale to [0, 1]
        elif self.kind == "nan":
            x[0, 0, 0, 0] = float("nan")
        elif self.kind == "inf":
            x[0, 1, 2, 3] = float("inf")
        elif self.kind == "shape":
            x = x[:, 0]  # [N, H, W]: no channel axis
        elif self.kind == "channels":
            x = x[:, :1]  # grey images for an RGB model
        elif self.kind == "size":
            x = torch.rand(16, 3, 48, 48, generator=torch.Generator().manual_seed(0))
        elif self.kind == "labels":
            y = y + 1  # 1-based labels: 10 is out of range for 10 classes
        ds = _Items(x, y)
        return ds, ds, ds


@pytest.mark.parametrize("kind, pattern", [
    ("range", r"bad train data .*image values must lie in \[0, 1\], got range \[.*, 25\d"),
    ("nan", r"bad train data .*NaN or Inf"),
    ("inf", r"bad train data .*NaN or Inf"),
    ("shape", r"bad train data .*4-D tensor \[N, C, H, W\], got shape \(1, 32, 32\)"),
    ("channels", r"channel count mismatch: the model takes 3-channel images, the train images have 1"),
    ("size", r"input size mismatch: the model expects 32 px, the train images are 48x48"),
    ("labels", r"bad train data .*labels out of range: expected values in \[0, 10\), got \[1, 10\]"),
])
def test_fit_rejects_bad_data_before_writing_anything(kind, pattern, tmp_path, capsys):
    cfg = fit_config(tmp_path, CLASSIFIER, {"class_path": f"{__name__}.BadData", "init_args": {"kind": kind}})
    rc, err = run(capsys, ["fit", "-c", str(cfg), "--import", __name__])  # a test module: opted in by name
    assert_one_line_error(rc, err, "fit", pattern)
    assert_nothing_written(tmp_path / "out")


def test_fit_accepts_good_data(tmp_path, capsys):
    """The control: the same module and data without the mistake trains and writes its checkpoint."""
    cfg = fit_config(tmp_path, CLASSIFIER, {"class_path": f"{__name__}.BadData", "init_args": {"kind": "ok"}})
    rc, err = run(capsys, ["fit", "-c", str(cfg), "--import", __name__])
    assert rc == 0, err
    assert (tmp_path / "out" / "ckpt" / "last.ckpt").is_file()


# --------------------------------------------------------------------------------------------- dataset folders
def _folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"image folder root '.*nowhere' does not exist"),
    ("empty", r"no images found under .*images: expected class folders"),
    ("unreadable", r"1 unreadable image file\(s\) under .*images, e\.g\. '.*broken\.png'"),
])
def test_fit_rejects_bad_image_folder(case, pattern, tmp_path, capsys):
    root = tmp_path / "images"
    if case == "missing":
        root = tmp_path / "nowhere"
    elif case == "empty":
        (root / "cat").mkdir(parents=True)
        (root / "dog").mkdir()
    else:
        _folder(root)
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG but not really")
    data = {"class_path": "defend.data.ImageFolderDataModule",
            "init_args": {"root": str(root), "image_size": 32, "resize": 32, "batch_size": 4}}
    model = {**CLASSIFIER, "init_args": {**CLASSIFIER["init_args"], "num_classes": 2}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, model, data))])
    assert_one_line_error(rc, err, "fit", pattern)
    assert_nothing_written(tmp_path / "out")


# --------------------------------------------------------------------------------------------- unknown names
def test_fit_unknown_model_name(tmp_path, capsys):
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, CLASSIFIER, DIGITS)),
                           "--model.init_args.arch=resnet9"])
    assert_one_line_error(rc, err, "fit", r"unknown model 'resnet9'.*; choose one of: .*small_cnn")
    assert_nothing_written(tmp_path / "out")


def test_fit_unknown_framework_name(tmp_path, capsys):
    aid = {"class_path": "defend.aid.AIDModule",
           "init_args": {"classifier": str(classifier_file(tmp_path / "clf.pt")), "attack": {"framework": "deepfool"}}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, aid, DIGITS))])
    assert_one_line_error(rc, err, "fit", r"unknown framework 'deepfool'; choose one of: pgd, cw, stadv")
    assert_nothing_written(tmp_path / "out")


def test_fit_unknown_class_path(tmp_path, capsys):
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, CLASSIFIER, DIGITS)),
                           "--model.class_path=defend.nope.Module"])
    assert_one_line_error(rc, err, "fit", r"Problem with given class_path 'defend\.nope\.Module'")
    assert_nothing_written(tmp_path / "out")


def experiment_config(tmp_path: Path, **over) -> Path:
    """A valid attacks experiment on the digits, reusing a tiny classifier checkpoint (nothing runs in these tests)."""
    cfg = {"experiment": "attacks", "seed": 0,
           "data": {"class_path": "DigitsDataModule", "init_args": {"seed": 0, "renders_per_digit": [1, 1, 1]}},
           "classifier": {"checkpoint": str(classifier_file(tmp_path / "clf.pt")),
                          "module": {"arch": "small_cnn", "model_options": {"width": 4}}},
           "evaluation": {"attacks": ["pgd", "adv2"], "frameworks": ["pgd"], "interpreters": ["cam"], "n_images": 4},
           "attack": {"eps": 0.031, "alpha": 0.004, "warm_steps": 2, "steps": 2}}
    cfg.update(over)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("override, pattern", [
    ("evaluation.frameworks=[pgd, deepfool]", r"unknown framework 'deepfool' in evaluation\.frameworks; "
                                              r"choose one of: pgd, cw, stadv"),
    ("evaluation.interpreters=[cam, lime]", r"unknown interpreter 'lime' in evaluation\.interpreters; "
                                            r"choose one of: .*grad"),
    ("classifier.module.arch=resnet9", r"clf\.pt holds another classifier than the config describes: arch: "
                                       r"checkpoint 'small_cnn', config 'resnet9'"),
    ("data.class_path=MnistDataModule", r"data\.class_path: cannot resolve 'MnistDataModule'; name a class, e\.g\. "
                                        r"DigitsDataModule"),
    ("evaluaton.n_images=2", r"unknown key 'evaluaton' in the top level; did you mean 'evaluation'\?"),
    ("evaluation.n_imagse=2", r"unknown key 'n_imagse' in evaluation; did you mean 'n_images'\? \(valid: n_images,"),
    ("data.init_args.sed=3", r"unknown key 'sed' in data; did you mean 'seed'\?"),
    ("classifier.module.optimiser.nme=adam", r"unknown option 'optimiser\.nme'; did you mean 'optimiser\.name'\?"),
    ("per_interpreter.lime={c: 1}", r"unknown interpreter 'lime' in per_interpreter; choose one of: grad, cam"),
])
def test_experiment_unknown_names_write_nothing(override, pattern, tmp_path, capsys):
    out = tmp_path / "runs" / "x"
    rc, err = run(capsys, ["experiment", "-c", str(experiment_config(tmp_path)), "--out", str(out),
                           "--" + override])
    assert_one_line_error(rc, err, "experiment", pattern)
    assert not out.exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------- inconsistent values
@pytest.mark.parametrize("override, pattern", [
    ("attack.eps=-0.1", r"config key \"attack\.eps\": a radius must lie in \[0, 1\] .*write 8/255.*got -0\.1"),
    ("attack.eps=.nan", r"config key \"attack\.eps\": a radius must be a finite number, got nan"),
    ("attack.eps=8", r"config key \"attack\.eps\": a radius must lie in \[0, 1\] .*got 8\.0"),
    ("attack.alpha=0", r"config key \"attack\.alpha\": a step size must be positive .*got 0\.0"),
    ("attack.steps=2.5", r"config key \"attack\.steps\": must be a whole number >= 0, got 2\.5"),
    ("attack.eps=big", r"config key \"attack\.eps\": a radius must be a number, got 'big'"),
    ("attack.c=-1", r"config key \"attack\.c\": must be >= 0, got -1"),
    ("evaluation.n_images=0", r"config key \"evaluation\.n_images\": must be a whole number >= 1, got 0"),
    ("evaluation.frameworks=pgd", r"config key \"evaluation\.frameworks\" must be a list, e\.g\. \[pgd\]"),
    ("evaluation.n_figure=9", r"evaluation\.n_figure \(9\) cannot exceed evaluation\.n_images \(4\)"),
])
def test_experiment_inconsistent_values_write_nothing(override, pattern, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(capsys, ["experiment", "-c", str(experiment_config(tmp_path)), "--out", str(out),
                           "--" + override])
    assert_one_line_error(rc, err, "experiment", pattern)
    assert not out.exists()


def test_experiment_bad_model_option_is_one_line(tmp_path, capsys):
    """A TypeError from a misspelt option (the classifier would be trained): named, before anything runs."""
    cfg = experiment_config(tmp_path)
    (tmp_path / "clf.pt").unlink()
    out = tmp_path / "out"
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out), "--classifier.module.model_options.widht=4"])
    assert_one_line_error(rc, err, "experiment",
                          r"classifier\.module\.model_options: .*unexpected keyword argument 'widht'")
    assert not out.exists() and not (tmp_path / "clf.pt").exists()


def test_experiment_robust_models_are_checked_before_training(tmp_path, capsys):
    """The third model is invalid: the run must fail before the first one trains (and writes normal.pt)."""
    cfg = tmp_path / "robust.yaml"
    cfg.write_text(yaml.safe_dump({
        "experiment": "robust",
        "data": {"class_path": "DigitsDataModule", "init_args": {"renders_per_digit": [1, 1, 1]}},
        "training": {"max_epochs": 1, "module": {"arch": "small_cnn", "model_options": {"width": 4},
                                                 "inner": {"eps": "8/255", "alpha": "2/255", "steps": 1}}},
        "models": [{"name": "normal", "module": {"mode": "normal"}}, {"name": "pgd_at", "module": {"mode": "pgd_at"}},
                   {"name": "int_adv", "module": {"mode": "int_adv", "gamma": -1.0}}]}))
    out = tmp_path / "out"
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", r"gamma must be >= 0 \(the weight of the worst-case discrepancy\), "
                                                 r"got -1\.0")
    assert not out.exists()


@pytest.mark.parametrize("option, pattern", [
    ("--model.init_args.inner.eps=-0.1", r"need inner\.eps >= 0, .* got -0\.1"),
    ("--model.init_args.inner.eps=0", r"mode 'int_adv' needs inner\.eps > 0 and inner\.steps >= 1"),
    ("--model.init_args.mode=adversarial",
     r"mode must be one of \('normal', 'pgd_at', 'int', 'int_adv', 'int_adv_single', 'trades', 'gaussian'\)"),
    ("--model.init_args.optimiser.lr=fast", r"Parser key \"optimiser\.lr\": Expected a <class 'float'>"),
    ("--model.init_args.optimiser.lr=0", r"need optimiser\.lr > 0"),
    ("--model.init_args.optimiser.schedule=multistep", r"optimiser\.schedule 'multistep' needs optimiser\.milestones"),
    ("--model.init_args.inner.stepz=2", r"unrecognized arguments: --inner\.stepz=2"),
])
def test_fit_inconsistent_robust_values(option, pattern, tmp_path, capsys):
    robust = {"class_path": "defend.robust.RobustClassifierModule",
              "init_args": {"arch": "small_cnn", "model_options": {"width": 4}, "inner": {"steps": 1}}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, robust, DIGITS)), option])
    assert_one_line_error(rc, err, "fit", pattern)
    assert_nothing_written(tmp_path / "out")


def test_fit_negative_epsilon_of_the_inner_attack(tmp_path, capsys):
    aid = {"class_path": "defend.aid.AIDModule",
           "init_args": {"classifier": str(classifier_file(tmp_path / "clf.pt")), "aid": {"weight": 1.0},
                         "attack": {"eps": -0.031}}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, aid, DIGITS))])
    assert_one_line_error(rc, err, "fit", r"eps must be > 0, got -0\.031")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("option, pattern", [
    ("--model.init_args.aid.mode=sometimes", r"Parser key \"aid\.mode\": Expected a typing\.Literal\['alternate', "
                                             r"'joint'\]\. Got value: sometimes"),
    ("--model.init_args.aid.anchor_weight=1", r"aid\.anchor_weight or aid\.anchor_aid_weight > 0 needs aid\.anchor_from or init_from"),
    ("--model.init_args.attack.warm_stepz=1", r"unrecognized arguments: --attack\.warm_stepz=1"),
    ("--model.init_args.objective.fake_label_prob=1.5", r"objective\.fake_label_prob must lie in \[0, 1\), got 1\.5"),
    ("--model.init_args.optimiser.schedule=onecycle", r"AIDModule steps its optimisers itself .*optimiser\.schedule "
                                                      r"must be 'constant'"),
])
def test_fit_bad_aid_options_are_one_line(option, pattern, tmp_path, capsys):
    """Each option group of AIDModule refuses a bad or misspelt nested key before anything is written."""
    aid = {"class_path": "defend.aid.AIDModule", "init_args": {"classifier": str(classifier_file(tmp_path / "clf.pt"))}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, aid, DIGITS)), option])
    assert_one_line_error(rc, err, "fit", pattern)
    assert_nothing_written(tmp_path / "out")


def test_fit_interpreter_unsupported_by_the_model(tmp_path, capsys):
    """An RTS interpreter trained on another classifier's encoder cannot explain this one."""
    clf = classifier_file(tmp_path / "clf8.pt", width=8)
    other = build_classifier("small_cnn", 10, width=4)
    save_rts(RTSNetwork(other.stage_channels, 10, width=4), tmp_path / "rts4.pt")
    aid = {"class_path": "defend.aid.AIDModule",
           "init_args": {"classifier": str(clf), "init_from": str(tmp_path / "rts4.pt")}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, aid, DIGITS))])
    assert_one_line_error(rc, err, "fit", r"RTS network was built for encoder stages \[4, 8, 16\] .* "
                                          r"the classifier has \[8, 16, 32\]")
    assert_nothing_written(tmp_path / "out")


def test_fit_interpretation_unsupported_by_robust_training(tmp_path, capsys):
    robust = {"class_path": "defend.robust.RobustClassifierModule",
              "init_args": {"arch": "small_cnn", "model_options": {"width": 4}, "interpretation": "mask"}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, robust, DIGITS))])
    assert_one_line_error(rc, err, "fit", r"interpretation must be one of \('cam', 'grad'\), got 'mask'")
    assert_nothing_written(tmp_path / "out")


# --------------------------------------------------------------------------------------------- checkpoints
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoint(tmp_path: Path, kind: str) -> Path:
    good = classifier_file(tmp_path / "good.pt")
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":  # bytes damaged in place inside the weights: the archive still opens
        data = bytearray(good.read_bytes())
        weight = torch.load(good, weights_only=True)["state"]["head.weight"].numpy().tobytes()
        at = bytes(data).index(weight)
        data[at: at + 8] = bytes(255 - b for b in data[at: at + 8])
        path.write_bytes(bytes(data))
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "malicious":
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": _Evil(str(tmp_path / "pwned"))}, fh)
    return path


@pytest.mark.parametrize("kind, pattern", [
    ("corrupt", r"corrupt\.pt is corrupt: its weights do not match the checksum"),
    ("truncated", r"cannot load .*truncated\.pt safely"),
    ("foreign", r"foreign\.pt is not an idls-defend checkpoint \(foreign file"),
    ("malicious", r"cannot load .*malicious\.pt safely"),
])
def test_experiment_rejects_bad_classifier_checkpoint(kind, pattern, tmp_path, capsys):
    bad = _bad_checkpoint(tmp_path, kind)
    out = tmp_path / "out"
    rc, err = run(capsys, ["experiment", "-c", str(experiment_config(tmp_path)), "--out", str(out),
                           f"--classifier.checkpoint={bad}"])
    assert_one_line_error(rc, err, "experiment", pattern)
    assert not out.exists()
    assert not (tmp_path / "pwned").exists(), "loading the checkpoint ran code"


@pytest.mark.parametrize("kind", ["truncated", "malicious"])
def test_fit_rejects_bad_classifier_checkpoint(kind, tmp_path, capsys):
    bad = _bad_checkpoint(tmp_path, kind)
    aid = {"class_path": "defend.aid.AIDModule", "init_args": {"classifier": str(bad)}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, aid, DIGITS))])
    assert_one_line_error(rc, err, "fit", rf"cannot load .*{kind}\.pt safely")
    assert_nothing_written(tmp_path / "out")
    assert not (tmp_path / "pwned").exists()


def test_fit_rejects_checkpoint_to_resume_that_does_not_fit(tmp_path, capsys):
    """--ckpt_path: a truncated file, an exported artifact and a foreign Lightning checkpoint, each named."""
    cfg = fit_config(tmp_path, CLASSIFIER, DIGITS)
    truncated = _bad_checkpoint(tmp_path, "truncated")
    rc, err = run(capsys, ["fit", "-c", str(cfg), "--ckpt_path", str(truncated)])
    assert_one_line_error(rc, err, "fit", r"cannot load .*truncated\.pt safely")
    rc, err = run(capsys, ["fit", "-c", str(cfg), "--ckpt_path", str(tmp_path / "good.pt")])
    assert_one_line_error(rc, err, "fit", r"good\.pt is not a Lightning checkpoint \(no state_dict\)")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"model.head.weight": torch.zeros(3, 3)}, "epoch": 0, "global_step": 0}, foreign)
    rc, err = run(capsys, ["fit", "-c", str(cfg), "--ckpt_path", str(foreign)])
    assert_one_line_error(rc, err, "fit", r"foreign\.ckpt \(foreign checkpoint\) does not fit the model: "
                                          r"missing: model\.features.*; shape: model\.head\.weight")
    assert_nothing_written(tmp_path / "out")


def test_class_count_mismatch(tmp_path, capsys):
    # defend fit: a 7-class model on the 10-class digits
    cfg = fit_config(tmp_path, {**CLASSIFIER, "init_args": {**CLASSIFIER["init_args"], "num_classes": 7}}, DIGITS)
    rc, err = run(capsys, ["fit", "-c", str(cfg)])
    assert_one_line_error(rc, err, "fit", r"class count mismatch: the model has 7 classes, the data has 10")
    assert_nothing_written(tmp_path / "out")
    # defend fit: AID on a 7-class classifier checkpoint
    aid = {"class_path": "defend.aid.AIDModule",
           "init_args": {"classifier": str(classifier_file(tmp_path / "clf7.pt", num_classes=7))}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, aid, DIGITS, name="aid.yaml"))])
    assert_one_line_error(rc, err, "fit", r"class count mismatch: the model has 7 classes, the data has 10")
    assert_nothing_written(tmp_path / "out")
    # defend experiment: a reused 7-class checkpoint
    out = tmp_path / "exp"
    rc, err = run(capsys, ["experiment", "-c", str(experiment_config(tmp_path)), "--out", str(out),
                           f"--classifier.checkpoint={tmp_path / 'clf7.pt'}"])
    assert_one_line_error(rc, err, "experiment", r"class count mismatch: .*clf7\.pt has 7 classes, the data has 10")
    assert not out.exists()


# --------------------------------------------------------------------------------------------- the runner itself
def test_experiment_failing_late_leaves_no_output_directory(tmp_path, capsys, monkeypatch):
    import defend.experiments.runner as runner

    def failing_run(cfg, out, progress=True):
        raise ValueError("the experiment failed before writing anything")

    from defend.experiments.config import EXPERIMENTS, ExperimentConfig, ExperimentSpec

    runner.load_experiments()
    monkeypatch.setitem(EXPERIMENTS._items, "failing", ExperimentSpec("failing", failing_run, ExperimentConfig))
    cfg = tmp_path / "failing.yaml"
    cfg.write_text("experiment: failing\n")
    out = tmp_path / "out"
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", "the experiment failed before writing anything")
    assert not out.exists()
    out.mkdir()  # an existing directory is left alone
    (out / "keep.txt").write_text("x")
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])
    assert rc == 2 and (out / "keep.txt").read_text() == "x"


def test_usage_errors_are_one_line(capsys):
    rc, err = run(capsys, ["experiment", "-c", "x.yaml"])
    assert_one_line_error(rc, err, "experiment", r"the following arguments are required: --out")
    rc, err = run(capsys, ["fit", "--trainer.max_epochs=many"])
    assert_one_line_error(rc, err, "fit", r"trainer\.max_epochs.*Expected a <class 'int'> \(got 'many'\)")


def test_one_line_condenses_nested_and_worker_errors():
    nested = ValueError('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [A]\n'
                        "  Errors:\n    - Problem with given class_path 'x.Y':\n        Parser key \"lr\":\n"
                        "          Expected a <class 'float'>. Got value: abc\n    - Expected a <class 'NoneType'>\n"
                        "  Given value type: <class 'str'>\n  Given value: abc")
    assert one_line(nested) == ("Parser key \"model\": Problem with given class_path 'x.Y': Parser key \"lr\": "
                                "Expected a <class 'float'>. Got value: abc")
    worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        '  File "a.py", line 1, in f\nValueError: cannot read image file \'x.png\': broken')
    assert one_line(worker) == "cannot read image file 'x.png': broken"
    assert one_line(KeyError("checkpoint")) == "checkpoint"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/data/x")) == "No such file or directory: /data/x"
