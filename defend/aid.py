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

The options come in groups: ``objective`` (:class:`RTSObjective`, ``l_int``), ``aid`` (:class:`AIDSchedule`,
``l_aid``), ``attack`` (:class:`InnerAttack`, the inner ADV2) and ``optimiser``
(:class:`~defend.module_base.Optimiser`). With ``aid.weight > 0`` every ``aid.every``-th training batch is an AID
batch. ``aid.mode="alternate"`` (the paper: "alternating between minimising l_int and l_aid") minimises
``aid.weight * l_aid`` on AID batches and ``l_int`` on the others; ``aid.mode="joint"`` minimises
``l_int + aid.weight * l_aid`` on AID batches. With ``aid.weight = 0`` it is plain RTS training. ``init_from``
fine-tunes an existing RTS network (cheaper than training AID from scratch).

Noise (not in the paper; for the randomized-smoothing certificate of the maps, :func:`attacks.certify.certify_map`):
with ``aid.noise_sigma > 0`` the AID batches train the distillation term ``l_noise = mean|g(x; c) - g(x + n; c)|``,
``n ~ N(0, noise_sigma^2 I)`` unclamped (:meth:`AIDModule.noisy_inputs`), the benign map detached (the teacher
distilled onto the noisy input): the map of a noisy input for the explained class is pulled to the benign map, so the
smoothed sparsified map keeps the benign top-k pixels. ``aid.noise_mode="replace"`` puts ``x + n`` in place of the
ADV2 input (AID batches minimise ``aid.weight * l_noise``; no ADV2 runs), ``"add"`` trains both
(``aid.weight * (l_aid + l_noise)``). ``noise_sigma = 0`` (default) leaves AID as it was.

The classifier (``classifier`` = path of a classifier artifact or Lightning checkpoint) is held in a
:class:`~defend.module_base.FrozenModule` that stays in eval mode whatever Lightning does, with
``requires_grad=False`` on every parameter: it is not in the optimiser and DDP does not synchronise it (DDP only
reduces parameters that require grad); so is the anchor network. The inner attack runs under
:func:`attacks.frozen`. Attacks in validation (``val_attack_batches > 0``) need ``Trainer(inference_mode=False)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import ADV2, AttackResult, RTSInterpreter, RTSNetwork, frozen, get_framework, random_targets
from attacks.checks import check_images, check_labels
from attacks.frameworks import threat_options
from attacks.interpreters import rts_objective

from .classifier import build_from_state, check_hparams, load_classifier
from .defences import RTS_NETWORK, Defence, register_defence
from .distributed import mean_over_ranks, rank_world, shard_draw
from .io import CheckpointError, load_artifact, load_state_checked, save_artifact, strip_prefix
from .metrics import localisation
from .models import GapClassifier
from .module_base import DefenceModule, FrozenModule, Optimiser, as_options, build_optimiser

__all__ = ["AIDModule", "RTSObjective", "AIDSchedule", "InnerAttack", "AID_OPTIMISER", "FrozenClassifier", "save_rts",
           "load_rts", "aid_attack", "aid_score", "AID_MODES", "OBJECTIVE_KEYS"]

AID_MODES = ("alternate", "joint")
#: how the noise term of AID batches relates to the ADV2 one (``aid.noise_mode``)
NOISE_MODES = ("replace", "add")
REPLACEMENTS = ("random", "noise", "blur")


# --------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RTSObjective:
    """``l_int``: the RTS objective (ADV2 Eqn 8 = Eqn 15, :func:`~attacks.interpreters.rts.rts_objective`) plus the
    class head's cross-entropy.

    Args:
        tv_weight: lambda1, weight of the mask's total variation.
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
        class_weight: weight of the selector class head's cross-entropy (the RTS "encoder" output the ADV2 RTS
            term attacks).
        fake_label_prob: share of training examples explained for a random wrong class with only the area and
            smoothness terms (their mask should be empty; trains the class selector, Dabkowski & Gal).
    """

    tv_weight: float = 1.0
    area_weight: float = 8.0
    area_power: float = 0.3
    destroyer_weight: float = 5.0
    destroyer_power: float = 0.3
    preserver_weight: float = 1.0
    tv_beta: float = 2.0
    replacement: Literal["random", "noise", "blur"] = "random"
    noise_std: float = 0.2
    blur_sigma: float | None = None
    class_weight: float = 1.0
    fake_label_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"objective.replacement must be 'random', 'noise' or 'blur', got {self.replacement!r}")
        if not 0 <= self.fake_label_prob < 1:
            raise ValueError(f"objective.fake_label_prob must lie in [0, 1), got {self.fake_label_prob}")
        weights = {k: getattr(self, k) for k in ("tv_weight", "area_weight", "destroyer_weight", "preserver_weight",
                                                 "class_weight")}
        bad = [f"{k} {v}" for k, v in weights.items() if v < 0]
        if bad:
            raise ValueError(f"the objective's weights must be >= 0, got {', '.join(bad)}")

    def rts_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~attacks.interpreters.rts.rts_objective`."""
        return {k: getattr(self, k) for k in OBJECTIVE_KEYS}


#: the fields of :class:`RTSObjective` that are arguments of ``rts_objective`` (stored as ``objective`` in artifacts)
OBJECTIVE_KEYS = ("tv_weight", "area_weight", "area_power", "destroyer_weight", "destroyer_power",
                  "preserver_weight", "tv_beta", "replacement", "noise_std", "blur_sigma")


@dataclass(frozen=True)
class AIDSchedule:
    """When and how ``l_aid`` (ADV2 Eqn 16) is trained.

    Args:
        weight: weight of ``l_aid``; 0 = plain RTS training.
        every: every ``every``-th batch (``batch_idx % every == every - 1``) is an AID batch.
        mode: ``"alternate"`` (the paper: AID batches minimise ``weight * l_aid`` only, with their own optimiser) or
            ``"joint"`` (AID batches minimise ``l_int + weight * l_aid``).
        lr: learning rate of the ``l_aid`` optimiser in alternating mode (default: ``optimiser.lr``).
        anchor_weight: not in the paper: when fine-tuning (``init_from``), add ``anchor_weight * mean|g(x) - g0(x)|``
            on the benign batch to ``l_int``, ``g0`` the frozen initial network (distils its benign maps so that AID
            changes the maps of adversarial inputs rather than the benign ones; 0 = off).
        anchor_from: the anchor network ``g0`` (default: ``init_from``).
        anchor_aid_weight: the anchor term's weight in the ``l_aid`` steps of alternating AID (holds the benign maps
            while ``l_aid`` moves the adversarial ones; 0 = logged only there).
        detach_benign: use the benign map as a fixed anchor in ``l_aid`` (only ``g(A(x))`` moves); the paper
            differentiates both (false).
        success_only: average ``l_aid`` over inputs the inner attack moved to its target class only.
        batch_size: run the inner attack and ``l_aid`` on the first ``batch_size`` examples of an AID batch only
            (cheaper; default: the whole batch). Under DDP it applies to each process's shard.
        noise_sigma: not in the paper: with sigma > 0 AID batches train the noise distillation term ``l_noise`` at this
            standard deviation (module docstring; 0 = off).
        noise_mode: ``"replace"`` (``x + noise`` in place of the ADV2 input: no inner attack) or ``"add"`` (both).
    """

    weight: float = 0.0
    every: int = 2
    mode: Literal["alternate", "joint"] = "alternate"
    lr: float | None = None
    anchor_weight: float = 0.0
    anchor_from: str | None = None
    anchor_aid_weight: float = 0.0
    detach_benign: bool = False
    success_only: bool = True
    batch_size: int | None = None
    noise_sigma: float = 0.0
    noise_mode: Literal["replace", "add"] = "replace"

    @property
    def attacks(self) -> bool:
        """Whether AID batches run the inner ADV2 (``l_aid``): AID is on and the noise does not replace it."""
        return self.weight > 0 and not (self.noise_sigma > 0 and self.noise_mode == "replace")

    def __post_init__(self) -> None:
        if self.noise_mode not in NOISE_MODES or not self.noise_sigma >= 0:
            raise ValueError(f"need aid.noise_mode in {NOISE_MODES} and aid.noise_sigma >= 0 (0: no noise term), got "
                             f"{self.noise_mode!r} and {self.noise_sigma}")
        if self.noise_sigma > 0 and not self.weight > 0:
            raise ValueError(f"aid.noise_sigma {self.noise_sigma} trains on AID batches: set aid.weight > 0 (e.g. 1.0) "
                             f"or aid.noise_sigma: 0")
        if self.mode not in AID_MODES:
            raise ValueError(f"aid.mode must be one of {AID_MODES}, got {self.mode!r}")
        if self.mode == "joint" and self.anchor_aid_weight > 0:
            raise ValueError("aid.anchor_aid_weight applies to the l_aid steps of mode 'alternate'; in 'joint' mode "
                             "the anchor (aid.anchor_weight) is already in the loss of every step")
        if self.every < 1 or self.weight < 0 or self.anchor_weight < 0 or self.anchor_aid_weight < 0:
            raise ValueError(f"need aid.every >= 1 and aid.weight, aid.anchor_weight, aid.anchor_aid_weight >= 0, got "
                             f"{self.every}, {self.weight}, {self.anchor_weight} and {self.anchor_aid_weight}")
        if (self.lr is not None and not self.lr > 0) or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError(f"need aid.lr > 0 and aid.batch_size >= 1 (or null), got {self.lr} and {self.batch_size}")


@dataclass(frozen=True)
class InnerAttack:
    """The ADV2 attack inside ``l_aid`` (and in validation), against the current RTS interpreter.

    Args:
        framework: ``"pgd"``, ``"cw"`` or ``"stadv"``.
        eps: L-inf radius of the PGD framework (images in [0, 1]).
        alpha: step size of the PGD framework.
        warm_steps: steps of the warm start (plain attack on the classifier).
        steps: steps of the joint stage (classifier + RTS terms).
        c: weight of the interpretation term.
        enc_weight: weight of the RTS encoder (class head) term.
        framework_options: extra options of the framework (e.g. C&W ``lr``, PGD ``random_start``).
    """

    framework: str = "pgd"
    eps: float = 0.031
    alpha: float = 2 / 255
    warm_steps: int = 10
    steps: int = 10
    c: float = 20.0
    enc_weight: float = 0.1
    framework_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.warm_steps < 0 or self.steps < 0:
            raise ValueError(f"need attack.warm_steps >= 0 and attack.steps >= 0, got {self.warm_steps} and "
                             f"{self.steps}")
        get_framework(self.framework, **self.framework_kwargs())  # unknown framework / bad radius: fails here

    def framework_kwargs(self) -> dict[str, Any]:
        """Options of the framework: ``eps`` and ``alpha`` where it declares them (:attr:`attacks.ThreatModel.options`:
        PGD), unless ``framework_options`` sets them."""
        declared = threat_options(self.framework)
        shared = {k: v for k, v in (("eps", self.eps), ("alpha", self.alpha)) if k in declared}
        return {**shared, **(self.framework_options or {})}


#: the default optimiser of :class:`AIDModule`: Adam on the RTS parameters, constant learning rate
AID_OPTIMISER = Optimiser(name="adam", lr=1e-3, weight_decay=0.0, schedule="constant")


class FrozenClassifier(FrozenModule):
    """The classifier an :class:`AIDModule` explains: eval mode, ``requires_grad=False``, ``train()`` a no-op."""


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
    check_hparams(cfg, path)
    state = payload["state"]
    if payload["format"] == "lightning":
        state = strip_prefix(state, "rts.")
    net = build_from_state(lambda: RTSNetwork(**cfg), state, path, f"the RTS network {cfg}")
    load_state_checked(net, state, path)
    return net.eval()


# --------------------------------------------------------------------------------------------- inner attack
def aid_attack(classifier: GapClassifier, network: RTSNetwork, x: Tensor, y_t: Tensor,
               attack: InnerAttack = InnerAttack(), seed: int = 0) -> AttackResult:
    """ADV2 (``attack``) against the current RTS network, input gradients only; returns the :class:`AttackResult`.

    Runs on a detached copy of ``x`` inside :func:`attacks.frozen` (eval mode, ``requires_grad=False``, gradients
    enabled): neither the classifier's nor the network's parameters receive gradients, and both modules' train /
    eval flags and ``requires_grad`` are restored, also when the attack raises.
    """
    adv2 = ADV2(RTSInterpreter(network, enc_weight=attack.enc_weight), attack.framework,
                framework_options=attack.framework_kwargs(), warm_steps=attack.warm_steps, steps=attack.steps,
                c=attack.c, seed=seed)
    with frozen(classifier, network):
        return adv2(classifier, x.detach().clone(), y_t.detach())


def aid_score(l1_adv: float, localisation: float | None, anchor_localisation: float | None,
              max_drop: float) -> float:
    """The validation figure an AID run is selected on (not in the paper): the benign-vs-ADV2 map L1 ``l1_adv``
    when the maps' localisation is within ``max_drop`` (relative) of the anchor's, else ``ratio - (1 - max_drop)``
    (negative: every such epoch ranks below every admissible one, the closest first). Without masks or an anchor
    it is ``l1_adv``."""
    if localisation is None or anchor_localisation is None or anchor_localisation <= 0:
        return l1_adv
    ratio = localisation / anchor_localisation
    return l1_adv if ratio >= 1 - max_drop else ratio - (1 - max_drop)


# --------------------------------------------------------------------------------------------- module
class AIDModule(DefenceModule):
    """Train RTS on its own objective (``aid.weight = 0``) or with AID (``aid.weight > 0``) on a frozen classifier.

    Args:
        classifier: path of the classifier (artifact or Lightning checkpoint, loaded with ``weights_only``).
        num_classes: optional check against the classifier and the data.
        width: channels of the RTS bottleneck / decoder.
        init_from: an RTS artifact or AIDModule checkpoint to start from (fine-tuning); its width wins.
        explain: class explained during training: ``"label"`` (ground truth) or ``"pred"`` (classifier).
        objective: ``l_int``, the RTS objective and the class head's weight (:class:`RTSObjective`).
        aid: when and how ``l_aid`` is trained (:class:`AIDSchedule`; weight 0 = plain RTS).
        attack: the inner ADV2 of ``l_aid`` and of validation (:class:`InnerAttack`).
        optimiser: the optimiser of the RTS parameters (the classifier is frozen); manual optimisation, so its
            schedule must be ``constant``. Alternating AID gets a second optimiser of the same kind (lr ``aid.lr``).
        val_attack_batches: run the inner ADV2 on this many validation batches and log ``val/l1_adv`` and
            ``val/aid_score`` (:func:`aid_score`; needs ``Trainer(inference_mode=False)``).
        val_max_localisation_drop: the localisation budget of ``val/aid_score`` (relative to the anchor network).
        seed: seeds the blend choice, random targets and attack starts (offset by step and rank).
    """

    artifact_kind = "rts"
    network_name = "classifier"
    mismatch_fix = "train the RTS with the classifier of this data (classifier: PATH)"

    def __init__(self, classifier: str, num_classes: int | None = None, width: int = 32,
                 init_from: str | None = None, explain: str = "label", objective: RTSObjective = RTSObjective(),
                 aid: AIDSchedule = AIDSchedule(), attack: InnerAttack = InnerAttack(),
                 optimiser: Optimiser = AID_OPTIMISER, val_attack_batches: int = 0,
                 val_max_localisation_drop: float = 0.1, seed: int = 0) -> None:
        super().__init__(as_options(optimiser, AID_OPTIMISER, "optimiser"))
        self.objective = as_options(objective, RTSObjective(), "objective")
        self.aid = as_options(aid, AIDSchedule(), "aid")
        self.attack = as_options(attack, InnerAttack(), "attack")
        self.val_max_localisation_drop = float(val_max_localisation_drop)
        self._check_options(explain, init_from)
        self.save_options(classifier=classifier, num_classes=num_classes, width=width, init_from=init_from,
                          explain=explain, objective=self.objective, aid=self.aid, attack=self.attack,
                          optimiser=self.optimiser, val_attack_batches=val_attack_batches,
                          val_max_localisation_drop=val_max_localisation_drop, seed=seed)
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
        self.anchor_rts: FrozenModule | None = None
        if self.aid.anchor_weight > 0 or self.aid.anchor_aid_weight > 0:
            self.anchor_rts = FrozenModule(load_rts(self.aid.anchor_from or init_from))
        self.automatic_optimization = False  # alternating objectives: one optimiser step per batch, chosen here
        self.aid_steps = 0  # l_aid optimiser steps taken (stored with checkpoints and exported artifacts)

    def _check_options(self, explain: str, init_from: str | None) -> None:
        """The checks that involve more than one option group."""
        if explain not in ("label", "pred"):
            raise ValueError(f"explain must be 'label' or 'pred', got {explain!r}")
        drop = float(getattr(self, "val_max_localisation_drop", 0.1))
        if not 0 <= drop < 1:
            raise ValueError(f"val_max_localisation_drop must lie in [0, 1), got {drop}")
        if self.aid.attacks and self.attack.warm_steps + self.attack.steps == 0:
            raise ValueError("AID (aid.weight > 0) needs attack.warm_steps + attack.steps > 0")
        if (self.aid.anchor_weight > 0 or self.aid.anchor_aid_weight > 0) and not (self.aid.anchor_from or init_from):
            raise ValueError("aid.anchor_weight or aid.anchor_aid_weight > 0 needs aid.anchor_from or init_from (the "
                             "network whose benign maps are kept)")
        if self.optimiser.schedule != "constant":
            raise ValueError(f"AIDModule steps its optimisers itself (manual optimisation): optimiser.schedule must be "
                             f"'constant', got {self.optimiser.schedule!r}")

    # ------------------------------------------------------------------ pieces
    @property
    def model(self) -> GapClassifier:
        """The frozen classifier."""
        return self.classifier.model

    def interpreter(self, enc_weight: float | None = None) -> RTSInterpreter:
        """The current RTS network as an interpreter."""
        return RTSInterpreter(self.rts, self.attack.enc_weight if enc_weight is None else enc_weight)

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
        """Every ``aid.every``-th batch; in an epoch of fewer than ``aid.every`` batches, its last batch, so that every
        epoch of an AID run has at least one ``l_aid`` step (a small fine-tuning set would otherwise train none)."""
        every = self.aid.every
        if self.aid.weight <= 0:
            return False
        nb = self._trainer.num_training_batches if self._trainer is not None else float("inf")
        if isinstance(nb, int) and 0 < nb < every:
            return batch_idx == nb - 1
        return batch_idx % every == every - 1

    def interpretation_loss(self, x: Tensor, cls: Tensor, gen: torch.Generator | None = None) -> dict[str, Tensor]:
        """``l_int`` (Eqn 15) + the class-head CE on a batch; every entry is a batch mean.

        With ``objective.fake_label_prob > 0`` a random share of the examples is explained for a wrong class (area
        and smoothness terms only)."""
        obj = self.objective
        p = float(obj.fake_label_prob)
        fake = None
        sel = cls
        shard = rank_world()
        if p > 0:
            fake = (shard_draw(lambda n: torch.rand(n, generator=gen), cls.shape[0]) < p).to(cls.device)
            sel = torch.where(fake, random_targets(cls, self.model.num_classes, gen, shard=shard), cls)
        m, logits = self.rts(self.model, x, sel)
        out = rts_objective(self.model, x, cls, m, generator=gen, fake=fake, shard=shard, **obj.rts_kwargs())
        ce = F.cross_entropy(logits, cls)
        res = {k: v.mean() for k, v in out.items()}
        res["class_ce"] = ce
        res["loss"] = res["loss"] + obj.class_weight * ce
        res["mask_mean"] = m.detach().mean()
        if self.anchor_rts is not None:
            with torch.no_grad():
                m0 = self.anchor_rts(self.model, x, sel)[0]
            res["anchor"] = (m - m0).abs().mean()
            res["loss"] = res["loss"] + self.aid.anchor_weight * res["anchor"]
        return res

    def noisy_inputs(self, x: Tensor, batch_idx: int = 0) -> Tensor:
        """``x + n``, ``n ~ N(0, aid.noise_sigma^2 I)`` (unclamped), drawn from the batch's seeded stream for the
        global batch and sharded (the same noise whatever the number of processes); the noise term's input."""
        gen = self._generator(batch_idx, salt=2)
        noise = shard_draw(lambda k: torch.randn((k, *x.shape[1:]), generator=gen), x.shape[0])
        return x.detach() + float(self.aid.noise_sigma) * noise.to(x)

    def aid_loss(self, x: Tensor, cls: Tensor, batch_idx: int = 0) -> dict[str, Tensor]:
        """``l_aid`` (Eqn 16) on a batch: ADV2 against the current RTS, then the L1 of benign vs adversarial maps;
        with ``aid.noise_sigma > 0`` also (``add``) or instead (``replace``: ``l_aid`` is 0) the noise term
        ``l_noise`` (module docstring; 0 when off), all maps from ONE network forward.

        Also returns the class-head CE of the benign pass (keeps every RTS parameter in the graph, as DDP wants).
        """
        aid = self.aid
        if aid.batch_size:
            x, cls = x[:aid.batch_size], cls[:aid.batch_size]
        n = x.shape[0]
        inputs, classes = [x], [cls]
        if aid.attacks:
            gen = self._generator(batch_idx, salt=1)
            y_t = random_targets(cls, self.model.num_classes, gen, shard=rank_world())
            res = aid_attack(self.model, self.rts, x, y_t, self.attack,
                             seed=int(torch.randint(0, 2**31 - 1, (), generator=gen)))
            inputs, classes = [x, res.x_adv.detach()], [cls, y_t]
        if aid.noise_sigma > 0:
            inputs, classes = [*inputs, self.noisy_inputs(x, batch_idx)], [*classes, cls]
        m, logits = self.rts(self.model, torch.cat(inputs), torch.cat(classes))
        out = {"class_ce": F.cross_entropy(logits[:n], cls), "l_aid": m.new_zeros(()), "l_noise": m.new_zeros(())}
        if aid.attacks:
            m_b = m[:n].detach() if aid.detach_benign else m[:n]
            l1 = (m_b - m[n:2 * n]).abs().flatten(1).mean(1)
            w = res.success.float() if aid.success_only else torch.ones_like(l1)
            out["l_aid"] = -(w * l1).sum() / mean_over_ranks(w.sum()).clamp_min(1.0 / rank_world()[1])
            out.update({"asr": res.success.float().mean(), "l1_adv": l1.detach().mean()})
        if aid.noise_sigma > 0:
            out["l_noise"] = (m[:n].detach() - m[-n:]).abs().mean()
        if self.anchor_rts is not None:
            with torch.no_grad():
                m0 = self.anchor_rts(self.model, x, cls)[0]
            out["anchor"] = (m[:n] - m0).abs().mean()  # in the loss with aid.anchor_aid_weight > 0, else logged only
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
        class_weight = self.objective.class_weight
        x, y = batch["image"], batch["label"]
        cls = self._explained(x, y)
        logs: dict[str, Tensor] = {}
        if self.is_aid_batch(batch_idx):
            self.aid_steps += 1
            a = self.aid_loss(x, cls, batch_idx)
            loss = self.aid.weight * (a["l_aid"] + a["l_noise"]) + class_weight * a["class_ce"]
            logs.update({"l_aid": a["l_aid"], "aid_asr": a["asr"]} if "asr" in a else {})
            logs.update({"l_noise": a["l_noise"]} if self.aid.noise_sigma > 0 else {})
            if "anchor" in a:
                logs["aid_anchor"] = a["anchor"].detach()
            if self.aid.mode == "joint":
                li = self.interpretation_loss(x, cls, self._generator(batch_idx))
                loss = loss + li["loss"] - class_weight * a["class_ce"]  # class CE counted once
                logs["l_int"] = li["loss"]
                return loss, 0, logs  # the anchor is in l_int here
            if "anchor" in a and self.aid.anchor_aid_weight > 0:
                loss = loss + self.aid.anchor_aid_weight * a["anchor"]
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

    def on_validation_epoch_start(self) -> None:
        # sums over the epoch's validation inputs: localisation, the anchor's localisation, their count,
        # benign-vs-ADV2 map L1, its count (val/aid_score is computed from them at the epoch's end)
        self._val_sums = torch.zeros(5, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        cls = self._explained(x, y)
        bs = x.shape[0]
        seed = int(self.hparams.seed)
        with torch.no_grad():
            m, logits = self.rts(self.model, x, cls)
            out = rts_objective(self.model, x, cls, m, generator=torch.Generator().manual_seed(seed + batch_idx),
                                **self.objective.rts_kwargs())
        self.log("val/l_int", out["loss"].mean() + self.objective.class_weight * F.cross_entropy(logits, cls),
                 prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("val/mask_mean", m.mean(), sync_dist=True, batch_size=bs)
        if "mask" in batch:
            self._val_localisation(x, cls, m, (batch["mask"] > 0.5).float())
        if batch_idx < self.hparams.val_attack_batches:
            if torch.is_inference_mode_enabled():
                raise RuntimeError("val_attack_batches > 0 runs ADV2 in validation: set Trainer(inference_mode=False) "
                                   "(--trainer.inference_mode=false)")
            y_t = random_targets(cls, self.model.num_classes, torch.Generator().manual_seed(seed + batch_idx))
            res = aid_attack(self.model, self.rts, x, y_t, self.attack, seed=seed)
            with torch.no_grad():
                m_a = self.rts(self.model, res.x_adv, y_t)[0]
            l1 = (m - m_a).abs().flatten(1).mean(1)
            self._val_sums[3:] += torch.stack([l1.sum(), torch.tensor(float(bs), device=l1.device)]).double()
            self.log("val/l1_adv", l1.mean(), sync_dist=True, batch_size=bs)
            self.log("val/attack_asr", res.success.float().mean(), sync_dist=True, batch_size=bs)

    def _val_localisation(self, x: Tensor, cls: Tensor, m: Tensor, gt: Tensor) -> None:
        """Localisation of the current maps (and of the anchor's, when there is one) on a validation batch."""
        energy, _ = localisation(m, gt)
        self.log("val/localisation", energy.mean(), prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        anchor = energy.new_zeros(())
        if self.anchor_rts is not None:
            with torch.no_grad():
                energy0, _ = localisation(self.anchor_rts(self.model, x, cls)[0], gt)
            self.log("val/localisation_anchor", energy0.mean(), sync_dist=True, batch_size=x.shape[0])
            anchor = energy0.sum()
        self._val_sums[:3] += torch.stack([energy.sum(), anchor, energy.new_tensor(float(x.shape[0]))]).double()

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")  # over ranks
        if float(sums[4]) == 0:  # no ADV2 in this validation (val_attack_batches 0)
            return
        loc = float(sums[0] / sums[2]) if float(sums[2]) else None
        loc0 = float(sums[1] / sums[2]) if float(sums[2]) and self.anchor_rts is not None else None
        score = aid_score(float(sums[3] / sums[4]), loc, loc0, self.val_max_localisation_drop)
        self.log("val/aid_score", score, prog_bar=True, batch_size=1)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["image"])

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The RTS network's parameters (the classifier and the anchor are frozen)."""
        return list(self.rts.parameters())

    def configure_optimizers(self):
        """The optimiser on the RTS parameters; alternating AID gets a second one (own moments, lr ``aid.lr``) for the
        ``l_aid`` steps, so the step size of each objective does not depend on the other's gradient scale."""
        opts = [build_optimiser(self.optimiser, self.trainable_parameters())]
        if self.aid.weight > 0 and self.aid.mode == "alternate":
            opts.append(build_optimiser(self.optimiser, self.trainable_parameters(), lr=self.aid.lr or self.optimiser.lr))
        return opts

    def artifact_meta(self) -> dict[str, Any]:
        """The RTS network's configuration, the classifier it explains and how it was trained."""
        hp, aid = self.hparams, self.aid
        return {"network": self.rts.config(), "classifier": str(hp.classifier), "classifier_meta": self.model.describe(),
                "aid_weight": float(aid.weight), "aid_mode": aid.mode, "aid_every": int(aid.every),
                "aid_steps": int(self.aid_steps), "aid_noise_sigma": float(aid.noise_sigma),
                "aid_noise_mode": aid.noise_mode, "init_from": hp.init_from, "objective": self.objective.rts_kwargs(),
                "class_weight": float(self.objective.class_weight)}

    def rts_meta(self) -> dict[str, Any]:
        """:meth:`artifact_meta` (stored with checkpoints and exported artifacts)."""
        return self.artifact_meta()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("idls_meta")
        self.aid_steps = int(meta.get("aid_steps", 0)) if isinstance(meta, dict) else 0  # a resumed run keeps counting

    def export(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Save the RTS network alone as a safe artifact (:func:`save_rts`; what ``load_rts`` and the ``rts``
        paths of the experiments read)."""
        save_rts(self.rts, path, {**self.artifact_meta(), **(extra or {})})


# --------------------------------------------------------------------------------------------- the defences
def _rts_battery(battery: Any, options: Any) -> dict[str, Any]:
    """The adaptive attack of an RTS row is ``adaptive_rts`` (the ensemble attack on the classifier's own
    interpreters is the plain classifier's)."""
    return {"adaptive.ensemble": []}


def _aid_note(card: dict[str, Any], art: Any) -> list[str]:
    return [f"{art['aid_steps']} AID steps trained"] if art and art.get("aid_steps") is not None else []


def _rts_defence(name: str, plan: str, description: str, note: Any = None) -> Defence:
    """The plain classifier explained by an RTS network trained by :class:`AIDModule` (``plan``: the part of the AID
    training plan, ``rts`` or ``aid``)."""
    return register_defence(Defence(name, description, trains="aid", module={"plan": plan}, artifact=RTS_NETWORK,
                                    interpreters=("rts",), adaptive=("adaptive_rts",), battery=_rts_battery, note=note),
                            __name__)


_rts_defence("rts", "rts", "the normal classifier explained by the plain real-time saliency (RTS) interpreter (AIDModule, "
                           "AID weight 0).")
_rts_defence("rts_aid", "aid", "the normal classifier explained by RTS trained with adversarial interpretation "
                               "distillation (ADV2 section 5 Q3; AIDModule, AID weight > 0): its maps of adversarial "
                               "inputs should differ from the benign ones (low IoU).", _aid_note)
_rts_defence("rts_noise", "noise", "the normal classifier explained by RTS fine-tuned from the plain RTS with the noise "
                                   "distillation term (AIDModule, aid.noise_sigma 0.25: the map of x + N(0, sigma^2 I) "
                                   "pulled to the benign map, ADV2 replaced by noise): the RTS whose smoothed map is "
                                   "certified (randomized smoothing, issue 29).", _aid_note)
