"""The battery of ``defend evaluate``: what is measured, on how many inputs, with which budgets (a typed config).

Parsed like the experiment configs (jsonargparse on the dataclasses below): unknown or misspelt keys, wrong types,
NaN / negative radii and zero counts are one-line errors with a did-you-mean, before anything runs. Radii are in image
units ([0, 1]); ``8/255`` is accepted and exact. ``configs/evaluate/quick.yaml`` (a CPU smoke run),
``configs/evaluate/standard.yaml`` (the defaults below, for real runs) and ``configs/evaluate/paper.yaml`` (the standard
battery with ADV2's official budgets, ``attacks.attack_preset: paper``) are the named batteries, with the frozen
IDLS-Bench protocols ``configs/evaluate/bench-v1.yaml`` and its CPU smoke version ``bench-v1-quick.yaml``
(:mod:`defend.evaluate.protocol` pins their hashes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from attacks import FRAMEWORKS, INTERPRETERS, interpretation_attacks

from ..attack_options import AttackOptions, layered_options
from ..detector_sweep import DEFAULT_WEIGHTS
from ..presets import preset_options
from ..safe_yaml import read_mapping
from ..typed_config import check_names, parse_typed
from ..types import Count, NonNegative, Positive, PositiveCount, Radius

__all__ = ["Battery", "CertifyBattery", "AutoAttackBattery", "TopKBattery", "AttackBattery", "AdaptiveBattery", "DetectorBattery",
           "BATTERIES", "battery_path", "battery_mapping", "parse_battery", "load_battery"]

#: named batteries: ``configs/evaluate/<name>.yaml`` of the source tree
BATTERIES = ("quick", "standard", "paper", "bench-v1", "bench-v1-quick")
_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "evaluate"



@dataclass
class AutoAttackBattery:
    """Robust accuracy under AutoAttack (standard version, L-inf) at each radius of ``eps`` (empty: skipped) on the
    first ``n`` test inputs, or on all of them where the test split has fewer (the row's ``n`` records how many were
    measured; bench-v1's ``n: 1000`` means "the first 1,000 or all"), RobustBench's way (a clean error counts as a
    failure), with the accuracy on the correctly classified ones among them beside it."""

    eps: list[Radius] = field(default_factory=lambda: [Radius("4/255"), Radius("8/255")])
    n: PositiveCount = PositiveCount(100)


@dataclass
class TopKBattery:
    """Interpretation robustness under a top-k attack: for each of ``interpreters`` (``rts`` is added when an RTS is
    evaluated and ``with_rts``), PGD of ``steps`` steps in the ``eps`` ball lowering the map on the benign top-``k``
    pixels, scored by Kendall's tau, Spearman's rho and the top-k intersection at ``ks`` (native map grid), over the
    inputs whose prediction the attack did not change. ``protocol``: ``ghorbani`` (our variant,
    :class:`attacks.TopKAttack`: normalised top-k mass + kappa hinge, benign start, best iterate, ``restarts``, the
    prediction explained) or ``boopathy`` (Boopathy et al.'s ``eval.py`` ``aai_topk``,
    :class:`attacks.topk.ReferenceTopKAttack`: raw-map top-k sum, random start, signed steps of 0.01, final iterate,
    the true label explained; ``restarts`` unused). Empty ``interpreters``: skipped."""

    protocol: Literal["ghorbani", "boopathy"] = "ghorbani"
    interpreters: list[str] = field(default_factory=lambda: ["cam", "grad"])
    with_rts: bool = True
    eps: Radius = Radius("8/255")
    steps: PositiveCount = PositiveCount(100)
    k: PositiveCount = PositiveCount(8)
    restarts: PositiveCount = PositiveCount(1)
    ks: list[PositiveCount] = field(default_factory=lambda: [PositiveCount(4), PositiveCount(8), PositiveCount(16)])
    n: PositiveCount | None = None


@dataclass
class AttackBattery:
    """The interpretation attacks: each of ``attacks`` against each of ``interpreters`` (+ ``rts`` when an RTS is
    evaluated) on each of ``frameworks`` (registered threat models: ``pgd``, ``cw``, ``stadv``, ...); every
    adversarial set is also read by the other interpreters (the transfer matrix). ``options``: shared attack options
    (the top-level options a framework declares, PGD's ``eps`` / ``alpha`` / ``random_start``, go to the frameworks
    that declare them; the others take ``framework_options``), ``per_interpreter.<name>``: overrides for one target
    interpreter (unset keys fall through to the attack core's tuned defaults). ``attack_preset``: ``paper`` (the
    official ADV2 budgets) or ``cpu`` (our CPU budgets) sets eps / alpha / warm_steps / steps / c / c_end per target
    interpreter from :data:`defend.presets.ATTACK_PRESETS` (an ensemble takes CAM's) under ``options`` and
    ``per_interpreter``, which still override it; ``null``: eps 8/255 and the core's tuned values."""

    attacks: list[str] = field(default_factory=lambda: ["adv2", "advedge", "advedge_plus"])
    interpreters: list[str] = field(default_factory=lambda: ["cam", "grad"])
    frameworks: list[str] = field(default_factory=lambda: ["pgd"])
    attack_preset: Literal["paper", "cpu"] | None = None
    options: AttackOptions = field(default_factory=AttackOptions)
    per_interpreter: dict[str, AttackOptions] = field(default_factory=dict)

    def options_for(self, framework: str, target: str | None, extra: AttackOptions | None = None) -> dict[str, Any]:
        """The :func:`attacks.build_attack` keywords on ``framework`` against ``target``: the preset (or eps 8/255),
        ``options``, ``per_interpreter.<target>``, ``extra`` (later layers win)."""
        base = (AttackOptions(eps=Radius("8/255")) if self.attack_preset is None
                else AttackOptions(**preset_options(self.attack_preset, target or "cam")))
        layers = [base, self.options, self.per_interpreter.get(target) if target else None, extra]
        return layered_options(framework, *layers)


@dataclass
class AdaptiveBattery:
    """The adaptive attacks (an attacker who knows the defence): ``ensemble`` attacks against the ensemble of
    ``ensemble_interpreters`` at once (always: the adaptive attack for a classifier and its interpreters); with a
    detector, the detector-aware ADV2 (``adaptive_detector``: a differentiable stand-in of the detector's score,
    weight ``detector_weight``, in the loss; success judged by the real detector), the stand-in chosen by
    ``detector_surrogate``: ``distilled`` (the booster's log-odds distilled into a ridge regression on the trunk's
    features, fitted with the booster), ``head`` (the trunk's cross-entropy head) or ``auto`` (distilled when the
    saved detector has it, else the head; the card's budget records which), and the same attack swept over
    ``detector_weights`` (empty: not swept) with ``detector_restarts`` seeded runs per weight, per input the run (or
    the plain ADV2 input) that evades the booster at its 5 %-FPR threshold, then the one closest to benign
    (:mod:`defend.detector_sweep`: the Pareto front, McNemar against plain ADV2, the surrogate's held-out fit; with
    ``detector_budget_check`` the strongest weight again with twice the steps, "budget too small" when that helps;
    the threshold needs ``10 / 0.05 = 200`` development benign inputs, ``detector.n_benign``); with an RTS,
    ``adaptive_rts``
    (plain ADV2, then ``rts_restarts`` runs with encoder weight ``rts_enc_weight``, one run per ``c`` of
    ``rts_c_values``, with ``rts_long_factor`` > 1 a plain run that many times longer; per input the successful run
    whose map is closest to the benign map). ``options`` override the attack options of
    :class:`AttackBattery` for these attacks."""

    ensemble: list[str] = field(default_factory=lambda: ["adv2", "advedge"])
    ensemble_interpreters: list[str] = field(default_factory=lambda: ["cam", "grad"])
    detector_weight: NonNegative = NonNegative(1.0)
    detector_surrogate: Literal["auto", "distilled", "head"] = "auto"
    detector_weights: list[NonNegative] = field(default_factory=lambda: [NonNegative(w) for w in DEFAULT_WEIGHTS])
    detector_restarts: PositiveCount = PositiveCount(2)
    detector_budget_check: bool = True
    rts_restarts: PositiveCount = PositiveCount(3)
    rts_enc_weight: NonNegative = NonNegative(0.2)
    rts_c_values: list[NonNegative] = field(default_factory=list)
    rts_long_factor: Positive = Positive(1.0)
    options: AttackOptions = field(default_factory=AttackOptions)


@dataclass
class DetectorBattery:
    """How the detector given with ``--detector`` reads inputs: the maps of ``interpreters`` (in channel order;
    default: those its ``detector.json`` names, else ``[grad, cam]``) for the predicted class, plus the product of the
    first two when ``product``. ``n_benign`` correctly classified inputs of the development split (default
    ``n_images``) set the 1 % / 5 % FPR thresholds (a threshold at FPR ``f`` needs ``10 / f`` of them, else it is not
    reported) and as many test inputs, other than the attacked ones, give the realised false-positive rate and the
    ROC."""

    interpreters: list[str] | None = None
    product: bool | None = None
    n_benign: PositiveCount | None = None


@dataclass
class CertifyBattery:
    """Randomized-smoothing certificates (:mod:`attacks.certify`, docs/certify.md) on the first ``n_images`` test
    inputs, correctly classified or not (Cohen et al.'s certified accuracy: a wrong or abstained prediction counts as
    not certified; at most the test split's size, the rows' ``n`` says how many): CERTIFY of the prediction with
    ``n0`` selection and ``n`` estimation samples of N(0, ``sigma``^2 I) noise at level ``alpha``, and per interpreter
    of ``interpreters`` (``rts`` is added when an RTS is evaluated and ``with_rts``) the certificate of each pixel's
    "in the top ``k_percent`` % of the map" label (``correction``: ``holm`` or ``bonferroni`` over the pixels); an
    input is dual-certified at r when its prediction is certified correct at r and at least ``share`` of its top-k
    pixels are certified at r. ``radii``: the L2 radii (image units) the figures are read at. ``samples_per_batch``
    noisy copies per forward pass. Not part of the protocol hash (:mod:`defend.evaluate.protocol`)."""

    sigma: Positive = Positive(0.25)
    n0: PositiveCount = PositiveCount(100)
    n: PositiveCount = PositiveCount(1000)
    alpha: Positive = Positive(0.001)
    k_percent: Positive = Positive(10.0)
    correction: Literal["holm", "bonferroni"] = "holm"
    share: Positive = Positive(0.9)
    radii: list[NonNegative] = field(default_factory=lambda: [NonNegative(r) for r in (0.0, 0.25, 0.5, 0.75, 1.0)])
    n_images: PositiveCount = PositiveCount(100)
    interpreters: list[str] = field(default_factory=lambda: ["cam"])
    with_rts: bool = True
    samples_per_batch: PositiveCount = PositiveCount(500)


@dataclass
class Battery:
    """Everything ``defend evaluate`` measures. ``n_images`` correctly classified test inputs (a seeded random target
    class each) are attacked in batches of ``batch_size``; clean accuracy is over the first ``clean_n`` test inputs
    (``null``: the whole test split); ``n_figure`` examples go into ``maps.png``. ``interpreter_options.<name>``:
    constructor options of a named interpreter wherever it is built (attacked, measured, read by the detector),
    e.g. ``{grad_softplus: {beta: 2.0}}``. ``certify``: randomized-smoothing certificates (:class:`CertifyBattery`;
    ``null``: not measured)."""

    name: str = "custom"
    n_images: PositiveCount = PositiveCount(100)
    batch_size: PositiveCount = PositiveCount(50)
    seed: Count = Count(0)
    clean_n: PositiveCount | None = None
    n_figure: Count = Count(3)
    autoattack: AutoAttackBattery = field(default_factory=AutoAttackBattery)
    topk: TopKBattery = field(default_factory=TopKBattery)
    attacks: AttackBattery = field(default_factory=AttackBattery)
    adaptive: AdaptiveBattery = field(default_factory=AdaptiveBattery)
    detector: DetectorBattery = field(default_factory=DetectorBattery)
    interpreter_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    certify: CertifyBattery | None = None


def check_battery(b: Battery) -> None:
    """Cross-field checks (names registered, counts that fit together)."""
    for names, where in ((b.topk.interpreters, "topk.interpreters"), (b.attacks.interpreters, "attacks.interpreters"),
                         (b.adaptive.ensemble_interpreters, "adaptive.ensemble_interpreters"),
                         (list(b.attacks.per_interpreter), "attacks.per_interpreter"),
                         (list(b.interpreter_options), "interpreter_options"),
                         (b.detector.interpreters or [], "detector.interpreters")):
        if names:
            check_names(list(names), INTERPRETERS, where)
    for name, opts in b.interpreter_options.items():
        if name != "rts":  # RTS is built around the network given with --rts
            try:
                INTERPRETERS.build(name, **opts)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"interpreter_options.{name}: {exc}") from None
    if "rts" in b.attacks.interpreters or "rts" in b.topk.interpreters:
        raise ValueError("do not list 'rts' in attacks.interpreters / topk.interpreters: it is added when --rts is given")
    check_names(list(b.attacks.frameworks), FRAMEWORKS, "attacks.frameworks")
    check_names(list(b.attacks.attacks), interpretation_attacks(), "attacks.attacks", "interpretation attack")
    if b.adaptive.ensemble:
        check_names(list(b.adaptive.ensemble), interpretation_attacks(), "adaptive.ensemble", "interpretation attack")
    if not b.attacks.interpreters:
        raise ValueError("attacks.interpreters is empty; give at least one interpreter, e.g. [cam, grad]")
    if b.adaptive.ensemble and len(set(b.adaptive.ensemble_interpreters)) < 2:
        raise ValueError("adaptive.ensemble_interpreters needs at least two interpreters for the ensemble attack, "
                         f"got {b.adaptive.ensemble_interpreters}")
    if b.n_figure > b.n_images:
        raise ValueError(f"n_figure ({b.n_figure}) cannot exceed n_images ({b.n_images})")
    if b.autoattack.eps and any(float(e) <= 0 for e in b.autoattack.eps):
        raise ValueError(f"autoattack.eps must be positive radii, got {[float(e) for e in b.autoattack.eps]}")
    if b.certify is not None:
        check_certify(b.certify)


def check_certify(c: CertifyBattery) -> None:
    """The ranges of the ``certify`` section (one-line errors naming the key and the fix)."""
    if not float(c.alpha) < 0.5:
        raise ValueError(f"certify.alpha must lie in (0, 0.5) (the error probability of each certificate, e.g. "
                         f"0.001), got {float(c.alpha)}")
    if not float(c.k_percent) < 100:
        raise ValueError(f"certify.k_percent must lie in (0, 100) (the top-k share of the map in %, e.g. 10), got "
                         f"{float(c.k_percent)}")
    if not float(c.share) <= 1:
        raise ValueError(f"certify.share must lie in (0, 1] (the share of top-k pixels a certified map needs, e.g. "
                         f"0.9), got {float(c.share)}")
    radii = [float(r) for r in c.radii]
    if not radii or radii != sorted(radii) or len(set(radii)) != len(radii):
        raise ValueError(f"certify.radii must be distinct L2 radii >= 0 in increasing order, e.g. [0, 0.25, 0.5], "
                         f"got {radii}")
    check_names(list(c.interpreters), INTERPRETERS, "certify.interpreters")
    if "rts" in c.interpreters:
        raise ValueError("do not list 'rts' in certify.interpreters: it is added when --rts is given "
                         "(certify.with_rts)")


def battery_path(spec: str) -> Path:
    """A name of :data:`BATTERIES` -> ``configs/evaluate/<name>.yaml``; any other value is a YAML file's path."""
    if spec in BATTERIES:
        path = _CONFIGS / f"{spec}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"battery '{spec}': {path} is missing (run from a source checkout, or pass "
                                    "--battery FILE.yaml)")
        return path
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--battery: no such file '{spec}' (give {', '.join(BATTERIES)} or a YAML file)")
    return path


def parse_battery(raw: dict[str, Any]) -> tuple[Battery, str]:
    """``raw`` as a checked :class:`Battery` and as YAML with every default filled in."""
    try:
        battery, text = parse_typed(Battery, raw)
    except ValueError as exc:
        if 'key "certify"' in str(exc):
            _certify_error(raw)
        raise ValueError("battery: " + str(exc).replace("config key", "key")) from None
    check_battery(battery)
    if battery.certify is None:  # unset: not written at all, so the resolved battery (and battery.yaml) is as before
        text = "".join(line for line in text.splitlines(keepends=True) if line.rstrip() != "certify: null")
    return battery, text


def _certify_error(raw: dict[str, Any]) -> None:
    """Raise the error of ``raw``'s ``certify`` section parsed alone, naming its key (parsed inside the battery, an
    optional section's error names only ``certify``); nothing when that section is fine."""
    if isinstance(raw.get("certify"), dict):
        try:
            parse_typed(CertifyBattery, raw["certify"])
        except ValueError as exc:
            raise ValueError("battery: " + str(exc).replace('config key "', 'key "certify.')) from None


def load_battery(spec: str, overrides: dict[str, Any] | None = None) -> tuple[Battery, str]:
    """The battery named by ``spec`` (``quick``, ``standard`` or a YAML file) with dotted ``overrides`` applied (a
    scorecard row's; the command line's ``--battery.KEY=VALUE`` are merged by :mod:`defend.frontend`)."""
    raw = battery_mapping(spec)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_battery(raw)


def battery_mapping(spec: str) -> dict[str, Any]:
    """The YAML mapping of the battery ``spec`` names, its ``name`` defaulting to ``spec`` (or the file's stem)."""
    path = battery_path(spec)
    raw = read_mapping(path)
    raw.setdefault("name", spec if spec in BATTERIES else path.stem)
    return raw


def set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """``cfg[a][b][c] = value`` for ``dotted = "a.b.c"`` (missing levels are created)."""
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
