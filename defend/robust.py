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

Options: ``mode``, ``interpretation``, ``gamma`` and ``ce_attack`` next to the classifier's options
(:class:`~defend.classifier.ClassifierModule`, which this module extends), the inner maximisations as one group
(:class:`InnerMaximisation`: ``inner.eps``, ``inner.steps``, ``inner.alpha``, ``inner.ramp_epochs``,
``inner.random_start``) and the optimiser as another (:class:`~defend.module_base.Optimiser`).

Modes (``mode=``): ``"normal"`` (clean CE), ``"pgd_at"`` (Madry PGD adversarial training: CE on untargeted
PGD examples), ``"int"`` (clean CE + gamma * D_worst), ``"int_adv"`` (adversarial CE + gamma * D_worst) and
``"trades"`` (Zhang et al., ICML 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x'))``, ``x'`` the PGD maximiser of the
KL started at ``x + 0.001 * N(0, 1)``; :func:`trades_kl`, :func:`trades_attack`).
The inner maximisations run :func:`attacks.frameworks.pgd_maximise` (random start, input gradients only)
with the model in eval mode (restored afterwards). The outer loss is built from differentiable maps and
Lightning performs the ONE ordinary backward (DDP syncs once). No SyncBatchNorm (it has no double backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import eval_mode
from attacks.checks import check_images, check_labels
from attacks.frameworks.pgd import pgd_maximise
from attacks.interpreters import CAMInterpreter, GradInterpreter
from attacks.maps import minmax

from .classifier import ClassifierModule
from .defences import CLASSIFIER, Defence, register_defence
from .models import GapClassifier
from .module_base import Optimiser, as_options

__all__ = [
    "MODES", "INTERPRETATIONS", "RobustClassifierModule", "InnerMaximisation", "ROBUST_OPTIMISER", "class_maps", "maps_and_logits",
    "discrepancy", "discrepancy_l1_2class", "interpretation_discrepancy", "worst_case_discrepancy", "pgd_ce_attack",
    "trades_kl", "trades_attack",
]

MODES = ("normal", "pgd_at", "int", "int_adv", "trades")
INTERPRETATIONS = ("cam", "grad")


# --------------------------------------------------------------------------------------------- maps
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
    return minmax(raw, start_dim=2), model(x) if logits is None else logits  # per example and class


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


def trades_kl(logits_x: Tensor, logits_adv: Tensor) -> Tensor:
    """``KL(f(x) || f(x'))`` per example ``[N]``: ``sum_c p_c(x) (log p_c(x) - log p_c(x'))`` of the softmaxes."""
    log_p = logits_x.log_softmax(1)
    return (log_p.exp() * (log_p - logits_adv.log_softmax(1))).sum(1)


def trades_attack(model: nn.Module, x: Tensor, eps: float, alpha: float, steps: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """TRADES' inner maximisation: PGD (``pgd_maximise``) ascent on ``KL(f(x) || f(x'))`` from ``x + 0.001 N(0, 1)``
    (the benign softmax computed once, detached); returns the detached ``x'``."""
    with torch.no_grad():
        logits_x = model(x.detach())
    noise = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return pgd_maximise(lambda z: trades_kl(logits_x, model(z)), x, eps, alpha, steps, generator=generator,
                        start=noise)


# --------------------------------------------------------------------------------------------- module
@dataclass(frozen=True)
class InnerMaximisation:
    """The inner maximisations of robust training (PGD in the L-inf ball, input gradients only).

    Args:
        eps: L-inf radius in image units ([0, 1]).
        steps: number of PGD steps of each inner maximisation.
        alpha: PGD step size, given at the full ``eps`` and scaled with the ramp (``alpha_t = alpha * eps_t / eps``).
        ramp_epochs: ``eps_t`` grows linearly (per batch) from 0 to ``eps`` over this many epochs (0: no ramp).
        random_start: uniform random start in the ball.
    """

    eps: float = 8 / 255
    steps: int = 10
    alpha: float = 2 / 255
    ramp_epochs: float = 0.0
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.eps < 0 or not self.alpha > 0 or self.steps < 0 or self.ramp_epochs < 0:
            raise ValueError(f"need inner.eps >= 0, inner.alpha > 0, inner.steps >= 0 and inner.ramp_epochs >= 0, got "
                             f"{self.eps}, {self.alpha}, {self.steps} and {self.ramp_epochs}")
        if self.eps > 1 or self.alpha > 1:
            raise ValueError(f"inner.eps and inner.alpha are radii in image units ([0, 1]; write 8/255 for 8 levels), "
                             f"got {self.eps} and {self.alpha}")


#: the default optimiser of :class:`RobustClassifierModule`: Adam at a constant learning rate (the reference)
ROBUST_OPTIMISER = Optimiser(name="adam", lr=1e-3, weight_decay=0.0, schedule="constant")


class RobustClassifierModule(ClassifierModule):
    """Normal, PGD-adversarial or interpretation-robust training of a zoo classifier (see the module docstring).

    A :class:`~defend.classifier.ClassifierModule` (model, ``init_from``, validation / test / predict steps,
    metrics, checkpoint metadata) whose training step is the min-max objective.

    Args:
        arch: zoo architecture name (e.g. ``small_cnn``, ``wide_resnet``).
        num_classes: number of classes; must match the data module.
        model_options: extra keyword arguments of the architecture (e.g. ``width``, ``batchnorm: false``).
        mode: ``"normal"``, ``"pgd_at"``, ``"int"``, ``"int_adv"`` or ``"trades"``.
        interpretation: ``"cam"`` or ``"grad"`` (maps inside D).
        gamma: weight of the worst-case discrepancy D.
        ce_attack: in ``int_adv``, the adversarial CE input: ``"pgd"`` a separate untargeted PGD on the CE
            (default), ``"interp"`` reuse the D-maximising input (half the cost).
        beta: in ``trades``, the weight of the KL term (Zhang et al.: 6; 1 / lambda in their notation).
        inner: the inner maximisations (radius, steps, step size, radius ramp, random start; ``trades`` always
            starts at ``x + 0.001 N(0, 1)``).
        optimiser: the optimiser and its learning-rate schedule (default: Adam, lr 0.001, constant).
        label_smoothing: label smoothing of the outer cross-entropy.
        init_from: classifier artifact or Lightning checkpoint to start from (fine-tune a trained classifier to be
            interpretation-robust; loaded with ``weights_only``, same architecture and options required).
        new_head: with ``init_from``, start a fresh linear head when the checkpoint has another class count.
    """

    def __init__(self, arch: str = "small_cnn", num_classes: int = 10, model_options: dict[str, Any] | None = None,
                 mode: str = "int_adv", interpretation: str = "cam", gamma: float = 0.01, ce_attack: str = "pgd",
                 beta: float = 6.0, inner: InnerMaximisation = InnerMaximisation(),
                 optimiser: Optimiser = ROBUST_OPTIMISER,
                 label_smoothing: float = 0.0, init_from: str | None = None, new_head: bool = False) -> None:
        inner = as_options(inner, InnerMaximisation(), "inner")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if interpretation not in INTERPRETATIONS:
            raise ValueError(f"interpretation must be one of {INTERPRETATIONS}, got {interpretation!r}")
        if ce_attack not in ("pgd", "interp"):
            raise ValueError(f"ce_attack must be 'pgd' or 'interp', got {ce_attack!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0 (the weight of the worst-case discrepancy), got {gamma}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0 (the weight of TRADES' KL term), got {beta}")
        if mode != "normal" and (inner.eps <= 0 or inner.steps < 1):
            raise ValueError(f"mode {mode!r} needs inner.eps > 0 and inner.steps >= 1 (or mode: normal)")
        super().__init__(arch=arch, num_classes=num_classes, model_options=model_options, optimiser=optimiser,
                         label_smoothing=label_smoothing, init_from=init_from, new_head=new_head)
        self.inner = inner
        self.save_options(mode=mode, interpretation=interpretation, gamma=gamma, ce_attack=ce_attack, beta=beta,
                          inner=inner)

    @classmethod
    def default_optimiser(cls) -> Optimiser:
        return ROBUST_OPTIMISER

    # ------------------------------------------------------------------ schedule
    def current_eps(self, batch_idx: int = 0) -> float:
        """Ramped radius: ``eps * min(1, (epoch + (batch_idx + 1) / batches_per_epoch) / ramp_epochs)``."""
        inner = self.inner
        if inner.ramp_epochs <= 0 or self._trainer is None:
            return float(inner.eps)
        nb = self.trainer.num_training_batches
        nb = nb if isinstance(nb, (int, float)) and 0 < nb < float("inf") else 1
        progress = (self.current_epoch + (batch_idx + 1) / nb) / inner.ramp_epochs
        return float(inner.eps) * min(1.0, progress)

    # ------------------------------------------------------------------ loss
    def _inner_inputs(self, x: Tensor, y: Tensor, eps: float,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(x_d, x_ce)``: the D-maximising (``trades``: KL-maximising) input and the input of the CE (both ``x``
        when nothing is attacked);
        the model is in eval mode meanwhile (its flags restored afterwards)."""
        hp, inner = self.hparams, self.inner
        x_d = x_ce = x
        if hp.mode == "normal" or eps <= 0:
            return x_d, x_ce
        alpha = float(inner.alpha) * eps / float(inner.eps)
        with eval_mode(self.model):
            if hp.mode == "trades":
                x_d = trades_attack(self.model, x, eps, alpha, inner.steps, generator)
            if hp.mode in ("int", "int_adv"):
                x_d = worst_case_discrepancy(self.model, x, y, eps, alpha, inner.steps, hp.interpretation,
                                             inner.random_start, generator)
            if hp.mode == "pgd_at" or (hp.mode == "int_adv" and hp.ce_attack == "pgd"):
                x_ce = pgd_ce_attack(self.model, x, y, eps, alpha, inner.steps, inner.random_start, generator)
            elif hp.mode == "int_adv":
                x_ce = x_d
        return x_d, x_ce

    def compute_loss(self, x: Tensor, y: Tensor, eps: float | None = None,
                     generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The outer objective for a batch at radius ``eps`` (default: the full ``inner.eps``):
        ``l_CE(f(x_ce), y) + gamma * D(x, x_d)`` (module docstring; AdvEdge Eqn 21).

        Returns ``loss`` (differentiable in the parameters), ``ce``, ``d`` (mean worst-case D, ``trades``: mean
        KL; 0 when unused) and ``logits`` of the CE input (for accuracy).
        """
        hp = self.hparams
        eps = float(self.inner.eps) if eps is None else float(eps)
        mode, interp, smoothing = hp.mode, hp.interpretation, float(hp.label_smoothing)
        x = x.detach()
        x_d, x_ce = self._inner_inputs(x, y, eps, generator)
        zero = x.new_zeros(())
        if mode in ("normal", "pgd_at"):
            logits = self.model(x_ce)
            ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
            return {"loss": ce, "ce": ce.detach(), "d": zero, "logits": logits.detach()}
        if mode == "trades":  # two forwards in the current (train) mode, as the reference implementation
            logits = self.model(x)
            ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
            kl = trades_kl(logits, self.model(x_d)).mean()
            return {"loss": ce + float(hp.beta) * kl, "ce": ce.detach(), "d": kl.detach(), "logits": logits.detach()}
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
        ce = F.cross_entropy(logits_ce, y, label_smoothing=smoothing)
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
        self.log("train/d", out["d"], prog_bar=self.hparams.mode in ("int", "int_adv", "trades"), batch_size=bs)
        self.log("train/eps", eps, batch_size=bs)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs)
        return out["loss"]

    def robust_meta(self) -> dict[str, Any]:
        """How the classifier was trained (stored as ``robust_training`` in its checkpoints and artifacts)."""
        hp, inner = self.hparams, self.inner
        return {"mode": hp.mode, "interpretation": hp.interpretation, "gamma": float(hp.gamma),
                "eps": float(inner.eps), "inner_steps": int(inner.steps), "inner_alpha": float(inner.alpha),
                "eps_ramp_epochs": float(inner.ramp_epochs), "ce_attack": hp.ce_attack,
                **({"beta": float(hp.beta)} if hp.mode == "trades" else {})}

    def artifact_meta(self) -> dict[str, Any]:
        return {**super().artifact_meta(), "robust_training": self.robust_meta()}


# --------------------------------------------------------------------------------------------- the defences
def _robust_defence(name: str, description: str) -> Defence:
    """A classifier trained by :class:`RobustClassifierModule` in mode ``name``, explained by CAM and GRAD."""
    return register_defence(Defence(name, description, trains="robust", module={"mode": name}, artifact=CLASSIFIER),
                            __name__)


register_defence(Defence("normal", "the plain classifier (cross-entropy training), explained by CAM and GRAD: the "
                                   "undefended reference."), __name__)
_robust_defence("pgd_at", "the classifier adversarially trained with PGD on the cross-entropy (Madry et al.; "
                          "RobustClassifierModule, mode pgd_at), explained by CAM and GRAD.")
_robust_defence("int_adv", "the classifier trained for interpretation robustness (Boopathy et al. ICML 2020: CE of a "
                           "PGD input + gamma x the worst-case CAM discrepancy; RobustClassifierModule, mode int_adv), "
                           "explained by CAM and GRAD.")
_robust_defence("trades", "the classifier trained with TRADES (Zhang et al. ICML 2019: CE of the clean input + beta x "
                          "KL(f(x) || f(x')), x' the PGD maximiser of the KL; RobustClassifierModule, mode trades), "
                          "explained by CAM and GRAD.")
