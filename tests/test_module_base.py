"""The shared base of the defence modules (defend.module_base): one meaning per optimiser name, the schedules, the
data checks, the checkpoint metadata, plain hyper-parameters that resumes compare, and freezing that is restored
even when the work inside raises."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import attacks
from attacks import RTSNetwork
from defend.aid import AIDModule, AIDSchedule, InnerAttack, aid_attack
from defend.checks import check_checkpoint_fits
from defend.classifier import ClassifierModule, save_classifier
from defend.detector import DetectorModule
from defend.io import CheckpointError, project_version
from defend.models import build_classifier
from defend.module_base import (
    MIN_ONE_CYCLE_STEPS,
    DefenceModule,
    FrozenModule,
    Optimiser,
    as_options,
    build_optimiser,
    build_scheduler,
    one_cycle_steps,
)
from defend.robust import InnerMaximisation, RobustClassifierModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    save_classifier(build_classifier("small_cnn", 10, width=4), path, {"width": 4})
    return str(path)


def _classifier(**kw) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(model_options={"width": 4}, **kw)


def _config_optimiser(path: Path, default: Optimiser) -> Optimiser:
    return as_options(yaml.safe_load(path.read_text())["model"]["init_args"]["optimiser"], default)


# --------------------------------------------------------------------------------------------- optimisers
@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_each_optimiser_name_has_one_meaning(name, cls):
    """The same name builds the same optimiser in every module (AdamW subclasses Adam: the type is compared)."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimiser(Optimiser(name=name, lr=0.1, weight_decay=0.01), params)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.01
    if name == "sgd":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    for module in (_classifier(optimiser={"name": name, "schedule": "constant"}),
                   RobustClassifierModule(model_options={"width": 4}, mode="normal", optimiser={"name": name})):
        assert type(module.configure_optimizers()) is cls, type(module)


def test_module_defaults_and_shipped_configs():
    """The classifier configs say adamw (the AdamW they always trained with), robust training keeps Adam."""
    from defend.classifier import CLASSIFIER_OPTIMISER
    from defend.robust import ROBUST_OPTIMISER

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert CLASSIFIER_OPTIMISER.name == "adamw" and ROBUST_OPTIMISER.name == "adam"
    for path, default, cls in ((CONFIGS / "classifier" / "digits.yaml", CLASSIFIER_OPTIMISER, torch.optim.AdamW),
                               (CONFIGS / "finetune" / "folder_classifier.yaml", CLASSIFIER_OPTIMISER,
                                torch.optim.AdamW),
                               (CONFIGS / "classifier" / "cifar10.yaml", CLASSIFIER_OPTIMISER, torch.optim.SGD),
                               (CONFIGS / "robust" / "digits_int_adv.yaml", ROBUST_OPTIMISER, torch.optim.Adam)):
        assert type(build_optimiser(_config_optimiser(path, default), params)) is cls, path
    robust = RobustClassifierModule(model_options={"width": 4})
    assert type(robust.configure_optimizers()) is torch.optim.Adam
    assert type(DetectorModule(in_channels=2, input_size=32).configure_optimizers()) is torch.optim.Adam


def test_aid_optimisers(clf_path):
    aid = AIDModule(clf_path, width=4, aid=AIDSchedule(weight=1.0, lr=0.01), optimiser={"name": "adamw", "lr": 0.002})
    first, second = aid.configure_optimizers()
    assert type(first) is type(second) is torch.optim.AdamW
    assert first.param_groups[0]["lr"] == 0.002 and second.param_groups[0]["lr"] == 0.01
    assert {id(p) for p in first.param_groups[0]["params"]} == {id(p) for p in aid.rts.parameters()}


@pytest.mark.parametrize("kwargs, pattern", [
    ({"name": "rmsprop"}, r"optimiser\.name must be one of sgd, adam, adamw, got 'rmsprop'"),
    ({"lr": 0.0}, r"need optimiser\.lr > 0"),
    ({"weight_decay": -1.0}, r"weight_decay >= 0"),
    ({"name": "sgd", "momentum": 0.0}, r"Nesterov SGD needs optimiser\.momentum > 0"),
    ({"schedule": "cosine"}, r"optimiser\.schedule must be one of onecycle, multistep, constant"),
    ({"milestones": [3]}, r"optimiser\.milestones \[3\] are only used by schedule 'multistep'"),
    ({"schedule": "multistep"}, r"'multistep' needs optimiser\.milestones"),
    ({"schedule": "multistep", "milestones": [0]}, r"optimiser\.milestones must be whole epochs >= 1"),
    ({"schedule": "multistep", "milestones": [1.5]}, r"optimiser\.milestones must be whole epochs >= 1"),
    ({"pct_start": 1.0}, r"0 < optimiser\.pct_start < 1"),
])
def test_optimiser_rejects_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Optimiser(**kwargs)


def test_as_options_completes_the_module_default_and_names_unknown_keys():
    default = Optimiser(name="adamw", lr=0.5, weight_decay=0.1)
    assert as_options({"lr": 0.2}, default) == Optimiser(name="adamw", lr=0.2, weight_decay=0.1)
    assert as_options(None, default) is default
    with pytest.raises(ValueError, match=r"optimiser: unknown option\(s\) lrr; the options are decay, lr, "):
        as_options({"lrr": 0.2}, default, "optimiser")
    with pytest.raises(ValueError, match=r"inner must be a InnerMaximisation or a mapping"):
        as_options(3, InnerMaximisation(), "inner")


# --------------------------------------------------------------------------------------------- schedules
def _lrs(options: Optimiser, steps: int, epochs: int = 1) -> list[float]:
    opt = build_optimiser(options, [torch.nn.Parameter(torch.zeros(1))])
    entry = build_scheduler(options, opt, steps * epochs)
    used = []
    for _ in range(epochs):
        for _ in range(steps):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            if entry and entry["interval"] == "step":
                entry["scheduler"].step()
        if entry and entry["interval"] == "epoch":
            entry["scheduler"].step()
    return used


@pytest.mark.parametrize("pct_start", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("steps", [1, 3, 4, 9])
def test_one_cycle_short_runs(steps, pct_start):
    """A run shorter than a valid cycle follows the first steps of one (OneCycleLR divides by zero when its warm-up
    ends on step 0); the learning rate rises from lr / 25, never above lr."""
    total = one_cycle_steps(steps, pct_start)
    assert total >= max(steps, MIN_ONE_CYCLE_STEPS) and pct_start * total > 1
    used = _lrs(Optimiser(name="adamw", lr=0.01, schedule="onecycle", pct_start=pct_start), steps)
    assert used[0] == pytest.approx(0.01 / 25) and max(used) <= 0.01 * 1.0001
    assert all(torch.isfinite(torch.tensor(used)))
    with pytest.raises(ValueError, match="needs a finite run"):
        one_cycle_steps(float("inf"))


def test_multistep_and_constant_schedules():
    assert _lrs(Optimiser(lr=0.1, schedule="multistep", milestones=[1, 2], decay=0.5), 2, epochs=3) == \
        pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert _lrs(Optimiser(lr=0.1), 3, epochs=2) == [0.1] * 6
    robust = RobustClassifierModule(model_options={"width": 4}, mode="normal")
    assert isinstance(robust.configure_optimizers(), torch.optim.Optimizer)  # constant: no scheduler entry


def test_aid_refuses_a_schedule_it_would_not_step(clf_path):
    with pytest.raises(ValueError, match=r"manual optimisation\): optimiser\.schedule must be 'constant'"):
        AIDModule(clf_path, optimiser={"schedule": "multistep", "milestones": [2]})


# --------------------------------------------------------------------------------------------- data checks
def _attach(module: DefenceModule, **datamodule) -> None:
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(**datamodule))


def test_fit_start_checks_class_count_and_input_size(clf_path):
    clf = _classifier()
    _attach(clf, num_classes=7, image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"^class count mismatch: the model has 10 classes, the data has 7; set the "
                                         r"model's num_classes"):
        clf.on_fit_start()
    _attach(clf, num_classes=10, image_shape=(3, 64, 64))
    with pytest.raises(ValueError, match=r"^input size mismatch: the model expects 32 px, the data is 64 px; set the "
                                         r"data's image_size to 32"):
        clf.on_fit_start()
    _attach(clf, num_classes=10, image_shape=(3, 32, 32))
    clf.on_fit_start()  # fits: no error
    aid = AIDModule(clf_path, width=4)
    _attach(aid, num_classes=3, image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"class count mismatch: the classifier has 10 classes, the data has 3"):
        aid.on_fit_start()
    det = DetectorModule(in_channels=2, input_size=32)
    _attach(det, num_classes=None, image_shape=(2, 16, 16))
    with pytest.raises(ValueError, match=r"input size mismatch: the model expects 32 px, the data is 16 px"):
        det.on_fit_start()


# --------------------------------------------------------------------------------------------- metadata
def test_checkpoint_metadata(clf_path):
    version = project_version()
    clf = _classifier()
    robust = RobustClassifierModule(model_options={"width": 4}, inner={"steps": 2, "eps": 4 / 255})
    aid = AIDModule(clf_path, width=4, aid={"weight": 1.0, "every": 3})
    det = DetectorModule(in_channels=2, input_size=32, lr=0.01)
    metas = {}
    for name, module in (("clf", clf), ("robust", robust), ("aid", aid), ("det", det)):
        ckpt: dict = {}
        module.on_save_checkpoint(ckpt)
        metas[name] = ckpt["idls_meta"]
        assert metas[name]["version"] == version
    assert metas["clf"] == {"kind": "classifier", "version": version, **clf.model.describe(),
                            "model_options": {"width": 4}}
    assert metas["robust"]["kind"] == "classifier" and metas["robust"]["arch"] == "small_cnn"
    assert metas["robust"]["robust_training"] == {"mode": "int_adv", "interpretation": "cam", "gamma": 0.01,
                                                  "eps": 4 / 255, "inner_steps": 2, "inner_alpha": 2 / 255,
                                                  "eps_ramp_epochs": 0.0, "ce_attack": "pgd",
                                                  "discrepancy": "normalised", "batchnorm": "joint"}
    assert metas["aid"]["kind"] == "rts" and metas["aid"]["aid_every"] == 3 and metas["aid"]["aid_weight"] == 1.0
    assert metas["aid"]["network"] == aid.rts.config() and "class_weight" not in metas["aid"]["objective"]
    assert metas["det"] == {"kind": "detector", "version": version,
                            "hparams": {"in_channels": 2, "input_size": 32, "trainable": "input", "lr": 0.01,
                                        "weight_decay": 0.0, "seed": 0, "feature_stages": "all"}}


# --------------------------------------------------------------------------------------------- hyper-parameters
def test_hparams_are_plain_and_load_with_weights_only(tmp_path, clf_path):
    for module in (_classifier(), RobustClassifierModule(model_options={"width": 4}), AIDModule(clf_path, width=4)):
        hp = dict(module.hparams)
        assert not any(dataclasses.is_dataclass(v) for v in hp.values())
        assert hp["_class_path"] == f"{type(module).__module__}.{type(module).__qualname__}"
        torch.save({"hyper_parameters": hp}, tmp_path / "hp.ckpt")
        back = torch.load(tmp_path / "hp.ckpt", weights_only=True)["hyper_parameters"]
        assert back == hp and back["optimiser"] == dataclasses.asdict(module.optimiser)
        rebuilt = type(module)(**{k: v for k, v in back.items() if not k.startswith("_")})  # load_from_checkpoint
        assert rebuilt.optimiser == module.optimiser and dict(rebuilt.hparams) == hp
    torch.save({"hyper_parameters": {"optimiser": Optimiser()}}, tmp_path / "pickled.ckpt")
    with pytest.raises(Exception, match="Unsupported global|WeightsUnpickler"):  # why groups are stored as dicts
        torch.load(tmp_path / "pickled.ckpt", weights_only=True)


def _ckpt_of(module: DefenceModule) -> dict:
    return {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}


def test_resume_compares_the_nested_options():
    """A checkpoint trained with another learning rate may be validated, not resumed; another inner attack is another
    model for every stage. Each difference is named by its dotted key."""
    ckpt = _ckpt_of(RobustClassifierModule(model_options={"width": 4}, optimiser={"lr": 0.01}, inner={"steps": 2}))
    other_lr = RobustClassifierModule(model_options={"width": 4}, optimiser={"lr": 0.02}, inner={"steps": 2})
    with pytest.raises(CheckpointError, match=r"cannot resume from x\.ckpt: .*optimiser\.lr: checkpoint 0\.01, "
                                              r"config 0\.02; "):
        check_checkpoint_fits("x.ckpt", ckpt, other_lr, "fit")
    check_checkpoint_fits("x.ckpt", ckpt, other_lr, "validate")  # training-only options may differ
    other_inner = RobustClassifierModule(model_options={"width": 4}, optimiser={"lr": 0.01}, inner={"steps": 3})
    for stage, verb in (("fit", "resume from"), ("test", "test with")):
        with pytest.raises(CheckpointError, match=rf"cannot {verb} x\.ckpt: .*inner\.steps: checkpoint 2, config 3"):
            check_checkpoint_fits("x.ckpt", ckpt, other_inner, stage)
    same = RobustClassifierModule(model_options={"width": 4}, optimiser={"lr": 0.01}, inner={"steps": 2})
    check_checkpoint_fits("x.ckpt", ckpt, same, "fit")


# --------------------------------------------------------------------------------------------- freezing
def test_frozen_classifier_stays_frozen_whatever_lightning_does(clf_path):
    aid = AIDModule(clf_path, width=4)
    assert isinstance(aid.classifier, FrozenModule)
    aid.train()
    assert not aid.model.training and all(not m.training for m in aid.model.modules()) and aid.rts.training
    assert all(not p.requires_grad for p in aid.model.parameters())
    assert {id(p) for p in aid.trainable_parameters()} == {id(p) for p in aid.rts.parameters()}
    assert {n.split(".")[0] for n, p in aid.named_parameters() if p.requires_grad} == {"rts"}


class _Boom(RuntimeError):
    pass


def test_aid_attack_restores_flags_also_when_it_raises(clf_path, monkeypatch):
    aid = AIDModule(clf_path, width=4)
    net: RTSNetwork = aid.rts
    net.train()
    net.center.eval()  # a submodule with its own flag: restored as it was, not to the parent's
    net.selector.requires_grad_(False)
    flags = [m.training for m in net.modules()]
    grads = [p.requires_grad for p in net.parameters()]
    x, y_t = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    seen = {}

    def boom(self, model, x, target, target_map=None):
        seen["training"] = net.training or any(m.training for m in net.modules())
        seen["requires_grad"] = any(p.requires_grad for p in net.parameters())
        seen["grad_enabled"] = torch.is_grad_enabled()
        raise _Boom("attack failed")

    monkeypatch.setattr(attacks.ADV2, "__call__", boom)
    with torch.no_grad(), pytest.raises(_Boom):
        aid_attack(aid.model, net, x, y_t, InnerAttack(warm_steps=1, steps=1))
    assert seen == {"training": False, "requires_grad": False, "grad_enabled": True}
    assert [m.training for m in net.modules()] == flags and [p.requires_grad for p in net.parameters()] == grads
    monkeypatch.undo()
    res = aid_attack(aid.model, net, x, y_t, InnerAttack(warm_steps=1, steps=1))  # the real attack: same restore
    assert res.x_adv.shape == x.shape and all(p.grad is None for p in net.parameters())
    assert [m.training for m in net.modules()] == flags and [p.requires_grad for p in net.parameters()] == grads


def test_detector_features_restore_flags_also_when_they_raise(monkeypatch):
    det = DetectorModule(in_channels=2, input_size=32, feature_stages="all")
    det.train()
    det.net.head.eval()
    flags = [m.training for m in det.modules()]
    seen = {}

    def boom(x):
        seen["training"] = any(m.training for m in det.modules())
        raise _Boom("feature extraction failed")

    monkeypatch.setattr(det.net, "forward_stages", boom)
    with pytest.raises(_Boom):
        det.features(torch.rand(3, 2, 32, 32))
    assert seen == {"training": False}
    assert [m.training for m in det.modules()] == flags
    monkeypatch.undo()
    assert det.features(torch.rand(3, 2, 32, 32)).shape == (3, det.feature_dim)
    assert [m.training for m in det.modules()] == flags
