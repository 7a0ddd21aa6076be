"""Boopathy et al.'s reference protocol (``aai_topk``, protocol ``boopathy``) beside our variant (``ghorbani``): the
attack equals a textbook loop, flipped inputs are dropped from tau, the protocol reaches the robust experiment's rows,
its report and the battery's rows, and a saved model is reused only when it fits (issue 27 item 2)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _tiny import train_tiny_classifier
from scipy.stats import kendalltau

from attacks import BALL_ATTACKS, get_interpreter
from attacks.topk import ReferenceTopKAttack
from defend.classifier import save_classifier
from defend.evaluate.battery import parse_battery
from defend.evaluate.measure import topk_rows
from defend.experiments.config import parse_experiment
from defend.experiments.robust import RobustEvaluation, evaluate_model, outputs
from defend.experiments.robust_report import _cost, _versus, table_vii, versus
from defend.experiments.runner import load_experiments, resolve_config
from defend.io import CheckpointError
from defend.models.small import small_cnn
from defend.robust_eval import interpretation_robustness

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
EPS = 8 / 255


@pytest.fixture(scope="module")
def tiny(one_thread):
    """The tiny digits classifier (a GAP -> linear small CNN) and 24 test images with their true labels."""
    model, test, _ = train_tiny_classifier(steps=60, n_test=24)
    return model, test["image"], test["label"]


def textbook_aai_topk(model, x, y, eps: float, k: int, steps: int, seed: int) -> torch.Tensor:
    """Boopathy's eval.py written out: the raw CAM of the true label from the features and the fc weights, its benign
    top-k pixels, a uniform start, ``steps`` sign steps of 0.01 on minus the top-k sum, clip to ball and [0, 1], the
    final iterate; then rounded to the uint8 grid (our addition)."""
    def cam(z):
        feats = model.forward_features(z)                                       # [N, C, 8, 8]
        return (model.head.weight[y][:, :, None, None] * feats).sum(1).flatten(1)  # raw CAM of y, [N, 64]

    with torch.no_grad():
        idx = torch.sort(cam(x), dim=1, descending=True, stable=True).indices[:, :k]
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    xa = (x + (2 * u - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = -cam(xa).gather(1, idx).sum(1).mean()
        (g,) = torch.autograd.grad(loss, xa)
        xa = torch.clamp(xa.detach() + 0.01 * g.sign(), x - eps, x + eps).clamp(0, 1)
    levels = torch.round((xa - x) * 255).clamp(-int(eps * 255 + 1e-6), int(eps * 255 + 1e-6))
    return ((torch.round(x * 255) + levels) / 255).clamp(0, 1)


def test_aai_topk_equals_the_textbook_loop(tiny):
    model, x, y = tiny
    attack = BALL_ATTACKS.build("aai_topk", eps=EPS, interpreter="cam", k=8, steps=30, seed=7)
    assert isinstance(attack, ReferenceTopKAttack)
    res = attack(model, x, y)
    want = textbook_aai_topk(model, x, y, EPS, k=8, steps=30, seed=7)
    assert float((res.x_adv - want).abs().max()) <= 1e-6
    assert float((res.x_adv - x).abs().max()) > 4 / 255  # it moved (a random start alone would not tell)
    assert attack.budget["alpha"] == 0.01 and attack.budget["protocol"] == "boopathy"
    assert attack.budget["iterate"] == "final" and attack.budget["restarts"] == 1
    with torch.no_grad():
        pred, pred_adv = model(x).argmax(1), model(res.x_adv).argmax(1)
    assert torch.equal(res.kept, pred_adv == pred) and torch.equal(res.success, pred_adv == y)
    assert bool((res.topk_adv < res.topk_benign).float().mean() > 0.5)  # the raw top-k sum went down for most


def test_flipped_inputs_are_dropped_from_tau_and_tau_is_the_per_image_mean(tiny):
    """At a large radius some predictions flip: exactly the others are scored (misclassified inputs whose prediction
    stays are kept, as in the reference), and Kendall tau is scipy's per-image tau averaged over them."""
    model, x, y = tiny
    eps, opts = 48 / 255, {"k": 8, "steps": 15}
    res = interpretation_robustness(model, get_interpreter("cam"), x, eps, "aai_topk",
                                    options=opts, ks=[8], seed=0, per_input=True, labels=y)
    seed = int(torch.randint(0, 2**31 - 1, (), generator=torch.Generator().manual_seed(0)))  # what the factory draws
    x_adv = ReferenceTopKAttack("cam", eps=eps, seed=seed, **opts)(model, x, y).x_adv
    with torch.no_grad():
        unchanged = model(x_adv).argmax(1) == model(x).argmax(1)
    assert 0 < int(unchanged.sum()) < x.shape[0]  # the rule is exercised both ways
    assert res["kept"].tolist() == unchanged.nonzero().flatten().tolist() and res["n_kept"] == int(unchanged.sum())
    with torch.no_grad():
        feats, feats_adv = model.forward_features(x), model.forward_features(x_adv)
        w = model.head.weight[y][:, :, None, None]
        cam, cam_adv = (w * feats).sum(1).flatten(1), (w * feats_adv).sum(1).flatten(1)
    taus = [kendalltau(cam[i].numpy(), cam_adv[i].numpy())[0] for i in unchanged.nonzero().flatten().tolist()]
    assert res["kendall_tau"] == pytest.approx(sum(taus) / len(taus), abs=1e-5)


def _evaluation(protocols: list[str]) -> RobustEvaluation:
    raw = {"n_images": 12, "eps": ["0", "8/255"], "batch_size": 12, "pgd": {"steps": 2}, "autoattack": {"eps": []},
           "interpretation": {"protocols": protocols, "n_images": 12, "attacks": ["topk"],
                              "boopathy": {"n_images": 12, "steps": 3}, "topk": {"steps": 3},
                              "sensitivity_samples": 2}}
    load_experiments()
    sets = [f"--evaluation.{key}={json.dumps(value)}" for key, value in raw.items()]
    return parse_experiment(resolve_config([str(ROOT / "configs" / "experiments" / "robust.yaml")], sets,
                                           quick=True))[1].evaluation


def test_the_protocol_reaches_the_rows_the_table_and_the_paired_tests(tiny):
    model, x, y = tiny
    ev = _evaluation(["boopathy", "ghorbani"])
    ref = {"image": x[-12:], "label": y[-12:]}
    other = small_cnn(num_classes=10, width=8).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.head.weight.mul_(1.5)
    results = {name: {"mode": mode, "rows": evaluate_model(m, x[:12], y[:12], ev, 0, False, name, ref)}
               for name, mode, m in (("a", "int_adv", model), ("b", "pgd_at", other))}
    rows = [r for r in results["a"]["rows"] if r["measure"] == "interpretation" and r["eps"] > 0]
    by_attack = {r["attack"]: r for r in rows}
    assert by_attack["aai_topk"]["protocol"] == "boopathy" and by_attack["aai_topk"]["class_explained"] == "true label"
    assert by_attack["topk"]["protocol"] == "ghorbani" and by_attack["topk"]["class_explained"] == "benign prediction"
    assert by_attack["aai_topk"]["n"] == 12 and "alpha=0.01" in by_attack["aai_topk"]["settings"]
    labels = [label for label, *_ in versus(results, "int_adv", "pgd_at", at=EPS)]
    assert "aai_topk Kendall tau (Boopathy's protocol)" in labels
    test = next(t for label, _, _, t in versus(results, "int_adv", "pgd_at", at=EPS) if label.startswith("aai_topk"))
    assert test is not None  # paired on the same random inputs
    # every Int-Adv variant is compared by its name: a single-input copy of `a` gets exactly `a`'s paired tests
    results["c"] = {"mode": "int_adv_single", "rows": results["a"]["rows"]}
    lines = _versus(results, at=EPS)
    for name in ("a", "c"):
        assert any(line.startswith("- aai_topk Kendall tau (Boopathy's protocol): `" + name + "`") for line in lines)
    a_lines = [line.split("`a`", 1)[1] for line in lines if "`a`" in line]
    c_lines = [line.replace("`c`", "`a`").split("`a`", 1)[1] for line in lines if "`c`" in line]
    assert a_lines == c_lines and len(a_lines) == len(versus(results, "a", "pgd_at", at=EPS))
    table = table_vii(results, [0.0, EPS], "aai_topk")
    assert table.splitlines()[2].startswith("| 0 ") and table.splitlines()[3].startswith("| 8/255 ")
    acc = next(r for r in results["a"]["rows"] if r["measure"] == "accuracy" and r["eps"] > 0)
    assert f"{acc['accuracy']:.3f}" in table.splitlines()[3]
    only_ours = evaluate_model(model, x[:12], y[:12], _evaluation(["ghorbani"]), 0, False, "a", ref)
    assert {r.get("protocol") for r in only_ours if r["measure"] == "interpretation"} == {"ghorbani"}


def test_the_battery_protocol_switch_reaches_the_card_rows(tiny):
    model, x, y = tiny
    system = SimpleNamespace(classifier=model, rts=None, interpreter_options={})
    for protocol, attack in (("boopathy", "aai_topk"), ("ghorbani", "topk")):
        battery, _ = parse_battery({"n_images": 8, "topk": {"protocol": protocol, "interpreters": ["cam"], "steps": 2,
                                                            "ks": [8]}})
        (row,) = topk_rows(system, {"image": x[:8], "label": y[:8]}, battery)
        assert (row["protocol"], row["attack"]) == (protocol, attack)
    with pytest.raises(ValueError, match="protocol") as err:
        parse_battery({"topk": {"protocol": "boopaty"}})
    assert "\n" not in str(err.value)


def _robust(tmp_path: Path, checkpoint: str, mode: str = "pgd_at"):
    load_experiments()
    models = [{"name": "normal", "module": {"mode": "normal"}},
              {"name": "saved", "module": {"mode": mode}, "checkpoint": checkpoint}]
    return parse_experiment(resolve_config([str(ROOT / "configs" / "experiments" / "robust.yaml")],
                                           [f"--models={json.dumps(models)}"], quick=True))[1]


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"models\[1\]\.checkpoint: no such file") as err:
        _robust(tmp_path, str(tmp_path / "missing.pt"))
    assert "\n" not in str(err.value)
    narrow = tmp_path / "narrow.pt"  # robust.yaml's models are small_cnn width 16
    save_classifier(small_cnn(num_classes=10, width=4), narrow, {"width": 4},
                    extra={"robust_training": {"mode": "pgd_at"}})
    with pytest.raises(CheckpointError, match=r"models\[1\]\.checkpoint: .*another classifier") as err:
        _robust(tmp_path, str(narrow))
    assert "\n" not in str(err.value)
    few = tmp_path / "few.pt"
    save_classifier(small_cnn(num_classes=3, width=16), few, {"width": 16}, extra={"robust_training": {"mode": "pgd_at"}})
    with pytest.raises(CheckpointError, match=r"class count mismatch: .* 3 classes, the data has 10"):
        _robust(tmp_path, str(few))
    right = tmp_path / "right.pt"
    save_classifier(small_cnn(num_classes=10, width=16), right, {"width": 16},
                    extra={"robust_training": {"mode": "normal"}})
    with pytest.raises(CheckpointError, match=r"trained in mode 'normal', models\[1\]\.module\.mode is 'pgd_at'"):
        _robust(tmp_path, str(right))
    cfg = _robust(tmp_path, str(right), mode="normal")  # fits: loaded, not trained, so not an output of this run
    assert [p.name for p in outputs(cfg, tmp_path / "out")] == ["robust.png", "normal.pt"]


def test_autoattack_on_500_inputs_is_possible_and_no_count_is_silently_capped(tmp_path, capsys):
    """``autoattack.n_images: 500`` parses (with ``n_images`` >= 500: they are the first PGD inputs); more inputs than
    the split holds is a one-line error before any training, not a smaller n."""
    load_experiments()
    config = [str(ROOT / "configs" / "experiments" / "robust.yaml")]
    cfg = parse_experiment(resolve_config(config, ["--evaluation.n_images=500", "--evaluation.autoattack.n_images=500"],
                                          quick=True))[1]
    assert cfg.evaluation.autoattack.n_images == 500
    with pytest.raises(ValueError, match=r"evaluation.autoattack.n_images \(500\) cannot exceed evaluation.n_images"):
        parse_experiment(resolve_config(config, ["--evaluation.autoattack.n_images=500"], quick=True))
    from defend.experiments.runner import main as run_experiment

    out = tmp_path / "out"
    assert run_experiment(["-c", config[0], "--quick", "--out", str(out), "--no-progress", "--evaluation.n_images=600",
                           "--evaluation.autoattack.eps=[]"]) == 2
    err = capsys.readouterr().err
    assert "evaluation.n_images (600) exceeds the 538 images of the test split" in err
    assert not list(out.glob("*.pt"))  # nothing trained


def test_the_cost_table_tells_the_int_adv_variants_apart():
    """Each Int-Adv variant's gamma, D and BatchNorm treatment are in the cost table; no NaN ratio without a normal
    model."""
    trained = {"epochs": 8, "clean": 0.9, "epoch_seconds": 40.0, "ratio": float("nan"), "train_seconds": 320.0,
               "ce_attack": "pgd"}
    results = {"pgd_at": {**trained, "mode": "pgd_at", "gamma": 1.0, "discrepancy": "normalised", "batchnorm": "joint"},
               "ref": {**trained, "mode": "int_adv_single", "gamma": 0.02, "discrepancy": "reference",
                       "batchnorm": "ce"},
               "ours": {**trained, "mode": "int_adv", "gamma": 1.0, "discrepancy": "normalised", "batchnorm": "joint"}}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in _cost(results).splitlines()[2:]}
    header = [c.strip() for c in _cost(results).splitlines()[0].split("|")[2:-1]]
    col = {name: header.index(name) for name in ("gamma", "D", "BatchNorm", "epoch time vs normal")}
    assert (rows["ref"][col["D"]], rows["ref"][col["BatchNorm"]]) == ("reference", "ce")
    assert float(rows["ref"][col["gamma"]]) == 0.02 and float(rows["ours"][col["gamma"]]) == 1.0
    assert (rows["ours"][col["D"]], rows["ours"][col["BatchNorm"]]) == ("normalised", "joint")
    assert rows["pgd_at"][col["gamma"]] == rows["pgd_at"][col["D"]] == rows["pgd_at"][col["BatchNorm"]] == "-"
    assert all(r[col["epoch time vs normal"]] == "- (no normal model)" for r in rows.values())
