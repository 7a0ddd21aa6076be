"""Fine-tuning on a new dataset (docs/finetune.md), end to end on a generated image-folder tree.

The shipped configs/finetune/*.yaml are run through `defend fit` exactly as the document says, shrunk to a few
batches: a classifier for the folder, a plain RTS for it, AID fine-tuning of that RTS (`init_from`), and
interpretation-robust fine-tuning of the classifier (`init_from`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from defend.aid import load_rts
from defend.classifier import ClassifierModule, load_classifier, save_classifier
from defend.cli import main as defend_main
from defend.data import ImageFolderDataModule
from defend.io import CheckpointError, load_artifact
from defend.models import build_classifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
CLASSES = ("disc", "square", "stripes")
QUIET = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_global_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; restored afterwards


def make_tree(root: Path, per_class: int = 40, size: int = 32, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: a disc, a square or stripes in a random colour on a contrasting noisy background."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = rng.integers(0, 256, 3)
            fg = (255 - bg + rng.integers(-40, 40, 3)).clip(0, 255)
            img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
            draw = ImageDraw.Draw(img)
            r = int(rng.integers(6, 11))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            colour = tuple(int(v) for v in fg)
            if c == "disc":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif c == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                for y in range(int(rng.integers(0, 4)), size, 6):
                    draw.rectangle([0, y, size - 1, y + 2], fill=colour)
            noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def held_out_accuracy(model: torch.nn.Module, dm: ImageFolderDataModule) -> float:
    """Accuracy on the folder's test split (never seen in training)."""
    ds = dm.test_dataset
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        return float((model(x).argmax(1) == ds.labels).float().mean())


def fit(config: str, *args: str) -> None:
    assert defend_main(["fit", "-c", str(CONFIGS / config), *QUIET, *args]) == 0


def test_finetune_pipeline_on_an_image_folder(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "my_images")
    monkeypatch.chdir(tmp_path)  # the configs write under checkpoints/ and runs/
    data = [f"--data.init_args.root={root}", "--data.init_args.batch_size=32"]
    dm = ImageFolderDataModule(str(root), image_size=32, resize=32, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert dm.num_classes == 3 and len(dm.test_dataset) == 18

    # 1. a classifier for the folder
    fit("folder_classifier.yaml", *data, "--model.init_args.num_classes=3", "--model.init_args.model_options={width: 16}",
        "--model.init_args.optimiser.lr=0.005", "--trainer.max_epochs=20")
    clf_path = Path("checkpoints/folder_classifier/last.ckpt")
    clf = load_classifier(clf_path, num_classes=3, input_size=32)
    acc = held_out_accuracy(clf, dm)
    # measured 0.83 (15 of 18), OMP 1 and 2, 2026-12-06
    assert acc > 0.6, f"held-out accuracy {acc:.2f} does not beat chance (1/3) clearly"

    # 2. a plain RTS interpreter for it
    fit("folder_rts.yaml", *data, "--model.init_args.width=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1")
    rts = load_rts("checkpoints/folder_rts/last.ckpt")
    rts.check_model(clf)
    x = torch.stack([dm.test_dataset[i]["image"] for i in range(4)])
    with torch.no_grad():
        m = rts(clf, x, clf(x).argmax(1))[0]
    assert m.shape == (4, 1, 32, 32) and float(m.min()) >= 0 and float(m.max()) <= 1

    # 3. AID fine-tuning of that RTS (init_from)
    fit("folder_aid.yaml", *data, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
        "--model.init_args.aid.every=2", "--model.init_args.aid.batch_size=8", "--model.init_args.attack.warm_steps=1",
        "--model.init_args.attack.steps=2")
    aid_path = Path("checkpoints/folder_aid/last.ckpt")
    meta = load_artifact(aid_path, "rts")["meta"]
    assert meta["aid_weight"] == 1.0 and meta["init_from"] == "checkpoints/folder_rts/last.ckpt"
    assert meta["classifier"] == str(clf_path)
    aid = load_rts(aid_path)
    aid.check_model(clf)
    assert aid.config() == rts.config()
    changed = max(float((a - b).abs().max()) for a, b in zip(aid.state_dict().values(), rts.state_dict().values())
                  if a.is_floating_point())
    assert changed > 0, "AID did not change the RTS it started from"

    # 4. interpretation-robust fine-tuning of the classifier (init_from)
    fit("folder_robust.yaml", *data, "--model.init_args.num_classes=3", "--model.init_args.model_options={width: 16}",
        "--model.init_args.inner.steps=1", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1")
    robust_path = Path("checkpoints/folder_robust/last.ckpt")
    assert load_artifact(robust_path, "classifier")["meta"]["robust_training"]["mode"] == "int_adv"
    robust = load_classifier(robust_path, num_classes=3, input_size=32)
    # measured 0.78 (14 of 18), OMP 1 and 2, 2026-12-06
    assert held_out_accuracy(robust, dm) > 0.5, "fine-tuning from the trained classifier lost its accuracy"


def test_init_from_checks_architecture_and_class_count(tmp_path):
    torch.manual_seed(0)
    src = build_classifier("small_cnn", 10, width=8)
    save_classifier(src, tmp_path / "digits.pt", {"width": 8})
    # another class count: only with a new head; every other weight is copied
    module = ClassifierModule(num_classes=3, model_options={"width": 8}, init_from=str(tmp_path / "digits.pt"),
                              new_head=True)
    own, theirs = module.model.state_dict(), src.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("head."))
    assert own["head.weight"].shape == (3, 32)
    with pytest.raises(CheckpointError, match="class count mismatch: .*10 classes, the model has 3 .*new_head"):
        ClassifierModule(num_classes=3, model_options={"width": 8}, init_from=str(tmp_path / "digits.pt"))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        ClassifierModule(num_classes=10, model_options={"width": 4}, init_from=str(tmp_path / "digits.pt"))
    with pytest.raises(CheckpointError, match="holds a 'small_cnn' classifier, the model is 'resnet18_cifar'"):
        ClassifierModule(arch="resnet18_cifar", num_classes=10, model_options={"width": 8},
                         init_from=str(tmp_path / "digits.pt"))
