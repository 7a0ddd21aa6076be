"""Tests of the robust module as Boopathy et al. define it, beside ours (defend.robust): the reference D (raw CAMs,
summed, Eqn 20's 1/2) by hand, the normalised D unchanged, the single-adversarial-input Int-Adv (its maximiser and
its loss), BatchNorm trained by the CE input alone, the BatchNorm-free model in every mode, and the reference config."""
from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defend.models import GapClassifier
from defend.robust import (
    MODES,
    InnerMaximisation,
    RobustClassifierModule,
    ce_discrepancy_attack,
    discrepancy_l1_2class,
    interpretation_discrepancy,
    maps_and_logits,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gap(seed: int = 0) -> GapClassifier:
    """normalize -> 1x1 conv (2 channels) -> GAP -> linear (3 classes), float64, on 4x4 inputs."""
    torch.manual_seed(seed)
    model = GapClassifier([nn.Sequential(nn.Conv2d(3, 2, 1))], 2, 3, MEAN, STD, arch="tiny", input_size=4,
                          stage_channels=[2])
    return model.double().eval()


def hand_raw_cams_and_softmax(model: GapClassifier, x: torch.Tensor) -> tuple[list, list]:
    """Per example, by hand: the RAW CAM of every class, ``sum_k W[c, k] a_k[pixel]`` (16 pixels, no min-max), and
    the softmax of the logits ``mean_pixels(CAM_c) + b_c``."""
    conv, head = model.features[0][0], model.head
    a, b = conv.weight[:, :, 0, 0].tolist(), conv.bias.tolist()
    w, bh = head.weight.tolist(), head.bias.tolist()
    mean, std = model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()  # float32-stored
    cams, probs = [], []
    for i in range(x.shape[0]):
        pix = [(r, s) for r in range(4) for s in range(4)]
        feats = [[b[k] + sum(a[k][c] * (float(x[i, c, r, s]) - mean[c]) / std[c] for c in range(3)) for (r, s) in pix]
                 for k in range(2)]
        cam = [[sum(w[c][k] * feats[k][p] for k in range(2)) for p in range(16)] for c in range(3)]
        logits = [sum(cam[c]) / 16 + bh[c] for c in range(3)]
        e = [math.exp(v - max(logits)) for v in logits]
        cams.append(cam)
        probs.append([v / sum(e) for v in e])
    return cams, probs


def _pair(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=gen)
    return x, (x + 0.2 * torch.randn(x.shape, dtype=torch.float64, generator=gen)).clamp(0, 1)


def test_reference_discrepancy_equals_hand_computation_with_the_half():
    model = tiny_gap()
    x, x2 = _pair()
    y, y_t = torch.tensor([1, 2]), torch.tensor([0, 0])
    cams, _ = hand_raw_cams_and_softmax(model, x)
    cams2, probs2 = hand_raw_cams_and_softmax(model, x2)
    expected, expected_2c = [], []
    for i in range(2):
        l1 = [sum(abs(p - q) for p, q in zip(cams[i][c], cams2[i][c])) for c in range(3)]  # summed, raw
        yi = int(y[i])
        rest = sum(probs2[i][j] for j in range(3) if j != yi)
        expected.append(0.5 * (l1[yi] + sum(probs2[i][j] / rest * l1[j] for j in range(3) if j != yi)))
        expected_2c.append(0.5 * (l1[yi] + l1[int(y_t[i])]))
    got = interpretation_discrepancy(model, x, x2, y, kind="reference")
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-10)
    got_2c = discrepancy_l1_2class(model, x, x2, y, y_t, kind="reference")
    assert torch.allclose(got_2c, torch.tensor(expected_2c, dtype=torch.float64), rtol=0, atol=1e-10)
    # the raw maps themselves (no min-max): the reference's CAM
    maps, _ = maps_and_logits(model, x, "cam", kind="reference")
    assert torch.allclose(maps[0].flatten(1), torch.tensor(cams[0], dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"discrepancy must be one of \('normalised', 'reference'\), got 'raw'"):
        interpretation_discrepancy(model, x, x2, y, kind="raw")


def _old_discrepancy(model: GapClassifier, x: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The discrepancy before the option existed (min-max maps, mean over pixels, no 1/2), op for op."""
    from attacks.interpreters import CAMInterpreter
    from attacks.maps import minmax

    raw_x, _ = CAMInterpreter().explain_classes(model, x)
    raw_2, logits_2 = CAMInterpreter().explain_classes(model, x2)
    l1 = (minmax(raw_x, start_dim=2) - minmax(raw_2, start_dim=2)).abs().flatten(2).mean(2)
    p = logits_2.softmax(1)
    p_other = p.masked_fill(F.one_hot(y, p.shape[1]).bool(), 0.0)
    w = p_other / p_other.sum(1, keepdim=True).clamp_min(1e-12)
    return l1.gather(1, y.view(-1, 1)).squeeze(1) + (w * l1).sum(1)


def test_normalised_discrepancy_is_unchanged():
    model = tiny_gap()
    x, x2 = _pair(5)
    y = torch.tensor([0, 2])
    old = _old_discrepancy(model, x, x2, y)
    assert torch.equal(interpretation_discrepancy(model, x, x2, y), old)
    assert torch.equal(interpretation_discrepancy(model, x, x2, y, kind="normalised"), old)
    ref = interpretation_discrepancy(model, x, x2, y, kind="reference")
    assert not torch.allclose(ref, old)  # the option changes D
    module = RobustClassifierModule(arch="small_cnn", num_classes=10, model_options={"width": 2})
    assert module.hparams.discrepancy == "normalised" and module.hparams.batchnorm == "joint"


# --------------------------------------------------------------------------------------------- single-input Int-Adv
def _small(mode: str, seed: int = 0, width: int = 4, **kw) -> RobustClassifierModule:
    torch.manual_seed(seed)
    inner = kw.pop("inner", InnerMaximisation(eps=8 / 255, steps=3, alpha=3 / 255))
    return RobustClassifierModule(arch="small_cnn", num_classes=10, model_options={"width": width, **kw.pop("mo", {})},
                                  mode=mode, inner=inner, **kw)


def _objective(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """``CE(f(x'), y) + gamma * D_ref(x, x')`` per example (what the reference's train_int maximises)."""
    with torch.no_grad():
        ce = F.cross_entropy(model(x_adv), y, reduction="none")
        return ce + gamma * interpretation_discrepancy(model, x, x_adv, y, kind="reference")


def test_single_input_maximiser_increases_ce_plus_gamma_d_inside_the_ball():
    from _tiny import train_tiny_classifier

    model, test, _ = train_tiny_classifier(steps=60, width=4, n_test=32)
    model.zero_grad(set_to_none=True)  # the training's last gradients
    x, y = test["image"], test["label"]
    gen = torch.Generator().manual_seed(0)
    eps, gamma = 8 / 255, 0.02  # the reference config's weight on D's reference scale
    x_rand = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps).clamp(0, 1)
    x_adv = ce_discrepancy_attack(model, x, y, gamma, eps, 2 / 255, 10, generator=gen, kind="reference")
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    before, at_rand = _objective(model, x, x, y, gamma), _objective(model, x, x_rand, y, gamma)
    after = _objective(model, x, x_adv, y, gamma)
    # measured (OMP 1): mean 6.26 after vs 2.19 at x and 2.26 at a random point of the ball; every input rose
    assert float(after.mean()) > 1.5 * float(at_rand.mean()) and float(after.mean()) > 1.5 * float(before.mean())
    assert bool((after > before).all())
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_single_input_training_loss_equals_hand_formula(monkeypatch):
    """On a fixed x' (the maximiser replaced by a constant): loss = CE(f(x'), y) + gamma * 1/2 (summed raw-CAM L1 of
    the true class + the softmax-weighted others), both computed by hand on the tiny GAP model."""
    import defend.robust as robust

    gamma = 0.3
    module = RobustClassifierModule(arch="small_cnn", num_classes=3, model_options={"width": 2},
                                    mode="int_adv_single", discrepancy="reference", gamma=gamma,
                                    inner=InnerMaximisation(eps=0.2, steps=1, alpha=0.1))
    module.model = tiny_gap()
    x, x_fixed = _pair(7)
    y = torch.tensor([2, 0])
    seen = {}

    def fixed(model, x_in, y_in, g, *args):  # (..., gamma, eps, alpha, steps, interpretation, start, gen, kind)
        seen["gamma"], seen["kind"] = g, args[-1]
        return x_fixed

    monkeypatch.setattr(robust, "ce_discrepancy_attack", fixed)
    out = module.compute_loss(x, y)
    assert seen == {"gamma": gamma, "kind": "reference"}  # the maximiser of CE + gamma D, on D's reference scale
    cams, _ = hand_raw_cams_and_softmax(module.model, x)
    cams2, probs2 = hand_raw_cams_and_softmax(module.model, x_fixed)
    total = 0.0
    for i in range(2):
        yi = int(y[i])
        ce = -math.log(probs2[i][yi])
        l1 = [sum(abs(p - q) for p, q in zip(cams[i][c], cams2[i][c])) for c in range(3)]
        rest = sum(probs2[i][j] for j in range(3) if j != yi)
        d = 0.5 * (l1[yi] + sum(probs2[i][j] / rest * l1[j] for j in range(3) if j != yi))
        total += (ce + gamma * d) / 2
    assert float(out["loss"].detach()) == pytest.approx(total, abs=1e-10)
    assert torch.allclose(out["logits"], module.model(x_fixed), rtol=0, atol=1e-12)  # the CE input is x' itself


# --------------------------------------------------------------------------------------------- BatchNorm fairness
def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


def _step_and_ce_alone(mode: str, batchnorm: str) -> tuple[list, list]:
    """BatchNorm buffers after one optimiser step of ``mode``, and those of a forward of that step's ``x_ce`` alone
    (train mode) from the same starting network."""
    module = _small(mode, width=4, batchnorm=batchnorm)
    module.train()
    start = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    out = module.compute_loss(x, y, generator=torch.Generator().manual_seed(4))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    _, x_ce = start._inner_inputs(x, y, float(start.inner.eps), torch.Generator().manual_seed(4))
    with torch.no_grad():
        start.model(x_ce)
    return _bn_buffers(module.model), _bn_buffers(start.model)


@pytest.mark.parametrize("mode", ["pgd_at", "int_adv", "int_adv_single", "int", "trades"])
def test_batchnorm_ce_running_stats_come_from_the_ce_input_alone(mode):
    after, ce_alone = _step_and_ce_alone(mode, "ce")
    assert len(after) == 18 and all(torch.equal(a, b) for a, b in zip(after, ce_alone))


def test_batchnorm_joint_is_not_ce_alone_for_int_adv():
    """The control: today's joint forward over [x; x_d; x_ce] gives other running stats (so the test above can
    fail)."""
    after, ce_alone = _step_and_ce_alone("int_adv", "joint")
    assert not all(torch.equal(a, b) for a, b in zip(after, ce_alone))
    with pytest.raises(ValueError, match=r"batchnorm must be one of \('joint', 'ce'\).*got 'eval'"):
        _small("int_adv", batchnorm="eval")


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_free_model_trains_in_every_mode(mode):
    """``model_options: {batchnorm: false}`` (the reference's BN-free network) in every mode: finite gradients in
    every parameter, and the batchnorm option changes nothing there (no BatchNorm to treat)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    y = torch.tensor([1, 4, 7, 9])
    losses = {}
    for bn in ("joint", "ce"):
        module = _small(mode, width=2, batchnorm=bn, mo={"batchnorm": False}, discrepancy="reference", gamma=0.02)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.model.modules())
        module.train()
        out = module.compute_loss(x, y, generator=torch.Generator().manual_seed(8))
        out["loss"].backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
        losses[bn] = float(out["loss"].detach())
    assert losses["ce"] == pytest.approx(losses["joint"], rel=1e-5)


def test_batchnorm_eval_keeps_dropout_and_restores_flags():
    from defend.robust import batchnorm_eval

    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5)).train()
    with batchnorm_eval(net):
        assert not net[1].training and net[2].training and net[0].training
    assert all(m.training for m in net.modules())


# --------------------------------------------------------------------------------------------- the reference config
def test_reference_config_fits_with_defend_fit(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "defend.cli", "fit", "-c", str(ROOT / "configs/robust/digits_int_adv_reference.yaml"),
           "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
           "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
           f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.renders_per_digit=[1,1,1]",
           "--data.batch_size=16", "--model.model_options={width: 4}", "--model.inner.steps=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from defend.io import load_artifact

    meta = load_artifact(tmp_path / "checkpoints" / "digits_int_adv_reference.pt", "classifier")["meta"]
    assert meta["model_options"] == {"width": 4}
    assert {k: meta["robust_training"][k] for k in ("mode", "discrepancy", "gamma", "batchnorm")} == \
        {"mode": "int_adv_single", "discrepancy": "reference", "gamma": 0.02, "batchnorm": "ce"}


# --------------------------------------------------------------------------------------------- the robust experiment
def _robust_experiment(tmp_path: Path, module: dict) -> Path:
    import yaml

    cfg = tmp_path / "robust.yaml"
    cfg.write_text(yaml.safe_dump({
        "experiment": "robust",
        "data": {"class_path": "DigitsDataModule", "init_args": {"renders_per_digit": [1, 1, 1]}},
        "training": {"max_epochs": 1, "module": {"arch": "small_cnn", "model_options": {"width": 4},
                                                 "inner": {"eps": "8/255", "alpha": "2/255", "steps": 1}}},
        "models": [{"name": "normal", "module": {"mode": "normal"}}, {"name": "ref", "module": module}]}))
    return cfg


def test_robust_experiment_passes_the_options_through_and_checks_them_first(tmp_path, capsys):
    """``module: {discrepancy: ..., batchnorm: ...}`` reach RobustClassifierModule: a wrong value stops the run with
    the module's one-line error before the first model trains (nothing written)."""
    from defend.cli import main as defend_main
    from defend.experiments.robust import module_options

    for module, pattern in (({"mode": "int_adv_single", "discrepancy": "raw"},
                             r"discrepancy must be one of \('normalised', 'reference'\), got 'raw'"),
                            ({"mode": "pgd_at", "batchnorm": "x_ce"},
                             r"batchnorm must be one of \('joint', 'ce'\).*got 'x_ce'")):
        out = tmp_path / "out"
        capsys.readouterr()
        rc = defend_main(["experiment", "-c", str(_robust_experiment(tmp_path, module)), "--out", str(out)])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("defend experiment: error:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert re.search(pattern, lines[0]), lines[0]
        assert not out.exists()
    import yaml

    raw = yaml.safe_load(_robust_experiment(tmp_path, {"mode": "int_adv_single", "discrepancy": "reference",
                                                       "batchnorm": "ce"}).read_text())
    opts = module_options(SimpleNamespace(training=SimpleNamespace(module=raw["training"]["module"])),
                          SimpleNamespace(module=raw["models"][1]["module"]))
    module = RobustClassifierModule(num_classes=10, **opts)
    assert (module.hparams.mode, module.hparams.discrepancy, module.hparams.batchnorm) == \
        ("int_adv_single", "reference", "ce")


def test_discrepancy_attack_ascends_the_reference_d_when_asked():
    """The evaluation's discrepancy attack attacks the D it is told to: with ``discrepancy="reference"`` its kept input
    has a reference D at least that of a fixed random input of the ball, names the option in its budget, and a wrong
    name is a one-line error before any work."""
    from defend.robust_eval import DiscrepancyAttack

    model = tiny_gap().float()
    gen = torch.Generator().manual_seed(3)
    x = (torch.randint(0, 256, (4, 3, 4, 4), generator=gen) / 255.0).float()
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 16 / 255
    attack = DiscrepancyAttack(eps, steps=10, step_ratio=0.25, seed=0, discrepancy="reference")
    assert attack.budget["discrepancy"] == "reference"
    res = attack(model, x, y)
    assert (res.x_adv - x).abs().amax() <= eps + 1e-6
    kept = res.success
    assert kept.any()
    noise = (x + eps * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)
    with torch.no_grad():
        d_adv = interpretation_discrepancy(model, x, res.x_adv, y, kind="reference")
        d_noise = interpretation_discrepancy(model, x, noise, y, kind="reference")
    assert (d_adv[kept] >= d_noise[kept] - 1e-6).all()
    with pytest.raises(ValueError, match=r"^discrepancy must be one of \('normalised', 'reference'\), got 'raw'$"):
        DiscrepancyAttack(eps, discrepancy="raw")
