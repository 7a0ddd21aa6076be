"""Interpretation-robust training (Boopathy et al., ICML 2020; AdvEdge section VIII, Eqn 20-21).

The classifier is trained on::

    min_theta  E[ l_CE(f(x'), y) + gamma * max_{||d||_inf <= eps} D(x, x + d) ]

with the interpretation discrepancy (all classes, weighted by the perturbed input's softmax)::

    D(x, x') = ||g_y(x) - g_y(x')||_1 + sum_{j != y} w_j ||g_j(x) - g_j(x')||_1,
    w_j = softmax(f(x'))_j / sum_{k != y} softmax(f(x'))_k

Maps ``g_c``:

* ``interpretation="cam"``: the raw CAM ``sum_k W[c, k] a_k[i, j]`` of every class at the CAM (feature)
  resolution (8x8 for the 32 px zoo models), min-max normalised per example and per class over the
  ``h x w`` grid: ``(m - min) / max(max - min, 1e-12)`` (a constant map becomes zeros). CAM is a plain
  forward pass, so it is differentiable in the input and the weights without any double backward.
* ``interpretation="grad"``: ``|d logit_c / dx|`` (max over colour channels) at the input resolution,
  computed by :class:`attacks.interpreters.GradInterpreter` (``score="logit"``, ReLU-derivative surrogate
  ``tau=1e-4`` so the map has a non-zero input / weight derivative) with ``create_graph=True``, then the
  same per-example, per-class min-max. One double backward per class: expensive, prefer CAM.

``||.||_1`` is the mean absolute difference over the map's pixels, so each term lies in [0, 1] and D in [0, 2].

Modes (``mode=``): ``"normal"`` (clean CE), ``"pgd_at"`` (Madry PGD adversarial training: CE on untargeted
PGD examples), ``"int"`` (clean CE + gamma * D_worst) and ``"int_adv"`` (adversarial CE + gamma * D_worst).
The inner maximisations run :func:`attacks.frameworks.pgd_maximise` (random start, input gradients only)
with the model in eval mode (restored afterwards). The outer loss is built from differentiable maps and
Lightning performs the ONE ordinary backward (DDP syncs once). No SyncBatchNorm (it has no double backward).
"""
from __future__ import annotations

from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from attacks.checks import check_images, check_labels
from attacks.state import eval_mode
from attacks.frameworks.pgd import pgd_maximise
from attacks.interpreters import CAMInterpreter, GradInterpreter, minmax

from .classifier import classification_step, init_from_checkpoint
from .io import project_version
from .models import GapClassifier, build_classifier

__all__ = [
    "MODES", "INTERPRETATIONS", "RobustClassifierModule", "class_maps", "maps_and_logits", "normalise_maps",
    "discrepancy", "discrepancy_l1_2class", "interpretation_discrepancy", "worst_case_discrepancy", "pgd_ce_attack",
]

MODES = ("normal", "pgd_at", "int", "int_adv")
INTERPRETATIONS = ("cam", "grad")


# --------------------------------------------------------------------------------------------- maps
def normalise_maps(m: Tensor) -> Tensor:
    """Per-example, per-class min-max of ``[N, C, h, w]`` maps over the ``h x w`` grid (differentiable)."""
    n, c = m.shape[:2]
    return minmax(m.reshape(n * c, 1, *m.shape[2:])).view_as(m)


#: the interpreters inside D: CAM at the feature grid; GRAD of the logit through the smooth ReLU-derivative
#: surrogate, so the map has a non-zero input and weight derivative
INTERPRETERS_IN_D = {"cam": CAMInterpreter, "grad": lambda: GradInterpreter(score="logit", surrogate_tau=1e-4)}


def maps_and_logits(model: GapClassifier, x: Tensor, interpretation: str = "cam") -> tuple[Tensor, Tensor]:
    """Normalised maps of every class ``[N, C, h, w]`` (the interpreter's :meth:`explain_classes`) and the logits
    ``[N, C]``; both differentiable in ``x`` (when it requires grad) and in the model's parameters."""
    if interpretation not in INTERPRETERS_IN_D:
        raise ValueError(f"interpretation must be one of {INTERPRETATIONS}, got {interpretation!r}")
    graph = torch.is_grad_enabled()  # under no_grad (benign reference maps) no graph is recorded
    if interpretation == "grad":  # a gradient map needs autograd even for a reference map
        inp = x if x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            raw, logits = INTERPRETERS_IN_D["grad"]().explain_classes(model, inp, create_graph=True)
    else:
        raw, logits = INTERPRETERS_IN_D[interpretation]().explain_classes(model, x, create_graph=graph)
    return normalise_maps(raw), model(x) if logits is None else logits


def class_maps(model: GapClassifier, x: Tensor, interpretation: str = "cam") -> Tensor:
    """Normalised maps of every class ``[N, C, h, w]`` (see :func:`maps_and_logits`)."""
    return maps_and_logits(model, x, interpretation)[0]


def discrepancy(maps_x: Tensor, maps_adv: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
    """``D`` per example ``[N]`` from all-class maps ``[N, C, h, w]`` of x and x' and the logits of x'.

    ``D = l1_y + sum_{j != y} w_j l1_j``, ``l1_c = mean_pixels |g_c(x) - g_c(x')|``,
    ``w_j = p_j / sum_{k != y} p_k`` with ``p = softmax(f(x'))`` (differentiable).
    """
    l1 = (maps_x - maps_adv).abs().flatten(2).mean(2)  # [N, C]
    p = logits_adv.softmax(1)
    true = F.one_hot(y, p.shape[1]).bool()
    p_other = p.masked_fill(true, 0.0)
    w = p_other / p_other.sum(1, keepdim=True).clamp_min(1e-12)
    return l1.gather(1, y.view(-1, 1)).squeeze(1) + (w * l1).sum(1)


def interpretation_discrepancy(model: GapClassifier, x: Tensor, x_adv: Tensor, y: Tensor,
                               interpretation: str = "cam") -> Tensor:
    """``D(x, x_adv)`` per example for labels ``y`` (differentiable in ``x_adv`` and the model)."""
    maps_x, _ = maps_and_logits(model, x, interpretation)
    maps_a, logits_a = maps_and_logits(model, x_adv, interpretation)
    return discrepancy(maps_x, maps_a, logits_a, y)


def discrepancy_l1_2class(model: GapClassifier, x: Tensor, x_adv: Tensor, y: Tensor, y_t: Tensor,
                          interpretation: str = "cam") -> Tensor:
    """AdvEdge Eqn 20: ``1/2 (||g_y(x) - g_y(x')||_1 + ||g_yt(x) - g_yt(x')||_1)`` per example ``[N]``.

    Same maps and per-pixel-mean L1 as :func:`discrepancy`; ``y_t`` is the attacker's target (or any second class).
    """
    maps_x, _ = maps_and_logits(model, x, interpretation)
    maps_a, _ = maps_and_logits(model, x_adv, interpretation)
    l1 = (maps_x - maps_a).abs().flatten(2).mean(2)
    return 0.5 * (l1.gather(1, y.view(-1, 1)).squeeze(1) + l1.gather(1, y_t.view(-1, 1)).squeeze(1))


# --------------------------------------------------------------------------------------------- inner attacks
def worst_case_discrepancy(model: GapClassifier, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
                           interpretation: str = "cam", random_start: bool = True,
                           generator: torch.Generator | None = None) -> Tensor:
    """PGD (``pgd_maximise``) ascent on ``D(x, x')`` in the L-inf ball; returns the detached ``x'``.

    The model's train/eval flags are left as they are (callers put it in eval mode); only input
    gradients are taken, so nothing lands in the parameters' ``.grad``. The benign maps are computed once.
    """
    with torch.no_grad() if interpretation == "cam" else torch.enable_grad():
        maps_x = class_maps(model, x.detach(), interpretation).detach()

    def loss_fn(z: Tensor) -> Tensor:
        maps_z, logits_z = maps_and_logits(model, z, interpretation)
        return discrepancy(maps_x, maps_z, logits_z, y)

    return pgd_maximise(loss_fn, x, eps, alpha, steps, random_start=random_start, generator=generator)


def pgd_ce_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
                  random_start: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Untargeted L-inf PGD maximising the cross-entropy of ``y``; returns the detached adversarial input."""
    return pgd_maximise(lambda z: F.cross_entropy(model(z), y, reduction="none"), x, eps, alpha, steps,
                        random_start=random_start, generator=generator)


# --------------------------------------------------------------------------------------------- module
class RobustClassifierModule(pl.LightningModule):
    """Normal, PGD-adversarial or interpretation-robust training of a zoo classifier (see the module docstring).

    Args:
        arch: zoo architecture name (e.g. ``small_cnn``, ``wide_resnet``).
        num_classes: number of classes; must match the data module.
        model_options: extra keyword arguments of the architecture (e.g. ``width``, ``batchnorm: false``).
        mode: ``"normal"``, ``"pgd_at"``, ``"int"`` or ``"int_adv"``.
        interpretation: ``"cam"`` or ``"grad"`` (maps inside D).
        gamma: weight of the worst-case discrepancy.
        eps: L-inf radius of the inner maximisations (images in [0, 1]).
        inner_steps: PGD steps of the inner maximisations.
        inner_alpha: PGD step size of the inner maximisations, given at the full ``eps`` and scaled with the ramp
            (``alpha_t = alpha * eps_t / eps``).
        eps_ramp_epochs: ``eps_t`` grows linearly (per batch) from 0 to ``eps`` over this many epochs (0: no ramp).
        random_start: uniform random start in the ball for the inner attacks.
        ce_attack: in ``int_adv``, the adversarial CE input: ``"pgd"`` a separate untargeted PGD on the CE
            (default), ``"interp"`` reuse the D-maximising input (half the cost).
        optimizer: ``"adam"`` (reference) or ``"sgd"`` (Nesterov).
        lr: learning rate of the optimiser.
        weight_decay: weight decay of the optimiser.
        momentum: SGD momentum (ignored by Adam).
        lr_milestones: epochs at which the learning rate is multiplied by ``lr_decay`` (none: constant).
        lr_decay: factor of the step decay.
        init_from: classifier artifact or Lightning checkpoint to start from (fine-tune a trained classifier to be
            interpretation-robust; loaded with ``weights_only``, same architecture and options required).
        new_head: with ``init_from``, start a fresh linear head when the checkpoint has another class count.
    """

    def __init__(self, arch: str = "small_cnn", num_classes: int = 10, model_options: dict[str, Any] | None = None,
                 mode: str = "int_adv", interpretation: str = "cam", gamma: float = 0.01, eps: float = 8 / 255,
                 inner_steps: int = 10, inner_alpha: float = 2 / 255, eps_ramp_epochs: float = 0.0,
                 random_start: bool = True, ce_attack: str = "pgd", optimizer: str = "adam", lr: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.9, lr_milestones: Sequence[int] | None = None,
                 lr_decay: float = 0.1, init_from: str | None = None, new_head: bool = False) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if interpretation not in INTERPRETATIONS:
            raise ValueError(f"interpretation must be one of {INTERPRETATIONS}, got {interpretation!r}")
        if ce_attack not in ("pgd", "interp"):
            raise ValueError(f"ce_attack must be 'pgd' or 'interp', got {ce_attack!r}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if lr <= 0 or gamma < 0 or eps < 0 or inner_alpha <= 0 or inner_steps < 0 or eps_ramp_epochs < 0:
            raise ValueError("need lr > 0, gamma >= 0, eps >= 0, inner_alpha > 0, inner_steps >= 0, eps_ramp_epochs >= 0")
        if mode != "normal" and (eps <= 0 or inner_steps < 1):
            raise ValueError(f"mode {mode!r} needs eps > 0 and inner_steps >= 1")
        self.save_hyperparameters()
        self.model: GapClassifier = build_classifier(arch, num_classes, **(model_options or {}))
        if init_from:
            init_from_checkpoint(self.model, init_from, new_head=new_head)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ schedule
    def current_eps(self, batch_idx: int = 0) -> float:
        """Ramped radius: ``eps * min(1, (epoch + (batch_idx + 1) / batches_per_epoch) / eps_ramp_epochs)``."""
        hp = self.hparams
        if hp.eps_ramp_epochs <= 0 or self._trainer is None:
            return float(hp.eps)
        nb = self.trainer.num_training_batches
        nb = nb if isinstance(nb, (int, float)) and 0 < nb < float("inf") else 1
        progress = (self.current_epoch + (batch_idx + 1) / nb) / hp.eps_ramp_epochs
        return float(hp.eps) * min(1.0, progress)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, x: Tensor, y: Tensor, eps: float | None = None,
                     generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The outer objective for a batch at radius ``eps`` (default: the full ``eps``).

        Returns ``loss`` (differentiable in the parameters), ``ce``, ``d`` (mean worst-case D, 0 when unused)
        and ``logits`` / ``labels`` of the CE input (for accuracy).
        """
        hp = self.hparams
        eps = float(hp.eps) if eps is None else float(eps)
        mode, interp = hp.mode, hp.interpretation
        attack = mode != "normal" and eps > 0
        alpha = float(hp.inner_alpha) * eps / float(hp.eps) if attack else 0.0
        x = x.detach()
        x_d = x_ce = x
        if attack:
            with eval_mode(self.model):
                if mode in ("int", "int_adv"):
                    x_d = worst_case_discrepancy(self.model, x, y, eps, alpha, hp.inner_steps, interp,
                                                 hp.random_start, generator)
                if mode == "pgd_at" or (mode == "int_adv" and hp.ce_attack == "pgd"):
                    x_ce = pgd_ce_attack(self.model, x, y, eps, alpha, hp.inner_steps, hp.random_start, generator)
                elif mode == "int_adv":
                    x_ce = x_d
        zero = x.new_zeros(())
        if mode in ("normal", "pgd_at"):
            logits = self.model(x_ce)
            ce = F.cross_entropy(logits, y)
            return {"loss": ce, "ce": ce.detach(), "d": zero, "logits": logits.detach()}
        # int / int_adv: one forward over [x; x_d (; x_ce)] in the current (train) mode
        n = x.shape[0]
        separate_ce = mode == "int_adv" and x_ce is not x_d
        batch = torch.cat([x, x_d, x_ce] if separate_ce else [x, x_d])
        if interp == "cam":
            maps, logits_all = maps_and_logits(self.model, batch, "cam")
            maps_x, maps_d = maps[:n], maps[n:2 * n]
        else:
            logits_all = self.model(batch)
            maps_x = class_maps(self.model, x, "grad")
            maps_d = class_maps(self.model, x_d, "grad")
        d = discrepancy(maps_x, maps_d, logits_all[n:2 * n], y).mean()
        logits_ce = logits_all[:n] if mode == "int" else (logits_all[2 * n:] if separate_ce else logits_all[n:2 * n])
        ce = F.cross_entropy(logits_ce, y)
        loss = ce + float(hp.gamma) * d
        return {"loss": loss, "ce": ce.detach(), "d": d.detach(), "logits": logits_ce.detach()}

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["image"], batch["label"]
        if self.global_step == 0:
            check_images(x)
            check_labels(y, self.hparams.num_classes, x.shape[0])
        eps = self.current_eps(batch_idx)
        out = self.compute_loss(x, y, eps)
        self.train_acc.update(out["logits"], y)
        bs = x.shape[0]
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=bs)
        self.log("train/ce", out["ce"], batch_size=bs)
        self.log("train/d", out["d"], prog_bar=self.hparams.mode in ("int", "int_adv"), batch_size=bs)
        self.log("train/eps", eps, batch_size=bs)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs)
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        classification_step(self, batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        classification_step(self, batch, self.test_acc, "test")

    def predict_step(self, batch, batch_idx):
        return self.model(batch["image"]).softmax(1)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                  nesterov=True)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if not hp.lr_milestones:
            return opt
        from .checks import check_milestones  # whole epochs >= 1 (later than max_epochs: the run ends first)

        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=check_milestones(hp.lr_milestones),
                                                     gamma=hp.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        k = getattr(dm, "num_classes", None)
        if k is not None and k != self.hparams.num_classes:
            raise ValueError(f"class count mismatch: the model has {self.hparams.num_classes} classes, "
                             f"the data has {k}")

    def robust_meta(self) -> dict[str, Any]:
        hp = self.hparams
        return {"mode": hp.mode, "interpretation": hp.interpretation, "gamma": float(hp.gamma), "eps": float(hp.eps),
                "inner_steps": int(hp.inner_steps), "inner_alpha": float(hp.inner_alpha),
                "eps_ramp_epochs": float(hp.eps_ramp_epochs), "ce_attack": hp.ce_attack}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["idls_meta"] = {"kind": "classifier", "version": project_version(), **self.model.describe(),
                                   "model_options": dict(self.hparams.model_options or {}),
                                   "robust_training": self.robust_meta()}
