"""A YAML file runs no code (issue 25): a class_path outside defend / attacks / torch / torchvision / Lightning is
refused on one line without importing its module unless ``--import`` names it on the command line (``evaluate
--data``, ``experiment --data=...``, ``fit -c``); an anchor bomb is refused at once; a duplicated key is an
error naming the key."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from defend import save_classifier
from defend.cli import main as defend_main
from defend.evaluate import main as evaluate_main
from defend.experiments.runner import main as experiment_main
from defend.models.small import small_cnn

ROOT = Path(__file__).resolve().parents[1]
BOMB = """a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """A module ``name`` on ``sys.path`` whose import writes a marker file (returned) and that defines a data module
    ``MyDigits`` and a callback ``MyCallback``."""
    marker = tmp_path / f"{name}.imported"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "import pytorch_lightning as pl\n"
        "from defend.data import DigitsDataModule\n\n\n"
        "class MyDigits(DigitsDataModule):\n    pass\n\n\n"
        "class MyCallback(pl.Callback):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def _one_line(capsys: pytest.CaptureFixture, cmd: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"defend {cmd}: error: ") and "\n" not in err, err
    return err


@pytest.fixture()
def five_class_clf(tmp_path: Path) -> str:
    """An untrained 5-class classifier artifact: the digits (10 classes) do not fit it, which is checked only once the
    data module is built."""
    path = tmp_path / "five.pt"
    save_classifier(small_cnn(num_classes=5, width=4), path, {"width": 4})
    return str(path)


def test_evaluate_data_yaml_naming_a_foreign_module_is_refused_without_importing_it(tmp_path, monkeypatch, capsys,
                                                                                    five_class_clf):
    marker = _user_module(tmp_path, monkeypatch, "cfg_r2_evil_eval")
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: cfg_r2_evil_eval.MyDigits\n  init_args:\n    renders_per_digit: [1, 1, 1]\n")
    out = tmp_path / "out"
    assert evaluate_main(["--classifier", five_class_clf, "--data", str(data), "--out", str(out), "--battery", "quick",
                          "--no-progress"]) == 2
    err = _one_line(capsys, "evaluate")
    assert "class_path 'cfg_r2_evil_eval.MyDigits' is not importable from a config" in err, err
    assert "--import cfg_r2_evil_eval" in err, err
    assert not marker.exists(), "the module named by the YAML file was imported"
    assert not out.exists()


def test_evaluate_data_yaml_with_import_builds_the_users_data_module(tmp_path, monkeypatch, capsys, five_class_clf):
    marker = _user_module(tmp_path, monkeypatch, "cfg_r2_ok_eval")
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: cfg_r2_ok_eval.MyDigits\n  init_args:\n    renders_per_digit: [1, 1, 1]\n")
    out = tmp_path / "out"
    assert evaluate_main(["--classifier", five_class_clf, "--data", str(data), "--out", str(out), "--battery", "quick",
                          "--no-progress", "--import", "cfg_r2_ok_eval"]) == 2
    err = _one_line(capsys, "evaluate")
    assert marker.read_text() == "imported"
    assert "not importable" not in err and "class count mismatch" in err, err  # the data was built: 10 classes
    assert not out.exists()


def test_experiment_set_data_class_path_is_refused_unless_imported(tmp_path, monkeypatch, capsys):
    marker = _user_module(tmp_path, monkeypatch, "cfg_r2_evil_exp")
    args = ["-c", str(ROOT / "configs/experiments/classifier.yaml"), "--print_config",
            "--data={class_path: cfg_r2_evil_exp.MyDigits, init_args: {renders_per_digit: [1, 1, 1]}}"]
    assert experiment_main(args) == 2
    err = _one_line(capsys, "experiment")
    assert "data: class_path 'cfg_r2_evil_exp.MyDigits' is not importable" in err, err
    assert "--import cfg_r2_evil_exp" in err, err
    assert not marker.exists()

    assert experiment_main([*args, "--import", "cfg_r2_evil_exp"]) == 0
    assert "class_path: cfg_r2_evil_exp.MyDigits" in capsys.readouterr().out
    assert marker.exists()


def test_fit_config_naming_a_foreign_callback_is_refused_unless_imported(tmp_path, monkeypatch, capsys):
    marker = _user_module(tmp_path, monkeypatch, "cfg_r2_evil_fit")
    config = ROOT / "configs/classifier/digits.yaml"
    callback = "{class_path: cfg_r2_evil_fit.MyCallback}"
    own = tmp_path / "own.yaml"
    own.write_text("trainer:\n  callbacks:\n    - class_path: cfg_r2_evil_fit.MyCallback\n")
    for extra in (["-c", str(own)], [f"--trainer.callbacks+={callback}"], ["--model", "cfg_r2_evil_fit.MyCallback"]):
        assert defend_main(["fit", "-c", str(config), *extra, "--print_config"]) == 2, extra
        err = _one_line(capsys, "fit")
        assert "class_path 'cfg_r2_evil_fit.MyCallback' is not importable" in err, err
        assert "--import cfg_r2_evil_fit" in err, err
        assert not marker.exists(), extra

    assert defend_main(["fit", "-c", str(config), "-c", str(own), "--import", "cfg_r2_evil_fit", "--print_config"]) == 0
    assert "class_path: cfg_r2_evil_fit.MyCallback" in capsys.readouterr().out
    assert marker.exists()


def test_a_nested_config_file_is_held_by_jsonargparse_policy(tmp_path, monkeypatch, capsys):
    """A class path no walk sees (``model: FILE`` inside a config) is still denied by jsonargparse's import policy."""
    marker = _user_module(tmp_path, monkeypatch, "cfg_r2_evil_nested")
    (tmp_path / "model.yaml").write_text("class_path: cfg_r2_evil_nested.MyCallback\n")
    config = tmp_path / "fit.yaml"
    config.write_text("model: model.yaml\ndata:\n  class_path: DigitsDataModule\n")
    assert defend_main(["fit", "-c", str(config), "--print_config"]) == 2
    err = _one_line(capsys, "fit")
    assert "class_path 'cfg_r2_evil_nested.MyCallback' is not importable" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("where", ["battery", "data", "fit", "experiment"])
def test_an_anchor_bomb_is_refused_at_once(where, tmp_path, capsys, five_class_clf):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 800
    out = tmp_path / "out"
    args = {"battery": ["evaluate", "--classifier", five_class_clf, "--battery", str(bomb), "--out", str(out)],
            "data": ["evaluate", "--classifier", five_class_clf, "--data", str(bomb), "--out", str(out)],
            "fit": ["fit", "-c", str(bomb)],
            "experiment": ["experiment", "-c", str(bomb), "--out", str(out)]}[where]
    start = time.perf_counter()
    assert defend_main(args) == 2
    elapsed = time.perf_counter() - start
    err = _one_line(capsys, args[0])
    assert f"{bomb}: line" in err and "aliases (*name) are expanded" in err, err
    assert elapsed < 1.0, elapsed
    assert not out.exists()


def test_a_duplicated_battery_key_is_refused_naming_it(tmp_path, capsys):
    battery = tmp_path / "dup.yaml"
    battery.write_text("n_images: 8\nbatch_size: 8\nn_images: 16\n")
    assert evaluate_main(["--battery", str(battery), "--print_config"]) == 2
    err = _one_line(capsys, "evaluate")
    assert "line 3: key 'n_images' is given twice (first on line 1)" in err, err


def test_merge_keys_may_still_override_and_limits_name_the_problem():
    from defend.safe_yaml import MAX_BYTES, loads

    assert loads("base: &b {eps: 1, steps: 2}\nrun:\n  <<: *b\n  eps: 3\n")["run"] == {"eps": 3, "steps": 2}
    with pytest.raises(ValueError, match="recursive alias"):
        loads("a: &x [1, *x]\n")
    with pytest.raises(ValueError, match="nested deeper than"):
        loads("[" * 200 + "]" * 200)
    with pytest.raises(ValueError, match="byte limit"):
        loads("a: '" + "x" * MAX_BYTES + "'\n")
