"""Attack evaluation: run an attack over batches and measure it with torchmetrics objects (DDP-syncable)."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MaxMetric, SumMetric
from tqdm.auto import tqdm

from attacks.adv2 import ADV2
from attacks.interpreters import Interpreter
from attacks.state import frozen

from .io import Undescribable, cache_notice, load_cache_entry, save_cache_entry, settings_digest, state_digest
from .metrics import AttackSuccessRate, MapDistance, MisclassificationConfidence, NoiseRate, TopKIoU

__all__ = ["AttackMeter", "run_attack", "interpret", "PlanItem", "AttackEvaluation", "evaluate_plan",
           "check_adversarial", "CACHE_KIND"]

#: the ``kind`` of an attack-evaluation cache entry (a :func:`defend.io.save_artifact` file)
CACHE_KIND = "attack-batch"
#: bumped when the cache key or the entry layout changes
CACHE_FORMAT = 2


def check_adversarial(x_adv: Any, x: Tensor, engine: Any = None) -> str | None:
    """Why ``x_adv`` cannot be the attack's output for inputs ``x`` (``None`` when it can).

    Checks: a tensor of ``x``'s shape and dtype, finite, in [0, 1], on the uint8 grid wherever ``x`` is (every
    framework quantises its best iterate), and, for attacks with an L-inf ball (``engine.threat.eps``: PGD),
    ``|x_adv - x| <= eps + 1e-6``. C&W and StAdv have no ball: range, grid and finiteness only."""
    if not isinstance(x_adv, Tensor):
        return f"not a tensor (got {type(x_adv).__name__})"
    if tuple(x_adv.shape) != tuple(x.shape):
        return f"of shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}"
    if x_adv.dtype != x.dtype:
        return f"of dtype {x_adv.dtype}, expected {x.dtype}"
    xa = x_adv.detach().to(x.device)
    if not bool(torch.isfinite(xa).all()):
        return "not finite (NaN or Inf values)"
    lo, hi = float(xa.min()), float(xa.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        return f"outside [0, 1] (range [{lo:.4g}, {hi:.4g}])"
    lv, la = x.detach() * 255, xa * 255
    off = ((lv - lv.round()).abs() <= 1e-3) & ((la - la.round()).abs() > 1e-3)
    if bool(off.any()):
        return f"off the uint8 grid of its inputs ({int(off.sum())} values)"
    eps = getattr(getattr(engine, "threat", None), "eps", None)
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        d = float((xa - x.detach()).abs().max())
        if d > float(eps) + 1e-6:
            return f"outside the attack's L-inf ball (|x_adv - x| = {d:.4g} > eps = {float(eps):.4g})"
    return None


def interpret(interp: Interpreter, model: nn.Module, x: Tensor, cls: Tensor, batch_size: int = 256) -> Tensor:
    """Maps of ``x`` for classes ``cls`` in batches, with the model frozen (input gradients only)."""
    out = []
    with frozen(model):
        for i in range(0, x.shape[0], batch_size):
            out.append(interp(model, x[i:i + batch_size], cls[i:i + batch_size]).detach())
    return torch.cat(out)


class AttackMeter(nn.Module):
    """ASR, misclassification confidence, map L1 / L2 / top-k IoU to the benign map, noise rate (1 - SSIM),
    L-inf size, input count and attack seconds: all torchmetrics states, summed (max for L-inf) across DDP ranks
    at :meth:`compute` (every rank must call it, in the same order). Every figure carries its 95 % interval (Wilson
    for the success rate, a seeded bootstrap over inputs for the means; :mod:`defend.stats`) and the IoU the chance
    level of its top-k fractions (``iou_chance``)."""

    #: the figures with an interval, and whether each needs the maps
    FIGURES = (("asr", False), ("confidence", False), ("noise_rate", False), ("l1", True), ("l2", True),
               ("iou", True))

    def __init__(self) -> None:
        super().__init__()
        self.asr = AttackSuccessRate()
        self.conf = MisclassificationConfidence()
        self.l1 = MapDistance(1)
        self.l2 = MapDistance(2)
        self.iou = TopKIoU()
        self.noise = NoiseRate()
        self.linf = MaxMetric()
        self.seconds = SumMetric()
        self.n = SumMetric()
        self.has_maps = SumMetric()
        self.pixels = MaxMetric()

    def update(self, logits: Tensor, target: Tensor, x: Tensor, x_adv: Tensor, benign_map: Tensor | None,
               adv_map: Tensor | None, seconds: float = 0.0) -> None:
        self.asr.update(logits, target)
        self.conf.update(logits, target)
        self.noise.update(x, x_adv)
        self.linf.update((x_adv - x).abs().amax().detach().float())
        with_maps = benign_map is not None and adv_map is not None
        if with_maps:
            self.l1.update(adv_map, benign_map)
            self.l2.update(adv_map, benign_map)
            self.iou.update(adv_map, benign_map)
            self.pixels.update(float(benign_map.shape[-1] * benign_map.shape[-2]))
        self.has_maps.update(float(with_maps))
        self.seconds.update(float(seconds))
        self.n.update(float(x.shape[0]))

    def _metric(self, name: str):
        return {"asr": self.asr, "confidence": self.conf, "noise_rate": self.noise, "l1": self.l1, "l2": self.l2,
                "iou": self.iou}[name]

    def compute(self, seed: int = 0) -> dict[str, Any]:
        """Every figure, ``<figure>_ci_low`` / ``_ci_high`` (bootstrap ``seed``), ``n``, ``linf``, seconds per input and,
        with maps, ``iou_chance``."""
        n = float(self.n.compute())
        with_maps = float(self.has_maps.compute()) > 0
        out: dict[str, Any] = {"n": int(round(n)), "linf": float(self.linf.compute()),
                               "seconds_per_input": float(self.seconds.compute()) / max(n, 1.0)}
        for name, needs_maps in self.FIGURES:
            if needs_maps and not with_maps:
                continue
            out.update(self._metric(name).estimate(seed).fields(name))
        if with_maps:
            out["iou_chance"] = self.iou.chance(int(self.pixels.compute()))
        return out

    def per_input(self) -> dict[str, Tensor]:
        """The per-input values of every figure (for paired tests between attacks or systems on the same inputs)."""
        with_maps = float(self.has_maps.compute()) > 0
        return {name: self._metric(name).per_input() for name, needs_maps in self.FIGURES
                if with_maps or not needs_maps}


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


# --------------------------------------------------------------------------------------------- sharded (DDP) pass
@dataclass
class PlanItem:
    """One row group of an attack evaluation: ``engine`` (attack x framework against ``interpreter``; ``None`` =
    the plain attack, no interpretation term) whose inputs are measured by each interpreter of ``readers``."""

    attack: str
    framework: str
    interpreter: str | None
    engine: ADV2
    readers: list[str]

    @property
    def key(self) -> str:
        return f"{self.attack}/{self.framework}/{self.interpreter or '-'}"


class _Shard(Dataset):
    """Examples ``rank, rank + world, ...`` of the evaluation set (no padding: every input is counted once)."""

    def __init__(self, tensors: dict[str, Tensor], rank: int, world: int) -> None:
        self.tensors, self.idx = tensors, list(range(rank, next(iter(tensors.values())).shape[0], world))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        j = self.idx[i]
        return {"index": torch.tensor(j), **{k: v[j] for k, v in self.tensors.items()}}


class AttackEvaluation(pl.LightningModule):
    """Run a plan of attacks over an evaluation set with ``Trainer.test`` (1 process, 1 GPU or DDP).

    Each rank attacks its own shard (examples ``rank::world``, un-padded, so the published figures count every
    input exactly once); every figure is an :class:`AttackMeter` (torchmetrics) synced across ranks at the end.
    ``results[(plan key, reader)]`` holds the figures with their intervals (bootstrap ``seed``) on every rank,
    ``per_input[(plan key, reader)]`` the per-input values; ``examples`` the adversarial inputs of the
    first ``keep`` examples (gathered to every rank), ``benign`` their benign maps.

    With ``cache_dir`` every (plan item, batch) result is written there (atomically: an entry is complete or absent)
    and reused by a re-run: an interrupted evaluation resumes without redoing finished batches. The entry's key is a
    digest of the batch's tensors (images, labels, targets, target maps), the model's weights, the engine's settings
    (:func:`defend.io.describe`) and ``cache_key`` (e.g. a fingerprint of the attack code), so images rewritten in
    place, other weights or other attack options never reuse old results. A reused entry is checked
    (:func:`check_adversarial`) and recomputed, with a notice, when it is unreadable or implausible; a failed cache
    write (disk full) is a notice and the evaluation goes on.
    """

    def __init__(self, model: nn.Module, interpreters: dict[str, Interpreter], plan: list[PlanItem],
                 data: dict[str, Tensor], batch_size: int = 64, keep: int = 0, cache_dir: str | None = None,
                 cache_key: str = "", progress: bool = True, seed: int = 0) -> None:
        super().__init__()
        for k in ("image", "label", "target"):
            if k not in data:
                raise ValueError(f"evaluation data needs {k!r}")
        self.model = model
        self.interpreters, self.plan, self.data = interpreters, plan, data
        self.batch_size, self.keep, self.progress, self.seed = int(batch_size), int(keep), progress, int(seed)
        self.cache_dir, self.cache_key = (Path(cache_dir) if cache_dir else None), cache_key
        self.meters = nn.ModuleDict({_mkey(p.key, r): AttackMeter() for p in plan for r in p.readers})
        self.results: dict[tuple[str, str], dict[str, Any]] = {}
        self.per_input: dict[tuple[str, str], dict[str, Tensor]] = {}
        self.examples: dict[str, Tensor] = {}
        self.benign: dict[str, Tensor] = {}
        self._local_examples: dict[str, dict[int, Tensor]] = {}
        self._local_benign: dict[str, dict[int, Tensor]] = {}
        self._bar = None
        self._model_digest: str | None = None
        self._settings_digest: dict[str, str | None] = {}

    def test_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return DataLoader(_Shard(self.data, rank, world), batch_size=self.batch_size, shuffle=False)

    def on_test_start(self) -> None:
        n_local = len(range(self.trainer.global_rank, self.data["image"].shape[0], self.trainer.world_size))
        self._bar = tqdm(total=n_local * len(self.plan), desc="attacks", unit="input",
                         disable=not (self.progress and self.trainer.is_global_zero))

    # ------------------------------------------------------------------------------------------ cache
    def _settings(self, item: PlanItem) -> str | None:
        """Digest of the engine's configuration (:func:`defend.io.describe`); ``None`` (with a one-time notice)
        when it has no stable description: that item is then never cached."""
        if item.key not in self._settings_digest:
            try:
                self._settings_digest[item.key] = settings_digest(item.engine)
            except Undescribable as exc:
                print(f"[defend] attack {item.key} is not cached: its settings cannot be described stably ({exc})",
                      file=sys.stderr, flush=True)
                self._settings_digest[item.key] = None
        return self._settings_digest[item.key]

    def _cache_path(self, item: PlanItem, x: Tensor, y: Tensor, y_t: Tensor,
                    target_map: Tensor | None) -> tuple[Path, str] | None:
        """The entry of this (item, batch): keyed on the batch's tensors, the model's weights, the engine's
        settings and ``cache_key`` (code fingerprint), so inputs rewritten in place never reuse old results."""
        if self.cache_dir is None:
            return None
        settings = self._settings(item)
        if settings is None:
            return None
        if self._model_digest is None:
            self._model_digest = state_digest(self.model.state_dict())
        spec = {"format": CACHE_FORMAT, "key": self.cache_key, "item": item.key, "model": self._model_digest,
                "attack": settings, "inputs": state_digest({"image": x, "label": y, "target": y_t,
                                                            "target_map": target_map})}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / f"{key[:32]}.pt", key

    def _reuse(self, path: Path, key: str, item: PlanItem, x: Tensor) -> tuple[Tensor, float] | None:
        """A validated cached result, or ``None`` (with a notice when the entry is unusable)."""
        payload = load_cache_entry(path, CACHE_KIND)
        if payload is None:
            return None
        state, meta = payload.get("state"), payload.get("meta")
        state, meta = (state if isinstance(state, dict) else {}), (meta if isinstance(meta, dict) else {})
        if meta.get("key") != key:
            why = "stale (built for other inputs, weights or settings)"
        else:
            why = check_adversarial(state.get("x_adv"), x, item.engine)
        seconds = state.get("seconds")
        if why is None and not (isinstance(seconds, Tensor) and seconds.numel() == 1 and bool(torch.isfinite(seconds))
                                and float(seconds) >= 0):
            why = "missing a valid attack time"
        if why is not None:
            cache_notice(path, why)
            return None
        return state["x_adv"].to(x.device, x.dtype), float(seconds)

    def _cached_attack(self, item: PlanItem, idx: Tensor, x: Tensor, y: Tensor, y_t: Tensor,
                       target_map: Tensor | None) -> tuple[Tensor, float]:
        entry = self._cache_path(item, x, y, y_t, target_map)
        if entry is not None and entry[0].is_file():
            hit = self._reuse(entry[0], entry[1], item, x)
            if hit is not None:
                return hit
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        x_adv = item.engine(self.model, x, y_t, target_map).x_adv.detach()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - start
        if entry is not None:  # a failed write (disk full) is a notice: the result is used uncached
            save_cache_entry(entry[0], CACHE_KIND, {"index": idx.cpu(), "x_adv": x_adv.cpu(),
                                                    "seconds": torch.tensor(seconds)}, {"key": entry[1]})
        return x_adv, seconds

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y, y_t, idx = batch["image"], batch["label"], batch["target"], batch["index"]
        keep = idx < self.keep
        with torch.enable_grad():
            benign = {n: g.map(self.model, x, y).detach() for n, g in self.interpreters.items()}
            for n, m in benign.items():
                for j in keep.nonzero().flatten().tolist():
                    self._local_benign.setdefault(n, {})[int(idx[j])] = m[j].cpu()
            for item in self.plan:
                target_map = benign[item.interpreter] if item.interpreter is not None else None
                x_adv, seconds = self._cached_attack(item, idx, x, y, y_t, target_map)
                with torch.no_grad():
                    logits = self.model(x_adv)
                for reader in item.readers:
                    adv_map = self.interpreters[reader].map(self.model, x_adv, y_t).detach()
                    self.meters[_mkey(item.key, reader)].update(logits, y_t, x, x_adv, benign[reader], adv_map, seconds)
                for j in keep.nonzero().flatten().tolist():
                    self._local_examples.setdefault(item.key, {})[int(idx[j])] = x_adv[j].cpu()
                if self._bar is not None:
                    self._bar.update(x.shape[0])

    def on_test_epoch_end(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for item in self.plan:  # same order on every rank: each compute() is a collective under DDP
            for reader in item.readers:
                meter = self.meters[_mkey(item.key, reader)]
                self.results[(item.key, reader)] = meter.compute(self.seed)
                self.per_input[(item.key, reader)] = meter.per_input()
        local = (self._local_examples, self._local_benign)
        parts = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, local)
        for store, pos in ((self.examples, 0), (self.benign, 1)):
            merged: dict[str, dict[int, Tensor]] = {}
            for part in parts:
                for k, d in part[pos].items():
                    merged.setdefault(k, {}).update(d)
            for k, d in merged.items():
                store[k] = torch.stack([d[i] for i in sorted(d)])


def _mkey(key: str, reader: str) -> str:
    return f"{key}|{reader}".replace(".", "_")


def evaluate_plan(model: nn.Module, interpreters: dict[str, Interpreter], plan: list[PlanItem],
                  data: dict[str, Tensor], trainer: pl.Trainer, **options: Any) -> AttackEvaluation:
    """Run :class:`AttackEvaluation` with ``trainer`` (build it with ``inference_mode=False`` and
    ``use_distributed_sampler=False``); returns the module with ``results`` / ``examples`` filled on every rank."""
    if trainer.test_loop.inference_mode:
        raise ValueError("the attack evaluation needs input gradients: build the Trainer with inference_mode=False")
    module = AttackEvaluation(model, interpreters, plan, data, **options)
    with frozen(model):
        trainer.test(module, verbose=False)
    return module
