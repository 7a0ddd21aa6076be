"""The README's "First steps" run as written, in order, from an empty directory: each line is the README's command
(parsed from the block between the walk markers) plus flags that shrink it to tiny settings. Every command must
succeed and leave the file the next one reads where the README says it goes."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from defend.evaluate.card import validate_card

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--data.init_args.renders_per_digit=[1,1,1]"]
TRAIN = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", *DATA]
EXPERIMENT = ["--no-progress", "--classifier.module.model_options.width=4", *DATA]
EVALUATE = ["--no-progress", "--battery.n_images=4", "--battery.batch_size=4", "--battery.clean_n=32",
            "--battery.autoattack.eps=[]", "--battery.topk.steps=2", "--battery.attacks.options.warm_steps=2",
            "--battery.attacks.options.steps=2", "--battery.attacks.attacks=[adv2]",
            "--battery.adaptive.rts_restarts=1", "--data.renders_per_digit=[1,1,1]"]
#: what shrinks each README command (keyed by its config or subcommand) and the file it must leave
TINY = {
    "configs/classifier/digits.yaml": (TRAIN + ["--model.init_args.model_options.width=4"],
                                       "checkpoints/digits_small_cnn.pt"),
    "configs/experiments/classifier.yaml": (EXPERIMENT + ["--evaluation.n_images=8", "--evaluation.n_mask=4",
                                                          "--evaluation.mask.iterations=3"], "runs/classifier/report.md"),
    "configs/experiments/attacks.yaml": (EXPERIMENT + ["--evaluation.n_images=4", "--evaluation.batch_size=4",
                                                       "--attack.warm_steps=2", "--attack.steps=2",
                                                       "--per_interpreter.grad.steps=2", "--per_interpreter.cam.steps=2",
                                                       "--evaluation.attacks=[pgd,adv2]"], "runs/attacks/report.md"),
    "configs/aid/digits_rts.yaml": (TRAIN + ["--model.init_args.width=4"], "checkpoints/digits_rts.pt"),
    "configs/aid/digits_aid.yaml": (TRAIN + ["--trainer.limit_train_batches=4", "--model.init_args.attack.warm_steps=1",
                                             "--model.init_args.attack.steps=1", "--model.init_args.aid.batch_size=4",
                                             "--model.init_args.val_attack_batches=1"], "checkpoints/digits_aid.pt"),
    "runs/card_aid": (EVALUATE, "runs/card_aid/card.json"),
    "configs/robust/digits_int_adv.yaml": (TRAIN + ["--model.init_args.model_options.width=4",
                                                    "--model.init_args.inner.steps=1"], "checkpoints/digits_int_adv.pt"),
    "runs/card_int_adv": (EVALUATE, "runs/card_int_adv/card.json"),
}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walk:start -->\s*```bash\n(.*?)```\s*<!-- walk:end -->", text, flags=re.S)
    assert block, "README.md lost its First steps block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def tiny(cmd: list[str]) -> tuple[list[str], str]:
    key = next(k for k in TINY if k in cmd)
    extra, output = TINY[key]
    return cmd + extra, output


def test_readme_first_steps_run_in_order(tmp_path):
    commands = readme_commands()
    assert len(commands) == len(TINY) and all(c[0] == "defend" for c in commands)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for cmd in commands:
        full, output = tiny(cmd)
        proc = subprocess.run([sys.executable, "-m", "defend.cli", *full[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (" ".join(cmd), proc.stderr[-3000:])
        assert (tmp_path / output).is_file(), (" ".join(cmd), output)
        if cmd[1] == "fit":  # fit says where its artifact and its Lightning checkpoints went
            said = proc.stdout + proc.stderr
            assert f"to {output} (" in said and "Lightning checkpoints" in said, said[-1500:]
    for card in ("runs/card_aid/card.json", "runs/card_int_adv/card.json"):
        validate_card(json.loads((tmp_path / card).read_text()))
    rts_card = json.loads((tmp_path / "runs/card_aid/card.json").read_text())
    assert "digits_aid.pt" in json.dumps(rts_card)  # the card describes the AID-trained RTS it was given


@pytest.mark.parametrize("cmd", readme_commands(), ids=lambda c: " ".join(c[1:3]))
def test_every_readme_command_has_tiny_settings(cmd):
    assert any(k in cmd for k in TINY), cmd
