"""The system ``defend evaluate`` measures: a classifier, optionally an RTS interpreter and a saved detector, and the
data it is measured on. Everything is loaded and checked here, before any work (and before ``--out`` is created):
missing or foreign files, a classifier that does not fit the data (class count, input size), an RTS built for
another classifier, a detector whose channel count does not match the maps it is said to read."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from torch import nn

from ..aid import load_rts
from ..class_paths import check_class_paths, enforce_in_jsonargparse
from ..classifier import check_class_names, check_hparams, load_classifier, state_differences
from ..data import BaseDataModule, CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from ..detection_data import compute_maps, stack_maps
from ..detector import DETECTOR_INDEX, DetectorModule
from ..inputs import take_split
from ..interpreters import build_interpreter
from ..io import CheckpointError, file_sha256, load_artifact
from ..models import build_classifier
from ..models.imagenet import IMAGENET_MEAN, IMAGENET_STD, TORCHVISION, read_weights, torchvision_net
from ..safe_yaml import load_file
from ..typed_config import config_error
from .battery import Battery

__all__ = ["System", "ArchSpec", "interpreters_for", "load_system", "build_data", "data_spec", "DEFAULT_DETECTOR_INTERPRETERS"]

#: what a detector reads when neither its ``detector.json`` nor the battery says
DEFAULT_DETECTOR_INTERPRETERS = ["grad", "cam"]
#: the data options of ``configs/finetune/*.yaml`` (they define the split of an image folder)
FOLDER_DEFAULTS = {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}


@dataclass
class System:
    """What is evaluated, loaded and checked: the classifier (and its file's sha256 and metadata), the RTS network,
    the detector (and the interpreters it reads), the set-up data module and how it was specified."""

    classifier: nn.Module
    classifier_path: str
    classifier_sha256: str
    classifier_meta: dict[str, Any]
    data: BaseDataModule
    data_spec: dict[str, Any]
    rts: Any = None
    rts_path: str | None = None
    rts_sha256: str | None = None
    detector: Any = None
    detector_path: str | None = None
    detector_interpreters: list[str] = field(default_factory=list)
    detector_product: bool = False
    interpreter_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # one-line warnings, printed once every check has passed

    def say_notices(self) -> None:
        """Print the notices found while loading (stderr, once), so a refusal stays a single line."""
        for line in self.notices:
            print(line, file=sys.stderr, flush=True)
        self.notices = []

    def describe(self) -> dict[str, Any]:
        """The card's ``system`` section."""
        det = None
        if self.detector is not None:
            info = json.loads((Path(self.detector_path) / DETECTOR_INDEX).read_text())
            det = {"path": self.detector_path, "sha256": file_sha256(Path(self.detector_path) / DETECTOR_INDEX),
                   "interpreters": list(self.detector_interpreters), "product": bool(self.detector_product),
                   "hparams": info.get("hparams", {}),
                   "surrogate": dict(self.detector.surrogate_fit) if self.detector.surrogate is not None else None}
        rts = None if self.rts is None else {"path": self.rts_path, "sha256": self.rts_sha256,
                                             "network": _plain(self.rts.config())}
        return {"classifier": {"path": self.classifier_path, "sha256": self.classifier_sha256,
                               "meta": _plain(self.classifier_meta)}, "rts": rts, "detector": det}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: no such file '{p}'")
    if not p.is_file():
        raise FileNotFoundError(f"{what}: '{p}' is not a file")
    return p


def interpreters_for(system: System, names: list[str]) -> dict[str, Any]:
    """Interpreters by name, built with the battery's ``interpreter_options.<name>``; ``rts`` is the system's RTS
    network."""
    opts = system.interpreter_options
    return {n: build_interpreter(n, **{**opts.get(n, {}), "network": system.rts}) if n == "rts"
            else build_interpreter(n, **opts.get(n, {})) for n in names}


def data_spec(data: str | None, input_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """``--data`` as ``{"class_path", "init_args"}``: ``digits`` (default), ``folder:PATH`` or a bare directory (an
    image folder at the classifier's input size, with the split options of ``configs/finetune``), ``cifar10:PATH``,
    or a YAML file holding ``data: {class_path, init_args}`` (or that mapping itself); ``overrides``
    (``--data.KEY=VALUE``) are added to ``init_args``."""
    if data is None or data == "digits":
        spec = {"class_path": "DigitsDataModule", "init_args": {"seed": 0}}
    elif data.startswith("folder:") or (Path(data).is_dir() and not data.startswith("cifar10:")):
        root = data.split(":", 1)[1] if data.startswith("folder:") else data
        if not Path(root).is_dir():
            raise FileNotFoundError(f"--data: image folder '{root}' does not exist or is not a directory")
        size = int(input_size)
        spec = {"class_path": "ImageFolderDataModule",
                "init_args": {"root": root, "image_size": size, "resize": size if size < 224 else None,
                              **FOLDER_DEFAULTS}}
    elif data.startswith("cifar10:"):
        spec = {"class_path": "CIFAR10DataModule", "init_args": {"root": data.split(":", 1)[1]}}
    else:
        spec = _yaml_spec(data)
    spec["init_args"] = {**dict(spec.get("init_args") or {}), **overrides}
    return spec


def _yaml_spec(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data: '{path}' is neither digits, folder:PATH, cifar10:PATH, a directory nor a "
                                "YAML file")
    raw = load_file(p, "--data") or {}
    raw = raw.get("data", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict) or "class_path" not in raw:
        raise ValueError(f"{p} must hold data: {{class_path: ..., init_args: {{...}}}} (as the experiment configs)")
    return {"class_path": raw["class_path"], "init_args": dict(raw.get("init_args") or {})}


def build_data(spec: dict[str, Any]) -> BaseDataModule:
    """The data module ``spec`` describes (jsonargparse, as the experiment configs), set up."""
    _ = (CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule)  # short class names resolve once imported
    check_class_paths(spec, "--data")  # before jsonargparse imports the module a class_path names
    enforce_in_jsonargparse()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=BaseDataModule)
    try:
        dm = parser.instantiate(parser.parse_object({"data": spec})).data
    except (FileNotFoundError, ValueError) as exc:
        text = " ".join(str(exc).split())
        raise type(exc)(f"--data: {text}") from None
    except Exception as exc:  # jsonargparse's report of a bad class path or option
        raise ValueError("--data: " + config_error(exc, type(None)).replace('config key "data', 'key "data')) from None
    dm.setup("fit")
    return dm


def _detector(path: str, battery: Battery, rts_given: bool) -> tuple[Any, list[str], bool]:
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"--detector: no such directory '{d}' (a directory written by DetectorModule.save)")
    det = DetectorModule.load(d)
    if det.booster is None:
        raise ValueError(f"--detector: {d} has no fitted booster (train it with train_detector before saving)")
    info = json.loads((d / DETECTOR_INDEX).read_text())
    names = list(battery.detector.interpreters or info.get("interpreters") or DEFAULT_DETECTOR_INTERPRETERS)
    product = battery.detector.product if battery.detector.product is not None else bool(info.get("product", False))
    if "interpreters" in info and (names != info["interpreters"] or product != bool(info.get("product"))):
        raise ValueError(f"--detector: {d} was trained on the maps of {info['interpreters']}"
                         f"{' + product' if info.get('product') else ''} (in that order), not {names}"
                         f"{' + product' if product else ''}: leave detector.interpreters / detector.product out of "
                         "the battery or set them to those")
    chans = len(names) + int(product)
    if int(det.hparams.in_channels) != chans:
        raise ValueError(f"--detector: {d} reads {det.hparams.in_channels} channels, but interpreters {names}"
                         f"{' + product' if product else ''} give {chans}; set detector.interpreters / "
                         "detector.product in the battery (--battery.detector.interpreters=[grad,cam,mask])")
    if "rts" in names and not rts_given:
        raise ValueError("--detector reads RTS maps: give the RTS network with --rts")
    return det, names, bool(product)


#: how many development inputs the detector's distilled surrogate is re-measured on (each explained for its
#: prediction and for another class: 2x as many maps)
SURROGATE_CHECK_N = 32


def _measure_surrogate(system: System, seed: int) -> None:
    """Re-measure the detector's distilled surrogate against its booster on maps computed here (the first
    :data:`SURROGATE_CHECK_N` development inputs, explained for the prediction and for a seeded other class), so the
    card shows the measured fit, not the one its files claim."""
    x = take_split(system.data, "dev", SURROGATE_CHECK_N)["image"]
    interps = interpreters_for(system, system.detector_interpreters)
    maps, pred = compute_maps(system.classifier, x, interps)
    k = int(system.data.num_classes)
    other = (pred + torch.randint(1, k, pred.shape, generator=torch.Generator().manual_seed(seed))) % k
    off, _ = compute_maps(system.classifier, x, interps, cls=other)
    names, product = system.detector_interpreters, system.detector_product
    system.detector.measure_surrogate(torch.cat([stack_maps(maps, names, product), stack_maps(off, names, product)]))


def _choose_surrogate(system: System, kind: str, seed: int) -> None:
    """Re-measure the distilled surrogate (when the detector has one) and refuse it for ``kind`` ``distilled`` when it
    does not reproduce the booster (one line, before any work); ``auto`` then falls back to the head, with a notice."""
    det = system.detector
    if det.surrogate is not None:
        _measure_surrogate(system, seed)
    try:
        det.attack_surrogate(kind)  # 'distilled' without a usable surrogate: refused before any work
    except ValueError as exc:
        raise ValueError(f"--detector {system.detector_path}: {exc}") from None
    if kind == "auto" and det.surrogate is not None and det.surrogate_problem is not None:
        system.notices.append(f"[evaluate] notice: --detector {system.detector_path}: {det.surrogate_problem}; the "
                              "trunk's head stands in for the booster in the adaptive attack")


@dataclass
class ArchSpec:
    """``--arch NAME --weights PATH``: a registered torchvision architecture and a local state dict (plain
    torchvision or RobustBench-format), with the class count, input size and normalisation it was trained with."""

    arch: str
    weights: str
    num_classes: int | None = None
    input_size: int = 224
    mean: list[float] | None = None
    std: list[float] | None = None


def _arch_weights(spec: ArchSpec) -> tuple[Any, list[float], list[float], list[str]]:
    """Check ``--arch`` and read ``--weights`` (nothing built yet): the weights, the normalisation and notices."""
    if spec.arch not in TORCHVISION:
        raise ValueError(f"--arch {spec.arch!r} is not a torchvision architecture of the zoo; choose one of: "
                         f"{', '.join(TORCHVISION)} (an artifact of defend fit goes to --classifier)")
    if not TORCHVISION[spec.arch]:
        raise ValueError(f"--arch {spec.arch}: the zoo's {spec.arch} is VGG-GAP (CAM needs GAP -> linear), so "
                         "torchvision's fully connected classifier cannot be evaluated as it is; wrap it in Python "
                         "with wrap_classifier(net, 'features', head=...) or fine-tune it with defend fit")
    if not 8 <= spec.input_size <= 4096:
        raise ValueError(f"--input-size {spec.input_size} is outside [8, 4096]")
    if (spec.mean is None) != (spec.std is None):
        raise ValueError("--mean and --std go together: give both (3 values each) or neither")
    weights = read_weights(_file(spec.weights, "--weights"))
    given = spec.mean is not None
    if given and weights.mean is not None and not (torch.allclose(torch.tensor(spec.mean), torch.tensor(weights.mean))
                                                 and torch.allclose(torch.tensor(spec.std), torch.tensor(weights.std))):
        raise ValueError(f"--mean/--std {spec.mean}/{spec.std} disagree with the normalisation inside {spec.weights} "
                         f"({weights.mean}/{weights.std}): leave them out")
    mean, std = (spec.mean, spec.std) if given else (weights.mean, weights.std)
    notices = []
    if mean is None:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        notices.append(f"[evaluate] notice: {spec.weights} carries no normalisation and --mean/--std were not given: "
                       "ImageNet's statistics are used")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"--mean/--std need 3 values each, std positive (got {mean} / {std})")
    return weights, mean, std, notices


def _arch_classifier(spec: ArchSpec, weights: Any, mean: list[float], std: list[float],
                     dm: BaseDataModule) -> tuple[nn.Module, dict[str, Any]]:
    """The torchvision classifier ``spec`` names with ``weights``, checked against the data and, on the ``meta``
    device, against the weights' names and shapes before it is built at full size."""
    k, stored = spec.num_classes or int(dm.num_classes), weights.num_classes
    if spec.num_classes is None and stored != k:
        raise ValueError(f"--weights {spec.weights}: its head has {stored} classes, the data {dm.num_classes} "
                         "(--num-classes defaults to the data's): give --num-classes to match the weights")
    if k != int(dm.num_classes):
        raise ValueError(f"class count mismatch: --num-classes {k}, the data has {dm.num_classes} classes")
    if int(dm.image_shape[-1]) != spec.input_size:
        raise ValueError(f"input size mismatch: --input-size {spec.input_size}, the data is {dm.image_shape[-1]} px")
    with torch.device("meta"):
        skeleton = torchvision_net(spec.arch, k).state_dict()
    detail = state_differences(skeleton, weights.state)
    if detail:
        raise CheckpointError(f"--weights {spec.weights} does not fit torchvision {spec.arch} with {k} classes: "
                              f"{detail}; check --arch and --num-classes")
    model = build_classifier(spec.arch, k, pretrained=spec.weights, input_size=spec.input_size, mean=mean, std=std)
    return model.eval(), {**model.describe(), "weights_layout": weights.layout, "source": "--arch/--weights"}


def load_system(classifier: str | ArchSpec, data: str | None, battery: Battery, rts: str | None = None,
                detector: str | None = None, data_overrides: dict[str, Any] | None = None) -> System:
    """Load and check every part of the system (module docstring); nothing is written. ``classifier``: an artifact's
    path, or an :class:`ArchSpec` (``--arch`` / ``--weights``)."""
    if isinstance(classifier, ArchSpec):
        weights, mean, std, notes = _arch_weights(classifier)  # before the data is read
        spec = data_spec(data, classifier.input_size, dict(data_overrides or {}))
        dm = build_data(spec)
        model, meta = _arch_classifier(classifier, weights, mean, std, dm)
        path, warning = Path(classifier.weights), None
    else:
        path = _file(classifier, "--classifier")
        meta = load_artifact(path, "classifier")["meta"]
        check_hparams({"input_size": meta.get("input_size", 32)}, path)  # it sizes the data's images
        spec = data_spec(data, int(meta.get("input_size", 32)), dict(data_overrides or {}))
        dm = build_data(spec)
        model = load_classifier(path, num_classes=dm.num_classes, input_size=dm.image_shape[-1])
        warning, notes = check_class_names(meta, dm.class_names, path), []
    system = System(model, str(path), file_sha256(path), dict(meta), dm, spec,
                    interpreter_options={k: dict(v) for k, v in battery.interpreter_options.items()},
                    notices=[warning, *notes] if warning else notes)
    if rts is not None:
        net = load_rts(_file(rts, "--rts"))
        try:
            net.check_model(model)
        except ValueError as exc:
            raise ValueError(f"--rts {rts}: {exc}") from None
        system.rts, system.rts_path, system.rts_sha256 = net, str(rts), file_sha256(rts)
    if detector is not None:
        system.detector, system.detector_interpreters, system.detector_product = _detector(detector, battery,
                                                                                           rts is not None)
        system.detector_path = str(detector)
        if int(system.detector.hparams.input_size) != int(dm.image_shape[-1]):
            raise ValueError(f"--detector: {detector} reads {system.detector.hparams.input_size} px maps, the data "
                             f"is {dm.image_shape[-1]} px")
        _choose_surrogate(system, battery.adaptive.detector_surrogate, int(battery.seed))
    return system
