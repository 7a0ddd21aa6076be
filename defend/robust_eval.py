"""Robustness of a classifier and of its explanations, as the field measures them.

* Accuracy under untargeted L-inf PGD on the cross-entropy (:func:`pgd_accuracy`) and under AutoAttack
  (:mod:`defend.autoattack`).
* Interpretation robustness: benign maps against the maps of inputs attacked to change the explanation while the
  prediction is kept, scored with the field's agreement measures (:class:`MapAgreement`: Kendall's tau-b, Spearman's
  rho, top-k intersection at several k, cosine similarity, centre-of-mass shift). Attacks: Boopathy et al.'s
  reference ``aai_topk`` (:class:`attacks.topk.ReferenceTopKAttack`, protocol ``boopathy``: the true label explained),
  our top-k variant (:class:`attacks.topk.TopKAttack`, protocol ``ghorbani``: the benign prediction explained), the
  interpretation-discrepancy attack of the robust training objective (:func:`discrepancy_attack`) and, as the floor
  any attack must beat, uniform noise of the same radius. Only inputs whose prediction the attack did not change are
  scored (the reference drops the others). Maps are
  compared on the interpreter's own grid (the 8x8 CAM grid of a 32 px model, where the top-k set is defined); Kendall's
  tau is also given on the input grid (bilinearly upsampled maps, the figure of earlier versions).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base_attack import BALL_ATTACKS, Attack, AttackResult, prob_of
from attacks.frameworks import PGD, pgd_maximise
from attacks.interpreters import Interpreter
from attacks.state import frozen

from .metrics import CentreOfMassShift, KendallTau, MapCosineSimilarity, MaxSensitivity, SpearmanRho, TopKIntersection
from .robust import check_discrepancy, discrepancy, maps_and_logits
from .stats import Estimate

__all__ = ["MapAgreement", "pgd_accuracy", "discrepancy_attack", "DiscrepancyAttack", "craft_interpretation_attack",
           "interpretation_robustness", "sensitivity", "INTERPRETATION_ATTACKS", "REFERENCE_ATTACK", "PROTOCOLS",
           "native_map"]

#: the interpretation attacks (registered in :data:`attacks.BALL_ATTACKS`, goal: keep the class), in the order the
#: robust experiment reports them
INTERPRETATION_ATTACKS = ("topk", "discrepancy", "noise")
#: Boopathy et al.'s ``eval.py`` ``aai_topk`` (:class:`attacks.topk.ReferenceTopKAttack`): protocol ``boopathy``
REFERENCE_ATTACK = "aai_topk"
#: the interpretation-robustness protocols: Boopathy et al.'s reference and our variant (Ghorbani-style top-k)
PROTOCOLS = ("boopathy", "ghorbani")


def native_map(interp: Interpreter, model: nn.Module, x: Tensor, cls: Tensor) -> Tensor:
    """The interpreter's normalised map on its own grid (no resampling), detached."""
    return interp.normalise(interp.explain(model, x, cls)).detach()


class MapAgreement(nn.Module):
    """Agreement of benign and attacked maps: the torchmetrics of :mod:`defend.metrics`, summed across DDP ranks;
    every figure with its bootstrap interval over inputs."""

    #: figure name -> metric attribute
    FIGURES = {"kendall_tau": "tau", "spearman": "rho", "topk_intersection": "topk", "cosine": "cos",
               "com_shift": "shift"}

    def __init__(self, ks: Sequence[int] = (4, 8, 16)) -> None:
        super().__init__()
        self.ks = tuple(int(k) for k in ks)
        self.tau, self.rho, self.cos = KendallTau(), SpearmanRho(), MapCosineSimilarity()
        self.topk, self.shift = TopKIntersection(self.ks), CentreOfMassShift()

    def update(self, benign: Tensor, attacked: Tensor) -> None:
        for m in (self.tau, self.rho, self.cos, self.topk, self.shift):
            m.update(benign, attacked)

    def compute(self, seed: int = 0) -> dict[str, float]:
        out: dict[str, Any] = {}
        for name, attr in self.FIGURES.items():
            out.update(getattr(self, attr).estimate(seed).fields(name))
        out.update({f"topk_intersection_k{k}": float(v) for k, v in self.topk.compute_per_k().items()})
        return out

    def per_input(self) -> dict[str, Tensor]:
        """The per-input values of every figure (in the order the inputs were seen)."""
        return {name: getattr(self, attr).per_input() for name, attr in self.FIGURES.items()}


def pgd_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, alpha: float,
                 generator: torch.Generator | None = None, batch_size: int = 256) -> Tensor:
    """Per-input correctness ``[N]`` under untargeted PGD on the cross-entropy, random start (clean at eps 0)."""
    out = []
    with frozen(model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if eps > 0:
                xb = pgd_maximise(lambda z: F.cross_entropy(model(z), yb, reduction="none"), xb, eps, alpha, steps,
                                  random_start=True, generator=generator)
            with torch.no_grad():
                out.append(model(xb).argmax(1) == yb)
    return torch.cat(out)


def discrepancy_attack(model: nn.Module, x: Tensor, cls: Tensor, eps: float, alpha: float, steps: int,
                       generator: torch.Generator | None = None, kind: str = "normalised") -> tuple[Tensor, Tensor]:
    """PGD ascent on the CAM discrepancy ``D(x, x')`` of :mod:`defend.robust` (class ``cls``; ``kind``: our
    ``"normalised"`` D or the ``"reference"`` one on raw CAMs); per input the uint8-grid iterate with the largest ``D``
    among those still classified ``cls``. Returns ``(x_best, kept)``; the model must be frozen (the caller's
    business)."""
    threat = PGD(eps, alpha, random_start=True)
    x0 = x.detach()
    with torch.no_grad():
        maps_x = maps_and_logits(model, x0, "cam", kind)[0]
    z = threat.init(x0, generator)
    best_x, best_d = x0.clone(), torch.full((x0.shape[0],), -1.0, device=x0.device)
    active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    with torch.enable_grad():
        for it in range(steps + 1):
            z = z.detach().requires_grad_(True)
            x_it = threat.apply(x0, z, None)
            xq = x_it + (threat.quantise(x0, x_it) - x_it).detach()
            maps_z, logits_z = maps_and_logits(model, xq, "cam", kind)
            d = discrepancy(maps_x, maps_z, logits_z, cls, kind)
            with torch.no_grad():
                better = (logits_z.argmax(1) == cls) & (d > best_d)
                best_d = torch.where(better, d.detach(), best_d)
                best_x = torch.where(better.view(-1, 1, 1, 1), xq.detach(), best_x)
            if it == steps:
                break
            (g,) = torch.autograd.grad(d.sum(), z)
            z = threat.project(x0, threat.step(z, -g, active, None))
    return best_x, best_d >= 0


@BALL_ATTACKS.register("discrepancy")
class DiscrepancyAttack(Attack):
    """:func:`discrepancy_attack` under the attack contract (``y``: the class kept; step ``step_ratio * eps``). It
    lives in ``defend`` because the discrepancy ``D`` is the robust training objective's (:mod:`defend.robust`)."""

    def __init__(self, eps: float, interpreter: Any = None, steps: int = 20, step_ratio: float = 0.25,
                 generator: torch.Generator | None = None, seed: int = 0, discrepancy: str = "normalised") -> None:
        check_discrepancy(discrepancy)
        self.threat = PGD(eps, eps * float(step_ratio), random_start=True)
        self.steps, self.kind = int(steps), discrepancy
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    @property
    def budget(self) -> dict[str, Any]:
        return {**self.threat.budget, "steps": self.steps, "restarts": 1, "discrepancy": self.kind}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        start = time.perf_counter()
        x_adv, kept = discrepancy_attack(model, x, y, float(self.threat.eps), float(self.threat.alpha), self.steps,
                                         self.generator, self.kind)
        p = prob_of(model, x_adv, y)[1]
        return AttackResult(x_adv, y, kept, p, None, time.perf_counter() - start, self.steps)


def craft_interpretation_attack(model: nn.Module, interp: Interpreter, x: Tensor, cls: Tensor, eps: float,
                                attack: str, options: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x_attacked, success)`` for one of :data:`INTERPRETATION_ATTACKS` or :data:`REFERENCE_ATTACK`, built from
    :data:`attacks.BALL_ATTACKS` (``success``: the prediction is ``cls``)."""
    if attack not in (*INTERPRETATION_ATTACKS, REFERENCE_ATTACK):
        raise ValueError(f"unknown interpretation attack {attack!r}; choose one of "
                         f"{', '.join((*INTERPRETATION_ATTACKS, REFERENCE_ATTACK))}")
    res = BALL_ATTACKS.get(attack)(eps=eps, interpreter=interp, generator=generator, **options)(model, x, cls)
    return res.x_adv, res.success


def interpretation_robustness(model: nn.Module, interp: Interpreter, x: Tensor, eps: float, attack: str, *,
                              options: dict[str, Any] | None = None, ks: Sequence[int] = (4, 8, 16), seed: int = 0,
                              batch_size: int = 128, per_input: bool = False,
                              labels: Tensor | None = None) -> dict[str, Any]:
    """Benign vs attacked maps of the inputs whose prediction the attack did not change, for the class the attack
    explains: the benign prediction, or ``labels`` (Boopathy's protocol: the true label; then a misclassified input
    whose prediction stays is still scored, as in the reference).

    Returns :class:`MapAgreement`'s figures (native grid) with their bootstrap intervals over the kept inputs (seed
    ``seed``), ``kendall_tau_input_grid``, ``n`` (inputs attacked) and ``n_kept``; with ``per_input`` also
    ``per_input`` (each figure's values) and ``kept`` (their positions in ``x``) for paired tests. At eps 0 the maps
    are identical."""
    gen = torch.Generator().manual_seed(seed)
    agree, tau_in = MapAgreement(ks), KendallTau()
    kept_at: list[Tensor] = []
    with frozen(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            with torch.no_grad():
                pred = model(xb).argmax(1)
            cls = pred if labels is None else labels[i:i + batch_size].to(pred.device)
            xa, kept = (xb, torch.ones_like(cls, dtype=torch.bool)) if eps == 0 else \
                craft_interpretation_attack(model, interp, xb, cls, eps, attack, dict(options or {}), gen)
            if labels is not None:  # the reference's rule: drop an input whose prediction changed
                with torch.no_grad():
                    kept = model(xa).argmax(1) == pred
            if not bool(kept.any()):
                continue
            kept_at.append(kept.nonzero().flatten().cpu() + i)
            xb, xa, cls = xb[kept], xa[kept], cls[kept]
            with torch.no_grad():
                agree.update(native_map(interp, model, xb, cls), native_map(interp, model, xa, cls))
                tau_in.update(interp.map(model, xb, cls).detach(), interp.map(model, xa, cls).detach())
    n_kept = int(sum(k.numel() for k in kept_at))
    if n_kept == 0:
        return {"n": int(x.shape[0]), "n_kept": 0}
    out = {**agree.compute(seed), "kendall_tau_input_grid": float(tau_in.compute()), "n": int(x.shape[0]),
           "n_kept": n_kept, "bootstrap_seed": int(seed)}
    if per_input:
        out.update(per_input=agree.per_input(), kept=torch.cat(kept_at))
    return out


def sensitivity(model: nn.Module, interp: Interpreter, x: Tensor, radius: float, n_samples: int = 10,
                seed: int = 0, batch_size: int = 128) -> Estimate:
    """captum-style max-sensitivity of the native-grid map (uniform L-inf noise of ``radius``, ``n_samples``): the
    mean over inputs with its bootstrap interval (seed ``seed``)."""
    metric = MaxSensitivity(radius=radius, n_samples=n_samples, seed=seed)
    with frozen(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            with torch.no_grad():
                cls = model(xb).argmax(1)
            metric.update(lambda z, c=cls: native_map(interp, model, z, c.repeat_interleave(z.shape[0] // c.shape[0])), xb)
    return metric.estimate(seed)
