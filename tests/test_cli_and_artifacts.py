"""The command line, the experiment runner and safe, atomic artifacts."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import defend.io as defend_io
from defend.classifier import load_classifier, save_classifier
from defend.cli import main as defend_main
from defend.io import CheckpointError, atomic_write_text
from defend.models import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_and_unknown_command(capsys):
    assert defend_main(["--help"]) == 0
    assert "experiment" in capsys.readouterr().out
    assert defend_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_experiment_errors_are_one_line_and_nonzero(tmp_path, capsys):
    assert defend_main(["experiment", "-c", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: nope\n")
    assert defend_main(["experiment", "-c", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    bad.write_text("experiment: attacks\nevaluation: {attacks: [pgd, adv3]}\n")
    assert defend_main(["experiment", "-c", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown attack 'adv3'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_checkpoint_roundtrip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 10, width=4).eval()
    path = tmp_path / "clf.pt"
    save_classifier(model, path, {"width": 4})
    loaded = load_classifier(path, num_classes=10, input_size=32)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_class_count_and_input_size_mismatch(tmp_path):
    model = build_classifier("small_cnn", 10, width=4)
    path = tmp_path / "clf.pt"
    save_classifier(model, path, {"width": 4})
    with pytest.raises(CheckpointError, match="class count mismatch"):
        load_classifier(path, num_classes=7)
    with pytest.raises(CheckpointError, match="input size mismatch"):
        load_classifier(path, input_size=224)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Evil(str(marker))}, fh)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_classifier(path)
    assert not marker.exists(), "loading a checkpoint executed code"
    # also inside a torch zip archive
    torch.save({"x": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError):
        load_classifier(path)
    assert not marker.exists()


def test_corrupt_truncated_and_foreign_checkpoints(tmp_path):
    model = build_classifier("small_cnn", 10, width=4)
    good = tmp_path / "clf.pt"
    save_classifier(model, good, {"width": 4})
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot load"):
        load_classifier(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_classifier(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign"):
        load_classifier(foreign)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "nope.pt")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old")

    def boom(fd, data):  # the file write itself fails (atomic writes go through defend.io._write_all)
        raise OSError("disk full")

    monkeypatch.setattr(defend_io, "_write_all", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_classifier_experiment_end_to_end(tmp_path):
    """Train a tiny classifier through the runner; it learns and the outputs are complete."""
    cfg = tmp_path / "clf.yaml"
    cfg.write_text(f"""
experiment: classifier
seed: 0
data: {{class_path: DigitsDataModule, init_args: {{seed: 0, batch_size: 64, renders_per_digit: [3, 1, 1]}}}}
classifier: {{checkpoint: {tmp_path / 'clf.pt'}, max_epochs: 4,
             module: {{arch: small_cnn, model_options: {{width: 8}}, optimiser: {{name: adamw, lr: 0.01}}}}}}
trainer: {{enable_progress_bar: false}}
evaluation: {{n_images: 64, n_mask: 8, mask: {{iterations: 20}}}}
""")
    out = tmp_path / "out"
    assert defend_main(["experiment", "-c", str(cfg), "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    acc = next(r["value"] for r in rows if r["metric"] == "test_accuracy")
    assert acc > 0.3, f"classifier did not learn (accuracy {acc})"  # measured 0.82 (OMP 1 and 2, 2026-12-06)
    assert {r["setting"] for r in rows if r["metric"] == "localisation"} == {"cam", "grad", "mask"}
    assert (out / "report.md").read_text().startswith("# Classifier")
    assert (out / "maps.png").stat().st_size > 1000
    # a second run reuses the checkpoint instead of training
    assert defend_main(["experiment", "-c", str(cfg), "--out", str(out), "--no-progress"]) == 0
    rows2 = json.loads((out / "metrics.json").read_text())
    assert next(r["value"] for r in rows2 if r["metric"] == "test_accuracy") == acc
