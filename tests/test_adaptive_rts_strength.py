"""The strongest adaptive attack on an RTS (issue 27 item 1): restarts with a heavier encoder term, a c sweep, a longer
schedule and transfer runs, kept per input by the defender's own figure (map L1 to the benign map on the DEFENDED
RTS, among the runs that reach the target). Tiny budgets: the file runs in seconds."""
from __future__ import annotations

import math

import pytest
import torch
from _tiny import train_tiny_classifier

from attacks import ATTACKS, RTSInterpreter, RTSNetwork, build_attack, random_targets
from attacks.adaptive import Restarts, Transfer

pytestmark = pytest.mark.usefixtures("one_thread")
OPTS = dict(eps=16 / 255, alpha=2 / 255, warm_steps=6, steps=6, c=20.0, seed=0)


def _rts(model, seed: int) -> RTSInterpreter:
    torch.manual_seed(seed)
    return RTSInterpreter(RTSNetwork(model.stage_channels, model.num_classes, width=8).eval())


@pytest.fixture(scope="module")
def tiny(one_thread):
    model, test, _ = train_tiny_classifier(steps=60, n_test=64)
    for p in model.parameters():
        p.grad = None
    x = test["image"][:16]
    y_t = random_targets(test["label"][:16], 10, torch.Generator().manual_seed(0))
    return model, x, y_t, _rts(model, 1), _rts(model, 2)  # the defended RTS and another one (the transfer source)


def _l1(model, rts, x_adv, y_t, target_map):
    with torch.no_grad():
        return (rts.map(model, x_adv, y_t) - target_map).abs().flatten(1).mean(1)


def test_adaptive_rts_with_every_component_is_never_weaker_than_plain_adv2(tiny):
    """On the inputs plain ADV2 reaches, the kept run's defended map is at least as close to the benign map, and it
    succeeds wherever plain ADV2 does; the kept x_adv of every input is the output of the run ``last_choice`` names."""
    model, x, y_t, rts, other = tiny
    x_before = x.clone()
    flags = [(p, p.requires_grad) for net in (model, rts.network, other.network) for p in net.parameters()]
    plain = build_attack("adv2", "pgd", rts, **OPTS)(model, x, y_t)
    attack = build_attack("adaptive_rts", "pgd", rts, restarts=1, enc_weight=0.5, c_values=[5.0], long_factor=2.0,
                          sources=[other], **OPTS)
    assert attack.run_names == ["adv2", "enc", "c=5", "long x2", "transfer[0]"]
    res = attack(model, x, y_t)
    target_map = attack.target_maps(model, x)
    assert bool((res.success >= plain.success).all())
    ok = plain.success
    assert int(ok.sum()) >= 4  # enough inputs for the property to bite (measured 12 of 16; adaptive 14, OMP 1 and 2)
    assert bool((_l1(model, rts, res.x_adv, y_t, target_map)[ok]
                 <= _l1(model, rts, plain.x_adv, y_t, target_map)[ok] + 1e-6).all())
    assert torch.equal(x, x_before) and float((res.x_adv - x).abs().max()) <= 16 / 255 + 1e-6
    assert all(p.requires_grad == flag and p.grad is None for p, flag in flags)
    assert not model.training and not rts.network.training and not other.network.training

    runs = [a(model, x, y_t, target_map) for a in attack.attacks]  # each run alone (deterministic: same seeds)
    assert torch.equal(runs[0].x_adv, plain.x_adv)  # the first run is plain ADV2
    kept = torch.stack([r.x_adv for r in runs])[attack.last_choice, torch.arange(x.shape[0])]
    assert torch.equal(kept, res.x_adv)
    success = torch.stack([r.success for r in runs])
    assert torch.equal(success[attack.last_choice, torch.arange(x.shape[0])], res.success)
    wins = attack.wins()
    assert sum(wins.values()) == x.shape[0] and set(wins) == set(attack.run_names)


def test_the_transfer_run_is_scored_on_the_defended_map(tiny):
    """A source RTS whose map is constant (its own L1 to its benign map is 0 for every input) still gets the defended
    RTS's L1 as its score, and Restarts keeps it exactly where that L1 (success first) says so."""
    model, x, y_t, rts, other = tiny
    flat = _rts(model, 3)
    with torch.no_grad():
        flat.network.out.weight.zero_()
        flat.network.out.bias.zero_()  # a = b = 0: the mask is 0.5 everywhere, whatever the input
    weak = build_attack("adv2", "pgd", rts, **{**OPTS, "warm_steps": 2, "steps": 1})
    transfer = Transfer(build_attack("adv2", "pgd", flat, **OPTS), weak)
    target_map = weak.target_maps(model, x)
    t_res = transfer(model, x, y_t, target_map)
    own_l1 = _l1(model, flat, t_res.x_adv, y_t, flat.map(model, x, model(x).argmax(1)).detach())
    assert float(own_l1.max()) < 1e-6  # scored on the source, every transfer run would look perfect
    defended = _l1(model, rts, t_res.x_adv, y_t, target_map)
    assert torch.allclose(t_res.int_loss, defended, atol=1e-7) and float(defended.min()) > 1e-4

    w_res = weak(model, x, y_t, target_map)
    w_l1 = _l1(model, rts, w_res.x_adv, y_t, target_map)
    take = (t_res.success & ~w_res.success) | ((t_res.success == w_res.success) & torch.where(
        w_res.success, defended < w_l1, t_res.target_prob > w_res.target_prob))
    both = Restarts([weak, transfer], select_by_map=True, names=["weak", "transfer"])
    res = both(model, x, y_t, target_map)
    assert bool(take.any())  # the transfer run wins somewhere (measured 9 of 16)
    both_ok = w_res.success & t_res.success
    # scored on the source's map (0 everywhere) it would win every input both reach; on the defended map it does not
    assert bool((both_ok & ~take).any())  # measured: 7 of 7 kept from the weak run
    assert torch.equal(both.last_choice, take.long())
    assert torch.equal(res.x_adv[take], t_res.x_adv[take]) and torch.equal(res.x_adv[~take], w_res.x_adv[~take])
    assert both.wins() == {"weak": int((~take).sum()), "transfer": int(take.sum())}


def test_transfer_rts_is_a_registered_adaptive_attack_read_on_the_defended_rts(tiny):
    model, x, y_t, rts, other = tiny
    assert getattr(ATTACKS.get("transfer_rts"), "adaptive", False)
    attack = build_attack("transfer_rts", "pgd", rts, source=other, **OPTS)
    assert attack.interpreter is rts and attack.budget["transfer_from"] == "rts" and attack.budget["eps"] == 16 / 255
    res = attack(model, x, y_t)
    crafted = build_attack("adv2", "pgd", other, **OPTS)(model, x, y_t)
    assert torch.equal(res.x_adv, crafted.x_adv)  # crafted on the source, toward the source's own benign maps
    assert torch.allclose(res.int_loss, _l1(model, rts, res.x_adv, y_t, attack.target_maps(model, x)), atol=1e-7)


def test_adaptive_rts_budget_names_every_component(tiny):
    model, _, _, rts, other = tiny
    attack = build_attack("adaptive_rts", "pgd", rts, restarts=2, enc_weight=0.4, c_values=[5, 40.0], long_factor=1.5,
                          sources=[other, other], **OPTS)
    b = attack.budget
    names = ["adv2", "enc", "enc_r1", "c=5", "c=40", "long x1.5", "transfer[0]", "transfer[1]"]
    assert attack.run_names == names and b["runs"] == names and b["restarts"] == len(names)
    assert b["enc_restarts"] == 2 and b["enc_weight"] == 0.4
    assert b["c_values"] == [5.0, 40.0] and b["long_factor"] == 1.5 and b["sources"] == 2
    long_run = attack.attacks[attack.run_names.index("long x1.5")]
    assert (long_run.warm_steps, long_run.steps) == (math.ceil(6 * 1.5), math.ceil(6 * 1.5))
    assert long_run.term.enc_weight == rts.enc_weight  # the longer run is plain ADV2
    c_run = attack.attacks[attack.run_names.index("c=40")]
    assert (c_run.c, c_run.c_end, c_run.term.enc_weight) == (40.0, 40.0, 0.4)
    assert not c_run.threat.random_start


@pytest.mark.parametrize(("options", "fragment"), [
    ({"c_values": 5.0}, "c_values must be a list"),
    ({"c_values": [5.0, float("nan")]}, "c_values must be a list of finite numbers >= 0"),
    ({"long_factor": 0.5}, "long_factor must be a finite number >= 1"),
    ({"c_values": [5, 5.0]}, "c_values lists a value twice"),
    ({"sources": ["rts"]}, "sources must be a list of RTS interpreters"),
    ({"restarts": 0}, "restarts must be >= 1"),
])
def test_adaptive_rts_refuses_bad_options_in_one_line(tiny, options, fragment):
    rts = tiny[3]
    with pytest.raises(ValueError, match=fragment) as err:
        build_attack("adaptive_rts", "pgd", rts, **{**OPTS, **options})
    assert "\n" not in str(err.value)


def test_transfer_rts_needs_an_rts_source(tiny):
    with pytest.raises(ValueError, match="source=RTSInterpreter"):
        build_attack("transfer_rts", "pgd", tiny[3], source="cam", **OPTS)
