"""One override syntax for ``defend fit``, ``defend experiment`` and ``defend evaluate``: ``--KEY.PATH=VALUE`` after
the config files, parsed by jsonargparse (values read by defend.safe_yaml, class paths under the allowlist), the
same one-line errors with a did-you-mean; the next-step commands the framework prints parse as printed."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from defend.cli import main

REPO = Path(__file__).resolve().parents[1]
FIT = ["fit", "-c", str(REPO / "configs/classifier/digits.yaml")]
EXPERIMENT = ["experiment", "-c", str(REPO / "configs/experiments/attacks.yaml"), "--quick"]
EVALUATE = ["evaluate", "--classifier", "missing.pt", "--battery", "quick"]
BOMB = ("[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e]]")
TAG = "!!python/object/apply:os.system [echo pwned]"


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Exit status 2, one line ``defend <cmd>: error: ...`` holding every fragment."""
    rc, _, err = run(capsys, argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"defend {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------- the override takes effect
def test_fit_override_takes_effect(capsys):
    rc, out, _ = run(capsys, [*FIT, "--trainer.max_epochs=3", "--data.init_args.batch_size=7", "--print_config"])
    config = yaml.safe_load(out)
    assert rc == 0 and config["trainer"]["max_epochs"] == 3 and config["data"]["init_args"]["batch_size"] == 7


def test_experiment_override_takes_effect(capsys):
    rc, out, _ = run(capsys, [*EXPERIMENT, "--print_config", "--attack.eps=8/255", "--evaluation.n_images=5",
                              "--data.init_args.batch_size=7", "--trainer.max_epochs=2", "--seed=4"])
    config = yaml.safe_load(out)
    assert rc == 0 and config["evaluation"]["n_images"] == 5 and config["seed"] == 4
    assert config["attack"]["eps"] == pytest.approx(8 / 255)
    assert config["data"]["init_args"]["batch_size"] == 7 and config["trainer"]["max_epochs"] == 2
    # the quick: section still applies under the overrides (attacks.yaml's quick evaluation.batch_size is 8)
    assert config["evaluation"]["batch_size"] == 8


def test_override_deep_into_a_plain_mapping_keeps_its_other_keys():
    """``training.aid.module`` is a plain mapping (checked against AIDModule later): one key two levels in changes,
    its siblings stay, and the value is YAML (a number, not the text '0.5')."""
    from defend.experiments.runner import load_experiments, resolve_config

    load_experiments()
    raw = resolve_config([str(REPO / "configs/experiments/aid.yaml")],
                         ["--training.aid.module.aid.weight=0.5", "--training.aid.module.aid.every=2"], quick=True)
    aid = raw["training"]["aid"]["module"]["aid"]
    assert aid["weight"] == 0.5 and aid["every"] == 2 and aid["mode"] == "alternate" and aid["anchor_weight"] == 100


def test_experiment_later_override_wins_and_files_compose(capsys):
    rc, out, _ = run(capsys, [*EXPERIMENT, "-c", str(REPO / "configs/trainer/cpu.yaml"), "--print_config",
                              "--evaluation.n_images=5", "--evaluation.n_images=6"])
    assert rc == 0 and yaml.safe_load(out)["evaluation"]["n_images"] == 6


def test_evaluate_override_takes_effect(capsys):
    rc, out, _ = run(capsys, [*EVALUATE, "--print_config", "--battery.n_images=9", "--battery.autoattack.eps=[4/255]",
                              "--battery.attacks.interpreters=[cam]"])
    battery = yaml.safe_load(out)
    assert rc == 0 and battery["name"] == "quick" and battery["n_images"] == 9
    assert battery["autoattack"]["eps"] == [pytest.approx(4 / 255)] and battery["attacks"]["interpreters"] == ["cam"]
    assert battery["topk"]["steps"] == 20  # the rest of quick.yaml is kept


def test_evaluate_data_override_reaches_the_data_module():
    from defend.evaluate.cli import _battery

    battery, _, data = _battery("quick", ["--data.resize=256", "--data.val_fraction=0.2", "--battery.seed=3"])
    assert data == {"resize": 256, "val_fraction": 0.2} and battery.seed == 3


# --------------------------------------------------------------------------------------- unknown keys: one line
def test_unknown_key_fit(capsys, tmp_path):
    refused(capsys, [*FIT, "--trainer.max_epoch=1", f"--trainer.default_root_dir={tmp_path / 'logs'}"],
            "--trainer.max_epoch=1", "did you mean '--trainer.max_epochs'?")
    assert not (tmp_path / "logs").exists()


def test_unknown_key_experiment(capsys, tmp_path):
    out = tmp_path / "out"
    refused(capsys, [*EXPERIMENT, "--out", str(out), "--evaluation.n_imags=8"],
            "--evaluation.n_imags: unknown key 'n_imags' in evaluation; did you mean 'n_images'? (valid: n_images,")
    assert not out.exists()


def test_unknown_key_evaluate(capsys, tmp_path):
    out = tmp_path / "out"
    refused(capsys, ["evaluate", "--classifier", "x.pt", "--out", str(out), "--battery.n_imags=8"],
            "--battery.n_imags: unknown key 'n_imags' in the top level; did you mean 'n_images'?")
    assert not out.exists()


@pytest.mark.parametrize(("arg", "message"), [
    ("--n_images=8", "--n_images is a battery key: write --battery.n_images=8"),
    ("--foo.bar=8", "unknown option --foo.bar; the overrides are --battery.KEY=VALUE, --data.KEY=VALUE"),
])
def test_evaluate_override_outside_its_sections_names_the_rule(capsys, tmp_path, arg, message):
    out = tmp_path / "out"
    refused(capsys, ["evaluate", "--classifier", "x.pt", "--out", str(out), arg], message)
    assert not out.exists()


def test_unknown_section_experiment(capsys, tmp_path):
    refused(capsys, [*EXPERIMENT, "--out", str(tmp_path / "o"), "--evaluaton.n_images=8"],
            "unknown key 'evaluaton' in the top level; did you mean 'evaluation'?")
    assert not (tmp_path / "o").exists()


def test_wrong_type_is_worded_as_for_the_config_file(capsys, tmp_path):
    refused(capsys, [*EXPERIMENT, "--out", str(tmp_path / "o"), "--attack.eps=2"],
            'config key "attack.eps": a radius must lie in [0, 1]')
    refused(capsys, [*EXPERIMENT, "--out", str(tmp_path / "o"), "--attack.eps=.nan"],
            'config key "attack.eps": a radius must be a finite number, got nan')  # the value is YAML
    refused(capsys, ["evaluate", "--classifier", "x.pt", "--out", str(tmp_path / "o"), "--battery.n_images=0"],
            'battery: key "n_images": must be a whole number >= 1')
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, new", [
    (["experiment", "-c", "x.yaml", "--out", "o", "--set", "attack.eps=0.02"], "--attack.eps=0.02"),
    (["evaluate", "--classifier", "x.pt", "--out", "o", "--set", "n_images=8"], "--battery.n_images=8"),
    (["evaluate", "--classifier", "x.pt", "--out", "o", "--set=data.resize=256"], "--data.resize=256"),
])
def test_old_set_names_the_new_spelling(argv, new, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, "--set is gone", f"write {new} ")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------- nothing an override says runs code
@pytest.mark.parametrize("argv", [
    [*FIT, "--data.class_path=os.system"],
    [*EXPERIMENT, "--out", "o", "--data.class_path=os.system"],
    [*EXPERIMENT, "--out", "o", "--data={class_path: os.system, init_args: {}}"],
    ["evaluate", "--classifier", "x.pt", "--out", "o", "--data.class_path=os.system"],
])
def test_class_path_outside_the_allowlist_is_refused(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, "class_path 'os.system' is not importable from a config")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value, fragment", [
    (BOMB, "an anchor bomb?"),
    (TAG, "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
])
@pytest.mark.parametrize("argv, key", [
    (FIT, "--trainer.max_epochs"),
    ([*EXPERIMENT, "--out", "o"], "--trainer.max_epochs"),
    ([*EXPERIMENT, "--out", "o"], "--evaluation.interpreters"),
    (["evaluate", "--classifier", "x.pt", "--out", "o"], "--battery.interpreter_options"),
    (["evaluate", "--classifier", "x.pt", "--out", "o"], "--data.root"),
])
def test_yaml_bombs_and_tags_are_refused_by_our_reader(argv, key, value, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, [*argv, f"{key}={value}"], fragment)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------- printed next-step commands parse
def _parses(command: list[str]) -> None:
    """``command`` (as printed, ``defend <cmd> ...``) parses with its command's own parser, with no option left over
    that is not a config key, and names an output directory."""
    from defend.evaluate.cli import _check_args
    from defend.evaluate.cli import _parser as evaluate_parser
    from defend.experiments.runner import _parser as experiment_parser
    from defend.frontend import parse_command

    assert command[0] == "defend" and command[1] in ("evaluate", "experiment"), command
    parser = evaluate_parser() if command[1] == "evaluate" else experiment_parser()
    args, overrides = parse_command(parser, command[2:])
    assert overrides == [] and args.out
    if command[1] == "evaluate":
        _check_args(args)


def test_detector_experiment_next_step_parses_and_names_existing_paths(tmp_path):
    from defend.experiments.detector import _evaluate_command

    row = {"target_interpreter": "cam", "saved_to": str(tmp_path / "run dir" / "detectors" / "cam")}
    command = shlex.split(_evaluate_command(str(tmp_path / "clf.pt"), row, tmp_path / "run dir"))
    _parses(command)
    assert command[command.index("--detector") + 1] == row["saved_to"]
    assert command[command.index("--out") + 1] == str(tmp_path / "run dir" / "card_cam")


def test_demo_commands_parse_and_name_existing_configs(monkeypatch):
    from defend.demo import demo_commands

    monkeypatch.chdir(REPO)
    commands = demo_commands("runs/demo")
    assert {"classifier", "attacks"} <= set(commands)
    for argv in commands.values():
        _parses(["defend", "experiment", *argv])
        assert Path(argv[argv.index("-c") + 1]).is_file()


def test_help_examples_parse():
    """The example lines of ``defend experiment --help`` and ``defend evaluate --help`` parse as written."""
    from defend.evaluate.cli import EPILOG as EVALUATE_EPILOG
    from defend.evaluate.cli import _parser as evaluate_parser
    from defend.experiments.runner import EPILOG as EXPERIMENT_EPILOG
    from defend.experiments.runner import _parser as experiment_parser
    from defend.frontend import parse_command

    lines = [line.split("#")[0].strip() for line in (EXPERIMENT_EPILOG + EVALUATE_EPILOG).replace("\\\n", "")
             .splitlines() if line.strip().startswith("defend ")]
    assert len(lines) >= 6
    for line in lines:
        command = shlex.split(line)
        parser = evaluate_parser() if command[1] == "evaluate" else experiment_parser()
        args, overrides = parse_command(parser, command[2:])
        assert args.out and all(o.startswith("--") and "=" in o for o in overrides), line
