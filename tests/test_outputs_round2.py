"""Outputs that go stale, mixed or lost (issue 25): ``defend fit``'s config.yaml and log folder, the exported artifact
of a full run against a smoke run, the export path checked before training, distinct fine-tuning artifacts, and the
scorecard's resume after an interruption."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from defend.cli import main as defend_main
from defend.io import load_artifact

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY_FIT = """seed_everything: 0
model:
  class_path: defend.classifier.ClassifierModule
  init_args: {arch: small_cnn, num_classes: 10, model_options: {width: 4}, optimiser: {name: adam, lr: 0.01}}
data:
  class_path: defend.data.DigitsDataModule
  init_args: {seed: 0, batch_size: 32, renders_per_digit: [1, 1, 1]}
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
  limit_val_batches: 2
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  callbacks:
    - class_path: defend.callbacks.ExportArtifact
      init_args: {path: ck/tiny.pt, weights: last}
"""


@pytest.fixture(autouse=True)
def _no_global_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; restored afterwards


@pytest.fixture
def tiny_fit(tmp_path, monkeypatch):
    """A folder with the tiny config ``tiny.yaml`` (2 epochs of the embedded digits, width 4), as the working dir."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_FIT)
    return tmp_path


def _fit(*args: str) -> int:
    return defend_main(["fit", "-c", "tiny.yaml", *args])


def _no_training(monkeypatch):
    """Make any training step fail loudly: a refusal must come before training."""
    from defend.classifier import ClassifierModule

    def boom(self, *a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(ClassifierModule, "training_step", boom)


# --------------------------------------------------------------------------------------------- config.yaml
def test_symlinked_config_yaml_is_not_followed(tiny_fit, monkeypatch, capsys):
    target = tiny_fit / "mine.txt"
    target.write_text("the user's own file\n")
    (tiny_fit / "logs").mkdir()
    (tiny_fit / "logs" / "config.yaml").symlink_to(target)
    _no_training(monkeypatch)
    args = ["--trainer.logger=false", "--trainer.default_root_dir=logs"]
    for extra in ([], ["--overwrite"]):  # not even with --overwrite: a link is never written through
        assert _fit(*args, *extra) == 2
        err = capsys.readouterr().err
        assert "logs/config.yaml: it is a symbolic link" in err and len(err.strip().splitlines()) == 1
    assert target.read_text() == "the user's own file\n"
    assert (tiny_fit / "logs" / "config.yaml").is_symlink() and not (tiny_fit / "ck").exists()


def test_users_config_yaml_is_not_overwritten(tiny_fit, monkeypatch, capsys):
    (tiny_fit / "logs").mkdir()
    own = tiny_fit / "logs" / "config.yaml"
    own.write_text("my notes\n")
    _no_training(monkeypatch)
    assert _fit("--trainer.logger=false", "--trainer.default_root_dir=logs") == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite logs/config.yaml: defend did not write it" in err and "--overwrite" in err
    assert own.read_text() == "my notes\n" and not (tiny_fit / "ck").exists()


# --------------------------------------------------------------------------------------------- the artifact
def test_smoke_run_does_not_replace_a_full_runs_artifact(tiny_fit, capsys):
    assert _fit() == 0
    art = tiny_fit / "ck" / "tiny.pt"
    full = art.read_bytes()
    record = load_artifact(art, "classifier")["meta"]["training_run"]
    assert record["full"] is True and record["epochs_run"] == 2 and record["config_max_epochs"] == 2
    capsys.readouterr()
    assert _fit("--trainer.max_epochs=1") == 2
    err = capsys.readouterr().err
    assert "refusing to replace ck/tiny.pt, the artifact of a full 2-epoch run" in err
    assert "max_epochs 1 of the config's 2" in err and "--overwrite" in err
    assert art.read_bytes() == full
    assert _fit("--trainer.limit_train_batches=2") == 2  # fewer batches is a smoke run too
    assert art.read_bytes() == full
    assert _fit("--trainer.max_epochs=1", "--overwrite") == 0
    record = load_artifact(art, "classifier")["meta"]["training_run"]
    assert record["full"] is False and record["epochs_run"] == 1 and art.read_bytes() != full
    # a smoke run may replace a smoke run's artifact, and a full run always may
    assert _fit("--trainer.max_epochs=1") == 0
    assert _fit() == 0
    assert load_artifact(art, "classifier")["meta"]["training_run"]["full"] is True


@pytest.mark.parametrize("case", ["directory", "parent_is_file"])
def test_bad_export_path_is_refused_before_training(tiny_fit, monkeypatch, capsys, case):
    if case == "directory":
        (tiny_fit / "ck" / "tiny.pt").mkdir(parents=True)
        expected = "the export path ck/tiny.pt is a directory"
    else:
        (tiny_fit / "ck").write_text("a file, not a folder")
        expected = "cannot export to ck/tiny.pt: ck is not a directory"
    _no_training(monkeypatch)
    assert _fit() == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not (tiny_fit / "runs").exists(), "a refused run left a log folder"


def test_finetune_variants_export_distinct_artifacts():
    configs = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
    exports, dirs = {}, {}
    for path in configs:
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        exports[path.name] = [c["init_args"]["path"] for c in callbacks if c["class_path"].endswith("ExportArtifact")]
        dirs[path.name] = {c["init_args"]["dirpath"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")}
    assert all(len(v) == 1 for v in exports.values()), exports
    paths = [v[0] for v in exports.values()]
    assert len(set(paths)) == len(paths), f"two fine-tuning configs export the same artifact: {exports}"
    owned = [d for v in dirs.values() for d in v]
    assert len(set(owned)) == len(dirs), f"two fine-tuning configs share a checkpoint folder: {dirs}"
    doc = (ROOT / "docs" / "finetune.md").read_text()
    classifiers = [p.name for p in configs if p.name.startswith("folder_classifier")]
    assert len(classifiers) == 3
    for name in classifiers:  # every variant of step 1 is run with its own config, and its artifact named
        assert f"defend fit -c configs/finetune/{name}" in doc and exports[name][0] in doc


# --------------------------------------------------------------------------------------------- logging
def test_fit_logs_under_the_config_name_with_losses(tiny_fit, capsys):
    assert _fit() == 0
    out = capsys.readouterr().out
    log = tiny_fit / "runs" / "tiny" / "version_0"
    rows = list(csv.DictReader((log / "metrics.csv").open()))
    losses = [r for r in rows if r.get("train/loss")]
    assert {r["epoch"] for r in losses} == {"0", "1"}, "the loss is not logged in every epoch"
    vals = [r for r in rows if r.get("val/acc")]
    last = vals[-1]
    assert f"val/acc {float(last['val/acc']):.4f}" in out and f"val/loss {float(last['val/loss']):.4f}" in out
    assert f"logs (metrics.csv, config.yaml): {Path('runs') / 'tiny' / 'version_0'}" in out
    assert yaml.safe_load((log / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    assert not (tiny_fit / "runs" / "fit").exists()
    # trainer.default_root_dir moves the default logger
    assert _fit("--trainer.default_root_dir=elsewhere") == 0
    assert (tiny_fit / "elsewhere" / "tiny" / "version_0" / "metrics.csv").is_file()


# --------------------------------------------------------------------------------------------- scorecard resume
def test_scorecard_resumes_models_and_cards(tmp_path, monkeypatch, capsys):
    """A second run into the same --out (as after a kill in the last row) trains nothing again and re-evaluates only
    the row whose card is gone; a model whose file was edited is retrained."""
    from _tiny import train_tiny_classifier

    import defend.evaluate as evaluate
    import defend.experiments.scorecard as sc
    from defend import save_classifier
    from defend.experiments.runner import load_experiments
    from defend.experiments.runner import main as experiment

    model, _, _ = train_tiny_classifier(steps=60, width=4)
    clf = tmp_path / "tiny.pt"
    save_classifier(model, clf, {"width": 4})
    out = tmp_path / "out"
    calls: dict[str, list[str]] = {"train": [], "evaluate": []}
    real_robust, real_eval = sc.train_robust, evaluate.evaluate_system
    monkeypatch.setattr(sc, "train_robust", lambda r, m, *a: calls["train"].append(m.name) or real_robust(r, m, *a))
    monkeypatch.setattr(evaluate, "evaluate_system",
                        lambda c, o, **k: calls["evaluate"].append(Path(o).name) or real_eval(c, o, **k))
    args = ["-c", str(ROOT / "tests" / "data" / "scorecard_tiny.yaml"), "--out", str(out), "--no-progress",
            f"--classifier.checkpoint={clf}", "--defences=[normal, pgd_at]"]
    monkeypatch.chdir(ROOT)  # the tiny config names tests/data/evaluate_tiny.yaml relative to the repository
    load_experiments()
    assert experiment(args) == 0
    assert calls == {"train": ["pgd_at"], "evaluate": ["normal", "pgd_at"]}
    first = (out / "cards" / "normal" / "card.json").read_bytes()
    (out / "cards" / "pgd_at" / "card.json").unlink()  # the run was killed in its last row
    calls = {"train": [], "evaluate": []}
    capsys.readouterr()
    assert experiment(args) == 0
    printed = capsys.readouterr().out
    assert calls == {"train": [], "evaluate": ["pgd_at"]}
    assert f"reusing {out / 'models' / 'pgd_at.pt'}" in printed and "cards/normal/card.json" in printed
    assert (out / "cards" / "normal" / "card.json").read_bytes() == first
    assert json.loads((out / "metrics.json").read_text())  # the table is written from the reused card too
    # an edited model (checksum no longer the recorded one) is not reused; its card is not either
    model_file = out / "models" / "pgd_at.pt"
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    calls = {"train": [], "evaluate": []}
    assert experiment([*args, "--overwrite"]) == 0
    assert calls == {"train": ["pgd_at"], "evaluate": ["pgd_at"]}
    assert os.path.isfile(out / "models" / "pgd_at.settings.json")
