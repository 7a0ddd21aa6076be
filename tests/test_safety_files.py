"""Files are safe: caches keyed on content and checked on reuse, saved detectors checksummed file by file, and
nothing the user made is lost (output manifest, --overwrite, no empty --out, umask-honouring modes, one-line
disk-full / permission errors with no partial file, cache writes that may fail without losing the evaluation).

Helpers and style from tests/test_errors.py: every refusal is exit status 2 with exactly one
``defend <command>: error: ...`` line and no traceback.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from test_errors import assert_nothing_written, assert_one_line_error, run

import defend.detection_data as detection_data
import defend.io as dio
from attacks import ADV2, build_attack, random_targets
from attacks.interpreters import CAMInterpreter, GradInterpreter
from defend.classifier import save_classifier
from defend.detection_data import build_detection_data
from defend.detector import DetectorModule, train_detector
from defend.evaluation import CACHE_KIND, AttackEvaluation, PlanItem, check_adversarial, evaluate_plan
from defend.experiments import runner
from defend.experiments.common import write_outputs
from defend.experiments.config import EXPERIMENTS, ExperimentConfig, ExperimentSpec
from defend.figures import map_grid
from defend.io import (
    MANIFEST,
    CheckpointError,
    WriteError,
    atomic_write_text,
    save_artifact,
    save_cache_entry,
    settings_digest,
    write_json,
)
from defend.models import build_classifier
from defend.models.small import small_cnn


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("DEFEND_DEBUG", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------- shared pieces
def _model(seed: int = 0):
    torch.manual_seed(seed)
    return small_cnn(num_classes=10, width=4).eval()


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Images on the uint8 grid, like decoded image files."""
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).float() / 255


def _data(n: int = 8) -> dict[str, torch.Tensor]:
    y = torch.arange(n) % 10
    return {"image": _images(n), "label": y, "target": random_targets(y, 10, torch.Generator().manual_seed(0))}


def _engine(eps: float = 0.031, steps: int = 2, framework: str = "pgd", **kw) -> ADV2:
    opts = {"eps": eps, "alpha": 0.01} if framework == "pgd" else {}
    return build_attack("adv2", framework, "cam", warm_steps=2, steps=steps, framework_options=opts, **kw)


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, inference_mode=False, use_distributed_sampler=False,
                      logger=False, enable_progress_bar=False, enable_model_summary=False)


def _evaluate(model, data, engine, cache, target: str | None = "cam") -> dict[str, float]:
    """``engine`` against ``target`` (``None``: a plain attack, no target maps), read by CAM."""
    item = PlanItem("adv2" if target else "pgd", "pgd", target, engine, ["cam"])
    ev = evaluate_plan(model, {"cam": CAMInterpreter()}, [item], data, _trainer(), batch_size=4,
                       cache_dir=None if cache is None else str(cache), cache_key="k", progress=False)
    return ev.results[(item.key, "cam")]


def _figures(res: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in res.items() if k != "seconds_per_input"}


@pytest.fixture
def attack_calls(monkeypatch) -> list[int]:
    """Counts the batches every ADV2 engine really attacks (the cache serves the others)."""
    calls: list[int] = []
    original = ADV2.__call__

    def counting(self, model, x, target, target_map=None):
        calls.append(int(x.shape[0]))
        return original(self, model, x, target, target_map)

    monkeypatch.setattr(ADV2, "__call__", counting)
    return calls


def _no_temporaries(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.tmp"))


def _notices(err: str, why: str) -> list[str]:
    return [ln for ln in err.splitlines() if re.fullmatch(rf"\[defend\] cache entry .+\.pt is {why}; recomputing", ln)]


# ============================================================================ 1. caches keyed on content, checked
def test_attack_cache_recomputes_a_batch_whose_images_changed_in_place(tmp_path, attack_calls, capsys):
    """The images behind a persistent cache_dir are rewritten in place (same shapes, same config): only the batch
    whose pixels changed is attacked again, as a plain cache miss (no entry was looked up and rejected)."""
    model, data, cache = _model(), _data(8), tmp_path / "cache"
    first = _evaluate(model, data, _plain(), cache, target=None)
    assert attack_calls == [4, 4] and len(list(cache.glob("*.pt"))) == 2
    assert _evaluate(model, data, _plain(), cache, target=None) == first  # control: an identical engine hits
    assert attack_calls == [4, 4]
    data["image"][5, 0, 3, 3] += 1 / 255 if data["image"][5, 0, 3, 3] < 0.5 else -1 / 255  # one level, in place
    capsys.readouterr()
    again = _evaluate(model, data, _plain(), cache, target=None)
    assert attack_calls == [4, 4, 4]  # the second batch only
    assert "[defend]" not in capsys.readouterr().err  # a new key, not an old entry caught by the checks
    assert again["n"] == 8 and len(list(cache.glob("*.pt"))) == 3


def _plain(eps: float = 0.031, **kw) -> ADV2:
    """A plain PGD attack: no interpreter term, so no target maps (which depend on the images and labels)."""
    return build_attack("pgd", "pgd", warm_steps=kw.pop("warm_steps", 3),
                        framework_options={"eps": eps, "alpha": 0.01}, **kw)


@pytest.mark.parametrize("change", ["labels", "targets", "weights", "eps", "warm_steps", "seed"])
def test_attack_cache_key_covers_inputs_weights_and_attack_settings(change, tmp_path, attack_calls, capsys):
    model, data, cache = _model(), _data(8), tmp_path / "cache"
    _evaluate(model, data, _plain(), cache, target=None)
    assert attack_calls == [4, 4]
    engine = _plain()
    if change == "labels":
        data["label"] = (data["label"] + 1) % 10
    elif change == "targets":
        data["target"] = (data["target"] + 1) % 10
    elif change == "weights":
        with torch.no_grad():
            model.head.bias[0] += 1e-3
    elif change == "eps":
        engine = _plain(eps=0.02)
    elif change == "warm_steps":
        engine = _plain(warm_steps=4)
    elif change == "seed":
        engine = _plain(seed=1)
    capsys.readouterr()
    _evaluate(model, data, engine, cache, target=None)
    assert attack_calls == [4, 4, 4, 4], f"a change of {change} reused cached adversarial inputs"
    assert "[defend]" not in capsys.readouterr().err  # missed by key, not rejected by the checks


def test_attack_cache_key_covers_the_target_maps():
    """Target maps given to the engine are part of the key (the batch's other tensors unchanged)."""
    model, data = _model(), _data(4)
    item = PlanItem("adv2", "pgd", "cam", _engine(), ["cam"])
    ev = AttackEvaluation(model, {"cam": CAMInterpreter()}, [item], data, cache_dir="unused", progress=False)
    maps = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    args = (item, data["image"], data["label"], data["target"])
    path_a, _ = ev._cache_path(*args, maps)
    path_b, _ = ev._cache_path(*args, maps.flip(-1))
    assert path_a != path_b
    assert ev._cache_path(*args, maps.clone())[0] == path_a  # same values, another tensor: same entry


def test_attack_settings_description_is_stable_and_complete():
    """The engine's description is the same for equal settings built apart and differs for any setting, including
    the threat model's and the interpreter term's parameters; private runtime state is left out."""
    assert settings_digest(_engine()) == settings_digest(_engine())
    base = settings_digest(_engine())
    assert settings_digest(_engine(eps=0.04)) != base
    assert settings_digest(_engine(c=2.0)) != base
    assert settings_digest(build_attack("adv2", "pgd", GradInterpreter(score="logit"), warm_steps=2, steps=2)) != \
        settings_digest(build_attack("adv2", "pgd", GradInterpreter(score="prob"), warm_steps=2, steps=2))
    cw = build_attack("adv2", "cw", "cam", warm_steps=2, steps=2, framework_options={"lr": 0.01})
    before = settings_digest(cw)
    cw.threat._adam = object()  # optimiser state of a run: not a setting
    assert settings_digest(cw) == before
    assert settings_digest(build_attack("adv2", "cw", "cam", warm_steps=2, steps=2,
                                        framework_options={"lr": 0.02})) != before


def _tamper(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    payload = torch.load(path, weights_only=True)
    state = dict(payload["state"])
    x_adv = state["x_adv"]
    if how == "ball":  # on the grid, in [0, 1], but 20 levels from the benign image
        x_adv = (torch.round(x_adv * 255) + 20).clamp(0, 255) / 255
    elif how == "nan":
        x_adv = x_adv.clone()
        x_adv[0, 0, 0, 0] = float("nan")
    elif how == "grid":
        x_adv = (x_adv + 0.3 / 255).clamp(0, 1)
    elif how == "shape":
        x_adv = x_adv[:2]
    elif how == "dtype":
        x_adv = x_adv.double()
    state["x_adv"] = x_adv
    save_artifact(path, CACHE_KIND, state, payload["meta"], guard=False)  # a valid checksum: only the checks see it


@pytest.mark.parametrize("how, why", [
    ("ball", r"outside the attack's L-inf ball \(\|x_adv - x\| = 0\.\d+ > eps = 0\.031\)"),
    ("nan", r"not finite \(NaN or Inf values\)"),
    ("grid", r"off the uint8 grid of its inputs \(\d+ values\)"),
    ("shape", r"of shape \(2, 3, 32, 32\), expected \(4, 3, 32, 32\)"),
    ("dtype", r"of dtype torch\.float64, expected torch\.float32"),
    ("truncated", r"unreadable \(cannot load .*\.pt safely: .*\)"),
])
def test_reused_attack_entry_is_validated_and_recomputed(how, why, tmp_path, attack_calls, capsys):
    model, data, cache = _model(), _data(8), tmp_path / "cache"
    first = _evaluate(model, data, _engine(), cache)
    for path in cache.glob("*.pt"):
        _tamper(path, how)
    capsys.readouterr()
    again = _evaluate(model, data, _engine(), cache)
    err = capsys.readouterr().err
    assert len(_notices(err, why)) == 2, err
    assert attack_calls == [4, 4, 4, 4]  # both batches recomputed, no traceback
    assert _figures(again) == _figures(first)  # the same figures as the first run (only the timing differs)
    _evaluate(model, data, _engine(), cache)  # the recomputed entries were written back and are valid
    assert attack_calls == [4, 4, 4, 4] and "[defend]" not in capsys.readouterr().err


def test_frameworks_without_a_ball_are_checked_for_range_and_grid_only():
    x = _images(2)
    far = (torch.round(x * 255) + 60).clamp(0, 255) / 255  # far from x, on the grid, in [0, 1]
    assert check_adversarial(far, x, _engine()).startswith("outside the attack's L-inf ball")
    for fw in ("cw", "stadv"):
        assert check_adversarial(far, x, _engine(framework=fw)) is None
        assert check_adversarial(far + 0.5, x, _engine(framework=fw)).startswith("outside [0, 1]")
        assert check_adversarial(far * float("nan"), x, _engine(framework=fw)).startswith("not finite")
    # inputs off the grid (e.g. resized images): their off-grid offset may be kept (PGD moves them by whole levels)
    off_grid = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.9
    assert check_adversarial(off_grid + 3 / 255, off_grid, _engine(framework="cw")) is None
    assert check_adversarial(off_grid + 3 / 255, off_grid, _engine(eps=0.02)) is None  # 3 levels < eps


def test_detection_cache_keyed_on_content_and_validated(tmp_path, monkeypatch, capsys):
    model = _model()
    x = _images(6)
    target = (model(x).argmax(1) + 1) % 10
    interps = {"cam": CAMInterpreter(), "grad": GradInterpreter()}
    calls: list[int] = []
    original = detection_data.compute_maps

    def counting(model_, xb, interpreters, cls=None):
        calls.append(int(xb.shape[0]))
        return original(model_, xb, interpreters, cls)

    monkeypatch.setattr(detection_data, "compute_maps", counting)
    cache = tmp_path / "c"

    def build(atk, images=None, m=model):
        images = x if images is None else images
        return build_detection_data(m, interps, benign=images[:4], source=images[4:], target=target[4:], attack=atk,
                                    batch_size=2, cache_dir=cache, spec={"t": 1}, progress=False)

    first = build(_engine())
    assert calls == [2, 2, 2]  # two benign batches, one adversarial batch
    again = build(_engine())  # control: an identical engine built anew
    assert calls == [2, 2, 2] and torch.equal(again["image"], first["image"])
    x[1, 0, 0, 0] = 1.0 - x[1, 0, 0, 0]  # a benign image rewritten in place
    capsys.readouterr()
    build(_engine())
    assert calls == [2, 2, 2, 2]  # that batch only, with a notice
    assert len(_notices(capsys.readouterr().err, r"stale \(built from other inputs or settings\)")) == 1
    build(_engine(eps=0.02))  # other attack settings: the adversarial batch is rebuilt (so are the benign maps:
    assert calls == [2, 2, 2, 2, 2, 2, 2]  # the key directory names the whole configuration)
    other = _model(seed=1)
    build(_engine(), m=other)
    assert len(calls) == 10  # other weights: everything rebuilt
    # a reused entry is validated: NaN in a map (re-saved with a valid checksum), then a truncated file
    entry = cache / first["key"] / "adversarial_00000.pt"
    payload = torch.load(entry, weights_only=True)
    payload["state"]["map_cam"][0, 0, 0, 0] = float("nan")
    save_artifact(entry, detection_data.KIND, payload["state"], payload["meta"], guard=False)
    capsys.readouterr()
    fixed = build(_engine())
    assert len(_notices(capsys.readouterr().err, r"holding 'cam' maps that are not finite values in \[0, 1\]")) == 1
    assert len(calls) == 11 and bool(torch.isfinite(fixed["maps"]["cam"]).all())
    entry.write_bytes(entry.read_bytes()[:100])
    build(_engine())
    assert len(_notices(capsys.readouterr().err, r"unreadable \(cannot load .* safely: .*\)")) == 1
    assert len(calls) == 12


@pytest.fixture(scope="module")
def saved_detector(tmp_path_factory):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(16, 2, 32, 32, generator=g)
    labels = torch.arange(16) % 2
    maps[labels == 1] *= 0.5
    det, _ = train_detector(maps, labels, epochs=0, booster={"n_estimators": 5}, seed=0)
    d = tmp_path_factory.mktemp("det") / "det"
    det.save(d)
    return d, maps, det.predict_proba(maps)


@pytest.mark.parametrize("case, pattern", [
    ("booster.json edited", r"booster\.json was modified or is corrupt: it does not match the sha256 listed in "
                            r".*detector\.json"),
    ("trunk.pt replaced", r"trunk\.pt was modified or is corrupt"),
    ("trunk.pt truncated", r"trunk\.pt was modified or is corrupt"),
    ("booster.json missing", r"booster\.json is missing \(listed in .*detector\.json\)"),
    ("trunk.pt missing", r"trunk\.pt is missing \(listed in .*detector\.json\)"),
    ("surrogate.pt truncated", r"surrogate\.pt was modified or is corrupt"),
    ("surrogate.pt missing", r"surrogate\.pt is missing \(listed in .*detector\.json\)"),
    ("detector.json missing", r"detector\.json is missing: .* is not a saved detector"),
    ("detector.json edited", r"detector\.json was modified or is corrupt: its content does not match its checksum"),
    ("detector.json without checksums", r"detector\.json lists no file checksums"),
])
def test_detector_load_refuses_a_tampered_or_missing_file(case, pattern, saved_detector, tmp_path):
    src, maps, prob = saved_detector
    d = tmp_path / "det"
    shutil.copytree(src, d)
    name, what = case.split(" ", 1)
    path = d / name
    if case == "booster.json edited":  # still a valid XGBoost model: it loaded silently before checksums
        model = json.loads(path.read_text())
        model["learner"]["learner_model_param"]["base_score"] = "[9E-1]"
        path.write_text(json.dumps(model))
    elif case == "trunk.pt replaced":  # another valid detector trunk
        DetectorModule(in_channels=2, input_size=32, seed=1).save(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "trunk.pt", path)
    elif what == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif what == "missing":
        path.unlink()
    elif case == "detector.json edited":
        info = json.loads(path.read_text())
        info["hparams"]["lr"] = 0.5
        path.write_text(json.dumps(info))
    elif case == "detector.json without checksums":  # the layout written before checksums
        info = json.loads(path.read_text())
        path.write_text(json.dumps({k: info[k] for k in ("hparams", "booster_options", "has_booster")}))
    with pytest.raises(CheckpointError) as caught:
        DetectorModule.load(d)
    message = str(caught.value)
    assert "\n" not in message and re.search(pattern, message), message
    # the control: the untouched copy loads and predicts exactly as saved
    assert torch.equal(DetectorModule.load(src).predict_proba(maps), prob)


# ============================================================================ 2. nothing lost
def _fake_experiment(monkeypatch, writes=None) -> list[Path]:
    """Register experiment 'fake' whose run writes metrics.json + report.md (and ``writes(out)``); returns the
    list of output directories it ran for."""
    ran: list[Path] = []

    def fake_run(cfg, out, progress=True):
        ran.append(out)
        write_outputs(out, [{"metric": "x", "value": len(ran)}], f"# fake report {len(ran)}\n")
        if writes is not None:
            writes(out)
        return []

    runner.load_experiments()
    monkeypatch.setitem(EXPERIMENTS._items, "fake", ExperimentSpec("fake", fake_run, ExperimentConfig))
    return ran


def _fake_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg" / "fake.yaml"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text("experiment: fake\n")
    return cfg


def _manifest(out: Path) -> dict[str, str]:
    data = json.loads((out / MANIFEST).read_text())
    return {k: v["sha256"] for k, v in data["files"].items()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_experiment_never_overwrites_files_it_did_not_write(tmp_path, monkeypatch, capsys):
    ran = _fake_experiment(monkeypatch)
    cfg, out = _fake_config(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", r"refusing to overwrite 1 file\(s\) in .*out that defend did not "
                                                 r"write or that were edited since: report\.md; .*--overwrite")
    assert ran == [] and sorted(p.name for p in out.iterdir()) == ["report.md"]  # refused before anything ran
    assert (out / "report.md").read_text() == "my own notes\n"
    (out / "report.md").unlink()
    assert run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])[0] == 0
    assert _manifest(out) == {f: _sha(out / f) for f in ("metrics.json", "report.md", "config.yaml", "provenance.json")}
    assert run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])[0] == 0  # its own outputs: replaced
    assert (out / "report.md").read_text() == "# fake report 2\n"
    assert _manifest(out)["report.md"] == _sha(out / "report.md")
    (out / "metrics.json").write_text("[edited by hand]\n")  # a framework output the user edited
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", r"refusing to overwrite 1 file\(s\) .*: metrics\.json;")
    assert len(ran) == 2 and (out / "metrics.json").read_text() == "[edited by hand]\n"
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out), "--overwrite"])
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text()) == [{"metric": "x", "value": 3}]
    assert _manifest(out)["metrics.json"] == _sha(out / "metrics.json")


def test_write_time_check_guards_outputs_the_up_front_list_misses(tmp_path, monkeypatch, capsys):
    """An output the runner did not foresee (here notes.txt) is still checked against the manifest when written."""
    ran = _fake_experiment(monkeypatch, writes=lambda out: atomic_write_text(out / "notes.txt", "framework\n"))
    cfg, out = _fake_config(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", r"refusing to overwrite 1 file\(s\) .*: notes\.txt;")
    assert len(ran) == 1 and (out / "notes.txt").read_text() == "mine\n" and not _no_temporaries(out)


TINY_DIGITS = {"class_path": "DigitsDataModule", "init_args": {"renders_per_digit": [1, 1, 1]}}


def _experiment_cfg(tmp_path: Path, kind: str) -> Path:
    if kind == "attacks":
        clf = tmp_path / "clf.pt"
        torch.manual_seed(0)
        save_classifier(build_classifier("small_cnn", 10, width=4), clf, {"width": 4})
        cfg = {"experiment": "attacks", "data": TINY_DIGITS,
               "classifier": {"checkpoint": str(clf), "module": {"arch": "small_cnn", "model_options": {"width": 4}}},
               "evaluation": {"attacks": ["pgd"], "frameworks": ["pgd"], "interpreters": ["cam"], "n_images": 4}}
    elif kind == "classifier":  # no checkpoint configured: trains and writes out/classifier.pt
        cfg = {"experiment": "classifier", "data": TINY_DIGITS,
               "classifier": {"max_epochs": 1, "module": {"arch": "small_cnn", "model_options": {"width": 4}}}}
    else:
        cfg = {"experiment": "robust", "data": TINY_DIGITS,
               "training": {"max_epochs": 1, "module": {"arch": "small_cnn", "model_options": {"width": 4},
                                                        "inner": {"eps": "8/255", "alpha": "2/255", "steps": 1}}},
               "models": [{"name": "normal", "module": {"mode": "normal"}},
                          {"name": "pgd_at", "module": {"mode": "pgd_at"}}]}
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("kind, user_file", [("attacks", "maps.png"), ("classifier", "classifier.pt"),
                                             ("robust", "pgd_at.pt"), ("attacks", "metrics.json")])
def test_real_experiments_refuse_before_training(kind, user_file, tmp_path, monkeypatch, capsys):
    """The runner knows what each experiment writes (figures, trained checkpoints): the refusal comes before any
    training, so no finished work is lost to a late refusal."""
    runner.load_experiments()

    def must_not_run(*a, **k):
        raise AssertionError("the experiment ran although its output would overwrite a user's file")

    monkeypatch.setattr(EXPERIMENTS.get(kind), "run", must_not_run)
    out = tmp_path / "out"
    out.mkdir()
    (out / user_file).write_bytes(b"the user's own file")
    rc, err = run(capsys, ["experiment", "-c", str(_experiment_cfg(tmp_path, kind)), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", rf"refusing to overwrite 1 file\(s\) .*: {re.escape(user_file)};")
    assert sorted(p.name for p in out.iterdir()) == [user_file]
    assert (out / user_file).read_bytes() == b"the user's own file"


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_out_is_a_one_line_error(value, tmp_path, monkeypatch, capsys):
    ran = _fake_experiment(monkeypatch)
    cfg = _fake_config(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", value])
    assert_one_line_error(rc, err, "experiment", r"--out must name a directory, got '\s*' .*"
                                                 r"pass e\.g\. --out runs/NAME")
    assert ran == []
    assert_nothing_written(work)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(umask, mode, tmp_path, monkeypatch, capsys):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.md", "text")
        write_json(tmp_path / "a.json", {"a": 1})
        save_artifact(tmp_path / "a.pt", "classifier", {"w": torch.zeros(2)}, {})
        save_cache_entry(tmp_path / "cache" / "e.pt", CACHE_KIND, {"x_adv": torch.zeros(1)}, {})
        map_grid(tmp_path / "a.png", [("x", torch.rand(1, 3, 8, 8))], rows=1)
        _fake_experiment(monkeypatch)
        assert run(capsys, ["experiment", "-c", str(_fake_config(tmp_path)), "--out", str(tmp_path / "out")])[0] == 0
        files = [tmp_path / n for n in ("a.md", "a.json", "a.pt", "cache/e.pt", "a.png")]
        files += [tmp_path / "out" / n for n in ("metrics.json", "report.md", MANIFEST)]
        assert {str(p): oct(p.stat().st_mode & 0o777) for p in files} == {str(p): oct(mode) for p in files}
        (tmp_path / "a.md").chmod(0o640)  # like open(): a replaced file keeps the mode its owner gave it
        atomic_write_text(tmp_path / "a.md", "new text")
        assert (tmp_path / "a.md").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def _half_then_enospc(fd, data):
    os.write(fd, bytes(data[: len(data) // 2]))  # a partial temporary file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["text", "json", "artifact", "figure", "detector", "permission"])
def test_write_failures_are_one_line_and_keep_the_previous_file(writer, tmp_path, monkeypatch):
    """Disk full (simulated in the file write, in torch.save and in savefig, each leaving a partial temporary file)
    and permission denied: one line naming the file and the OS reason; the previous file intact, no temporary."""
    names = {"text": "report.md", "json": "metrics.json", "artifact": "model.pt", "figure": "maps.png",
             "detector": "det/trunk.pt", "permission": "report.md"}
    path = tmp_path / names[writer]
    det = None
    if writer == "detector":  # re-saving a saved detector: its first file fails, none of the three changes
        maps, labels = torch.rand(8, 2, 32, 32), torch.arange(8) % 2
        det, _ = train_detector(maps, labels, epochs=0, booster={"n_estimators": 2}, seed=0)
        det.save(path.parent)
    else:
        path.write_bytes(b"previous content")
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    reason = "No space left on device"
    if writer in ("text", "json", "detector"):
        monkeypatch.setattr(dio, "_write_all", _half_then_enospc)
    elif writer == "artifact":
        def full(obj, f, *a, **k):
            f.write(b"PK\x03\x04 partial archive")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(torch, "save", full)
    elif writer == "figure":
        from matplotlib.figure import Figure

        def full(self, fname, *a, **k):
            Path(fname).write_bytes(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(Figure, "savefig", full)
    else:
        def denied(*a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        monkeypatch.setattr(dio.tempfile, "mkstemp", denied)
        reason = "Permission denied"
    with pytest.raises(WriteError) as caught:
        if writer in ("text", "permission"):
            atomic_write_text(path, "new report")
        elif writer == "json":
            write_json(path, [{"new": 1}])
        elif writer == "artifact":
            save_artifact(path, "classifier", {"w": torch.ones(3)}, {})
        elif writer == "figure":
            map_grid(path, [("x", torch.rand(1, 3, 8, 8))], rows=1)
        else:
            det.save(path.parent)
    assert str(caught.value) == f"cannot write {path}: {reason}"
    assert caught.value.errno == (errno.EACCES if writer == "permission" else errno.ENOSPC)
    assert {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing else left


def test_disk_full_during_an_experiment_is_one_line(tmp_path, monkeypatch, capsys):
    """Through the CLI: `cannot write <file>: No space left on device`, the previous outputs and the manifest
    intact and consistent (a later run may still replace them), no temporary file left."""
    _fake_experiment(monkeypatch)
    cfg, out = _fake_config(tmp_path), tmp_path / "out"
    assert run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(dio, "_write_all", _half_then_enospc)
    rc, err = run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])
    assert_one_line_error(rc, err, "experiment", rf"^defend experiment: error: cannot write "
                                                 rf"{re.escape(str(out / 'metrics.json'))}: No space left on device$")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _no_temporaries(out) == []
    monkeypatch.undo()
    _fake_experiment(monkeypatch)
    assert run(capsys, ["experiment", "-c", str(cfg), "--out", str(out)])[0] == 0  # the manifest still matches


def test_cache_write_failure_keeps_the_evaluation(tmp_path, monkeypatch, capsys):
    model, data, cache = _model(), _data(8), tmp_path / "cache"
    uncached = _evaluate(model, data, _engine(), None)
    monkeypatch.setattr(dio, "_write_all", _half_then_enospc)
    capsys.readouterr()
    cached = _evaluate(model, data, _engine(), cache)
    err = capsys.readouterr().err
    notices = [ln for ln in err.splitlines()
               if re.fullmatch(r"\[defend\] cannot write cache entry .+\.pt: No space left on device; going on "
                               r"without caching it", ln)]
    assert len(notices) == 2 and "Traceback" not in err
    assert _figures(cached) == _figures(uncached)
    assert not cache.exists() or list(cache.iterdir()) == []  # each entry complete or absent: absent
    # the detection-data cache likewise
    x = _images(4)
    kw = dict(benign=x[:2], source=x[2:], target=(model(x[2:]).argmax(1) + 1) % 10, attack=_engine(), batch_size=2,
              spec={"t": 1}, progress=False)
    data_cached = build_detection_data(model, {"cam": CAMInterpreter()}, cache_dir=tmp_path / "dc", **kw)
    assert capsys.readouterr().err.count("[defend] cannot write cache entry") == 2
    data_plain = build_detection_data(model, {"cam": CAMInterpreter()}, cache_dir=None, **kw)
    assert torch.equal(data_cached["maps"]["cam"], data_plain["maps"]["cam"])
    assert torch.equal(data_cached["image"], data_plain["image"])
    assert [p for p in (tmp_path / "dc").rglob("*") if p.is_file()] == []
