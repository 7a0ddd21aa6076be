"""``defend.stats`` against ``scipy.stats`` and hand computations: Wilson intervals (ties, n = 1, all successes, all
failures), the percentile bootstrap over inputs, McNemar's exact test, the paired bootstrap, the chance levels and the
report rules; and the per-input values every metric keeps for them."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from defend import stats
from defend.metrics import AttackSuccessRate, KendallTau, MapDistance, TopKIntersection, TopKIoU

Z = float(st.norm.ppf(0.975))


def textbook_wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (5, 32), (10, 16), (123, 256)])
def test_wilson_equals_scipy_and_the_textbook_formula(k, n):
    est = stats.wilson(k, n)
    ci = st.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert est.value == k / n and est.n == n and est.method == "wilson"
    assert est.low == pytest.approx(float(ci.low), abs=1e-12) and est.high == pytest.approx(float(ci.high), abs=1e-12)
    lo, hi = textbook_wilson(k, n)
    assert est.low == pytest.approx(lo, abs=1e-9) and est.high == pytest.approx(hi, abs=1e-9)
    assert stats.proportion([1] * k + [0] * (n - k)) == est


def test_the_figures_the_issue_quotes():
    """Evidence I quotes these intervals: 123/256 [0.42, 0.54], 118/256 [0.40, 0.52], 10/16 [0.39, 0.82],
    5/32 [0.07, 0.32]."""
    for (k, n), (lo, hi) in {(123, 256): (0.42, 0.54), (118, 256): (0.40, 0.52), (10, 16): (0.39, 0.82),
                             (5, 32): (0.07, 0.32)}.items():
        est = stats.wilson(k, n)
        assert (round(est.low, 2), round(est.high, 2)) == (lo, hi)
    assert stats.wilson(123, 256).text() == "0.480 [0.42, 0.54], n 256"
    assert stats.wilson(10, 16).text() == "0.625 [0.39, 0.82], indicative (n = 16)"


def test_wilson_refuses_impossible_counts_and_has_no_interval_at_n_0():
    with pytest.raises(ValueError, match="successes <= n"):
        stats.wilson(3, 2)
    with pytest.raises(ValueError, match="0 or 1"):
        stats.proportion([0.5, 1.0])
    empty = stats.wilson(0, 0)
    assert math.isnan(empty.value) and not empty.has_interval
    assert empty.fields("asr") == {"asr": None, "asr_ci_low": None, "asr_ci_high": None}


@pytest.mark.parametrize("values", [
    [0.1, 0.1, 0.1, 0.4, 0.4, 0.9],              # ties
    [1.0] * 12,                                   # all successes
    [0.0] * 12,                                   # all failures
    list(np.random.default_rng(3).gamma(2.0, 0.01, 64)),
])
def test_bootstrap_mean_equals_scipy_percentile_bootstrap(values):
    est = stats.bootstrap_mean(values, seed=7)
    ref = st.bootstrap((np.asarray(values, dtype=float),), np.mean, n_resamples=2000, method="percentile",
                       confidence_level=0.95, rng=np.random.default_rng(7))
    assert est.value == pytest.approx(float(np.mean(values)), abs=1e-12)
    assert est.low == pytest.approx(float(ref.confidence_interval.low), abs=1e-12)
    assert est.high == pytest.approx(float(ref.confidence_interval.high), abs=1e-12)
    assert est.seed == 7 and est.resamples == 2000 and est.low <= est.value <= est.high


def test_a_bootstrap_of_one_input_has_no_interval_as_scipy_has_none():
    with pytest.raises(ValueError):
        st.bootstrap((np.array([0.5]),), np.mean, n_resamples=2000, method="percentile")
    est = stats.bootstrap_mean([0.5], seed=0)
    assert est.value == 0.5 and est.n == 1 and not est.has_interval
    assert est.text() == "0.500, indicative (n = 1)"
    with pytest.raises(ValueError, match="1000 resamples"):
        stats.bootstrap_mean([0.1, 0.2], seed=0, resamples=100)


def test_bootstrap_ratio_is_the_paired_bootstrap_of_the_ratio_of_means():
    rng = np.random.default_rng(0)
    a, b = rng.gamma(2.0, 0.02, 40), rng.gamma(2.0, 0.01, 40)
    est = stats.bootstrap_ratio(a, b, seed=5)
    ref = st.bootstrap((a, b), lambda x, y, axis: x.mean(axis) / y.mean(axis), paired=True, vectorized=True,
                       n_resamples=2000, method="percentile", rng=np.random.default_rng(5))
    assert est.value == pytest.approx(a.mean() / b.mean())
    assert (est.low, est.high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    with pytest.raises(ValueError, match="one value per input"):
        stats.bootstrap_ratio(a, b[:-1], seed=0)


def test_mcnemar_equals_the_hand_computation():
    # 8 inputs right only for a, 2 right only for b, 30 right for both, 5 wrong for both
    a = [1] * 8 + [0] * 2 + [1] * 30 + [0] * 5
    b = [0] * 8 + [1] * 2 + [1] * 30 + [0] * 5
    test = stats.mcnemar(a, b)
    hand = 2 * sum(math.comb(10, i) for i in range(3)) / 2 ** 10  # two-sided exact binomial, 2 of 10 discordant
    assert test.p_value == pytest.approx(hand) == pytest.approx(0.109375)
    assert (test.a_only, test.b_only, test.test) == (8, 2, "mcnemar-exact")
    assert test.difference.value == pytest.approx((38 - 32) / 45)
    assert stats.mcnemar([1, 0, 1], [1, 0, 1]).p_value == 1.0  # no discordant pair
    lop = stats.mcnemar([1] * 12 + [0] * 10, [0] * 12 + [0] * 10)
    assert lop.p_value == pytest.approx(2 / 2 ** 12) and lop.verdict("A", "B").startswith("A beats B")
    assert test.verdict("A", "B") == "A vs B: within noise (p = 0.11)"


def test_paired_bootstrap_agrees_with_its_interval_and_says_within_noise():
    same = stats.paired_bootstrap([0.2, 0.4, 0.1, 0.3], [0.2, 0.4, 0.1, 0.3], seed=0)
    assert same.p_value == 1.0 and same.difference.value == 0 and not same.significant
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.02, 0.05, 0.2):
        a = rng.normal(0.5, 0.1, 50)
        b = a - shift + rng.normal(0, 0.05, 50)
        t = stats.paired_bootstrap(a, b, seed=2)
        excludes_zero = t.difference.low > 0 or t.difference.high < 0
        if abs(t.p_value - 0.05) > 0.01:  # away from the edge the test and the interval agree
            assert t.significant == excludes_zero, (shift, t)
    strong = stats.paired_bootstrap(np.linspace(1, 2, 30), np.linspace(0, 1, 30), seed=0)
    assert strong.p_value == pytest.approx(2 / 2001) and strong.difference.low > 0


def test_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1, 1, 0])
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.9, 0.7, 0.2, 0.3, 0.8, 0.6])
    est = stats.bootstrap_auc(labels, scores, seed=0)
    assert est.value == pytest.approx(roc_auc_score(labels, scores))
    assert 0 <= est.low <= est.value <= est.high <= 1
    assert not stats.bootstrap_auc([1, 1, 1], [0.2, 0.3, 0.4], seed=0).has_interval  # one class: no AUC


def test_topk_iou_chance_is_the_expectation_over_every_pair_of_random_topk_sets():
    pixels, k = 6, 2
    subsets = list(itertools.combinations(range(pixels), k))
    brute = np.mean([len(set(a) & set(b)) / len(set(a) | set(b)) for a in subsets for b in subsets])
    assert stats.topk_iou_chance([k / pixels], pixels) == pytest.approx(brute)
    assert stats.topk_iou_chance((0.05, 0.1, 0.2, 0.3, 0.5), 32 * 32) == pytest.approx(0.14, abs=0.005)


def test_report_rules():
    assert stats.indicative(99) and not stats.indicative(100)
    assert stats.min_benign_for_fpr(0.01) == 1000 and stats.min_benign_for_fpr(0.05) == 200
    assert not stats.fpr_supported(999, 0.01) and stats.fpr_supported(1000, 0.01)
    assert stats.fpr_supported(200, 0.05) and not stats.fpr_supported(32, 0.05)
    assert stats.at_chance(65, 538, 10)  # 0.121 accuracy: the Wilson lower bound is far below 0.2
    assert not stats.at_chance(527, 538, 10)
    k = next(k for k in range(538) if not stats.at_chance(k, 538, 10))
    assert stats.wilson(k, 538).low > 0.2 >= stats.wilson(k - 1, 538).low
    assert stats.within_noise(0.05) and not stats.within_noise(0.049)


def test_every_metric_keeps_its_per_input_values_and_the_right_interval():
    asr = AttackSuccessRate()
    asr.update(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3]))
    asr.update(torch.tensor([4]), torch.tensor([4]))
    assert asr.per_input().tolist() == [1.0, 0.0, 1.0, 1.0]
    assert asr.estimate() == stats.wilson(3, 4)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(10, 1, 8, 8, generator=g), torch.rand(10, 1, 8, 8, generator=g)
    for metric in (MapDistance(1), TopKIoU(), KendallTau(), TopKIntersection([4, 8])):
        metric.update(a[:6], b[:6])
        metric.update(a[6:], b[6:])
        values = metric.per_input()
        assert values.shape == (10,) and float(values.mean()) == pytest.approx(float(metric.compute()), abs=1e-6)
        assert metric.estimate(seed=3) == stats.bootstrap_mean(values, seed=3)
    iou = TopKIoU()
    assert iou.chance(64) == stats.topk_iou_chance(iou.fractions, 64)
    iou.update(a, b)
    iou.reset()
    assert iou.per_input().numel() == 0
