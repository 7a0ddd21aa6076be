"""Standard classifier training as a LightningModule (:class:`ClassifierModule`, a
:class:`~defend.module_base.DefenceModule`), and safe loading of classifier checkpoints."""
from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from attacks.checks import check_images, check_labels

from .io import CheckpointError, load_artifact, load_state_checked, save_artifact, strip_prefix
from .models import ARCHITECTURES, GapClassifier, build_classifier
from .module_base import MIN_ONE_CYCLE_STEPS, DefenceModule, Optimiser, as_options, plain

__all__ = ["ClassifierModule", "classification_step", "load_classifier", "save_classifier", "init_from_checkpoint",
           "effective_options", "same_value", "value_differences", "state_differences",
           "load_reused_classifier", "MIN_ONE_CYCLE_STEPS", "CLASSIFIER_OPTIMISER"]


# --------------------------------------------------------------------------------------------- comparing models
def same_value(a: Any, b: Any) -> bool:
    """Equality of plain values, floats to 1e-6 relative (``1`` and ``1.0`` are the same)."""
    a, b = plain(a), plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def effective_options(arch: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model_options`` of ``arch`` with the architecture's defaults filled in, as plain values; ``pretrained`` is
    dropped (it picks the initial weights, not the model)."""
    opts = {k: v for k, v in dict(options or {}).items() if k != "pretrained"}
    builder = ARCHITECTURES.get(str(arch)) if str(arch) in ARCHITECTURES else None
    if builder is not None:
        for name, param in inspect.signature(builder).parameters.items():
            if name in ("num_classes", "pretrained") or param.default is inspect.Parameter.empty:
                continue
            opts.setdefault(name, param.default)
    return {k: plain(opts[k]) for k in sorted(opts)}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def value_differences(stored: Mapping[str, Any], configured: Mapping[str, Any], stored_name: str = "checkpoint",
                      configured_name: str = "config") -> list[str]:
    """``"key: checkpoint X, config Y"`` for every key whose values differ (a key missing on one side differs);
    for a ``model_options`` key next to an ``arch`` the architecture's defaults are filled in on both sides and only
    the options that differ are shown (none when the architectures differ)."""
    out = []
    for key in list(stored) + [k for k in configured if k not in stored]:
        a, b = stored.get(key, "<absent>"), configured.get(key, "<absent>")
        if key == "model_options" and "arch" in stored and "arch" in configured:
            if not same_value(stored["arch"], configured["arch"]):
                continue  # options of two architectures do not compare: the arch is reported
            a, b = effective_options(stored["arch"], a or {}), effective_options(configured["arch"], b or {})
            a, b = ({k: v for k, v in a.items() if not same_value(v, b.get(k, "<absent>"))},
                    {k: v for k, v in b.items() if not same_value(v, a.get(k, "<absent>"))})
        if not same_value(a, b):
            out.append(f"{key}: {stored_name} {_short(a)}, {configured_name} {_short(b)}")
    return out


def state_differences(own: Mapping[str, Any], theirs: Mapping[str, Any]) -> str:
    """``"missing: a, b; unexpected: c; shape: d (checkpoint [4, 3], model [8, 3])"`` or ``""`` when the state
    ``theirs`` has exactly the keys and shapes of ``own``."""
    missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    shapes = [k for k in own if k in theirs and hasattr(theirs[k], "shape")
              and tuple(own[k].shape) != tuple(theirs[k].shape)]
    parts = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if shapes:
        k = shapes[0]
        more = f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""
        parts.append(f"shape: {k} (checkpoint {list(theirs[k].shape)}, model {list(own[k].shape)}){more}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- untrusted metadata
#: the largest integer an artifact's hyper-parameters may hold (widths, depths, sizes, channels), checked before
#: anything is built from them; class counts may go up to :data:`MAX_CLASSES`, lists hold at most :data:`MAX_ITEMS`
MAX_HPARAM = 4096
MAX_CLASSES = 100_000
MAX_ITEMS = 64
#: integer hyper-parameters that size nothing (not bounded)
UNSIZED = frozenset({"seed"})


def check_hparams(values: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` (one line) when a hyper-parameter of ``values`` (an artifact's metadata,
    nested mappings and lists included) is an integer above :data:`MAX_HPARAM` (:data:`MAX_CLASSES` for
    ``num_classes``) or below 0, or a list longer than :data:`MAX_ITEMS`: a few bytes of metadata must not make the
    tool allocate gigabytes."""
    def walk(key: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, item in v.items():
                walk(f"{key}.{k}" if key else str(k), item)
        elif isinstance(v, (list, tuple)):
            if len(v) > MAX_ITEMS:
                raise CheckpointError(f"{path}: its metadata's {key} has {len(v)} items (at most {MAX_ITEMS}); the "
                                      "file was not written by this tool: re-export it")
            for item in v:
                walk(key, item)
        elif isinstance(v, int) and not isinstance(v, bool) and key.split(".")[-1] not in UNSIZED:
            top = MAX_CLASSES if key.split(".")[-1] == "num_classes" else MAX_HPARAM
            if not 0 <= v <= top:
                raise CheckpointError(f"{path}: its metadata's {key} = {v} is outside [0, {top}]; the file was not "
                                      "written by this tool: re-export it")
    walk("", values)


def build_from_state(build: Callable[[], nn.Module], state: Mapping[str, Any], path: str | os.PathLike,
                     described: str) -> nn.Module:
    """The module ``build`` makes, after checking that the stored tensors ``state`` have exactly its weights' names
    and shapes: it is first built on the ``meta`` device (no memory), so metadata that disagrees with the stored
    tensors (e.g. a width the weights do not have) is a one-line :class:`CheckpointError` before any allocation.
    ``described``: what the metadata describes, for the message."""
    try:
        with torch.device("meta"):
            skeleton = build()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its metadata describes a model that cannot be built ({exc}); "
                              "re-export it") from None
    detail = state_differences(skeleton.state_dict(), state)
    if detail:
        raise CheckpointError(f"{path}: its weights do not fit {described} its metadata describes: {detail}; the file "
                              "was damaged or written by other code: re-export it")
    return build()


def _names_text(names: Sequence[str], limit: int = 12) -> str:
    shown = [str(n) for n in names[:limit]]
    return "[" + ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > limit else "") + "]"


def check_class_names(meta: Mapping[str, Any], names: Sequence[str], path: str | os.PathLike) -> str | None:
    """The classifier at ``path`` (artifact metadata ``meta``) was trained on classes ``names`` in this order: a
    one-line ``ValueError`` showing both lists when they differ (a renamed or re-ordered class folder would
    otherwise be scored with shuffled labels); for artifacts saved before class names were stored, returns the
    one-line warning that the order cannot be checked (for the caller to print once its checks have passed)."""
    stored = meta.get("class_names")
    names = [str(n) for n in names]
    if stored is None:
        return (f"[defend] warning: {path} does not record its class names (saved by an older version): the order "
                f"of the data's classes {_names_text(names)} cannot be checked against the classifier's")
    if not isinstance(stored, list) or not all(isinstance(n, str) for n in stored) or len(stored) > MAX_CLASSES:
        raise CheckpointError(f"{path}: its metadata's class_names is not a list of names; re-export it")
    if stored != names:
        first = next((i for i, (a, b) in enumerate(zip(stored, names)) if a != b), min(len(stored), len(names)))
        raise ValueError(f"{path} was trained on the classes {_names_text(stored)}, the data has "
                         f"{_names_text(names)} (first difference at position {first}): give the data it was trained "
                         "on, with the same class names in the same order")
    return None


def classification_step(module: pl.LightningModule, batch: dict[str, Tensor], metric: MulticlassAccuracy, stage: str,
                        label_smoothing: float = 0.0, check: bool = True) -> Tensor:
    """Cross-entropy of ``module.model`` on a batch, accuracy into ``metric``, both logged as ``{stage}/loss`` and
    ``{stage}/acc`` (the loss synced across ranks outside training). Shared by the classifier modules."""
    x, y = batch["image"], batch["label"]
    if check:
        check_images(x)
        check_labels(y, module.hparams.num_classes, x.shape[0])
    logits = module.model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    metric.update(logits, y)
    module.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train", batch_size=x.shape[0])
    module.log(f"{stage}/acc", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=x.shape[0])
    return loss


#: the default optimiser of :class:`ClassifierModule`: AdamW on a one-cycle schedule
CLASSIFIER_OPTIMISER = Optimiser(name="adamw", lr=2e-3, weight_decay=5e-4, schedule="onecycle")


class ClassifierModule(DefenceModule):
    """Cross-entropy training of a zoo classifier, accuracy per stage.

    Args:
        arch: zoo architecture name (``small_cnn``, ``resnet18_cifar``, ``wide_resnet``, ``resnet50``, ...).
        num_classes: number of classes; must match the data module.
        model_options: extra keyword arguments of the architecture (width, depth, input_size, pretrained=path, ...).
        optimiser: the optimiser and its learning-rate schedule (default: AdamW, lr 0.002, weight decay 5e-4,
            one-cycle schedule).
        label_smoothing: cross-entropy label smoothing of the training loss.
        init_from: classifier artifact or Lightning checkpoint to start from (fine-tuning; loaded with
            ``weights_only``, same architecture and options required).
        new_head: with ``init_from``, start a fresh linear head when the checkpoint has another class count
            (otherwise a class count mismatch is an error).
    """

    artifact_kind = "classifier"

    def __init__(self, arch: str = "small_cnn", num_classes: int = 10, model_options: dict[str, Any] | None = None,
                 optimiser: Optimiser = CLASSIFIER_OPTIMISER, label_smoothing: float = 0.0,
                 init_from: str | None = None, new_head: bool = False) -> None:
        super().__init__(as_options(optimiser, type(self).default_optimiser(), "optimiser"))
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.save_options(arch=arch, num_classes=num_classes, model_options=model_options, optimiser=self.optimiser,
                          label_smoothing=label_smoothing, init_from=init_from, new_head=new_head)
        self.model: GapClassifier = build_classifier(arch, num_classes, **(model_options or {}))
        if init_from:
            init_from_checkpoint(self.model, init_from, new_head=new_head, model_options=model_options or {})
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @classmethod
    def default_optimiser(cls) -> Optimiser:
        """The optimiser a mapping given as ``optimiser`` completes (the signature's default)."""
        return CLASSIFIER_OPTIMISER

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: dict[str, Tensor], metric: MulticlassAccuracy, stage: str) -> Tensor:
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        return classification_step(self, batch, metric, stage, label_smoothing=smoothing,
                                   check=stage != "train" or self.global_step == 0)

    def training_step(self, batch, batch_idx):
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, self.test_acc, "test")

    def predict_step(self, batch, batch_idx):
        return self.model(batch["image"]).softmax(1)

    def artifact_meta(self) -> dict[str, Any]:
        """The classifier's description (:meth:`GapClassifier.describe`) and its ``model_options``."""
        return {**self.model.describe(), "model_options": dict(self.hparams.model_options or {})}

    def export(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """The classifier artifact (:func:`save_classifier`; what ``classifier.checkpoint`` of the experiments reads),
        with what the checkpoint metadata records (e.g. the robust training recipe) and ``extra``."""
        meta = self.artifact_meta()
        options = {k: v for k, v in (meta.pop("model_options") or {}).items() if k != "pretrained"}
        described = self.model.describe()
        data = getattr(getattr(self, "_trainer", None), "datamodule", None)
        save_classifier(self.model, path, options,
                        extra={**{k: v for k, v in meta.items() if k not in described}, **(extra or {})},
                        class_names=getattr(data, "class_names", None))


def init_from_checkpoint(model: GapClassifier, path: str | os.PathLike, new_head: bool = False,
                         model_options: Mapping[str, Any] | None = None) -> None:
    """Copy the weights of a saved classifier into ``model`` (fine-tuning); ``new_head`` keeps ``model``'s own
    freshly initialised head when the class counts differ. Raises :class:`CheckpointError` when it does not fit,
    naming the weights that differ and why (architecture, ``model_options`` when given, input channels)."""
    source, meta = _load(path)
    if source.arch != model.arch:
        raise CheckpointError(f"{path} holds a '{source.arch}' classifier, the model is '{model.arch}'")
    state = source.state_dict()
    if source.num_classes != model.num_classes:
        if not new_head:
            raise CheckpointError(f"class count mismatch: {path} has {source.num_classes} classes, the model has "
                                  f"{model.num_classes} (set new_head: true to fine-tune with a new head)")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    detail = state_differences(model.state_dict(), state)
    if detail:
        theirs = {"in_channels": source.in_channels}
        ours = {"in_channels": model.in_channels}
        if model_options is not None:
            theirs.update(arch=source.arch, model_options=meta.get("model_options") or {})
            ours.update(arch=model.arch, model_options=dict(model_options))
        why = value_differences(theirs, ours, "init_from", "model")
        raise CheckpointError(f"init_from {path} does not fit the model: {'; '.join(why + [detail])}; set the model's "
                              "arch and model_options to those of the checkpoint, or drop init_from")
    load_state_checked(model, state, path)


def save_classifier(model: GapClassifier, path: str | os.PathLike, model_options: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, class_names: Sequence[str] | None = None) -> None:
    """Export a classifier as a safe, self-describing artifact (atomic write); ``class_names``: the classes of the
    data it was trained on, in label order (``defend evaluate`` refuses data whose classes differ)."""
    names = {} if not class_names else {"class_names": [str(n) for n in class_names]}
    if names and len(names["class_names"]) != model.num_classes:
        raise ValueError(f"{len(names['class_names'])} class names for a classifier of {model.num_classes} classes")
    meta = {**model.describe(), "model_options": dict(model_options or {}), **names, **(extra or {})}
    save_artifact(path, "classifier", model.state_dict(), meta)


def load_classifier(path: str | os.PathLike, num_classes: int | None = None, input_size: int | None = None,
                    arch: str | None = None, model_options: Mapping[str, Any] | None = None,
                    fix: str = "") -> GapClassifier:
    """Rebuild a classifier from an exported artifact or a Lightning checkpoint, checking that it fits: the data's
    class count and input size, and (when ``arch`` is given) the configured architecture and ``model_options``
    (architecture defaults filled in on both sides); ``fix`` is appended to the message of a configuration
    mismatch (e.g. what to change in an experiment config)."""
    return _load(path, num_classes, input_size, arch, model_options, fix)[0]


REUSE_FIX = "delete the checkpoint or set classifier.retrain: true"


def load_reused_classifier(path: str | os.PathLike, ccfg: Mapping[str, Any], num_classes: int | None = None,
                           input_size: int | None = None) -> GapClassifier:
    """The classifier an experiment reuses from ``classifier.checkpoint``: it must be the one the config's
    ``classifier:`` section (``ccfg``) describes (``arch``, default ``small_cnn``, or ``resnet50`` with
    ``train: false``; ``model_options`` with the architecture's defaults filled in) and fit the data; shared by
    the config check and the experiment run, so both refuse the same files with the same message."""
    default = "resnet50" if ccfg.get("train", True) is False else "small_cnn"
    return load_classifier(path, num_classes=num_classes, input_size=input_size, arch=ccfg.get("arch") or default,
                           model_options=ccfg.get("model_options") or {},
                           fix=f"{REUSE_FIX} (or set classifier.arch / classifier.model_options to the checkpoint's)")


def _load(path: str | os.PathLike, num_classes: int | None = None, input_size: int | None = None,
          arch: str | None = None, model_options: Mapping[str, Any] | None = None,
          fix: str = "") -> tuple[GapClassifier, dict[str, Any]]:
    """:func:`load_classifier`, and the checkpoint's metadata."""
    payload = load_artifact(path, "classifier")
    meta = payload["meta"]
    for key in ("arch", "num_classes", "input_size"):
        if key not in meta:
            raise CheckpointError(f"{path} lacks '{key}' in its metadata")
    if arch is not None:
        stored = {"arch": meta["arch"], "model_options": meta.get("model_options") or {}}
        diff = value_differences(stored, {"arch": arch, "model_options": dict(model_options or {})},
                                 "checkpoint", "config")
        if diff:
            raise CheckpointError(f"{path} holds another classifier than the config describes: {'; '.join(diff)}"
                                  + (f"; {fix}" if fix else ""))
    if num_classes is not None and int(meta["num_classes"]) != int(num_classes):
        raise CheckpointError(f"class count mismatch: {path} has {meta['num_classes']} classes, the data has {num_classes}")
    if input_size is not None and int(meta["input_size"]) != int(input_size):
        raise CheckpointError(f"input size mismatch: {path} expects {meta['input_size']} px, the data is {input_size} px")
    options = {k: v for k, v in dict(meta.get("model_options") or {}).items() if k != "pretrained"}
    check_hparams({"num_classes": meta["num_classes"], "input_size": meta["input_size"], "model_options": options},
                  path)
    state = payload["state"]
    if payload["format"] == "lightning":
        state = strip_prefix(state, "model.")
    model = build_from_state(lambda: build_classifier(meta["arch"], int(meta["num_classes"]), **options), state, path,
                             f"the '{meta['arch']}' classifier (model_options {options})")
    load_state_checked(model, state, path)
    return model.eval(), meta
