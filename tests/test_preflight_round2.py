"""``defend evaluate``'s pre-flight (issue 25, "failures after the work"): every bad input the red team found is a
one-line error before any measurement runs and before ``--out`` is created or written; data with fewer than 4 classes
runs the reduced AutoAttack and the card says so."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from _tiny import fit_small_cnn, shape_folder, train_tiny_classifier

from attacks import RTSNetwork
from defend import ImageFolderDataModule, load_card, save_classifier
from defend.aid import save_rts
from defend.autoattack import autoattack_accuracy, autoattack_plan
from defend.evaluate import main
from defend.inputs import take_split

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = str(Path(__file__).parent / "data" / "evaluate_tiny.yaml")
#: the measurements of evaluate_system: none may start when the pre-flight refuses
WORK = ("clean_accuracy", "attack_inputs", "autoattack_rows", "topk_rows", "run_attacks", "rescore_sets")


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory, one_thread):
    model, _, _ = train_tiny_classifier(steps=40, width=4)
    path = tmp_path_factory.mktemp("clf") / "tiny.pt"
    save_classifier(model, path, {"width": 4})
    return model, path


@pytest.fixture
def no_work(monkeypatch):
    """Every measurement of the run fails the test if it is called (the pre-flight must refuse first)."""
    import defend.evaluate.run as run_mod

    def ran(*args, **kwargs):
        raise AssertionError("a measurement ran before the input was refused")

    for name in WORK:
        monkeypatch.setattr(run_mod, name, ran)


def refused(capsys, *args: str) -> str:
    """Run ``defend evaluate`` (tiny battery, quiet); assert exit 2 with one error line; return that line."""
    argv = [*args, "--no-progress"] + ([] if "--battery" in args else ["--battery", TINY])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("[defend] warning")]  # notices of other checks
    assert len(err) == 1 and err[0].startswith("defend evaluate: error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------------ outputs
def test_adversarial_file_in_out_is_refused_before_any_work(tiny_clf, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adversarial").write_text("my notes")
    err = refused(capsys, "--classifier", str(tiny_clf[1]), "--out", str(out))
    assert f"{out / 'adversarial'} is a file where the run needs a folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["adversarial"]
    assert (out / "adversarial").read_text() == "my notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_out_is_refused_before_any_work(tiny_clf, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        err = refused(capsys, "--classifier", str(tiny_clf[1]), "--out", str(out))
        assert f"--out: cannot write in {out}: Permission denied; choose a writable --out" in err
        assert list(out.iterdir()) == []
    finally:
        out.chmod(stat.S_IRWXU)


def test_read_only_file_system_is_refused_before_any_work(tiny_clf, tmp_path, capsys, no_work, monkeypatch):
    """A read-only mount (EROFS, which even root cannot write): the writability probe reports it before any work."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    err = refused(capsys, "--classifier", str(tiny_clf[1]), "--out", str(out))
    assert f"--out: cannot write in {out}: Read-only file system; choose a writable --out" in err
    assert list(out.iterdir()) == []


def test_non_utf8_out_name_is_refused_before_any_work(tiny_clf, tmp_path, capsys, no_work):
    out = os.fsdecode(os.fsencode(tmp_path) + b"/card\xff")
    err = refused(capsys, "--classifier", str(tiny_clf[1]), "--out", out)
    assert "--out: the name" in err and "card\\xff' is not valid UTF-8" in err and "rename it" in err
    assert not os.path.lexists(out) and list(tmp_path.iterdir()) == []


def test_non_utf8_class_folder_is_refused_before_any_work(tiny_clf, tmp_path, capsys, no_work):
    root = shape_folder(tmp_path / "images", ["disc", os.fsdecode(b"caf\xe9-latin1")])
    out = tmp_path / "out"
    err = refused(capsys, "--classifier", str(tiny_clf[1]), "--data", f"folder:{root}", "--out", str(out))
    assert "class folder b'" in err and "caf\\xe9-latin1': its name is not valid UTF-8" in err
    assert "rename the folder to a UTF-8 name" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ battery
@pytest.mark.parametrize("key,value", [("topk.k", "65"), ("topk.ks", "[4, 65]")])
def test_topk_k_larger_than_the_map_is_refused_before_any_work(key, value, tiny_clf, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    err = refused(capsys, "--classifier", str(tiny_clf[1]), "--out", str(out), f"--battery.{key}={value}")
    assert "topk: k / ks [65] exceed the 64 pixels of the 'cam' map (its own grid)" in err  # 8x8 CAM of 32 px
    assert not out.exists()


def test_unknown_rts_interpreter_option_is_refused_before_any_work(tiny_clf, tmp_path, capsys, no_work):
    """``interpreter_options.rts`` is not built when the battery is read (RTS needs --rts): the pre-flight builds it."""
    rts = tmp_path / "rts.pt"
    save_rts(RTSNetwork(tiny_clf[0].stage_channels, 10, width=4), rts)
    out = tmp_path / "out"
    err = refused(capsys, "--classifier", str(tiny_clf[1]), "--rts", str(rts), "--out", str(out),
                  "--battery.interpreter_options={rts: {enc_wieght: 0.3}}")
    assert "battery: interpreter_options:" in err and "unexpected keyword argument 'enc_wieght'" in err
    assert not out.exists()


#: battery values that passed the battery's own checks and failed only when their attack was built or run
LATE = {
    "topk on MASK": (["topk.interpreters=[mask]"], "topk (mask): the top-k attack needs a differentiable interpreter"),
    "term option": (["attacks.options.term_options={grad: {tua: 0.1}}"],
                    "attacks / adaptive options: GradInterpreter.attack_term() got an unexpected keyword argument 'tua'"),
    "per-interpreter term option": (["attacks.per_interpreter={cam: {term_options: {cam: {tau: 1}}}}"],
                                    "interpreter 'cam' takes no attack-term options, got ['tau']"),
    "framework option": (["attacks.options.framework_options={epsilon: 0.1}"],
                         "PGD.__init__() got an unexpected keyword argument 'epsilon'"),
    "edge stages": (["attacks.options.edge_stages=warmup"], "edge_stages must be 'all' or 'warm', got 'warmup'"),
    "autocast": (["attacks.options.autocast=fp8"], "autocast must be one of ['bf16', 'fp16'] or None, got 'fp8'"),
    "adaptive term option": (["adaptive.options.term_options={cam: {x: 1}}"],
                             "interpreter 'cam' takes no attack-term options, got ['x']"),
    "topk.n": (["topk.n=50"], "topk.n (50) exceeds n_images (6)"),
    "n_images": (["n_images=1000"], "n_images (1000) exceeds the 538 test inputs of the data; lower n_images"),
}


@pytest.mark.parametrize("case", list(LATE))
def test_every_option_that_failed_late_is_refused_before_any_work(case, tiny_clf, tmp_path, capsys, no_work):
    sets, want = LATE[case]
    out = tmp_path / "out"
    err = refused(capsys, "--classifier", str(tiny_clf[1]), "--out", str(out), *[f"--battery.{s}" if not s.startswith("data.") else f"--{s}" for s in sets])
    assert want in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ re-score
@pytest.mark.parametrize("layout", ["same", "out_inside_inputs", "inputs_inside_out", "adversarial_of_out"])
def test_rescore_never_reads_the_folder_it_writes(layout, tiny_clf, tmp_path, capsys, no_work):
    card = tmp_path / "card"
    (card / "adversarial").mkdir(parents=True)
    (card / "card.json").write_text('{"mine": 1}')
    inputs, out = {"same": (card, card), "out_inside_inputs": (card, card / "rescored"),
                   "inputs_inside_out": (card, tmp_path), "adversarial_of_out": (card / "adversarial", card)}[layout]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    err = refused(capsys, "--classifier", str(tiny_clf[1]), "--inputs", str(inputs), "--out", str(out))
    assert f"--inputs {inputs} and --out {out} overlap" in err and "give an --out outside the --inputs folder" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert json.loads((card / "card.json").read_text()) == {"mine": 1}


# ------------------------------------------------------------------------------------------------ AutoAttack
def test_autoattack_version_by_class_count():
    assert autoattack_plan(10) == ("standard", ["apgd-ce", "apgd-t", "fab-t", "square"], 9)
    assert autoattack_plan(4) == ("standard", ["apgd-ce", "apgd-t", "fab-t", "square"], 3)
    assert autoattack_plan(3) == ("reduced", ["apgd-ce", "apgd-dlr", "fab-t", "square"], 2)
    assert autoattack_plan(2) == ("reduced", ["apgd-ce", "fab-t", "square"], 1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        autoattack_plan(1)


@pytest.mark.parametrize("k", [2, 3])
def test_autoattack_runs_with_two_and_three_classes(k):
    """The standard version dies in APGD-T's targeted DLR loss below 4 classes; the reduced one runs and says what
    it ran (a linear classifier at radius 0.5: APGD-CE flips every input, so the test takes a second)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, k)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = autoattack_accuracy(model, x, y, 0.5, batch_size=4)
    assert res.settings["version"] == "reduced" and res.settings["attacks"] == autoattack_plan(k)[1]
    assert res.settings["target_classes"] == k - 1 and res.accuracy == 0.0
    assert not any("DLR loss" in f for f in res.flags)


def test_three_class_folder_runs_the_reduced_autoattack_and_the_card_says_so(tmp_path):
    root = shape_folder(tmp_path / "images", ["disc", "square", "triangle"], per_class=16)
    dm = ImageFolderDataModule(str(root), image_size=32, resize=32, val_fraction=0.15, test_fraction=0.25, seed=0)
    dm.setup("fit")
    model = fit_small_cnn(take_split(dm, "train"), 3, steps=40)
    save_classifier(model, tmp_path / "three.pt", {"width": 4})
    out = tmp_path / "card"
    args = ["--classifier", str(tmp_path / "three.pt"), "--data", f"folder:{root}", "--out", str(out),
            "--battery", TINY, "--no-progress", "--data.test_fraction=0.25", "--battery.n_images=2",
            "--battery.n_figure=1", "--battery.topk.interpreters=[]", "--battery.attacks.interpreters=[cam]",
            "--battery.adaptive.ensemble=[]", "--battery.autoattack.n=4"]
    assert main(args) == 0
    card = load_card(out)
    assert card["data"]["num_classes"] == 3
    (row,) = card["results"]["autoattack"]
    assert row["attack"] == "autoattack-reduced" and row["n"] == 4
    assert row["budget"]["version"] == "reduced"
    assert row["budget"]["attacks"] == ["apgd-ce", "apgd-dlr", "fab-t", "square"]
    assert "with 3 classes the targeted DLR loss of APGD-T is not defined" in row["note"]
    assert not any("DLR loss" in f for f in row["flags"])
    assert "AutoAttack (reduced version: APGD-CE, APGD-DLR, FAB-T, SQUARE" in (out / "report.md").read_text()


@pytest.mark.parametrize("version", ["standard", "reduced"])
def test_robust_report_shows_autoattack_rows_of_either_version(version):
    """The robust experiment's report reads the AutoAttack rows whatever version ran (a 3-class data set runs the
    reduced one): the cell shows the row's accuracy and interval, not '-'."""
    from defend.experiments.robust_report import _grid

    row = {"measure": "accuracy", "attack": f"autoattack-{version}", "eps": 8 / 255, "n": 40, "accuracy": 0.25,
           "accuracy_ci_low": 0.14, "accuracy_ci_high": 0.40}
    (line,) = _grid({"m": {"mode": "pgd_at", "rows": [row]}}, [8 / 255], "accuracy", ("autoattack",), "accuracy",
                    "AutoAttack")
    assert line[1] == "AutoAttack (indicative, n 40)"
    assert line[2].startswith("0.250") and "0.14" in line[2] and "0.40" in line[2]
