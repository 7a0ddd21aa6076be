"""Walk the registries: every interpreter, framework and attack the core registers, with no hand-kept list.

A new interpreter gets these tests for free: its maps are valid, detached and deterministic, and ADV2 attacks it
through its own term with no change to the engine (closer maps than the plain attack at the same success)."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import train_tiny_classifier
from torch import nn

import attacks
from attacks import ATTACKS, FRAMEWORKS, INTERPRETERS, build_attack, get_framework, get_interpreter
from attacks.interpreters import CAMInterpreter, GradCAM, GradInterpreter, IntegratedGradients, RTSNetwork, SmoothGrad
from defend.metrics import map_l1
from defend.models import GapClassifier

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

#: constructor options for the registry walk: MASK shortened, RTS given an (untrained) network
OPTIONS = {"mask": {"iterations": 20}}


def build(name: str, model) -> attacks.Interpreter:
    if name == "rts":
        torch.manual_seed(0)
        return get_interpreter("rts", network=RTSNetwork(model.stage_channels, model.num_classes, width=8).eval())
    return get_interpreter(name, **OPTIONS.get(name, {}))


@pytest.fixture(scope="module")
def tiny(one_thread):
    model, test, _ = train_tiny_classifier()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        ok = model(test["image"]).argmax(1) == test["label"]
    x, y = test["image"][ok][:8], test["label"][ok][:8]
    return model, x, y, attacks.random_targets(y, 10, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", INTERPRETERS.names())
def test_every_interpreter_gives_valid_detached_deterministic_maps(tiny, name):
    model, x, y, _ = tiny
    g = build(name, model)
    m = g(model, x, y)
    assert m.shape == (x.shape[0], 1, *x.shape[-2:]) and not m.requires_grad
    assert bool(torch.isfinite(m).all()) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert torch.equal(m, g(model, x, y))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in INTERPRETERS.names() if n != "mask"])
def test_adv2_attacks_every_interpreter_through_its_own_term(tiny, name):
    """Closer maps than the plain attack at equal success (MASK is covered by tests/test_attacks.py: its bilevel
    attack is too slow for a walk)."""
    model, x, _, y_t = tiny
    g = build(name, model)
    options = dict(eps=16 / 255, alpha=2 / 255, warm_steps=20, steps=30, c=20.0, seed=0)
    adv = build_attack("adv2", "pgd", g, **options)(model, x, y_t)
    plain = build_attack("pgd", "pgd", **options)(model, x, y_t)
    assert adv.success.float().mean() >= 0.75  # measured 1.00 (8 of 8) for every interpreter, OMP 1 and 2, 2026-12-06
    both = adv.success & plain.success
    with torch.no_grad():
        pred = model(x).argmax(1)
    benign = g(model, x, pred)
    d_adv = map_l1(g(model, adv.x_adv, y_t), benign)[both]
    d_pgd = map_l1(g(model, plain.x_adv, y_t), benign)[both]
    # closer per input, on at least 3/4 of the inputs: measured 8 of 8 for every interpreter (OMP 1 and 2, 2026-12-06).
    # The former mean ratio (< 0.85) had no 2x margin: measured 0.32 (gradcam) to 0.75 (rts), and c = 50 or 60 steps
    # still left grad, rts, ig and grad_softplus above 0.57
    assert (d_adv < d_pgd).float().mean() >= 0.75, (d_adv.tolist(), d_pgd.tolist())


def test_a_map_without_gradient_is_an_error_not_a_plain_attack(tiny):
    model, x, _, y_t = tiny

    class ExactGrad(GradInterpreter):
        """GRAD of the logit attacked on its exact map: a ReLU network's logit gradient is piecewise constant."""

        def attack_modifier(self):
            return contextlib.nullcontext()

        def attack_term(self, **options):
            return attacks.MapTerm(self)

    with pytest.raises(ValueError, match="no input gradient"):
        build_attack("adv2", "pgd", ExactGrad(score="logit"), warm_steps=1, steps=1)(model, x, y_t)


@pytest.mark.parametrize("name", FRAMEWORKS.names())
def test_every_framework_builds_and_returns_images_in_range(tiny, name):
    model, x, _, y_t = tiny
    res = build_attack("pgd", name, warm_steps=3)(model, x, y_t)
    assert res.x_adv.shape == x.shape and float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
    assert torch.equal(res.x_adv, torch.round(res.x_adv * 255) / 255)
    assert isinstance(get_framework(name), attacks.ThreatModel)


def _attack_arguments(name: str, model) -> dict:
    """What a named attack needs beyond the shared options (adaptive attacks name the defence they adapt to)."""
    if name == "adaptive_detector":
        torch.manual_seed(0)
        return {"interpreter": ["cam", "grad"], "detector": nn.Sequential(nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d(1),
                                                                          nn.Flatten())}
    if name == "adaptive_rts":
        return {"interpreter": build("rts", model), "restarts": 2}
    if name == "transfer_rts":
        return {"interpreter": build("rts", model), "source": build("rts", model)}
    return {"interpreter": "cam"}


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_named_attack_takes_the_config_options(tiny, name):
    model, x, _, y_t = tiny
    atk = build_attack(name, "pgd", eps=4 / 255, alpha=1 / 255, warm_steps=2, steps=2, **_attack_arguments(name, model))
    assert atk.threat.eps == 4 / 255 and atk.threat.alpha == 1 / 255
    res = atk(model, x, y_t)
    assert float((res.x_adv - x).abs().max()) <= 4 / 255 + 1e-7


def test_build_attack_defaults_are_the_tuned_values():
    atk = build_attack("adv2", "pgd", "mask")
    assert atk.c == 500.0 and atk.steps == 40 and atk.warm_steps == 60
    assert atk.term.reset_every == 5 and atk.term.target_deletion_weight == 0.3
    assert build_attack("adv2", "pgd", "cam").c == 20.0 and build_attack("adv2", "pgd", "grad").c == 30.0
    assert atk.threat.eps == 0.031 and build_attack("adv2", "pgd", "cam", c=3.0).c == 3.0
    with pytest.raises(ValueError, match="PGD options"):
        build_attack("adv2", "cw", "cam", eps=0.1)


def test_import_attacks_loads_neither_defend_nor_lightning():
    code = ("import sys, attacks; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('defend', 'pytorch_lightning', 'lightning', 'lightning_fabric', 'torchmetrics')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ golden values, new interpreters
def linear_model(k: int = 3) -> GapClassifier:
    """normalize -> identity -> GAP -> linear (float64): gradients are constant, IG is exact."""
    torch.manual_seed(0)
    return GapClassifier([nn.Identity()], 3, k, (0.5,) * 3, (0.25,) * 3, arch="lin", input_size=6,
                         stage_channels=[3]).double().eval()


def test_integrated_gradients_completeness_and_closed_form():
    model = linear_model()
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0, 1, 2, 1])
    ig = IntegratedGradients(steps=8, score="logit")
    attr = ig.attributions(model, x, c)
    with torch.no_grad():  # logit_c = sum_ch W[c, ch] mean_ij((x - 0.5) / 0.25) + b_c: the gradient is constant
        gap = model(x).gather(1, c.view(-1, 1)) - model(torch.zeros_like(x)).gather(1, c.view(-1, 1))
    assert torch.allclose(attr.flatten(1).sum(1), gap.squeeze(1), atol=1e-10)
    w = model.head.weight[c] / (0.25 * 36)
    assert torch.allclose(attr, x * w.view(4, 3, 1, 1), atol=1e-12)


def test_smoothgrad_without_noise_is_its_base_and_averages_noisy_maps():
    model, _, _ = train_tiny_classifier(steps=20)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    c = torch.tensor([1, 2, 3])
    grad = GradInterpreter()
    assert torch.allclose(SmoothGrad(grad, samples=3, sigma=0.0)(model, x, c), grad(model, x, c), atol=1e-6)
    sg = SmoothGrad(grad, samples=4, sigma=0.1, seed=5)
    u = torch.randn((4, *x.shape), generator=torch.Generator().manual_seed(5)) * 0.1
    by_hand = torch.stack([grad.explain(model, x + u[s], c) for s in range(4)]).mean(0)
    assert torch.allclose(sg(model, x, c, raw=True), by_hand, atol=1e-6)


def test_gradcam_on_a_gap_linear_model_is_the_relu_of_cam():
    model, _, _ = train_tiny_classifier(steps=20)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    c = torch.tensor([0, 4, 9])
    raw = GradCAM()(model, x, c, raw=True)
    cam = CAMInterpreter()(model, x, c, raw=True)
    h, w = cam.shape[-2:]
    assert torch.allclose(raw, cam.clamp_min(0) / (h * w), atol=1e-6)
