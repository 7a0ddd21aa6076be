"""The uint8 grid: quantised iterates are real 8-bit images inside the ball, and plain targeted PGD equals the
textbook loop (FIELD-NOTES "The uint8 grid")."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny import train_tiny_classifier

from attacks import build_attack, random_targets
from attacks.frameworks import grid_levels, quantise_linf

pytestmark = pytest.mark.usefixtures("one_thread")


def exactly_on_grid(x: torch.Tensor) -> bool:
    return bool(torch.equal(x, torch.round(x * 255) / 255))


def levels_from(x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.round((x - x0) * 255).abs()


@pytest.mark.parametrize("trial", range(20))
def test_quantised_iterates_are_on_the_grid_and_inside_the_ball(trial):
    g = torch.Generator().manual_seed(trial)
    x0 = torch.randint(0, 256, (4, 3, 9, 9), generator=g).float() / 255
    eps = float(torch.rand((), generator=g)) * 16 / 255 + 0.5 / 255
    if trial % 2:  # radii that are a whole number of levels, as configs write them
        eps = int(eps * 255 + 1) / 255
    alpha = float(torch.rand((), generator=g)) * 3 / 255
    # an iterate as PGD builds it: sums of sign steps of size alpha, clipped to the ball and to [0, 1]
    z = torch.zeros_like(x0)
    for _ in range(12):
        z = (z + alpha * torch.sign(torch.randn(x0.shape, generator=g))).clamp(-eps, eps)
        z = (x0 + z).clamp(0, 1) - x0
    q = quantise_linf(x0, x0 + z, eps)
    k = int(eps * 255 + 1e-6)
    assert k == grid_levels(eps)
    assert exactly_on_grid(q)
    assert bool((q >= 0).all() and (q <= 1).all())
    assert bool(((q - x0).abs() <= eps + 1e-7).all())
    assert int(levels_from(x0, q).max()) <= k
    # nearest level: wherever the nearest level is inside the ball, it is the one chosen
    nearest = torch.round(z * 255)
    inside = nearest.abs() <= k
    assert torch.equal(torch.round((q - x0) * 255)[inside], nearest[inside])


def test_a_whole_number_of_steps_keeps_every_level():
    """``k`` steps of ``1/255`` (and of 0.00784 ~ 2/255) are exactly ``k`` (``2k``) levels, not one fewer."""
    x0 = torch.full((1, 1, 4, 4), 100 / 255)
    for alpha, per_step in ((1 / 255, 1), (0.00784, 2)):
        z = torch.zeros_like(x0)
        for k in range(1, 5):
            z = z + alpha
            q = quantise_linf(x0, x0 + z, 8 / 255)
            assert torch.equal(torch.round((q - x0) * 255), torch.full_like(q, per_step * k))
    assert grid_levels(8 / 255) == 8 and grid_levels(0.031) == 7 and grid_levels(0.5 / 255) == 0


def test_off_grid_origin_stays_inside_ball_and_range():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g)
    x = (x0 + (torch.rand(x0.shape, generator=g) - 0.5) * 0.2).clamp(0, 1)
    q = quantise_linf(x0, x, 4 / 255)
    assert bool(((q - x0).abs() <= 4 / 255 + 1e-7).all()) and bool((q >= 0).all() and (q <= 1).all())


@pytest.fixture(scope="module")
def tiny(one_thread):
    model, test, _ = train_tiny_classifier()
    x, y = test["image"][:32], test["label"][:32]
    y_t = random_targets(y, 10, torch.Generator().manual_seed(0))
    return model, x, y_t


def textbook_targeted_pgd(model, x0, y_t, eps, alpha, steps):
    """Madry et al.'s loop, targeted, no random start; keeps per input the iterate with the highest target
    probability, a successful one first (the engine's selection rule), then rounds it to 8 bits."""
    x = x0.clone()
    best, best_key = x0.clone(), torch.full((x0.shape[0],), -1.0)
    for t in range(steps + 1):
        x.requires_grad_(True)
        logits = model(x)
        with torch.no_grad():
            p = logits.softmax(1)
            key = p.gather(1, y_t[:, None]).squeeze(1) + (p.argmax(1) == y_t).float()  # success, then probability
            better = key > best_key
            best[better], best_key[better] = x.detach()[better], key[better]
        if t == steps:
            break
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y_t, reduction="sum"), x)
        with torch.no_grad():
            x = x0 + (x - alpha * g.sign() - x0).clamp(-eps, eps)
            x = x.clamp(0, 1)
    return torch.round(best * 255) / 255


def test_plain_targeted_pgd_equals_the_textbook_loop(tiny):
    model, x, y_t = tiny
    eps, alpha, steps = 8 / 255, 1 / 255, 10
    ours = build_attack("pgd", framework_options={"eps": eps, "alpha": alpha, "random_start": False},
                        warm_steps=steps)(model, x, y_t)
    ref = textbook_targeted_pgd(model, x, y_t, eps, alpha, steps)
    assert torch.equal(ours.x_adv, ref)
    assert exactly_on_grid(ours.x_adv)
    assert int(levels_from(x, ours.x_adv).max()) == 8  # the whole budget is reachable, not 7 levels
    with torch.no_grad():
        ref_success = model(ref).argmax(1) == y_t
    assert torch.equal(ours.success, ref_success)
