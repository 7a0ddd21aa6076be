"""Behavioural tests of the attack engine: PGD / C&W / StAdv, ADV2, AdvEdge / AdvEdge+ and their pieces.

A tiny GAP CNN (``small_cnn(width=8)``, 16 px) is trained in about a second on a synthetic shape task
(four shapes at random positions on smooth colour backgrounds, on the uint8 grid), then every test
attacks it in eval mode with fixed seeds. Assertions are about behaviour: constraints, caller state,
success, interpretation-map distances, batch independence, edge masks and input validation.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import build_attack
from attacks.adv2 import ADV2, AttackResult, _soft_targets, random_targets
from attacks.edges import edge_weights, sobel_edges
from attacks.frameworks import CW, PGD, StAdv, flow_loss, flow_warp, get_framework, pgd_maximise
from attacks.interpreters import CAMInterpreter, GradInterpreter
from defend.metrics import map_l1
from defend.models.small import small_cnn

S = 16  # image side
K = 4  # classes
EPS = 32 / 255  # budget of the success / map-distance tests (the model is trained on high-contrast shapes)
ALPHA = 2 / 255
TOL = 1e-6


# --------------------------------------------------------------------------------------------- data / model
def _shapes() -> Tensor:
    out = torch.zeros(K, 7, 7)
    out[0, 2:5, :] = 1  # horizontal bar
    out[1, :, 2:5] = 1  # vertical bar
    out[2, 3, :] = 1  # plus
    out[2, :, 3] = 1
    out[3, 0, 1:6] = 1  # hollow square
    out[3, 6, 1:6] = 1
    out[3, 1:6, 0] = 1
    out[3, 1:6, 6] = 1
    return out


def make_shapes(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` uint8-grid images ``[n, 3, 16, 16]``: one of four shapes on a smooth gradient, and its class."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    c0 = 0.3 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    c1 = 0.3 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, S).view(1, 1, 1, S)
    x = c0 + (c1 - c0) * ramp + 0.02 * torch.randn(n, 3, S, S, generator=g)
    fg = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, 0.05, 0.95) + 0.1 * torch.randn(n, 3, 1, 1, generator=g)
    px = torch.randint(0, S - 6, (n,), generator=g)
    py = torch.randint(0, S - 6, (n,), generator=g)
    shape = _shapes()
    mask = torch.zeros(n, 1, S, S)
    for i in range(n):
        mask[i, 0, py[i]:py[i] + 7, px[i]:px[i] + 7] = shape[y[i]]
    x = x * (1 - mask) + fg * mask
    return torch.round(x.clamp(0, 1) * 255) / 255, y


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(one_thread) -> nn.Module:
    """``small_cnn(4, width=8)`` trained for 3 epochs on 2000 synthetic shape images (~1 s, ~100% test accuracy)."""
    torch.manual_seed(0)
    x, y = make_shapes(2000, seed=0)
    net = small_cnn(K, width=8, input_size=S, mean=(0.5,) * 3, std=(0.25,) * 3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(3):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.grad = None
    xt, yt = make_shapes(256, seed=1)
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    # measured 1.00 (OMP 1 and 2, 2026-12-06); the batch below finds its 16 right inputs among 64 (all 64 right)
    assert acc > 0.9, f"the fixture model did not learn the shape task (test accuracy {acc:.2f})"
    return net


@pytest.fixture(scope="module")
def batch(model) -> tuple[Tensor, Tensor, Tensor]:
    """16 correctly classified test images, their labels and random (different) target classes."""
    x, y = make_shapes(64, seed=5)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok][:16], y[ok][:16]
    assert len(x) == 16
    target = random_targets(y, K, torch.Generator().manual_seed(0))
    return x, y, target


def linf(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().flatten(1).amax(1)


def on_uint8_grid(x: Tensor) -> bool:
    return bool(((x * 255 - torch.round(x * 255)).abs() < 1e-3).all())


def in_unit_range(x: Tensor) -> bool:
    return bool((x >= 0).all() and (x <= 1).all())


def small(name: str, eps: float = 8 / 255, random_start: bool = False, **kw) -> ADV2:
    opts = dict(warm_steps=4, steps=3, framework_options=dict(eps=eps, alpha=2 / 255, random_start=random_start))
    opts.update(kw)
    return build_attack(name, interpreter="cam", **opts)


# --------------------------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("name", ["pgd", "adv2", "advedge", "advedge_plus"])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_based_attacks_stay_in_ball_range_and_uint8_grid(model, batch, name, random_start):
    x, _, target = batch
    eps = 6 / 255
    result = small(name, eps=eps, random_start=random_start, warm_steps=6, steps=4)(model, x, target)
    assert isinstance(result, AttackResult)
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert bool((linf(result.x_adv, x) <= eps + TOL).all())
    assert in_unit_range(result.x_adv)
    assert on_uint8_grid(result.x_adv)
    assert result.steps == (6 if name == "pgd" else 10)
    assert result.int_loss is None if name == "pgd" else result.int_loss.shape == (len(x),)


def test_off_grid_input_stays_in_ball(model, batch):
    """Inputs that are not on the uint8 grid: the rounding toward zero still never leaves the ball."""
    x, _, target = batch
    g = torch.Generator().manual_seed(3)
    x_off = (x + (torch.rand(x.shape, generator=g) - 0.5) / 255).clamp(0, 1)
    eps = 5.5 / 255
    result = small("adv2", eps=eps, random_start=True)(model, x_off, target)
    assert bool((linf(result.x_adv, x_off) <= eps + TOL).all())
    assert in_unit_range(result.x_adv)


# --------------------------------------------------------------------------------------------- caller state
def _snapshot(net: nn.Module):
    return ([m.training for m in net.modules()], [p.requires_grad for p in net.parameters()],
            {k: v.clone() for k, v in net.state_dict().items()})


def _assert_untouched(net: nn.Module, snap) -> None:
    flags, req, state = snap
    assert [m.training for m in net.modules()] == flags
    assert [p.requires_grad for p in net.parameters()] == req
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():  # BatchNorm running stats included: the attack ran in eval mode
        assert torch.equal(v, state[k]), k


def _relu_is_exact() -> bool:
    """The ReLU's derivative at -0.5 is 0 (the ReLU surrogate would give h(-0.5) > 0)."""
    z = torch.tensor([-0.5], requires_grad=True)
    return float(torch.autograd.grad(F.relu(z).sum(), z)[0]) == 0.0


@pytest.mark.parametrize("name,interpreter", [("pgd", None), ("adv2", "cam"), ("adv2", "grad"), ("advedge_plus", "cam")])
def test_attack_leaves_caller_state_untouched(model, batch, name, interpreter):
    x, _, target = batch
    x_in, target_in = x[:4].clone(), target[:4].clone()
    x_copy, t_copy = x_in.clone(), target_in.clone()
    model.train()
    model.head.bias.requires_grad_(False)  # a mixed pattern of flags must come back as it was
    try:
        snap = _snapshot(model)
        attack = build_attack(name, interpreter=interpreter or "cam", warm_steps=3, steps=2,
                              framework_options=dict(eps=8 / 255, alpha=2 / 255))
        attack(model, x_in, target_in)
        _assert_untouched(model, snap)
        assert model.training
        assert torch.equal(x_in, x_copy) and torch.equal(target_in, t_copy)
        assert not x_in.requires_grad and x_in.grad is None
        assert _relu_is_exact()  # no ReLU modifier left active
    finally:
        model.head.bias.requires_grad_(True)
        model.eval()


@pytest.mark.parametrize("where", ["term_loss", "threat_step", "threat_init"])
def test_attack_restores_state_after_an_exception(model, batch, monkeypatch, where):
    x, _, target = batch
    x_in = x[:4].clone()
    x_copy = x_in.clone()
    interpreter = "grad" if where == "term_loss" else "cam"  # grad: the ReLU surrogate must be undone too
    attack = build_attack("adv2", interpreter=interpreter, warm_steps=2, steps=2,
                          framework_options=dict(eps=8 / 255, alpha=2 / 255))

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    if where == "term_loss":
        monkeypatch.setattr(attack.term, "loss_and_logits", boom)
    elif where == "threat_step":
        monkeypatch.setattr(attack.threat, "step", boom)
    else:
        monkeypatch.setattr(attack.threat, "init", boom)
    model.train()
    model.features[0][0].weight.requires_grad_(False)
    try:
        snap = _snapshot(model)
        with pytest.raises(RuntimeError, match="injected failure"):
            attack(model, x_in, target[:4])
        _assert_untouched(model, snap)
        assert model.training
        assert torch.equal(x_in, x_copy)
        assert _relu_is_exact()  # no ReLU modifier left active
    finally:
        model.features[0][0].weight.requires_grad_(True)
        model.eval()


# --------------------------------------------------------------------------------------------- effectiveness
@pytest.fixture(scope="module")
def pgd_result(model, batch) -> AttackResult:
    x, _, target = batch
    attack = build_attack("pgd", warm_steps=60, framework_options=dict(eps=EPS, alpha=ALPHA))
    return attack(model, x, target)


def _maps(model, interpreter, x, cls):
    return interpreter(model, x, cls)


def test_plain_pgd_reaches_the_target(model, batch, pgd_result):
    x, _, target = batch
    assert pgd_result.success.float().mean().item() >= 0.9  # measured 1.00 (16 of 16), OMP 1 and 2, 2026-12-06
    with torch.no_grad():
        probs = model(pgd_result.x_adv).softmax(1)
    # the reported success / probabilities describe the returned (quantised) images
    assert torch.equal(pgd_result.success, probs.argmax(1) == target)
    assert torch.allclose(pgd_result.target_prob, probs.gather(1, target.view(-1, 1)).squeeze(1), atol=1e-5)
    assert torch.equal(pgd_result.target, target)


def test_adv2_cam_succeeds_with_closer_maps_than_pgd(model, batch, pgd_result):
    x, y, target = batch
    attack = build_attack("adv2", interpreter="cam", warm_steps=30, steps=30,
                          framework_options=dict(eps=EPS, alpha=ALPHA))
    result = attack(model, x, target)
    assert result.success.float().mean().item() >= 0.9  # measured 1.00 (16 of 16), OMP 1 and 2, 2026-12-06
    assert bool((linf(result.x_adv, x) <= EPS + TOL).all())
    cam = CAMInterpreter()
    benign = cam(model, x, y)
    d_adv2 = map_l1(cam(model, result.x_adv, target), benign)
    d_pgd = map_l1(cam(model, pgd_result.x_adv, target), benign)
    both = result.success & pgd_result.success
    assert d_adv2[both].mean() < 0.6 * d_pgd[both].mean()  # measured ratio 0.19 (0.031 vs 0.161), OMP 1 and 2, 2026-12-06
    assert (d_adv2[both] < d_pgd[both]).float().mean() >= 0.75  # measured 16 of 16 (OMP 1 and 2)


def test_adaptive_ensemble_lowers_cam_and_grad_distances(model, batch, pgd_result):
    x, y, target = batch
    attack = build_attack("adv2", interpreter=["cam", "grad"], warm_steps=30, steps=40, c=5.0,
                          framework_options=dict(eps=EPS, alpha=ALPHA))
    result = attack(model, x, target)
    assert result.success.float().mean().item() >= 0.9  # measured 1.00 (16 of 16), OMP 1 and 2, 2026-12-06
    assert bool((linf(result.x_adv, x) <= EPS + TOL).all())
    # per input, closer maps than PGD on at least 12 of 16: measured 16 (CAM) and 15 (GRAD) of 16, OMP 1 and 2, 2026-12-06.
    # On average the ensemble's distance is 0.33 of PGD's on CAM but 0.70 on GRAD (no 2x margin under 1): the mean is
    # asserted on CAM only
    for interpreter in (CAMInterpreter(), GradInterpreter()):
        benign = interpreter(model, x, y)
        d_ens = map_l1(interpreter(model, result.x_adv, target), benign)
        d_pgd = map_l1(interpreter(model, pgd_result.x_adv, target), benign)
        closer = int((d_ens < d_pgd).sum())
        assert closer >= 12, f"{interpreter.name}: the ensemble is closer than PGD on only {closer} of 16 inputs"
        if interpreter.name == "cam":
            assert d_ens.mean() < d_pgd.mean(), f"cam: ensemble {d_ens.mean():.4f} vs PGD {d_pgd.mean():.4f}"


def test_mask_term_runs_and_stays_in_ball(model, batch):
    x, _, target = batch
    eps = 8 / 255
    attack = build_attack("adv2", interpreter="mask", warm_steps=5, steps=4,
                          interpreter_options={"mask": {"iterations": 10}},
                          term_options={"mask": {"inner_steps": 2, "reset_every": 3, "reset_iterations": 5}},
                          framework_options=dict(eps=eps, alpha=2 / 255))
    result = attack(model, x[:4], target[:4])
    assert result.x_adv.shape == x[:4].shape
    assert bool((linf(result.x_adv, x[:4]) <= eps + TOL).all())
    assert in_unit_range(result.x_adv) and on_uint8_grid(result.x_adv)
    # the map loss of the kept iterate is reported for successes (failures keep +inf: nothing was selected)
    assert result.int_loss is not None and result.int_loss.shape == (4,)
    assert bool(torch.isfinite(result.int_loss[result.success]).all())


# --------------------------------------------------------------------------------------------- batching
def test_batch_gives_the_same_result_as_each_example_alone(model, batch):
    x, _, target = batch
    x, target = x[:6], target[:6]

    def attack():
        return build_attack("adv2", interpreter="cam", warm_steps=5, steps=5, seed=7,
                            framework_options=dict(eps=16 / 255, alpha=ALPHA, random_start=False))

    together = attack()(model, x, target)
    alone = [attack()(model, x[i:i + 1], target[i:i + 1]) for i in range(len(x))]
    x_alone = torch.cat([r.x_adv for r in alone])
    diff = (together.x_adv - x_alone).abs()
    assert diff.max() <= 1 / 255 + 1e-5  # at most one grey level apart anywhere ...
    assert (diff > 1e-6).float().mean() <= 0.01  # ... and identical almost everywhere
    assert torch.equal(together.success, torch.cat([r.success for r in alone]))
    assert torch.allclose(together.target_prob, torch.cat([r.target_prob for r in alone]), atol=1e-3)


# --------------------------------------------------------------------------------------------- AdvEdge
@pytest.mark.parametrize("random_start", [False, True])
def test_advedge_plus_changes_only_edge_pixels(model, batch, random_start):
    x, _, target = batch
    attack = small("advedge_plus", eps=16 / 255, random_start=random_start, warm_steps=6, steps=4)
    mask = edge_weights(x, "binary", attack.edge_threshold)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean() < 1  # the test images have both edge and flat regions
    result = attack(model, x, target)
    changed = (result.x_adv != x).any(1, keepdim=True)  # per pixel, across channels
    assert changed.any()
    assert not bool((changed & (mask == 0)).any())


def test_sobel_edges_range_and_constant_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 12, 12, generator=g)
    e = sobel_edges(x)
    assert e.shape == (3, 1, 12, 12)
    assert bool((e >= 0).all() and (e <= 1 + 1e-6).all())
    assert torch.allclose(e.flatten(1).amax(1), torch.ones(3))
    const = torch.full((2, 3, 12, 12), 0.4)
    assert float(sobel_edges(const).abs().max()) < 1e-5
    assert edge_weights(x, None) is None
    assert torch.equal(edge_weights(x, "soft"), e)
    gray = torch.rand(2, 1, 12, 12, generator=g)
    assert sobel_edges(gray).shape == (2, 1, 12, 12)
    with pytest.raises(ValueError, match="edge mode"):
        edge_weights(x, "fuzzy")


def test_advedge_soft_weighting_scales_every_step(model, batch):
    """Each PGD step moves a pixel by at most ``alpha * E(x)``: the total change is bounded per pixel (plus the half
    level that rounding to the uint8 grid may add)."""
    x, _, target = batch
    warm, joint = 6, 4
    result = small("advedge", eps=16 / 255, warm_steps=warm, steps=joint)(model, x, target)
    bound = (warm + joint) * (2 / 255) * sobel_edges(x) + 0.5 / 255  # [N, 1, H, W], broadcast over channels
    assert bool(((result.x_adv - x).abs() <= bound + TOL).all())
    flat = sobel_edges(x) < 0.05
    assert flat.any()
    plain = small("adv2", eps=16 / 255, warm_steps=warm, steps=joint)(model, x, target)
    # without the weighting the same budget moves flat pixels by more than the bound allows
    assert float(((plain.x_adv - x).abs().amax(1, keepdim=True))[flat].max()) > float(bound[flat].max()) + 1e-3


# --------------------------------------------------------------------------------------------- early stop
def test_early_stop_freezes_finished_examples(model, batch):
    x, y, target = batch
    x, y, target = x[:8], y[:8], target[:8].clone()
    target[:4] = y[:4]  # already successful at step 0: must be frozen at the benign image
    ticks: list[int] = []
    common = dict(warm_steps=40, framework_options=dict(eps=EPS, alpha=ALPHA))
    stopped = build_attack("pgd", early_stop=True, check_every=1, progress=ticks.append, **common)(model, x, target)
    full = build_attack("pgd", early_stop=False, **common)(model, x, target)
    assert bool(stopped.success.all())
    assert torch.equal(stopped.x_adv[:4], x[:4])  # frozen from the first step
    assert not torch.equal(full.x_adv[:4], x[:4])  # without early stop they keep moving (raising p_t)
    assert len(ticks) < 40  # every example finished, so the loop stopped early
    # frozen at their first successful iterate: never further from x than the full run, never more confident
    assert bool((linf(stopped.x_adv, x) <= linf(full.x_adv, x) + TOL).all())
    assert bool((stopped.target_prob <= full.target_prob + 1e-6).all())


# --------------------------------------------------------------------------------------------- C&W / StAdv
@pytest.mark.parametrize("framework", ["cw", "stadv"])
@pytest.mark.parametrize("name", ["pgd", "adv2", "advedge"])
def test_cw_and_stadv_produce_valid_images(model, batch, framework, name):
    x, _, target = batch
    opts = {"cw": dict(lr=0.05), "stadv": dict(lr=0.05, max_flow=2.0)}[framework]
    attack = build_attack(name, framework=framework, interpreter="cam", warm_steps=4, steps=3,
                          framework_options=opts)
    result = attack(model, x[:4], target[:4])
    assert result.x_adv.shape == x[:4].shape
    assert in_unit_range(result.x_adv) and on_uint8_grid(result.x_adv)
    assert bool(torch.isfinite(result.target_prob).all())


def test_cw_identity_at_start_and_penalty():
    x = torch.tensor([0.0, 0.2, 0.5, 1.0]).view(1, 1, 2, 2).expand(2, 3, 2, 2).contiguous()
    cw = CW(l2_weight=0.5)
    z = cw.init(x, None)
    assert torch.allclose(cw.apply(x, z, None), x, atol=1e-5)
    x2 = x.clone()
    x2[0, 0, 0, 0] = 0.3
    assert torch.allclose(cw.penalty(x, x2, z), torch.tensor([0.5 * 0.09, 0.0]))
    w = torch.zeros(2, 1, 2, 2)
    assert torch.allclose(cw.apply(x, z + 1.0, w), x)  # zero edge weight: no change at all


def test_flow_warp_identity_and_integer_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 7, 9, generator=g)
    zero = torch.zeros(2, 2, 7, 9)
    assert torch.allclose(flow_warp(x, zero), x, atol=1e-6)
    right = zero.clone()
    right[:, 0] = 1.0  # output (u, v) samples x at (u + 1, v)
    assert torch.allclose(flow_warp(x, right)[..., :-1], x[..., 1:], atol=1e-6)
    down = zero.clone()
    down[:, 1] = -2.0  # output row i samples row i - 2
    assert torch.allclose(flow_warp(x, down)[..., 2:, :], x[..., :-2, :], atol=1e-6)
    st = StAdv()
    assert torch.allclose(st.apply(x, st.init(x, None), None), x, atol=1e-6)


def test_flow_loss_values():
    h, w = 6, 8
    floor = 4 * h * w * 1e-5  # sqrt(1e-10) smoothing per neighbour pair
    const = torch.full((2, 2, h, w), 0.7)
    assert torch.allclose(flow_loss(const), torch.full((2,), floor), rtol=1e-3)  # zero up to the sqrt smoothing
    assert torch.allclose(flow_loss(const), flow_loss(torch.zeros_like(const)))
    step = torch.zeros(1, 2, h, w)
    step[:, 0, :, w // 2:] = 1.0  # one vertical discontinuity of size 1: 2 pairs per row
    assert torch.allclose(flow_loss(step), torch.tensor([2.0 * h]), atol=2 * floor)


# --------------------------------------------------------------------------------------------- pgd_maximise
def test_pgd_maximise_increases_the_loss_and_stays_in_ball(model, batch):
    x, y, _ = batch
    eps = 4 / 255

    def loss_fn(inp: Tensor) -> Tensor:
        return F.cross_entropy(model(inp), y, reduction="none")

    with torch.no_grad():
        before = loss_fn(x)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x_max = pgd_maximise(loss_fn, x, eps=eps, alpha=1 / 255, steps=6, generator=torch.Generator().manual_seed(0))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    with torch.no_grad():
        after = loss_fn(x_max)
    assert after.mean() > before.mean()  # measured 0.049 vs 0.00084 (OMP 1 and 2, 2026-12-06)
    assert (after > before).float().mean() >= 0.9  # measured 16 of 16 (OMP 1 and 2)
    assert bool((linf(x_max, x) <= eps + TOL).all()) and in_unit_range(x_max)
    assert not x_max.requires_grad

    # a linear objective has a known maximiser in the ball: x0 + eps * sign(w), clipped to [0, 1]
    wgt = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    lin = pgd_maximise(lambda inp: (inp * wgt).flatten(1).sum(1), x[:2], eps=eps, alpha=eps / 2, steps=3,
                       random_start=False)
    assert torch.allclose(lin, (x[:2] + eps * wgt.sign()).clamp(0, 1), atol=1e-6)


# --------------------------------------------------------------------------------------------- label smoothing
def test_soft_targets_are_distributions_centred_on_the_target():
    g = torch.Generator().manual_seed(0)
    y_t = torch.randint(0, 7, (50,), generator=g)
    rho = 0.2
    soft = _soft_targets(y_t, 7, rho, torch.Generator().manual_seed(1))
    assert soft.shape == (50, 7)
    assert torch.allclose(soft.sum(1), torch.ones(50), atol=1e-6)
    on_target = soft.gather(1, y_t.view(-1, 1)).squeeze(1)
    assert bool(((on_target >= 1 - rho - 1e-6) & (on_target <= 1 + 1e-6)).all())
    assert torch.equal(soft.argmax(1), y_t)
    others = soft.masked_fill(F.one_hot(y_t, 7).bool(), float("nan"))
    rest = (1 - on_target) / 6
    assert torch.allclose(others.nan_to_num(0).sum(1), 1 - on_target, atol=1e-6)
    assert bool(((others - rest.view(-1, 1)).abs().nan_to_num(0) < 1e-6).all())  # spread evenly
    again = _soft_targets(y_t, 7, rho, torch.Generator().manual_seed(1))
    assert torch.equal(soft, again)  # seeded


def test_random_targets_differ_from_labels():
    y = torch.arange(40) % 5
    t = random_targets(y, 5, torch.Generator().manual_seed(0))
    assert bool((t != y).all()) and int(t.min()) >= 0 and int(t.max()) < 5
    assert torch.equal(t, random_targets(y, 5, torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------------------------- validation
def test_unknown_names_fail_with_the_choices():
    with pytest.raises(ValueError, match="advedge_plus"):
        build_attack("fgsm")
    with pytest.raises(ValueError, match="pgd, cw, stadv"):
        build_attack("adv2", framework="deepfool")
    with pytest.raises(ValueError, match="choose one of: grad, cam, mask"):
        build_attack("adv2", interpreter="lime")
    with pytest.raises(ValueError, match="pgd, cw, stadv"):
        get_framework("nope")
    with pytest.raises(ValueError, match="edge mode"):
        ADV2("cam", edge="sobel")


@pytest.mark.parametrize("options", [dict(eps=-0.1), dict(alpha=-1 / 255), dict(eps=0.0)])
def test_bad_budgets_raise(options):
    with pytest.raises(ValueError, match="eps|alpha"):
        build_attack("adv2", framework_options=options)
    with pytest.raises(ValueError):
        PGD(**options)


def test_bad_inputs_raise(model, batch):
    x, _, target = batch
    attack = small("adv2")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(model, x[:2] * 2 - 0.5, target[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(model, x[:2] * 255, target[:2])
    with pytest.raises(ValueError, match="target classes"):
        attack(model, x[:2], torch.tensor([0, K]))
    with pytest.raises(ValueError, match="target classes"):
        attack(model, x[:2], torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="entries"):
        attack(model, x[:2], target[:3])
    with pytest.raises(ValueError):
        build_attack("adv2", warm_steps=-1)
    with pytest.raises(ValueError, match="confidence"):
        build_attack("adv2", confidence=1.0)


def test_saturated_pixels_still_get_gradients():
    """Pixels exactly at 0 or 1 must be movable inward (``clamp`` alone back-propagates zero there)."""
    x0 = torch.tensor([0.0, 1.0, 0.5, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    z = torch.zeros_like(x0, requires_grad=True)
    (g,) = torch.autograd.grad(PGD().apply(x0, z, None).sum(), z)
    assert torch.equal(g, torch.ones_like(g))
    img = torch.full((1, 3, 3, 3), 0.5)
    img[..., 1, 1] = 1.0  # a saturated centre pixel: moving its sampling point right darkens it
    flow = torch.zeros(1, 2, 3, 3, requires_grad=True)
    (g,) = torch.autograd.grad(StAdv().apply(img, flow, None)[..., 1, 1].sum(), flow)
    assert float(g[0, 0, 1, 1]) < 0
