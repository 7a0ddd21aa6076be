"""The result rows of a model card: one dataclass per kind of figure in ``card.json``'s ``results``, each field typed
and documented. They are the single source of the card schema's row definitions (:func:`schema_defs`), the CSV
columns of ``defend evaluate`` (:func:`csv_columns`), the markdown columns of its ``report.md``
(:func:`markdown_headers` / :func:`markdown_cells`) and the field tables of ``docs/card.md`` (:func:`docs_tables`).
A new card column is one field here plus the measuring function that fills it.

A :class:`Fig` field is a figure with its 95 % interval: it serialises as ``<name>``, ``<name>_ci_low``,
``<name>_ci_high``. ``python -m defend.rows --write`` regenerates ``defend/card_schema.json``'s row definitions and
the tables in ``docs/card.md``."""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from . import stats
from .io import atomic_write_text

__all__ = ["Fig", "Column", "Row", "CleanAccuracyRow", "AutoAttackRow", "TopKRow", "AttackRow", "TransferRow",
           "DetectionRow", "DetectionThreshold", "DetectionSummary", "DetectorSweepRow", "DetectorSweep", "CertificationRow",
           "BenchAttack",
           "BenchEntry", "SECTIONS", "TABLES", "ROW_DEFS", "RESULTS", "OPTIONAL_RESULTS", "schema_defs",
           "generated_schema", "csv_columns", "figure_names", "keys", "markdown_headers", "markdown_cells",
           "docs_tables", "fmt_budget", "fmt_fig"]


class Fig(NamedTuple):
    """A figure and its 95 % interval (``None``: not measured / no interval)."""

    value: float | None
    low: float | None = None
    high: float | None = None

    @classmethod
    def of(cls, est: stats.Estimate | None) -> Fig:
        """From a :class:`defend.stats.Estimate` (NaN -> ``None``); ``None`` gives an empty figure."""
        f = stats.interval_fields("v", est)
        return cls(f["v"], f["v_ci_low"], f["v_ci_high"])

    def fields(self, name: str) -> dict[str, Any]:
        """The figure as flat row keys: ``name``, ``name_ci_low``, ``name_ci_high``."""
        return {name: self.value, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}

    @classmethod
    def get(cls, res: dict[str, Any], name: str) -> Fig:
        """From flat ``name`` / ``name_ci_low`` / ``name_ci_high`` entries of a result dict (missing -> ``None``)."""
        return cls(res.get(name), res.get(f"{name}_ci_low"), res.get(f"{name}_ci_high"))


def col(doc: str, schema: dict[str, Any], *, unit: str = "", ci: dict[str, Any] | None = None, csv: bool = True,
        required: bool = True, omit_none: bool = False, lift: tuple[str, ...] = (), ci_last: bool = False,
        default: Any = dataclasses.MISSING) -> Any:
    """A row field: its one-line ``doc``, ``unit``, JSON ``schema`` (and ``ci``: its interval's, for a :class:`Fig`),
    whether it is a CSV column (``lift``: the budget keys lifted to columns instead), whether the schema requires
    it, whether it is left out of the card when ``None``, and whether its interval keys go at the row's end."""
    return field(default=default, metadata={"doc": doc, "unit": unit, "schema": schema, "ci": ci, "csv": csv,
                                            "required": required, "omit_none": omit_none, "lift": lift,
                                            "ci_last": ci_last})


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


UNIT, CI_UNIT, SIGNED, CI_SIGNED = _ref("unit"), _ref("ci_unit"), _ref("signed_unit"), _ref("ci_signed")
COUNT, SECONDS, BUDGET, RADIUS, KIND = _ref("count"), _ref("seconds"), _ref("budget"), _ref("radius"), _ref("kind")
STR, OBJ, NOISE = {"type": "string"}, {"type": "object"}, {"type": ["number", "null"], "minimum": 0, "maximum": 2}
PRESET = {"enum": ["paper", "cpu", "custom"]}
PRESET_DOC = ("which ADV2 budget the attack ran (`defend.presets.preset_of`): `paper` (the official ADV2 scripts' "
              "steps, step size, eps and c ramp for the attacked interpreter), `cpu` (our scaled-down CPU budget) or "
              "`custom`")


class Column(NamedTuple):
    """One column of a report.md table: its header, the fields it shows and how (row, section) -> cell."""

    header: str
    fields: tuple[str, ...]
    cell: Callable[[dict[str, Any], Any], Any]


def fmt_fig(name: str, n: str | None = None) -> Callable[[dict[str, Any], Any], str]:
    """A cell ``0.480 [0.42, 0.54]`` of figure ``name`` (with the row's ``n`` field where given)."""
    return lambda r, _: stats.format_value(r.get(name), r.get(f"{name}_ci_low"), r.get(f"{name}_ci_high"),
                                           r.get(n) if n else None)


def _plain(name: str) -> Callable[[dict[str, Any], Any], Any]:
    return lambda r, _: r.get(name)


def radius_text(eps: float) -> str:
    """``8/255`` for a whole number of 1/255 levels, else the number (``0.031``: not rounded to a fraction)."""
    v = float(eps) * 255
    return f"{round(v)}/255" if abs(v - round(v)) < 1e-6 else f"{float(eps):.4g}"


def fmt_budget(b: dict[str, Any] | None, preset: str | None = None) -> str:
    """``eps 8/255, 4+3 steps, 2 restarts`` and, where given, the budget preset (``..., paper budget``; ``-``
    without a budget)."""
    if not b:
        return "-"
    parts = [f"eps {radius_text(b['eps'])}" if "eps" in b else None,
             f"{b['warm_steps']}+{b['steps']} steps" if "warm_steps" in b else
             (f"{b['steps']} steps" if "steps" in b else None),
             f"{b['restarts']} restarts" if b.get("restarts", 1) > 1 else None,
             f"{preset} budget" if preset else None]
    return ", ".join(p for p in parts if p)


@dataclass(kw_only=True)
class Row:
    """A card row. Subclasses declare their fields with :func:`col`; ``CSV_ORDER`` orders the CSV columns where it
    differs from the field order (columns it does not name follow in field order), ``MARKDOWN`` the report.md
    columns and ``MARKDOWN_HIDDEN`` the fields report.md leaves out (any other field gets a column of its own)."""

    CSV_ORDER: ClassVar[tuple[str, ...]] = ()
    MARKDOWN: ClassVar[tuple[Column, ...]] = ()
    MARKDOWN_HIDDEN: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The row as the card holds it (a :class:`Fig` as three keys)."""
        out: dict[str, Any] = {}
        tail: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata["omit_none"] and v is None:
                continue
            if _is_fig(f):
                v = (v if isinstance(v, Fig) else Fig(v)).fields(f.name)
                out[f.name] = v.pop(f.name)
                (tail if f.metadata["ci_last"] else out).update(v)
            else:
                out[f.name] = v
        return {**out, **tail}


def _is_fig(f: dataclasses.Field) -> bool:
    return f.metadata.get("ci") is not None


def _names(f: dataclasses.Field) -> tuple[str, ...]:
    """The keys of one field in a row: a figure's name and its two interval keys, else its name."""
    return (f.name, f"{f.name}_ci_low", f"{f.name}_ci_high") if _is_fig(f) else (f.name,)


def figure_names(cls: type[Row]) -> tuple[str, ...]:
    """The figures of ``cls`` that carry a 95 % interval (its :class:`Fig` fields), in field order."""
    return tuple(f.name for f in dataclasses.fields(cls) if _is_fig(f))


def keys(cls: type[Row]) -> list[str]:
    """Every key a row of ``cls`` may hold, in card order (a figure's interval keys beside it)."""
    return [k for f in dataclasses.fields(cls) for k in _names(f)]


def row_schema(cls: type[Row]) -> dict[str, Any]:
    """The JSON Schema of one row of ``cls``."""
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        for i, k in enumerate(_names(f)):
            props[k] = f.metadata["schema"] if i == 0 else f.metadata["ci"]
            if f.metadata["required"]:
                required.append(k)
    return {"type": "object", "description": (cls.__doc__ or "").split("\n\n")[0].replace("\n", " "),
            "required": required, "properties": props}


def csv_columns(cls: type[Row]) -> list[str]:
    """The CSV columns of ``cls``: every CSV field (figures with their intervals, a budget as its lifted keys),
    ordered by ``CSV_ORDER`` first."""
    cols: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata["lift"]:
            cols += list(f.metadata["lift"])
        elif f.metadata["csv"]:
            cols += list(_names(f))
    rank = {name: i for i, name in enumerate(cls.CSV_ORDER)}
    base = {c: c.removesuffix("_ci_low").removesuffix("_ci_high") for c in cols}
    return sorted(cols, key=lambda c: (rank.get(base[c], len(rank)), cols.index(c)))


def _extra(cls: type[Row]) -> list[dataclasses.Field]:
    """The fields no report.md column of ``cls`` shows and that are not hidden: each gets a column."""
    shown = {n for c in cls.MARKDOWN for n in c.fields} | set(cls.MARKDOWN_HIDDEN)
    return [f for f in dataclasses.fields(cls) if f.name not in shown]


def markdown_headers(cls: type[Row]) -> list[str]:
    """The report.md headers of a table of ``cls`` rows."""
    return [c.header for c in cls.MARKDOWN] + [f.name for f in _extra(cls)]


def markdown_cells(cls: type[Row], row: dict[str, Any], section: Any = None) -> list[Any]:
    """The report.md cells of one row (``section``: the card section the row is in, for context)."""
    extra = [fmt_fig(f.name)(row, section) if _is_fig(f) else row.get(f.name) for f in _extra(cls)]
    return [c.cell(row, section) for c in cls.MARKDOWN] + extra


def _eps_cell(r: dict[str, Any], _: Any) -> str:
    return radius_text(r["eps"])


@dataclass(kw_only=True)
class CleanAccuracyRow(Row):
    """Clean accuracy on the first ``clean_n`` test inputs (``results.clean_accuracy``)."""

    metric: str = col("always `clean_accuracy`", {"const": "clean_accuracy"}, default="clean_accuracy")
    value: Fig = col("share of the inputs classified correctly (Wilson interval)", UNIT, unit="share", ci=CI_UNIT)
    n: int = col("inputs measured", COUNT, unit="inputs")
    split: str = col("the split measured (`test`)", STR)
    attack: None = col("`null` (no attack)", {"type": "null"}, csv=False, default=None)
    budget: None = col("`null` (no attack)", {"type": "null"}, csv=False, default=None)
    seed: int = col("the battery's seed", COUNT)
    seconds: float = col("time the measurement took", SECONDS, unit="s")
    chance_level: float = col("1 / number of classes", UNIT, unit="share")
    at_chance: bool = col("the Wilson lower bound is at or below chance + 0.1: the robust and interpretation figures "
                          "mean nothing", {"type": "boolean"})

    CSV_ORDER: ClassVar[tuple[str, ...]] = ("metric", "value", "n", "split", "chance_level", "at_chance")
    MARKDOWN: ClassVar[tuple[Column, ...]] = (Column("accuracy", ("value", "n"), fmt_fig("value", "n")),
                                              Column("split", ("split",), _plain("split")),
                                              Column("chance", ("chance_level",), _plain("chance_level")))
    MARKDOWN_HIDDEN: ClassVar[tuple[str, ...]] = ("metric", "attack", "budget", "seed", "seconds", "at_chance")


@dataclass(kw_only=True)
class AutoAttackRow(Row):
    """Robust accuracy under AutoAttack at one L-inf radius (``results.autoattack[]``)."""

    attack: str = col("`autoattack-standard`, or `autoattack-reduced` below 4 classes (the targeted DLR loss of "
                      "APGD-T needs 4; the note says what ran)",
                      {"enum": ["autoattack-standard", "autoattack-reduced"]})
    eps: float = col("L-inf radius", RADIUS, unit="image units")
    robust_accuracy: Fig = col("share of the first n test inputs still correctly classified after the attacks; a clean "
                               "error counts as a failure (RobustBench)", UNIT, unit="share", ci=CI_UNIT)
    n: int = col("the first n test inputs, correctly classified or not", COUNT, unit="inputs")
    robust_accuracy_on_correct: Fig = col("the same over the correctly classified ones among them", UNIT,
                                          unit="share", ci=CI_UNIT)
    n_correct: int = col("correctly classified inputs among the n", COUNT, unit="inputs")
    budget: dict[str, Any] = col("`eps`, `norm`, `version` (`standard` or `reduced`), `attacks` (those run)", BUDGET,
                                 csv=False)
    stages: dict[str, float] = col("accuracy after each attack", {"type": "object", "additionalProperties": UNIT},
                                   unit="share", csv=False)
    flags: list[str] = col("AutoAttack's own warnings", {"type": "array", "items": STR}, csv=False)
    seed: int = col("the battery's seed", COUNT)
    seconds: float = col("time the attack took", SECONDS, unit="s")
    note: str = col("the inputs, the convention and, for the reduced version, why and what ran", STR, csv=False,
                    required=False)

    MARKDOWN: ClassVar[tuple[Column, ...]] = (
        Column("eps", ("eps",), _eps_cell),
        Column("robust accuracy", ("robust_accuracy", "n"), fmt_fig("robust_accuracy", "n")),
        Column("on correctly classified inputs", ("robust_accuracy_on_correct", "n_correct"),
               fmt_fig("robust_accuracy_on_correct", "n_correct")),
        Column("seconds", ("seconds",), _plain("seconds")))
    MARKDOWN_HIDDEN: ClassVar[tuple[str, ...]] = ("attack", "budget", "stages", "flags", "seed", "note")


@dataclass(kw_only=True)
class TopKRow(Row):
    """Interpretation robustness of one interpreter under the top-k attack (``results.interpretation_robustness[]``):
    benign vs attacked maps of the inputs whose prediction the attack kept."""

    interpreter: str = col("the interpreter attacked and read", STR)
    attack: str = col("`topk` (our variant) or `aai_topk` (Boopathy et al.'s eval.py)", {"enum": ["topk", "aai_topk"]},
                      default="topk")
    protocol: str = col("`ghorbani` (our variant: normalised top-k mass + kappa hinge, best iterate, the prediction "
                        "explained) or `boopathy` (the reference: raw-map top-k sum, random start, final iterate, the "
                        "true label explained)", {"enum": ["ghorbani", "boopathy"]}, default="ghorbani")
    budget: dict[str, Any] = col("`eps`, `k`, `steps`, `restarts` (CSV: `eps`, `steps`, `k`)", BUDGET,
                                 lift=("eps", "steps", "k"))
    ks: list[int] = col("top-k intersection sizes", {"type": "array", "items": {"type": "integer", "minimum": 1}},
                        csv=False)
    n: int = col("inputs attacked", COUNT, unit="inputs")
    n_kept: int = col("inputs whose prediction the attack kept (the maps compared)", COUNT, unit="inputs")
    kendall_tau: Fig = col("Kendall tau between benign and attacked map (bootstrap interval)", SIGNED,
                           unit="[-1, 1]", ci=CI_SIGNED)
    spearman: Fig = col("Spearman correlation between benign and attacked map", SIGNED, unit="[-1, 1]", ci=CI_SIGNED)
    topk_intersection: Fig = col("top-k intersection, mean over `ks`", UNIT, unit="share", ci=CI_UNIT)
    seed: int = col("the battery's seed", COUNT)
    seconds: float = col("time the attack took", SECONDS, unit="s")

    MARKDOWN: ClassVar[tuple[Column, ...]] = (
        Column("interpreter", ("interpreter",), _plain("interpreter")),
        Column("protocol", ("protocol",), lambda r, _: "Boopathy et al. (aai_topk)" if r.get("protocol") == "boopathy"
               else "our variant (ghorbani)"),
        Column("budget", ("budget",), lambda r, _: fmt_budget(r["budget"])),
        Column("k", (), lambda r, _: r["budget"].get("k")),
        Column("Kendall tau", ("kendall_tau",), fmt_fig("kendall_tau", "n_kept")),
        Column("Spearman", ("spearman",), fmt_fig("spearman")),
        Column("top-k intersection", ("topk_intersection",), fmt_fig("topk_intersection")),
        Column("n kept / n", ("n_kept", "n"), lambda r, _: f"{r['n_kept']}/{r['n']}"),
        Column("s", ("seconds",), _plain("seconds")))
    MARKDOWN_HIDDEN: ClassVar[tuple[str, ...]] = ("attack", "ks", "seed")


@dataclass(kw_only=True)
class AttackRow(Row):
    """One interpretation attack against one interpreter, read by one interpreter (``results.attacks[]``): success
    means the target class is reached, maps are compared to the benign map."""

    attack: str = col("`adv2`, `advedge`, `advedge_plus`; adaptive: `adv2_ensemble`, `advedge_ensemble`, "
                      "`adaptive_rts`, `adaptive_detector`", STR)
    framework: str = col("attack framework (`pgd`)", STR)
    interpreter: str = col("the attacked interpreter (`a+b` for an ensemble)", STR)
    kind: str = col("`standard`, `adaptive` or `rescored`", KIND)
    read_by: str = col("the interpreter whose maps are measured", STR)
    asr: Fig = col("share classified as the target class (Wilson interval)", UNIT, unit="share", ci=CI_UNIT)
    confidence: Fig = col("mean target-class probability", UNIT, unit="probability", ci=CI_UNIT)
    l1: Fig = col("map L1 distance to the benign map, per pixel, input grid", UNIT, unit="per pixel", ci=CI_UNIT)
    l2: Fig = col("map L2 distance to the benign map, per pixel, input grid", UNIT, unit="per pixel", ci=CI_UNIT)
    iou: Fig = col("top-k IoU with the benign map, mean over 5-50 % of the pixels", UNIT, unit="share", ci=CI_UNIT)
    noise_rate: Fig = col("1 - SSIM of attacked and benign map", NOISE, unit="[0, 2]", ci=NOISE)
    seconds_per_input: float = col("attack time per input", SECONDS, unit="s")
    linf: float = col("largest perturbation", RADIUS, unit="image units")
    n: int = col("inputs attacked", COUNT, unit="inputs")
    iou_chance: float = col("what two unrelated maps score by chance at those fractions (about 0.14)", UNIT,
                            unit="share")
    budget: dict[str, Any] = col("`framework` and its options (PGD: `eps`, `alpha`, `random_start`), `warm_steps`, "
                                 "`steps`, `c`, `restarts`; `adaptive_detector`: `detector_weight`, `surrogate` "
                                 "(CSV: `eps`, `steps`)", BUDGET, lift=("eps", "steps"))
    budget_preset: str = col(PRESET_DOC, PRESET)
    seed: int = col("the seed the set was crafted with", COUNT)
    seconds: float = col("attack time (0 when rescored)", SECONDS, unit="s")
    file: str | None = col("the saved set", {"type": ["string", "null"]})
    per_input: dict[str, list[float]] | None = col(
        "evaluate only: `asr`, `l1`, `iou` per attacked input, in input order (paired tests between rows)", OBJ,
        csv=False, required=False, omit_none=True, default=None)

    CSV_ORDER: ClassVar[tuple[str, ...]] = ("attack", "framework", "interpreter", "kind", "read_by", "asr",
                                            "confidence", "l1", "l2", "iou", "iou_chance", "noise_rate",
                                            "seconds_per_input", "linf", "eps", "steps", "n")
    MARKDOWN: ClassVar[tuple[Column, ...]] = (
        Column("attack", ("attack",), _plain("attack")), Column("against", ("interpreter",), _plain("interpreter")),
        Column("kind", ("kind",), _plain("kind")), Column("read by", ("read_by",), _plain("read_by")),
        Column("success", ("asr", "n"), fmt_fig("asr", "n")),
        Column("confidence", ("confidence",), fmt_fig("confidence")),
        Column("map L1", ("l1",), fmt_fig("l1")), Column("IoU", ("iou",), fmt_fig("iou")),
        Column("IoU by chance", ("iou_chance",), _plain("iou_chance")),
        Column("noise rate", ("noise_rate",), fmt_fig("noise_rate")),
        Column("s / input", ("seconds_per_input",), _plain("seconds_per_input")),
        Column("budget", ("budget", "budget_preset"), lambda r, _: fmt_budget(r["budget"], r.get("budget_preset"))))
    MARKDOWN_HIDDEN: ClassVar[tuple[str, ...]] = ("framework", "l2", "linf", "seed", "seconds", "file", "per_input")


@dataclass(kw_only=True)
class TransferRow(Row):
    """One cell of the transfer matrix of the standard attacks (``results.transfer[]``): a set crafted against
    ``source`` read by ``read_by``. report.md shows the matrix of ``l1``."""

    attack: str = col("the standard attack", STR)
    source: str = col("the interpreter attacked", STR)
    read_by: str = col("the interpreter whose maps are measured", STR)
    l1: Fig = col("map L1 distance to the benign map", UNIT, unit="per pixel", ci=CI_UNIT)
    iou: Fig = col("top-k IoU with the benign map", UNIT, unit="share", ci=CI_UNIT)
    asr: Fig = col("share classified as the target class", UNIT, unit="share", ci=CI_UNIT)
    n: int = col("inputs attacked", COUNT, unit="inputs")
    seconds_per_input: float = col("attack time per input (of the set crafted against `source`)", SECONDS, unit="s")
    budget: dict[str, Any] = col("the attack's budget (CSV: `eps`, `steps`)", BUDGET, lift=("eps", "steps"))
    budget_preset: str = col(PRESET_DOC, PRESET)
    seed: int = col("the battery's seed", COUNT)


def _rate_cell(key: str) -> Callable[[dict[str, Any], Any], Any]:
    """A detection rate at threshold ``key``, or why there is none (the section's threshold is not supported)."""
    def cell(r: dict[str, Any], section: Any) -> Any:
        supported = section is None or section["thresholds"][key]["supported"]
        return fmt_fig(f"detection_rate_{key}")(r, section) if supported else "not enough benign inputs"
    return cell


@dataclass(kw_only=True)
class DetectionRow(Row):
    """Detection of one adversarial set's successful inputs (``results.detection.rows[]``)."""

    attack: str = col("the attack that crafted the set", STR)
    interpreter: str = col("the interpreter it attacked", STR)
    kind: str = col("`standard`, `adaptive` or `rescored`", KIND)
    n: int = col("inputs of the set", COUNT, unit="inputs")
    n_adversarial: int = col("inputs that reached the target: the ones scored", COUNT, unit="inputs")
    budget: dict[str, Any] = col("the attack's budget (CSV: `eps`, `steps`)", BUDGET, lift=("eps", "steps"))
    seed: int = col("the battery's seed", COUNT)
    evasion_rate: Fig = col("share of all inputs that reach the target and are not flagged at 0.5 (end-to-end "
                            "success against the real detector)", UNIT, unit="share", ci=CI_UNIT)
    auc: Fig = col("ROC AUC, benign vs successful adversarial scores (bootstrap interval)", UNIT, unit="share",
                   ci=CI_UNIT, ci_last=True)
    roc: dict[str, list[float]] | None = col(
        "`fpr`, `tpr` lists", {"type": ["object", "null"], "required": ["fpr", "tpr"],
                               "properties": {"fpr": {"type": "array", "items": UNIT},
                                              "tpr": {"type": "array", "items": UNIT}}}, csv=False)
    per_input: dict[str, list[float]] = col("`evasion` per input, in input order", OBJ, csv=False, required=False)
    detection_rate_default: Fig = col("share of the successful inputs flagged at 0.5", UNIT, unit="share",
                                      ci=CI_UNIT)
    detection_rate_fpr1: Fig = col("the same at the 1 % FPR threshold (`null`: not supported)", UNIT, unit="share",
                                   ci=CI_UNIT)
    detection_rate_fpr5: Fig = col("the same at the 5 % FPR threshold", UNIT, unit="share", ci=CI_UNIT)

    CSV_ORDER: ClassVar[tuple[str, ...]] = ("attack", "interpreter", "kind", "n", "n_adversarial",
                                            "detection_rate_fpr1", "detection_rate_fpr5", "detection_rate_default",
                                            "auc", "evasion_rate")
    MARKDOWN: ClassVar[tuple[Column, ...]] = (
        Column("attack", ("attack",), _plain("attack")), Column("against", ("interpreter",), _plain("interpreter")),
        Column("kind", ("kind",), _plain("kind")),
        Column("successful inputs", ("n_adversarial",), _plain("n_adversarial")),
        Column("detected @1% FPR", ("detection_rate_fpr1",), _rate_cell("fpr1")),
        Column("detected @5% FPR", ("detection_rate_fpr5",), _rate_cell("fpr5")),
        Column("detected @0.5", ("detection_rate_default",), fmt_fig("detection_rate_default")),
        Column("AUC", ("auc",), fmt_fig("auc")),
        Column("evasion (target & unflagged @0.5)", ("evasion_rate", "n"), fmt_fig("evasion_rate", "n")))
    MARKDOWN_HIDDEN: ClassVar[tuple[str, ...]] = ("budget", "seed", "roc", "per_input")


@dataclass(kw_only=True)
class DetectionThreshold(Row):
    """A detection threshold at one false-positive rate (``results.detection.thresholds.fpr1`` / ``fpr5``)."""

    threshold: float | None = col("the lowest development benign score with at most that FPR above it (`null`: "
                                  "not supported)", UNIT, unit="score")
    benign_fpr: float | None = col("the FPR it gives on the development benign inputs", UNIT, unit="share")
    test_fpr: Fig = col("the FPR it gives on the test benign inputs (Wilson)", UNIT, unit="share", ci=CI_UNIT)
    supported: bool = col("the development benign inputs were at least 10 / FPR", {"type": "boolean"})
    note: str = col("where it was set, or why not", STR)


@dataclass(kw_only=True)
class DetectionSummary(Row):
    """Detection (``results.detection``; `null` without a detector)."""

    interpreters: list[str] = col("the interpreters the detector reads", {"type": "array", "items": STR})
    product: bool = col("the product channel is read too", {"type": "boolean"})
    n_benign: int = col("test benign inputs (other than the attacked ones)", COUNT, unit="inputs")
    n_benign_dev: int = col("development benign inputs that set the thresholds", COUNT, unit="inputs")
    default_threshold: float = col("the booster's own threshold (0.5)", UNIT, unit="score")
    thresholds: dict[str, dict[str, Any]] = col("`fpr1`, `fpr5`: a `detection_threshold` each", {
        "type": "object", "required": ["fpr1", "fpr5"], "additionalProperties": _ref("detection_threshold")})
    benign_fpr_default: Fig = col("share of the test benign inputs flagged at 0.5", UNIT, unit="share", ci=CI_UNIT)
    rows: list[dict[str, Any]] = col("a `detection_row` per adversarial set", {"type": "array",
                                                                               "items": _ref("detection_row")})
    seconds: float = col("time the detection took", SECONDS, unit="s")
    sweep: dict[str, Any] | None = col("the detector-aware attack swept over its weight (`detector_sweep`; absent "
                                       "when re-scoring saved sets)", _ref("detector_sweep"), required=False,
                                       omit_none=True, default=None)


_WEIGHT = {"type": ["number", "null"], "minimum": 0}
_FIT = {"type": ["object", "null"], "properties": {"r2": {"type": ["number", "null"]}, "n": COUNT,
                                                   "sign_agreement": UNIT, "spearman": {"type": ["number", "null"]}}}


@dataclass(kw_only=True)
class DetectorSweepRow(Row):
    """One point of the detector-aware sweep (``results.detection.sweep.rows[]``): the plain attack, or the
    detector-aware ADV2 at one weight (per input the best of its restarts and the plain attack's input)."""

    attack: str = col("`adaptive_detector`, or the plain attack it is compared with", STR)
    detector_weight: float | None = col("weight of the detector's surrogate score in the loss (`null`: the plain "
                                        "attack; 0: the plain ensemble ADV2)", _WEIGHT)
    restarts: int = col("seeded runs per input (the first from the benign input)", COUNT)
    n: int = col("attacked inputs", COUNT, unit="inputs")
    n_success: int = col("inputs that reach the target", COUNT, unit="inputs")
    attack_success: Fig = col("share of the inputs that reach the target (Wilson)", UNIT, unit="share", ci=CI_UNIT)
    evasion_rate_fpr5: Fig = col("share of the inputs that reach the target and are not flagged at the 5 % FPR "
                                 "threshold (Wilson)", UNIT, unit="share", ci=CI_UNIT)
    detection_rate_fpr5: Fig = col("share of the inputs reaching the target that are flagged at that threshold",
                                   UNIT, unit="share", ci=CI_UNIT)
    iou: Fig = col("top-k IoU of their maps to the benign maps, mean over the detector's interpreters (bootstrap)",
                   UNIT, unit="share", ci=CI_UNIT)
    pareto: bool = col("on the Pareto front of the sweep (evasion up, IoU up)", {"type": "boolean"})
    budget: dict[str, Any] = col("the attack's budget (CSV: `eps`, `steps`)", BUDGET, lift=("eps", "steps"))
    budget_preset: str = col(PRESET_DOC, PRESET)
    seconds_per_input: float = col("attack time per input (every restart and weight-selection)", SECONDS, unit="s")
    per_input: dict[str, list[float]] = col("`evasion` per input, in input order", OBJ, csv=False, required=False)

    MARKDOWN_HIDDEN: ClassVar[tuple[str, ...]] = ("budget", "per_input")


@dataclass(kw_only=True)
class DetectorSweep(Row):
    """The detector-aware attack swept over its weight (``results.detection.sweep``; :mod:`defend.detector_sweep`)."""

    status: str = col("`measured`, or why not (e.g. too few development benign inputs for a 5 % FPR threshold)", STR)
    threshold_fpr5: float | None = col("the booster's 5 % FPR threshold the evasion is judged at", UNIT,
                                       unit="score")
    surrogate: str = col("the booster's differentiable stand-in (`distilled` or `head`)", STR)
    rows: list[dict[str, Any]] = col("a `detector_sweep_row` per point: the plain attack, then each weight",
                                     {"type": "array", "items": _ref("detector_sweep_row")})
    strongest_weight: float | None = col("the weight with the highest evasion (then IoU)", _WEIGHT)
    evasion_vs_plain_diff: Fig = col("its evasion minus the plain attack's, on the same inputs (paired bootstrap)",
                                     SIGNED, unit="share", ci=CI_SIGNED)
    evasion_vs_plain_p: float | None = col("McNemar's exact p of that difference", {"type": ["number", "null"]})
    budget_check: dict[str, Any] | None = col("the strongest weight with twice the steps: `verdict` (`budget too "
                                              "small: ...` or `converged: ...`), `too_small`, the rates and p-values",
                                              {"type": ["object", "null"]})
    surrogate_held_out: dict[str, Any] | None = col("the surrogate's fit to the booster's log-odds on held-out maps "
                                                    "(`r2`, `sign_agreement`, `spearman`, `n`)", _FIT)
    surrogate_along_iterates: dict[str, Any] | None = col("the same on the maps of the attack's final inputs", _FIT)
    seconds: float = col("time the sweep took", SECONDS, unit="s")


_L2 = {"type": "number", "minimum": 0}


def _radius_cell(r: dict[str, Any], _: Any) -> str:
    return f"{r['radius']:.4g} (L-inf {r['linf_eps'] * 255:.3g}/255)"


def _cost_cell(r: dict[str, Any], _: Any) -> str:
    return (f"{r['forward_passes_per_input']} passes, {r['seconds_per_input']:.3g} s "
            f"({r['forward_ratio']:.3g} x one forward)")


@dataclass(kw_only=True)
class CertificationRow(Row):
    """Randomized-smoothing certificates at one L2 radius, for one interpreter's map (``results.certification[]``,
    docs/certify.md): over the first n test inputs, correctly classified or not (a wrong or abstained prediction is
    not certified)."""

    interpreter: str = col("the interpreter whose sparsified map is certified", STR)
    radius: float = col("the L2 radius r the figures are read at", _L2, unit="image units (L2)")
    linf_eps: float = col("the L-inf radius r covers: r / sqrt(d), d = C*H*W (an L-inf ball of eps lies inside the "
                          "L2 ball of eps * sqrt(d))", _L2, unit="image units (L-inf)")
    certified_accuracy: Fig = col("share of the inputs whose smoothed prediction is certified correct at radius >= r "
                                  "(Cohen et al.; Wilson)", UNIT, unit="share", ci=CI_UNIT)
    map_certified: Fig = col("share of the inputs with at least `share` of their top-k pixels certified at radius >= "
                             "r (Wilson)", UNIT, unit="share", ci=CI_UNIT)
    dual_certified_accuracy: Fig = col("share of the inputs certified correct at r whose map is certified at r too "
                                       "(dual radius >= r; Wilson); never above `certified_accuracy`", UNIT,
                                       unit="share", ci=CI_UNIT)
    map_certified_share: Fig = col("mean over the inputs of the share of their (selected) top-k pixels certified at "
                                   "radius >= r (bootstrap)", UNIT, unit="share", ci=CI_UNIT)
    topk_overlap: Fig = col("mean over the inputs of the pixels certified in the top-k at radius >= r over the k "
                            "pixels of the top k % (bootstrap)", UNIT, unit="share", ci=CI_UNIT)
    n: int = col("inputs certified (the first n of the test split)", COUNT, unit="inputs")
    abstained: int = col("inputs whose prediction CERTIFY abstains on", COUNT, unit="inputs")
    sigma: float = col("noise standard deviation", {"type": "number", "minimum": 0}, unit="image units")
    n0: int = col("selection noise samples per input", COUNT, unit="samples")
    n_noise: int = col("estimation noise samples per input (the battery's `certify.n`)", COUNT, unit="samples")
    alpha: float = col("error probability of each certificate (prediction; map: family-wise over its pixels)", UNIT)
    k_percent: float = col("the top-k share of the map", {"type": "number", "minimum": 0, "maximum": 100}, unit="%")
    correction: str = col("multiple-testing correction over a map's pixels", {"enum": ["holm", "bonferroni"]})
    share: float = col("share of the top-k pixels a certified map needs", UNIT, unit="share")
    samples_per_batch: int = col("noisy copies per forward pass (the draws depend on it)", COUNT)
    forward_passes_per_input: int = col("noisy evaluations per input: n0 + n classifier forward passes for the "
                                        "prediction and n0 + n interpreter maps (each a forward, and a backward "
                                        "where the interpreter takes gradients)", COUNT, unit="passes")
    seconds_per_input: float = col("certification time per input (prediction and this interpreter's map)", SECONDS,
                                   unit="s")
    forward_ratio: float = col("`seconds_per_input` over the seconds per input of one batched forward pass of the "
                               "same inputs (measured)", {"type": "number", "minimum": 0}, unit="x")
    seed: int = col("the battery's seed (each certificate's generator is seeded with it)", COUNT)

    MARKDOWN: ClassVar[tuple[Column, ...]] = (
        Column("interpreter", ("interpreter",), _plain("interpreter")),
        Column("L2 radius (L-inf eps)", ("radius", "linf_eps"), _radius_cell),
        Column("certified accuracy", ("certified_accuracy", "n"), fmt_fig("certified_accuracy", "n")),
        Column("map certified", ("map_certified",), fmt_fig("map_certified")),
        Column("dual-certified accuracy", ("dual_certified_accuracy",), fmt_fig("dual_certified_accuracy")),
        Column("certified top-k share", ("map_certified_share",), fmt_fig("map_certified_share")),
        Column("certified top-k overlap", ("topk_overlap",), fmt_fig("topk_overlap")),
        Column("cost per input", ("forward_passes_per_input", "seconds_per_input", "forward_ratio"), _cost_cell))
    MARKDOWN_HIDDEN: ClassVar[tuple[str, ...]] = ("sigma", "n0", "n_noise", "alpha", "k_percent", "correction",
                                                  "share", "samples_per_batch", "seed")


_SHA = {"type": ["string", "null"], "minLength": 64}
_STR_NULL = {"type": ["string", "null"]}
_COUNT_NULL = {"type": ["integer", "null"], "minimum": 0}


@dataclass(kw_only=True)
class BenchAttack(Row):
    """One interpretation attack on the leaderboard entry (``entry.attacks[]``): a card attack row read by the
    interpreter it attacked (an ensemble's rows by each interpreter reading them)."""

    attack: str = col("the attack (`adv2`, `advedge_plus`, ...; adaptive: `adv2_ensemble`, `adaptive_rts`, ...)", STR)
    interpreter: str = col("the interpreter whose maps are measured (for an ensemble: the reader)", STR)
    kind: str = col("`standard` or `adaptive` (`rescored` on a re-scoring card)", KIND)
    success: Fig = col("share of the inputs classified as the target class (the row's `asr`, Wilson)", UNIT,
                      unit="share", ci=CI_UNIT)
    l1: Fig = col("map L1 distance to the benign map (bootstrap)", UNIT, unit="per pixel", ci=CI_UNIT)
    iou: Fig = col("top-k IoU with the benign map (bootstrap)", UNIT, unit="share", ci=CI_UNIT)
    n: int = col("inputs attacked", COUNT, unit="inputs")
    budget_preset: str = col(PRESET_DOC, PRESET)


_DEFENCE = {"type": "object", "required": ["name", "recipe"], "additionalProperties": False,
            "properties": {"name": _STR_NULL, "recipe": {"type": ["object", "null"]}}}
_THREAT = {"type": "object", "required": ["norm", "eps"], "additionalProperties": False,
           "properties": {"norm": {"const": "Linf"}, "eps": RADIUS}}
_WEIGHTS = {"type": "object", "required": ["classifier", "rts", "detector"], "additionalProperties": False,
            "properties": {"classifier": _SHA, "rts": _SHA, "detector": _SHA}}


@dataclass(kw_only=True)
class BenchEntry(Row):
    """The leaderboard entry of the card (``entry``, RobustBench-style; ``defend.evaluate.entry.entry_from_card``
    builds it from the card's own sections), read by ``defend bench``. ``null`` where the card does not hold the
    figure."""

    name: str = col("the entry's name (`defend evaluate --name`, default the --out folder's name)",
                    {"type": "string", "minLength": 1})
    source: str = col("where it comes from: `this run`, or a paper / URL the user gives (`--source`)",
                      {"type": "string", "minLength": 1})
    architecture: str = col("the classifier's architecture, e.g. `small_cnn (width 32)`", STR)
    training_data: str | None = col("the data the classifier was trained on (its artifact's record), else the "
                                    "evaluated data's name", _STR_NULL)
    defence: dict[str, Any] = col("`name`: the registered defence (`--defence`, else `null`); `recipe`: the training "
                                  "metadata the artifacts record (`classifier`: the classifier's `robust_training`, "
                                  "`rts`: the RTS network config, `detector`: the detector's hparams), `null` when "
                                  "none", _DEFENCE)
    threat_model: dict[str, Any] = col("`norm` (`Linf`) and `eps`: the battery's largest AutoAttack radius, else the "
                                       "top-k attack's", _THREAT)
    clean_acc: Fig = col("clean accuracy (`results.clean_accuracy`, Wilson)", UNIT, unit="share", ci=CI_UNIT)
    clean_n: int = col("inputs of the clean accuracy", COUNT, unit="inputs")
    autoattack_acc: Fig = col("robust accuracy under AutoAttack at the threat model's eps, a clean error counting as a "
                              "failure (RobustBench); `null`: not measured", UNIT, unit="share", ci=CI_UNIT)
    autoattack_n: int | None = col("inputs of the AutoAttack figure", _COUNT_NULL, unit="inputs")
    topk_tau: Fig = col("Kendall tau under the top-k attack, first top-k interpreter of the battery (bootstrap)",
                        SIGNED, unit="[-1, 1]", ci=CI_SIGNED)
    topk_n: int | None = col("inputs whose maps the tau compares (`n_kept`)", _COUNT_NULL, unit="inputs")
    topk_interpreter: str | None = col("the interpreter of `topk_tau`", _STR_NULL)
    topk_protocol: str | None = col("`boopathy` (the reference `aai_topk`) or `ghorbani`", _STR_NULL)
    attacks: list[dict[str, Any]] = col("a `bench_attack` per attack row read by the attacked interpreter",
                                        {"type": "array", "items": _ref("bench_attack")})
    dual_robustness: Fig = col("share of the attacked inputs no standard attack breaks (Wilson): broken = reaches the "
                               "target class (with a detector: and evades it)", UNIT, unit="share", ci=CI_UNIT)
    dual_robustness_adaptive: Fig = col("share no standard or adaptive attack breaks (Wilson); never above "
                                        "`dual_robustness`", UNIT, unit="share", ci=CI_UNIT)
    adaptive_gap: Fig = col("`dual_robustness` minus `dual_robustness_adaptive` on the same inputs (paired "
                            "bootstrap), >= 0", UNIT, unit="share", ci=CI_UNIT)
    adaptive_gap_p: float | None = col("McNemar's exact p of the gap", {"type": ["number", "null"], "minimum": 0,
                                                                        "maximum": 1})
    dual_n: int | None = col("inputs of the dual robustness figures", _COUNT_NULL, unit="inputs")
    adaptive_attacks: list[str] = col("the adaptive runs counted in `dual_robustness_adaptive`",
                                      {"type": "array", "items": STR})
    dual_certified_acc: Fig = col("dual-certified accuracy at `certified_radius` (`results.certification`, first "
                                  "interpreter; Wilson): prediction certified correct and map certified; `null`: "
                                  "not measured", UNIT, unit="share", ci=CI_UNIT, required=False)
    certified_radius: float | None = col("the L2 radius `dual_certified_acc` is read at: the first radius > 0 of the "
                                         "battery's `certify.radii`", {"type": ["number", "null"], "minimum": 0},
                                         unit="image units (L2)", required=False)
    certified_n: int | None = col("inputs of `dual_certified_acc`", _COUNT_NULL, unit="inputs", required=False)
    certify_sigma: float | None = col("the smoothing noise of the certificates (`null`: not measured)",
                                      {"type": ["number", "null"], "minimum": 0}, unit="image units",
                                      required=False)
    number_forward_passes: int = col("forward passes of the classifier per prediction at inference (RobustBench's "
                                     "field; 1 for every system here)", {"type": "integer", "minimum": 1})
    eval_seconds: float = col("wall time of the evaluation (`provenance.seconds`)", SECONDS, unit="s")
    device: str = col("the machine (`provenance.device`: the GPU, else the CPU)", STR)
    external_evaluations: list[dict[str, Any]] = col("evaluations by others (`[]` when made)",
                                                     {"type": "array", "items": OBJ})
    inputs_sha256: str | None = col("sha256 of the test split's images as uint8 bytes, in split order (`null`: "
                                    "not recorded, e.g. an upgraded 1.x card)", _SHA)
    weights_sha256: dict[str, Any] = col("`classifier`, `rts`, `detector`: the sha256 of each artifact (`null`: "
                                         "none)", _WEIGHTS)


#: the schema ``$defs`` the rows define: name -> (row type, may be ``null``)
ROW_DEFS: dict[str, tuple[type[Row], bool]] = {
    "clean_accuracy_row": (CleanAccuracyRow, False), "autoattack_row": (AutoAttackRow, False),
    "topk_row": (TopKRow, False), "attack_row": (AttackRow, False), "transfer_row": (TransferRow, False),
    "detection_row": (DetectionRow, False), "detection_threshold": (DetectionThreshold, False),
    "detection": (DetectionSummary, True), "detector_sweep_row": (DetectorSweepRow, False),
    "detector_sweep": (DetectorSweep, True), "certification_row": (CertificationRow, False),
    "bench_attack": (BenchAttack, False),
    "bench_entry": (BenchEntry, False)}

#: top-level sections of ``card.json`` that are one row definition each
SECTIONS: dict[str, str] = {"entry": "bench_entry"}

#: the CSV tables of ``defend evaluate``: file -> (results key, row type)
TABLES: dict[str, tuple[str, type[Row]]] = {
    "clean.csv": ("clean_accuracy", CleanAccuracyRow), "autoattack.csv": ("autoattack", AutoAttackRow),
    "interpretation.csv": ("interpretation_robustness", TopKRow), "attacks.csv": ("attacks", AttackRow),
    "transfer.csv": ("transfer", TransferRow), "detection.csv": ("detection", DetectionRow),
    "certification.csv": ("certification", CertificationRow)}


def schema_defs() -> dict[str, Any]:
    """The card schema's row definitions (``$defs``), generated from the row types."""
    out = {}
    for name, (cls, nullable) in ROW_DEFS.items():
        s = row_schema(cls)
        out[name] = {**s, "type": ["object", "null"]} if nullable else s
    return out


#: ``card.json``'s ``results``: key -> (row definition, a list of rows)
RESULTS: dict[str, tuple[str, bool]] = {
    "clean_accuracy": ("clean_accuracy_row", False), "autoattack": ("autoattack_row", True),
    "interpretation_robustness": ("topk_row", True), "attacks": ("attack_row", True),
    "transfer": ("transfer_row", True), "detection": ("detection", False),
    "certification": ("certification_row", True)}
#: results keys a card may lack (added to schema 2.0 later: a card written before holds none)
OPTIONAL_RESULTS = ("certification",)


def results_schema() -> dict[str, Any]:
    """The schema of ``card.json``'s ``results`` (each key a row definition or a list of them)."""
    props = {k: {"type": "array", "items": _ref(d)} if many else _ref(d) for k, (d, many) in RESULTS.items()}
    return {"type": "object", "required": [k for k in RESULTS if k not in OPTIONAL_RESULTS],
            "additionalProperties": False, "properties": props}


def generated_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (the card schema) with its ``results``, its one-row sections (:data:`SECTIONS`) and row ``$defs``
    generated from the row types."""
    out = json.loads(json.dumps(schema))
    out["properties"]["results"] = results_schema()
    out["properties"].update({key: _ref(d) for key, d in SECTIONS.items()})
    out["$defs"] = {**out["$defs"], **schema_defs()}
    return out


def _schema_text(s: dict[str, Any]) -> str:
    """How a schema is type-set in the checked-in ``defend/card_schema.json``."""
    return json.dumps(s, indent=2) + "\n"


def _result_path(name: str) -> str:
    """Where in ``card.json`` the rows of definition ``name`` are."""
    for key, (d, many) in RESULTS.items():
        if d == name:
            return f"results.{key}" + ("[]" if many else "")
    return {"detection_row": "results.detection.rows[]",
            "detection_threshold": "results.detection.thresholds.<fpr>", "detector_sweep": "results.detection.sweep",
            "detector_sweep_row": "results.detection.sweep.rows[]", "bench_attack": "entry.attacks[]",
            **{d: key for key, d in SECTIONS.items()}}[name]


def docs_tables() -> str:
    """The field tables of ``docs/card.md`` (one per row definition), generated from the row types."""
    lines = ["<!-- generated by `python -m defend.rows --write` from defend/rows.py: do not edit by hand -->", ""]
    for name, (cls, _) in ROW_DEFS.items():
        lines += [f"#### `{_result_path(name)}` ({cls.__name__}, `$defs/{name}`)", "",
                  " ".join((cls.__doc__ or "").split("\n\n")[0].split()), "",
                  "| field | unit | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            ci = ", with `_ci_low` / `_ci_high`" if _is_fig(f) else ""
            opt = " (optional)" if not f.metadata["required"] else ""
            lines.append(f"| `{f.name}` | {f.metadata['unit'] or '-'} | {f.metadata['doc']}{ci}{opt} |")
        lines.append("")
    return "\n".join(lines)


DOCS_BEGIN, DOCS_END = "<!-- rows:begin -->", "<!-- rows:end -->"
ROOT = Path(__file__).resolve().parent


def docs_with_tables(text: str) -> str:
    """``docs/card.md``'s text with the generated tables between its ``rows:begin`` / ``rows:end`` markers."""
    head, rest = text.split(DOCS_BEGIN, 1)
    return f"{head}{DOCS_BEGIN}\n{docs_tables()}{DOCS_END}{rest.split(DOCS_END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    """``python -m defend.rows --docs`` prints the field tables; ``--write`` regenerates ``card_schema.json`` and the
    tables in ``docs/card.md`` (a source checkout)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--docs"]:
        print(docs_tables())
        return 0
    if args != ["--write"]:
        print("usage: python -m defend.rows --docs | --write", file=sys.stderr)
        return 2
    schema_file, docs = ROOT / "card_schema.json", ROOT.parent / "docs" / "card.md"
    atomic_write_text(schema_file, _schema_text(generated_schema(json.loads(schema_file.read_text()))))
    atomic_write_text(docs, docs_with_tables(docs.read_text()))
    print(f"wrote {schema_file} and {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
