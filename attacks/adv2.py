"""One engine for PGD / C&W / StAdv attacks, ADV2 and AdvEdge / AdvEdge+ (ADV2 Eqn 3-4, AdvEdge Eqn 10-15).

Stage 1 (warm start) runs the plain attack on the classifier; stage 2 (joint) minimises

    l_prd(f(x), y_t) + c(t) * l_int(g(x), m_t) + penalty(x)

with a linear ``c`` schedule. Losses are evaluated on the uint8-quantised iterate (straight-through),
so the best iterate kept per example (target class with probability >= ``confidence``, smallest map
loss) is a real image. AdvEdge weights every step / perturbation / flow by the Sobel edges of the benign
image; AdvEdge+ by their binarisation. The engine asks the interpreter for its term
(:meth:`~attacks.interpreters.Interpreter.attack_term`) and reads the term's and the threat model's capabilities;
it never asks what type either is. Everything is batched; no per-example Python loop, no host sync except an
optional all-finished check every ``check_every`` steps.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base_attack import Attack, AttackResult
from .checks import check_images, check_labels, check_positive
from .edges import edge_weights
from .frameworks import ThreatModel, get_framework
from .interpreters import Interpreter, get_interpreter
from .optim import expand_like
from .state import flush_denormals, frozen
from .terms import EnsembleTerm, InterpretationTerm

__all__ = ["ADV2", "AttackResult", "make_term", "random_targets", "AUTOCAST"]

AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_targets(labels: Tensor, num_classes: int, generator: torch.Generator | None = None,
                   shard: tuple[int, int] = (0, 1)) -> Tensor:
    """A target class different from ``labels`` for every example, drawn uniformly (seeded).

    ``shard=(rank, world)``: ``labels`` are rows ``rank::world`` of a global batch; the draw is made for the whole
    global batch and this shard's rows are kept, so the targets do not depend on how the batch was split."""
    rank, world = shard
    off = torch.randint(1, num_classes, (labels.shape[0] * world,), generator=generator, device="cpu")
    return (labels + off[rank::world].to(labels.device)) % num_classes


def _soft_targets(y_t: Tensor, k: int, rho: float, gen: torch.Generator | None) -> Tensor:
    """Label smoothing of ADV2 section 3.6: ``y_t ~ U(1 - rho, 1)``, the rest spread over the other K-1 classes."""
    u = 1 - rho * torch.rand(y_t.shape[0], generator=gen, device="cpu").to(y_t.device)
    soft = ((1 - u) / (k - 1)).unsqueeze(1).expand(-1, k).clone()
    soft.scatter_(1, y_t.view(-1, 1), u.view(-1, 1))
    return soft


def make_term(interpreter: str | Interpreter | InterpretationTerm | Sequence[str | Interpreter], *,
              term_options: dict[str, dict] | None = None,
              interpreter_options: dict[str, dict] | None = None) -> InterpretationTerm:
    """The interpreter's own ADV2 term (the ensemble term for a list). ``term_options[name]`` go to that interpreter's
    :meth:`attack_term`; ``interpreter_options[name]`` build an interpreter given by name."""
    if isinstance(interpreter, InterpretationTerm):  # a term built by the caller (adaptive attacks)
        return interpreter
    if isinstance(interpreter, (list, tuple)):
        if len(interpreter) != 1:
            return EnsembleTerm([make_term(i, term_options=term_options, interpreter_options=interpreter_options)
                                 for i in interpreter])
        interpreter = interpreter[0]
    opts = (interpreter_options or {}).get(str(interpreter), {}) if isinstance(interpreter, str) else {}
    g = get_interpreter(interpreter, **opts)
    return g.attack_term(**(term_options or {}).get(g.name, {}))


class _Best:
    """Per-example best iterate, updated with tensor ops only."""

    def __init__(self, x: Tensor) -> None:
        n = x.shape[0]
        self.x = x.detach().clone()
        self.success = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.score = torch.full((n,), float("inf"), device=x.device)
        self.prob = torch.full((n,), -1.0, device=x.device)

    def restart(self) -> _Best:
        """Keep the iterate and its success as a fallback, forget its score (a new stage scores anew)."""
        fresh = _Best(self.x)
        fresh.success, fresh.prob = self.success.clone(), self.prob.clone()
        return fresh

    def update(self, xq: Tensor, success: Tensor, score: Tensor, prob: Tensor) -> None:
        better_ok = success & (~self.success | (score < self.score))
        better_fail = ~success & ~self.success & (prob > self.prob)
        upd = better_ok | better_fail
        self.x = torch.where(expand_like(upd, xq), xq.detach(), self.x)
        self.score = torch.where(better_ok, score, self.score)
        self.prob = torch.where(upd, prob, self.prob)
        self.success = self.success | success


class ADV2(Attack):
    """Targeted attack on an IDLS (classifier + interpreter); ``interpreter=None`` gives the plain attack.

    Args:
        interpreter: name / instance, a list of them (adaptive ensemble), or ``None`` (plain attack).
        framework: ``"pgd"``, ``"cw"``, ``"stadv"`` or a :class:`ThreatModel`; ``framework_options`` go to it.
        edge: ``None`` (ADV2), ``"soft"`` (AdvEdge) or ``"binary"`` (AdvEdge+, threshold ``edge_threshold``).
        edge_stages: ``"all"`` (the paper) or ``"warm"`` (the public notebooks: warm start only).
        warm_steps, steps: iterations of the warm start and of the joint stage.
        c, c_end: interpretation-loss weight, linearly annealed from ``c`` to ``c_end`` (default constant).
        confidence: minimum target probability for an iterate to count as a success.
        smoothing: ``(rho_start, rho_end)`` label smoothing of l_prd; ``"auto"`` = (0.05, 0.01) where the term asks
            for it (GRAD), else none.
        term_options: ``{interpreter name: options of its attack_term}`` (GRAD ``tau``; MASK ``inner_steps``,
            ``lookahead_lr``, ``reset_every``, ...).
        interpreter_options: ``{interpreter name: constructor options}`` for interpreters given by name.
        mask_search_steps, mask_alpha_max: the per-image binary search of the step size, for terms that want it
            (MASK) on threat models that support it (PGD).
        early_stop: freeze examples of the *plain* attack once they succeed.
        seed: seeds random starts and label smoothing.
        autocast: ``None`` (float32) or ``"bf16"`` / ``"fp16"``: forward passes of the classifier and interpreter
            terms under ``torch.autocast`` on the input's device (GPU mixed precision); the perturbation, the step,
            the projection and the quantised best iterate stay float32.

    Example::

        attack = ADV2("cam", "pgd", framework_options={"eps": 8 / 255, "alpha": 1 / 255}, warm_steps=60, steps=80,
                      c=20.0)
        res = attack(model, x, target_classes)      # res.x_adv on the uint8 grid, res.success, res.target_prob
    """

    def __init__(self, interpreter: str | Interpreter | Sequence[str | Interpreter] | None = "cam",
                 framework: str | ThreatModel = "pgd", *, framework_options: dict[str, Any] | None = None,
                 edge: str | None = None, edge_threshold: float = 0.1, edge_stages: str = "all",
                 warm_steps: int = 300, steps: int = 300, c: float = 1.0, c_end: float | None = None,
                 confidence: float = 0.0, smoothing: tuple[float, float] | str | None = "auto",
                 term_options: dict[str, dict] | None = None, interpreter_options: dict[str, dict] | None = None,
                 mask_search_steps: int = 4, mask_alpha_max: float | None = None,
                 early_stop: bool = False, check_every: int = 50, seed: int = 0,
                 progress: Callable[[int], None] | None = None, autocast: str | None = None) -> None:
        self._check(autocast, edge, edge_stages, warm_steps, steps, c, confidence)
        self.autocast = autocast
        self.threat = get_framework(framework, **(framework_options or {}))
        self.threat.check_grid_budget()
        self.term: InterpretationTerm | None = None
        if interpreter is not None:
            self.term = make_term(interpreter, term_options=term_options, interpreter_options=interpreter_options)
        self.edge, self.edge_threshold, self.edge_stages = edge, edge_threshold, edge_stages
        self.warm_steps, self.steps = warm_steps, (steps if self.term is not None else 0)
        self.c, self.c_end, self.confidence = c, (c if c_end is None else c_end), confidence
        if smoothing == "auto":
            smoothing = (0.05, 0.01) if self.term is not None and self.term.wants_label_smoothing else None
        self.smoothing = smoothing
        self.mask_search_steps = mask_search_steps
        self.mask_alpha_max = mask_alpha_max
        self.early_stop, self.check_every, self.seed = early_stop, check_every, seed
        self.progress = progress

    @staticmethod
    def _check(autocast, edge, edge_stages, warm_steps, steps, c, confidence) -> None:
        if autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {sorted(k for k in AUTOCAST if k)} or None, got {autocast!r}")
        if edge not in (None, "soft", "binary"):
            raise ValueError(f"unknown edge mode {edge!r}; choose None, 'soft' or 'binary'")
        if edge_stages not in ("all", "warm"):
            raise ValueError(f"edge_stages must be 'all' or 'warm', got {edge_stages!r}")
        if warm_steps < 0 or steps < 0:
            raise ValueError(f"warm_steps and steps must be >= 0, got {warm_steps} and {steps}")
        check_positive(c, "c", allow_zero=True)
        if not 0 <= confidence < 1:
            raise ValueError(f"confidence must lie in [0, 1), got {confidence}")

    def _amp(self, x: Tensor):
        """``torch.autocast`` on ``x``'s device when mixed precision is on, else a no-op context."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=AUTOCAST[self.autocast])

    def _networks(self) -> list[nn.Module]:
        """Trainable networks inside the attacked interpreters (RTS): frozen and restored like the classifier."""
        return [] if self.term is None else self.term.networks()

    @property
    def budget(self) -> dict[str, Any]:
        """The threat model's budget (framework, eps, ...), the warm-start and joint steps, one run, and the
        interpretation-loss weight where there is a term (``c``, and ``c_end`` when it is ramped)."""
        out = {**self.threat.budget, "warm_steps": int(self.warm_steps), "steps": int(self.steps), "restarts": 1}
        if self.term is None:
            return out
        ramp = {"c_end": float(self.c_end)} if self.c_end != self.c else {}
        return {**out, "c": float(self.c), **ramp}

    def c_at(self, frac: float) -> float:
        """The interpretation-loss weight at fraction ``frac`` of the joint stage (0: its first step, 1: its last):
        ``c`` ramped linearly to ``c_end`` (the official ADV2 scripts ramp 5 -> 10)."""
        return self.c + frac * (self.c_end - self.c)

    @property
    def interpreter(self) -> Interpreter | None:
        return None if self.term is None else self.term.interpreter

    @property
    def searches_step(self) -> bool:
        """Whether the joint stage runs the per-image step-size search (the term wants it, the threat supports it)."""
        return (self.term is not None and self.term.wants_step_search and self.threat.supports_step_search
                and bool(self.mask_search_steps))

    def target_maps(self, model: nn.Module, x: Tensor, cls: Tensor | None = None) -> Tensor:
        """Benign maps (the stealthy default target) of ``x`` for class ``cls`` (default: prediction)."""
        if self.term is None:
            raise ValueError("a plain attack has no interpreter and no target map")
        with frozen(model, *self._networks()):
            if cls is None:
                cls = model(x).argmax(1)
            return self.term.target_map(model, x, cls)

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor, target_map: Tensor | None = None) -> AttackResult:
        check_images(x)
        k = getattr(model, "num_classes", None)
        if k is None:
            with torch.no_grad():
                k = model(x[:1]).shape[1]
        check_labels(target, k, x.shape[0], name="target classes")
        start = time.perf_counter()
        x0 = x.detach().clone()
        y_t = target.detach().to(x.device).clone()
        gen = torch.Generator().manual_seed(self.seed)
        with frozen(model, *self._networks()), flush_denormals():
            m_t = None
            if self.term is not None:
                m_t = self.target_maps(model, x0) if target_map is None else target_map.detach().to(x0.device)
            weight = edge_weights(x0, self.edge, self.edge_threshold)
            z = self.threat.init(x0, gen, weight)  # AdvEdge: a random start is edge-weighted like every step
            best = _Best(self.threat.quantise(x0, self.threat.apply(x0, z, None)))
            z = self._stage(model, x0, y_t, z, weight, self.warm_steps, None, None, best, gen, k)
            if self.steps:
                joint_weight = weight if self.edge_stages == "all" else None
                best = best.restart()  # the joint stage selects by map loss; the warm result stays a fallback
                z = self._stage(model, x0, y_t, z, joint_weight, self.steps, self.term, m_t, best, gen, k)
            with torch.no_grad():
                probs = model(best.x).softmax(1)
        p_t = probs.gather(1, y_t.view(-1, 1)).squeeze(1)
        success = (probs.argmax(1) == y_t) & (p_t >= self.confidence)
        return AttackResult(best.x, y_t, success, p_t, best.score if self.steps else None,
                            time.perf_counter() - start, self.warm_steps + self.steps)

    # ------------------------------------------------------------------------------------------------ one stage
    def _loss(self, model, x0, xq, x, z, y_t, term, m_t, state, frac, gen, k) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(loss, logits, l_int)`` of one iterate: prediction loss (label-smoothed where the term wants it),
        the threat model's penalty and the annealed interpretation term."""
        with self._amp(x0):
            l_int, logits = (None, None) if term is None else term.loss_and_logits(model, xq, y_t, m_t, state)
            if logits is None:
                logits = model(xq)
        logits = logits.float()
        l_int = None if l_int is None else l_int.float()
        if term is not None and self.smoothing is not None:
            rho = self.smoothing[0] + frac * (self.smoothing[1] - self.smoothing[0])
            l_prd = -(_soft_targets(y_t, k, rho, gen) * F.log_softmax(logits, 1)).sum(1)
        else:
            l_prd = F.cross_entropy(logits, y_t, reduction="none")
        loss = l_prd + self.threat.penalty(x0, x, z)
        if l_int is not None:
            loss = loss + self.c_at(frac) * l_int
        return loss, logits, l_int

    def _success(self, logits: Tensor, y_t: Tensor) -> tuple[Tensor, Tensor]:
        probs = logits.detach().float().softmax(1)
        p_t = probs.gather(1, y_t.view(-1, 1)).squeeze(1)
        return (probs.argmax(1) == y_t) & (p_t >= self.confidence), p_t

    def _stage(self, model, x0, y_t, z, weight, n_steps, term, m_t, best, gen, k) -> Tensor:
        if n_steps == 0:
            return z
        self.threat.start(x0)
        active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
        state = term.init(model, self.threat.apply(x0, z, weight).detach(), y_t, m_t) if term is not None else None
        search = term is not None and self.searches_step
        for i in range(n_steps):
            z = z.detach().requires_grad_(True)
            x = self.threat.apply(x0, z, weight)
            xq = x + (self.threat.quantise(x0, x) - x).detach()
            loss, logits, l_int = self._loss(model, x0, xq, x, z, y_t, term, m_t, state, i / max(n_steps - 1, 1), gen, k)
            (g,) = torch.autograd.grad(loss.sum(), z)
            with torch.no_grad():
                success, p_t = self._success(logits, y_t)
                score = l_int.detach() if l_int is not None else -p_t
                if term is not None and term.selects_on_refresh:
                    score = torch.full_like(p_t, float("inf"))  # scored at refresh on the real map
                best.update(xq.detach(), success, score, p_t)
                if term is None and self.early_stop:
                    active = active & ~success
                alpha = self._search_step(model, x0, y_t, z.detach(), g, active, weight, p_t) if search else None
                z = self.threat.project(x0, self.threat.step(z, g, active, weight, **(
                    {"alpha": alpha} if alpha is not None else {})))
            if term is not None:
                self._refresh(model, x0, y_t, z, weight, term, m_t, state, best, i)
            if self.progress is not None:
                self.progress(1)
            if term is None and self.early_stop and (i + 1) % self.check_every == 0 and not bool(active.any()):
                break  # one host sync every `check_every` steps
        self._finish(model, x0, y_t, z, weight, term, m_t, state, best)
        return z.detach()

    def _finish(self, model, x0, y_t, z, weight, term, m_t, state, best) -> None:
        """Score the final iterate too (the plain attack on its probability, a term at its last refresh)."""
        with torch.no_grad():
            xq = self.threat.quantise(x0, self.threat.apply(x0, z, weight))
            success, p_t = self._success(model(xq), y_t)
            if term is None:
                best.update(xq, success, -p_t, p_t)
        if term is not None:
            self._refresh(model, x0, y_t, z, weight, term, m_t, state, best, None)

    def _refresh(self, model, x0, y_t, z, weight, term, m_t, state, best, step) -> None:
        """Let the term update its state; score the iterate when the term measured the real map."""
        xq = self.threat.quantise(x0, self.threat.apply(x0, z, weight)).detach()
        with self._amp(x0):
            term.refresh(model, xq, y_t, m_t, state, step)
        sel = state.pop("selection_loss", None)
        if sel is not None:
            with torch.no_grad():
                success, p_t = self._success(model(xq), y_t)
            best.update(xq, success, sel, p_t)

    def _search_step(self, model, x0, y_t, z, g, active, weight, p_now: Tensor) -> Tensor:
        """Per-image binary search for the largest sign step keeping ``p_t >= max(confidence, 0.5 p_t now)``
        (``p_now``: the target probability of the current iterate, from this step's forward pass)."""
        threat = self.threat
        n = x0.shape[0]
        hi = torch.full((n,), self.mask_alpha_max or 2 * threat.alpha, device=x0.device)
        lo = torch.zeros(n, device=x0.device)
        floor = torch.clamp(0.5 * p_now, min=self.confidence)
        for _ in range(self.mask_search_steps):
            mid = (lo + hi) / 2
            z_try = threat.project(x0, threat.step(z, g, active, weight, alpha=mid))
            with self._amp(x0):
                p = model(threat.apply(x0, z_try, weight)).float().softmax(1).gather(1, y_t.view(-1, 1)).squeeze(1)
            ok = p >= floor
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok, hi, mid)
        return torch.clamp(lo, min=0.25 * threat.alpha)
