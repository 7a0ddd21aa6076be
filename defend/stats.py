"""The uncertainty of every figure: one module for intervals and paired tests (the rules of evidence).

* a **proportion** (attack success, accuracy, robust accuracy, detection rate, evasion, top-k intersection of one k)
  gets its n and a Wilson 95 % interval: :func:`wilson`, :func:`proportion` (``scipy.stats.binomtest(...)
  .proportion_ci(method="wilson")``);
* a **mean, ratio or difference over inputs** (map L1, IoU, Kendall tau, the AID ratio, a localisation change) gets a
  seeded percentile bootstrap 95 % interval over the inputs (``scipy.stats.bootstrap``, ``B = 2000`` resamples by
  default, the seed and ``B`` recorded with the figure): :func:`bootstrap_mean`, :func:`bootstrap_ratio`,
  :func:`bootstrap_statistic`;
* **two systems on the same inputs** get a paired test: McNemar's exact test for per-input correctness
  (:func:`mcnemar`: an exact binomial test on the discordant pairs) and a paired bootstrap for continuous figures
  (:func:`paired_bootstrap`: the interval of the mean difference and a two-sided p-value read off the same bootstrap
  distribution, so ``p < 0.05`` where the percentile interval excludes 0). ``p >= 0.05`` is "within noise".

The percentile method is used for every bootstrap (not scipy's default BCa) so that a paired test and the interval
printed beside it always agree, and so that tied or constant per-input values (an attack that succeeds everywhere)
give a degenerate interval instead of BCa's NaN. A bootstrap needs two inputs: with one the interval is ``(nan,
nan)`` (no interval), never a made-up one.

Also here, the small rules the reports apply: :func:`indicative` (n below 100), :func:`fpr_supported` (a threshold
at false-positive rate ``f`` needs ``10 / f`` benign inputs), :func:`at_chance` (a classifier whose accuracy's Wilson
lower bound is at or below ``1/K + 0.1``), :func:`topk_iou_chance` (the IoU two unrelated maps get by chance).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

__all__ = ["LEVEL", "ALPHA", "RESAMPLES", "INDICATIVE_BELOW", "Estimate", "PairedTest", "wilson", "proportion",
           "bootstrap_mean", "bootstrap_ratio", "bootstrap_statistic", "bootstrap_auc", "mcnemar", "paired_bootstrap",
           "within_noise", "indicative", "fpr_supported", "min_benign_for_fpr", "chance_level", "at_chance",
           "topk_iou_chance", "as_array", "interval_fields", "format_value"]

#: the confidence level of every interval
LEVEL = 0.95
#: the significance level of every paired test (p >= ALPHA is "within noise")
ALPHA = 0.05
#: bootstrap resamples (the rules ask for at least 1000)
RESAMPLES = 2000
#: figures on fewer inputs are "indicative" in reports
INDICATIVE_BELOW = 100


def as_array(values: Any) -> np.ndarray:
    """Per-input values (a tensor, an array, a list) as a 1-D float64 numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr


@dataclass(frozen=True)
class Estimate:
    """A figure with its n and its interval: ``value [low, high]`` at ``level``, by ``method`` (``wilson`` or
    ``bootstrap-percentile``; ``seed`` and ``resamples`` for a bootstrap). ``low`` / ``high`` are NaN where no
    interval exists (n = 0, or a bootstrap of one input)."""

    value: float
    low: float
    high: float
    n: int
    method: str
    seed: int | None = None
    resamples: int | None = None
    level: float = LEVEL

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def indicative(self) -> bool:
        """Fewer than :data:`INDICATIVE_BELOW` inputs."""
        return indicative(self.n)

    def fields(self, name: str) -> dict[str, Any]:
        """Flat row fields: ``name``, ``name_ci_low``, ``name_ci_high`` (None where there is no interval)."""
        return {name: _num(self.value), f"{name}_ci_low": _num(self.low), f"{name}_ci_high": _num(self.high)}

    def text(self, digits: int = 3, with_n: bool = True) -> str:
        """``0.480 [0.42, 0.54], n 256`` (``indicative (n = 32)`` below 100 inputs)."""
        return format_value(self.value, self.low, self.high, self.n if with_n else None, digits)

    def __str__(self) -> str:
        return self.text()


def _num(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def format_value(value: float | None, low: float | None, high: float | None, n: int | None = None,
                 digits: int = 3) -> str:
    """One figure as reports print it: ``0.480 [0.42, 0.54], n 256``; ``indicative (n = 32)`` below 100 inputs;
    ``-`` for a missing value."""
    if value is None or not math.isfinite(float(value)):
        return "-"
    out = f"{float(value):.{digits}f}"
    if low is not None and high is not None and math.isfinite(float(low)) and math.isfinite(float(high)):
        ci = max(digits - 1, 2)
        out += f" [{float(low):.{ci}f}, {float(high):.{ci}f}]"
    if n is not None:
        out += f", indicative (n = {int(n)})" if indicative(int(n)) else f", n {int(n)}"
    return out


def interval_fields(name: str, est: Estimate | None) -> dict[str, Any]:
    """:meth:`Estimate.fields`, or the three fields as None when there is no estimate."""
    if est is None:
        return {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None}
    return est.fields(name)


# ------------------------------------------------------------------------------------------------ proportions
def wilson(successes: int, n: int, level: float = LEVEL) -> Estimate:
    """``successes / n`` with its Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``)."""
    successes, n = int(successes), int(n)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"a proportion needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "wilson", level=level)
    ci = _st.binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return Estimate(successes / n, float(ci.low), float(ci.high), n, "wilson", level=level)


def proportion(outcomes: Any, level: float = LEVEL) -> Estimate:
    """The share of true / 1 outcomes (one per input) with its Wilson interval; every value must be 0 or 1."""
    arr = as_array(outcomes)
    if arr.size and not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("a proportion needs per-input outcomes of 0 or 1 (use bootstrap_mean for other values)")
    return wilson(int(arr.sum()), int(arr.size), level)


# ------------------------------------------------------------------------------------------------ bootstrap
def _bootstrap(samples: tuple[np.ndarray, ...], statistic: Callable[..., Any], seed: int, resamples: int,
               level: float) -> tuple[float, float, np.ndarray]:
    res = _st.bootstrap(samples, statistic, n_resamples=int(resamples), vectorized=True, paired=len(samples) > 1,
                        confidence_level=level, method="percentile", rng=np.random.default_rng(int(seed)))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), res.bootstrap_distribution


def bootstrap_statistic(samples: Sequence[Any], statistic: Callable[..., Any], seed: int,
                        resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """``statistic(*samples, axis=-1)`` with a percentile bootstrap interval over inputs; several samples are paired
    (resampled together: the same inputs). ``statistic`` must be vectorised (take ``axis``)."""
    arrs = tuple(as_array(s) for s in samples)
    n = int(arrs[0].size)
    if any(a.size != n for a in arrs):
        raise ValueError(f"paired samples need one value per input each, got sizes {[a.size for a in arrs]}")
    if resamples < 1000:
        raise ValueError(f"a bootstrap needs at least 1000 resamples, got {resamples}")
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap-percentile", int(seed), int(resamples), level)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(statistic(*arrs, axis=-1))
    if n == 1:
        return Estimate(value, math.nan, math.nan, 1, "bootstrap-percentile", int(seed), int(resamples), level)
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high, _ = _bootstrap(arrs, statistic, seed, resamples, level)
    return Estimate(value, low, high, n, "bootstrap-percentile", int(seed), int(resamples), level)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _ratio_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) / np.mean(b, axis=axis)


def bootstrap_mean(values: Any, seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """The mean over inputs with a seeded percentile bootstrap interval."""
    return bootstrap_statistic((values,), _mean, seed, resamples, level)


def bootstrap_ratio(numerator: Any, denominator: Any, seed: int, resamples: int = RESAMPLES,
                    level: float = LEVEL) -> Estimate:
    """``mean(numerator) / mean(denominator)`` over the same inputs (e.g. RTS-AID's map L1 over RTS's), with a
    paired percentile bootstrap interval."""
    return bootstrap_statistic((numerator, denominator), _ratio_of_means, seed, resamples, level)


def _auc(labels: np.ndarray, scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC as the Mann-Whitney statistic (ties count a half), vectorised over resamples; NaN where a resample
    holds one class only."""
    ranks = _st.rankdata(scores, axis=axis)
    pos = labels.astype(np.float64)
    n1 = pos.sum(axis=axis)
    n0 = pos.shape[axis] - n1
    return ((ranks * pos).sum(axis=axis) - n1 * (n1 + 1) / 2) / (n1 * n0)


def bootstrap_auc(labels: Any, scores: Any, seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """ROC AUC of ``scores`` for binary ``labels`` (1 = positive) with a percentile bootstrap interval over inputs
    (equal to ``sklearn.metrics.roc_auc_score``; resamples holding one class only are left out of the percentiles)."""
    y, s = as_array(labels), as_array(scores)
    if y.size != s.size:
        raise ValueError(f"AUC needs one score per label, got {y.size} labels and {s.size} scores")
    if not np.isin(y, (0.0, 1.0)).all() or y.min(initial=1) == y.max(initial=0):
        return Estimate(math.nan, math.nan, math.nan, int(y.size), "bootstrap-percentile", int(seed), int(resamples),
                        level)

    def statistic(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return _auc(a, b, axis)

    value = float(statistic(y, s))
    with warnings.catch_warnings():  # resamples of one class give NaN; scipy warns, the percentiles skip them
        warnings.simplefilter("ignore", _st.DegenerateDataWarning)
        res = _st.bootstrap((y, s), statistic, n_resamples=int(resamples), vectorized=True, paired=True,
                            confidence_level=level, method="percentile", rng=np.random.default_rng(int(seed)))
    dist = res.bootstrap_distribution
    dist = dist[np.isfinite(dist)]
    alpha = (1 - level) / 2
    low, high = (np.quantile(dist, [alpha, 1 - alpha]) if dist.size else (math.nan, math.nan))
    return Estimate(value, float(low), float(high), int(y.size), "bootstrap-percentile", int(seed), int(resamples),
                    level)


# ------------------------------------------------------------------------------------------------ paired tests
@dataclass(frozen=True)
class PairedTest:
    """Two systems on the same inputs: ``difference`` (a minus b, with its interval), the two-sided ``p_value`` of
    ``test`` (``mcnemar-exact`` or ``paired-bootstrap``), and for McNemar the discordant counts."""

    difference: Estimate
    p_value: float
    test: str
    a_only: int | None = None
    b_only: int | None = None

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def verdict(self, a: str, b: str, higher_is_better: bool = True) -> str:
        """``"a beats b (p = 0.003)"`` or ``"a vs b: within noise (p = 0.72)"``."""
        if not self.significant:
            return f"{a} vs {b}: within noise (p = {self.p_value:.2g})"
        a_wins = (self.difference.value > 0) == higher_is_better
        win, lose = (a, b) if a_wins else (b, a)
        return f"{win} beats {lose} (p = {self.p_value:.2g})"

    def fields(self, name: str) -> dict[str, Any]:
        """Flat row fields: the difference, its interval, the p-value and the test."""
        return {**self.difference.fields(f"{name}_diff"), f"{name}_p": _num(self.p_value), f"{name}_test": self.test}


def mcnemar(correct_a: Any, correct_b: Any, seed: int = 0, level: float = LEVEL) -> PairedTest:
    """McNemar's exact test on per-input correctness (0 / 1) of two systems on the same inputs: the two-sided exact
    binomial test of the discordant pairs (``a_only``: right for a only, ``b_only``: right for b only) against 1/2;
    ``p = 1`` without a discordant pair. The difference of accuracies (a - b) carries the paired percentile
    bootstrap interval (``seed``)."""
    a, b = as_array(correct_a), as_array(correct_b)
    if a.size != b.size:
        raise ValueError(f"McNemar needs the same inputs for both systems, got {a.size} and {b.size} outcomes")
    for arr in (a, b):
        if arr.size and not np.isin(arr, (0.0, 1.0)).all():
            raise ValueError("McNemar needs per-input correctness of 0 or 1")
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = 1.0 if a_only + b_only == 0 else float(_st.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    diff = bootstrap_statistic((a, b), _mean_difference, seed, RESAMPLES, level)
    return PairedTest(diff, p, "mcnemar-exact", a_only, b_only)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def paired_bootstrap(a: Any, b: Any, seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> PairedTest:
    """Mean difference ``a - b`` over the same inputs with its percentile bootstrap interval, and the two-sided
    p-value of the same bootstrap distribution, ``min(1, 2 (t + 1) / (B + 1))`` with ``t`` the resampled differences
    on the far side of 0 (the +1 keeps a p-value from being 0 on B resamples; Davison and Hinkley 1997, eq. 4.11),
    so ``p < 1 - level`` where the interval excludes 0 (up to that +1). Identical figures give p = 1."""
    x, y = as_array(a), as_array(b)
    if x.size != y.size:
        raise ValueError(f"a paired test needs the same inputs for both systems, got {x.size} and {y.size} values")
    est = bootstrap_statistic((x, y), _mean_difference, seed, resamples, level)
    if x.size < 2:
        return PairedTest(est, 1.0, "paired-bootstrap")
    _, _, dist = _bootstrap((x, y), _mean_difference, seed, resamples, level)
    tail = min(int(np.sum(dist <= 0)), int(np.sum(dist >= 0)))
    p = min(1.0, 2.0 * (tail + 1) / (dist.size + 1))
    return PairedTest(est, p, "paired-bootstrap")


def within_noise(p_value: float) -> bool:
    """A comparison whose p-value is at least 0.05 is within noise (never a "beats")."""
    return not p_value < ALPHA


# ------------------------------------------------------------------------------------------------ report rules
def indicative(n: int) -> bool:
    """A figure on fewer than 100 inputs is indicative only."""
    return int(n) < INDICATIVE_BELOW


def min_benign_for_fpr(fpr: float) -> int:
    """Benign inputs a threshold at false-positive rate ``fpr`` needs: ``10 / fpr`` (1000 for 1 %)."""
    if not 0 < fpr < 1:
        raise ValueError(f"a false-positive rate lies strictly between 0 and 1, got {fpr}")
    return int(math.ceil(10.0 / fpr - 1e-9))


def fpr_supported(n_benign: int, fpr: float) -> bool:
    """Whether ``n_benign`` benign inputs can set a threshold at ``fpr`` (at least ``10 / fpr`` of them)."""
    return int(n_benign) >= min_benign_for_fpr(fpr)


def chance_level(num_classes: int) -> float:
    """The accuracy of guessing among ``num_classes`` classes."""
    if int(num_classes) < 2:
        raise ValueError(f"a classifier has at least 2 classes, got {num_classes}")
    return 1.0 / int(num_classes)


def at_chance(correct: int, n: int, num_classes: int, margin: float = 0.1) -> bool:
    """A classifier is not clearly above chance when the Wilson lower bound of its accuracy is at or below
    ``1/K + margin``; its robust and interpretation figures then mean nothing."""
    est = wilson(correct, n)
    return not est.has_interval or est.low <= chance_level(num_classes) + margin


def topk_iou_chance(fractions: Sequence[float], num_pixels: int) -> float:
    """The expected top-k IoU of two unrelated maps (independent uniformly random top-k sets of ``num_pixels``),
    averaged over ``fractions`` as the IoU metric averages: the intersection ``I`` is hypergeometric and
    ``IoU = I / (2k - I)`` (``k = round(fraction * P)``, at least 1, as :func:`defend.metrics.topk_iou`)."""
    out = []
    for f in fractions:
        k = min(max(int(round(float(f) * num_pixels)), 1), num_pixels)
        i = np.arange(0, k + 1)
        pmf = _st.hypergeom(num_pixels, k, k).pmf(i)
        out.append(float(np.sum(pmf * i / (2 * k - i))))
    return float(np.mean(out))
