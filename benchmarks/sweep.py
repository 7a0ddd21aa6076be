"""Tune one or more config values of an experiment on the development split, and choose among them there.

    python benchmarks/sweep.py -c configs/experiments/robust.yaml --out runs/sweep_gamma \
        --grid training.module.gamma=0.5,1,2 \
        '--models=[{name: int_adv, module: {mode: int_adv, ce_attack: pgd}}]' \
        --score 'accuracy@measure=accuracy,attack=pgd-ce,eps_255=8' \
        --score 'kendall_tau@measure=interpretation,attack=topk,eps_255=8'

Every configuration of the grid (the cartesian product of the ``--grid`` values, over the config and the other
``--KEY.PATH=VALUE`` overrides, passed on as given) is run as ``defend experiment ... --evaluation.split=dev --out OUT/<i>``; its score is the sum of the ``--score``
fields (``FIELD@KEY=VALUE,...``: the field of the one ``metrics.json`` row whose keys match) on the development split.
The choice is :func:`defend.selection.select_best`, which refuses rows of any other split (each row records its own
split), so a sweep can never select on the test split. ``OUT/sweep.json`` lists every configuration tried, its score,
the one chosen and how many were tried (what docs/results.md must state beside the final figure, which is then
measured once on the test split with the chosen values). Slow (one experiment per configuration); not a test.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from defend.experiments.runner import main as experiment
from defend.selection import select_best


def _grid(items: list[str]) -> list[dict[str, Any]]:
    keys, values = [], []
    for item in items:
        key, _, vals = item.partition("=")
        if not key or not vals:
            raise SystemExit(f"sweep: --grid expects KEY=V1,V2,..., got {item!r}")
        keys.append(key)
        values.append([yaml.safe_load(v) for v in vals.split(",")])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _parse_score(spec: str) -> tuple[str, dict[str, str]]:
    field, _, where = spec.partition("@")
    match = dict(kv.split("=", 1) for kv in where.split(",") if kv)
    return field, match


def score(rows: list[dict[str, Any]], specs: list[str]) -> tuple[float, str]:
    """The sum of the ``--score`` fields, and the split their rows were measured on (one split, or an error)."""
    total, splits = 0.0, set()
    for spec in specs:
        field, match = _parse_score(spec)
        hits = [r for r in rows if all(str(r.get(k)) == v for k, v in match.items())]
        if len(hits) != 1 or hits[0].get(field) is None:
            raise SystemExit(f"sweep: --score {spec!r} matches {len(hits)} rows with a value; name one row")
        total += float(hits[0][field])
        splits.add(str(hits[0].get("split")))
    if len(splits) != 1:
        raise SystemExit(f"sweep: the scored rows come from several splits {sorted(splits)}")
    return total, splits.pop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("-c", "--config", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...")
    p.add_argument("--score", action="append", required=True, metavar="FIELD@KEY=VALUE,...")
    p.add_argument("--split", default="dev", help="the split the configurations are measured on (dev; test is "
                                                   "refused by the selection)")
    p.add_argument("--quick", action="store_true")
    args, overrides = p.parse_known_args(argv)  # --KEY.PATH=VALUE: defend experiment's overrides
    out = Path(args.out)
    tried = []
    for i, values in enumerate(_grid(args.grid)):
        run = out / f"{i:02d}"
        sets = [*overrides, f"--evaluation.split={args.split}", *(f"--{k}={json.dumps(v)}" for k, v in values.items())]
        argv_i = [a for c in args.config for a in ("-c", c)] + ["--out", str(run), "--no-progress"]
        argv_i += sets + (["--quick"] if args.quick else [])
        if experiment(argv_i) != 0:
            return 2
        rows = json.loads((run / "metrics.json").read_text())
        value, split = score(rows, args.score)
        tried.append({"run": str(run), "values": values, "score": value, "split": split})
        print(f"[sweep] {i}: {values} -> {value:.4f} ({split})", flush=True)
    try:
        best = select_best(tried, lambda t: t["score"], tried[0]["split"], "the sweep")
    except ValueError as exc:  # e.g. the configurations were measured on the test split: one line, nothing chosen
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    if any(t["split"] != best["split"] for t in tried):
        raise SystemExit("sweep: the configurations were measured on different splits")
    report = {"configurations_tried": len(tried), "score": args.score, "grid": args.grid, "overrides": overrides,
              "tried": tried, "chosen": best}
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    print(f"[sweep] chose {best['values']} (score {best['score']:.4f} on the {best['split']} split) of "
          f"{len(tried)} configurations -> {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
