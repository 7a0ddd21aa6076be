"""Safety by design: no code from data, a checkpoint never changes the configured model, schedules of any length,
images of every common mode, errors that say what to do.

Every test goes through the command line where a user would (``defend fit|validate|test`` in-process,
``defend experiment``) and checks the behaviour a wrong implementation would get wrong: a payload's marker file
does not exist afterwards, the user's ``last.ckpt`` keeps its bytes, no log directory appears, pixel values are
the right ones. The helpers follow tests/test_errors.py.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from defend.classifier import MIN_ONE_CYCLE_STEPS, ClassifierModule, save_classifier
from defend.cli import main as defend_main
from defend.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from defend.data.cifar import read_cifar10
from defend.data.folder import load_image
from defend.experiments.common import get_classifier
from defend.io import CheckpointError
from defend.models import build_classifier

REPO = Path(__file__).resolve().parents[1]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


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


def assert_one_line_error(rc: int, err: str, command: str, pattern: str) -> str:
    assert rc == 2, f"exit status {rc}, stderr:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.startswith(f"defend {command}: error:")]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    return lines[0]


def assert_nothing_written(*paths: Path) -> None:
    for p in paths:
        assert not p.exists() or not any(p.rglob("*")), f"{p} holds {sorted(map(str, p.rglob('*')))}"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show that a refused run changed nothing)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def classifier_file(path: Path, num_classes: int = 10, width: int = 4, arch: str = "small_cnn",
                    options: dict | None = None) -> Path:
    torch.manual_seed(0)
    save_classifier(build_classifier(arch, num_classes, width=width), path, {"width": width} if options is None
                    else options)
    return path


def fit_config(root: Path, model: dict, data: dict, name: str = "fit.yaml", **trainer) -> Path:
    """A `defend fit` YAML under ``root`` whose logs and checkpoints all go under root/out."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / "out"
    cfg = {"seed_everything": 0, "model": model, "data": data,
           "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2,
                       "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
                       "default_root_dir": str(out),
                       "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                                  "init_args": {"save_dir": str(out / "logs")}},
                       "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                      "init_args": {"dirpath": str(out / "ckpt"), "save_last": True}}],
                       **trainer}}
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def classifier(width: int = 4, **extra) -> dict:
    return {"class_path": "defend.classifier.ClassifierModule",
            "init_args": {"arch": "small_cnn", "num_classes": 10, "model_options": {"width": width}, **extra}}


DIGITS = {"class_path": "defend.data.DigitsDataModule",
          "init_args": {"seed": 0, "batch_size": 16, "renders_per_digit": [1, 1, 1]}}


class _Evil:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------- 1. no code from data
class _Py2Pickler(pickle._Pickler):
    """Writes strings the way Python 2 pickled ``str`` (SHORT_BINSTRING / BINSTRING), as in the official
    cifar-10-python.tar.gz (together with numpy 1's module name, patched in by :func:`_py2_batch`)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, obj) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        head = (pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256
                else pickle.BINSTRING + struct.pack("<i", len(data)))
        self.write(head + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_string
    dispatch[str] = _save_py2_string


def _py2_batch(entry: dict) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(entry)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")


def _cifar_entry(name: str, n: int, seed: int) -> dict:
    """A batch with the structure of the official files."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": f"{name} of 6".encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}


def write_cifar(root: Path, protocol="py2", n: int = 6, evil: Path | None = None) -> dict[str, dict]:
    """A ``cifar-10-batches-py`` folder; with ``evil`` the first batch also carries a payload touching that file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    entries = {}
    for i, name in enumerate(CIFAR_FILES):
        entry = entries[name] = _cifar_entry(name, n, i)
        if evil is not None and name == "data_batch_1":
            entry = {**entry, b"extra": _Evil(evil)}
        data = _py2_batch(entry) if protocol == "py2" else pickle.dumps(entry, protocol=protocol)
        (folder / name).write_bytes(data)
    return entries


NOT_A_BATCH = (r"data_batch_1 is not a plain CIFAR-10 batch: it asks to load (posix|os|nt)\.system, which could run "
               r"code; re-extract the official cifar-10-python\.tar\.gz")


def test_cifar_payload_does_not_run_in_fit(tmp_path, capsys):
    marker = tmp_path / "pwned"
    write_cifar(tmp_path / "cifar", protocol=2, evil=marker)
    data = {"class_path": "defend.data.CIFAR10DataModule",
            "init_args": {"root": str(tmp_path / "cifar"), "val_size": 6, "batch_size": 4}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, classifier(), data))])
    assert_one_line_error(rc, err, "fit", NOT_A_BATCH)
    assert not marker.exists(), "reading the CIFAR-10 batch ran its payload"
    assert_nothing_written(tmp_path / "out")


def test_cifar_payload_does_not_run_in_experiment_checks(tmp_path, capsys):
    """The shipped GPU config pointed at a crafted folder with --data.init_args.root=...: refused by the config checks."""
    marker = tmp_path / "pwned"
    write_cifar(tmp_path / "cifar", protocol="py2", evil=marker)
    out = tmp_path / "out"
    rc, err = run(capsys, ["experiment", "-c", str(REPO / "configs/experiments/robust_cifar10.yaml"), "--quick",
                           "--out", str(out), f"--data.init_args.root={tmp_path / 'cifar'}"])
    assert_one_line_error(rc, err, "experiment", NOT_A_BATCH)
    assert not marker.exists(), "the experiment's config checks ran the payload"
    assert not out.exists()


@pytest.mark.parametrize("protocol", ["py2", 2, 3, 4, 5])
def test_cifar_genuine_batches_still_load(protocol, tmp_path):
    """The official format (Python 2 pickle: numpy.core.multiarray._reconstruct, ndarray, dtype, byte strings) and
    re-pickled copies (Python 3, protocols 2-5) load to exactly the stored images and labels."""
    entries = write_cifar(tmp_path, protocol=protocol)
    images, labels = read_cifar10(tmp_path, train=False)
    want = entries["test_batch"]
    assert images.dtype == torch.uint8 and tuple(images.shape) == (6, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(want[b"data"].reshape(-1, 3, 32, 32)))
    assert labels.tolist() == want[b"labels"]
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=6, batch_size=4)
    assert len(dm.train_dataset) == 24 and len(dm.test_dataset) == 6


def test_cifar_batch_with_wrong_content_is_named(tmp_path):
    write_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((6, 3072), np.float32), b"labels": [0] * 6}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: expected 'data' to be a uint8 array \[n, 3072\], got float32"):
        CIFAR10DataModule(root=str(tmp_path))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model.head.weight": torch.zeros(1)}, "x": _Evil(marker)}, path)
    return path


def test_ckpt_path_last_goes_through_the_safe_loader(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = fit_config(tmp_path, classifier(), DIGITS)
    last = _evil_checkpoint(tmp_path / "out" / "ckpt" / "last.ckpt", marker)
    before = snapshot(tmp_path / "out")
    rc, err = run(capsys, ["fit", "-c", str(cfg), "--ckpt_path", "last"])
    assert_one_line_error(rc, err, "fit", rf"cannot load {re.escape(str(last))} safely")
    assert not marker.exists(), "--ckpt_path last ran the checkpoint's payload"
    assert snapshot(tmp_path / "out") == before, "a refused run wrote files"


def test_ckpt_path_last_without_a_last_checkpoint_says_where_it_looked(tmp_path, capsys):
    cfg = fit_config(tmp_path, classifier(), DIGITS)
    rc, err = run(capsys, ["fit", "-c", str(cfg), "--ckpt_path", "last"])
    where = re.escape(str((tmp_path / "out" / "ckpt").resolve()))
    assert_one_line_error(rc, err, "fit", rf"--ckpt_path last: no last checkpoint to resume from: looked for "
                                          rf"{where}/last\*\.ckpt; start the run without --ckpt_path")
    assert not (tmp_path / "out").exists(), "a refused run left a log directory"
    rc, err = run(capsys, ["validate", "-c", str(cfg), "--ckpt_path", "best"])
    assert_one_line_error(rc, err, "validate", r"--ckpt_path best cannot be resolved by a new run.*--ckpt_path FILE")
    rc, err = run(capsys, ["test", "-c", str(cfg), "--ckpt_path", "https://example.org/model.ckpt"])
    assert_one_line_error(rc, err, "test", r"only local checkpoint files are accepted; download it first")
    assert not (tmp_path / "out").exists()


def test_weights_only_false_is_refused_before_anything_loads(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    cfg = fit_config(tmp_path, classifier(), DIGITS)
    for argv in (["--weights_only", "false"], ["--weights_only=false"]):
        rc, err = run(capsys, ["fit", "-c", str(cfg), "--ckpt_path", str(evil), *argv])
        assert_one_line_error(rc, err, "fit", r"--weights_only is not an option of defend: checkpoints are always "
                                              r"loaded with weights_only=True")
    in_yaml = tmp_path / "weights.yaml"
    in_yaml.write_text(f"ckpt_path: {evil}\nweights_only: false\n")
    rc, err = run(capsys, ["fit", "-c", str(cfg), "-c", str(in_yaml)])
    assert_one_line_error(rc, err, "fit", r"weights_only")
    assert not marker.exists(), "a checkpoint was unpickled without weights_only"
    assert_nothing_written(tmp_path / "out")
    capsys.readouterr()
    assert defend_main(["fit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--weights_only" not in text and "It is loaded with weights_only=True" in text


# --------------------------------------------------------------------------------------------- 2. the configured model
@pytest.fixture
def two_runs(tmp_path, capsys):
    """The user's run (width 8, its good last.ckpt) and the last.ckpt of another config's run (width 4)."""
    mine = fit_config(tmp_path / "mine", classifier(width=8), DIGITS)
    other = fit_config(tmp_path / "other", classifier(width=4), DIGITS)
    for cfg in (mine, other):
        rc, err = run(capsys, ["fit", "-c", str(cfg)])
        assert rc == 0, err
    return mine, tmp_path / "mine" / "out", tmp_path / "other" / "out" / "ckpt" / "last.ckpt"


def test_checkpoint_of_another_model_never_changes_the_configured_one(two_runs, capsys):
    mine, out, foreign = two_runs
    before = snapshot(out)
    assert "ckpt/last.ckpt" in before
    for command in ("fit", "validate", "test"):
        rc, err = run(capsys, [command, "-c", str(mine), "--ckpt_path", str(foreign), "--trainer.max_epochs=2"])
        verb = "resume from" if command == "fit" else f"{command} with"
        assert_one_line_error(rc, err, command, rf"cannot {verb} .*other/out/ckpt/last\.ckpt: it was written for "
                                                rf"another model than the config describes: model_options: "
                                                rf"checkpoint \{{'width': 4\}}, config \{{'width': 8\}}")
    assert snapshot(out) == before, "the user's checkpoints or logs changed"
    # the same model with a hyper-parameter that leaves every weight shape alone (input size) is refused too
    ckpt = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model_options"] = {"width": 8, "input_size": 64}
    ckpt["idls_meta"]["input_size"] = 64
    torch.save(ckpt, out.parent / "resized.ckpt")
    rc, err = run(capsys, ["validate", "-c", str(mine), "--ckpt_path", str(out.parent / "resized.ckpt")])
    assert_one_line_error(rc, err, "validate", r"model_options: checkpoint \{'input_size': 64\}, config "
                                               r"\{'input_size': 32\}")
    assert snapshot(out) == before
    # control: its own checkpoint resumes (and only then is last.ckpt rewritten)
    rc, err = run(capsys, ["fit", "-c", str(mine), "--ckpt_path", "last", "--trainer.max_epochs=2"])
    assert rc == 0, err
    assert torch.load(out / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_checkpoint_class_path_is_never_imported(two_runs, tmp_path, capsys, monkeypatch):
    mine, out, _ = two_runs
    marker = tmp_path / "imported"
    (tmp_path / "safety_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Module: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "safety_payload.Module"
    torch.save(ckpt, tmp_path / "crafted.ckpt")
    before = snapshot(out)
    rc, err = run(capsys, ["fit", "-c", str(mine), "--ckpt_path", str(tmp_path / "crafted.ckpt")])
    assert_one_line_error(rc, err, "fit", r"module class: checkpoint 'safety_payload\.Module', config "
                                          r"'defend\.classifier\.ClassifierModule'")
    assert not marker.exists() and "safety_payload" not in sys.modules, "the checkpoint's class path was imported"
    assert snapshot(out) == before


def _experiment(tmp_path: Path, checkpoint: Path, width: int = 4) -> Path:
    cfg = {"experiment": "attacks", "seed": 0,
           "data": {"class_path": "DigitsDataModule", "init_args": {"seed": 0, "renders_per_digit": [1, 1, 1]}},
           "classifier": {"checkpoint": str(checkpoint),
                          "module": {"arch": "small_cnn", "model_options": {"width": width}}},
           "evaluation": {"attacks": ["pgd"], "frameworks": ["pgd"], "interpreters": ["cam"], "n_images": 4},
           "attack": {"eps": 0.031, "alpha": 0.004, "warm_steps": 2, "steps": 2}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _typed(path: Path):
    """The attacks experiment config of ``path`` as the typed config the experiments receive (not yet checked)."""
    from defend.experiments.attacks import AttacksExperiment
    from defend.typed_config import parse_typed

    return parse_typed(AttacksExperiment, yaml.safe_load(path.read_text()))[0]


@pytest.mark.parametrize("arch, width, pattern", [
    ("resnet18_cifar", 8, r"arch: checkpoint 'resnet18_cifar', config 'small_cnn'"),
    ("small_cnn", 8, r"model_options: checkpoint \{'width': 8\}, config \{'width': 4\}"),
])
def test_experiment_reuses_only_the_configured_classifier(arch, width, pattern, tmp_path, capsys):
    ckpt = classifier_file(tmp_path / "clf.pt", arch=arch, width=width)
    before = ckpt.read_bytes()
    out = tmp_path / "out"
    rc, err = run(capsys, ["experiment", "-c", str(_experiment(tmp_path, ckpt)), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", rf"clf\.pt holds another classifier than the config describes: "
                                                 rf"{pattern}; delete the checkpoint or set classifier\.retrain: true")
    assert not out.exists() and ckpt.read_bytes() == before
    # the experiments' own route (get_classifier) refuses it the same way
    dm = DigitsDataModule(seed=0, renders_per_digit=(1, 1, 1))
    with pytest.raises(CheckpointError, match=pattern):
        get_classifier(_typed(tmp_path / "experiment.yaml"), dm, out)


def test_experiment_reuse_fills_in_architecture_defaults(tmp_path):
    """{width: 32} in the config and a checkpoint saved without options (small_cnn's default width is 32) agree."""
    ckpt = classifier_file(tmp_path / "clf.pt", width=32, options={})
    dm = DigitsDataModule(seed=0, renders_per_digit=(1, 1, 1))
    model, info = get_classifier(_typed(_experiment(tmp_path, ckpt, width=32)), dm, tmp_path / "out")
    assert info == {"trained": False, "checkpoint": str(ckpt)} and model.stage_channels[0] == 32


def test_a_trained_classifier_does_not_follow_the_experiment_seed(tmp_path):
    """The classifier an experiment trains is shared by every later run: the experiment's seed must not change it
    (a fresh clone running ``--seed=1`` first got another classifier than one running seed 0 first)."""
    dm = DigitsDataModule(seed=0, renders_per_digit=(1, 1, 1), batch_size=32)

    def trained(name: str, experiment_seed: int, **spec) -> dict[str, torch.Tensor]:
        path = _experiment(tmp_path, tmp_path / f"{name}.pt")
        cfg = yaml.safe_load(path.read_text())
        cfg["seed"] = experiment_seed
        cfg["classifier"].update(max_epochs=1, **spec)
        cfg["trainer"] = {"limit_train_batches": 3, "enable_progress_bar": False}
        path.write_text(yaml.safe_dump(cfg))
        model, info = get_classifier(_typed(path), dm, tmp_path / "out", progress=False)
        assert info["trained"] and (tmp_path / f"{name}.pt").is_file()
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b, c = trained("a", 0), trained("b", 7), trained("c", 0, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the experiment's seed: the same classifier
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the classifier's own seed: another one


# --------------------------------------------------------------------------------------------- 3. schedules
@pytest.mark.parametrize("steps", range(1, 13))
def test_one_cycle_schedule_of_any_length(steps):
    """OneCycleLR divides by zero on 4 steps and spends a 1-step run at lr / 250000: every length trains."""
    module = ClassifierModule(model_options={"width": 4}, optimiser={"lr": 0.01})
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    used = []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used[0] == pytest.approx(0.01 / 25)
    if steps < MIN_ONE_CYCLE_STEPS:
        assert min(used) >= 0.01 / 25 * 0.999, used
    assert max(used) <= 0.01 * 1.0001


def test_fit_with_a_very_short_schedule(tmp_path, capsys):
    """4 optimiser steps (OneCycleLR's division by zero before): trains and writes its checkpoint."""
    cfg = fit_config(tmp_path, classifier(), DIGITS, limit_train_batches=4)
    rc, err = run(capsys, ["fit", "-c", str(cfg)])
    assert rc == 0, err
    assert torch.load(tmp_path / "out" / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.parametrize("options, pattern", [
    (["--trainer.max_epochs=-1"], r"the one-cycle learning-rate schedule needs a finite run"),
    (["--trainer.limit_train_batches=0"], r"trainer\.limit_train_batches is 0: nothing would be trained"),
])
def test_fit_schedule_that_cannot_run(options, pattern, tmp_path, capsys):
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, classifier(), DIGITS)), *options])
    assert_one_line_error(rc, err, "fit", pattern)
    assert_nothing_written(tmp_path / "out")


ROBUST = {"class_path": "defend.robust.RobustClassifierModule",
          "init_args": {"arch": "small_cnn", "model_options": {"width": 4}, "inner": {"steps": 1}, "mode": "normal"}}


def test_robust_milestones(tmp_path, capsys):
    """Milestones must be epochs >= 1; one after max_epochs is allowed (a shortened run of the same schedule,
    e.g. --quick): the run ends before the decay, and the learning rate it used is the configured one."""
    cfg = fit_config(tmp_path, ROBUST, DIGITS)
    multistep = "--model.init_args.optimiser.schedule=multistep"
    for bad in ("[0]", "[2, -1]"):
        rc, err = run(capsys, ["fit", "-c", str(cfg), multistep, f"--model.init_args.optimiser.milestones={bad}"])
        assert_one_line_error(rc, err, "fit", r"optimiser\.milestones must be whole epochs >= 1")
        assert_nothing_written(tmp_path / "out")
    rc, err = run(capsys, ["fit", "-c", str(cfg), "--model.init_args.optimiser.milestones=[6]"])
    assert_one_line_error(rc, err, "fit", r"optimiser\.milestones \[6\] are only used by schedule 'multistep'")
    rc, err = run(capsys, ["fit", "-c", str(cfg), multistep, "--model.init_args.optimiser.milestones=[6]",
                           "--model.init_args.optimiser.lr=0.002"])
    assert rc == 0, err
    ckpt = torch.load(tmp_path / "out" / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.002)
    assert ckpt["lr_schedulers"][0]["milestones"] == {6: 1}


# --------------------------------------------------------------------------------------------- 4. images
def _image_folder(root: Path, images: dict[str, Image.Image], save: dict | None = None) -> Path:
    for i, (name, img) in enumerate(images.items()):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"class{i % 2}" / name, **(save or {}).get(name, {}))
    return root


def _items(dm: ImageFolderDataModule) -> dict[str, torch.Tensor]:
    ds = dm.train_dataset
    return {Path(f).name: ds[i]["image"] for i, f in enumerate(ds.files)}


def test_sixteen_bit_grey_images_keep_their_values(tmp_path):
    grid = (np.arange(64, dtype=np.float64).reshape(8, 8) / 63 * 65535).round().astype(np.uint16)
    mid = np.full((8, 8), 32768, dtype=np.uint16)
    root = _image_folder(tmp_path / "img", {"ramp.png": Image.fromarray(grid), "mid.png": Image.fromarray(mid)})
    assert Image.open(root / "class0" / "ramp.png").mode.startswith("I")  # a real 16-bit PNG
    dm = ImageFolderDataModule(str(root), image_size=8, resize=8, val_fraction=0, test_fraction=0, batch_size=2)
    items = _items(dm)
    want = torch.from_numpy(np.round(grid / 65535 * 255) / 255).float()
    for c in range(3):
        assert torch.equal(items["ramp.png"][c], want), "16-bit values were not scaled from 0..65535"
    assert torch.all(items["mid.png"] == 128 / 255)


def test_palette_and_alpha_images_are_composited_on_black(tmp_path):
    """Palette with per-index transparency (tRNS), RGBA and LA: rgb * alpha / 255, i.e. composited on black."""
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2, 1])
    rgba = Image.fromarray(np.array([[[200, 100, 50, 0], [200, 100, 50, 255]],
                                     [[200, 100, 50, 51], [10, 20, 30, 255]]], np.uint8))
    la = Image.fromarray(np.array([[[255, 0], [255, 255]], [[100, 255], [100, 0]]], np.uint8))
    assert (rgba.mode, la.mode) == ("RGBA", "LA")
    root = _image_folder(tmp_path / "img", {"p.png": palette, "rgba.png": rgba, "la.png": la, "plain.png": palette},
                         save={"p.png": {"transparency": bytes([0, 128, 255])}})
    assert Image.open(root / "class0" / "p.png").mode == "P"
    dm = ImageFolderDataModule(str(root), image_size=2, resize=2, val_fraction=0, test_fraction=0)
    rgb = {name: (x * 255).round().permute(1, 2, 0).reshape(4, 3).long().tolist() for name, x in _items(dm).items()}
    assert rgb["p.png"] == [[0, 0, 0], [0, 128, 0], [0, 0, 255], [0, 128, 0]]  # transparent red -> black
    assert rgb["plain.png"] == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 0]]  # no transparency: as stored
    assert rgb["rgba.png"][0] == [0, 0, 0] and rgb["rgba.png"][1] == [200, 100, 50]
    assert np.abs(np.array(rgb["rgba.png"][2]) - [40, 20, 10]).max() <= 1  # alpha 51/255 = 0.2
    assert rgb["rgba.png"][3] == [10, 20, 30]
    assert rgb["la.png"] == [[0, 0, 0], [255, 255, 255], [100, 100, 100], [0, 0, 0]]
    with Image.open(next(root.rglob("rgba.png"))) as img:
        assert load_image(img).mode == "RGB"


def test_image_mode_that_cannot_be_read_is_one_line(tmp_path, capsys):
    root = tmp_path / "img"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "ok.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(root / "dog" / "float.tif")
    data = {"class_path": "defend.data.ImageFolderDataModule",
            "init_args": {"root": str(root), "image_size": 8, "resize": 8, "batch_size": 2}}
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, classifier(), data))])
    assert_one_line_error(rc, err, "fit", r"'.*dog/float\.tif': image mode 'F' is not supported .*save it as 8- or "
                                          r"16-bit grey, RGB or RGBA")
    assert_nothing_written(tmp_path / "out")


# --------------------------------------------------------------------------------------------- 5. errors that help
@pytest.mark.parametrize("option, pattern", [
    ("--trainer.max_epochz=3", r"unrecognized arguments: --trainer\.max_epochz=3 \(did you mean "
                               r"'--trainer\.max_epochs'\?\)"),
    ("--model.init_args.label_smothing=0.1", r"Option 'label_smothing' is not accepted \(did you mean "
                                             r"'label_smoothing'\?\)"),
    ("--model.init_args.optimiser.lrr=0.1", r"unrecognized arguments: --optimiser\.lrr=0\.1"),
    ("--model.init_args.optimiser.name=adamx", r"Parser key \"optimiser\.name\": Expected a "
                                               r"typing\.Literal\['sgd', 'adam', 'adamw'\]\. Got value: adamx"),
    ("--data.init_args.batchsize=4", r"Option 'batchsize' is not accepted \(did you mean 'batch_size'\?\)"),
    ("--trainer.precision=17", r"trainer\.precision\": Expected one of: 64, 32, 16, .*'bf16-mixed'.* \(got '17'\)"),
])
def test_misspelt_keys_and_choices_are_named(option, pattern, tmp_path, capsys):
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, classifier(), DIGITS)), option])
    assert_one_line_error(rc, err, "fit", pattern)
    assert_nothing_written(tmp_path / "out")


def test_misspelt_yaml_key_gets_a_suggestion_and_a_far_one_none(tmp_path, capsys):
    cfg = fit_config(tmp_path, classifier(), DIGITS)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer: {max_epoch: 2}\n")
    rc, err = run(capsys, ["fit", "-c", str(cfg), "-c", str(typo)])
    assert_one_line_error(rc, err, "fit", r"does not accept option 'trainer\.max_epoch' \(did you mean "
                                          r"'trainer\.max_epochs'\?\)")
    typo.write_text("model: {init_args: {optimiser: {lrr: 0.1}}}\n")  # a misspelt key of an option group
    rc, err = run(capsys, ["fit", "-c", str(cfg), "-c", str(typo)])
    assert_one_line_error(rc, err, "fit", r"Group 'optimiser' does not accept option 'lrr'")
    typo.write_text("trainer: {zzzz: 2}\n")
    rc, err = run(capsys, ["fit", "-c", str(cfg), "-c", str(typo)])
    line = assert_one_line_error(rc, err, "fit", r"does not accept option 'trainer\.zzzz'")
    assert "did you mean" not in line
    assert_nothing_written(tmp_path / "out")


def test_weights_that_do_not_fit_name_the_cause(tmp_path, capsys):
    """Not a cut-off "Error(s) in loading state_dict": which options differ, which weights, and what to do."""
    clf4 = classifier_file(tmp_path / "clf4.pt", width=4)
    rc, err = run(capsys, ["fit", "-c", str(fit_config(tmp_path, classifier(width=8, init_from=str(clf4)), DIGITS))])
    assert_one_line_error(rc, err, "fit", r"init_from .*clf4\.pt does not fit the model: model_options: init_from "
                                          r"\{'width': 4\}, model \{'width': 8\}; shape: features\.\S+ \(checkpoint "
                                          r"\[4, .*\], model \[8, .*\]\) and \d+ more; set the model's arch and "
                                          r"model_options to those of the checkpoint, or drop init_from")
    assert "Error(s) in loading state_dict" not in err
    assert_nothing_written(tmp_path / "out")
    # a file whose weights do not fit its own metadata (written by other code), reused by an experiment
    torch.manual_seed(0)
    liar = tmp_path / "liar.pt"
    save_classifier(build_classifier("small_cnn", 10, width=4), liar, {"width": 8})
    out = tmp_path / "exp"
    rc, err = run(capsys, ["experiment", "-c", str(_experiment(tmp_path, liar, width=8)), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", r"liar\.pt: its weights do not fit the 'small_cnn' classifier "
                                                 r"\(model_options \{'width': 8\}\) its metadata describes: shape: "
                                                 r".*re-export it")
    assert "Error(s) in loading state_dict" not in err and not out.exists()
