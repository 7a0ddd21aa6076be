"""The attack-speed benchmark's work counter: forward and gradient passes through the classifier per step."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from attack_speed import Passes, clock_of, count_passes, first_module, parse_args, per_step  # noqa: E402


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def test_count_passes_tells_a_pgd_step_from_a_double_backward():
    net, x = _net(), torch.rand(2, 3, 8, 8)
    with count_passes(net[0]) as pgd:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(net(xr).logsumexp(1).sum(), xr)
    assert (pgd.forwards, pgd.backwards) == (1, 1)
    with count_passes(net[0]) as grad_map:  # GRAD: the map is a gradient, its input gradient a second pass back
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xr)[:, 0].sum(), xr, create_graph=True)
        torch.autograd.grad(g.pow(2).sum(), xr)
    assert (grad_map.forwards, grad_map.backwards) == (1, 2)
    with count_passes(net[0]) as no_grad, torch.no_grad():
        net(x)
    assert (no_grad.forwards, no_grad.backwards) == (1, 0)
    assert not net[0]._forward_hooks  # removed on exit


def test_per_step_is_the_slope_of_the_two_step_counts():
    counts = {1: Passes(forwards=3, backwards=1), 3: Passes(forwards=5, backwards=5)}
    assert per_step(counts, (1, 3)) == (1.0, 2.0)


def test_first_module_sees_every_path_of_a_zoo_classifier():
    from defend.models.small import small_cnn

    model, x = small_cnn(num_classes=10, width=4).eval(), torch.rand(2, 3, 32, 32)
    assert first_module(model) is model.normalize
    with count_passes(first_module(model)) as passes, torch.no_grad():
        model(x)
        model.forward_stages(x)  # RTS's encoder pass runs the classifier too
        model.forward_features(x)  # CAM's
    assert passes.forwards == 3
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    assert first_module(plain) is plain


def test_cpu_runs_are_timed_on_the_process_clock_unless_asked():
    assert clock_of(parse_args(["--out", "o"]), torch.device("cpu")) == "cpu"
    assert clock_of(parse_args(["--out", "o", "--clock", "wall"]), torch.device("cpu")) == "wall"


def test_flush_denormals_flushes_inside_and_restores_the_callers_setting():
    """ADV2's denormal flush (``attacks.state.flush_denormals``) is on inside the block and leaves the caller's setting
    as it was, whichever it was, also when an attack runs."""
    import attacks
    from attacks.state import _flushing, flush_denormals

    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x = torch.rand(2, 1, 8, 8)
    for before in (False, True):
        torch.set_flush_denormal(before)
        with flush_denormals():
            assert _flushing()
        assert _flushing() == before
        attacks.build_attack("pgd", "pgd", None, warm_steps=1)(model, x, torch.tensor([0, 1]))
        assert _flushing() == before
    torch.set_flush_denormal(False)
