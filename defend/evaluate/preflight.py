"""The pre-flight of ``defend evaluate``: everything the run will need, checked after the system is loaded and before
``--out`` is created or any model is measured, so that a bad input is a one-line error after seconds, not after
AutoAttack and the attacks ran (and never a half-written output folder).

It checks where the run reads and writes (``--inputs`` apart from ``--out``; ``--out`` and every planned output of
the right kind and writable, probed with a temporary file; every name the card or report will hold valid UTF-8), builds
every interpreter and attack the battery names with its options (no model is run), and fits the battery's sizes to
the data (``n_images`` / ``autoattack.n`` against the test split, ``topk.k`` / ``topk.ks`` against each interpreter's
map, AutoAttack's version for the class count)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from attacks import BALL_ATTACKS
from attacks.state import frozen

from ..autoattack import autoattack_plan
from ..io import WriteError
from ..robust_eval import native_map
from .battery import Battery
from .measure import build_plan, topk_attack
from .system import System, interpreters_for

__all__ = ["preflight", "check_not_reading_out", "check_names_utf8", "check_output_paths", "check_builds",
           "check_sizes", "map_pixels"]


def preflight(system: System, battery: Battery, out: Path, planned: list[Path], *, inputs: str | None = None,
              rescore: bool = False, argv: list[str] | None = None) -> None:
    """Every check of the module docstring; raises a one-line user error (nothing is written but removed probes)."""
    check_not_reading_out(inputs, out)
    check_names_utf8(_named_strings(system, out, inputs, argv))
    check_output_paths(out, planned)
    check_builds(system, battery, rescore)
    check_sizes(system, battery, rescore)


# ------------------------------------------------------------------------------------------------ paths
def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_not_reading_out(inputs: str | None, out: Path) -> None:
    """A re-score never reads from the folder it writes: ``--inputs`` (or the run folder of its ``adversarial/``)
    may not be, hold or lie inside ``--out``."""
    if inputs is None:
        return
    src, dst = Path(os.path.abspath(inputs)), Path(os.path.abspath(out))
    roots = [src] + ([src.parent] if src.name == "adversarial" else [])
    if any(_overlap(r, dst) for r in roots):
        raise ValueError(f"--inputs {inputs} and --out {out} overlap: a re-score writes a new card beside the sets it "
                         "reads; give an --out outside the --inputs folder")


def _named_strings(system: System, out: Path, inputs: str | None, argv: list[str] | None) -> list[tuple[str, str]]:
    """``(what, text)`` of every name the card, report or figures will hold."""
    named = [("--out", str(out)), ("--classifier", system.classifier_path), ("--rts", system.rts_path),
             ("--detector", system.detector_path), ("--inputs", inputs)]
    named += [("--data", s) for s in _strings(system.data_spec)]
    named += [("class name", str(c)) for c in getattr(system.data, "class_names", []) or []]
    named += [("the command line", a) for a in argv or []]
    return [(what, text) for what, text in named if text is not None]


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def check_names_utf8(named: Iterable[tuple[str, str]]) -> None:
    """Each name encodes in UTF-8 (a file name with a byte that is not, read through ``surrogateescape``, would
    make ``report.md`` / ``card.json`` unwritable at the very end of the run)."""
    for what, text in named:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(text)
            raise ValueError(f"{what}: the name {raw!r} is not valid UTF-8 (it goes into card.json and report.md); "
                             "rename it to a UTF-8 name") from None


def _existing_ancestor(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_paths(out: Path, planned: list[Path]) -> None:
    """``out`` and each folder the run writes into are directories or can be created, no planned file is a
    directory, and each folder is writable (a temporary file is created there and removed)."""
    out = Path(os.path.abspath(out))
    folders = sorted({out} | {Path(os.path.abspath(p)).parent for p in planned}, key=lambda p: len(p.parts))
    for d in folders:
        base = _existing_ancestor(d)
        if not base.is_dir():
            into = "" if base == d else f" (it writes into {d})"
            raise FileExistsError(f"--out: {base} is a file where the run needs a folder{into}; move it away or "
                                  "choose another --out")
    for p in planned:
        if os.path.isdir(p):
            raise IsADirectoryError(f"--out: {p} is a directory, but the run writes a file there; move it away or "
                                    "choose another --out")
    for base in dict.fromkeys(_existing_ancestor(d) for d in folders):
        _probe(base)


def _probe(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``; a failure is a one-line :class:`~defend.io.WriteError`."""
    try:
        fd, name = tempfile.mkstemp(prefix=".defend-probe-", dir=folder)
    except OSError as exc:
        raise WriteError(f"--out: cannot write in {folder}: {exc.strerror or exc}; choose a writable --out "
                         "(nothing was run)") from None
    os.close(fd)
    os.unlink(name)


# ------------------------------------------------------------------------------------------------ builds
def _interpreter_names(system: System, battery: Battery, rescore: bool) -> tuple[list[str], list[str]]:
    """``(attacked, topk)``: the interpreters the attacks target and read, and those the top-k attack measures."""
    rts = ["rts"] if system.rts is not None else []
    attacked = list(battery.attacks.interpreters) + rts
    t = battery.topk
    topk = [] if rescore else list(t.interpreters) + (rts if t.with_rts and t.interpreters else [])
    return attacked, topk


def check_builds(system: System, battery: Battery, rescore: bool) -> None:
    """Build every interpreter (with ``interpreter_options``), every attack of the plan (with the attack options)
    and every top-k attack the run will use, without running a model; a bad option is a one-line error."""
    attacked, topk = _interpreter_names(system, battery, rescore)
    extra = list(battery.adaptive.ensemble_interpreters) + list(system.detector_interpreters)
    try:
        interps = interpreters_for(system, list(dict.fromkeys(attacked + topk + extra)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"battery: interpreter_options: {_text(exc)}") from None
    if rescore:
        return
    try:
        build_plan(system, {n: interps[n] for n in attacked}, battery)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"battery: attacks / adaptive options: {_text(exc)}; fix attacks.options, "
                         "attacks.per_interpreter or adaptive.options") from None
    for name in topk:
        try:
            attack, options = topk_attack(battery)
            BALL_ATTACKS.build(attack, eps=float(battery.topk.eps), interpreter=interps[name], **options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"battery: topk ({name}): {_text(exc)}") from None


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ------------------------------------------------------------------------------------------------ sizes
def map_pixels(system: System, interpreter: Any) -> int:
    """Pixels of ``interpreter``'s map on its own grid (what ``topk.k`` and ``topk.ks`` count), from one test image."""
    x = system.data.test_dataset[0]["image"].unsqueeze(0)
    with frozen(system.classifier):
        m = native_map(interpreter, system.classifier, x, torch.zeros(1, dtype=torch.long))
    return int(m[0].numel())


def check_sizes(system: System, battery: Battery, rescore: bool = False) -> None:
    """The battery's counts fit the data: ``n_images`` test inputs exist (a shorter run would be reported as if it
    had them), ``topk.n`` <= ``n_images``, ``topk.k`` and every ``topk.ks`` fit each top-k interpreter's map, and
    AutoAttack has a version for the class count. ``autoattack.n`` is a cap, not a count: the first ``n`` test
    inputs or all of them where the split has fewer (RobustBench's rule, and bench-v1's); the row's ``n`` and note
    say how many were measured."""
    n_test = len(system.data.test_dataset)
    if int(battery.n_images) > n_test:
        raise ValueError(f"n_images ({battery.n_images}) exceeds the {n_test} test inputs of the data; lower n_images")
    if battery.autoattack.eps and not rescore:
        autoattack_plan(int(system.data.num_classes))
    t = battery.topk
    if t.n is not None and int(t.n) > int(battery.n_images):
        raise ValueError(f"topk.n ({t.n}) exceeds n_images ({battery.n_images}): the top-k attack runs on the attacked "
                         "inputs; lower topk.n")
    for name, interp in interpreters_for(system, _interpreter_names(system, battery, rescore)[1]).items():
        pixels = map_pixels(system, interp)
        big = [int(k) for k in [t.k, *t.ks] if int(k) > pixels]
        if big:
            raise ValueError(f"topk: k / ks {big} exceed the {pixels} pixels of the '{name}' map (its own grid); "
                             f"set topk.k and topk.ks to at most {pixels}")
