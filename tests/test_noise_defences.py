"""The noise-trained defences that earn a randomized-smoothing certificate (issue 29 item 4).

``gaussian_aug``: RobustClassifierModule in mode ``gaussian`` (Cohen et al. 2019: CE of x + N(0, sigma^2 I),
unclamped). ``rts_noise``: AIDModule with ``aid.noise_sigma`` > 0 (the map of x + noise for the explained class pulled
to the benign map; ``replace``: instead of the ADV2 input, ``add``: besides it). The tests repeat each loss by hand
from the same noise draw, check that noise 0 leaves AID exactly as it was, that 150 noise-augmented fine-tuning steps
of a tiny classifier beat 150 normal ones under noise by a wide margin, and that both defences are registered with
what they train and load, their options refused in one line.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny import train_tiny_classifier

from attacks.adv2 import random_targets
from defend.aid import AIDModule, AIDSchedule, InnerAttack, aid_attack
from defend.classifier import save_classifier
from defend.defences import CLASSIFIER, RTS_NETWORK, defence, defence_names
from defend.robust import InnerMaximisation, NoiseAugmentation, RobustClassifierModule, gaussian_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian(sigma: float = 0.25, **kw) -> RobustClassifierModule:
    torch.manual_seed(0)
    return RobustClassifierModule(arch="small_cnn", num_classes=10, model_options={"width": 4}, mode="gaussian",
                                  noise={"sigma": sigma}, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A width-8 small CNN trained briefly on the embedded digits, saved as a classifier artifact; its data."""
    model, test, train = train_tiny_classifier(steps=150, n_test=128)
    path = tmp_path_factory.mktemp("clf") / "tiny.pt"
    save_classifier(model, path, {"width": 8})
    return {"path": str(path), "model": model, "test": test, "train": train}


# --------------------------------------------------------------------------------------------- gaussian_aug
def test_gaussian_mode_loss_is_the_ce_of_the_noisy_inputs():
    """The batch loss is CE(f(x + n), y) with n the seeded draw of N(0, sigma^2 I) (repeated here), unclamped, and
    not the CE of the clean inputs; the logits it reports are the noisy inputs'."""
    module = _gaussian(sigma=0.3).train()
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    out = module.compute_loss(x, y, generator=torch.Generator().manual_seed(5))
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert noisy.min() < 0 and noisy.max() > 1  # the noise is not clamped to [0, 1]
    with torch.no_grad():
        logits = module.model(noisy)
        clean = F.cross_entropy(module.model(x), y)
    loss = float(out["loss"].detach())
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-6)
    assert torch.allclose(out["logits"], logits, atol=1e-6)
    assert abs(loss - float(clean)) > 1e-3
    assert float(out["d"]) == 0.0
    torch.testing.assert_close(gaussian_noise(x, 0.3, torch.Generator().manual_seed(5)), noisy)


def test_gaussian_mode_needs_no_inner_maximisation_and_records_sigma():
    """``inner.eps: 0`` is refused for the attacked modes, not for gaussian; its metadata records sigma."""
    module = _gaussian(sigma=0.12, inner=InnerMaximisation(eps=0.0, steps=0))
    assert module.robust_meta()["mode"] == "gaussian" and module.robust_meta()["sigma"] == 0.12
    assert module.hparams.noise == {"sigma": 0.12}  # saved as plain data (weights_only checkpoints)
    with pytest.raises(ValueError, match="mode 'pgd_at' needs inner.eps > 0"):
        RobustClassifierModule(mode="pgd_at", inner=InnerMaximisation(eps=0.0, steps=0))
    assert "sigma" not in RobustClassifierModule(mode="trades").robust_meta()


@pytest.mark.parametrize("sigma", [0.0, -0.1])
def test_gaussian_sigma_refused_in_one_line(sigma):
    with pytest.raises(ValueError, match=r"noise.sigma must be > 0 \(the standard deviation of the training noise"):
        _gaussian(sigma=sigma)
    with pytest.raises(ValueError, match="noise.sigma must be > 0") as exc:
        NoiseAugmentation(sigma)
    assert "\n" not in str(exc.value)


def _fine_tune(tiny, mode: str, steps: int = 150) -> torch.nn.Module:
    """The tiny classifier fine-tuned for ``steps`` Adam steps by the module's own loss in ``mode`` (seeded)."""
    module = RobustClassifierModule(arch="small_cnn", num_classes=10, model_options={"width": 8}, mode=mode,
                                    noise={"sigma": 0.25})
    module.model.load_state_dict(tiny["model"].state_dict())
    opt = torch.optim.Adam(module.model.parameters(), lr=5e-3)
    gen, train = torch.Generator().manual_seed(0), tiny["train"]
    module.train()
    for _ in range(steps):
        idx = torch.randint(0, train["image"].shape[0], (64,), generator=gen)
        loss = module.compute_loss(train["image"][idx], train["label"][idx], generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module.model.eval()


def test_noise_trained_classifier_is_more_accurate_under_noise(tiny):
    """The same 150 fine-tuning steps from the same tiny classifier: in mode gaussian (sigma 0.25) it classifies
    inputs under N(0, 0.25^2) noise far better than in mode normal (measured: 0.48 vs 0.17 of 4 x 128 noisy inputs),
    at some cost in clean accuracy (0.52 vs 0.73)."""
    test, gen = tiny["test"], torch.Generator().manual_seed(1)
    noisy = [gaussian_noise(test["image"], 0.25, gen) for _ in range(4)]

    def noisy_acc(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return sum(float((model(x).argmax(1) == test["label"]).float().mean()) for x in noisy) / len(noisy)

    normal, noise_trained = noisy_acc(_fine_tune(tiny, "normal")), noisy_acc(_fine_tune(tiny, "gaussian"))
    assert noise_trained > normal + 0.15 and noise_trained > 0.3, (noise_trained, normal)


# --------------------------------------------------------------------------------------------- rts_noise
def _aid(path: str, **aid) -> AIDModule:
    torch.manual_seed(0)
    return AIDModule(path, width=8, seed=3, aid=AIDSchedule(weight=1.0, every=1, success_only=False, **aid),
                     attack=InnerAttack(warm_steps=1, steps=1, alpha=2 / 255)).eval()


def test_aid_without_noise_is_exactly_the_old_loss(tiny):
    """noise_sigma 0 (the default) in either noise mode: l_aid is Eqn 16 recomputed here from the same ADV2 run (same
    seed and targets), the noise term is 0 and the step's loss is weight x l_aid + class CE, to the bit."""
    x, y = tiny["test"]["image"][:8], tiny["test"]["label"][:8]
    for mode in ("replace", "add"):
        module = _aid(tiny["path"], noise_mode=mode)
        a = module.aid_loss(x, y, 0)
        gen = module._generator(0, salt=1)
        y_t = random_targets(y, 10, gen)
        res = aid_attack(module.model, module.rts, x, y_t, module.attack,
                         seed=int(torch.randint(0, 2**31 - 1, (), generator=gen)))
        m, logits = module.rts(module.model, torch.cat([x, res.x_adv]), torch.cat([y, y_t]))
        l_aid = -(m[:8] - m[8:]).abs().flatten(1).mean(1).sum() / 8
        assert float(a["l_noise"]) == 0.0 and float(a["l_aid"]) < 0
        assert torch.equal(a["l_aid"], l_aid) and torch.equal(a["class_ce"], F.cross_entropy(logits[:8], y))
        loss, which, logs = module.step_loss({"image": x, "label": y}, 0)
        assert which == 1 and "l_noise" not in logs and "aid_asr" in logs
        assert torch.equal(loss, 1.0 * a["l_aid"] + a["class_ce"])


def test_aid_noise_replace_distils_the_benign_map_onto_x_plus_noise(tiny, monkeypatch):
    """``replace``: no ADV2 runs; the noise term is mean|g(x; c) - g(x + n; c)| with n the module's seeded draw
    (repeated here: sigma x N(0, 1), unclamped), the benign map detached; the AID step minimises weight x that."""
    module = _aid(tiny["path"], noise_sigma=0.25, noise_mode="replace")
    x, y = tiny["test"]["image"][:8], tiny["test"]["label"][:8]

    def no_attack(*args, **kwargs):
        raise AssertionError("replace must not run the inner ADV2")

    monkeypatch.setattr("defend.aid.aid_attack", no_attack)
    a = module.aid_loss(x, y, 4)
    noisy = module.noisy_inputs(x, 4)
    draw = torch.randn(x.shape, generator=module._generator(4, salt=2))
    torch.testing.assert_close(noisy, x + 0.25 * draw)
    with torch.no_grad():
        m = module.rts(module.model, torch.cat([x, noisy]), torch.cat([y, y]))[0]
    expected = (m[:8] - m[8:]).abs().mean()
    assert float(a["l_noise"]) == pytest.approx(float(expected), rel=1e-5) and float(expected) > 1e-4
    assert float(a["l_aid"]) == 0.0 and "asr" not in a
    a["l_noise"].backward()  # the teacher (benign map) is detached: the gradient is that of the noisy map alone
    grads = {n: p.grad.clone() for n, p in module.rts.named_parameters() if p.grad is not None}
    module.rts.zero_grad()
    m_b = module.rts(module.model, x, y)[0].detach()
    (m_b - module.rts(module.model, noisy, y)[0]).abs().mean().backward()
    for n, p in module.rts.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-7)
    loss, _, logs = module.step_loss({"image": x, "label": y}, 4)
    assert "l_noise" in logs and "l_aid" not in logs
    assert float(loss) == pytest.approx(float(a["l_noise"] + a["class_ce"]), rel=1e-5)


def test_aid_noise_add_trains_both_terms(tiny):
    """``add``: the ADV2 term as without noise, plus the noise term (from the same forward over [x; x_adv; x + n])."""
    x, y = tiny["test"]["image"][:8], tiny["test"]["label"][:8]
    a = _aid(tiny["path"], noise_sigma=0.25, noise_mode="add").aid_loss(x, y, 0)
    assert float(a["l_aid"]) < 0 < float(a["l_noise"]) and "asr" in a


@pytest.mark.parametrize("aid, fragment", [
    ({"weight": 1.0, "noise_mode": "both"}, "need aid.noise_mode in ('replace', 'add')"),
    ({"weight": 1.0, "noise_sigma": -0.1}, "aid.noise_sigma >= 0 (0: no noise term)"),
    ({"weight": 0.0, "noise_sigma": 0.25}, "aid.noise_sigma 0.25 trains on AID batches: set aid.weight > 0"),
])
def test_aid_noise_options_refused_in_one_line(tiny, aid, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as exc:
        AIDModule(tiny["path"], aid=aid)
    assert "\n" not in str(exc.value)


def test_noise_replace_needs_no_inner_attack_steps(tiny):
    """The inner ADV2's steps are required only when ADV2 runs (``replace`` runs none)."""
    none = {"warm_steps": 0, "steps": 0}
    AIDModule(tiny["path"], aid={"weight": 1.0, "noise_sigma": 0.25}, attack=none)
    with pytest.raises(ValueError, match="needs attack.warm_steps"):
        AIDModule(tiny["path"], aid={"weight": 1.0, "noise_sigma": 0.25, "noise_mode": "add"}, attack=none)


# --------------------------------------------------------------------------------------------- registration
def test_both_noise_defences_are_registered_with_what_they_train():
    names = defence_names()
    assert names.index("trades") < names.index("gaussian_aug") < names.index("beta_smoothing")
    assert names.index("rts_aid") < names.index("rts_noise") < names.index("detector")
    g, r = defence("gaussian_aug"), defence("rts_noise")
    assert (g.trains, g.artifact, dict(g.module)) == ("robust", CLASSIFIER, {"mode": "gaussian",
                                                                             "noise": {"sigma": 0.25}})
    assert "Cohen" in g.description and "certified" in g.description
    assert (r.trains, r.artifact, dict(r.module), r.interpreters) == ("aid", RTS_NETWORK, {"plan": "noise"}, ("rts",))
    assert r.adaptive == ("adaptive_rts",)
    RobustClassifierModule(num_classes=10, **g.module)  # the registered options build the module


def test_scorecard_plan_refuses_a_missing_or_noiseless_noise_run(tiny):
    """The scorecard's rts_noise row needs ``aid.noise`` (one line naming it), whose module trains the noise term;
    the aid experiment refuses a noise run it would not train."""
    from defend.experiments.aid import AIDExperiment, AIDTraining, AIDTrainingPlan
    from defend.experiments.aid import check as check_aid
    from defend.experiments.common import ClassifierSpec
    from defend.experiments.scorecard import ScorecardExperiment
    from defend.experiments.scorecard import check as check_scorecard

    aid_run = AIDTraining(module={"aid": {"weight": 1.0}})
    clf = ClassifierSpec(checkpoint=tiny["path"], module={"arch": "small_cnn", "model_options": {"width": 8}})
    cfg = ScorecardExperiment(defences=["rts", "rts_noise"], classifier=clf, aid=AIDTrainingPlan(aid=aid_run))
    with pytest.raises(ValueError, match="defences lists rts_noise but aid.noise is null: set it"):
        check_scorecard(cfg)
    plan = AIDTrainingPlan(aid=aid_run, noise=AIDTraining(module={"aid": {"weight": 1.0}}))
    with pytest.raises(ValueError, match="training.noise trains the noise distillation term: set training.noise."
                                         "module.aid.noise_sigma > 0"):
        plan.check_noise(clf)
    noisy = AIDTrainingPlan(aid=aid_run, noise=AIDTraining(module={"aid": {"weight": 1.0, "noise_sigma": 0.25}}))
    noisy.check_noise(clf)
    assert noisy.init_of("noise") == noisy.init_of("aid") == "rts" and noisy.init_of("rts") is None
    with pytest.raises(ValueError, match="training.noise is the scorecard's rts_noise run: the aid experiment"):
        check_aid(AIDExperiment(classifier=clf, training=noisy))
