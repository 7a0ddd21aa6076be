"""``defend fit`` exports the trained defence where the experiments read it (one artifact layout), from the best
checkpoint's weights, says where everything went, and never replaces a file the user made."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defend.checks import load_checkpoint_file
from defend.classifier import load_classifier

ROOT = Path(__file__).resolve().parents[1]
FIT = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
       "--trainer.enable_progress_bar=false", "--model.init_args.model_options.width=4",
       "--data.init_args.renders_per_digit=[1,1,1]"]


def fit(cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "defend.cli", "fit", "-c", str(ROOT / "configs/classifier/digits.yaml"), *FIT]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fit")
    res = fit(cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd, res


def test_fit_exports_the_best_weights_where_the_experiments_read_them(fitted):
    cwd, res = fitted
    artifact = cwd / "checkpoints" / "digits_small_cnn.pt"  # the path configs/experiments/*.yaml reuse
    best = [p for p in (cwd / "checkpoints" / "classifier_digits").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1
    model = load_classifier(artifact, num_classes=10, input_size=32, arch="small_cnn", model_options={"width": 4})
    state = load_checkpoint_file(best[0])["state_dict"]
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in model.state_dict().items())
    last = load_checkpoint_file(cwd / "checkpoints" / "classifier_digits" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(last[k], state[k]) for k in state if k.startswith("model."))  # best != last here
    out = res.stdout + res.stderr
    assert "[defend] exported the trained classifier to checkpoints/digits_small_cnn.pt (weights of " in out
    assert "Lightning checkpoints (resume with --ckpt_path last):" in out and "classifier_digits" in out
    assert "Tip:" not in out and "LeafSpec" not in out  # no advertisement or Lightning-internal deprecation noise


def test_fit_refuses_before_training_to_replace_a_users_file(fitted):
    cwd, _ = fitted
    artifact = cwd / "checkpoints" / "digits_small_cnn.pt"
    before = sorted(p.name for p in (cwd / "checkpoints" / "classifier_digits").iterdir())
    artifact.write_bytes(b"my own classifier")
    res = fit(cwd)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("defend fit: error:")]
    assert len(lines) == 1 and "refusing to overwrite checkpoints/digits_small_cnn.pt" in lines[0], res.stderr[-800:]
    assert artifact.read_bytes() == b"my own classifier"
    assert sorted(p.name for p in (cwd / "checkpoints" / "classifier_digits").iterdir()) == before  # nothing trained
