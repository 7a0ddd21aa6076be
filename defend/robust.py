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

``discrepancy=`` picks D: ``"normalised"`` (default) is the above; ``"reference"`` is Boopathy et al.'s D
(their ``train.py``): the RAW maps (no min-max), ``||.||_1`` the SUM of absolute differences over the map's pixels,
times the 1/2 of AdvEdge Eqn 20 (``D_ref = 1/2 (l1_y + sum_{j != y} w_j l1_j)``). ``gamma`` weighs D on that
scale: under ``"normalised"`` D lies in [0, 2] whatever the network; under ``"reference"`` D grows with the CAM's
magnitude and pixel count, and the reference's ``lam = 0.01`` on summed raw CAMs WITHOUT the 1/2 is ``gamma = 0.02``.

Modes (``mode=``) -- what each trains on (``x_d`` the D input, ``x_ce`` the CE input):

* ``"normal"``: ``CE(f(x), y)``.
* ``"pgd_at"``: Madry PGD adversarial training, ``CE(f(x_ce), y)``, ``x_ce`` the untargeted PGD maximiser of the CE.
* ``"int"``: ``CE(f(x), y) + gamma * D(x, x_d)``, ``x_d`` the PGD maximiser of D (Boopathy et al.'s Int).
* ``"int_adv"``: the TWO-input variant, ``CE(f(x_ce), y) + gamma * D(x, x_d)`` with ``x_d`` the D-maximiser and
  ``x_ce`` a separate CE-maximiser (``ce_attack: pgd``) or ``x_d`` itself (``ce_attack: interp``; that maximiser
  ignores the CE, so it is not the reference's either).
* ``"int_adv_single"``: the reference's Int-Adv (Boopathy et al.'s ``train_int`` with ``adv=True``): ONE input
  ``x'``, the PGD maximiser of ``CE(f(x'), y) + gamma * D(x, x')`` (:func:`ce_discrepancy_attack`), trained on
  ``CE(f(x'), y) + gamma * D(x, x')``.
* ``"trades"``: Zhang et al., ICML 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x'))``, ``x'`` the PGD maximiser of the
  KL started at ``x + 0.001 * N(0, 1)`` (:func:`trades_kl`, :func:`trades_attack`).
* ``"gaussian"``: Gaussian-noise data augmentation (Cohen, Rosenfeld and Kolter, ICML 2019, section 4: the base
  classifier of randomized smoothing), ``CE(f(x + n), y)``, ``n ~ N(0, noise.sigma^2 I)`` drawn afresh for every input
  of every batch and NOT clamped to [0, 1] (as the smoothed classifier :mod:`attacks.certify` certifies sees it;
  :func:`gaussian_noise`). No inner maximisation (``inner`` is unused).

``batchnorm=`` says which forwards BatchNorm learns from: ``"joint"`` (default) is one forward in train mode over
every input of the loss (``[x; x_d (; x_ce)]`` for the Int modes, ``x`` and ``x'`` for TRADES), while PGD-AT's sees
``x_ce`` only; ``"ce"`` gives every mode PGD-AT's treatment: the CE input's forward alone runs in train mode (batch
statistics, running-stat update) and the other forwards (D's ``x`` and ``x_d``, TRADES' ``x'``) run with BatchNorm
in eval mode (:func:`batchnorm_eval`). ``gaussian`` has one forward, of the noisy inputs: BatchNorm sees (and its running
statistics describe) noisy inputs only, the distribution the smoothed classifier is queried on; clean validation
inputs are classified with those statistics. A BatchNorm-free model (``model_options: {batchnorm: false}``, as the
reference's WResNet) needs neither.

Options: ``mode``, ``interpretation``, ``gamma``, ``ce_attack``, ``discrepancy`` and ``batchnorm`` next to the
classifier's options (:class:`~defend.classifier.ClassifierModule`, which this module extends), the inner
maximisations as one group (:class:`InnerMaximisation`: ``inner.eps``, ``inner.steps``, ``inner.alpha``,
``inner.ramp_epochs``, ``inner.random_start``), the noise of ``gaussian`` as another (:class:`NoiseAugmentation`:
``noise.sigma``) and the optimiser as a third (:class:`~defend.module_base.Optimiser`).

The inner maximisations run :func:`attacks.frameworks.pgd_maximise` (random start, input gradients only)
with the model in eval mode (restored afterwards). The outer loss is built from differentiable maps and
Lightning performs the ONE ordinary backward (DDP syncs once). No SyncBatchNorm (it has no double backward).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
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
    "MODES", "INTERPRETATION_MODES", "INTERPRETATIONS", "DISCREPANCIES", "BATCHNORMS", "RobustClassifierModule",
    "InnerMaximisation", "ROBUST_OPTIMISER", "class_maps", "maps_and_logits", "discrepancy", "discrepancy_l1_2class",
    "interpretation_discrepancy", "worst_case_discrepancy", "ce_discrepancy_attack", "pgd_ce_attack", "trades_kl",
    "trades_attack", "batchnorm_eval", "NoiseAugmentation", "gaussian_noise",
]

MODES = ("normal", "pgd_at", "int", "int_adv", "int_adv_single", "trades", "gaussian")
#: the modes that train against the interpretation discrepancy D (Boopathy et al.'s Int and Int-Adv, each variant)
INTERPRETATION_MODES = ("int", "int_adv", "int_adv_single")
#: the modes without an inner maximisation (``inner`` unused)
UNATTACKED = ("normal", "gaussian")
INTERPRETATIONS = ("cam", "grad")
#: the discrepancy D: ours (min-max maps, mean over pixels) or Boopathy et al.'s (raw maps, sum, Eqn 20's 1/2)
DISCREPANCIES = ("normalised", "reference")
#: which forwards BatchNorm learns from: all inputs of the loss in one batch, or the CE input's alone
BATCHNORMS = ("joint", "ce")


# --------------------------------------------------------------------------------------------- maps
#: the interpreters inside D: CAM at the feature grid; GRAD of the logit through the smooth ReLU-derivative
#: surrogate, so the map has a non-zero input and weight derivative
INTERPRETERS_IN_D = {"cam": CAMInterpreter, "grad": lambda: GradInterpreter(score="logit", surrogate_tau=1e-4)}


def check_discrepancy(kind: str) -> None:
    if kind not in DISCREPANCIES:
        raise ValueError(f"discrepancy must be one of {DISCREPANCIES}, got {kind!r}")


def maps_and_logits(model: GapClassifier, x: Tensor, interpretation: str = "cam",
                    kind: str = "normalised") -> tuple[Tensor, Tensor]:
    """Maps of every class ``[N, C, h, w]`` (the interpreter's :meth:`explain_classes`; min-max normalised per
    example and class when ``kind`` is ``"normalised"``, raw when ``"reference"``) and the logits ``[N, C]``; both
    differentiable in ``x`` (when it requires grad) and in the model's parameters."""
    if interpretation not in INTERPRETERS_IN_D:
        raise ValueError(f"interpretation must be one of {INTERPRETATIONS}, got {interpretation!r}")
    check_discrepancy(kind)
    graph = torch.is_grad_enabled()  # under no_grad (benign reference maps) no graph is recorded
    if interpretation == "grad":  # a gradient map needs autograd even for a reference map
        inp = x if x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            raw, logits = INTERPRETERS_IN_D["grad"]().explain_classes(model, inp, create_graph=True)
    else:
        raw, logits = INTERPRETERS_IN_D[interpretation]().explain_classes(model, x, create_graph=graph)
    maps = minmax(raw, start_dim=2) if kind == "normalised" else raw  # per example and class
    return maps, model(x) if logits is None else logits


def class_maps(model: GapClassifier, x: Tensor, interpretation: str = "cam", kind: str = "normalised") -> Tensor:
    """Maps of every class ``[N, C, h, w]`` (see :func:`maps_and_logits`)."""
    return maps_and_logits(model, x, interpretation, kind)[0]


def _class_l1(maps_x: Tensor, maps_adv: Tensor, kind: str) -> Tensor:
    """``||g_c(x) - g_c(x')||_1`` per example and class ``[N, C]``: the mean over pixels (``"normalised"``) or the
    sum (``"reference"``)."""
    diff = (maps_x - maps_adv).abs().flatten(2)
    return diff.mean(2) if kind == "normalised" else diff.sum(2)


def discrepancy(maps_x: Tensor, maps_adv: Tensor, logits_adv: Tensor, y: Tensor, kind: str = "normalised") -> Tensor:
    """``D`` per example ``[N]`` from all-class maps ``[N, C, h, w]`` of x and x' and the logits of x'.

    ``D = l1_y + sum_{j != y} w_j l1_j``, ``l1_c = mean_pixels |g_c(x) - g_c(x')|``,
    ``w_j = p_j / sum_{k != y} p_k`` with ``p = softmax(f(x'))`` (differentiable). ``kind="reference"`` (the maps
    then raw): ``l1_c`` sums over the pixels and D carries Eqn 20's 1/2 (module docstring).
    """
    check_discrepancy(kind)
    l1 = _class_l1(maps_x, maps_adv, kind)  # [N, C]
    p = logits_adv.softmax(1)
    true = F.one_hot(y, p.shape[1]).bool()
    p_other = p.masked_fill(true, 0.0)
    w = p_other / p_other.sum(1, keepdim=True).clamp_min(1e-12)
    d = l1.gather(1, y.view(-1, 1)).squeeze(1) + (w * l1).sum(1)
    return d if kind == "normalised" else 0.5 * d


def interpretation_discrepancy(model: GapClassifier, x: Tensor, x_adv: Tensor, y: Tensor,
                               interpretation: str = "cam", kind: str = "normalised") -> Tensor:
    """``D(x, x_adv)`` per example for labels ``y`` (differentiable in ``x_adv`` and the model)."""
    maps_x, _ = maps_and_logits(model, x, interpretation, kind)
    maps_a, logits_a = maps_and_logits(model, x_adv, interpretation, kind)
    return discrepancy(maps_x, maps_a, logits_a, y, kind)


def discrepancy_l1_2class(model: GapClassifier, x: Tensor, x_adv: Tensor, y: Tensor, y_t: Tensor,
                          interpretation: str = "cam", kind: str = "normalised") -> Tensor:
    """AdvEdge Eqn 20: ``1/2 (||g_y(x) - g_y(x')||_1 + ||g_yt(x) - g_yt(x')||_1)`` per example ``[N]``.

    Same maps and L1 as :func:`discrepancy` of the same ``kind``; ``y_t`` is the attacker's target (or any second
    class).
    """
    maps_x, _ = maps_and_logits(model, x, interpretation, kind)
    maps_a, _ = maps_and_logits(model, x_adv, interpretation, kind)
    l1 = _class_l1(maps_x, maps_a, kind)
    return 0.5 * (l1.gather(1, y.view(-1, 1)).squeeze(1) + l1.gather(1, y_t.view(-1, 1)).squeeze(1))


# --------------------------------------------------------------------------------------------- inner attacks
def _discrepancy_ascent(model: GapClassifier, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
                        interpretation: str, kind: str, ce_weight: float | None, random_start: bool,
                        generator: torch.Generator | None) -> Tensor:
    """PGD (``pgd_maximise``) ascent on ``D(x, x')`` (``ce_weight`` None) or on ``CE(f(x'), y) + ce_weight *
    D(x, x')``; the benign maps are computed once. Returns the detached ``x'``."""
    with torch.no_grad() if interpretation == "cam" else torch.enable_grad():
        maps_x = class_maps(model, x.detach(), interpretation, kind).detach()

    def loss_fn(z: Tensor) -> Tensor:
        maps_z, logits_z = maps_and_logits(model, z, interpretation, kind)
        d = discrepancy(maps_x, maps_z, logits_z, y, kind)
        return d if ce_weight is None else F.cross_entropy(logits_z, y, reduction="none") + ce_weight * d

    return pgd_maximise(loss_fn, x, eps, alpha, steps, random_start=random_start, generator=generator)


def worst_case_discrepancy(model: GapClassifier, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
                           interpretation: str = "cam", random_start: bool = True,
                           generator: torch.Generator | None = None, kind: str = "normalised") -> Tensor:
    """PGD (``pgd_maximise``) ascent on ``D(x, x')`` in the L-inf ball; returns the detached ``x'``.

    The model's train/eval flags are left as they are (callers put it in eval mode); only input
    gradients are taken, so nothing lands in the parameters' ``.grad``. The benign maps are computed once.
    """
    return _discrepancy_ascent(model, x, y, eps, alpha, steps, interpretation, kind, None, random_start, generator)


def ce_discrepancy_attack(model: GapClassifier, x: Tensor, y: Tensor, gamma: float, eps: float, alpha: float,
                          steps: int, interpretation: str = "cam", random_start: bool = True,
                          generator: torch.Generator | None = None, kind: str = "normalised") -> Tensor:
    """The reference's Int-Adv inner maximisation (Boopathy et al.'s ``train_int``, ``adv=True``): PGD ascent on
    ``CE(f(x'), y) + gamma * D(x, x')`` per example in the L-inf ball; returns the detached ``x'`` (flags and
    gradients as :func:`worst_case_discrepancy`)."""
    return _discrepancy_ascent(model, x, y, eps, alpha, steps, interpretation, kind, float(gamma), random_start,
                               generator)


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


@contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """``model``'s BatchNorm layers in eval mode meanwhile (running statistics used, not updated; every other
    layer, e.g. dropout, keeps its mode); their flags restored afterwards."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flags = [m.training for m in norms]
    try:
        for m in norms:
            m.eval()
        yield
    finally:
        for m, flag in zip(norms, flags):
            m.train(flag)


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


@dataclass(frozen=True)
class NoiseAugmentation:
    """The Gaussian noise of mode ``gaussian`` (Cohen et al. 2019).

    Args:
        sigma: standard deviation of the noise in image units (images in [0, 1]); the smoothed classifier is certified
            at the same sigma (Cohen et al. train and certify at 0.12, 0.25, 0.5, 1.0).
    """

    sigma: float = 0.25

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"noise.sigma must be > 0 (the standard deviation of the training noise, e.g. 0.25), got "
                             f"{self.sigma}")


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``x + n``, ``n ~ N(0, sigma^2 I)`` drawn from ``generator`` (the global stream when None), not clamped to
    [0, 1] (randomized smoothing's noise, Cohen et al. 2019); detached."""
    n = torch.randn(x.shape, generator=generator, device=x.device if generator is None else generator.device,
                    dtype=x.dtype)
    return x.detach() + float(sigma) * n.to(x.device)


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
        mode: ``"normal"``, ``"pgd_at"``, ``"int"``, ``"int_adv"`` (two adversarial inputs), ``"int_adv_single"``
            (one, the reference's ``train_int``), ``"trades"`` or ``"gaussian"`` (noise augmentation; module
            docstring).
        interpretation: ``"cam"`` or ``"grad"`` (maps inside D).
        gamma: weight of the worst-case discrepancy D, on D's scale (``discrepancy``; the reference's 0.01 on summed
            raw CAMs is 0.02 with ``discrepancy: reference``).
        ce_attack: in ``int_adv``, the adversarial CE input: ``"pgd"`` a separate untargeted PGD on the CE
            (default), ``"interp"`` reuse the D-maximising input (half the cost).
        beta: in ``trades``, the weight of the KL term (Zhang et al.: 6; 1 / lambda in their notation).
        discrepancy: ``"normalised"`` (min-max maps, mean over pixels) or ``"reference"`` (Boopathy et al.: raw
            maps, summed, with Eqn 20's 1/2), in training and in the inner maximisations.
        batchnorm: ``"joint"`` (one train-mode forward over every input of the loss) or ``"ce"`` (the CE input's
            forward alone trains BatchNorm, as in ``pgd_at``; the other forwards use its running statistics).
        inner: the inner maximisations (radius, steps, step size, radius ramp, random start; ``trades`` always
            starts at ``x + 0.001 N(0, 1)``).
        noise: in ``gaussian``, the training noise (:class:`NoiseAugmentation`: ``noise.sigma``).
        optimiser: the optimiser and its learning-rate schedule (default: Adam, lr 0.001, constant).
        label_smoothing: label smoothing of the outer cross-entropy.
        init_from: classifier artifact or Lightning checkpoint to start from (fine-tune a trained classifier to be
            interpretation-robust; loaded with ``weights_only``, same architecture and options required).
        new_head: with ``init_from``, start a fresh linear head when the checkpoint has another class count.
    """

    def __init__(self, arch: str = "small_cnn", num_classes: int = 10, model_options: dict[str, Any] | None = None,
                 mode: str = "int_adv", interpretation: str = "cam", gamma: float = 0.01, ce_attack: str = "pgd",
                 beta: float = 6.0, discrepancy: str = "normalised", batchnorm: str = "joint",
                 inner: InnerMaximisation = InnerMaximisation(), noise: NoiseAugmentation = NoiseAugmentation(),
                 optimiser: Optimiser = ROBUST_OPTIMISER,
                 label_smoothing: float = 0.0, init_from: str | None = None, new_head: bool = False) -> None:
        inner = as_options(inner, InnerMaximisation(), "inner")
        noise = as_options(noise, NoiseAugmentation(), "noise")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if interpretation not in INTERPRETATIONS:
            raise ValueError(f"interpretation must be one of {INTERPRETATIONS}, got {interpretation!r}")
        if ce_attack not in ("pgd", "interp"):
            raise ValueError(f"ce_attack must be 'pgd' or 'interp', got {ce_attack!r}")
        check_discrepancy(discrepancy)
        if batchnorm not in BATCHNORMS:
            raise ValueError(f"batchnorm must be one of {BATCHNORMS} (which forwards train BatchNorm), got "
                             f"{batchnorm!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0 (the weight of the worst-case discrepancy), got {gamma}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0 (the weight of TRADES' KL term), got {beta}")
        if mode not in UNATTACKED and (inner.eps <= 0 or inner.steps < 1):
            raise ValueError(f"mode {mode!r} needs inner.eps > 0 and inner.steps >= 1 (or mode: normal)")
        super().__init__(arch=arch, num_classes=num_classes, model_options=model_options, optimiser=optimiser,
                         label_smoothing=label_smoothing, init_from=init_from, new_head=new_head)
        self.inner, self.noise = inner, noise
        self.save_options(mode=mode, interpretation=interpretation, gamma=gamma, ce_attack=ce_attack, beta=beta,
                          discrepancy=discrepancy, batchnorm=batchnorm, inner=inner, noise=noise)

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
        when nothing is attacked; ``gaussian``: ``x_ce`` is ``x`` plus noise from ``generator``);
        the model is in eval mode meanwhile (its flags restored afterwards)."""
        hp, inner = self.hparams, self.inner
        x_d = x_ce = x
        if hp.mode == "gaussian":
            return x_d, gaussian_noise(x, self.noise.sigma, generator)
        if hp.mode == "normal" or eps <= 0:
            return x_d, x_ce
        alpha = float(inner.alpha) * eps / float(inner.eps)
        with eval_mode(self.model):
            if hp.mode == "trades":
                x_d = trades_attack(self.model, x, eps, alpha, inner.steps, generator)
            if hp.mode in ("int", "int_adv"):
                x_d = worst_case_discrepancy(self.model, x, y, eps, alpha, inner.steps, hp.interpretation,
                                             inner.random_start, generator, hp.discrepancy)
            if hp.mode == "int_adv_single":
                x_d = x_ce = ce_discrepancy_attack(self.model, x, y, float(hp.gamma), eps, alpha, inner.steps,
                                                   hp.interpretation, inner.random_start, generator, hp.discrepancy)
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
        KL; 0 when unused) and ``logits`` of the CE input (for accuracy; ``gaussian``: of the noisy input).
        ``generator`` draws the inner attacks' random starts and ``gaussian``'s noise (the global stream when None).
        """
        hp = self.hparams
        eps = float(self.inner.eps) if eps is None else float(eps)
        x = x.detach()
        x_d, x_ce = self._inner_inputs(x, y, eps, generator)
        if hp.mode in ("normal", "pgd_at", "gaussian"):
            logits = self.model(x_ce)
            ce = F.cross_entropy(logits, y, label_smoothing=float(hp.label_smoothing))
            return {"loss": ce, "ce": ce.detach(), "d": x.new_zeros(()), "logits": logits.detach()}
        if hp.mode == "trades":
            return self._trades_loss(x, x_d, y)
        return self._discrepancy_loss(x, x_d, x_ce, y)

    def _other_forwards(self) -> AbstractContextManager[None]:
        """The context of the forwards that are not the CE input's: BatchNorm in eval mode under ``batchnorm: ce``
        (running statistics, no update); under ``joint`` nothing changes (the current mode)."""
        return batchnorm_eval(self.model) if self.hparams.batchnorm == "ce" else nullcontext()

    def _trades_loss(self, x: Tensor, x_d: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``CE(f(x), y) + beta * KL(f(x) || f(x_d))``: two forwards, ``x_d``'s under :meth:`_other_forwards` (with
        ``joint`` both in the current (train) mode, as the reference implementation)."""
        hp = self.hparams
        logits = self.model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=float(hp.label_smoothing))
        with self._other_forwards():
            logits_d = self.model(x_d)
        kl = trades_kl(logits, logits_d).mean()
        return {"loss": ce + float(hp.beta) * kl, "ce": ce.detach(), "d": kl.detach(), "logits": logits.detach()}

    def _discrepancy_loss(self, x: Tensor, x_d: Tensor, x_ce: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``int`` / ``int_adv`` / ``int_adv_single``: ``CE(f(x_ce), y) + gamma * D(x, x_d)``. ``batchnorm: joint``:
        one forward over ``[x; x_d (; x_ce)]`` in the current (train) mode; ``ce``: the CE forward of ``x_ce`` alone,
        then D's forward of ``[x; x_d]`` with BatchNorm in eval mode -- D is then measured on the network that is
        explained and attacked, and BatchNorm learns from the CE input only, as in ``pgd_at``."""
        hp, n = self.hparams, x.shape[0]
        if hp.batchnorm == "ce":
            logits_ce = self.model(x_ce)
            with self._other_forwards():
                maps_x, maps_d, logits_all = self._maps_of(x, x_d, None)
        else:
            separate_ce = hp.mode == "int_adv" and x_ce is not x_d
            maps_x, maps_d, logits_all = self._maps_of(x, x_d, x_ce if separate_ce else None)
            logits_ce = logits_all[:n] if hp.mode == "int" else (logits_all[2 * n:] if separate_ce
                                                                 else logits_all[n:2 * n])
        d = discrepancy(maps_x, maps_d, logits_all[n:2 * n], y, hp.discrepancy).mean()
        ce = F.cross_entropy(logits_ce, y, label_smoothing=float(hp.label_smoothing))
        loss = ce + float(hp.gamma) * d
        return {"loss": loss, "ce": ce.detach(), "d": d.detach(), "logits": logits_ce.detach()}

    def _maps_of(self, x: Tensor, x_d: Tensor, x_ce: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """All-class maps of ``x`` and ``x_d`` (D's ``kind``) and the logits of one forward over ``[x; x_d (; x_ce)]``
        (GRAD maps take their own passes)."""
        n, kind = x.shape[0], self.hparams.discrepancy
        batch = torch.cat([x, x_d] if x_ce is None else [x, x_d, x_ce])
        if self.hparams.interpretation == "cam":
            maps, logits_all = maps_and_logits(self.model, batch, "cam", kind)
            return maps[:n], maps[n:2 * n], logits_all
        logits_all = self.model(batch)
        return class_maps(self.model, x, "grad", kind), class_maps(self.model, x_d, "grad", kind), logits_all

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
        self.log("train/d", out["d"], prog_bar=self.hparams.mode not in ("normal", "pgd_at", "gaussian"),
                 batch_size=bs)
        self.log("train/eps", eps, batch_size=bs)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs)
        return out["loss"]

    def robust_meta(self) -> dict[str, Any]:
        """How the classifier was trained (stored as ``robust_training`` in its checkpoints and artifacts)."""
        hp, inner = self.hparams, self.inner
        return {"mode": hp.mode, "interpretation": hp.interpretation, "gamma": float(hp.gamma),
                "eps": float(inner.eps), "inner_steps": int(inner.steps), "inner_alpha": float(inner.alpha),
                "eps_ramp_epochs": float(inner.ramp_epochs), "ce_attack": hp.ce_attack,
                "discrepancy": hp.discrepancy, "batchnorm": hp.batchnorm,
                **({"beta": float(hp.beta)} if hp.mode == "trades" else {}),
                **({"sigma": float(self.noise.sigma)} if hp.mode == "gaussian" else {})}

    def artifact_meta(self) -> dict[str, Any]:
        return {**super().artifact_meta(), "robust_training": self.robust_meta()}


# --------------------------------------------------------------------------------------------- the defences
def _robust_defence(name: str, description: str, module: dict[str, Any] | None = None) -> Defence:
    """A classifier trained by :class:`RobustClassifierModule` with ``module`` (default: mode ``name``), explained by
    CAM and GRAD."""
    return register_defence(Defence(name, description, trains="robust", module=module or {"mode": name},
                                    artifact=CLASSIFIER), __name__)


register_defence(Defence("normal", "the plain classifier (cross-entropy training), explained by CAM and GRAD: the "
                                   "undefended reference."), __name__)
_robust_defence("pgd_at", "the classifier adversarially trained with PGD on the cross-entropy (Madry et al.; "
                          "RobustClassifierModule, mode pgd_at), explained by CAM and GRAD.")
_robust_defence("int_adv", "the classifier trained for interpretation robustness with TWO adversarial inputs (after "
                           "Boopathy et al. ICML 2020: CE of a PGD input + gamma x the worst-case CAM discrepancy of "
                           "another; RobustClassifierModule, mode int_adv), explained by CAM and GRAD.")
_robust_defence("int_adv_single", "the classifier trained for interpretation robustness as Boopathy et al. ICML 2020 "
                                  "define Int-Adv (their train_int: CE + gamma x D on ONE adversarial input, the "
                                  "maximiser of that same sum; RobustClassifierModule, mode int_adv_single), "
                                  "explained by CAM and GRAD.")
_robust_defence("trades", "the classifier trained with TRADES (Zhang et al. ICML 2019: CE of the clean input + beta x "
                          "KL(f(x) || f(x')), x' the PGD maximiser of the KL; RobustClassifierModule, mode trades), "
                          "explained by CAM and GRAD.")
_robust_defence("gaussian_aug", "the classifier trained with Gaussian noise augmentation at sigma (Cohen, Rosenfeld and "
                                "Kolter ICML 2019: CE of x + N(0, sigma^2 I), unclamped; RobustClassifierModule, mode "
                                "gaussian, noise.sigma 0.25 unless the config says), explained by CAM and GRAD; its "
                                "smoothed version is certified.",
                {"mode": "gaussian", "noise": {"sigma": 0.25}})
