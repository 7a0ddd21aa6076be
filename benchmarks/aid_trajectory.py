"""Per-epoch trajectory of AID fine-tuning: how the ADV2 ratio and the localisation move epoch by epoch.

    python benchmarks/aid_trajectory.py --rts runs/aid_seed1/rts.pt --seed 1 --epochs 4 --out runs/traj_s1 \
        [--training.aid.module.aid.anchor_weight=100 ...]

Fine-tunes the plain RTS ``--rts`` (the ``rts.pt`` of an ``aid`` experiment run with the same seed) with the AID
settings of ``configs/experiments/aid.yaml`` (``--KEY.PATH=VALUE`` overrides them, as in ``defend experiment``),
and after every epoch measures, as the experiment does but on the **development split** only: ADV2 with the
evaluation budget against the current RTS on the first 64 correctly classified development inputs (L1 benign vs ADV2
with its bootstrap interval and its ratio to the plain RTS's, localisation and its relative drop), and the inner
attack's L1 on the same inputs. It tunes a recipe, so it never reads the test split (``--split test`` is refused;
until 2026-12-06 it read the test inputs that reported the recipe: docs/results.md says so). It is slow (an ADV2
evaluation per epoch) and is not a test. Writes ``OUT/traj.json`` after every epoch.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from attacks.adv2 import random_targets
from defend import stats
from defend.aid import AIDModule, aid_attack, load_rts
from defend.data.base import require_development
from defend.errors import quiet_lightning
from defend.experiments import aid as experiment
from defend.experiments.common import get_classifier, setup_data
from defend.experiments.config import parse_experiment
from defend.experiments.runner import load_experiments, resolve_config
from defend.inputs import select_correct
from defend.metrics import map_l1
from defend.trainer import make_trainer


def _adv2(model, net, data, n, ev, seed) -> dict:
    x, y = data["image"][:n], data["label"][:n]
    gt = (data["mask"][:n] > 0.5).float()
    y_t = random_targets(y, 10, torch.Generator().manual_seed(seed))
    return experiment._attack_one(model, net, x, y, y_t, gt, ev.attack, n, seed)


class Probe(pl.Callback):
    """After each epoch: the development-split figures of the current RTS (relative to the plain one)."""

    def __init__(self, model, dev, ev, seed, base, out):
        self.model, self.dev, self.ev, self.seed, self.base, self.out = model, dev, ev, seed, base, out
        self.rows = [{k: v for k, v in base.items() if k != "per_input"}]

    def on_train_epoch_end(self, trainer, module):
        net, was, start = module.rts, module.rts.training, time.time()
        net.eval()
        with torch.enable_grad():
            r = _adv2(self.model, net, self.dev, 64, self.ev, self.seed)
            y_t = random_targets(self.dev["label"], 10, torch.Generator().manual_seed(self.seed))
            inner = aid_attack(self.model, net, self.dev["image"], y_t, module.attack, seed=self.seed)
        with torch.no_grad():
            inner_l1 = float(map_l1(net(self.model, self.dev["image"], self.dev["label"])[0],
                                    net(self.model, inner.x_adv, y_t)[0]).mean())
        net.train(was)
        b, per = self.base, r["per_input"]
        ratio = stats.bootstrap_ratio(per["l1_benign_vs_adv2"], b["per_input"]["l1_benign_vs_adv2"], self.seed)
        self.rows.append({"epoch": trainer.current_epoch + 1, "split": "dev", "l1": r["l1_benign_vs_adv2"],
                          **ratio.fields("ratio"), "loc": r["localisation"],
                          "loc_drop": 1 - r["localisation"] / b["loc"], "iou": r["iou_benign_vs_adv2"],
                          "inner_l1": inner_l1, "n": int(ratio.n), "probe_seconds": time.time() - start})
        print(json.dumps(self.rows[-1]), flush=True)
        (self.out / "traj.json").write_text(json.dumps(self.rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--rts", required=True, help="the plain RTS to fine-tune (rts.pt of an aid run, same seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (a smoke run)")
    p.add_argument("--split", default="dev", help="the split every epoch is measured on: the development split "
                   "(dev); the test split is refused (this run tunes a recipe)")
    args, overrides = p.parse_known_args()  # --KEY.PATH=VALUE: overrides of aid.yaml, as in defend experiment
    try:
        split = require_development(args.split, "the AID trajectory benchmark")
    except ValueError as exc:
        p.error(str(exc))
    quiet_lightning()
    torch.set_num_threads(1)
    load_experiments()
    _, cfg, _ = parse_experiment(resolve_config(["configs/experiments/aid.yaml"], [f"--seed={args.seed}", *overrides]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dm = setup_data(cfg)
    model, info = get_classifier(cfg, dm, out, False)
    dev = select_correct(model, dm, 64, split)
    ev, seed, plain = cfg.evaluation, args.seed, load_rts(args.rts)
    r0 = _adv2(model, plain, dev, 64, ev, seed)
    base = {"epoch": 0, "split": "dev", "l1": r0["l1_benign_vs_adv2"], "loc": r0["localisation"],
            "per_input": r0["per_input"]}
    pl.seed_everything(seed, workers=True)
    module = AIDModule(classifier=str(info["checkpoint"]), num_classes=dm.num_classes, init_from=args.rts, seed=seed,
                       **cfg.training.options("aid"))
    trainer = make_trainer(cfg.trainer, args.epochs, callbacks=[Probe(model, dev, ev, seed, base, out)],
                           num_sanity_val_steps=0, limit_val_batches=0, inference_mode=False,
                           enable_progress_bar=False, limit_train_batches=args.limit_batches)
    trainer.fit(module, datamodule=dm)


if __name__ == "__main__":
    main()
