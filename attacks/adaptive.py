"""Adaptive attacks: an attacker who knows the defence (Carlini & Wagner 2017; Tramer et al. 2020).

- :class:`DetectorAwareTerm` / attack ``"adaptive_detector"``: ADV2 against the ensemble of the interpreters a
  multi-interpreter detector reads, plus a differentiable stand-in of the detector's score on the stacked maps (the
  booster has no gradient; ``defend`` passes the booster's distilled surrogate, or the trunk's cross-entropy head).
  Success against the real detector is judged by the caller (``defend``), with the booster at its threshold.
- :class:`Restarts` / attack ``"adaptive_rts"``: the best per input, by the defender's figure (map L1 to the benign
  map, among the runs that reach the target), of plain ADV2 against an (AID-trained) RTS, random restarts with a
  heavier encoder term (the RTS class head in the loss, ADV2 section 3.4), a sweep of ``c``, a longer schedule and
  transfer runs crafted on other RTS networks (:class:`Transfer` / attack ``"transfer_rts"``).
- Against robust classifiers the adaptive attacks are ADV2 / AdvEdge on their CAM and GRAD and on the ensemble of
  both (``build_attack("adv2", "pgd", ["cam", "grad"])``): nothing new is needed.
"""
from __future__ import annotations

import math
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

__all__ = ["DetectorAwareTerm", "Restarts", "Transfer", "map_l1", "stack_channels"]


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


class Transfer(Attack):
    """A transfer attack: ``attack`` (an :class:`ADV2`) crafted against its own (source) interpreter toward the
    source's own benign target maps, read on ``reader`` (an :class:`ADV2` of the defended interpreter, used only for
    its interpreter, its benign maps and its networks). ``int_loss`` of the result is the defended figure: the L1 of
    the reader's map of ``x_adv`` to the target map. Other attributes (threat, confidence, steps, seed) are
    ``attack``'s."""

    def __init__(self, attack: ADV2, reader: ADV2) -> None:
        if attack.term is None or reader.term is None:
            raise ValueError("a transfer attack needs an interpreter on both sides (the source and the reader)")
        self.attack, self.reader = attack, reader

    def __getattr__(self, name: str) -> Any:  # threat, confidence, seed, ...: the crafting attack's
        return getattr(self.__dict__["attack"], name)

    @property
    def budget(self) -> dict[str, Any]:
        return {**self.attack.budget, "transfer_from": self.attack.interpreter.name}

    @property
    def interpreter(self) -> Any:
        """The interpreter the result is read on (the defended one)."""
        return self.reader.interpreter

    def target_maps(self, model: nn.Module, x: Tensor, cls: Tensor | None = None) -> Tensor:
        """Benign maps of the defended interpreter (the reader), not of the source."""
        return self.reader.target_maps(model, x, cls)

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor, target_map: Tensor | None = None) -> AttackResult:
        """Craft on the source (``target_map``, the defended target, is not given to it), score on the reader."""
        res = self.attack(model, x, target)
        if target_map is None:
            target_map = self.reader.target_maps(model, x.detach())
        res.int_loss = map_l1(self.reader, model, res.x_adv, target, target_map)
        return res


def map_l1(reader: ADV2, model: nn.Module, x_adv: Tensor, target: Tensor, target_map: Tensor) -> Tensor:
    """Per input, the mean absolute difference of ``reader``'s measured map of ``x_adv`` (class ``target``) and
    ``target_map`` (the defender's own figure), with the model and the reader's networks frozen."""
    with torch.no_grad(), frozen(model, *reader._networks()):
        m = reader.interpreter.map(model, x_adv, target)
    return (m - target_map.to(m.device)).abs().flatten(1).mean(1)


class Restarts(Attack):
    """The best of several runs (``attacks``: the same attack from different starts / seeds, other weights, other
    schedules, transfer runs): per input a successful run before a failed one; among successful runs the one with the
    lowest interpretation loss, or with ``select_by_map`` the one whose map (the first run's interpreter, as measured)
    is closest in L1 to the target map (the defender's own figure, whatever each run's loss weighed); among failed
    runs the highest target probability. Same interface as :class:`ADV2` (its other attributes are the first run's).

    ``names`` name the runs (:attr:`run_names`); after a call, :attr:`last_choice` holds per input the index of the run
    kept. The budget is the first run's with the number of runs (``restarts``) and ``components`` (what the runs are).
    """

    def __init__(self, attacks: Sequence[ADV2 | Transfer], select_by_map: bool = False,
                 names: Sequence[str] | None = None, components: dict[str, Any] | None = None) -> None:
        if not attacks:
            raise ValueError("Restarts needs at least one attack")
        if isinstance(attacks[0], Transfer):
            raise ValueError("the first run of Restarts reads the defended interpreter: it cannot be a Transfer")
        if not select_by_map and any(isinstance(a, Transfer) for a in attacks):
            raise ValueError("a Transfer run is scored on the defended map: use Restarts(..., select_by_map=True)")
        names = [f"run{i}" for i in range(len(attacks))] if names is None else [str(n) for n in names]
        if len(names) != len(attacks) or len(set(names)) != len(names):
            raise ValueError(f"Restarts needs one distinct name per run: {len(attacks)} runs, names {names}")
        self.attacks, self.select_by_map, self.run_names = list(attacks), select_by_map, names
        self.components = dict(components or {})
        self.last_choice: Tensor | None = None

    def __getattr__(self, name: str) -> Any:  # threat, term, target_maps, seed, ...: the first run's
        return getattr(self.__dict__["attacks"][0], name)

    @property
    def budget(self) -> dict[str, Any]:
        out = {**self.attacks[0].budget, "restarts": len(self.attacks), **self.components}
        out.pop("random_start", None)
        return out

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor, target_map: Tensor | None = None) -> AttackResult:
        first = self.attacks[0]
        if target_map is None and first.term is not None:
            target_map = first.target_maps(model, x.detach())  # one target for every run
        best, choice = None, None
        for i, attack in enumerate(self.attacks):
            res = attack(model, x, target, target_map)
            if self.select_by_map and target_map is not None:
                res.int_loss = map_l1(first, model, res.x_adv, target, target_map)
            if best is None:
                best, choice = res, torch.zeros(x.shape[0], dtype=torch.long, device=res.x_adv.device)
                continue
            take = _takes(best, res)
            best, choice = _merge(best, res, take), torch.where(take, i, choice)
        self.last_choice = choice
        return best

    def wins(self, among: Tensor | None = None) -> dict[str, int]:
        """How often each run was kept in the last call (``among``: a boolean mask of the inputs to count)."""
        if self.last_choice is None:
            raise ValueError("Restarts.wins() reads the last call: run the attack first")
        kept = self.last_choice if among is None else self.last_choice[among.to(self.last_choice.device)]
        counts = torch.bincount(kept.cpu(), minlength=len(self.run_names)).tolist()
        return dict(zip(self.run_names, counts))


def _takes(a: AttackResult, b: AttackResult) -> Tensor:
    """Per input, whether ``b`` beats ``a`` (success first, then the lower interpretation loss / higher probability)."""
    la = a.int_loss if a.int_loss is not None else -a.target_prob
    lb = b.int_loss if b.int_loss is not None else -b.target_prob
    return (b.success & ~a.success) | ((b.success == a.success) & torch.where(a.success, lb < la,
                                                                              b.target_prob > a.target_prob))


def _merge(a: AttackResult, b: AttackResult, take: Tensor) -> AttackResult:
    """Per input, ``b`` where ``take`` else ``a``."""
    pick = lambda u, v: torch.where(take, v, u)  # noqa: E731
    loss = None if a.int_loss is None or b.int_loss is None else pick(a.int_loss, b.int_loss)
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
                 c_values: Sequence[float] = (), long_factor: float = 1.0, sources: Sequence[RTSInterpreter] = (),
                 **options: Any) -> Restarts:
    """The strongest ADV2 we have against an RTS interpreter (``interpreter``: an :class:`RTSInterpreter`), the best
    per input of these runs (:attr:`Restarts.run_names`):

    - ``adv2``: plain ADV2 (the options as given);
    - ``enc``, ``enc_r1``, ...: ``restarts`` runs with the heavier encoder term ``enc_weight`` (the first from the
      benign input, the others from random starts where the threat model has one);
    - ``c=<v>``: one heavier-encoder run per value of ``c_values`` (constant ``c``, from the benign input);
    - ``long x<F>``: with ``long_factor`` > 1, plain ADV2 with ``warm_steps`` and ``steps`` multiplied by it (ceil), so
      the result is never weaker than the longer plain ADV2 either;
    - ``transfer[i]``: ADV2 crafted against ``sources[i]`` (another RTS: its own benign target maps, the same options),
      read on the defended RTS (:class:`Transfer`).

    Per input the successful run whose defended RTS map is closest (L1, as measured: the defender's figure) to the
    target map is kept, a failed one only where none succeeds: on the inputs plain ADV2 reaches, it is never weaker."""
    _check_rts_options(interpreter, restarts, c_values, long_factor, sources)
    g = RTSInterpreter(interpreter.network, enc_weight=enc_weight)
    seed = int(options.pop("seed", 0))

    def build(interp: RTSInterpreter, **over: Any) -> ADV2:
        return ADV2(interp, framework, **_options(framework, interp, {**options, "seed": seed, **over}))

    runs, names = [build(interpreter)], ["adv2"]
    for r in range(restarts):
        runs.append(build(g, seed=seed + r, **_start(framework, random=r > 0)))
        names.append("enc" if r == 0 else f"enc_r{r}")
    for value in c_values:
        runs.append(build(g, c=float(value), c_end=None, **_start(framework, random=False)))
        names.append(f"c={float(value):g}")
    if long_factor > 1:
        runs.append(build(interpreter, warm_steps=math.ceil(runs[0].warm_steps * long_factor),
                          steps=math.ceil(runs[0].steps * long_factor)))
        names.append(f"long x{float(long_factor):g}")
    for i, source in enumerate(sources):
        runs.append(Transfer(build(source), runs[0]))
        names.append(f"transfer[{i}]")
    components = {"enc_restarts": int(restarts), "enc_weight": float(enc_weight),
                  "c_values": [float(v) for v in c_values], "long_factor": float(long_factor),
                  "sources": len(sources), "runs": list(names)}
    return Restarts(runs, select_by_map=True, names=names, components=components)


adaptive_rts.adaptive = True  # type: ignore[attr-defined]


def _start(framework: str, random: bool) -> dict[str, Any]:
    """The option that starts a run at random or from the benign input, where the threat model has a random start."""
    return {"random_start": random} if "random_start" in threat_options(framework) else {}


def _check_rts_options(interpreter: Any, restarts: int, c_values: Sequence[float], long_factor: float,
                       sources: Sequence[Any]) -> None:
    """One-line refusals of :func:`adaptive_rts`'s options, before any run is built."""
    if not isinstance(interpreter, RTSInterpreter):
        raise ValueError("adaptive_rts attacks an RTS interpreter: pass interpreter=RTSInterpreter(network)")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if not _is_list(c_values) or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                         for v in c_values):
        raise ValueError(f"c_values must be a list of finite numbers >= 0 (one run per c), got {c_values!r}")
    if len({float(v) for v in c_values}) != len(c_values):
        raise ValueError(f"c_values lists a value twice ({list(c_values)}): list each c once")
    if not (isinstance(long_factor, (int, float)) and math.isfinite(long_factor) and long_factor >= 1):
        raise ValueError(f"long_factor must be a finite number >= 1 (1: no longer run), got {long_factor!r}")
    if not _is_list(sources) or not all(isinstance(s, RTSInterpreter) for s in sources):
        raise ValueError(f"sources must be a list of RTS interpreters (sources=[RTSInterpreter(other_network)]), "
                         f"got {sources!r}")


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


@ATTACKS.register("transfer_rts")
def transfer_rts(framework: str = "pgd", interpreter: Any = None, *, source: RTSInterpreter | None = None,
                 **options: Any) -> Transfer:
    """ADV2 crafted against ``source`` (an RTS: its own benign target maps), read on ``interpreter`` (the defended
    RTS): the transfer attack of :func:`adaptive_rts` as a row of its own."""
    if not isinstance(interpreter, RTSInterpreter) or not isinstance(source, RTSInterpreter):
        raise ValueError("transfer_rts crafts on one RTS and reads another: pass interpreter=RTSInterpreter(defended) "
                         "and source=RTSInterpreter(other_network)")
    reader = ADV2(interpreter, framework, **_options(framework, interpreter, dict(options)))
    return Transfer(ADV2(source, framework, **_options(framework, source, dict(options))), reader)


transfer_rts.adaptive = True  # type: ignore[attr-defined]
