"""The sealed test split: every data module's development split is disjoint from its test split (no image and no
source digit on both sides), the digits' test split is a fresh draw, and everything that selects refuses the test
split (the selection routine, KeepBest, the sweep, the trajectory benchmark's split check)."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_data import _write_fake_cifar, _write_tree

from defend.callbacks import KeepBest
from defend.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from defend.data.base import DEV, SealedSplitError, image_digests, require_development, split_name
from defend.selection import select_best


def _shared(dm, a: str = "dev", b: str = "test") -> set[str]:
    return set(dm.split_keys(a)) & set(dm.split_keys(b))


def test_digits_development_and_test_splits_share_no_source_and_no_image():
    dm = DigitsDataModule(seed=0, renders_per_digit=(1, 1, 1))
    for a, b in (("dev", "test"), ("train", "test"), ("train", "dev")):
        assert not _shared(dm, a, b), (a, b)
        dm.check_disjoint(a, b)
    assert len(dm.split_dataset("dev")) == len(dm.val_dataset) and dm.dev_dataset is dm.val_dataset
    sources = {s: set(dm.split_dataset(s).sources.tolist()) for s in ("train", "dev", "test")}
    assert not sources["dev"] & sources["test"] and not sources["train"] & sources["test"]


def test_the_sealed_test_draw_is_new_images_of_the_same_test_digits():
    old, new = DigitsDataModule(seed=0, test_draw=0), DigitsDataModule(seed=0)
    assert new.test_draw == 1
    assert torch.equal(old.val_dataset.images, new.val_dataset.images)
    assert torch.equal(old.train_dataset.images, new.train_dataset.images)
    assert sorted(old.test_dataset.sources.tolist()) == sorted(new.test_dataset.sources.tolist())
    assert not set(image_digests(old.test_dataset.images)) & set(image_digests(new.test_dataset.images))
    with pytest.raises(ValueError, match="test_draw"):
        DigitsDataModule(test_draw=-1)


def test_folder_carves_byte_identical_files_onto_one_side(tmp_path: Path):
    _write_tree(tmp_path, per_class=10)
    for c in ("benign", "malignant", "nevus"):  # every image has a twin under another name
        for i in range(10):
            shutil.copy(tmp_path / c / f"img_{i}.png", tmp_path / c / f"twin_{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert not _shared(dm, "dev", "test") and not _shared(dm, "train", "test") and not _shared(dm, "train", "dev")
    dm.check_disjoint()
    assert len(dm.test_dataset) > 0 and len(dm.dev_dataset) > 0


def test_folder_refuses_a_test_image_that_is_also_in_the_development_split(tmp_path: Path):
    _write_tree(tmp_path / "train", per_class=4)
    _write_tree(tmp_path / "val", per_class=2)
    _write_tree(tmp_path / "test", per_class=2)  # the same generator: test/ repeats val/ file for file
    with pytest.raises(ValueError, match=r"test split\) has the same bytes as .*val.*\(val split\).*remove one"):
        ImageFolderDataModule(str(tmp_path), image_size=8)


def test_cifar_drops_development_images_equal_to_test_images(tmp_path: Path):
    _write_fake_cifar(tmp_path, per_batch=6)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="bytes")
    batches = []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as f:
            batches.append(pickle.load(f, encoding="bytes"))
    for entry in batches:  # every training batch carries a copy of the first test image
        entry[b"data"][0] = test[b"data"][0]
    for i, entry in enumerate(batches, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(entry, f)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=30 - 1, augment=False)
    assert not _shared(dm, "dev", "test")
    dm.check_disjoint()
    assert len(dm.dev_dataset) < 29  # the copies drawn into the development split are gone
    assert len(dm.train_dataset) == 1  # the training split stays CIFAR-10's own


def test_check_disjoint_names_the_overlap():
    dm = DigitsDataModule(seed=0, renders_per_digit=(1, 1, 1))
    dm.setup()
    dm.test_dataset.images[0] = dm.val_dataset.images[0]
    dm.test_dataset.sources[0] = dm.val_dataset.sources[0]
    with pytest.raises(ValueError, match="of the val split are also in the test split"):
        dm.check_disjoint()


def test_selection_refuses_the_test_split():
    assert split_name("dev") == DEV == require_development("development", "x") == "val"
    with pytest.raises(SealedSplitError, match="the test split is sealed for final figures; pass split: dev"):
        require_development("test", "the sweep")
    with pytest.raises(SealedSplitError, match="training split"):
        require_development("train", "the sweep")
    with pytest.raises(ValueError, match="unknown data split"):
        split_name("holdout")
    candidates = [{"name": "a", "acc": 0.8}, {"name": "b", "acc": 0.9}, {"name": "c", "acc": 0.9}]
    assert select_best(candidates, lambda c: c["acc"], "dev", "the choice")["name"] == "b"
    assert select_best(candidates, lambda c: c["acc"], "val", "the choice", higher_is_better=False)["name"] == "a"
    with pytest.raises(SealedSplitError, match="the choice tunes or selects"):
        select_best(candidates, lambda c: c["acc"], "test", "the choice")
    with pytest.raises(ValueError, match="no score"):
        select_best([{"acc": float("nan")}], lambda c: c["acc"], "dev", "the choice")
    with pytest.raises(SealedSplitError, match="KeepBest"):
        KeepBest("test/acc")
    KeepBest("val/acc")


def test_the_sweep_scores_one_split_and_refuses_test_rows():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sweep import score

    rows = [{"measure": "accuracy", "eps_255": 8, "accuracy": 0.5, "split": "test"},
            {"measure": "tau", "eps_255": 8, "kendall_tau": 0.25, "split": "test"}]
    value, split = score(rows, ["accuracy@measure=accuracy,eps_255=8", "kendall_tau@measure=tau"])
    assert value == 0.75 and split == "test"
    with pytest.raises(SealedSplitError):
        select_best([{"score": value}], lambda t: t["score"], split, "the sweep")


def test_provenance_names_the_splits_a_run_read():
    from defend.inputs import select_correct, take_split
    from defend.provenance import noted_data, noted_splits

    noted_data(reset=True)
    dm = DigitsDataModule(seed=0, renders_per_digit=(1, 1, 1))
    take_split(dm, "dev", 5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    select_correct(model, dm, 3, split="test")
    splits = {s["split"] for s in noted_splits()}
    assert splits == {"val", "test"}
    noted_data(reset=True)
    assert noted_splits() == []
