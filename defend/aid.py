"""RTS training and adversarial interpretation distillation (AID; ADV2 section 5 Q3 "Defense 2", Appendix A2).

:class:`AIDModule` trains an :class:`~attacks.interpreters.rts.RTSNetwork` on the encoder features of a frozen
classifier. Two losses:

* ``l_int`` (ADV2 Eqn 15 = Eqn 8): :func:`~attacks.interpreters.rts.rts_objective` of the predicted masks, plus
  ``class_weight`` times the cross-entropy of the network's selector class head toward the explained class
  (trains the "encoder" output that the ADV2 encoder term attacks);
* ``l_aid`` (Eqn 16) ``= -mean|g(x; c) - g(A(x); y_t)|``, with ``A`` ADV2 (warm-start PGD + joint stage with the
  RTS term) against the *current* RTS interpreter, run as an inner loop on a detached copy of the batch with
  random target classes ``y_t``. Only input gradients are taken inside the attack; the maps of ``x`` and
  ``A(x)`` are then recomputed with gradients into the RTS parameters.

With ``aid_weight > 0`` every ``aid_every``-th training batch is an AID batch. ``aid_mode="alternate"`` (the
paper: "alternating between minimising l_int and l_aid") minimises ``aid_weight * l_aid`` on AID batches and
``l_int`` on the others; ``aid_mode="joint"`` minimises ``l_int + aid_weight * l_aid`` on AID batches.
With ``aid_weight = 0`` it is plain RTS training. ``init_from`` fine-tunes an existing RTS network (cheaper
than training AID from scratch).

The classifier (``classifier`` = path of a classifier artifact or Lightning checkpoint) is held in a wrapper
that stays in eval mode whatever Lightning does, with ``requires_grad=False`` on every parameter: it is not in
the optimiser and DDP does not synchronise it (DDP only reduces parameters that require grad).
Attacks in validation (``val_attack_batches > 0``) need ``Trainer(inference_mode=False)``.
"""
from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.checks import check_images, check_labels
from attacks.adv2 import ADV2, random_targets
from attacks.frameworks import get_framework
from attacks.interpreters import RTSInterpreter, RTSNetwork, rts_objective

from .classifier import load_classifier
from .distributed import mean_over_ranks, rank_world, shard_draw
from .io import CheckpointError, load_artifact, load_state_checked, project_version, save_artifact, strip_prefix
from .metrics import localisation
from .models import GapClassifier

__all__ = ["AIDModule", "FrozenClassifier", "save_rts", "load_rts", "aid_attack", "AID_MODES"]

AID_MODES = ("alternate", "joint")
OBJECTIVE_KEYS = ("tv_weight", "area_weight", "area_power", "destroyer_weight", "destroyer_power",
                  "preserver_weight", "tv_beta", "replacement", "noise_std", "blur_sigma")


class FrozenClassifier(nn.Module):
    """Holds a classifier in eval mode with ``requires_grad=False``; ``train()`` cannot switch it back."""

    def __init__(self, model: GapClassifier) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenClassifier":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


# --------------------------------------------------------------------------------------------- artifacts
def save_rts(network: RTSNetwork, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Export an RTS network as a safe, self-describing artifact (kind ``"rts"``, atomic write)."""
    save_artifact(path, "rts", network.state_dict(), {"network": network.config(), **(extra or {})})


def load_rts(path: str | os.PathLike) -> RTSNetwork:
    """Rebuild an RTS network from :func:`save_rts` output or an :class:`AIDModule` Lightning checkpoint
    (``torch.load(weights_only=True)``; returned in eval mode)."""
    payload = load_artifact(path, "rts")
    cfg = (payload.get("meta") or {}).get("network")
    if not isinstance(cfg, dict) or "stage_channels" not in cfg or "num_classes" not in cfg:
        raise CheckpointError(f"{path} lacks the RTS network configuration in its metadata")
    net = RTSNetwork(**cfg)
    state = payload["state"]
    if payload["format"] == "lightning":
        state = strip_prefix(state, "rts.")
    load_state_checked(net, state, path)
    return net.eval()


# --------------------------------------------------------------------------------------------- inner attack
def aid_attack(classifier: GapClassifier, network: RTSNetwork, x: Tensor, y_t: Tensor, *, warm_steps: int = 10,
               steps: int = 10, c: float = 20.0, eps: float = 0.031, alpha: float = 2 / 255,
               enc_weight: float = 0.1, framework: str = "pgd", framework_options: dict[str, Any] | None = None,
               seed: int = 0):
    """ADV2 against the current RTS network (input gradients only); returns the :class:`AttackResult`.

    Runs under ``torch.enable_grad()`` on a detached copy of ``x``; neither the classifier's nor the network's
    parameters receive gradients, and both modules' train / eval flags and ``requires_grad`` are restored.
    """
    opts = dict(framework_options or {})
    if framework == "pgd":
        opts = {"eps": eps, "alpha": alpha, **opts}
    attack = ADV2(RTSInterpreter(network, enc_weight=enc_weight), framework, framework_options=opts,
                  warm_steps=warm_steps, steps=steps, c=c, seed=seed)
    flags = [(p, p.requires_grad) for p in network.parameters()]
    was_training = network.training
    try:
        network.eval().requires_grad_(False)  # the attack needs input gradients only
        with torch.enable_grad():
            return attack(classifier, x.detach().clone(), y_t.detach())
    finally:
        network.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------- module
class AIDModule(pl.LightningModule):
    """Train RTS on its own objective (``aid_weight = 0``) or with AID (``aid_weight > 0``) on a frozen classifier.

    Args:
        classifier: path of the classifier (artifact or Lightning checkpoint, loaded with ``weights_only``).
        num_classes: optional check against the classifier and the data.
        width: channels of the RTS bottleneck / decoder.
        init_from: an RTS artifact or AIDModule checkpoint to start from (fine-tuning); its width wins.
        explain: class explained during training: ``"label"`` (ground truth) or ``"pred"`` (classifier).
        tv_weight: lambda1, weight of the mask's total variation (RTS objective, :func:`rts_objective`).
        area_weight: lambda2, weight of the area term ``mean((m + 5e-4)^area_power)``.
        area_power: exponent of the area term.
        destroyer_weight: lambda3, weight of ``f_c(phi(x, 1 - m))^destroyer_power`` (deleting the region must
            destroy the evidence).
        destroyer_power: lambda4, exponent of the destroyer term.
        preserver_weight: weight of ``-log f_c(phi(x, m))`` (keeping the region must preserve the evidence).
        tv_beta: exponent of the neighbour differences in the total variation.
        replacement: what replaces the deleted pixels: ``"noise"``, ``"blur"`` or ``"random"`` (a seeded coin per
            batch picks one).
        noise_std: standard deviation of the Gaussian noise (around a random colour) of the noise replacement.
        blur_sigma: Gaussian sigma of the blur replacement (default ``max(2, H / 6)``).
        class_weight: weight of the selector class head's cross-entropy (the RTS "encoder" output).
        fake_label_prob: share of training examples explained for a random wrong class with only the area and
            smoothness terms (their mask should be empty; trains the class selector, Dabkowski & Gal).
        aid_weight: weight of ``l_aid``; 0 = plain RTS training.
        aid_every: every ``aid_every``-th batch (``batch_idx % aid_every == aid_every - 1``) is an AID batch.
        aid_mode: ``"alternate"`` (AID batches minimise ``aid_weight * l_aid`` only) or ``"joint"``.
        aid_lr: learning rate of the ``l_aid`` optimiser in alternating mode (default ``lr``).
        anchor_weight: not in the paper: when fine-tuning (``init_from``), add ``anchor_weight * mean|g(x) - g0(x)|``
            on the benign batch to ``l_int``, ``g0`` the frozen initial network (distils its benign maps so that AID
            changes the maps of adversarial inputs rather than the benign ones; 0 = off).
        anchor_from: the anchor network ``g0`` (default: ``init_from``).
        aid_detach_benign: use the benign map as a fixed anchor in ``l_aid`` (only ``g(A(x))`` moves); the
            paper differentiates both (False).
        aid_batch_size: run the inner attack and ``l_aid`` on the first ``aid_batch_size`` examples of an AID batch
            only (cheaper; default: the whole batch). Under DDP it applies to each process's shard.
        aid_success_only: average ``l_aid`` over inputs the inner attack moved to its target class only.
        attack_framework: framework of the inner ADV2: ``"pgd"``, ``"cw"`` or ``"stadv"``.
        attack_eps: L-inf radius of the inner PGD (images in [0, 1]).
        attack_alpha: step size of the inner PGD.
        attack_warm_steps: steps of the inner attack's warm start (plain attack on the classifier).
        attack_steps: steps of the inner attack's joint stage (classifier + RTS terms).
        attack_c: weight of the interpretation term in the inner attack.
        attack_enc_weight: weight of the RTS encoder (class head) term in the inner attack.
        attack_framework_options: extra options of the inner framework (e.g. C&W ``lr``, PGD ``random_start``).
        val_attack_batches: run the inner ADV2 on this many validation batches and log ``val/l1_adv``
            (needs ``Trainer(inference_mode=False)``).
        lr: learning rate of the Adam on the RTS parameters (the classifier is frozen).
        weight_decay: weight decay of the Adam on the RTS parameters.
        seed: seeds the blend choice, random targets and attack starts (offset by step and rank).
    """

    def __init__(self, classifier: str, num_classes: int | None = None, width: int = 32,
                 init_from: str | None = None, explain: str = "label",
                 tv_weight: float = 1.0, area_weight: float = 8.0, area_power: float = 0.3,
                 destroyer_weight: float = 5.0, destroyer_power: float = 0.3, preserver_weight: float = 1.0,
                 tv_beta: float = 2.0, replacement: str = "random", noise_std: float = 0.2,
                 blur_sigma: float | None = None, class_weight: float = 1.0, fake_label_prob: float = 0.0,
                 aid_weight: float = 0.0, aid_every: int = 2, aid_mode: str = "alternate", aid_lr: float | None = None,
                 anchor_weight: float = 0.0, anchor_from: str | None = None,
                 aid_detach_benign: bool = False, aid_success_only: bool = True, aid_batch_size: int | None = None,
                 attack_framework: str = "pgd", attack_eps: float = 0.031, attack_alpha: float = 2 / 255,
                 attack_warm_steps: int = 10, attack_steps: int = 10, attack_c: float = 20.0,
                 attack_enc_weight: float = 0.1, attack_framework_options: dict[str, Any] | None = None,
                 val_attack_batches: int = 0, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        if explain not in ("label", "pred"):
            raise ValueError(f"explain must be 'label' or 'pred', got {explain!r}")
        if aid_mode not in AID_MODES:
            raise ValueError(f"aid_mode must be one of {AID_MODES}, got {aid_mode!r}")
        if replacement not in ("random", "noise", "blur"):
            raise ValueError(f"replacement must be 'random', 'noise' or 'blur', got {replacement!r}")
        if not 0 <= fake_label_prob < 1:
            raise ValueError(f"fake_label_prob must lie in [0, 1), got {fake_label_prob}")
        if anchor_weight < 0 or (aid_lr is not None and aid_lr <= 0) or (aid_batch_size is not None and aid_batch_size < 1):
            raise ValueError("need anchor_weight >= 0, aid_lr > 0 and aid_batch_size >= 1")
        if aid_every < 1 or aid_weight < 0 or lr <= 0 or attack_warm_steps < 0 or attack_steps < 0:
            raise ValueError("need aid_every >= 1, aid_weight >= 0, lr > 0 and attack steps >= 0")
        if aid_weight > 0 and attack_warm_steps + attack_steps == 0:
            raise ValueError("AID (aid_weight > 0) needs attack_warm_steps + attack_steps > 0")
        fw_opts = dict(attack_framework_options or {})
        if attack_framework == "pgd":
            fw_opts = {"eps": attack_eps, "alpha": attack_alpha, **fw_opts}
        get_framework(attack_framework, **fw_opts)  # unknown framework / bad radius fails here, not mid-training
        self.save_hyperparameters()
        clf = load_classifier(classifier)
        if num_classes is not None and clf.num_classes != int(num_classes):
            raise ValueError(f"class count mismatch: {classifier} has {clf.num_classes} classes, "
                             f"num_classes is {num_classes}")
        self.classifier = FrozenClassifier(clf)
        if init_from:
            self.rts = load_rts(init_from).train()
            self.rts.check_model(clf)
        else:
            self.rts = RTSNetwork(clf.stage_channels, clf.num_classes, width=width)
        self.anchor_rts: RTSNetwork | None = None
        if anchor_weight > 0:
            if not (anchor_from or init_from):
                raise ValueError("anchor_weight > 0 needs anchor_from or init_from (the network whose benign maps are kept)")
            self.anchor_rts = load_rts(anchor_from or init_from).requires_grad_(False)
        self._objective = {k: self.hparams[k] for k in OBJECTIVE_KEYS}
        self.automatic_optimization = False  # alternating objectives: one optimiser step per batch, chosen here
        self.aid_steps = 0  # l_aid optimiser steps taken (stored with checkpoints and exported artifacts)

    # ------------------------------------------------------------------ pieces
    @property
    def model(self) -> GapClassifier:
        """The frozen classifier."""
        return self.classifier.model

    def interpreter(self, enc_weight: float | None = None) -> RTSInterpreter:
        """The current RTS network as an interpreter."""
        return RTSInterpreter(self.rts, self.hparams.attack_enc_weight if enc_weight is None else enc_weight)

    def _generator(self, batch_idx: int, salt: int = 0) -> torch.Generator:
        """The same stream on every rank: draws are made for the global batch and sharded (``rank_world``)."""
        step = self.global_step if self._trainer is not None else batch_idx
        return torch.Generator().manual_seed(int(self.hparams.seed) * 1_000_003 + step * 7919 + salt)

    def _explained(self, x: Tensor, y: Tensor) -> Tensor:
        if self.hparams.explain == "label":
            return y
        with torch.no_grad():
            return self.model(x).argmax(1)

    def is_aid_batch(self, batch_idx: int) -> bool:
        """Every ``aid_every``-th batch; in an epoch of fewer than ``aid_every`` batches, its last batch, so that every
        epoch of an AID run has at least one ``l_aid`` step (a small fine-tuning set would otherwise train none)."""
        hp = self.hparams
        if hp.aid_weight <= 0:
            return False
        nb = self._trainer.num_training_batches if self._trainer is not None else float("inf")
        if isinstance(nb, int) and 0 < nb < hp.aid_every:
            return batch_idx == nb - 1
        return batch_idx % hp.aid_every == hp.aid_every - 1

    def interpretation_loss(self, x: Tensor, cls: Tensor, gen: torch.Generator | None = None) -> dict[str, Tensor]:
        """``l_int`` (Eqn 15) + the class-head CE on a batch; every entry is a batch mean.

        With ``fake_label_prob > 0`` a random share of the examples is explained for a wrong class (area and
        smoothness terms only)."""
        p = float(self.hparams.fake_label_prob)
        fake = None
        sel = cls
        shard = rank_world()
        if p > 0:
            fake = (shard_draw(lambda n: torch.rand(n, generator=gen), cls.shape[0]) < p).to(cls.device)
            sel = torch.where(fake, random_targets(cls, self.model.num_classes, gen, shard=shard), cls)
        m, logits = self.rts(self.model, x, sel)
        out = rts_objective(self.model, x, cls, m, generator=gen, fake=fake, shard=shard, **self._objective)
        ce = F.cross_entropy(logits, cls)
        res = {k: v.mean() for k, v in out.items()}
        res["class_ce"] = ce
        res["loss"] = res["loss"] + self.hparams.class_weight * ce
        res["mask_mean"] = m.detach().mean()
        if self.anchor_rts is not None:
            with torch.no_grad():
                m0 = self.anchor_rts(self.model, x, sel)[0]
            res["anchor"] = (m - m0).abs().mean()
            res["loss"] = res["loss"] + self.hparams.anchor_weight * res["anchor"]
        return res

    def aid_loss(self, x: Tensor, cls: Tensor, batch_idx: int = 0) -> dict[str, Tensor]:
        """``l_aid`` (Eqn 16) on a batch: ADV2 against the current RTS, then the L1 of benign vs adversarial maps.

        Also returns the class-head CE of the benign pass (keeps every RTS parameter in the graph, as DDP wants).
        """
        hp = self.hparams
        if hp.aid_batch_size:
            x, cls = x[:hp.aid_batch_size], cls[:hp.aid_batch_size]
        gen = self._generator(batch_idx, salt=1)
        y_t = random_targets(cls, self.model.num_classes, gen, shard=rank_world())
        res = aid_attack(self.model, self.rts, x, y_t, warm_steps=hp.attack_warm_steps, steps=hp.attack_steps,
                         c=hp.attack_c, eps=hp.attack_eps, alpha=hp.attack_alpha, enc_weight=hp.attack_enc_weight,
                         framework=hp.attack_framework, framework_options=hp.attack_framework_options,
                         seed=int(torch.randint(0, 2**31 - 1, (), generator=gen)))
        x_adv = res.x_adv.detach()
        n = x.shape[0]
        m, logits = self.rts(self.model, torch.cat([x, x_adv]), torch.cat([cls, y_t]))
        m_b, m_a = m[:n], m[n:]
        if hp.aid_detach_benign:
            m_b = m_b.detach()
        l1 = (m_b - m_a).abs().flatten(1).mean(1)
        w = res.success.float() if hp.aid_success_only else torch.ones_like(l1)
        l_aid = -(w * l1).sum() / mean_over_ranks(w.sum()).clamp_min(1.0 / rank_world()[1])
        ce = F.cross_entropy(logits[:n], cls)
        out = {"l_aid": l_aid, "class_ce": ce, "asr": res.success.float().mean(), "l1_adv": l1.detach().mean()}
        if self.anchor_rts is not None:
            with torch.no_grad():
                m0 = self.anchor_rts(self.model, x, cls)[0]
            out["anchor"] = (m[:n] - m0).abs().mean().detach()  # logged only
        return out

    # ------------------------------------------------------------------ Lightning hooks
    def forward(self, x: Tensor, cls: Tensor | None = None) -> Tensor:
        """RTS masks of ``x`` for classes ``cls`` (default: the classifier's prediction)."""
        if cls is None:
            with torch.no_grad():
                cls = self.model(x).argmax(1)
        return self.rts(self.model, x, cls)[0]

    def step_loss(self, batch: dict[str, Tensor], batch_idx: int) -> tuple[Tensor, int, dict[str, Tensor]]:
        """The loss of one training batch, the index of the optimiser that minimises it, and what to log."""
        hp = self.hparams
        x, y = batch["image"], batch["label"]
        cls = self._explained(x, y)
        logs: dict[str, Tensor] = {}
        if self.is_aid_batch(batch_idx):
            self.aid_steps += 1
            a = self.aid_loss(x, cls, batch_idx)
            loss = hp.aid_weight * a["l_aid"] + hp.class_weight * a["class_ce"]
            logs.update({"l_aid": a["l_aid"], "aid_asr": a["asr"]})
            if "anchor" in a:
                logs["aid_anchor"] = a["anchor"]
            if hp.aid_mode == "joint":
                li = self.interpretation_loss(x, cls, self._generator(batch_idx))
                loss = loss + li["loss"] - hp.class_weight * a["class_ce"]  # class CE counted once
                logs["l_int"] = li["loss"]
                return loss, 0, logs
            return loss, 1, logs
        li = self.interpretation_loss(x, cls, self._generator(batch_idx))
        logs.update({k: li[k] for k in ("area", "tv", "p_keep", "p_del", "class_ce", "mask_mean")})
        logs["l_int"] = li["loss"]
        if "anchor" in li:
            logs["anchor"] = li["anchor"]
        return li["loss"], 0, logs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["image"], batch["label"]
        if self.global_step == 0 and batch_idx == 0:
            check_images(x)
            check_labels(y, self.model.num_classes, x.shape[0])
        loss, which, logs = self.step_loss(batch, batch_idx)
        opts = self.optimizers()
        opt = opts[which] if isinstance(opts, (list, tuple)) else opts
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        bs = x.shape[0]
        for k, v in logs.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k in ("l_int", "l_aid"), batch_size=bs)
        self.log("train/loss", loss.detach(), batch_size=bs)
        return loss.detach()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        cls = self._explained(x, y)
        bs = x.shape[0]
        gen = torch.Generator().manual_seed(int(self.hparams.seed) + batch_idx)
        with torch.no_grad():
            m, logits = self.rts(self.model, x, cls)
            out = rts_objective(self.model, x, cls, m, generator=gen, **self._objective)
        self.log("val/l_int", out["loss"].mean() + self.hparams.class_weight * F.cross_entropy(logits, cls),
                 prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("val/mask_mean", m.mean(), sync_dist=True, batch_size=bs)
        if "mask" in batch:
            energy, _ = localisation(m, (batch["mask"] > 0.5).float())
            self.log("val/localisation", energy.mean(), prog_bar=True, sync_dist=True, batch_size=bs)
        if batch_idx < self.hparams.val_attack_batches:
            if torch.is_inference_mode_enabled():
                raise RuntimeError("val_attack_batches > 0 runs ADV2 in validation: set Trainer(inference_mode=False) "
                                   "(--trainer.inference_mode=false)")
            hp = self.hparams
            y_t = random_targets(cls, self.model.num_classes, torch.Generator().manual_seed(int(hp.seed) + batch_idx))
            res = aid_attack(self.model, self.rts, x, y_t, warm_steps=hp.attack_warm_steps, steps=hp.attack_steps,
                             c=hp.attack_c, eps=hp.attack_eps, alpha=hp.attack_alpha,
                             enc_weight=hp.attack_enc_weight, framework=hp.attack_framework,
                             framework_options=hp.attack_framework_options, seed=int(hp.seed))
            with torch.no_grad():
                m_a = self.rts(self.model, res.x_adv, y_t)[0]
            self.log("val/l1_adv", (m - m_a).abs().flatten(1).mean(1).mean(), sync_dist=True, batch_size=bs)
            self.log("val/attack_asr", res.success.float().mean(), sync_dist=True, batch_size=bs)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["image"])

    def configure_optimizers(self):
        """Adam on the RTS parameters; alternating AID gets a second Adam (own moments, lr ``aid_lr``) for the
        ``l_aid`` steps, so the step size of each objective does not depend on the other's gradient scale."""
        hp = self.hparams
        opts = [torch.optim.Adam(self.rts.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)]
        if hp.aid_weight > 0 and hp.aid_mode == "alternate":
            opts.append(torch.optim.Adam(self.rts.parameters(), lr=hp.aid_lr or hp.lr, weight_decay=hp.weight_decay))
        return opts

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        k = getattr(dm, "num_classes", None)
        if k is not None and k != self.model.num_classes:
            raise ValueError(f"class count mismatch: the classifier has {self.model.num_classes} classes, "
                             f"the data has {k}")
        shape = getattr(dm, "image_shape", None)
        if shape is not None and shape[-1] != self.model.input_size:
            raise ValueError(f"input size mismatch: the classifier expects {self.model.input_size} px, "
                             f"the data is {shape[-1]} px")

    def rts_meta(self) -> dict[str, Any]:
        hp = self.hparams
        return {"network": self.rts.config(), "classifier": str(hp.classifier), "classifier_meta": self.model.describe(),
                "aid_weight": float(hp.aid_weight), "aid_mode": hp.aid_mode, "aid_every": int(hp.aid_every),
                "aid_steps": int(self.aid_steps),
                "init_from": hp.init_from, "objective": dict(self._objective), "class_weight": float(hp.class_weight)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["idls_meta"] = {"kind": "rts", "version": project_version(), **self.rts_meta()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("idls_meta")
        self.aid_steps = int(meta.get("aid_steps", 0)) if isinstance(meta, dict) else 0  # a resumed run keeps counting

    def export(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Save the RTS network alone as a safe artifact (:func:`save_rts`)."""
        save_rts(self.rts, path, {**self.rts_meta(), **(extra or {})})
