"""The top-k interpretation attacks: our variant (Ghorbani et al., AAAI 2019) and Boopathy et al.'s reference protocol.

**Our variant** (:class:`TopKAttack`, ``"topk"``, protocol ``ghorbani``) moves the explanation away from where it was while the classifier keeps its decision: PGD in the L-inf ball on

    l(x') = mass_T(g(x')) + margin_weight * max(max_{j != c} z_j(x') - z_c(x') + kappa, 0)

where ``T`` is the set of the ``k`` largest pixels of the benign map ``g(x)`` (on the interpreter's own grid by default:
the 8x8 CAM grid of a 32 px model, Boopathy's ``k = 8``), ``mass_T(m) = sum_{i in T} m_i / sum_i m_i`` the share of the
normalised map's mass on them, ``z`` the logits and ``c`` the class explained (the benign prediction). The hinge keeps
the prediction; per input the attack returns the uint8-grid iterate with the lowest ``mass_T`` among those still
classified as ``c`` (the benign input if none is), over ``restarts`` random starts.

**The reference** (:class:`ReferenceTopKAttack`, ``"aai_topk"``, protocol ``boopathy``) is Boopathy et al.'s
``eval.py`` ``aai_topk`` (ICML 2020): loss = minus the *raw* map of the true label summed over the benign top-k pixels
(no logit hinge; their ``kappa`` is unused), a uniform random start in the ball, signed steps of 0.01 (image units),
200 steps, the final iterate kept; inputs whose prediction flipped are reported (``kept``) for the caller to drop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base_attack import BALL_ATTACKS, Attack
from .checks import check_images, check_positive
from .frameworks import PGD
from .frameworks.base import quantise_linf
from .interpreters import Interpreter, get_interpreter
from .state import frozen

__all__ = ["TopKAttack", "TopKResult", "ReferenceTopKAttack", "ReferenceTopKResult", "topk_mass", "topk_indices"]


def topk_indices(m: Tensor, k: int) -> Tensor:
    """Flat indices ``[N, k]`` of each map's ``k`` largest pixels (ties: lower flat index first)."""
    flat = m.flatten(1)
    if not 1 <= k <= flat.shape[1]:
        raise ValueError(f"k must lie in [1, {flat.shape[1]}] for maps of {flat.shape[1]} pixels, got {k}")
    return torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]


def topk_mass(m: Tensor, idx: Tensor) -> Tensor:
    """Share of each (non-negative) map's mass on the pixels ``idx`` -> ``[N]`` (0 for an all-zero map)."""
    flat = m.flatten(1)
    return flat.gather(1, idx).sum(1) / flat.sum(1).clamp_min(1e-12)


@dataclass
class TopKResult:
    """Attacked inputs (uint8 grid, inside the ball), whether each kept its class, and the top-k mass before / after."""

    x_adv: Tensor
    kept: Tensor
    mass_benign: Tensor
    mass_adv: Tensor

    @property
    def success(self) -> Tensor:
        """The attack's goal per input (:class:`attacks.Attack`, goal ``"reach"``): the explained class was kept."""
        return self.kept


class TopKAttack(Attack):
    """Top-k attack on an interpreter's map that keeps the prediction (module docstring); registered in
    :data:`attacks.BALL_ATTACKS` as ``"topk"`` (``y``: the class to keep, default the benign prediction).

    This is **our variant** (protocol ``ghorbani``), not Boopathy et al.'s: the *normalised* top-k mass plus a
    ``kappa`` logit hinge, a benign start, the *best* iterate that keeps the class. The reference protocol is
    :class:`ReferenceTopKAttack` (``"aai_topk"``).

    Args:
        interpreter: a differentiable interpreter (name or instance; GRAD is attacked through its surrogate).
        k: pixels of the benign top-k set, on the map's native grid (``native=True``) or the input grid.
        eps, alpha: L-inf radius and PGD step (default ``eps / 4``, at least one uint8 level).
        steps, restarts: PGD iterations per restart and random restarts (Boopathy: 200 steps; Chen et al.: 3
            restarts). The first restart starts at the benign input unless ``random_start``.
        kappa, margin_weight: logit margin kept for the explained class and the weight of its hinge.
        seed: seeds the random starts.

    Example::

        res = TopKAttack("cam", k=8, eps=8 / 255, steps=200)(model, x)   # res.x_adv, res.kept, res.mass_adv
    """

    def __init__(self, interpreter: str | Interpreter = "cam", *, k: int = 8, eps: float = 8 / 255,
                 alpha: float | None = None, steps: int = 200, restarts: int = 1, random_start: bool = False,
                 kappa: float = 0.1, margin_weight: float = 1.0, native: bool = True, seed: int = 0) -> None:
        self.interpreter = get_interpreter(interpreter)
        if not self.interpreter.differentiable:
            raise ValueError(f"the top-k attack needs a differentiable interpreter; '{self.interpreter.name}' is not")
        if k < 1 or steps < 1 or restarts < 1:
            raise ValueError(f"need k >= 1, steps >= 1 and restarts >= 1, got {k}, {steps}, {restarts}")
        check_positive(kappa, "kappa", allow_zero=True)
        check_positive(margin_weight, "margin_weight", allow_zero=True)
        self.threat = PGD(eps, alpha if alpha is not None else max(eps / 4, 1 / 255), random_start=True)
        self.threat.check_grid_budget()
        self.k, self.steps, self.restarts, self.random_start = int(k), int(steps), int(restarts), random_start
        self.kappa, self.margin_weight, self.native, self.seed = kappa, margin_weight, native, seed

    @property
    def budget(self) -> dict[str, Any]:
        return {**self.threat.budget, "k": self.k, "steps": self.steps, "restarts": self.restarts}

    def _loss(self, model: nn.Module, x: Tensor, cls: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, mass_T, logits)`` per example, differentiable w.r.t. ``x``."""
        m, logits = self.interpreter.attack_map_and_logits(model, x, cls, native=self.native)
        mass = topk_mass(m, idx)
        logits = model(x) if logits is None else logits
        other = logits.scatter(1, cls.view(-1, 1), float("-inf")).amax(1)
        hinge = (other - logits.gather(1, cls.view(-1, 1)).squeeze(1) + self.kappa).clamp_min(0)
        return mass + self.margin_weight * hinge, mass, logits

    def _run(self, model, x0, cls, idx, best_x, best_mass, gen, start_at_x0: bool) -> None:
        z = torch.zeros_like(x0) if start_at_x0 else self.threat.init(x0, gen)
        active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
        for i in range(self.steps + 1):
            z = z.detach().requires_grad_(True)
            x = self.threat.apply(x0, z, None)
            xq = x + (self.threat.quantise(x0, x) - x).detach()
            loss, mass, logits = self._loss(model, xq, cls, idx)
            with torch.no_grad():
                better = (logits.argmax(1) == cls) & (mass < best_mass)
                best_mass.copy_(torch.where(better, mass, best_mass))
                best_x.copy_(torch.where(better.view(-1, 1, 1, 1), xq, best_x))
            if i == self.steps:
                break
            (g,) = torch.autograd.grad(loss.sum(), z)
            z = self.threat.project(x0, self.threat.step(z, g, active, None))

    def __call__(self, model: nn.Module, x: Tensor, cls: Tensor | None = None) -> TopKResult:
        check_images(x)
        x0 = x.detach().clone()
        gen = torch.Generator().manual_seed(self.seed)
        with frozen(model):
            with torch.no_grad():
                pred = model(x0).argmax(1)
            cls = pred if cls is None else cls.to(x0.device)
            benign = self.interpreter.attack_map(model, x0.requires_grad_(True), cls, native=self.native).detach()
            x0 = x0.detach()
            idx = topk_indices(benign, self.k)
            mass0 = topk_mass(benign, idx)
            best_mass = torch.where(pred == cls, mass0, torch.full_like(mass0, float("inf")))
            best_x = x0.clone()
            for r in range(self.restarts):
                self._run(model, x0, cls, idx, best_x, best_mass, gen, start_at_x0=r == 0 and not self.random_start)
            with torch.no_grad():
                kept = model(best_x).argmax(1) == cls
        return TopKResult(best_x, kept, mass0, torch.where(torch.isinf(best_mass), mass0, best_mass))


@BALL_ATTACKS.register("topk")
def topk(eps: float, interpreter: str | Interpreter = "cam", generator: torch.Generator | None = None,
         **options: Any) -> TopKAttack:
    """:class:`TopKAttack` in the ``eps`` ball; with ``generator`` its seed is drawn from it (else ``seed``)."""
    if generator is not None:
        options["seed"] = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    return TopKAttack(interpreter, eps=eps, **options)


@dataclass
class ReferenceTopKResult:
    """Boopathy's final iterates (uint8 grid, inside the ball), per-input ``kept`` (the prediction did not flip: the
    inputs the reference scores), ``success`` (the contract's goal ``"reach"``: the prediction is ``y``) and the raw
    top-k map sum before / after."""

    x_adv: Tensor
    kept: Tensor
    success: Tensor
    topk_benign: Tensor
    topk_adv: Tensor


class ReferenceTopKAttack(Attack):
    """Boopathy et al.'s ``aai_topk`` exactly (module docstring), registered in :data:`attacks.BALL_ATTACKS` as
    ``"aai_topk"`` (the reference protocol ``boopathy``); ``y`` is the class explained (the reference: the true label).

    Per input: ``T`` = the ``k`` largest pixels of the benign raw map :meth:`~attacks.interpreters.Interpreter.explain`
    (CAM: the un-normalised map on its native 8x8 grid; ties: lower index first, as ``tf.nn.top_k``); start
    ``clip(x + U(-eps, eps), 0, 1)`` drawn from a generator seeded ``seed``; ``steps`` times
    ``x <- clip(clip(x + alpha * sign(grad(-sum_T raw(x))), x - eps, x + eps), 0, 1)``; the final iterate is kept.
    **Our addition:** the final iterate is rounded to the uint8 grid inside the ball (what a saved image is); the
    iterates themselves are not rounded, as in the reference. ``kept``: the prediction did not change.

    Example::

        res = ReferenceTopKAttack("cam", eps=8 / 255)(model, x, y)   # res.x_adv, res.kept (score only those)
    """

    def __init__(self, interpreter: str | Interpreter = "cam", *, k: int = 8, eps: float = 8 / 255,
                 alpha: float = 0.01, steps: int = 200, seed: int = 0) -> None:
        self.interpreter = get_interpreter(interpreter)
        if not self.interpreter.differentiable:
            raise ValueError(f"aai_topk needs a differentiable interpreter; '{self.interpreter.name}' is not")
        if k < 1 or steps < 1:
            raise ValueError(f"aai_topk needs k >= 1 and steps >= 1, got {k} and {steps}")
        check_positive(alpha, "alpha")
        self.threat = PGD(eps, alpha, random_start=True)
        self.threat.check_grid_budget()
        self.k, self.steps, self.alpha, self.eps, self.seed = int(k), int(steps), float(alpha), float(eps), int(seed)

    @property
    def budget(self) -> dict[str, Any]:
        return {**self.threat.budget, "k": self.k, "steps": self.steps, "restarts": 1, "protocol": "boopathy",
                "iterate": "final"}

    def _topk_raw(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor, create_graph: bool) -> Tensor:
        """The raw map of ``y`` summed over the pixels ``idx`` -> ``[N]`` (the interpreter's one hook)."""
        with self.interpreter.attack_modifier():
            raw = self.interpreter.explain(model, x, y, create_graph=create_graph)
        return raw.flatten(1).gather(1, idx).sum(1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ReferenceTopKResult:
        check_images(x)
        x0, y = x.detach().clone(), y.to(x.device)
        gen = torch.Generator().manual_seed(self.seed)
        with frozen(model):
            with torch.no_grad():
                pred = model(x0).argmax(1)
                benign = self.interpreter.explain(model, x0, y)
            idx = topk_indices(benign, self.k)
            u = torch.rand(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
            xa = (x0 + (2 * u - 1) * self.eps).clamp(0, 1)
            for _ in range(self.steps):
                xa = xa.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(-self._topk_raw(model, xa, y, idx, True).sum(), xa)
                xa = torch.minimum(torch.maximum(xa.detach() + self.alpha * g.sign(), x0 - self.eps), x0 + self.eps)
                xa = xa.clamp(0, 1)
            x_adv = quantise_linf(x0, xa.detach(), self.eps)
            with torch.no_grad():
                pred_adv = model(x_adv).argmax(1)
                mass0, mass = self._topk_raw(model, x0, y, idx, False), self._topk_raw(model, x_adv, y, idx, False)
        return ReferenceTopKResult(x_adv, pred_adv == pred, pred_adv == y, mass0.detach(), mass.detach())


@BALL_ATTACKS.register("aai_topk")
def aai_topk(eps: float, interpreter: str | Interpreter = "cam", generator: torch.Generator | None = None,
             **options: Any) -> ReferenceTopKAttack:
    """:class:`ReferenceTopKAttack` in the ``eps`` ball; with ``generator`` its seed is drawn from it (else ``seed``)."""
    if generator is not None:
        options["seed"] = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    return ReferenceTopKAttack(interpreter, eps=eps, **options)
