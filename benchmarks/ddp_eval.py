"""The same attack evaluation on 1 process and on N DDP processes: same figures, wall-time ratio.

    python benchmarks/ddp_eval.py --out runs/bench/ddp_eval [--config configs/experiments/attacks.yaml]
        [--preset configs/trainer/ddp_cpu.yaml] [--quick] [--KEY.PATH=VALUE ...]

Runs ``defend experiment`` twice (the resume cache off, so both runs attack every input), then compares every
numeric field of the rows (``asr``, ``l1``, ``iou``, ...) and writes ``OUT/metrics.json``: one row per compared
field with the largest absolute difference, plus a ``wall`` row with both wall times and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defend.io import write_json  # noqa: E402

FIELDS = ("asr", "confidence", "l1", "l2", "iou", "noise_rate", "linf", "transfer_l1", "transfer_iou")


def run(config: str, extra: list[str], out: Path, quick: bool, sets: list[str]) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "defend.cli", "experiment", "-c", config, *extra, "--out", str(out), "--no-progress",
           "--evaluation.cache_dir=null", *sets]
    if quick:
        cmd.append("--quick")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text()), wall


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/experiments/attacks.yaml")
    p.add_argument("--preset", default="configs/trainer/ddp_cpu.yaml", help="the multi-process trainer preset")
    p.add_argument("--quick", action="store_true")
    args, sets = p.parse_known_args(argv)  # --KEY.PATH=VALUE: defend experiment's overrides, passed on
    out = Path(args.out)
    one, t1 = run(args.config, [], out / "one", args.quick, sets)
    many, tn = run(args.config, ["-c", args.preset], out / "many", args.quick, sets)
    if len(one) != len(many):
        raise SystemExit(f"row counts differ: {len(one)} vs {len(many)}")
    procs = max(r.get("processes", 1) for r in many)
    rows = []
    for f in FIELDS:
        diffs = [abs(a[f] - b[f]) for a, b in zip(one, many) if isinstance(a.get(f), float) and isinstance(b.get(f), float)]
        if diffs:
            rows.append({"field": f, "max_abs_diff": max(diffs), "rows": len(diffs)})
    rows.append({"field": "wall", "seconds_one_process": t1, "seconds_ddp": tn, "processes": procs,
                 "time_ratio_ddp_vs_one": tn / t1, "n_inputs": one[0].get("n")})
    write_json(out / "metrics.json", rows)
    for r in rows:
        print(r)
    return rows


if __name__ == "__main__":
    main()
