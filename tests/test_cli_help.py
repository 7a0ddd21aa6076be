"""`defend --help` and per-command help explain every option."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

import pytest

from defend.cli import main as defend_main


def _help(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert defend_main(argv) == 0
    return capsys.readouterr().out


def _options(text: str, prefix: str = "--") -> dict[str, str]:
    """``{option: its help text}`` from an argparse help page (option lines and their indented continuations)."""
    opts: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            names = [n for n in re.findall(r"--[\w.-]+", m.group(1)) if n.startswith(prefix)]
            current = max(names, key=len) if names else None
            if current:
                opts[current] = m.group(2) or ""
        elif current and line.startswith("    "):
            opts[current] += " " + line.strip()
        else:
            current = None
    return opts


def _explained(help_text: str) -> bool:
    """More than argparse's ``(type: ..., default: ...)``: at least a few words of explanation."""
    words = re.sub(r"\((required, )?type: .*\)$", "", help_text).strip()
    return len(words.split()) >= 3


def test_top_level_help_lists_commands_and_their_options(capsys):
    text = _help(capsys, ["--help"])
    for command in ("fit", "validate", "test", "predict", "experiment"):
        assert re.search(rf"^  {command} ", text, re.M), command
    for option in ("-c FILE", "--model.*", "--data.*", "--trainer.*", "--ckpt_path last", "--seed_everything N",
                   "--print_config", "--out DIR", "--quick", "--KEY.PATH=VALUE", "--no-progress", "--battery.KEY=VALUE",
                   "--data.KEY=VALUE"):
        lines = [m.group(1) for m in re.finditer(rf"^\s+{re.escape(option)}\s{{2,}}(\S.*)$", text, re.M)]
        assert lines and all(_explained(words) for words in lines), (option, lines)
    assert "DEFEND_DEBUG" in text
    assert _help(capsys, []) == text  # no arguments: the same page


def test_experiment_help_explains_every_option(capsys):
    text = _help(capsys, ["experiment", "--help"])
    opts = _options(text)
    assert {"--config", "--out", "--quick", "--no-progress", "--help"} <= set(opts), opts
    for name, words in opts.items():
        assert _explained(words), (name, words)
    assert "-c FILE, --config FILE" in text
    assert re.search(r"--quick\s+apply the config's `quick:` section", text)
    assert "--KEY.PATH=VALUE sets the config key KEY.PATH" in " ".join(text.split())
    assert re.search(r"--out DIR\s+output directory", text)
    from defend.experiments.config import EXPERIMENTS

    listed = re.search(r"experiments: (.*)", text).group(1).split(", ")
    assert sorted(listed) == sorted(EXPERIMENTS) and {"classifier", "attacks", "gap", "robust", "detector", "aid"} <= set(listed)
    assert "examples:" in text


def test_fit_help_has_lightning_options_and_examples(capsys):
    text = _help(capsys, ["fit", "--help"])
    for option in ("--ckpt_path", "--trainer.max_epochs", "--model CONFIG | CLASS_PATH_OR_NAME",
                   "--data CONFIG | CLASS_PATH_OR_NAME", "--seed_everything", "--print_config"):
        assert option in text, option
    assert re.search(r"--ckpt_path last\s+resume an interrupted run", text)
    assert "--model.help CLASS" in text


@pytest.mark.parametrize("kind, cls", [
    ("model", "defend.classifier.ClassifierModule"),
    ("model", "defend.robust.RobustClassifierModule"),
    ("model", "defend.aid.AIDModule"),
    ("data", "defend.data.DigitsDataModule"),
    ("data", "defend.data.ImageFolderDataModule"),
    ("data", "defend.data.CIFAR10DataModule"),
])
def test_every_module_argument_is_explained(kind, cls, capsys):
    """`defend fit --model.help CLASS` documents each argument of the class (from its docstring), and each field of
    its option groups (dataclasses, shown nested as ``--model.<group>.<field>``, from the group's docstring)."""
    text = _help(capsys, ["fit", f"--{kind}.help", cls])
    module, name = cls.rsplit(".", 1)
    target = getattr(__import__(module, fromlist=[name]), name)
    hints = typing.get_type_hints(target.__init__)
    expected = set()
    for p in inspect.signature(target.__init__).parameters:
        if p == "self":
            continue
        if dataclasses.is_dataclass(hints.get(p)):  # an option group: each of its fields, dotted
            expected |= {f"--{kind}.{p}.{f.name}" for f in dataclasses.fields(hints[p])}
        else:
            expected.add(f"--{kind}.{p}")
    opts = _options(text, f"--{kind}.")
    assert expected <= set(opts), sorted(expected - set(opts))
    missing = [o for o, words in opts.items() if not _explained(words)]
    assert not missing, f"undocumented arguments of {cls}: {missing}"
