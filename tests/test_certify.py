"""Randomized-smoothing certificates (attacks/certify.py, issue 29): the exact statistics, CERTIFY's closed forms, the
map certificate's corrections, the dual radius, and the empirical check that no attack below a certified radius breaks
a certificate."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import attacks
from attacks.certify import MapCertificate, PredictionCertificate, _map_bounds
from attacks.interpreters import Interpreter


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SignModel(nn.Module):
    """Two classes: 1 where pixel (0, 0) of channel 0 exceeds ``at``, else 0."""

    def __init__(self, at: float = 0.5) -> None:
        super().__init__()
        self.at = at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0, 0, 0] - self.at
        return torch.stack([-s, s], 1)


class ConstantModel(nn.Module):
    """Always class ``c`` of ``k`` (with a parameter, so its requires_grad can be checked)."""

    def __init__(self, c: int, k: int = 3) -> None:
        super().__init__()
        self.c, self.k = c, k
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.c), self.k).float() * self.scale


class LinearBinary(nn.Module):
    """Class 1 where ``w . x + b > 0``: logits ``[0, w . x + b]``."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


class PixelMap(Interpreter):
    """A hand-made 'interpreter' whose map is the input's first channel (differentiable): its top-k pixels are the
    brightest ones."""

    name = "pixel_map"

    def explain(self, model, x, target, *, create_graph=False):
        return x[:, :1]


# ------------------------------------------------------------------------------------------------- statistics
def test_clopper_pearson_matches_scipy_beta_and_binomtest_exact_interval():
    for n in (1, 10, 100, 1000):
        for alpha in (0.001, 0.01, 0.05):
            k = torch.arange(0, n + 1, max(1, n // 7))
            got = attacks.clopper_pearson_lower(k, n, alpha).numpy()
            for ki, g in zip(k.tolist(), got):
                ref = 0.0 if ki == 0 else stats.beta.ppf(alpha, ki, n - ki + 1)
                ci = stats.binomtest(ki, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
                assert g == pytest.approx(ref, abs=1e-12)
                assert g == pytest.approx(ci, abs=1e-9)
    assert attacks.clopper_pearson_lower(torch.tensor([0]), 50, 0.01).item() == 0.0


def test_clopper_pearson_refuses_counts_outside_range():
    with pytest.raises(ValueError, match=r"successes must lie in \[0, n=10\]"):
        attacks.clopper_pearson_lower(torch.tensor([11]), 10, 0.01)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        attacks.clopper_pearson_lower(torch.tensor([3]), 10, 1.5)


# ------------------------------------------------------------------------------------------------- CERTIFY
def test_certify_abstains_when_the_top_two_classes_tie():
    x = torch.full((3, 1, 4, 4), 0.5)  # on the boundary: the noisy classes split evenly
    cert = attacks.certify_prediction(SignModel(), x, 0.25, 100, 2000, 0.001, samples_per_batch=500,
                                      generator=_gen())
    assert cert.prediction.tolist() == [-1, -1, -1]
    assert cert.radius.tolist() == [0.0, 0.0, 0.0]
    assert (cert.p_lower <= 0.5).all()
    share = cert.counts[:, 1].double() / 2000
    assert ((share - 0.5).abs() < 0.05).all()  # a genuine tie, not a model that always answers one class


def test_radius_formula_on_a_constant_model():
    n, alpha, sigma = 400, 0.01, 0.3
    model = ConstantModel(2)
    cert = attacks.certify_prediction(model, torch.rand(4, 1, 4, 4, generator=_gen(1)), sigma, 10, n, alpha,
                                      samples_per_batch=64, generator=_gen())
    p_lower = alpha ** (1 / n)  # beta.ppf(alpha, n, 1): every sample is class 2
    assert cert.counts.tolist() == [[0, 0, n]] * 4
    assert cert.prediction.tolist() == [2] * 4
    assert cert.p_lower.tolist() == pytest.approx([p_lower] * 4, rel=1e-12)
    assert cert.radius.tolist() == pytest.approx([sigma * stats.norm.ppf(p_lower)] * 4, rel=1e-9)


def test_linear_classifier_radius_is_below_and_close_to_the_distance_to_the_hyperplane():
    gen = _gen(3)
    w = torch.randn(16, generator=gen, dtype=torch.float64)
    x = torch.rand(6, 1, 4, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    dist = torch.tensor([0.1, 0.2, 0.5, -0.1, -0.3, -0.6], dtype=torch.float64)  # signed distances to the plane
    b = (-(x.flatten(1) @ w) + dist * w.norm())  # per input: its own offset, so one model per input row
    sigma, n, alpha = 0.5, 20000, 0.001
    for i in range(6):
        model = LinearBinary(w, float(b[i]))
        cert = attacks.certify_prediction(model, x[i:i + 1], sigma, 1000, n, alpha, samples_per_batch=5000,
                                          generator=_gen(i))
        base = int(model(x[i:i + 1]).argmax(1))
        d = abs(float(dist[i]))
        p = stats.norm.cdf(d / sigma)  # the smoothed classifier's exact p_A (Cohen et al.)
        k_low = math.floor(n * p - 5 * math.sqrt(n * p * (1 - p)))  # five sd below the expected count
        slack_low = sigma * stats.norm.ppf(stats.beta.ppf(alpha, k_low, n - k_low + 1))
        assert int(cert.prediction) == base == (1 if dist[i] > 0 else 0)
        assert slack_low <= float(cert.radius) <= d


def test_counts_are_seeded_chunking_keeps_the_sample_count_and_model_state_is_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Dropout(0.5))
    model.train()
    model[1].weight.requires_grad_(False)
    x = torch.rand(5, 1, 4, 4, generator=_gen(2))
    a = attacks.prediction_counts(model, x, 0.3, 700, samples_per_batch=7, generator=_gen(4))
    b = attacks.prediction_counts(model, x, 0.3, 700, samples_per_batch=7, generator=_gen(4))
    c = attacks.prediction_counts(model, x, 0.3, 700, samples_per_batch=1000, generator=_gen(4))
    assert torch.equal(a, b)  # one seed, one chunking: the same draws
    assert a.sum(1).tolist() == c.sum(1).tolist() == [700] * 5
    # another chunking draws other noise (documented), from the same distribution: counts agree within sampling error
    assert ((a - c).abs() <= 5 * math.sqrt(700 * 0.25) * math.sqrt(2)).all()
    assert model.training and model[2].training
    assert model[1].weight.requires_grad is False and model[1].bias.requires_grad is True


def test_map_certificate_and_attack_leave_the_callers_model_as_it_was():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Dropout(0.5))
    model.train()
    model[1].weight.requires_grad_(False)
    x = torch.rand(3, 1, 4, 4, generator=_gen(2))
    attacks.certify_map(model, PixelMap(), x, 1, 0.2, 10, 30, 0.01, 25, samples_per_batch=7, generator=_gen())
    noise = torch.randn(4, 1, 4, 4, generator=_gen(1))
    for loss in ("ce", "topk"):  # topk with its default pixels: the noise-free top 25 %
        out = attacks.smoothed_l2_attack(model, x, torch.tensor([0, 1, 2]), 0.2, noise, torch.full((3,), 0.3),
                                         steps=3, loss=loss, interpreter=PixelMap(), k_percent=25)
        assert ((out - x).flatten(1).norm(dim=1) <= 0.3 + 1e-6).all() and 0 <= out.min() and out.max() <= 1
    assert model.training and model[2].training
    assert model[1].weight.requires_grad is False and model[1].bias.requires_grad is True
    assert model[1].bias.grad is None


def test_attack_refuses_an_abstained_label_and_a_map_loss_without_interpreter():
    x, noise, r = torch.rand(2, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.full((2,), 0.1)
    with pytest.raises(ValueError, match="clamp abstentions first"):
        attacks.smoothed_l2_attack(ConstantModel(0), x, torch.tensor([0, -1]), 0.1, noise, r)
    with pytest.raises(ValueError, match="pass interpreter="):
        attacks.smoothed_l2_attack(ConstantModel(0), x, torch.tensor([0, 1]), 0.1, noise, r, loss="topk")


def test_bad_inputs_are_refused_before_any_work():
    calls = []

    class Counting(ConstantModel):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        attacks.certify_prediction(Counting(0), x, 0.0, 10, 10, 0.01)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        attacks.certify_prediction(Counting(0), x, 0.1, 10, 10, 0.0)
    with pytest.raises(ValueError, match="unknown correction 'sidak'"):
        attacks.certify_map(Counting(0), PixelMap(), x, 0, 0.1, 10, 10, 0.01, 10, correction="sidak")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        attacks.certify_prediction(Counting(0), x + 2, 0.1, 10, 10, 0.01)
    assert calls == []


# ------------------------------------------------------------------------------------------------- the map certificate
def test_holm_rejects_what_bonferroni_does_and_more_on_hand_made_counts():
    n, alpha = 100, 0.05
    # selected-label counts whose exact one-sided p-values straddle the Bonferroni / Holm levels
    counts = np.array([[70, 62, 61, 59, 50]])
    p = stats.binom.sf(counts - 1, n, 0.5)[0]
    bonf, bonf_level = _map_bounds(counts, n, alpha, "bonferroni")
    holm, holm_level = _map_bounds(counts, n, alpha, "holm")
    assert bonf[0].tolist() == [bool(v < alpha / 5) for v in p]
    expected, stop = [], False
    for i, v in enumerate(p):  # Holm by hand: p is ascending here
        stop = stop or not v < alpha / (5 - i)
        expected.append(not stop)
    assert holm[0].tolist() == expected
    assert sum(expected) > int(bonf.sum()) >= 1
    assert holm_level[0, 1] == pytest.approx(alpha / 4)


def test_map_certificate_holm_certifies_at_least_bonferroni_and_the_certified_labels_are_right():
    x = torch.zeros(2, 1, 6, 6)
    x[:, 0, 0, :4] = 1.0  # four bright pixels: the top 4 of 36 (k = 10 % -> 4 pixels)
    x[1, 0, 5, 5] = 0.93  # a close rival in input 1
    kw = {"samples_per_batch": 64, "generator": None}
    certs = {}
    for corr in ("bonferroni", "holm"):
        kw["generator"] = _gen(7)
        certs[corr] = attacks.certify_map(ConstantModel(0), PixelMap(), x, 0, 0.05, 50, 400, 0.01, 10,
                                          correction=corr, **kw)
    bonf, holm = certs["bonferroni"], certs["holm"]
    assert torch.equal(bonf.in_topk, holm.in_topk)
    assert (holm.certified | ~bonf.certified).all() and int(bonf.certified.sum()) >= 36
    # the radii come from the simultaneous Bonferroni bounds whichever correction certifies the labels
    assert torch.equal(holm.radius, bonf.radius) and torch.equal(holm.p_lower, bonf.p_lower)
    assert (bonf.radius[bonf.certified] > 0).all() and (holm.radius[~holm.certified] == 0).all()
    assert (holm.p_lower[bonf.certified] > 0.5).all() and (holm.p_lower[~holm.certified] <= 0.5).all()
    bright = torch.zeros(6, 6, dtype=torch.bool)
    bright[0, :4] = True
    assert torch.equal(holm.in_topk[0], bright)  # the certified labels are the noise-free top-k
    assert holm.certified[0, 0, :4].all()


# ------------------------------------------------------------------------------------------------- dual radius
def test_dual_radius_by_the_share_rule():
    def pixels(radii: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.zeros(4, 4, dtype=torch.float64)
        sel = torch.zeros(4, 4, dtype=torch.bool)
        r.view(-1)[:10], sel.view(-1)[:10] = torch.tensor(radii, dtype=torch.float64), True
        r.view(-1)[10:] = 5.0  # certified "out" pixels: not top-k, never counted
        return r, sel

    rows = [pixels([0.9] * 9 + [0.0]), pixels([0.8] * 8 + [0.3, 0.0]), pixels([0.7] * 10), pixels([0.6] * 8 + [0, 0])]
    radius = torch.stack([r for r, _ in rows])
    maps = MapCertificate(torch.stack([s for _, s in rows]), radius > 0, radius, radius, "holm")
    pred = PredictionCertificate(torch.tensor([1, 0, -1, 2]), torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64),
                                 torch.zeros(4), torch.zeros(4, 3, dtype=torch.long))
    # input 0: 9 of 10 at 0.9 -> 0.9, capped by the prediction's 0.5; input 1: the 9th largest is 0.3;
    # input 2: the prediction abstains; input 3: only 8 of 10 certified < 90 %
    assert attacks.dual_radius(pred, maps, 0.9).tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert attacks.dual_radius(pred, maps, 0.8).tolist() == pytest.approx([0.5, 0.8, 0.0, 0.6])


def test_certified_accuracy_counts_correct_inputs_at_each_radius():
    radius = torch.tensor([0.0, 0.3, 0.6, 1.2])
    correct = torch.tensor([False, True, True, False])
    assert attacks.certified_accuracy(radius, correct, [0.0, 0.3, 0.5, 1.0]).tolist() == [0.5, 0.5, 0.25, 0.0]


# ------------------------------------------------------------------------------------------------- empirical check
@pytest.fixture(scope="module")
def toy(one_thread):
    """A small CNN trained on a separable toy problem: which third (left / middle / right) of a 3x16x16 image holds a
    bright bar."""
    from tests._tiny import fit_small_cnn

    gen = _gen(11)
    n = 60
    label = torch.arange(n) % 3
    image = torch.rand(n, 3, 16, 16, generator=gen) * 0.3
    for i in range(n):
        c = 1 + 5 * int(label[i])
        image[i, :, 3:13, c:c + 4] += 0.6
    model = fit_small_cnn({"image": image, "label": label}, 3, steps=60, width=4)
    return model, image[:12], label[:12]


def test_no_attack_below_the_certified_radius_changes_a_certified_label(toy):
    model, x, y = toy
    sigma, n0, n, alpha, seed = 0.25, 32, 300, 0.01, 5
    pred = attacks.certify_prediction(model, x, sigma, n0, n, alpha, samples_per_batch=150,
                                      generator=_gen(seed))
    certified = pred.prediction >= 0
    assert int(certified.sum()) >= 4
    noise = torch.randn(16, *x.shape[1:], generator=_gen(99))  # the attack's own fixed noise
    label = pred.prediction.clamp_min(0)
    kw = {"seed": seed, "samples_per_batch": 150}
    x_adv = attacks.smoothed_l2_attack(model, x, label, sigma, noise, 0.9 * pred.radius, steps=20)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.9 * pred.radius + 1e-5).all()
    check = attacks.check_certificates(model, x, x_adv, pred, sigma, n0, n, alpha, **kw)
    assert not check.label_broken.any()
    # the C&W route: the registered C&W framework on the fixed-noise smoothed model, at the runner-up class
    runner_up = pred.counts.scatter(1, label.view(-1, 1), -1).argmax(1)
    cw = attacks.build_attack("pgd", "cw", None, warm_steps=30, framework_options={"lr": 0.05})
    res = cw(attacks.SmoothedLogits(model, noise, sigma), x, runner_up)
    x_cw = attacks.project_l2(x, res.x_adv, 0.9 * pred.radius)
    assert not attacks.check_certificates(model, x, x_cw, pred, sigma, n0, n, alpha, **kw).label_broken.any()
    # not a no-op: at 3 x the radius the same attack changes the smoothed label of some input, and the check reports
    # a certificate claiming 10 x its radius as broken
    far = attacks.smoothed_l2_attack(model, x, label, sigma, noise, 3 * pred.radius, steps=20)
    assert attacks.check_certificates(model, x, far, pred, sigma, n0, n, alpha, **kw).label_changed.any()
    inflated = replace(pred, radius=10 * pred.radius)
    assert attacks.check_certificates(model, x, far, inflated, sigma, n0, n, alpha, **kw).label_broken.any()


def test_no_topk_attack_below_the_pixel_radius_flips_a_certified_pixel(toy):
    model, x, y = toy
    x, y = x[:3], y[:3]
    cam = attacks.get_interpreter("cam")
    sigma, n0, n, alpha, seed = 0.12, 32, 300, 0.01, 6
    pred = attacks.certify_prediction(model, x, sigma, n0, n, alpha, samples_per_batch=150, generator=_gen(seed))
    maps = attacks.certify_map(model, cam, x, y, sigma, n0, n, alpha, 10, samples_per_batch=150,
                               generator=_gen(seed))
    pixels = maps.certified & maps.in_topk
    assert int(pixels.sum()) >= 5
    r = torch.where(pixels, maps.radius, torch.zeros_like(maps.radius)).flatten(1).amax(1)
    noise = torch.randn(8, *x.shape[1:], generator=_gen(98))
    kw = {"seed": seed, "samples_per_batch": 150, "maps": maps, "interpreter": cam, "target": y, "k_percent": 10}
    near = attacks.smoothed_l2_attack(model, x, y, sigma, noise, 0.9 * r, steps=15, loss="topk", interpreter=cam,
                                      pixels=pixels)
    check = attacks.check_certificates(model, x, near, pred, sigma, n0, n, alpha, **kw)
    assert int(check.pixels_broken.sum()) == 0
    far = attacks.smoothed_l2_attack(model, x, y, sigma, noise, 3 * r, steps=15, loss="topk", interpreter=cam,
                                     pixels=pixels)
    assert int(attacks.check_certificates(model, x, far, pred, sigma, n0, n, alpha, **kw).pixels_changed.sum()) >= 5
    inflated = {**kw, "maps": replace(maps, radius=10 * maps.radius)}  # a certificate claiming 10 x its radii
    assert int(attacks.check_certificates(model, x, far, pred, sigma, n0, n, alpha, **inflated).pixels_broken.sum()) >= 5
