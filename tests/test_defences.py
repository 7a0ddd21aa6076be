"""Defences as registered objects (defend.defences.DEFENCES) and TRADES (defend.robust, mode trades).

The registry walk: every defence says what it trains, which artifact it loads (and that artifact saves and loads
back), which card sections it fills and its description; the scorecard's rows and ``reuse:`` names come from it; the
scorecard's planned outputs hold every file a detector save writes (surrogate.pt included). TRADES: its loss is
CE + beta * KL computed by hand, its inner maximisation raises the KL inside the ball, and a tiny TRADES run beats
the same run trained normally on PGD accuracy (300 steps, 8/255: 0.25 vs 0.00 of 128 test inputs when measured).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny import train_tiny_classifier

from defend.defences import DEFENCES, defence_names, load_defences
from defend.robust import InnerMaximisation, RobustClassifierModule, trades_attack, trades_kl

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"clean_accuracy", "autoattack", "topk", "attacks", "detection"}


def _tiny_module(mode: str, **kw) -> RobustClassifierModule:
    torch.manual_seed(0)
    return RobustClassifierModule(arch="small_cnn", num_classes=10, model_options={"width": 4}, mode=mode,
                                  inner=InnerMaximisation(eps=8 / 255, steps=2, alpha=4 / 255), **kw)


# --------------------------------------------------------------------------------------------- the registry
def test_registry_holds_every_defence_in_row_order():
    assert defence_names() == ["normal", "pgd_at", "int_adv", "int_adv_single", "trades", "gaussian_aug",
                               "beta_smoothing", "rts", "rts_aid", "rts_noise", "detector"]
    with pytest.raises(ValueError, match="unknown defence 'trade'.*did you mean 'trades'"):
        DEFENCES.get("trade")


@pytest.mark.parametrize("name", ["normal", "pgd_at", "int_adv", "int_adv_single", "trades", "gaussian_aug",
                                  "beta_smoothing", "rts", "rts_aid", "rts_noise", "detector"])
def test_each_defence_describes_itself(name):
    from defend.experiments.scorecard import ScorecardExperiment

    d = load_defences().build(name)
    assert d.name == name and len(d.description) > 40 and d.adaptive
    assert set(d.sections) <= SECTIONS and {"clean_accuracy", "attacks"} <= set(d.sections)
    assert d.detects == (d.role == "detector")  # only the detector is scored by detection
    assert (d.trains is None) == (d.artifact is None)  # what trains has an artifact to load
    if d.trains is not None:  # the training family is a section of the scorecard's config
        assert hasattr(ScorecardExperiment(), d.trains)


def test_each_trained_artifact_saves_and_loads(tmp_path):
    """The artifact of every defence that trains: a tiny one saved where the kind says, complete, loaded back."""
    from attacks import RTSNetwork
    from defend import load_classifier, save_classifier
    from defend.aid import load_rts, save_rts
    from defend.detector import DetectorModule, train_detector

    maps, labels = torch.rand(24, 2, 32, 32), torch.arange(24) % 2
    for name in defence_names():
        d = DEFENCES.build(name)
        if d.artifact is None:
            continue
        path = d.artifact.path(tmp_path, name)
        assert not d.artifact.present(path)
        if d.role == "classifier":
            module = _tiny_module(d.module["mode"])
            out = module.compute_loss(torch.rand(4, 3, 32, 32), torch.arange(4))
            out["loss"].backward()  # one training step's gradient reaches the weights
            assert module.model.head.weight.grad.abs().sum() > 0
            save_classifier(module.model, path, {"width": 4})
            loaded = load_classifier(path)
            assert torch.equal(loaded.head.weight, module.model.head.weight)
        elif d.role == "rts":
            net = RTSNetwork([4, 8, 16], 10, width=4)
            save_rts(net, path)
            back = load_rts(path).state_dict()
            assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
        else:
            det, _ = train_detector(maps, labels, epochs=0, trainable="none", booster={"n_estimators": 5}, seed=0)
            det.save(path, ["grad", "cam"])
            DetectorModule.load(path)
        assert d.artifact.present(path)
        written = {p for p in Path(path).rglob("*") if p.is_file()} if path.is_dir() else {path}
        assert written <= set(d.artifact.files(path))  # the kind plans every file the save wrote


def test_scorecard_plans_every_file_the_detector_save_writes(tmp_path):
    """The scorecard's overwrite check plans the detector folder's files from the code that writes them: a tiny
    detector save writes surrogate.pt, and the planned outputs hold it (and every other file written)."""
    from defend.detector import train_detector
    from defend.experiments.scorecard import outputs

    det, _ = train_detector(torch.rand(24, 2, 32, 32), torch.arange(24) % 2, epochs=0, trainable="none",
                            booster={"n_estimators": 5}, seed=0)
    det.save(tmp_path / "saved", ["grad", "cam"])
    written = {p.name for p in (tmp_path / "saved").iterdir() if p.is_file()}
    assert "surrogate.pt" in written
    cfg = _scorecard_cfg(["normal", "detector"], tmp_path)
    out = tmp_path / "out"
    planned = {p.relative_to(out).as_posix() for p in outputs(cfg, out)}
    assert {f"models/detector/{f}" for f in written} <= planned
    assert "models/detector/surrogate.pt" in planned


def _scorecard_cfg(defences: list[str], tmp: Path):
    """The tiny scorecard config (tests/data/scorecard_tiny.yaml) on a tiny classifier, parsed and checked as the
    experiment runner does."""
    import os

    from defend import save_classifier
    from defend.experiments import runner

    save_classifier(train_tiny_classifier(steps=1, width=4)[0], tmp / "tiny.pt", {"width": 4})

    runner.load_experiments()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        raw = runner.resolve_config([str(ROOT / "tests" / "data" / "scorecard_tiny.yaml")],
                                    [f"--defences=[{', '.join(defences)}]", f"--classifier.checkpoint={tmp / 'tiny.pt'}"])
        return runner.parse_experiment(raw)[1]
    finally:
        os.chdir(cwd)


def test_scorecard_reuse_and_rows_come_from_the_registry(tmp_path):
    from defend.experiments.scorecard import check

    cfg = _scorecard_cfg(["normal"], tmp_path)
    cfg.reuse = {"beta_smoothing": "x.pt"}  # training-free: nothing to reuse
    with pytest.raises(ValueError, match="unknown name 'beta_smoothing' in reuse; choose one of: pgd_at, int_adv, int_adv_single, trades, gaussian_aug, rts, rts_aid, rts_noise, detector$"):
        check(cfg)


# --------------------------------------------------------------------------------------------- TRADES
def test_trades_loss_is_ce_plus_beta_kl_by_hand():
    """On fixed inputs and a fixed x' (no inner steps reach the loss but through x_d), the module's loss is
    CE(f(x), y) + beta * mean_i sum_c p_c(x_i) (log p_c(x_i) - log p_c(x'_i)) computed here by hand."""
    module = _tiny_module("trades", beta=6.0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 32, 32, generator=gen), torch.arange(6)
    x_adv = torch.rand(x.shape, generator=gen)  # far from x: a KL well above float32 rounding
    module._inner_inputs = lambda x_, y_, eps, g: (x_adv, x_)  # the inner maximisation's output, fixed
    module.train()
    out = module.compute_loss(x, y)
    with torch.no_grad():
        lx, la = module.model(x), module.model(x_adv)
        p = lx.softmax(1)
        kl = (p * (p.log() - la.softmax(1).log())).sum(1).mean()
        want = F.cross_entropy(lx, y) + 6.0 * kl
    assert float(kl) > 1e-4
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(out["d"]) == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert float(trades_kl(lx, lx).abs().max()) < 1e-6


def test_trades_attack_raises_the_kl_inside_the_ball():
    model, test, _ = train_tiny_classifier(steps=40, width=4)
    model.zero_grad(set_to_none=True)  # the training loop's last gradients
    x = test["image"][:16]
    eps = 8 / 255
    gen = torch.Generator().manual_seed(0)
    x_adv = trades_attack(model, x, eps, 2 / 255, 10, gen)
    x_rand = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps).clamp(0, 1)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        kl_adv, kl_rand = trades_kl(model(x), model(x_adv)).mean(), trades_kl(model(x), model(x_rand)).mean()
    assert kl_adv > 2 * kl_rand and kl_adv > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="beta must be >= 0"):
        _tiny_module("trades", beta=-1.0)


def test_trades_beats_normal_training_on_pgd_accuracy():
    """The same small CNN, seed, data and 300 Adam steps, trained normally and with TRADES (beta 6, eps 8/255, 3 inner
    steps): under a 10-step PGD at 8/255 (random start, its own seed) the normal model keeps almost nothing and TRADES
    keeps a clear share of 128 test inputs (measured here: 0.00 vs 0.25; asserted with a wide margin)."""
    from defend import DigitsDataModule
    from defend.inputs import take_split
    from defend.robust_eval import pgd_accuracy

    dm = DigitsDataModule(seed=0, renders_per_digit=(1, 1, 1), batch_size=64)
    dm.setup("fit")
    train, test = take_split(dm, "train"), take_split(dm, "test", 128)
    eps, robust = 8 / 255, {}
    for mode in ("normal", "trades"):
        torch.manual_seed(0)
        module = RobustClassifierModule(arch="small_cnn", num_classes=10, model_options={"width": 8}, mode=mode,
                                        inner=InnerMaximisation(eps=eps, steps=3, alpha=eps / 2),
                                        **({"beta": 6.0} if mode == "trades" else {}))
        module.train()
        opt, gen = torch.optim.Adam(module.model.parameters(), lr=5e-3), torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, train["image"].shape[0], (64,), generator=gen)
            loss = module.compute_loss(train["image"][idx], train["label"][idx], generator=gen)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        module.eval()
        robust[mode] = pgd_accuracy(module.model, test["image"], test["label"], eps, 10, eps / 4,
                                    torch.Generator().manual_seed(1))
    assert float(robust["trades"].float().mean()) >= float(robust["normal"].float().mean()) + 0.08, robust
