"""Pieces every experiment shares: data, the classifier (trained or reused), trainers, reports."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from ..classifier import ClassifierModule, load_classifier, save_classifier
from ..data import build_datamodule
from ..io import atomic_write_text, refuse_conflicts, write_json
from ..models import GapClassifier

__all__ = ["setup_data", "get_classifier", "make_trainer", "take_split", "write_outputs", "markdown_table", "fmt",
           "deep_get", "select_correct"]


def setup_data(cfg: dict[str, Any]) -> pl.LightningDataModule:
    """Build and set up the data module named in ``cfg['data']`` (``name`` + its options)."""
    opts = dict(cfg.get("data") or {"name": "digits"})
    dm = build_datamodule(opts.pop("name", "digits"), **opts)
    dm.setup("fit")
    return dm


def make_trainer(cfg: dict[str, Any], max_epochs: int, out: Path | None = None, **extra: Any) -> pl.Trainer:
    """A Trainer from the config's ``trainer:`` section (presets compose in), quiet by default."""
    opts = {"accelerator": "cpu", "devices": 1, "enable_model_summary": False, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": True, "deterministic": False}
    opts.update(cfg.get("trainer") or {})
    opts.update(extra)
    opts["max_epochs"] = max_epochs
    if out is not None and opts.get("logger") is True:
        opts["logger"] = pl.loggers.CSVLogger(str(out), name="logs")
    return pl.Trainer(**opts)


def get_classifier(cfg: dict[str, Any], dm: pl.LightningDataModule, out: Path, progress: bool = True) -> tuple[GapClassifier, dict[str, Any]]:
    """Reuse ``classifier.checkpoint`` if it exists (it must hold the classifier the config describes:
    :func:`defend.classifier.load_reused_classifier`), else train that classifier and save it there."""
    ccfg = dict(cfg.get("classifier") or {})
    ckpt = ccfg.get("checkpoint")
    num_classes = dm.num_classes
    size = dm.image_shape[-1]
    if ckpt and Path(ckpt).is_file() and not ccfg.get("retrain", False):
        from ..classifier import load_reused_classifier  # the classifier this section describes, not just any

        model = load_reused_classifier(ckpt, ccfg, num_classes=num_classes, input_size=size)
        return model, {"trained": False, "checkpoint": ckpt}
    if ccfg.get("train", True) is False:  # e.g. ImageNet weights from a local file, used as they are
        from ..models import build_classifier

        model = build_classifier(ccfg.get("arch", "resnet50"), num_classes, **(ccfg.get("model_options") or {})).eval()
        target = Path(ckpt) if ckpt else out / "classifier.pt"
        options = {k: v for k, v in (ccfg.get("model_options") or {}).items() if k != "pretrained"}
        save_classifier(model, target, options)
        return model, {"trained": False, "checkpoint": str(target)}
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True)
    name = str(ccfg.get("optimizer", "adam"))
    optimiser = {"name": {"adam": "adamw"}.get(name, name),  # the classifier sections' "adam" has always been AdamW
                 "lr": float(ccfg.get("lr", 2e-3)), "weight_decay": float(ccfg.get("weight_decay", 5e-4))}
    module = ClassifierModule(arch=ccfg.get("arch", "small_cnn"), num_classes=num_classes,
                              model_options=ccfg.get("model_options"), optimiser=optimiser)
    trainer = make_trainer(cfg, int(ccfg.get("max_epochs", 10)), enable_progress_bar=progress)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    model = module.model.eval()
    target = Path(ckpt) if ckpt else out / "classifier.pt"
    if trainer.is_global_zero:  # under DDP every rank holds the same weights; one writes them
        save_classifier(model, target, ccfg.get("model_options"), extra={"train_seconds": seconds})
    trainer.strategy.barrier("classifier saved")
    return model, {"trained": True, "checkpoint": str(target), "train_seconds": seconds}


def take_split(dm: pl.LightningDataModule, split: str = "test", n: int | None = None) -> dict[str, Tensor]:
    """The first ``n`` items of a split as one batch dict (images, labels, masks if any)."""
    ds = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}[split]
    n = len(ds) if n is None else min(n, len(ds))
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict[str, Any]], report: str) -> None:
    """``metrics.json`` (a list of flat rows) and ``report.md``, each written atomically (a full disk is a one-line
    ``cannot write <file>`` error that leaves the previous file intact). Under ``defend experiment`` both are checked
    against the output manifest before either is written, so a refused pair is not left half replaced."""
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (dict, list)):
                raise ValueError(f"metrics rows must be flat; field {k!r} is a {type(v).__name__}")
    refuse_conflicts(out / "metrics.json", out / "report.md")
    write_json(out / "metrics.json", rows)
    atomic_write_text(out / "report.md", report)


def deep_get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def select_correct(model: GapClassifier, dm: pl.LightningDataModule, n: int,
                   split: str | Sequence[str] = "test") -> dict[str, Tensor]:
    """The first ``n`` inputs of a split (or of several, concatenated in order: ``["test", "val"]``) that the
    classifier gets right (attacks start from correct inputs)."""
    splits = [split] if isinstance(split, str) else list(split)
    unknown = [s for s in splits if s not in ("train", "val", "test")]
    if unknown or not splits:
        raise ValueError(f"unknown data split(s) {unknown or splits}; choose from train, val, test")
    parts = [take_split(dm, s) for s in splits]
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with torch.no_grad():
        ok = torch.cat([model(data["image"][i:i + 512]).argmax(1) == data["label"][i:i + 512]
                        for i in range(0, data["image"].shape[0], 512)])
    idx = ok.nonzero().flatten()[:n]
    return {k: v[idx] for k, v in data.items()}
