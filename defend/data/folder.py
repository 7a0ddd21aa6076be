"""Image-folder data (``root/<class_name>/<image>``, e.g. ISIC-style medical images).

An existing ``root/train`` (plus optional ``root/val``, ``root/test``) split layout is used as is;
missing val/test splits, or all splits for a flat layout, are carved out with a stratified,
seeded split. Files with identical bytes are carved together (never on two sides), and a test file whose bytes also
lie in the train or development (``val``) split is refused before anything runs: the test split stays unseen.  Images are loaded lazily with PIL and turned into RGB in [0, 1] (:func:`load_image`):

* 8-bit grey, palette, RGB, CMYK, YCbCr and bilevel images: PIL's conversion to RGB (grey -> 3 equal channels);
* 16-bit grey (``I;16`` and the like, ``I`` with values in 0..65535): ``v / 65535`` (not clipped to 8 bits, which
  would turn almost every pixel white), resized in floating point, then quantised onto the uint8 grid like every
  image (the batch contract);
* alpha (``RGBA``, ``LA``, ``PA``, and palette / grey / RGB images with a ``transparency`` entry): composited
  on black, ``rgb * alpha / 255``, so fully transparent pixels are black whatever colour the file stores under
  them (dropping alpha would show that hidden colour);
* any other mode (32-bit float ``F``, ``LAB``, ``HSV``, ...) is refused, naming the file and the mode, when the
  folder is scanned (``check_files``) or, at the latest, when the image is read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from .base import BaseDataModule, split_name
from .batch import IMAGE, INDEX, LABEL, quantize

__all__ = ["ImageFolderDataModule", "FolderDataset", "IMAGE_EXTENSIONS", "scan_image_folder", "find_unreadable",
           "load_image", "IMAGE_MODES", "file_digest"]

_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
IMAGE_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "I"} | _SIXTEEN_BIT | _ALPHA)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_SPLIT_DIRS = ("train", "val", "test")


def _class_dirs(root: Path) -> list[Path]:
    try:
        entries = list(root.iterdir())
    except OSError as exc:
        raise ValueError(f"cannot read dataset folder '{root}': {exc.strerror or exc}") from None
    dirs = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    for d in dirs:
        _check_utf8_name(d)
    return dirs


def _check_utf8_name(folder: Path) -> None:
    """A class folder's name is valid UTF-8 (it becomes a class name in checkpoints, cards and figures)."""
    try:
        folder.name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"class folder {os.fsencode(folder)!r}: its name is not valid UTF-8 (it becomes a class "
                         "name in checkpoints, cards and figures); rename the folder to a UTF-8 name") from None


def _mode_problem(mode: str) -> str | None:
    if mode in IMAGE_MODES:
        return None
    return (f"image mode '{mode}' is not supported (its value range is unknown); save it as 8- or 16-bit grey, RGB "
            "or RGBA")


def load_image(img: Image.Image, path: Path | str = "") -> Image.Image:
    """An opened PIL image as an 8-bit ``RGB`` image, or a 1-channel ``F`` image with values in [0, 1] for 16-bit
    grey (see the module docstring: alpha is composited on black); raise ``ValueError`` naming ``path`` and the
    mode for a mode that cannot be read faithfully."""
    mode = img.mode
    problem = _mode_problem(mode)
    if problem:
        raise ValueError(f"cannot read image file '{path}': {problem}")
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"cannot read image file '{path}': mode '{mode}' with values in [{arr.min():g}, "
                             f"{arr.max():g}], expected 16-bit values 0..65535; save it as 8- or 16-bit")
        return Image.fromarray((arr / 65535.0).astype(np.float32))
    if mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def find_unreadable(files: Sequence[Path]) -> list[tuple[Path, str]]:
    """``(file, reason)`` for every file whose image header PIL cannot read or whose mode :func:`load_image` does
    not handle (fast: no pixel data is decoded)."""
    bad = []
    for path in files:
        try:
            with Image.open(path) as img:
                problem = _mode_problem(img.mode)  # parsing the header is the check
            if problem:
                bad.append((Path(path), problem))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            bad.append((Path(path), str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    return bad


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def scan_image_folder(root: Path, class_names: Sequence[str] | None = None) -> tuple[list[str], list[Path], list[int]]:
    """List ``(class_names, files, labels)`` under ``root/<class>/``; raise ``ValueError`` if empty."""
    dirs = _class_dirs(root)
    names = [d.name for d in dirs] if class_names is None else list(class_names)
    if class_names is not None:
        unknown = sorted({d.name for d in dirs} - set(names))
        if unknown:
            raise ValueError(f"class folders {unknown} under {root} are not among the training classes {names}")
    files: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        found = _image_files(d)
        files.extend(found)
        labels.extend([names.index(d.name)] * len(found))
    if not files:
        raise ValueError(
            f"no images found under {root}: expected class folders {root}/<class_name>/ "
            f"containing files with one of the extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    if class_names is None:  # drop empty class folders
        present = sorted(set(labels))
        names = [names[i] for i in present]
        remap = {old: new for new, old in enumerate(present)}
        labels = [remap[y] for y in labels]
    return names, files, labels


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (identical copies of an image have the same digest)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ValueError(f"cannot read image file '{path}': {exc.strerror or exc}") from None


def _grouped_split(files: Sequence[Path], labels: np.ndarray, fractions: Sequence[float],
                   rng: np.random.Generator) -> list[np.ndarray]:
    """:func:`_stratified_split` over groups of byte-identical files (each group on one side, stratified by the
    label of its first file)."""
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(files):
        groups.setdefault(file_digest(path), []).append(i)
    members = list(groups.values())
    parts = _stratified_split(np.asarray([labels[g[0]] for g in members]), fractions, rng)
    return [np.sort(np.asarray([i for k in part for i in members[k]], dtype=np.int64)) for part in parts]


def _stratified_split(labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, give ``fractions[k]`` of the items to part ``k + 1``; the rest form part 0 (train)."""
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, frac in enumerate(fractions):
            take = int(round(frac * len(idx)))
            if frac > 0 and take == 0 and len(idx) >= len(fractions) + 1:
                take = 1  # keep every class represented in small splits
            parts[k + 1].extend(idx[start : start + take].tolist())
            start += take
        parts[0].extend(idx[start:].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _refuse_leaks(splits: dict[str, tuple[list[Path], list[int]]]) -> None:
    """A test image whose bytes are also in the train or development split would not be unseen: one line, before
    anything runs."""
    test = {file_digest(p): p for p in splits["test"][0]}
    for side in ("val", "train"):
        for path in splits[side][0]:
            twin = test.get(file_digest(path))
            if twin is not None:
                raise ValueError(f"'{twin}' (test split) has the same bytes as '{path}' ({side} split): the test split "
                                 "must hold unseen images; remove one of the copies")


class FolderDataset(Dataset):
    """Lazily loads image files; a file PIL cannot read raises ``ValueError`` naming the file."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.files = list(files)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        path = self.files[idx]
        try:
            with Image.open(path) as img:
                img = load_image(img, path)
        except ValueError as exc:
            if str(exc).startswith("cannot read image file"):
                raise
            raise ValueError(f"cannot read image file '{path}': {exc}") from exc
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"cannot read image file '{path}': {exc}") from exc
        image = self.transform(img)
        if image.shape[0] == 1:  # 16-bit grey: one channel, repeated like PIL's grey -> RGB
            image = image.expand(3, -1, -1)
        image = quantize(image)
        return {IMAGE: image, LABEL: self.labels[idx].clone(), INDEX: torch.tensor(idx, dtype=torch.int64)}


class ImageFolderDataModule(BaseDataModule):
    """Image classification from a ``root/<class_name>/<image files>`` tree.

    Args:
        root: the folder (``root/<class>/...`` or ``root/train|val|test/<class>/...``).
        image_size: side of the (centre or random) square crop fed to the model.
        resize: shorter side after resizing, before the crop (default ``image_size * 256 / 224``).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of each class held out for validation (when there is no ``root/val``).
        test_fraction: share of each class held out for testing (when there is no ``root/test``).
        seed: seeds the stratified split and the per-epoch shuffle.
        augment: random crop + horizontal flip on the training split.
        check_files: open the header of every image once at start-up, so an unreadable file fails before
            training instead of mid-epoch.
    """

    name = "folder"
    has_mask = False

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        resize: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = False,
        check_files: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1, got {val_fraction}, {test_fraction}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root '{self.root}' does not exist or is not a directory")
        self.image_size = int(image_size)
        self.resize = int(resize) if resize is not None else int(round(image_size * 256 / 224))
        if self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({self.image_size})")
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.augment = bool(augment)
        self.image_shape = (3, self.image_size, self.image_size)
        self.class_names, self._splits = self._scan()
        self.num_classes = len(self.class_names)
        if check_files:
            bad = find_unreadable([f for files, _ in self._splits.values() for f in files])
            if bad:
                path, why = bad[0]
                raise ValueError(f"{len(bad)} unreadable image file(s) under {self.root}, e.g. '{path}': {why}")

    def _scan(self) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]]]:
        """Find classes and per-split (files, labels)."""
        rng = np.random.default_rng(self.seed)
        split_root = self.root / "train"
        if split_root.is_dir():
            names, files, labels = scan_image_folder(split_root)
            given = {s: scan_image_folder(self.root / s, names)[1:] for s in ("val", "test") if (self.root / s).is_dir()}
            fractions = [self.val_fraction if "val" not in given else 0.0, self.test_fraction if "test" not in given else 0.0]
        else:
            names, files, labels = scan_image_folder(self.root)
            given, fractions = {}, [self.val_fraction, self.test_fraction]
        tr, va, te = _grouped_split(files, np.asarray(labels), fractions, rng)
        pick = lambda idx: ([files[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        splits = {"train": pick(tr), "val": given.get("val", pick(va)), "test": given.get("test", pick(te))}
        if not splits["train"][0]:
            raise ValueError(f"no training images left under {self.root} after the val/test split")
        _refuse_leaks(splits)
        return names, splits

    def _transform(self, train: bool) -> transforms.Compose:
        if train and self.augment:
            crop = [transforms.RandomCrop(self.image_size), transforms.RandomHorizontalFlip()]
        else:
            crop = [transforms.CenterCrop(self.image_size)]
        return transforms.Compose([transforms.Resize(self.resize), *crop, transforms.ToTensor()])

    def split_keys(self, split: str) -> list[str]:
        """The sha256 of every file of ``split`` (byte-identical copies share it)."""

        return [file_digest(p) for p in self._splits[split_name(split)][0]]

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        return tuple(
            FolderDataset(*self._splits[s], transform=self._transform(train=s == "train")) for s in _SPLIT_DIRS
        )
