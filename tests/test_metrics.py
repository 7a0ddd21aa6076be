"""Tests for defend.metrics against hand-computed values on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from defend.metrics import (
    AttackSuccessRate,
    KendallTau,
    Localisation,
    MapDistance,
    MisclassificationConfidence,
    NoiseRate,
    TopKIoU,
    attack_success,
    kendall_tau,
    localisation,
    map_l1,
    map_l2,
    map_lp_distance,
    minmax_normalise,
    noise_rate,
    resize_map,
    ssim,
    target_confidence,
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
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        resize_map(torch.rand(2, 3, 4, 4), 2)

    x = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]]], [[[0.7, 0.7], [0.7, 0.7]]]], requires_grad=True)
    y = minmax_normalise(x)
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
    else:
        x, y = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g) > 0.5
    split, whole = factory(), factory()
    split.update(x[:2], y[:2])
    split.update(x[2:], y[2:])
    whole.update(x, y)
    a, b = split.compute(), whole.compute()
    if isinstance(a, dict):
        for k in a:
            assert a[k].item() == pytest.approx(b[k].item(), abs=1e-6)
    else:
        assert a.item() == pytest.approx(b.item(), abs=1e-6)
    # every state is summed across processes
    assert split._reductions and all(fx is dim_zero_sum for fx in split._reductions.values())
