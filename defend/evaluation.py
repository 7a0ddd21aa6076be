"""Attack evaluation: run an attack over batches and measure it with torchmetrics objects (DDP-syncable)."""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from attacks._state import frozen
from attacks.adv2 import ADV2
from attacks.interpreters import Interpreter

from .metrics import AttackSuccessRate, MapDistance, MisclassificationConfidence, NoiseRate, TopKIoU

__all__ = ["AttackMeter", "run_attack", "interpret"]


def interpret(interp: Interpreter, model: nn.Module, x: Tensor, cls: Tensor, batch_size: int = 256) -> Tensor:
    """Maps of ``x`` for classes ``cls`` in batches, with the model frozen (input gradients only)."""
    out = []
    with frozen(model):
        for i in range(0, x.shape[0], batch_size):
            out.append(interp(model, x[i:i + batch_size], cls[i:i + batch_size]).detach())
    return torch.cat(out)


class AttackMeter:
    """ASR, misclassification confidence, map L1 / L2 / top-k IoU to the benign map, noise rate (1 - SSIM)."""

    def __init__(self) -> None:
        self.asr = AttackSuccessRate()
        self.conf = MisclassificationConfidence()
        self.l1 = MapDistance(1)
        self.l2 = MapDistance(2)
        self.iou = TopKIoU()
        self.noise = NoiseRate()
        self.seconds = 0.0
        self.n = 0

    def update(self, logits: Tensor, target: Tensor, x: Tensor, x_adv: Tensor, benign_map: Tensor | None,
               adv_map: Tensor | None, seconds: float = 0.0) -> None:
        self.asr.update(logits, target)
        self.conf.update(logits, target)
        self.noise.update(x, x_adv)
        if benign_map is not None and adv_map is not None:
            self.l1.update(adv_map, benign_map)
            self.l2.update(adv_map, benign_map)
            self.iou.update(adv_map, benign_map)
        self.seconds += seconds
        self.n += x.shape[0]

    def compute(self) -> dict[str, float]:
        out = {"asr": float(self.asr.compute()), "confidence": float(self.conf.compute()),
               "noise_rate": float(self.noise.compute()), "n": self.n,
               "seconds_per_input": self.seconds / max(self.n, 1)}
        if self.l1.update_count:
            out.update(l1=float(self.l1.compute()), l2=float(self.l2.compute()), iou=float(self.iou.compute()))
        return out


def run_attack(attack: ADV2, model: nn.Module, x: Tensor, target: Tensor, target_map: Tensor | None,
               batch_size: int, progress: Any = None) -> tuple[Tensor, float]:
    """Attack ``x`` batch by batch; returns the adversarial inputs and the total attack time in seconds."""
    outs, seconds = [], 0.0
    for i in range(0, x.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        start = time.perf_counter()
        res = attack(model, x[sl], target[sl], None if target_map is None else target_map[sl])
        seconds += time.perf_counter() - start
        outs.append(res.x_adv)
        if progress is not None:
            progress.update(res.x_adv.shape[0])
    return torch.cat(outs), seconds
