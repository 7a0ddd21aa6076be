"""Adaptive attacks: an attacker who knows the defence (Carlini & Wagner 2017; Tramer et al. 2020).

- :class:`DetectorAwareTerm` / attack ``"adaptive_detector"``: ADV2 against the ensemble of the interpreters a
  multi-interpreter detector reads, plus a differentiable stand-in of the detector's score on the stacked maps (the
  booster has no gradient; ``defend`` passes the booster's distilled surrogate, or the trunk's cross-entropy head).
  Success against the real detector is judged by the caller (``defend``), with the booster at its threshold.
- :class:`Restarts` / attack ``"adaptive_rts"``: ADV2 against an (AID-trained) RTS with a larger budget, random
  restarts and a heavier encoder term (the RTS class head in the loss, ADV2 section 3.4).
- Against robust classifiers the adaptive attacks are ADV2 / AdvEdge on their CAM and GRAD and on the ensemble of
  both (``build_attack("adv2", "pgd", ["cam", "grad"])``): nothing new is needed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adv2 import ADV2, AttackResult, make_term
from .base_attack import Attack
from .factory import ATTACKS, _options
from .frameworks import threat_options
from .interpreters import RTSInterpreter
from .optim import expand_like
from .state import frozen
from .terms import InterpretationTerm

__all__ = ["DetectorAwareTerm", "Restarts", "stack_channels"]


def stack_channels(maps: Tensor, product: bool | Sequence[int] = False) -> Tensor:
    """Maps ``[N, C, H, W]`` as a detector reads them: the channels, plus the product of two (the first two, or the
    indices given) as an extra channel, clamped to [0, 1]."""
    if product:
        i, j = (0, 1) if product is True else tuple(product)
        maps = torch.cat([maps, maps[:, i:i + 1] * maps[:, j:j + 1]], 1)
    return maps.clamp(0, 1)


class DetectorAwareTerm(InterpretationTerm):
    """``l_int = l_ens(g_1..g_C) + detector_weight * softplus(z_adv - z_benign)(stack(g_1(x), ..., g_C(x)))``.

    Args:
        inner: the map term of the interpreters the detector reads (an ensemble term for C > 1), in its channel order.
        detector: a module mapping stacked maps ``[N, C(+1), H, W]`` in [0, 1] to logits ``[N, 2]`` (1 = adversarial);
            frozen by the engine like the classifier.
        detector_weight: weight of the detector score; ``product``: as :func:`stack_channels`.
    """

    def __init__(self, inner: InterpretationTerm, detector: nn.Module, detector_weight: float = 1.0,
                 product: bool | Sequence[int] = False) -> None:
        super().__init__(inner.interpreter)
        if detector_weight < 0:
            raise ValueError(f"detector_weight must be >= 0, got {detector_weight}")
        self.inner, self.detector, self.detector_weight, self.product = inner, detector, float(detector_weight), product
        self.wants_label_smoothing, self.wants_step_search = inner.wants_label_smoothing, inner.wants_step_search
        self.selects_on_refresh = False  # selects on the joint loss, which includes the detector score

    @property
    def name(self) -> str:
        return f"detector[{self.inner.name}]"

    def networks(self) -> list[nn.Module]:
        return [*self.inner.networks(), self.detector]

    def target_map(self, model, x, cls):
        return self.inner.target_map(model, x, cls)

    def init(self, model, x, y_t, m_t):
        return {"inner": self.inner.init(model, x, y_t, m_t)}

    def detector_margin(self, maps: Tensor) -> Tensor:
        """``z_adv - z_benign`` of the detector on stacked maps (positive: flagged as adversarial)."""
        logits = self.detector(stack_channels(maps, self.product)).float()
        return logits[:, 1] - logits[:, 0]

    def loss_and_logits(self, model, x, y_t, m_t, state):
        loss, logits = self.inner.loss_and_logits(model, x, y_t, m_t, state["inner"])
        state["margin"] = self.detector_margin(self.inner.last_map(state["inner"]))
        return loss + self.detector_weight * F.softplus(state["margin"]), logits

    def last_map(self, state):
        return self.inner.last_map(state["inner"])

    def refresh(self, model, x, y_t, m_t, state, step):
        self.inner.refresh(model, x, y_t, m_t, state["inner"], step)
        state["inner"].pop("selection_loss", None)


class Restarts(Attack):
    """The best of several runs (``attacks``: the same attack from different starts / seeds): per input a successful
    run before a failed one; among successful runs the one with the lowest interpretation loss, or with
    ``select_by_map`` the one whose map (the first run's interpreter, as measured) is closest in L1 to the target
    map (the defender's own figure, whatever each run's loss weighed); among failed runs the highest target
    probability. Same interface as :class:`ADV2` (its other attributes are the first run's); its budget is the
    first run's with the number of runs (the later runs start at random where the threat model has a random start)."""

    def __init__(self, attacks: Sequence[ADV2], select_by_map: bool = False) -> None:
        if not attacks:
            raise ValueError("Restarts needs at least one attack")
        self.attacks = list(attacks)
        self.select_by_map = select_by_map

    def __getattr__(self, name: str) -> Any:  # threat, term, target_maps, seed, ...: the first run's
        return getattr(self.__dict__["attacks"][0], name)

    @property
    def budget(self) -> dict[str, Any]:
        out = {**self.attacks[0].budget, "restarts": len(self.attacks)}
        out.pop("random_start", None)
        return out

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor, target_map: Tensor | None = None) -> AttackResult:
        first = self.attacks[0]
        if target_map is None and first.term is not None:
            target_map = first.target_maps(model, x.detach())  # one target for every run
        best = None
        for attack in self.attacks:
            res = attack(model, x, target, target_map)
            if self.select_by_map and target_map is not None:
                res.int_loss = self._map_l1(model, res.x_adv, target, target_map)
            best = res if best is None else _better(best, res)
        return best

    def _map_l1(self, model: nn.Module, x_adv: Tensor, target: Tensor, target_map: Tensor) -> Tensor:
        """Per input, the mean absolute difference of the measured map of ``x_adv`` (class ``target``) and the
        target map."""
        with torch.no_grad(), frozen(model, *self.attacks[0]._networks()):
            m = self.attacks[0].interpreter.map(model, x_adv, target)
        return (m - target_map).abs().flatten(1).mean(1)


def _better(a: AttackResult, b: AttackResult) -> AttackResult:
    """Per input, ``b`` where it beats ``a`` (success first, then the lower interpretation loss / higher probability)."""
    la = a.int_loss if a.int_loss is not None else -a.target_prob
    lb = b.int_loss if b.int_loss is not None else -b.target_prob
    take = (b.success & ~a.success) | ((b.success == a.success) & torch.where(a.success, lb < la,
                                                                              b.target_prob > a.target_prob))
    pick = lambda u, v: torch.where(take, v, u)  # noqa: E731
    loss = None if a.int_loss is None else pick(a.int_loss, b.int_loss)
    return AttackResult(torch.where(expand_like(take, a.x_adv), b.x_adv, a.x_adv), a.target, pick(a.success, b.success),
                        pick(a.target_prob, b.target_prob), loss, a.seconds + b.seconds, a.steps + b.steps)


@ATTACKS.register("adaptive_detector")
def adaptive_detector(framework: str = "pgd", interpreter: Any = ("cam", "grad"), *, detector: nn.Module,
                      detector_weight: float = 1.0, product: bool | Sequence[int] = False, **options: Any) -> ADV2:
    """Detector-aware ADV2 (module docstring): ``interpreter`` lists the interpreters the detector reads, in order."""
    opts = _options(framework, interpreter, options)
    inner = make_term(list(interpreter), term_options=opts.pop("term_options", None),
                      interpreter_options=opts.get("interpreter_options"))
    return ADV2(DetectorAwareTerm(inner, detector, detector_weight, product), framework, **opts)


adaptive_detector.adaptive = True  # type: ignore[attr-defined]  # knows the defence: not a battery's plain attack


@ATTACKS.register("adaptive_rts")
def adaptive_rts(framework: str = "pgd", interpreter: Any = None, *, restarts: int = 4, enc_weight: float = 0.2,
                 **options: Any) -> Restarts:
    """ADV2 against an RTS interpreter (``interpreter``: an :class:`RTSInterpreter`): plain ADV2, then ``restarts`` runs
    with a heavier encoder term (the first from the benign input, the others from random starts where the threat
    model has one); per input the successful run whose RTS map is closest to the benign map is kept (L1, the
    defender's figure), so on the inputs plain ADV2 reaches it is never weaker than plain ADV2."""
    if not isinstance(interpreter, RTSInterpreter):
        raise ValueError("adaptive_rts attacks an RTS interpreter: pass interpreter=RTSInterpreter(network)")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    g = RTSInterpreter(interpreter.network, enc_weight=enc_weight)
    seed = int(options.pop("seed", 0))
    runs = [ADV2(interpreter, framework, **_options(framework, interpreter, dict(options, seed=seed)))]
    for r in range(restarts):
        opts = dict(options, seed=seed + r)
        if "random_start" in threat_options(framework):
            opts["random_start"] = r > 0
        runs.append(ADV2(g, framework, **_options(framework, g, opts)))
    return Restarts(runs, select_by_map=True)


adaptive_rts.adaptive = True  # type: ignore[attr-defined]
