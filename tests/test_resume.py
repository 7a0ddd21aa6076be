"""Resume: a `defend fit` run stopped mid-way and resumed with `--ckpt_path last` ends where an uninterrupted run ends."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from defend.callbacks import EpochSeed
from defend.cli import main as defend_main
from defend.data import DigitsDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["--data.init_args.batch_size=32", "--data.init_args.renders_per_digit=[1, 1, 1]", "--trainer.max_epochs=3",
         "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]
# the shipped configs, shrunk to 3 epochs of 4 batches of 32 embedded digits. The classifier run checks the
# per-epoch data order (it uses no other randomness); the Int-Adv run's inner PGD draws random starts from the
# global RNG, which checks the per-epoch reseeding (defend.callbacks.EpochSeed).
RUNS = {
    "classifier": (CONFIGS / "classifier" / "digits.yaml", Path("checkpoints/classifier_digits/last.ckpt"),
                   ["--model.init_args.model_options={width: 8}", "--model.init_args.optimiser.lr=0.01"]),
    "robust": (CONFIGS / "robust" / "digits_int_adv.yaml", Path("checkpoints/robust_digits/last.ckpt"),
               ["--model.init_args.model_options={width: 4}", "--model.init_args.inner.steps=1",
                "--model.init_args.inner.ramp_epochs=0", "--model.init_args.optimiser.lr=0.01"]),
}


class StopAt(pl.Callback):
    """Simulates a crash: raises before optimiser step ``step`` (here mid-way through the second epoch)."""

    def __init__(self, step: int = 6) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; restored afterwards
    yield
    torch.set_num_threads(old)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _last_val(run_dir: Path) -> dict[str, str]:
    """The validation row of the last epoch in the newest CSV log of a run."""
    logs = sorted(run_dir.glob("runs/*/version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(logs[-1].open()) if r.get("val/acc")]
    return {k: rows[-1][k] for k in ("epoch", "step", "val/acc", "val/loss")}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_interrupted_fit_resumes_to_the_same_weights(run, tmp_path, monkeypatch):
    config, last, extra = RUNS[run]
    args = ["-c", str(config), *extra, *SMALL]
    full, crashed = tmp_path / "uninterrupted", tmp_path / "interrupted"
    for d in (full, crashed):
        d.mkdir()

    monkeypatch.chdir(full)
    assert defend_main(["fit", *args]) == 0
    ref = _ckpt(full / last)
    assert (ref["epoch"], ref["global_step"]) == (2, 12)

    monkeypatch.chdir(crashed)
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        defend_main(["fit", *args, "--import", __name__, f"--trainer.callbacks+={__name__}.StopAt",
                     "--trainer.callbacks.step=6"])
    stopped = _ckpt(crashed / last)
    assert (stopped["epoch"], stopped["global_step"]) == (0, 4), "last.ckpt should be the end of the first epoch"
    assert defend_main(["fit", *args, "--ckpt_path", "last"]) == 0
    resumed = _ckpt(crashed / last)

    assert (resumed["epoch"], resumed["global_step"]) == (2, 12)
    assert resumed["state_dict"].keys() == ref["state_dict"].keys()
    for k, v in ref["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), f"{k} differs after resuming"
    moved = max((ref["state_dict"][k].float() - stopped["state_dict"][k].float()).abs().max()
                for k in ref["state_dict"])
    assert moved > 1e-3, "training after the checkpoint changed nothing; the comparison would be vacuous"
    assert _last_val(crashed) == _last_val(full)
    for k, s in ref["optimizer_states"][0]["state"].items():
        assert torch.equal(resumed["optimizer_states"][0]["state"][k]["exp_avg"], s["exp_avg"])


def test_shuffle_order_depends_only_on_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        dm = DigitsDataModule(seed=seed, batch_size=16, renders_per_digit=(1, 1, 1))
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    first = order(0, 1)
    assert first == order(0, 1), "a fresh loader (as after a restart) must give the same epoch order"
    assert sorted(first) == list(range(len(first)))
    assert first != order(0, 0) and first != order(1, 1)


def test_epoch_seed_reseeds_every_rng(monkeypatch):
    class _Trainer:
        current_epoch, global_rank = 3, 0

    cb = EpochSeed(seed=5)
    cb.on_train_epoch_start(_Trainer(), None)
    a = (torch.rand(3), torch.randint(0, 10**6, (1,)))
    torch.rand(100)  # consume: the next epoch start must not depend on it
    cb.on_train_epoch_start(_Trainer(), None)
    b = (torch.rand(3), torch.randint(0, 10**6, (1,)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    state = torch.get_rng_state()
    EpochSeed().on_train_epoch_start(_Trainer(), None)  # no seed anywhere: leaves the RNG alone
    assert torch.equal(state, torch.get_rng_state())
