"""bf16 autocast of the attack engine (the GPU mixed-precision path; on CPU unless ``DEFEND_TEST_DEVICE`` names another
device, see ``tests/test_device.py``): the perturbation stays float32 and in its ball, success and map distances match
float32 within noise."""
from __future__ import annotations

import pytest
import torch
from _tiny import train_tiny_classifier
from test_device import resolve_device

from attacks import ADV2, build_attack, random_targets
from attacks.interpreters import get_interpreter
from defend.metrics import map_l1


@pytest.fixture(scope="module")
def tiny():
    """The tiny classifier and 16 inputs it classifies right, on the device ``DEFEND_TEST_DEVICE`` names (cpu)."""
    device = resolve_device()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, test, _ = train_tiny_classifier(n_test=128)  # 16 right inputs needed: 52 of 128 are (28 of the first 64)
    with torch.no_grad():
        ok = model(test["image"]).argmax(1) == test["label"]
    yield model.to(device), test["image"][ok][:16].to(device), test["label"][ok][:16].to(device)
    torch.set_num_threads(before)


@pytest.mark.parametrize("interpreter", ["cam", "grad"])
def test_bf16_autocast_matches_float32(tiny, interpreter):
    model, x, y = tiny
    y_t = random_targets(y.cpu(), 10, torch.Generator().manual_seed(0)).to(y.device)
    g = get_interpreter(interpreter)
    benign = g(model, x, y)
    out = {}
    for mode in (None, "bf16"):
        atk = build_attack("adv2", "pgd", interpreter, warm_steps=20, steps=20, c=20.0, autocast=mode,
                           framework_options={"eps": 0.063, "alpha": 2 / 255})
        res = atk(model, x, y_t, benign)
        assert res.x_adv.dtype == torch.float32
        assert float((res.x_adv - x).abs().max()) <= 0.063 + 1e-6
        assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
        out[mode] = (res.success.float().mean().item(), map_l1(g(model, res.x_adv, y_t), benign).mean().item())
    (asr32, l1_32), (asr16, l1_16) = out[None], out["bf16"]
    # measured (OMP 1 and 2, 2026-12-06): success 1.00 in float32 and bf16 for CAM and GRAD; map distance 0.0837 vs
    # 0.0834 (CAM) and 0.0609 vs 0.0641 (GRAD): 0.0003 and 0.0032 apart where 0.031 and 0.025 are allowed
    assert asr32 >= 0.8, out
    assert abs(asr32 - asr16) <= 2 / 16  # at most two of 16 inputs flip
    assert abs(l1_32 - l1_16) <= 0.25 * l1_32 + 0.01


def test_bf16_autocast_mask_attack_matches_float32(tiny):
    """The bilevel MASK attack (inner mask steps, lookahead double backward, step-size search) under bf16."""
    model, x, y = tiny
    y_t = random_targets(y.cpu(), 10, torch.Generator().manual_seed(0)).to(y.device)
    g = get_interpreter("mask", iterations=50)
    benign = g(model, x, y)
    out = {}
    for mode in (None, "bf16"):
        atk = build_attack("adv2", "pgd", g, warm_steps=20, steps=20, c=5000.0, autocast=mode,
                           term_options={"mask": {"inner_steps": 2, "reset_every": 5, "reset_iterations": 50, "lookahead_lr": 0.5}},
                           framework_options={"eps": 0.063, "alpha": 2 / 255})
        res = atk(model, x, y_t, benign)
        assert res.x_adv.dtype == torch.float32 and float((res.x_adv - x).abs().max()) <= 0.063 + 1e-6
        out[mode] = (res.success.float().mean().item(), map_l1(g(model, res.x_adv, y_t), benign).mean().item())
    pgd = build_attack("pgd", "pgd", g, warm_steps=40, framework_options={"eps": 0.063, "alpha": 2 / 255})(model, x, y_t)
    l1_pgd = map_l1(g(model, pgd.x_adv, y_t), benign).mean().item()
    (asr32, l1_32), (asr16, l1_16) = out[None], out["bf16"]
    # measured (OMP 1 and 2, 2026-12-06): success 1.00 in float32 and bf16; map distance 0.154 vs 0.143 (0.011 apart
    # where 0.048 is allowed), and bf16's 0.143 is 0.38 of PGD's 0.374. At c = 500 that ratio was 0.64: no 2x margin
    # under the former 0.7; c = 5000 and 0.8 give one
    assert asr32 >= 0.8 and abs(asr32 - asr16) <= 2 / 16, out
    assert abs(l1_32 - l1_16) <= 0.25 * l1_32 + 0.01, out
    assert l1_16 <= 0.8 * l1_pgd, (out, l1_pgd)  # still ADV2: the maps stay much closer to benign than PGD's


def test_unknown_autocast_is_rejected():
    with pytest.raises(ValueError, match="autocast"):
        ADV2("cam", autocast="int8")
