"""Standard classifier training as a LightningModule, and safe loading of classifier checkpoints."""
from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from attacks._checks import check_images, check_labels

from .io import CheckpointError, load_artifact, load_state_checked, project_version, save_artifact, strip_prefix
from .models import GapClassifier, build_classifier

__all__ = ["ClassifierModule", "classification_step", "load_classifier", "save_classifier", "init_from_checkpoint"]


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


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of a zoo classifier (one-cycle schedule), accuracy per stage.

    Args:
        arch: zoo architecture name (``small_cnn``, ``resnet18_cifar``, ``wide_resnet``, ``resnet50``, ...).
        num_classes: number of classes; must match the data module.
        model_options: extra keyword arguments of the architecture (width, depth, input_size, pretrained=path, ...).
        optimizer: ``"sgd"`` (Nesterov) or ``"adam"`` (AdamW).
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: weight decay of the optimiser.
        momentum: SGD momentum (ignored by Adam).
        label_smoothing: cross-entropy label smoothing of the training loss.
        init_from: classifier artifact or Lightning checkpoint to start from (fine-tuning; loaded with
            ``weights_only``, same architecture and options required).
        new_head: with ``init_from``, start a fresh linear head when the checkpoint has another class count
            (otherwise a class count mismatch is an error).
    """

    def __init__(self, arch: str = "small_cnn", num_classes: int = 10, model_options: dict[str, Any] | None = None,
                 optimizer: str = "adam", lr: float = 2e-3, weight_decay: float = 5e-4, momentum: float = 0.9,
                 label_smoothing: float = 0.0, init_from: str | None = None, new_head: bool = False) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.model: GapClassifier = build_classifier(arch, num_classes, **(model_options or {}))
        if init_from:
            init_from_checkpoint(self.model, init_from, new_head=new_head)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

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

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                  nesterov=True)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=max(int(steps), 1), pct_start=0.25)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        k = getattr(dm, "num_classes", None)
        if k is not None and k != self.hparams.num_classes:
            raise ValueError(f"class count mismatch: the model has {self.hparams.num_classes} classes, "
                             f"the data has {k}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["idls_meta"] = {"kind": "classifier", "version": project_version(), **self.model.describe(),
                                   "model_options": dict(self.hparams.model_options or {})}


def init_from_checkpoint(model: GapClassifier, path: str | os.PathLike, new_head: bool = False) -> None:
    """Copy the weights of a saved classifier into ``model`` (fine-tuning); ``new_head`` keeps ``model``'s own
    freshly initialised head when the class counts differ. Raises :class:`CheckpointError` when it does not fit."""
    source = load_classifier(path)
    if source.arch != model.arch:
        raise CheckpointError(f"{path} holds a '{source.arch}' classifier, the model is '{model.arch}'")
    state = source.state_dict()
    if source.num_classes != model.num_classes:
        if not new_head:
            raise CheckpointError(f"class count mismatch: {path} has {source.num_classes} classes, the model has "
                                  f"{model.num_classes} (set new_head: true to fine-tune with a new head)")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    load_state_checked(model, state, path)


def save_classifier(model: GapClassifier, path: str | os.PathLike, model_options: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Export a classifier as a safe, self-describing artifact (atomic write)."""
    meta = {**model.describe(), "model_options": dict(model_options or {}), **(extra or {})}
    save_artifact(path, "classifier", model.state_dict(), meta)


def load_classifier(path: str | os.PathLike, num_classes: int | None = None, input_size: int | None = None) -> GapClassifier:
    """Rebuild a classifier from an exported artifact or a Lightning checkpoint, checking that it fits."""
    payload = load_artifact(path, "classifier")
    meta = payload["meta"]
    for key in ("arch", "num_classes", "input_size"):
        if key not in meta:
            raise CheckpointError(f"{path} lacks '{key}' in its metadata")
    if num_classes is not None and int(meta["num_classes"]) != int(num_classes):
        raise CheckpointError(f"class count mismatch: {path} has {meta['num_classes']} classes, the data has {num_classes}")
    if input_size is not None and int(meta["input_size"]) != int(input_size):
        raise CheckpointError(f"input size mismatch: {path} expects {meta['input_size']} px, the data is {input_size} px")
    options = {k: v for k, v in dict(meta.get("model_options") or {}).items() if k != "pretrained"}
    model = build_classifier(meta["arch"], int(meta["num_classes"]), **options)
    state = payload["state"]
    if payload["format"] == "lightning":
        state = strip_prefix(state, "model.")
    load_state_checked(model, state, path)
    return model.eval()
