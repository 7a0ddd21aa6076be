"""Randomized-smoothing certificates for an interpretable system: the prediction and the sparsified map.

**Prediction** (Cohen, Rosenfeld and Kolter, ICML 2019, CERTIFY): the smoothed classifier returns the class the base
classifier ``f`` gives most often under Gaussian noise ``N(0, sigma^2 I)``. :func:`certify_prediction` selects the class
``c_A`` with ``n0`` noise samples, counts it on ``n`` fresh samples, bounds ``p_A`` below by the one-sided
Clopper-Pearson bound at ``1 - alpha`` and certifies the L2 radius ``sigma * Phi^-1(p_lower)``; it abstains (class -1,
radius 0) when ``p_lower <= 1/2`` (so two classes that tie in the estimation always abstain).

**Map** (Anani, Lorenz, Fritz and Schiele, ICML 2025: Fischer et al.'s certified segmentation applied to the
sparsified map): each pixel has the binary label "in the top-k % of g's map of ``target``" (ties broken by the lower
flat index); :func:`certify_map` selects each pixel's label by the majority of ``n0`` samples, bounds the frequency of
that label on ``n`` fresh samples by Clopper-Pearson and corrects for the ``h * w`` tests of an input by Bonferroni or
Holm (:func:`certify_map` says how; the radii always from the simultaneous Bonferroni bounds); a pixel that is not
certified abstains (radius 0).

The noise is added to ``x`` WITHOUT clamping to [0, 1] (as Cohen et al. do: the guarantee is about the Gaussian
smoothing of ``f`` over all of R^d) and is drawn from ``generator`` (a ``torch.Generator`` on ``x``'s device; ``None``
uses torch's global RNG), so one seed fixes every draw. Each forward pass takes ``samples_per_batch`` noisy copies of
every input of ``x`` (a batch of ``len(x) * samples_per_batch`` images: split ``x`` to bound memory); counts stay on
the device, with no host sync inside the sampling loop. The draws depend on the chunking: the same seed with another
``samples_per_batch`` gives other (equally distributed) noise, so record both. Radii are L2 in image units; an L-inf
ball of radius ``eps`` lies inside the L2 ball of radius ``eps * sqrt(d)``.

:func:`smoothed_l2_attack` and :func:`check_certificates` are the empirical check: an attack against the smoothed
system with fixed noise that, below the certified radius, must never change a certified label or flip a certified
pixel. :class:`SmoothedLogits` makes the fixed-noise smoothed classifier a model, so any attack taking a model (the C&W
framework: ``attacks.build_attack("pgd", "cw", None)``) attacks it too.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from .checks import check_images, check_positive
from .interpreters import Interpreter
from .state import eval_mode, frozen

__all__ = ["PredictionCertificate", "MapCertificate", "CertificateCheck", "SmoothedLogits",
           "clopper_pearson_lower", "prediction_counts", "topk_counts", "certify_prediction", "certify_map",
           "dual_radius", "certified_accuracy", "smoothed_l2_attack", "project_l2", "check_certificates",
           "CORRECTIONS"]

#: the multiple-testing corrections over the pixels of one map
CORRECTIONS = ("bonferroni", "holm")


@dataclass(frozen=True)
class PredictionCertificate:
    """CERTIFY's answer per input (:func:`certify_prediction`)."""

    prediction: Tensor  # [N] long: the certified class, -1 where CERTIFY abstains
    radius: Tensor      # [N] float: sigma * Phi^-1(p_lower) (L2, image units), 0.0 where it abstains
    p_lower: Tensor     # [N] float: the one-sided Clopper-Pearson lower bound of p_A at level 1 - alpha
    counts: Tensor      # [N, K] long: the estimation counts (n samples)


@dataclass(frozen=True)
class MapCertificate:
    """The per-pixel certificate of the sparsified map (:func:`certify_map`)."""

    in_topk: Tensor     # [N, h, w] bool: each pixel's selected label (majority of the n0 selection samples)
    certified: Tensor   # [N, h, w] bool: the pixel's label is certified (p_lower > 1/2 after the correction)
    radius: Tensor      # [N, h, w] float: sigma * Phi^-1(p_lower) where certified, else 0.0
    p_lower: Tensor     # [N, h, w] float
    correction: str     # "bonferroni" or "holm"


# ----------------------------------------------------------------------------------------------------- statistics
def clopper_pearson_lower(successes: Tensor, n: int, alpha: float | Tensor) -> Tensor:
    """The one-sided ``1 - alpha`` Clopper-Pearson lower bound of a binomial proportion from ``successes`` out of
    ``n``: ``scipy.stats.beta.ppf(alpha, k, n - k + 1)``, 0 where ``k = 0`` (Cohen et al.'s ``LowerConfBound``,
    ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``). ``alpha`` may be a tensor broadcasting against
    ``successes`` (per-test levels). Float64 on ``successes``' device."""
    k = successes.detach().cpu().double().numpy()
    a = alpha.detach().cpu().double().numpy() if isinstance(alpha, Tensor) else np.float64(alpha)
    if n < 1:
        raise ValueError(f"the number of samples n must be >= 1, got {n}")
    if k.size and (k.min() < 0 or k.max() > n):
        raise ValueError(f"successes must lie in [0, n={n}], got [{k.min():g}, {k.max():g}]")
    if np.size(a) and (np.min(a) <= 0 or np.max(a) >= 1):
        raise ValueError(f"alpha must lie in (0, 1), got [{np.min(a):g}, {np.max(a):g}]")
    with np.errstate(invalid="ignore", divide="ignore"):
        low = stats.beta.ppf(a, np.maximum(k, 1), n - k + 1)
    return torch.from_numpy(np.where(k == 0, 0.0, low)).to(successes.device)


def _radius(sigma: float, p_lower: Tensor, keep: Tensor) -> Tensor:
    """``sigma * Phi^-1(p_lower)`` where ``keep``, else 0 (scipy's ``norm.ppf``)."""
    r = torch.from_numpy(sigma * stats.norm.ppf(p_lower.detach().cpu().numpy())).to(p_lower.device)
    return torch.where(keep, r, torch.zeros_like(r))


def _holm(pvalues: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down over the last axis of ``pvalues`` ``[N, m]``: ``(rejected, level)`` where ``level`` is each
    test's Holm level ``alpha / (m - i + 1)`` at its rank ``i`` (equal p-values share the level of their first rank,
    so the order among ties does not matter; step-down rejects all or none of them anyway)."""
    m = pvalues.shape[1]
    order = np.argsort(pvalues, axis=1, kind="stable")
    ranked = np.take_along_axis(pvalues, order, axis=1)
    first = np.stack([np.searchsorted(row, row, side="left") for row in ranked])  # 0-based first rank of each value
    level_ranked = alpha / (m - first)
    rejected_ranked = np.cumprod(ranked < level_ranked, axis=1).astype(bool)
    rejected, level = np.empty_like(rejected_ranked), np.empty_like(level_ranked)
    np.put_along_axis(rejected, order, rejected_ranked, axis=1)
    np.put_along_axis(level, order, level_ranked, axis=1)
    return rejected, level


# ----------------------------------------------------------------------------------------------------- sampling
def _check_run(x: Tensor, sigma: float, n: int, samples_per_batch: int, generator: torch.Generator | None) -> None:
    """One-line errors for bad inputs, before any forward pass."""
    check_images(x)
    check_positive(sigma, "sigma")
    if n < 1 or samples_per_batch < 1:
        raise ValueError(f"the sample counts must be >= 1, got n={n} and samples_per_batch={samples_per_batch}")
    if generator is not None and torch.device(generator.device).type != x.device.type:
        raise ValueError(f"the generator is on {generator.device} but the inputs are on {x.device}; "
                         f"pass torch.Generator(device={str(x.device)!r})")


def _noisy_chunks(x: Tensor, sigma: float, n: int, samples_per_batch: int,
                  generator: torch.Generator | None) -> Iterator[tuple[int, Tensor]]:
    """``(b, xs)`` per chunk: ``xs`` ``[b * N, C, H, W]`` holds ``b`` noisy copies of every input (copy-major:
    row ``s * N + i`` is input ``i``'s copy ``s``), unclamped, until ``n`` copies of each were drawn."""
    done = 0
    while done < n:
        b = min(samples_per_batch, n - done)
        noise = torch.randn((b, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        yield b, (x.unsqueeze(0) + sigma * noise).flatten(0, 1)
        done += b


def prediction_counts(model: nn.Module, x: Tensor, sigma: float, n: int, *, samples_per_batch: int = 1000,
                      generator: torch.Generator | None = None) -> Tensor:
    """``[N, K]`` long: how many of ``n`` noisy copies of each input ``model`` puts in each class (module docstring
    for the noise and the batching)."""
    _check_run(x, sigma, n, samples_per_batch, generator)
    counts = None
    with eval_mode(model), torch.no_grad():
        for b, xs in _noisy_chunks(x, sigma, n, samples_per_batch, generator):
            logits = model(xs)
            if counts is None:
                counts = torch.zeros(x.shape[0], logits.shape[1], dtype=torch.long, device=x.device)
            pred = logits.argmax(1).view(b, x.shape[0]).T
            counts.scatter_add_(1, pred, torch.ones_like(pred))
    return counts


def _target(x: Tensor, target: Tensor | int) -> Tensor:
    """The explained class per input, validated in shape."""
    if isinstance(target, int):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"target must be an int or one class per input ({x.shape[0]}), got shape {tuple(target.shape)}")
    return target.to(x.device).long()


def _top_count(h: int, w: int, k_percent: float) -> int:
    """The number of top-k pixels of an ``h x w`` map: ``round(k_percent % of h * w)``, at least one."""
    if not 0 < k_percent <= 100:
        raise ValueError(f"k_percent must lie in (0, 100], got {k_percent}")
    return max(1, round(k_percent / 100 * h * w))


def topk_counts(model: nn.Module, interpreter: Interpreter, x: Tensor, target: Tensor | int, sigma: float, n: int,
                k_percent: float, *, samples_per_batch: int = 100,
                generator: torch.Generator | None = None) -> Tensor:
    """``[N, h, w]`` long: how many of ``n`` noisy copies put each pixel in the top ``k_percent`` % of
    ``interpreter``'s map of ``target`` (the map on the input grid; ties broken by the lower flat index)."""
    _check_run(x, sigma, n, samples_per_batch, generator)
    target = _target(x, target)
    h, w = x.shape[-2:]
    k = _top_count(h, w, k_percent)
    counts = torch.zeros(x.shape[0], h * w, dtype=torch.long, device=x.device)
    with frozen(model):
        for b, xs in _noisy_chunks(x, sigma, n, samples_per_batch, generator):
            maps = interpreter.map(model, xs, target.repeat(b)).detach().flatten(1)
            idx = torch.sort(maps, dim=1, descending=True, stable=True).indices[:, :k]
            top = torch.zeros_like(maps, dtype=torch.long).scatter_(1, idx, 1)
            counts += top.view(b, x.shape[0], h * w).sum(0)
    return counts.view(x.shape[0], h, w)


# ----------------------------------------------------------------------------------------------------- certificates
def _check_levels(n0: int, n: int, alpha: float) -> None:
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be >= 1, got n0={n0} and n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def certify_prediction(model: nn.Module, x: Tensor, sigma: float, n0: int, n: int, alpha: float, *,
                       samples_per_batch: int = 1000,
                       generator: torch.Generator | None = None) -> PredictionCertificate:
    """Cohen et al.'s CERTIFY for every input of ``x``: ``c_A`` = the most frequent class of ``n0`` selection
    samples (ties: the lower class), ``p_lower`` = Clopper-Pearson at ``1 - alpha`` on ``c_A``'s count among ``n``
    fresh samples, radius ``sigma * Phi^-1(p_lower)``; abstain (-1, radius 0) where ``p_lower <= 1/2``."""
    _check_levels(n0, n, alpha)
    _check_run(x, sigma, n, samples_per_batch, generator)
    c_a = prediction_counts(model, x, sigma, n0, samples_per_batch=samples_per_batch, generator=generator).argmax(1)
    counts = prediction_counts(model, x, sigma, n, samples_per_batch=samples_per_batch, generator=generator)
    p_lower = clopper_pearson_lower(counts.gather(1, c_a.view(-1, 1)).squeeze(1), n, alpha)
    ok = p_lower > 0.5
    return PredictionCertificate(torch.where(ok, c_a, torch.full_like(c_a, -1)), _radius(sigma, p_lower, ok),
                                 p_lower, counts)


def _map_bounds(selected: np.ndarray, n: int, alpha: float, correction: str) -> tuple[np.ndarray, np.ndarray]:
    """``(certified, level)`` ``[N, m]`` for the counts ``selected`` of each pixel's selected label: Bonferroni
    tests every pixel at ``alpha / m``; Holm steps down on the exact binomial p-values of H0: p <= 1/2."""
    m = selected.shape[1]
    pvalues = stats.binom.sf(selected - 1, n, 0.5)  # P(Bin(n, 1/2) >= k)
    if correction == "bonferroni":
        return pvalues < alpha / m, np.full(selected.shape, alpha / m)
    return _holm(pvalues, alpha)


def certify_map(model: nn.Module, interpreter: Interpreter, x: Tensor, target: Tensor | int, sigma: float, n0: int,
                n: int, alpha: float, k_percent: float, *, correction: str = "holm", samples_per_batch: int = 100,
                generator: torch.Generator | None = None) -> MapCertificate:
    """The per-pixel certificate of the smoothed sparsified map: each pixel's label ("in the top ``k_percent`` % of
    g's map of ``target``" or not) is the majority of ``n0`` selection samples (a tie selects "not in"), its
    frequency on ``n`` fresh samples is bounded below by Clopper-Pearson, and the ``m = h * w`` tests of an input are
    corrected (the family-wise error of an input's certified pixels is at most ``alpha``):

    - ``"bonferroni"``: every pixel at level ``alpha / m``; certified where ``p_lower > 1/2``.
    - ``"holm"``: Holm's step-down on the exact one-sided binomial p-values of H0: p <= 1/2 decides which labels are
      certified (every pixel Bonferroni certifies, and more).

    With either correction ``p_lower`` and the radius come from the bound at ``alpha / m``: Bonferroni's bounds hold
    for all ``m`` pixels at once, so every radius is valid together with the others (Holm's step-down levels give no
    simultaneous confidence bounds, so a radius read at a pixel's Holm level would not be). A label Holm certifies
    whose Bonferroni bound is not above 1/2 is certified at the input itself only (radius 0).

    An uncertified pixel abstains: ``certified`` False, radius 0."""
    _check_levels(n0, n, alpha)
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {list(CORRECTIONS)}")
    _check_run(x, sigma, n, samples_per_batch, generator)
    kw = {"samples_per_batch": samples_per_batch, "generator": generator}
    in_topk = topk_counts(model, interpreter, x, target, sigma, n0, k_percent, **kw) * 2 > n0
    counts = topk_counts(model, interpreter, x, target, sigma, n, k_percent, **kw)
    selected = torch.where(in_topk, counts, n - counts)
    flat = selected.flatten(1).cpu().numpy()
    certified, _ = _map_bounds(flat, n, alpha, correction)
    p_lower = clopper_pearson_lower(selected.flatten(1), n, alpha / flat.shape[1]).view(selected.shape)
    ok = torch.from_numpy(certified).to(x.device).view(selected.shape)
    return MapCertificate(in_topk, ok, _radius(sigma, p_lower, ok & (p_lower > 0.5)), p_lower, correction)


def dual_radius(pred: PredictionCertificate, maps: MapCertificate, share: float = 0.9) -> Tensor:
    """``[N]``: the smaller of the prediction radius and the map radius, the largest ``r`` such that at least
    ``share`` of the input's selected top-k pixels (``maps.in_topk``) are certified at radius ``>= r`` (0 where fewer
    than ``share`` are certified at all, or no pixel is selected); 0 where the prediction abstains."""
    if not 0 < share <= 1:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    radii = torch.where(maps.in_topk, maps.radius, torch.full_like(maps.radius, -1.0)).flatten(1)
    ranked = torch.sort(radii, dim=1, descending=True).values
    size = maps.in_topk.flatten(1).sum(1)
    need = torch.ceil(size.double() * share - 1e-9).long().clamp_min(1)
    at = ranked.gather(1, (need - 1).clamp(max=radii.shape[1] - 1).view(-1, 1)).squeeze(1).clamp_min(0.0)
    map_r = torch.where(size > 0, at, torch.zeros_like(at))
    return torch.where(pred.prediction >= 0, torch.minimum(pred.radius.to(map_r.dtype), map_r), torch.zeros_like(map_r))


def certified_accuracy(radius: Tensor, correct: Tensor, radii: Sequence[float]) -> Tensor:
    """``[len(radii)]``: the share of inputs that are ``correct`` (certified class = label; an abstention is never
    correct) with a certified radius ``>= r``, at each ``r`` (Cohen et al.'s certified test accuracy)."""
    if radius.shape != correct.shape or radius.dim() != 1 or radius.numel() == 0:
        raise ValueError(f"radius and correct must be non-empty vectors of one length, got shapes "
                         f"{tuple(radius.shape)} and {tuple(correct.shape)}")
    r = torch.as_tensor(list(radii), dtype=radius.dtype, device=radius.device)
    return ((radius.unsqueeze(0) >= r.unsqueeze(1)) & correct.bool().unsqueeze(0)).double().mean(1)


# ----------------------------------------------------------------------------------------------------- the empirical check
class SmoothedLogits(nn.Module):
    """The smoothed classifier with FIXED noise as a model: ``forward(x)`` = log of the mean softmax of ``model``
    over ``x + sigma * noise[s]`` (``noise`` ``[S, C, H, W]`` unit-normal draws), so any attack that takes a model
    (e.g. C&W: ``attacks.build_attack("pgd", "cw", None)``) attacks the smoothed system."""

    def __init__(self, model: nn.Module, noise: Tensor, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma
        self.register_buffer("noise", noise.detach())
        if hasattr(model, "num_classes"):
            self.num_classes = model.num_classes

    def forward(self, x: Tensor) -> Tensor:
        s = self.noise.shape[0]
        xs = (x.unsqueeze(0) + self.sigma * self.noise.unsqueeze(1)).flatten(0, 1)
        logp = F.log_softmax(self.model(xs), 1).view(s, x.shape[0], -1)
        return torch.logsumexp(logp, 0) - math.log(s)


def project_l2(x: Tensor, x_adv: Tensor, radius: Tensor) -> Tensor:
    """``x_adv`` brought into the L2 ball of per-input ``radius`` around ``x`` (scaled toward ``x``) and [0, 1]."""
    delta = (x_adv - x).flatten(1)
    scale = (radius.to(delta.dtype) / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return (x + (delta * scale.unsqueeze(1)).view_as(x)).clamp(0, 1)


def _topk_mass_loss(model: nn.Module, interpreter: Interpreter, xs: Tensor, target: Tensor, pixels: Tensor,
                    s: int) -> Tensor:
    """``[N]``: the mean over the ``s`` noisy copies of the normalised map's mass on ``pixels``."""
    m = interpreter.attack_map(model, xs, target.repeat(s)).flatten(1)
    mass = (m * pixels.flatten(1).repeat(s, 1)).sum(1) / m.sum(1).clamp_min(1e-12)
    return mass.view(s, -1).mean(0)


def _clean_topk(model: nn.Module, interpreter: Interpreter, x: Tensor, target: Tensor, k_percent: float) -> Tensor:
    """``[N, H, W]`` bool: the top ``k_percent`` % pixels of the noise-free map of ``target`` (ties: lower index)."""
    h, w = x.shape[-2:]
    with frozen(model):
        m = interpreter.map(model, x, target).detach().flatten(1)
    idx = torch.sort(m, dim=1, descending=True, stable=True).indices[:, :_top_count(h, w, k_percent)]
    return torch.zeros_like(m, dtype=torch.bool).scatter_(1, idx, True).view(x.shape[0], h, w)


def _check_attack(x: Tensor, y: Tensor, noise: Tensor, radius: Tensor, loss: str,
                  interpreter: Interpreter | None) -> None:
    """One-line errors for :func:`smoothed_l2_attack`'s inputs, before any work."""
    check_images(x)
    if loss not in ("ce", "topk"):
        raise ValueError(f"unknown loss {loss!r}; choose 'ce' or 'topk'")
    if loss == "topk" and interpreter is None:
        raise ValueError("loss='topk' attacks a map: pass interpreter=")
    if noise.dim() != 4 or noise.shape[1:] != x.shape[1:]:
        raise ValueError(f"noise must have shape [S, {', '.join(map(str, x.shape[1:]))}], got {tuple(noise.shape)}")
    if radius.shape != (x.shape[0],) or bool((radius < 0).any()):
        raise ValueError(f"radius must be {x.shape[0]} non-negative values (one per input), got shape "
                         f"{tuple(radius.shape)}")
    if y.shape != (x.shape[0],) or bool((y < 0).any()):
        raise ValueError("y must be one class index >= 0 per input (the certified labels: clamp abstentions first)")


def smoothed_l2_attack(model: nn.Module, x: Tensor, y: Tensor, sigma: float, noise: Tensor, radius: Tensor, *,
                       steps: int = 50, loss: str = "ce", interpreter: Interpreter | None = None,
                       target: Tensor | int | None = None, k_percent: float = 10,
                       pixels: Tensor | None = None) -> Tensor:
    """An L2 PGD against the smoothed system with the fixed unit-normal ``noise`` ``[S, C, H, W]`` (scaled by
    ``sigma``), inside the L2 ball of per-input ``radius`` and [0, 1], step ``2.5 * radius / steps`` along the
    normalised gradient; returns the iterate with the best loss per input (not quantised: the radius is exact).

    ``loss="ce"`` maximises the cross-entropy at ``y`` (the certified label) of the mean softmax over the noisy
    copies; ``loss="topk"`` minimises the mean over the noisy copies of the top-k mass of ``interpreter``'s map of
    ``target`` (default ``y``) on ``pixels`` ``[N, H, W]`` (pass the pixels certified "in":
    ``maps.certified & maps.in_topk``; default: the top ``k_percent`` % of the noise-free map)."""
    _check_attack(x, y, noise, radius, loss, interpreter)
    radius, x0 = radius.to(x.device, x.dtype), x.detach()
    cls = y.to(x.device) if loss == "ce" else _target(x, y if target is None else target)
    if loss == "topk":
        pixels = _clean_topk(model, interpreter, x0, cls, k_percent) if pixels is None else pixels.to(x.device)
    smoothed = SmoothedLogits(model, noise.to(x.device, x.dtype), sigma)
    delta, best = torch.zeros_like(x0), x0.clone()
    best_score = torch.full((x.shape[0],), -math.inf, device=x.device)
    shape = (-1, *[1] * (x.dim() - 1))
    step = (2.5 * radius / max(steps, 1)).view(shape)
    with frozen(model):
        for _ in range(steps + 1):
            delta.requires_grad_(True)
            xa = x0 + delta
            if loss == "ce":
                score = F.nll_loss(smoothed(xa), cls, reduction="none")
            else:
                xs = (xa.unsqueeze(0) + sigma * smoothed.noise.unsqueeze(1)).flatten(0, 1)
                score = -_topk_mass_loss(model, interpreter, xs, cls, pixels.to(x.dtype), noise.shape[0])
            (g,) = torch.autograd.grad(score.sum(), delta)
            with torch.no_grad():
                better = score > best_score
                best = torch.where(better.view(shape), xa.detach(), best)
                best_score = torch.where(better, score.detach(), best_score)
                g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
                delta = project_l2(x0, x0 + delta + step * g, radius) - x0
    return best


@dataclass(frozen=True)
class CertificateCheck:
    """Per input: what the attack did to the certificates (judged by re-certifying with the same seed)."""

    distance: Tensor        # [N] float: ||x_adv - x||_2
    label_broken: Tensor    # [N] bool: certified at radius > distance, re-certified to ANOTHER class (a bug)
    label_changed: Tensor   # [N] bool: the re-certified prediction differs (abstaining included)
    pixels_broken: Tensor   # [N] long: certified pixels with radius > distance re-certified with the other label
    pixels_changed: Tensor  # [N] long: certified pixels whose label is not re-certified the same


def check_certificates(model: nn.Module, x: Tensor, x_adv: Tensor, pred: PredictionCertificate, sigma: float,
                       n0: int, n: int, alpha: float, *, seed: int, maps: MapCertificate | None = None,
                       interpreter: Interpreter | None = None, target: Tensor | int | None = None,
                       k_percent: float = 10, samples_per_batch: int = 1000) -> CertificateCheck:
    """Re-certify ``x_adv`` with a fresh generator seeded ``seed`` (``pred`` and ``maps`` must each come from a fresh
    generator seeded ``seed`` on ``x``, so both sides see the same noise) and compare. A breach is a change INSIDE the certified radius to a certified
    other label; an abstention at ``x_adv`` is a change, not a breach (finite samples may abstain where the smoothed
    classifier keeps its class). ``maps`` (with the ``interpreter``, ``target`` and ``k_percent`` it was certified
    with) adds the pixels."""
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    dist = (x_adv - x).flatten(1).norm(dim=1).to(pred.radius.dtype)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    after = certify_prediction(model, x_adv, sigma, n0, n, alpha, samples_per_batch=samples_per_batch, generator=gen)
    certified = pred.prediction >= 0
    changed = certified & (after.prediction != pred.prediction)
    broken = changed & (after.prediction >= 0) & (pred.radius > dist)
    zero = torch.zeros_like(dist, dtype=torch.long)
    px_broken, px_changed = zero, zero
    if maps is not None:
        if interpreter is None or target is None:
            raise ValueError("checking a map certificate needs the interpreter and target it was certified with")
        cls = target
        gen = torch.Generator(device=x.device).manual_seed(seed)
        again = certify_map(model, interpreter, x_adv, cls, sigma, n0, n, alpha, k_percent,
                            correction=maps.correction, samples_per_batch=samples_per_batch, generator=gen)
        kept = again.certified & (again.in_topk == maps.in_topk)
        flipped = again.certified & (again.in_topk != maps.in_topk) & (maps.radius > dist.view(-1, 1, 1))
        px_changed = (maps.certified & ~kept).flatten(1).sum(1)
        px_broken = (maps.certified & flipped).flatten(1).sum(1)
    return CertificateCheck(dist, broken, changed, px_broken, px_changed)
