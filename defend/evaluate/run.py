"""``evaluate_system``: load and check a defended system, refuse to overwrite the user's files, measure the battery
(or re-score saved adversarial sets) and write the model card, its report, tables, figures and adversarial sets."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from .. import stats
from ..io import OutputGuard, atomic_write_text, guarded_outputs, write_error, write_json
from ..progress import progress_enabled
from ..provenance import noted_data, provenance
from ..typed_config import plain_dict
from .battery import Battery, load_battery, parse_battery
from .card import CARD_SCHEMA_VERSION, plain_json, validate_card, validate_results
from .certify import certification_rows
from .entry import entry_from_card, inputs_sha256
from .measure import (
    attack_inputs,
    autoattack_rows,
    check_set,
    clean_accuracy,
    detection_rows,
    rescore_sets,
    run_attacks,
    topk_rows,
)
from .preflight import check_not_reading_out, preflight
from .protocol import protocol_record
from .report import TABLES, load_sets, save_sets, write_figures, write_report, write_tables
from .system import System, load_system

__all__ = ["evaluate_system", "planned_outputs", "set_names", "battery_set_names", "card_files"]


def set_names(system: System, battery: Battery) -> list[str]:
    """The adversarial sets a run crafts, as ``<attack>_<interpreter>`` (their file names)."""
    return battery_set_names(battery, system.rts is not None,
                             system.detector_interpreters if system.detector is not None else None)


def battery_set_names(battery: Battery, rts: bool = False, detector: list[str] | None = None) -> list[str]:
    """The adversarial sets ``battery`` crafts for a system with an RTS network (``rts``) and a detector reading
    the interpreters ``detector`` (``None``: no detector), before the system is loaded."""
    names = list(battery.attacks.interpreters) + (["rts"] if rts else [])
    out = [f"{a}_{n}" for a in battery.attacks.attacks for n in names]
    out += [f"{a}_ensemble_{'-'.join(battery.adaptive.ensemble_interpreters)}" for a in battery.adaptive.ensemble]
    out += ["adaptive_rts_rts"] if rts else []
    out += [f"adaptive_detector_{'-'.join(detector)}"] if detector is not None else []
    return out


def planned_outputs(out: Path, system: System, battery: Battery, rescore: bool) -> list[Path]:
    """Every file a run may write into ``out`` (checked against the output manifest before anything runs)."""
    sets = [] if rescore else set_names(system, battery)
    return card_files(out, battery, sets=sets)


def card_files(out: Path, battery: Battery, rts: bool = False, detector: list[str] | None = None,
               sets: list[str] | None = None) -> list[Path]:
    """Every file an evaluation with ``battery`` may write into ``out`` (``sets``: the adversarial sets' names,
    default those of :func:`battery_set_names`; ``[]`` for a re-scoring run)."""
    files = ["card.json", "report.md", "battery.yaml", *TABLES, "maps.png", "attacks.png", "roc.png", "certified.png"]
    files += [f"adversarial/{n}.pt" for n in (battery_set_names(battery, rts, detector) if sets is None else sets)]
    return [out / f for f in files]


def evaluate_system(classifier: str, out: str | Path, *, rts: str | None = None, detector: str | None = None,
                    data: str | None = None, battery: str | Battery = "standard",
                    overrides: dict[str, Any] | None = None, data_overrides: dict[str, Any] | None = None,
                    inputs: str | None = None, overwrite: bool = False, progress: bool = True,
                    argv: list[str] | None = None, name: str | None = None, source: str | None = None,
                    defence: str | None = None) -> dict[str, Any]:
    """Evaluate the system (``classifier`` [+ ``rts``] [+ ``detector``] on ``data``) with ``battery`` and write the
    card into ``out``; with ``inputs`` (an earlier ``out``), re-score the system on the adversarial sets saved there
    instead of attacking. ``name`` (default: ``out``'s folder name), ``source`` (default ``this run``) and
    ``defence`` (a registered defence's name, default none) label the card's leaderboard ``entry``. Everything is
    checked before ``out`` is created. Returns the card (validated)."""
    check_label(name, source, defence)
    if isinstance(battery, Battery):
        battery, battery_yaml = parse_battery(yaml.safe_load(_dump(battery)))
    else:
        battery, battery_yaml = load_battery(battery, overrides)
    out = Path(out)
    check_not_reading_out(inputs, out)
    system = load_system(classifier, data, battery, rts=rts, detector=detector, data_overrides=data_overrides)
    sets = load_sets(inputs) if inputs is not None else None
    for s in sets or []:
        check_set(s, system, s.meta["file"])
    guard = OutputGuard(out, overwrite=overwrite)
    planned = planned_outputs(out, system, battery, sets is not None)
    guard.refuse(planned)
    preflight(system, battery, out, planned, inputs=inputs, rescore=sets is not None, argv=argv)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc) from None
    wall = time.time()
    noted_data(reset=True)
    with guarded_outputs(guard), progress_enabled(progress):
        label = {"name": name or Path(os.path.abspath(out)).name, "source": source, "defence": defence}
        card = _measure(system, battery, battery_yaml, out, sets, inputs, progress, wall, argv, label)
    return card


def check_label(name: str | None, source: str | None, defence: str | None) -> None:
    """Refuse (one line) an empty entry ``name`` or ``source``, and a ``defence`` that is not a registered defence's
    name (the choices listed)."""
    for flag, value in (("--name", name), ("--source", source)):
        if value is not None and not value.strip():
            raise ValueError(f"{flag} is empty: give a non-empty text or leave {flag} out")
    if defence is None:
        return
    from ..defences import defence_names

    names = defence_names()
    if defence not in names:
        raise ValueError(f"--defence: '{defence}' is not a registered defence; choose from {', '.join(names)}")


def _dump(battery: Battery) -> str:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--cfg", type=Battery)
    text = parser.dump(parser.parse_object({"cfg": plain_dict(battery)}), skip_none=False)
    return "\n".join(line[2:] for line in text.splitlines()[1:]) + "\n"


def _measure(system: System, battery: Battery, battery_yaml: str, out: Path, sets: list[Any] | None,
             inputs: str | None, progress: bool, wall: float, argv: list[str] | None,
             label: dict[str, Any]) -> dict[str, Any]:
    say = print if progress else (lambda *a, **k: None)
    results: dict[str, Any] = {"clean_accuracy": clean_accuracy(system, battery), "autoattack": [],
                               "interpretation_robustness": [], "attacks": [], "transfer": [], "detection": None}
    clean = results["clean_accuracy"]
    say(f"[evaluate] clean accuracy {stats.format_value(clean['value'], clean['value_ci_low'], clean['value_ci_high'], clean['n'])}")
    if clean["at_chance"]:  # a warning even when quiet: every robust figure of this card means nothing
        print(f"[evaluate] warning: the classifier is at chance (clean accuracy {clean['value']:.3f}, Wilson lower "
              f"bound {clean['value_ci_low']:.3f} <= 1/{system.data.num_classes} + 0.1): its robust and "
              "interpretation figures are not meaningful (the card flags them)", file=sys.stderr, flush=True)
    benign: dict[str, Any] = {}
    files: list[str] = []
    if sets is None:
        x = attack_inputs(system, battery)
        n_inputs = int(x["image"].shape[0])
        results["autoattack"] = autoattack_rows(system, battery) if battery.autoattack.eps else []
        say("[evaluate] AutoAttack done" if battery.autoattack.eps else "[evaluate] AutoAttack skipped")
        results["interpretation_robustness"] = topk_rows(system, x, battery)
        say("[evaluate] top-k interpretation robustness done")
        results["attacks"], results["transfer"], sets, benign = run_attacks(system, x, battery, progress)
        say("[evaluate] interpretation attacks done")
    else:
        n_inputs = int(sum(s.x.shape[0] for s in sets))
        results["attacks"] = rescore_sets(system, sets, battery)
    if system.detector is not None:
        results["detection"] = detection_rows(system, sets, battery, sweep=inputs is None)
        say("[evaluate] detection done")
    results["certification"] = certification_rows(system, battery)
    say("[evaluate] certificates done" if battery.certify is not None else "[evaluate] certificates skipped")
    label = {**label, "inputs_sha256": inputs_sha256(system.data)}
    digest = noted_data()
    validate_results(plain_json(results))
    if inputs is None:
        files = save_sets(out, sets, {"seed": int(battery.seed), "classifier_sha256": system.classifier_sha256,
                                      "data_digest": digest})
    results = plain_json(results)
    figures = write_figures(out, system, [s for s in sets if inputs is None], benign, results,
                            int(battery.n_figure))
    tables = write_tables(out, results)
    card = _card(system, battery_yaml, results, {"report": "report.md", "tables": tables, "figures": figures,
                                                 "adversarial": files}, digest, n_inputs, sets, inputs, wall, argv,
                 label)
    atomic_write_text(out / "battery.yaml", battery_yaml)
    write_report(out, card)
    validate_card(card)
    write_json(out / "card.json", card)
    say(f"[evaluate] card written in {card['provenance']['seconds']:.0f} s -> {out / 'card.json'}")
    return card


#: the sections of a card whose figures mean nothing when the classifier is at chance
UNMEANING_AT_CHANCE = ("autoattack", "interpretation_robustness", "attacks", "transfer", "detection")


def validity(results: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Whether the robust and interpretation figures mean anything: not when the classifier is at chance (the Wilson
    lower bound of its clean accuracy at or below ``1/K + 0.1``); the figures stay in the card, flagged here."""
    c = results["clean_accuracy"]
    if not c["at_chance"]:
        return {"meaningful": True, "reason": None, "sections": []}
    low = c.get("value_ci_low")
    return {"meaningful": False, "sections": list(UNMEANING_AT_CHANCE),
            "reason": f"the classifier is at chance: clean accuracy {c['value']:.3f} (Wilson 95 % lower bound "
                      f"{'-' if low is None else format(low, '.3f')}, n {c['n']}) is not clearly above "
                      f"1/{num_classes} + 0.1"}


def _card(system: System, battery_yaml: str, results: dict[str, Any], files: dict[str, Any], digest: str | None,
          n_inputs: int, sets: list[Any], inputs: str | None, wall: float, argv: list[str] | None,
          label: dict[str, Any]) -> dict[str, Any]:
    """The card: every section measured, then its ``protocol`` and leaderboard ``entry`` (``label``: the entry's
    ``name``, ``source``, ``defence`` and ``inputs_sha256``) from them."""
    dm = system.data
    battery = yaml.safe_load(battery_yaml)
    data = {"spec": system.data_spec, "name": str(getattr(dm, "name", type(dm).__name__)),
            "num_classes": int(dm.num_classes), "class_names": [str(c) for c in dm.class_names],
            "image_shape": [int(v) for v in dm.image_shape], "split": "test", "digest": digest,
            "n_attack_inputs": n_inputs}
    source = None if inputs is None else {
        "dir": str(inputs), "sets": [{"file": s.meta.get("file"), "attack": s.attack, "interpreter": s.interpreter,
                                      "n": int(s.x.shape[0]), "crafted_on": s.meta.get("classifier_sha256"),
                                      "budget": s.budget} for s in sets]}
    card = {"schema": "idls-defend-card", "schema_version": CARD_SCHEMA_VERSION,
            "mode": "evaluate" if inputs is None else "rescore", "system": system.describe(), "data": data,
            "battery": battery, "protocol": protocol_record(battery, label.get("defence")), "results": results,
            "validity": validity(results, int(dm.num_classes)), "files": files, "inputs": source,
            "provenance": provenance(wall, int(battery["seed"]), digest, argv)}
    card = plain_json(card)
    card["entry"] = plain_json(entry_from_card(card, **label))
    return card
