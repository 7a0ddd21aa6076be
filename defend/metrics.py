"""Evaluation metrics for attacks on / defences of interpretable deep learning systems.

Conventions
-----------
* Attribution maps are tensors ``[N, 1, H, W]`` with values in ``[0, 1]``.
* Images are tensors ``[N, C, H, W]`` with values in ``[0, 1]`` (data range 1).

Every metric comes in two flavours:

* a *functional*, per-example version (pure torch, batched, no Python loop over
  examples) returning a tensor ``[N]`` (or ``[N, F]``), e.g. ``map_l1(a, b)``;
* a :class:`torchmetrics.Metric` that accumulates per-example sums in states with
  ``dist_reduce_fx="sum"`` (so they synchronise across DDP ranks) and whose
  ``compute()`` returns the mean over all examples seen.

Definitions
-----------
* Attack success rate / misclassification confidence: fraction of examples
  classified as the (adversarial) target class and the mean softmax probability
  of that class (ADV2, Zhang et al. 2020).
* Map distance: ``Lp`` distance between attribution maps normalised by the number
  of pixels, ``L1 = mean|a-b|``, ``L2 = ||a-b||_2 / sqrt(#pixels)`` (ADV2, Table 12).
* Top-k IoU: intersection-over-union of the top-k pixel sets of two maps,
  averaged over several k (ADV2).
* Noise rate: ``1 - SSIM(x, x_adv)`` (AdvEdge, Abdukhamidov et al. 2021), with the
  SSIM of Wang et al. 2004 (11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03,
  averaged over the valid window positions and channels).
* Kendall's tau-b rank correlation between flattened maps (Boopathy et al. 2020,
  "Proper network interpretability requires adversarial robustness").
* Localisation: share of the map's energy inside a ground-truth mask.
* Spearman's rank correlation (average ranks for ties, as ``scipy.stats.spearmanr``),
  top-k intersection ``|T_k(benign) ∩ T_k(attacked)| / k`` for integer k and the
  centre-of-mass shift (Ghorbani et al., AAAI 2019; Chen et al., NeurIPS 2019).
* Cosine similarity of flattened maps.
* Max-sensitivity (Yeh et al., NeurIPS 2019), the definition of captum's
  ``sensitivity_max`` with inputs clamped to ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .stats import RESAMPLES, Estimate, bootstrap_mean, proportion, topk_iou_chance

__all__ = [
    # helpers
    # functionals
    "attack_success",
    "target_confidence",
    "map_lp_distance",
    "map_l1",
    "map_l2",
    "topk_masks",
    "topk_iou",
    "ssim",
    "noise_rate",
    "kendall_tau",
    "localisation",
    "spearman_rho",
    "topk_intersection",
    "map_cosine_similarity",
    "centre_of_mass_shift",
    "max_sensitivity",
    # metric classes
    "AttackSuccessRate",
    "MisclassificationConfidence",
    "MapDistance",
    "TopKIoU",
    "NoiseRate",
    "KendallTau",
    "Localisation",
    "SpearmanRho",
    "TopKIntersection",
    "MapCosineSimilarity",
    "CentreOfMassShift",
    "MaxSensitivity",
]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_map(m: Tensor, name: str = "map") -> None:
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"{name} must be a 4-D attribution map of shape [N, 1, H, W], got shape {tuple(m.shape)}")


def _check_map_pair(a: Tensor, b: Tensor, name_a: str = "map_a", name_b: str = "map_b") -> None:
    _check_map(a, name_a)
    _check_map(b, name_b)
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(
            f"{name_a} and {name_b} have different spatial sizes: {tuple(a.shape)} vs {tuple(b.shape)}; "
            "resample both to one grid first (e.g. with attacks.maps.resize_map)"
        )
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: expected {name_b} of shape {tuple(a.shape)}, got {tuple(b.shape)}")


def _check_images(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("x_adv", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D image batch of shape [N, C, H, W], got shape {tuple(t.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: expected x_adv of shape {tuple(x.shape)}, got {tuple(y.shape)}")


def _check_target(target: Tensor, n: int) -> None:
    if target.ndim != 1 or target.shape[0] != n:
        raise ValueError(f"target must have shape [N] = ({n},), got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold integer class labels, got dtype {target.dtype}")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
# --------------------------------------------------------------------------- #
# classification metrics
# --------------------------------------------------------------------------- #
def attack_success(logits_or_preds: Tensor, target: Tensor) -> Tensor:
    """Per-example attack success ``float(pred == target)`` -> ``[N]``.

    ``logits_or_preds`` is either logits ``[N, K]`` (argmax is taken) or labels ``[N]``.
    ``target`` is the attacker's target class ``[N]`` (ADV2's attack success rate).
    """
    if logits_or_preds.ndim == 2:
        preds = logits_or_preds.argmax(dim=1)
    elif logits_or_preds.ndim == 1:
        preds = logits_or_preds
    else:
        raise ValueError(
            f"expected logits [N, K] or predicted labels [N], got shape {tuple(logits_or_preds.shape)}"
        )
    _check_target(target, preds.shape[0])
    return (preds.long() == target.long()).float()


def target_confidence(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example softmax probability of the target class -> ``[N]`` (misclassification confidence)."""
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape [N, K], got shape {tuple(logits.shape)}")
    _check_target(target, logits.shape[0])
    k = logits.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
        raise ValueError(f"target labels must lie in [0, {k - 1}], got range "
                         f"[{int(target.min())}, {int(target.max())}]")
    probs = torch.softmax(logits.float(), dim=1)
    return probs.gather(1, target.long().unsqueeze(1)).squeeze(1)


# --------------------------------------------------------------------------- #
# map distances
# --------------------------------------------------------------------------- #
def map_lp_distance(a: Tensor, b: Tensor, p: int = 1) -> Tensor:
    """Pixel-normalised ``Lp`` distance ``||a - b||_p / P^(1/p)`` per example -> ``[N]``.

    ``P = H * W`` is the number of pixels, so ``p=1`` gives ``mean|a-b|`` and ``p=2``
    gives ``||a-b||_2 / sqrt(P)`` (the normalisation of ADV2, Table 12).
    """
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"p must be a positive integer, got {p!r}")
    _check_map_pair(a, b)
    diff = (a.float() - b.float()).reshape(a.shape[0], -1).abs()
    if p == 1:
        return diff.mean(dim=1)
    return diff.pow(p).mean(dim=1).pow(1.0 / p)


def map_l1(a: Tensor, b: Tensor) -> Tensor:
    """``mean|a - b|`` per example -> ``[N]`` (ADV2 L1, normalised by #pixels)."""
    return map_lp_distance(a, b, p=1)


def map_l2(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||_2 / sqrt(#pixels)`` per example -> ``[N]`` (ADV2 L2, Table 12)."""
    return map_lp_distance(a, b, p=2)


# --------------------------------------------------------------------------- #
# top-k IoU
# --------------------------------------------------------------------------- #
def _fraction_to_k(fraction: float, num_pixels: int) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fractions must lie in (0, 1], got {fraction}")
    return min(max(int(round(fraction * num_pixels)), 1), num_pixels)


def _pixel_ranks(m: Tensor) -> Tensor:
    """Rank of every pixel (0 = largest); ties broken by lower flat index first (stable sort)."""
    flat = m.reshape(m.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    ranks.scatter_(1, order, ar)
    return ranks


def topk_masks(m: Tensor, fraction: float) -> Tensor:
    """Boolean mask ``[N, 1, H, W]`` of each map's top-k pixels, ``k = round(fraction * H * W)`` (>= 1).

    Ties are broken deterministically by flat pixel index (lower index wins).
    """
    _check_map(m)
    k = _fraction_to_k(fraction, m.shape[-1] * m.shape[-2])
    return (_pixel_ranks(m) < k).reshape(m.shape)


def topk_iou(a: Tensor, b: Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Tensor:
    """Top-k IoU ``|A ∩ B| / |A ∪ B|`` per example and fraction -> ``[N, len(fractions)]``.

    ``A`` / ``B`` are the sets of the ``k = round(fraction * #pixels)`` (at least 1) largest
    pixels of each map (ADV2's IoU test); ties are broken by flat pixel index. Average over
    the last dimension for the per-example IoU.
    """
    _check_map_pair(a, b)
    fractions = tuple(float(f) for f in fractions)
    if not fractions:
        raise ValueError("fractions must not be empty")
    num_pixels = a.shape[-1] * a.shape[-2]
    ks = torch.tensor([_fraction_to_k(f, num_pixels) for f in fractions], device=a.device)
    ra = _pixel_ranks(a).unsqueeze(1)  # [N, 1, P]
    rb = _pixel_ranks(b).unsqueeze(1)
    kk = ks.view(1, -1, 1)  # [1, F, 1]
    inter = ((ra < kk) & (rb < kk)).sum(dim=2).float()  # [N, F]
    union = 2.0 * ks.float().unsqueeze(0) - inter
    return inter / union


# --------------------------------------------------------------------------- #
# SSIM / noise rate
# --------------------------------------------------------------------------- #
def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype)


def ssim(
    x: Tensor,
    y: Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
    padding: Literal["valid", "reflect"] = "valid",
) -> Tensor:
    """Per-example SSIM (Wang et al. 2004) of image batches ``[N, C, H, W]`` -> ``[N]``.

    Gaussian window (default 11x11, sigma 1.5, normalised to sum 1), ``C1 = (k1 L)^2``,
    ``C2 = (k2 L)^2``; the SSIM map is averaged over channels and positions.

    * ``padding="valid"`` (default, the reference implementation of Wang et al. and
      scikit-image): only window positions entirely inside the image are used.
    * ``padding="reflect"``: images are reflect-padded so every pixel gets a window
      (what ``torchmetrics`` >= 1.5 averages over).

    Images smaller than the window use a window of ``min(H, W)`` (rounded down to odd) with
    the same sigma. Statistics are computed in float64 to avoid cancellation in
    ``E[x^2] - mu^2``; the result has dtype float32 (float64 for float64 inputs).
    Identical images give 1 (up to rounding; :func:`noise_rate` returns exactly 0).
    """
    _check_images(x, y)
    if padding not in ("valid", "reflect"):
        raise ValueError(f"padding must be 'valid' or 'reflect', got {padding!r}")
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, c, h, w = x.shape
    size = min(window_size, h, w)
    if size % 2 == 0:
        size -= 1
    size = max(size, 1)
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    if padding == "reflect" and size > 1:
        pad = (size - 1) // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    g = _gaussian_1d(size, sigma, torch.float64, x.device)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    stacked = torch.cat((x, y, x * x, y * y, x * y), dim=0)
    # the 2-D Gaussian window is separable: filter rows, then columns
    out = F.conv2d(stacked, g.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    out = F.conv2d(out, g.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
    mu_x, mu_y, e_xx, e_yy, e_xy = out.split(n, dim=0)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = (e_xx - mu_xx).clamp_min(0.0)
    var_y = (e_yy - mu_yy).clamp_min(0.0)
    cov = e_xy - mu_xy
    num = (2.0 * mu_xy + c1) * (2.0 * cov + c2)
    den = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    ssim_map = num / den
    return ssim_map.reshape(n, -1).mean(dim=1).to(out_dtype)


def noise_rate(x: Tensor, x_adv: Tensor) -> Tensor:
    """AdvEdge noise rate ``1 - SSIM(x, x_adv)`` per example -> ``[N]`` (0 for identical images)."""
    _check_images(x, x_adv)
    same = (x == x_adv).reshape(x.shape[0], -1).all(dim=1)
    nr = 1.0 - ssim(x, x_adv)
    return torch.where(same, torch.zeros_like(nr), nr)


# --------------------------------------------------------------------------- #
# Kendall's tau-b
# --------------------------------------------------------------------------- #
def _tau_b_from_counts(s_ab: Tensor, n_a: Tensor, n_b: Tensor) -> Tensor:
    """``s_ab / sqrt(n_a n_b)`` with 0 where a map has no untied pair (constant map)."""
    den = torch.sqrt(n_a.double() * n_b.double())
    ok = den > 0
    tau = torch.where(ok, s_ab.double() / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
    return tau.float()


def _kendall_tau_pairwise(fa: Tensor, fb: Tensor, chunk_elements: int = 1 << 23) -> Tensor:
    """Exact tau-b of flattened maps ``[N, P]`` by pairwise sign comparisons, O(N P^2) time.

    Pairs are processed in row chunks of about ``chunk_elements`` comparisons, so memory is
    bounded (no ``N * P * P`` tensor is ever allocated).
    """
    n, p = fa.shape
    s_ab = torch.zeros(n, dtype=torch.float64, device=fa.device)
    n_a = torch.zeros_like(s_ab)
    n_b = torch.zeros_like(s_ab)
    rows = max(1, chunk_elements // max(1, n * p))

    def _block(i0: int, i1: int, j0: int, j1: int, weight: float) -> None:
        sa = torch.sign(fa[:, i0:i1, None] - fa[:, None, j0:j1])  # [N, rows, cols]
        sb = torch.sign(fb[:, i0:i1, None] - fb[:, None, j0:j1])
        s_ab.add_((sa * sb).sum(dim=(1, 2), dtype=torch.float64), alpha=weight)
        n_a.add_(sa.abs_().sum(dim=(1, 2), dtype=torch.float64), alpha=weight)
        n_b.add_(sb.abs_().sum(dim=(1, 2), dtype=torch.float64), alpha=weight)

    # Sums run over ordered pairs (i, j), i != j (each unordered pair twice, which cancels in
    # the ratio). For a block of rows [start, stop) the square diagonal block holds both orders;
    # pairs with j >= stop are computed once and weighted 2 (the sign products are symmetric).
    for start in range(0, p, rows):
        stop = min(start + rows, p)
        _block(start, stop, start, stop, 1.0)
        if stop < p:
            _block(start, stop, stop, p, 2.0)
    return _tau_b_from_counts(s_ab, n_a, n_b)


def _tied_pairs_sorted(*cols: Tensor) -> Tensor:
    """Number of tied pairs per row of lexicographically sorted columns ``[N, P]`` (equal in all cols)."""
    n, p = cols[0].shape
    idx = torch.arange(p, device=cols[0].device).expand(n, p)
    new = torch.zeros(n, p, dtype=torch.bool, device=cols[0].device)
    new[:, 0] = True
    for c in cols:
        new[:, 1:] |= c[:, 1:] != c[:, :-1]
    group_start = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), dim=1).values
    return (idx - group_start).sum(dim=1)


def _kendall_tau_sort(fa: Tensor, fb: Tensor) -> Tensor:
    """Exact tau-b of flattened maps ``[N, P]`` in O(N P log^2 P) (Knight's algorithm, batched).

    Sort by ``(a, b)``; the discordant pairs are then the strict inversions of the ``b``
    sequence, counted with a bottom-up merge sort whose rounds are batched with
    ``searchsorted``. With ``n0 = P(P-1)/2``, ``n1``/``n2`` the pairs tied in ``a``/``b`` and
    ``n3`` the pairs tied in both: ``C - D = n0 - n1 - n2 + n3 - 2 D``.
    """
    n, p = fa.shape
    n0 = p * (p - 1) // 2
    n1 = _tied_pairs_sorted(torch.sort(fa, dim=1).values)
    n2 = _tied_pairs_sorted(torch.sort(fb, dim=1).values)
    # lexicographic sort by (a, b): stable sort by b, then stable sort by a
    ob = torch.sort(fb, dim=1, stable=True).indices
    a1 = fa.gather(1, ob)
    oa = torch.sort(a1, dim=1, stable=True).indices
    a_s = a1.gather(1, oa)
    b_s = fb.gather(1, ob).gather(1, oa)
    n3 = _tied_pairs_sorted(a_s, b_s)
    # count strict inversions of b_s; pad to a power of two with +inf (never inverted)
    length = 1 << max(0, (p - 1).bit_length())
    seq = torch.cat((b_s, b_s.new_full((n, length - p), float("inf"))), dim=1)
    disc = torch.zeros(n, dtype=torch.long, device=fa.device)
    width = 1
    while width < length:
        blocks = seq.view(n, length // (2 * width), 2, width)
        left = blocks[:, :, 0].contiguous()
        right = blocks[:, :, 1].contiguous()
        not_greater = torch.searchsorted(left, right, right=True)  # left elements <= each right one
        disc += (width - not_greater).sum(dim=(1, 2))
        seq = torch.sort(blocks.reshape(n, length // (2 * width), 2 * width), dim=2).values.reshape(n, length)
        width *= 2
    s_ab = n0 - n1 - n2 + n3 - 2 * disc
    return _tau_b_from_counts(s_ab, n0 - n1, n0 - n2)


def kendall_tau(
    a: Tensor,
    b: Tensor,
    max_side: int = 32,
    exact_max_side: int | None = 64,
    method: Literal["sort", "pairwise"] = "sort",
    chunk_elements: int = 1 << 23,
) -> Tensor:
    """Kendall's tau-b between two maps per example (pixels flattened) -> ``[N]``.

    Rank correlation as used by Boopathy et al. (2020) to compare attribution maps::

        tau_b = sum_{i<j} s_a(i,j) s_b(i,j) / sqrt(n_a * n_b)

    with ``s(i,j) = sign(m_i - m_j)`` and ``n_a`` / ``n_b`` the numbers of pairs not tied
    in ``a`` / ``b`` (ties are handled as in tau-b, matching ``scipy.stats.kendalltau``).

    * Exact for maps with both sides ``<= exact_max_side`` (default 64).
    * Maps with a larger side are first average-pooled (adaptive) to at most ``max_side``
      (default 32) per side, as a fixed, documented protocol for large maps;
      ``exact_max_side=None`` disables pooling (the sort method is exact at any size).
    * If either map of an example is constant (no untied pair), tau is defined as 0.
    * ``method="sort"`` (default): batched merge-sort inversion count, O(N P log^2 P).
      ``method="pairwise"``: all pixel pairs compared by sign, in row chunks of about
      ``chunk_elements`` comparisons so memory stays bounded (O(N P^2) time).
    """
    _check_map_pair(a, b)
    if max_side < 1 or (exact_max_side is not None and exact_max_side < 1):
        raise ValueError("max_side and exact_max_side must be positive")
    if method not in ("sort", "pairwise"):
        raise ValueError(f"method must be 'sort' or 'pairwise', got {method!r}")
    h, w = a.shape[-2:]
    a = a.double() if a.dtype == torch.float64 else a.float()
    b = b.to(a.dtype)
    if exact_max_side is not None and (h > exact_max_side or w > exact_max_side):
        out_size = (min(h, max_side), min(w, max_side))
        a = F.adaptive_avg_pool2d(a, out_size)
        b = F.adaptive_avg_pool2d(b, out_size)
    n = a.shape[0]
    if n == 0:
        return torch.zeros(0, device=a.device)
    fa = a.reshape(n, -1)
    fb = b.reshape(n, -1)
    if method == "pairwise":
        return _kendall_tau_pairwise(fa, fb, chunk_elements)
    return _kendall_tau_sort(fa, fb)


# --------------------------------------------------------------------------- #
# localisation
# --------------------------------------------------------------------------- #
def localisation(m: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Energy share of a map inside a ground-truth mask -> ``(energy_in_mask [N], mask_area [N])``.

    ``energy_in_mask = sum(m * mask) / sum(m)`` (0 when the map sums to 0) and
    ``mask_area = mean(mask)`` (the share expected from a uniform map).
    """
    _check_map(m, "map")
    _check_map(mask, "mask")
    if mask.shape != m.shape:
        raise ValueError(f"shape mismatch: expected mask of shape {tuple(m.shape)}, got {tuple(mask.shape)}")
    mf = m.float().reshape(m.shape[0], -1)
    kf = mask.float().reshape(mask.shape[0], -1)
    total = mf.sum(dim=1)
    inside = (mf * kf).sum(dim=1)
    ok = total != 0
    energy = torch.where(ok, inside / torch.where(ok, total, torch.ones_like(total)), torch.zeros_like(total))
    return energy, kf.mean(dim=1)


# --------------------------------------------------------------------------- #
# Spearman's rho
# --------------------------------------------------------------------------- #
def _average_ranks(f: Tensor) -> Tensor:
    """1-based ranks of every row of ``f`` ``[N, P]`` (float64), ties given their average rank.

    Sort each row; a tie group occupying sorted positions ``s..e`` (0-based) gets rank
    ``(s + e) / 2 + 1`` (scipy's ``rankdata(method="average")``), scattered back to the pixels.
    """
    n, p = f.shape
    srt, order = torch.sort(f, dim=1, stable=True)
    idx = torch.arange(p, device=f.device).expand(n, p)
    new = torch.ones(n, p, dtype=torch.bool, device=f.device)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]  # first position of a tie group
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]  # last position of a tie group
    start = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), dim=1).values
    end = torch.cummin(torch.where(last, idx, torch.full_like(idx, p - 1)).flip(1), dim=1).values.flip(1)
    avg = (start + end).double() / 2.0 + 1.0
    return torch.empty_like(avg).scatter_(1, order, avg)


def spearman_rho(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation between two maps per example (pixels flattened) -> ``[N]``.

    The Pearson correlation of the average ranks of the pixels (ties share the mean of the
    ranks they span), equal to ``scipy.stats.spearmanr`` on each example's flattened pair.
    Rank correlations are the standard way to compare attribution maps under attack
    (Ghorbani et al., AAAI 2019, "Interpretation of neural networks is fragile").

    * If either map of an example is constant (zero rank variance), rho is defined as 0
      (scipy returns nan), as for :func:`kendall_tau`.
    * Computed in float64 with a batched sort (O(N P log P)); returns float32.
    """
    _check_map_pair(a, b)
    n = a.shape[0]
    if n == 0:
        return torch.zeros(0, device=a.device)
    ra = _average_ranks(a.reshape(n, -1).double())
    rb = _average_ranks(b.reshape(n, -1).double())
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    cov = (ra * rb).sum(dim=1)
    den = torch.sqrt((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1))
    ok = den > 0
    rho = torch.where(ok, cov / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
    return rho.clamp(-1.0, 1.0).float()


# --------------------------------------------------------------------------- #
# top-k intersection
# --------------------------------------------------------------------------- #
def _check_ks(ks: Sequence[int], num_pixels: int | None = None) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"ks must be integer pixel counts, got {k!r}")
        if k < 1:
            raise ValueError(f"ks must be >= 1, got {k}")
        if num_pixels is not None and k > num_pixels:
            raise ValueError(f"k = {k} exceeds the number of pixels H * W = {num_pixels}")
    return ks


def topk_intersection(benign: Tensor, attacked: Tensor, ks: Sequence[int]) -> Tensor:
    """Top-k intersection per example and k -> ``[N, len(ks)]``.

    ``|T_k(benign) ∩ T_k(attacked)| / k``: the share of the benign map's ``k`` largest
    pixels that are still among the attacked map's ``k`` largest pixels (Ghorbani et al.,
    AAAI 2019; Chen et al., NeurIPS 2019). ``ks`` are integer pixel counts with
    ``1 <= k <= H * W``. Ties are broken deterministically by flat pixel index (lower
    index wins), as in :func:`topk_masks`.
    """
    _check_map_pair(benign, attacked, "benign", "attacked")
    ks = _check_ks(ks, benign.shape[-1] * benign.shape[-2])
    kt = torch.tensor(ks, device=benign.device)
    kk = kt.view(1, -1, 1)  # [1, K, 1]
    rb = _pixel_ranks(benign).unsqueeze(1)  # [N, 1, P]
    ra = _pixel_ranks(attacked).unsqueeze(1)
    inter = ((rb < kk) & (ra < kk)).sum(dim=2).float()  # [N, K]
    return inter / kt.float().unsqueeze(0)


# --------------------------------------------------------------------------- #
# cosine similarity
# --------------------------------------------------------------------------- #
def map_cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity ``<a, b> / (||a||_2 ||b||_2)`` of the flattened maps per example -> ``[N]``.

    Defined as 0 when either map is all zero (no direction). Computed in float64; returns float32.
    """
    _check_map_pair(a, b)
    n = a.shape[0]
    fa = a.reshape(n, -1).double()
    fb = b.reshape(n, -1).double()
    dot = (fa * fb).sum(dim=1)
    den = fa.norm(dim=1) * fb.norm(dim=1)
    ok = den > 0
    cos = torch.where(ok, dot / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
    return cos.clamp(-1.0, 1.0).float()


# --------------------------------------------------------------------------- #
# centre of mass
# --------------------------------------------------------------------------- #
def _centre_of_mass(m: Tensor) -> Tensor:
    """``[N, 2]`` (row, col) centre of mass of non-negative maps ``[N, 1, H, W]`` (float64)."""
    h, w = m.shape[-2:]
    mm = m.double().reshape(m.shape[0], h, w)
    rows = torch.arange(h, dtype=torch.float64, device=m.device)
    cols = torch.arange(w, dtype=torch.float64, device=m.device)
    total = mm.sum(dim=(1, 2))
    num = torch.stack(((mm.sum(dim=2) * rows).sum(dim=1), (mm.sum(dim=1) * cols).sum(dim=1)), dim=1)
    centre = torch.tensor([(h - 1) / 2.0, (w - 1) / 2.0], dtype=torch.float64, device=m.device)
    ok = (total > 0).unsqueeze(1)
    com = num / torch.where(ok, total.unsqueeze(1), torch.ones_like(num))
    return torch.where(ok, com, centre.expand_as(com))


def centre_of_mass_shift(a: Tensor, b: Tensor, normalise: bool = False) -> Tensor:
    """Euclidean distance in pixels between the centres of mass of two maps per example -> ``[N]``.

    The centre of mass of a map ``m`` is ``(sum_ij m_ij i, sum_ij m_ij j) / sum_ij m_ij``
    with pixel ``(i, j)`` at row ``i``, column ``j`` (pixel centres on the integer grid); the
    map values are the masses and must be non-negative (``ValueError`` otherwise). A map
    that sums to 0 has its centre at the image centre ``((H - 1) / 2, (W - 1) / 2)``.
    ``normalise=True`` divides by the image diagonal ``sqrt(H^2 + W^2)`` (so the value is
    below 1). A location-shift measure of attacked maps in the spirit of Ghorbani et al.
    (AAAI 2019), who report the shift of the centre of mass of saliency maps.
    """
    _check_map_pair(a, b)
    for name, t in (("map_a", a), ("map_b", b)):
        if t.numel() and bool((t < 0).any()):
            raise ValueError(f"{name} has negative values; centre of mass needs non-negative masses")
    h, w = a.shape[-2:]
    d = (_centre_of_mass(a) - _centre_of_mass(b)).pow(2).sum(dim=1).sqrt()
    if normalise:
        d = d / math.sqrt(h * h + w * w)
    return d.float()


# --------------------------------------------------------------------------- #
# max-sensitivity
# --------------------------------------------------------------------------- #
def _explanation_norm(e: Tensor, norm: str | float) -> Tensor:
    """Norm of each flattened explanation ``[B, ...]`` -> ``[B]`` (``"fro"`` = L2 of the flattened map)."""
    ord_ = 2.0 if norm == "fro" else float(norm)
    return torch.linalg.vector_norm(e.reshape(e.shape[0], -1).double(), ord=ord_, dim=1)


def _check_sensitivity_args(radius: float, n_samples: int, norm: str | float) -> None:
    if not radius >= 0.0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if isinstance(norm, str) and norm != "fro":
        raise ValueError(f"norm must be 'fro' or a positive number, got {norm!r}")
    if not isinstance(norm, str) and not float(norm) > 0:
        raise ValueError(f"norm must be 'fro' or a positive number, got {norm!r}")


def max_sensitivity(
    explain: Callable[[Tensor], Tensor],
    x: Tensor,
    radius: float = 0.02,
    n_samples: int = 10,
    generator: torch.Generator | None = None,
    norm: str | float = "fro",
    max_examples_per_batch: int | None = None,
) -> Tensor:
    """Max-sensitivity of an explanation (Yeh et al., NeurIPS 2019) per example -> ``[N]``.

    captum's ``sensitivity_max``: with ``e = explain`` (a callable ``[N, C, H, W] -> [N, ...]``,
    e.g. maps ``[N, 1, H, W]``) and ``u_1..u_S`` (``S = n_samples``) uniform noise in the
    L-inf ball of ``radius``::

        MS(x) = max_s ||e(x + u_s) - e(x)|| / ||e(x)||

    with the norm over the flattened explanation (``"fro"`` = L2; a number = that ``ord``),
    and, as in captum, ``||e(x)||`` replaced by 1 where it is 0 (the plain difference norm).

    * Noise: ``u = (2 * torch.rand([N, S, C, H, W], generator=generator) - 1) * radius`` drawn
      at once (on the generator's device, in ``x``'s dtype), example-major like captum's
      ``repeat_interleave``. Documented difference: the perturbed images are clamped to
      ``[0, 1]`` (captum does not clamp) since our images live in ``[0, 1]``.
    * Samples are stacked into the batch, ``max(1, max_examples_per_batch // N)`` samples
      per call of ``explain`` (all at once if ``None``). ``explain`` is called without
      ``torch.no_grad`` (gradient explanations need autograd); its outputs are detached.
    """
    _check_sensitivity_args(radius, n_samples, norm)
    if x.ndim != 4:
        raise ValueError(f"x must be a 4-D image batch of shape [N, C, H, W], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, device=x.device)
    x = x if x.is_floating_point() else x.float()
    e0 = explain(x)
    if not isinstance(e0, Tensor) or e0.ndim < 1 or e0.shape[0] != n:
        raise ValueError(f"explain must return a tensor [N, ...] with N = {n}")
    e0 = e0.detach()
    den = _explanation_norm(e0, norm)
    den = torch.where(den == 0, torch.ones_like(den), den)
    dev = generator.device if generator is not None else x.device
    u = torch.rand((n, n_samples, *x.shape[1:]), generator=generator, dtype=x.dtype, device=dev)
    u = ((2.0 * u - 1.0) * radius).to(x.device)
    step = n_samples if max_examples_per_batch is None else max(1, max_examples_per_batch // n)
    best = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    for s0 in range(0, n_samples, step):
        k = min(step, n_samples - s0)
        xp = (x.unsqueeze(1) + u[:, s0:s0 + k]).clamp(0.0, 1.0).reshape(n * k, *x.shape[1:])
        ep = explain(xp).detach()
        if ep.shape != (n * k, *e0.shape[1:]):
            raise ValueError(f"explain returned shape {tuple(ep.shape)} for {n * k} perturbed inputs, "
                             f"expected {(n * k, *e0.shape[1:])}")
        diff = (ep.reshape(n, k, -1) - e0.reshape(n, 1, -1)).reshape(n * k, -1)
        sens = _explanation_norm(diff, norm).view(n, k) / den.unsqueeze(1)
        best = torch.maximum(best, sens.amax(dim=1))
    return best.float()


# --------------------------------------------------------------------------- #
# torchmetrics classes
# --------------------------------------------------------------------------- #
class _PerInput:
    """What every metric class here shares: a list state of per-example values (``dist_reduce_fx="cat"``: gathered
    across DDP ranks, in rank order) kept beside the summed states, so a figure carries its interval
    (:mod:`defend.stats`). ``interval`` says which: ``"wilson"`` for 0 / 1 outcomes (a proportion), ``"bootstrap"``
    (a seeded percentile bootstrap over inputs) for every other mean."""

    interval: str = "bootstrap"

    def _keep(self, values: Tensor) -> None:
        self.values.append(values.detach().double().cpu())

    def per_input(self) -> Tensor:
        """The per-example values seen so far (float64 ``[N]``; gathered across processes like ``compute``)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group):
            vals = self.values
            out = dim_zero_cat(vals) if isinstance(vals, Tensor) or len(vals) else torch.zeros(0, dtype=torch.float64)
        return out.double().cpu()

    def estimate(self, seed: int = 0, resamples: int = RESAMPLES) -> Estimate:
        """The mean over examples with its 95 % interval (Wilson for a proportion, else the bootstrap with ``seed``)."""
        values = self.per_input()
        if self.interval == "wilson":
            return proportion(values)
        return bootstrap_mean(values, seed, resamples)


class _MeanMetric(_PerInput, Metric):
    """Accumulates ``sum`` of per-example values and ``count`` (and the values, :class:`_PerInput`); ``compute()``
    is the mean (NaN if empty)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def _accumulate(self, values: Tensor) -> None:
        values = values.detach()
        self.total += values.sum(dtype=torch.float64)
        self.count += values.shape[0]
        self._keep(values)

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


class AttackSuccessRate(_MeanMetric):
    """Attack success rate: mean of ``pred == target`` (ADV2). Accepts logits ``[N, K]`` or labels ``[N]``; a
    proportion (Wilson interval)."""

    higher_is_better = True
    interval = "wilson"

    def update(self, logits_or_preds: Tensor, target: Tensor) -> None:
        self._accumulate(attack_success(logits_or_preds, target))


class MisclassificationConfidence(_MeanMetric):
    """Mean softmax probability of the (target) class over examples (ADV2's misclassification confidence)."""

    higher_is_better = True

    def update(self, logits: Tensor, target: Tensor) -> None:
        self._accumulate(target_confidence(logits, target))


class MapDistance(_MeanMetric):
    """Mean pixel-normalised ``Lp`` distance between attribution maps (ADV2, Table 12), see :func:`map_lp_distance`."""

    higher_is_better = False

    def __init__(self, p: int = 1, **kwargs: Any) -> None:
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ValueError(f"p must be a positive integer, got {p!r}")
        super().__init__(**kwargs)
        self.p = p

    def update(self, map_a: Tensor, map_b: Tensor) -> None:
        self._accumulate(map_lp_distance(map_a, map_b, p=self.p))


class TopKIoU(_PerInput, Metric):
    """Top-k IoU between attribution maps (ADV2), averaged over ``fractions`` and examples.

    ``compute()`` returns the mean over examples of the per-example IoU averaged over the
    fractions; ``compute_per_fraction()`` returns ``{fraction: mean IoU}``; ``per_input()`` the per-example IoU
    averaged over the fractions, and ``chance(num_pixels)`` what two unrelated maps score
    (:func:`defend.stats.topk_iou_chance`).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fractions: Sequence[float] = DEFAULT_FRACTIONS, **kwargs: Any) -> None:
        fractions = tuple(float(f) for f in fractions)
        if not fractions:
            raise ValueError("fractions must not be empty")
        for f in fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"fractions must lie in (0, 1], got {f}")
        super().__init__(**kwargs)
        self.fractions = fractions
        self.add_state("total", default=torch.zeros(len(fractions), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, map_a: Tensor, map_b: Tensor) -> None:
        iou = topk_iou(map_a, map_b, self.fractions).detach()
        self.total += iou.sum(dim=0, dtype=torch.float64)
        self.count += iou.shape[0]
        self._keep(iou.double().mean(dim=1))

    def compute(self) -> Tensor:
        return (self.total / self.count).mean().float()

    def chance(self, num_pixels: int) -> float:
        """The IoU two unrelated maps of ``num_pixels`` pixels get by chance, averaged over the fractions."""
        return topk_iou_chance(self.fractions, num_pixels)

    def compute_per_fraction(self) -> dict[float, Tensor]:
        """Mean IoU for each fraction (synchronised across processes like ``compute``)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group):
            per = (self.total / self.count).float()
        return {f: per[i] for i, f in enumerate(self.fractions)}


class NoiseRate(_MeanMetric):
    """Mean AdvEdge noise rate ``1 - SSIM(x, x_adv)`` (Wang et al. 2004 SSIM), see :func:`noise_rate`."""

    higher_is_better = False

    def update(self, x: Tensor, x_adv: Tensor) -> None:
        self._accumulate(noise_rate(x, x_adv))


class KendallTau(_MeanMetric):
    """Mean Kendall's tau-b between attribution maps (Boopathy et al. 2020), see :func:`kendall_tau`.

    Maps larger than ``exact_max_side`` (64) on a side are average-pooled to at most
    ``max_side`` (32) per side first; a constant map gives tau = 0.
    """

    higher_is_better = True

    def __init__(
        self,
        max_side: int = 32,
        exact_max_side: int | None = 64,
        method: Literal["sort", "pairwise"] = "sort",
        **kwargs: Any,
    ) -> None:
        if method not in ("sort", "pairwise"):
            raise ValueError(f"method must be 'sort' or 'pairwise', got {method!r}")
        super().__init__(**kwargs)
        self.max_side = max_side
        self.exact_max_side = exact_max_side
        self.method = method

    def update(self, map_a: Tensor, map_b: Tensor) -> None:
        self._accumulate(
            kendall_tau(
                map_a, map_b, max_side=self.max_side, exact_max_side=self.exact_max_side, method=self.method
            )
        )


class Localisation(_PerInput, Metric):
    """Mean share of map energy inside a ground-truth mask and mean mask area, see :func:`localisation`.

    ``compute()`` returns ``{"energy_in_mask": ..., "mask_area": ...}``; ``per_input()`` the per-example energy share.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("energy_total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("area_total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, attribution: Tensor, mask: Tensor) -> None:
        energy, area = localisation(attribution, mask)
        self.energy_total += energy.detach().sum(dtype=torch.float64)
        self.area_total += area.detach().sum(dtype=torch.float64)
        self.count += energy.shape[0]
        self._keep(energy)

    def compute(self) -> dict[str, Tensor]:
        return {
            "energy_in_mask": (self.energy_total / self.count).float(),
            "mask_area": (self.area_total / self.count).float(),
        }


class SpearmanRho(_MeanMetric):
    """Mean Spearman's rank correlation between attribution maps, see :func:`spearman_rho` (constant map -> 0)."""

    higher_is_better = True

    def update(self, map_a: Tensor, map_b: Tensor) -> None:
        self._accumulate(spearman_rho(map_a, map_b))


class TopKIntersection(_PerInput, Metric):
    """Top-k intersection between benign and attacked maps (Ghorbani et al. 2019), see :func:`topk_intersection`.

    ``compute()`` returns the mean over examples and ``ks``; ``compute_per_k()`` returns
    ``{k: mean intersection}``. Its interval is a bootstrap over inputs, not Wilson over pixels: the pixels of one
    map are not independent trials, the inputs are.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int], **kwargs: Any) -> None:
        ks = _check_ks(ks)
        super().__init__(**kwargs)
        self.ks = ks
        self.add_state("total", default=torch.zeros(len(ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, benign: Tensor, attacked: Tensor) -> None:
        inter = topk_intersection(benign, attacked, self.ks).detach()
        self.total += inter.sum(dim=0, dtype=torch.float64)
        self.count += inter.shape[0]
        self._keep(inter.double().mean(dim=1))

    def compute(self) -> Tensor:
        return (self.total / self.count).mean().float()

    def compute_per_k(self) -> dict[int, Tensor]:
        """Mean intersection for each k (synchronised across processes like ``compute``)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group):
            per = (self.total / self.count).float()
        return {k: per[i] for i, k in enumerate(self.ks)}


class MapCosineSimilarity(_MeanMetric):
    """Mean cosine similarity of flattened maps, see :func:`map_cosine_similarity` (an all-zero map -> 0)."""

    higher_is_better = True

    def update(self, map_a: Tensor, map_b: Tensor) -> None:
        self._accumulate(map_cosine_similarity(map_a, map_b))


class CentreOfMassShift(_MeanMetric):
    """Mean centre-of-mass shift between maps (pixels, or image diagonals with ``normalise``), see
    :func:`centre_of_mass_shift`."""

    higher_is_better = False

    def __init__(self, normalise: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.normalise = bool(normalise)

    def update(self, map_a: Tensor, map_b: Tensor) -> None:
        self._accumulate(centre_of_mass_shift(map_a, map_b, normalise=self.normalise))


class MaxSensitivity(_MeanMetric):
    """Mean max-sensitivity of an explanation (Yeh et al. 2019; captum ``sensitivity_max``), see
    :func:`max_sensitivity`.

    ``radius`` (L-inf noise radius, default 0.02) and ``n_samples`` (default 10) are attributes
    to report with the value. ``seed`` seeds a CPU generator created once; successive
    updates continue its stream (``reset()`` does not reseed), so with a seed two updates
    equal one update on the concatenated batch. ``update(explain, x)`` takes the callable.
    """

    higher_is_better = False

    def __init__(
        self,
        radius: float = 0.02,
        n_samples: int = 10,
        norm: str | float = "fro",
        seed: int | None = None,
        max_examples_per_batch: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_sensitivity_args(radius, n_samples, norm)
        super().__init__(**kwargs)
        self.radius = float(radius)
        self.n_samples = n_samples
        self.norm = norm
        self.seed = seed
        self.max_examples_per_batch = max_examples_per_batch
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def update(self, explain: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self._accumulate(
            max_sensitivity(explain, x, radius=self.radius, n_samples=self.n_samples, generator=self.generator,
                            norm=self.norm, max_examples_per_batch=self.max_examples_per_batch)
        )
