"""Tests for defend.metrics against hand-computed values on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

from attacks.maps import minmax, resize_map
from defend.metrics import (
    AttackSuccessRate,
    CentreOfMassShift,
    KendallTau,
    Localisation,
    MapCosineSimilarity,
    MapDistance,
    MaxSensitivity,
    MisclassificationConfidence,
    NoiseRate,
    SpearmanRho,
    TopKIntersection,
    TopKIoU,
    attack_success,
    centre_of_mass_shift,
    kendall_tau,
    localisation,
    map_cosine_similarity,
    map_l1,
    map_l2,
    map_lp_distance,
    max_sensitivity,
    noise_rate,
    spearman_rho,
    ssim,
    target_confidence,
    topk_intersection,
    topk_iou,
    topk_masks,
)

C1 = 0.01**2
C2 = 0.03**2


# --------------------------------------------------------------------------- #
# reference implementations (pure Python)
# --------------------------------------------------------------------------- #
def ref_tau_b(x: list[float], y: list[float]) -> float:
    n = len(x)
    s = n_x = n_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            s += dx * dy
            n_x += dx != 0
            n_y += dy != 0
    if n_x == 0 or n_y == 0:
        return 0.0
    return s / math.sqrt(n_x * n_y)


def ref_ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Explicit loop over channels and valid window positions (Wang et al. 2004)."""
    g = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(size)]
    tot = sum(g)
    g = [v / tot for v in g]
    w = [[g[i] * g[j] for j in range(size)] for i in range(size)]
    c, h, wd = x.shape
    vals = []
    for ch in range(c):
        for r in range(h - size + 1):
            for q in range(wd - size + 1):
                mx = my = sxx = syy = sxy = 0.0
                for i in range(size):
                    for j in range(size):
                        a = float(x[ch, r + i, q + j])
                        b = float(y[ch, r + i, q + j])
                        mx += w[i][j] * a
                        my += w[i][j] * b
                for i in range(size):
                    for j in range(size):
                        a = float(x[ch, r + i, q + j]) - mx
                        b = float(y[ch, r + i, q + j]) - my
                        sxx += w[i][j] * a * a
                        syy += w[i][j] * b * b
                        sxy += w[i][j] * a * b
                vals.append(((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx**2 + my**2 + C1) * (sxx + syy + C2)))
    return sum(vals) / len(vals)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def test_resize_map_and_minmax():
    m = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    r = resize_map(m, 4)
    assert r.shape == (1, 1, 4, 4)
    assert r.min() >= 0 and r.max() <= 1
    assert torch.equal(resize_map(m, (2, 2)), m)
    # bilinear: corner pixel of an upsampled 2x2 equals the corner value
    assert r[0, 0, 0, 0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        resize_map(torch.rand(3, 4, 4), 2)

    x = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]]], [[[0.7, 0.7], [0.7, 0.7]]]], requires_grad=True)
    y = minmax(x)
    assert torch.allclose(y[0], torch.tensor([[[0.0, 0.5], [0.25, 1.0]]]))
    assert torch.equal(y[1], torch.zeros(1, 2, 2))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- #
# classification metrics
# --------------------------------------------------------------------------- #
def test_attack_success_and_confidence_exact():
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0], [1.0, 3.0, 4.0], [5.0, 2.0, 1.0], [1.0, 6.0, 1.0]]))
    target = torch.tensor([2, 1, 0, 2])
    assert torch.equal(attack_success(logits, target), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(attack_success(logits.argmax(1), target), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    conf = target_confidence(logits, target)
    assert torch.allclose(conf, torch.tensor([0.5, 3 / 8, 5 / 8, 1 / 8]))

    asr = AttackSuccessRate()
    asr.update(logits[:3], target[:3])
    asr.update(logits[3:].argmax(1), target[3:])
    assert asr.compute().item() == pytest.approx(0.5)

    mc = MisclassificationConfidence()
    mc.update(logits[:1], target[:1])
    mc.update(logits[1:], target[1:])
    assert mc.compute().item() == pytest.approx((0.5 + 3 / 8 + 5 / 8 + 1 / 8) / 4)

    with pytest.raises(ValueError, match=r"\(4,\)"):
        asr.update(logits, target[:3])
    with pytest.raises(ValueError):
        asr.update(torch.rand(2, 3, 4), target[:2])
    with pytest.raises(ValueError, match="logits"):
        mc.update(torch.rand(4), target)
    with pytest.raises(ValueError):
        mc.update(logits, torch.tensor([0, 1, 2, 3]))  # label out of range


# --------------------------------------------------------------------------- #
# map distances
# --------------------------------------------------------------------------- #
A = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]], [[[0.5, 0.5], [0.5, 0.5]]]])
B = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])


def test_map_distance_exact():
    # diffs: [1, 0, 0.5, 0.25] and [0.5] * 4
    assert torch.allclose(map_l1(A, B), torch.tensor([1.75 / 4, 0.5]))
    assert torch.allclose(map_l2(A, B), torch.tensor([math.sqrt(1 + 0.25 + 0.0625) / 2, 0.5]))
    assert torch.allclose(map_lp_distance(A, B, 2), map_l2(A, B))
    assert torch.equal(map_l1(A, A), torch.zeros(2))

    l1 = MapDistance(p=1)
    l1.update(A[:1], B[:1])
    l1.update(A[1:], B[1:])
    assert l1.compute().item() == pytest.approx((1.75 / 4 + 0.5) / 2)
    l2 = MapDistance(p=2)
    l2.update(A, B)
    assert l2.compute().item() == pytest.approx((math.sqrt(1.3125) / 2 + 0.5) / 2)


def test_map_distance_invalid_shapes():
    m = MapDistance()
    with pytest.raises(ValueError, match=r"\(2, 1, 2, 2\).*\(2, 1, 4, 4\)"):
        m.update(A, torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 1, 2, 2\)"):
        m.update(A, B[:1])
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        m.update(A[:, 0], B[:, 0])
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        m.update(torch.rand(2, 3, 2, 2), torch.rand(2, 3, 2, 2))
    with pytest.raises(ValueError):
        MapDistance(p=0)


# --------------------------------------------------------------------------- #
# top-k IoU
# --------------------------------------------------------------------------- #
def test_topk_iou_hand_made():
    a = (torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0.0]) / 9).view(1, 1, 2, 5)
    b = (torch.tensor([0, 8, 9, 1, 2, 7, 6, 5, 3, 4.0]) / 9).view(1, 1, 2, 5)
    # k=2: A={0,1}, B={2,1} -> 1/3 ; k=5: A={0..4}, B={2,1,5,6,7} -> 2/8
    iou = topk_iou(a, b, fractions=(0.2, 0.5))
    assert torch.allclose(iou, torch.tensor([[1 / 3, 0.25]]))
    assert topk_masks(a, 0.2).view(-1).nonzero().view(-1).tolist() == [0, 1]

    # ties are broken by index: a constant map selects the first k pixels
    c = torch.full((1, 1, 2, 5), 0.3)
    assert topk_masks(c, 0.3).view(-1).nonzero().view(-1).tolist() == [0, 1, 2]
    assert torch.allclose(topk_iou(c, a, (0.2, 0.5)), torch.ones(1, 2))

    metric = TopKIoU(fractions=(0.2, 0.5))
    metric.update(a, b)
    metric.update(a, a)
    assert metric.compute().item() == pytest.approx(((1 / 3 + 0.25) / 2 + 1.0) / 2)
    per = metric.compute_per_fraction()
    assert per[0.2].item() == pytest.approx((1 / 3 + 1) / 2)
    assert per[0.5].item() == pytest.approx((0.25 + 1) / 2)

    # default fractions, identical maps -> 1
    d = TopKIoU()
    x = torch.rand(3, 1, 8, 8)
    d.update(x, x)
    assert d.compute().item() == pytest.approx(1.0)
    assert topk_iou(x, x).shape == (3, 5)
    with pytest.raises(ValueError, match=r"\(3, 1, 8, 8\).*\(3, 1, 4, 4\)"):
        d.update(x, torch.rand(3, 1, 4, 4))


# --------------------------------------------------------------------------- #
# SSIM / noise rate
# --------------------------------------------------------------------------- #
def test_ssim_identical_and_constant():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert torch.equal(noise_rate(x, x), torch.zeros(2))

    mx, my = 0.2, 0.7
    cx = torch.full((1, 3, 16, 16), mx)
    cy = torch.full((1, 3, 16, 16), my)
    expected = (2 * mx * my + C1) / (mx**2 + my**2 + C1)
    assert ssim(cx, cy).item() == pytest.approx(expected, rel=1e-5)
    assert noise_rate(cx, cy).item() == pytest.approx(1 - expected, rel=1e-4)


def test_ssim_matches_hand_computation_and_torchmetrics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 12, 13, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(2, 2, 12, 13, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    for i in range(2):
        assert got[i].item() == pytest.approx(ref_ssim(x[i], y[i]), rel=1e-9, abs=1e-12)

    from torchmetrics.functional.image import structural_similarity_index_measure

    xf = torch.rand(3, 3, 20, 20, generator=g)
    yf = (xf + 0.1 * torch.randn(3, 3, 20, 20, generator=g)).clamp(0, 1)
    # torchmetrics' full SSIM map cropped to the valid window positions == our default
    _, full = structural_similarity_index_measure(
        yf, xf, reduction="none", data_range=1.0, return_full_image=True
    )
    tm = full[..., 5:-5, 5:-5].reshape(3, -1).mean(1)
    assert torch.allclose(ssim(xf, yf), tm, atol=1e-5)
    # reflect-padded variant averages over the full image (torchmetrics >= 1.5 default)
    assert torch.allclose(ssim(xf, yf, padding="reflect"), full.reshape(3, -1).mean(1), atol=1e-5)

    nr = NoiseRate()
    nr.update(xf[:1], yf[:1])
    nr.update(xf[1:], yf[1:])
    assert nr.compute().item() == pytest.approx((1 - tm).mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match=r"\(3, 3, 20, 20\).*\(3, 3, 16, 16\)"):
        nr.update(xf, torch.rand(3, 3, 16, 16))


# --------------------------------------------------------------------------- #
# Kendall's tau
# --------------------------------------------------------------------------- #
def test_kendall_tau_extremes_and_constant():
    a = torch.rand(2, 1, 6, 6)
    assert torch.allclose(kendall_tau(a, a), torch.ones(2))
    assert torch.allclose(kendall_tau(a, 1 - a), -torch.ones(2))
    c = torch.full((2, 1, 6, 6), 0.5)
    assert torch.equal(kendall_tau(a, c), torch.zeros(2))


def test_kendall_tau_matches_reference_with_ties():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (4, 1, 5, 6), generator=g).float() / 3
    b = torch.randint(0, 5, (4, 1, 5, 6), generator=g).float() / 4
    b[0] = a[0]  # identical pair with ties -> exactly 1
    got = kendall_tau(a, b)
    for i in range(4):
        ref = ref_tau_b(a[i].flatten().tolist(), b[i].flatten().tolist())
        assert got[i].item() == pytest.approx(ref, abs=1e-6)
    assert got[0].item() == pytest.approx(1.0)
    # the pairwise method agrees, whatever the chunking
    assert torch.allclose(kendall_tau(a, b, method="pairwise"), got, atol=1e-6)
    assert torch.allclose(kendall_tau(a, b, method="pairwise", chunk_elements=7), got, atol=1e-6)
    # continuous values, power-of-two and odd pixel counts, few ties
    for shape in [(3, 1, 4, 4), (3, 1, 7, 9), (2, 1, 1, 1)]:
        c = torch.rand(shape, generator=g)
        d = (torch.rand(shape, generator=g) * 3).round() / 3
        d[0] = c[0].flip(-1)
        fast = kendall_tau(c, d)
        for i in range(shape[0]):
            ref = ref_tau_b(c[i].flatten().tolist(), d[i].flatten().tolist())
            assert fast[i].item() == pytest.approx(ref, abs=1e-6)

    try:
        from scipy.stats import kendalltau as scipy_tau
    except ImportError:  # pure-Python reference above already covers it
        scipy_tau = None
    if scipy_tau is not None:
        for i in range(1, 4):
            ref = scipy_tau(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
            assert got[i].item() == pytest.approx(ref, abs=1e-6)


def test_kendall_tau_large_maps_pooled_and_metric():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 1, 70, 70, generator=g)
    b = (a + 0.5 * torch.rand(2, 1, 70, 70, generator=g)) / 1.5
    pooled = kendall_tau(
        torch.nn.functional.adaptive_avg_pool2d(a, 32), torch.nn.functional.adaptive_avg_pool2d(b, 32)
    )
    assert torch.allclose(kendall_tau(a, b), pooled)

    # 64x64 is computed exactly (not pooled): sort and pairwise methods agree
    x = torch.rand(2, 1, 64, 64, generator=g)
    y = ((x + torch.rand(2, 1, 64, 64, generator=g)) * 4).round()  # many ties
    assert kendall_tau(x, x.pow(3)).tolist() == pytest.approx([1.0, 1.0])
    assert torch.allclose(kendall_tau(x, y), kendall_tau(x, y, method="pairwise"), atol=1e-6)
    # pooling can be switched off: 70x70 then is exact
    big = kendall_tau(a, b, exact_max_side=None)
    assert torch.allclose(big, kendall_tau(a, b, exact_max_side=None, method="pairwise"), atol=1e-6)

    m = KendallTau()
    c = torch.rand(3, 1, 5, 5, generator=g)
    d = torch.rand(3, 1, 5, 5, generator=g)
    m.update(c[:2], d[:2])
    m.update(c[2:], d[2:])
    assert m.compute().item() == pytest.approx(kendall_tau(c, d).mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match=r"\(3, 1, 5, 5\).*\(3, 1, 6, 6\)"):
        m.update(c, torch.rand(3, 1, 6, 6))


# --------------------------------------------------------------------------- #
# localisation
# --------------------------------------------------------------------------- #
def test_localisation_exact():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.5], [0.5, 0.0]]]])
    masks = torch.tensor([[[[1, 0], [0, 1]]], [[[1, 1], [1, 0]]], [[[0, 1], [1, 1]]]], dtype=torch.bool)
    energy, area = localisation(maps, masks)
    assert torch.allclose(energy, torch.tensor([0.5, 0.0, 1.0]))
    assert torch.allclose(area, torch.tensor([0.5, 0.75, 0.75]))

    m = Localisation()
    m.update(maps[:2], masks[:2])
    m.update(maps[2:], masks[2:])
    out = m.compute()
    assert out["energy_in_mask"].item() == pytest.approx(0.5)
    assert out["mask_area"].item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"\(3, 1, 2, 2\).*\(3, 1, 3, 3\)"):
        m.update(maps, torch.ones(3, 1, 3, 3))


# --------------------------------------------------------------------------- #
# Spearman's rho
# --------------------------------------------------------------------------- #
def test_spearman_rho_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(4)
    quantised_a = torch.randint(0, 4, (4, 1, 5, 6), generator=g).float() / 3
    quantised_b = torch.randint(0, 5, (4, 1, 5, 6), generator=g).float() / 4
    sparse_a = torch.rand(4, 1, 7, 5, generator=g) * (torch.rand(4, 1, 7, 5, generator=g) > 0.7)  # many zeros
    sparse_b = torch.rand(4, 1, 7, 5, generator=g) * (torch.rand(4, 1, 7, 5, generator=g) > 0.5)
    cont_a, cont_b = torch.rand(3, 1, 9, 9, generator=g), torch.rand(3, 1, 9, 9, generator=g)
    pairs = ((quantised_a, quantised_b), (sparse_a, sparse_b), (cont_a, cont_b), (quantised_a[..., :5], sparse_a[..., :5, :]))
    for a, b in pairs:
        got = spearman_rho(a, b)
        assert got.shape == (a.shape[0],)
        for i in range(a.shape[0]):
            ref = spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
            assert got[i].item() == pytest.approx(ref, abs=1e-6)

    # hand-made: a has a tie (average ranks 1, 2.5, 2.5, 4), b is strictly increasing
    a = torch.tensor([1.0, 2.0, 2.0, 3.0]).view(1, 1, 2, 2)
    b = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    ra, rb = [-1.5, 0.0, 0.0, 1.5], [-1.5, -0.5, 0.5, 1.5]
    hand = sum(x * y for x, y in zip(ra, rb)) / math.sqrt(sum(x * x for x in ra) * sum(y * y for y in rb))
    assert spearman_rho(a, b).item() == pytest.approx(hand, abs=1e-7)


def test_spearman_rho_properties():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(3, 1, 6, 6, generator=g)
    q = (a * 3).round() / 3  # ties
    assert torch.allclose(spearman_rho(a, a), torch.ones(3))
    assert torch.allclose(spearman_rho(q, q), torch.ones(3))
    assert torch.allclose(spearman_rho(a, a.pow(3)), torch.ones(3))  # monotone transform keeps the ranks
    assert torch.allclose(spearman_rho(a, 1 - a), -torch.ones(3))  # reversed ranking
    assert torch.equal(spearman_rho(a, torch.full_like(a, 0.4)), torch.zeros(3))  # constant map -> 0 (scipy: nan)
    m = SpearmanRho()
    m.update(a[:1], q[:1])
    m.update(a[1:], q[1:])
    assert m.compute().item() == pytest.approx(spearman_rho(a, q).mean().item(), abs=1e-6)


# --------------------------------------------------------------------------- #
# top-k intersection
# --------------------------------------------------------------------------- #
def ref_topk_set(values: list[float], k: int) -> set[int]:
    """Indices of the k largest values, ties broken by lower index."""
    return set(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


def test_topk_intersection_matches_python_sets_with_ties():
    # hand-made with ties: benign top-2 = {0, 1} (0.9, 0.9); attacked top-2 = {1, 3}: 0.8 tie at 1 and 3 vs 0.2
    benign = torch.tensor([0.9, 0.9, 0.5, 0.5, 0.1, 0.0]).view(1, 1, 2, 3)
    attacked = torch.tensor([0.2, 0.8, 0.1, 0.8, 0.8, 0.0]).view(1, 1, 2, 3)
    # k=1: {0} vs {1} -> 0; k=2: {0,1} vs {1,3} -> 1/2; k=3: {0,1,2} vs {1,3,4} -> 1/3; k=6 -> 1
    assert torch.allclose(topk_intersection(benign, attacked, [1, 2, 3, 6]), torch.tensor([[0.0, 0.5, 1 / 3, 1.0]]))

    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, 4, (5, 1, 4, 5), generator=g).float() / 3
    b = torch.randint(0, 3, (5, 1, 4, 5), generator=g).float() / 2
    ks = [1, 3, 7, 20]
    got = topk_intersection(a, b, ks)
    assert got.shape == (5, 4)
    for i in range(5):
        va, vb = a[i].flatten().tolist(), b[i].flatten().tolist()
        for j, k in enumerate(ks):
            ref = len(ref_topk_set(va, k) & ref_topk_set(vb, k)) / k
            assert got[i, j].item() == pytest.approx(ref)
    assert torch.equal(topk_intersection(a, a, ks), torch.ones(5, 4))


def test_topk_intersection_metric_and_validation():
    benign = torch.tensor([0.9, 0.9, 0.5, 0.5, 0.1, 0.0]).view(1, 1, 2, 3)
    attacked = torch.tensor([0.2, 0.8, 0.1, 0.8, 0.8, 0.0]).view(1, 1, 2, 3)
    m = TopKIntersection(ks=(2, 3))
    m.update(benign, attacked)
    m.update(benign, benign)
    assert m.compute().item() == pytest.approx(((0.5 + 1 / 3) / 2 + 1.0) / 2)
    per = m.compute_per_k()
    assert set(per) == {2, 3}
    assert per[2].item() == pytest.approx(0.75)
    assert per[3].item() == pytest.approx((1 / 3 + 1) / 2)
    for bad in ([], [0], [2.0], [True]):
        with pytest.raises(ValueError, match="ks"):
            topk_intersection(benign, attacked, bad)
    with pytest.raises(ValueError, match="exceeds"):
        topk_intersection(benign, attacked, [7])
    with pytest.raises(ValueError, match="ks"):
        TopKIntersection(ks=(0,))
    with pytest.raises(ValueError, match="exceeds"):
        TopKIntersection(ks=(50,)).update(benign, attacked)
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 3\).*\(1, 1, 3, 3\)"):
        m.update(benign, torch.rand(1, 1, 3, 3))


# --------------------------------------------------------------------------- #
# cosine similarity
# --------------------------------------------------------------------------- #
def test_map_cosine_similarity_matches_numpy():
    import numpy as np

    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(4, 1, 5, 7, generator=g), torch.rand(4, 1, 5, 7, generator=g) - 0.3
    got = map_cosine_similarity(a, b)
    for i in range(4):
        va, vb = a[i].flatten().double().numpy(), b[i].flatten().double().numpy()
        assert got[i].item() == pytest.approx(float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))), abs=1e-6)
    assert torch.allclose(map_cosine_similarity(a, a), torch.ones(4))
    assert torch.allclose(map_cosine_similarity(a, 3 * a), torch.ones(4))  # scale invariant
    assert torch.allclose(map_cosine_similarity(a, -a), -torch.ones(4))
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    e1 = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    assert map_cosine_similarity(e0, e1).item() == 0.0  # orthogonal
    assert torch.equal(map_cosine_similarity(a, torch.zeros_like(a)), torch.zeros(4))  # all-zero map -> 0
    assert torch.equal(map_cosine_similarity(torch.zeros_like(a), torch.zeros_like(a)), torch.zeros(4))
    m = MapCosineSimilarity()
    m.update(a[:1], b[:1])
    m.update(a[1:], b[1:])
    assert m.compute().item() == pytest.approx(got.mean().item(), abs=1e-6)


# --------------------------------------------------------------------------- #
# centre of mass
# --------------------------------------------------------------------------- #
def ref_centre(m: torch.Tensor) -> tuple[float, float]:
    h, w = m.shape[-2:]
    tot = sy = sx = 0.0
    for i in range(h):
        for j in range(w):
            v = float(m[0, i, j])
            tot += v
            sy += v * i
            sx += v * j
    return ((h - 1) / 2, (w - 1) / 2) if tot == 0 else (sy / tot, sx / tot)


def test_centre_of_mass_shift_matches_weighted_sums():
    g = torch.Generator().manual_seed(8)
    a, b = torch.rand(4, 1, 6, 9, generator=g), torch.rand(4, 1, 6, 9, generator=g) ** 4
    a[3] = 0.0  # zero map: centre at the image centre (2.5, 4)
    got = centre_of_mass_shift(a, b)
    got_n = centre_of_mass_shift(a, b, normalise=True)
    for i in range(4):
        (ya, xa), (yb, xb) = ref_centre(a[i]), ref_centre(b[i])
        ref = math.hypot(ya - yb, xa - xb)
        assert got[i].item() == pytest.approx(ref, abs=1e-5)
        assert got_n[i].item() == pytest.approx(ref / math.hypot(6, 9), abs=1e-6)
    assert torch.equal(centre_of_mass_shift(a, a), torch.zeros(4))


def test_centre_of_mass_shift_of_moved_peak_and_validation():
    base = torch.zeros(1, 1, 10, 12)
    base[0, 0, 2, 3] = 1.0
    for dy, dx in ((0, 0), (3, 4), (5, -2), (-1, 7)):
        moved = torch.roll(base, shifts=(dy, dx), dims=(2, 3))
        assert centre_of_mass_shift(base, moved).item() == pytest.approx(math.hypot(dy, dx), abs=1e-6)
    # a zero map sits at the centre (4.5, 5.5): distance to the peak at (2, 3)
    assert centre_of_mass_shift(base, torch.zeros_like(base)).item() == pytest.approx(math.hypot(2.5, 2.5))
    # a two-pixel map with masses 1 and 3 has its centre a quarter of the way from the heavier pixel
    two = torch.zeros(1, 1, 10, 12)
    two[0, 0, 2, 3], two[0, 0, 2, 7] = 1.0, 3.0
    assert centre_of_mass_shift(base, two).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="negative"):
        centre_of_mass_shift(base, base - 0.5)
    m = CentreOfMassShift(normalise=True)
    m.update(base, torch.roll(base, (3, 4), (2, 3)))
    m.update(base, base)
    assert m.compute().item() == pytest.approx(5.0 / math.hypot(10, 12) / 2)


# --------------------------------------------------------------------------- #
# max-sensitivity
# --------------------------------------------------------------------------- #
def _square_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(1, keepdim=True) ** 2


def ref_max_sensitivity(explain, x, radius, n_samples, seed):
    """Explicit loop over examples and samples; noise drawn as documented (example-major, [N, S, C, H, W])."""
    g = torch.Generator().manual_seed(seed)
    u = (2 * torch.rand((x.shape[0], n_samples, *x.shape[1:]), generator=g, dtype=x.dtype) - 1) * radius
    out = []
    for i in range(x.shape[0]):
        e0 = explain(x[i : i + 1]).double()
        den = float(e0.norm()) or 1.0  # captum: a zero-norm explanation is divided by 1
        best = -math.inf
        for s in range(n_samples):
            xp = (x[i : i + 1] + u[i, s]).clamp(0, 1)
            best = max(best, float((explain(xp).double() - e0).norm()) / den)
        out.append(best)
    return out


def test_max_sensitivity_matches_explicit_loop():
    g = torch.Generator().manual_seed(9)
    x = torch.rand(4, 3, 6, 5, generator=g)
    x[1] = 1.0  # saturated image: the clamp matters
    x[2] = 0.0  # e(x) = 0: captum's zero-norm convention (plain difference norm)
    ref = ref_max_sensitivity(_square_mean, x, 0.05, 6, seed=11)
    got = max_sensitivity(_square_mean, x, radius=0.05, n_samples=6, generator=torch.Generator().manual_seed(11))
    assert got.shape == (4,)
    assert got.tolist() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert got[2].item() > 0
    # chunking the samples does not change anything
    for chunk in (4, 9, 100):
        gen = torch.Generator().manual_seed(11)
        again = max_sensitivity(_square_mean, x, 0.05, 6, gen, max_examples_per_batch=chunk)
        assert torch.allclose(again, got)
    # without the clamp the saturated image would be perturbed both ways; with it, only downwards
    no_clamp = (2 * torch.rand((4, 6, 3, 6, 5), generator=torch.Generator().manual_seed(11)) - 1) * 0.05
    unclamped = max(float((_square_mean(x[1:2] + no_clamp[1, s]) - 1).norm()) / math.sqrt(30) for s in range(6))
    assert got[1].item() != pytest.approx(unclamped, rel=1e-3)


def test_max_sensitivity_properties_and_metric():
    g = torch.Generator().manual_seed(10)
    x = 0.25 + 0.5 * torch.rand(3, 3, 8, 8, generator=g)  # inside [0.25, 0.75]: no clamping at radius 0.1
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(max_sensitivity(_square_mean, x, radius=0.0, generator=gen()), torch.zeros(3))
    # explanation = first channel: ||u_s|| / ||x_0|| <= radius * sqrt(P) / ||x_0||, and more samples never lower it
    first = lambda t: t[:, :1]  # noqa: E731
    s10 = max_sensitivity(first, x, radius=0.1, n_samples=10, generator=gen())
    bound = 0.1 * 8 / x[:, 0].reshape(3, -1).norm(dim=1)
    assert (s10 > 0).all() and (s10 <= bound + 1e-6).all()
    # one example: its first 10 of 20 draws are the 10 draws of n_samples=10, so the max can only grow
    one10 = max_sensitivity(first, x[:1], radius=0.1, n_samples=10, generator=gen())
    one20 = max_sensitivity(first, x[:1], radius=0.1, n_samples=20, generator=gen())
    assert one10.item() == pytest.approx(s10[0].item()) and one20.item() >= one10.item()
    # a constant explanation is perfectly insensitive
    assert torch.equal(max_sensitivity(lambda t: torch.ones_like(t[:, :1]), x, generator=gen()), torch.zeros(3))

    m = MaxSensitivity(radius=0.1, n_samples=5, seed=3)
    assert (m.radius, m.n_samples) == (0.1, 5)
    m.update(_square_mean, x)
    ref = ref_max_sensitivity(_square_mean, x, 0.1, 5, seed=3)
    assert m.compute().item() == pytest.approx(sum(ref) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="n_samples"):
        MaxSensitivity(n_samples=0)
    with pytest.raises(ValueError, match="radius"):
        max_sensitivity(_square_mean, x, radius=-1.0)
    with pytest.raises(ValueError, match="explain"):
        max_sensitivity(lambda t: t[:1], x)


# --------------------------------------------------------------------------- #
# accumulation / DDP states
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "factory, kind",
    [
        (lambda: MapDistance(1), "maps"),
        (lambda: MapDistance(2), "maps"),
        (lambda: TopKIoU(), "maps"),
        (lambda: KendallTau(), "maps"),
        (lambda: NoiseRate(), "images"),
        (lambda: AttackSuccessRate(), "logits"),
        (lambda: MisclassificationConfidence(), "logits"),
        (lambda: Localisation(), "mask"),
        (lambda: SpearmanRho(), "maps"),
        (lambda: TopKIntersection(ks=(1, 5, 20)), "maps"),
        (lambda: MapCosineSimilarity(), "maps"),
        (lambda: CentreOfMassShift(), "maps"),
        (lambda: CentreOfMassShift(normalise=True), "maps"),
        (lambda: MaxSensitivity(radius=0.05, n_samples=4, seed=0), "explain"),
    ],
)
def test_two_updates_equal_one_on_concatenation(factory, kind):
    g = torch.Generator().manual_seed(3)
    if kind == "maps":
        x, y = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g)
    elif kind == "images":
        x, y = torch.rand(5, 3, 12, 12, generator=g), torch.rand(5, 3, 12, 12, generator=g)
    elif kind == "logits":
        x, y = torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    elif kind == "explain":
        x, y = torch.rand(5, 3, 8, 8, generator=g), None
    else:
        x, y = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g) > 0.5
    split, whole = factory(), factory()
    if kind == "explain":  # the seeded noise is drawn example-major, so the stream splits with the batch
        split.update(_square_mean, x[:2])
        split.update(_square_mean, x[2:])
        whole.update(_square_mean, x)
    else:
        split.update(x[:2], y[:2])
        split.update(x[2:], y[2:])
        whole.update(x, y)
    a, b = split.compute(), whole.compute()
    if isinstance(a, dict):
        for k in a:
            assert a[k].item() == pytest.approx(b[k].item(), abs=1e-6)
    else:
        assert a.item() == pytest.approx(b.item(), abs=1e-6)
    # every state is summed across processes, but the per-input values (for the intervals), which are concatenated
    sums = {k: fx for k, fx in split._reductions.items() if k != "values"}
    assert sums and all(fx is dim_zero_sum for fx in sums.values())
    assert split._reductions["values"] is dim_zero_cat
    assert torch.allclose(split.per_input(), whole.per_input(), atol=1e-6) and split.per_input().numel() == 5
