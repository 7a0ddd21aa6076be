"""Seconds per adversarial input of ADV2 (PGD) at the papers' iteration counts, next to the AdvEdge paper's Table III.

    python benchmarks/paper_cost.py --out runs/bench/paper_cost --device cuda [--batch-size 16]
        [--budget-seconds 25] [--interpreters grad cam mask rts] [--bf16] [--channels-last] [--tiny]

The attack of every interpreter is ADV2 on PGD with the ADV2 paper's Appendix B settings (Table 10, ResNet; as
``configs/experiments/attacks_imagenet.yaml`` reads them): eps 0.031, alpha 1/255, a 400-step PGD warm start, then
the joint stage of GRAD 800, CAM 1200, MASK 1000 (4 inner mask steps, 4 lookahead steps, a fresh MASK solve every 50
steps, 12 step-size search steps up to alpha_max 0.08) and RTS 1200 steps, on an untrained ResNet-50 at 224 px
(weights do not change the cost) and an untrained RTS network.

For each interpreter the per-step costs are measured first (as ``attack_speed.py`` does: two short runs of the
joint stage, and of the plain PGD warm start, whose difference cancels setup), plus the setup (benign map, the
term's initial state, the final scoring) and, for MASK, one periodic-reset solve. They predict the whole attack's
time::

    predicted = setup + warm * t_pgd + steps * t_joint + (steps // reset_every) * t_reset

When the prediction fits in what is left of ``--budget-seconds`` (per interpreter) the whole attack is run on the
batch and its wall time is the figure (``measured``; the prediction is kept next to it as a check); otherwise the
prediction is the figure (``extrapolated``). Seconds per input = seconds / batch size, and the speed-up is
Table III's seconds per input over ours. ``--tiny``: small_cnn at 32 px, every iteration count divided by 100.

Writes ``OUT/metrics.json`` (one row per interpreter) and ``OUT/table.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attack_speed import device_name, load_model, make_batch, rts_interpreter, set_tf32, timed  # noqa: E402

from attacks import ADV2, build_attack, frozen  # noqa: E402
from defend.io import atomic_write_text, write_json  # noqa: E402

#: ADV2 paper, Appendix B, Table 10 (PGD, ResNet): joint-stage steps and l_int weights (c of RTS: the tuned default)
PAPER: dict[str, dict[str, Any]] = {
    "grad": {"steps": 800, "c": 0.007},
    "cam": {"steps": 1200, "c": 0.204},
    "mask": {"steps": 1000, "c": 1.0, "mask_search_steps": 12, "mask_alpha_max": 0.08},
    "rts": {"steps": 1200},
}
#: the shared PGD settings of Table 10 and the warm start of configs/experiments/attacks_imagenet.yaml
WARM_STEPS, EPS, ALPHA = 400, 0.031, 1 / 255
#: MASK: inner / lookahead steps per attack step, the reset period and the MASK solve (iterations, mask size at 224 px)
MASK_TERM = {"inner_steps": 4, "lookahead_steps": 4, "lookahead_lr": 0.1, "reset_every": 50}
MASK_INTERPRETER = {"iterations": 300, "lr": 0.1, "size_at_224": 28}
#: AdvEdge paper, Table III: ADV2 (PGD) on ResNet-50, seconds per input
TABLE3 = {"grad": 32.68, "cam": 15.37, "mask": 188.97, "rts": 8.75}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring); ``--tiny`` fills in the small defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="small_cnn at 32 px, iteration counts / 100, batch 4")
    p.add_argument("--arch", default=None, help="zoo architecture (default resnet50; tiny: small_cnn)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (tiny: 32)")
    p.add_argument("--num-classes", type=int, default=None, help="default 1000 (tiny: 10)")
    p.add_argument("--width", type=int, default=None, help="width of a zoo model that has one (tiny: 8)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (tiny: 4)")
    p.add_argument("--scale", type=float, default=None, help="factor on every iteration count (default 1; tiny 0.01)")
    p.add_argument("--budget-seconds", type=float, default=25.0,
                   help="per interpreter: measurement plus the whole attack must fit, else extrapolate (capped so "
                        "that every interpreter fits in $STEP_LIMIT when the GPU suite sets it)")
    p.add_argument("--interpreters", nargs="+", default=list(PAPER), choices=list(PAPER))
    p.add_argument("--measure-steps", type=int, nargs=2, default=[2, 6], metavar=("S_LO", "S_HI"))
    p.add_argument("--repeats", type=int, default=1, help="timed runs per step count; the fastest is kept")
    p.add_argument("--bf16", action="store_true", help="the engine's bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", default="default", choices=["default", "on", "off"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.checkpoint = None  # attack_speed.load_model: always an untrained zoo model here
    tiny = {"arch": "small_cnn", "image_size": 32, "num_classes": 10, "width": 8, "batch_size": 4, "scale": 0.01}
    full = {"arch": "resnet50", "image_size": 224, "num_classes": 1000, "width": None, "batch_size": 16, "scale": 1.0}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    step_limit = os.environ.get("STEP_LIMIT")
    if step_limit:  # the suite's time limit for this whole script: startup, then every interpreter's share
        args.budget_seconds = min(args.budget_seconds, max(0.0, (float(step_limit) - 20) / len(args.interpreters)))
    lo, hi = args.measure_steps
    if not 1 <= lo < hi:
        p.error(f"--measure-steps needs 1 <= S_LO < S_HI, got {lo} {hi}")
    if args.batch_size < 1 or not args.scale > 0 or args.budget_seconds < 0 or args.repeats < 1:
        p.error("--batch-size, --scale and --repeats must be positive, --budget-seconds >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


def scaled(n: int, scale: float) -> int:
    """An iteration count times ``scale``, at least 1."""
    return max(1, round(n * scale))


def schedule(interpreter: str, scale: float) -> dict[str, int]:
    """Warm-start steps, joint steps and (MASK) the reset period and solve iterations at ``scale``."""
    out = {"warm_steps": scaled(WARM_STEPS, scale), "steps": scaled(PAPER[interpreter]["steps"], scale)}
    if interpreter == "mask":
        out["reset_every"] = scaled(MASK_TERM["reset_every"], scale)
        out["mask_iterations"] = scaled(MASK_INTERPRETER["iterations"], scale)
    return out


def build(interpreter: str, model: torch.nn.Module, warm: int, steps: int, sched: dict[str, int],
          args: argparse.Namespace, resets: bool = True) -> ADV2:
    """ADV2 (PGD) against ``interpreter`` with Table 10's options, ``warm`` + ``steps`` iterations (``steps=0``: the
    plain PGD warm start); ``resets=False`` turns the periodic MASK reset off (measured separately)."""
    opts: dict[str, Any] = {k: v for k, v in PAPER[interpreter].items() if k != "steps"}
    opts.update(warm_steps=warm, steps=steps, eps=EPS, alpha=ALPHA, seed=args.seed,
                autocast="bf16" if args.bf16 else None)
    if interpreter == "grad":
        opts["interpreter_options"] = {"grad": {"score": "prob"}}
    if interpreter == "mask":
        size = max(1, round(MASK_INTERPRETER["size_at_224"] * args.image_size / 224))
        opts["interpreter_options"] = {"mask": {"size": size, "iterations": sched["mask_iterations"],
                                                "lr": MASK_INTERPRETER["lr"]}}
        opts["term_options"] = {"mask": {**MASK_TERM, "reset_every": sched["reset_every"] if resets else 10 ** 9}}
    if steps == 0:
        return build_attack("pgd", "pgd", None, warm_steps=warm, eps=EPS, alpha=ALPHA, seed=args.seed,
                            autocast=opts["autocast"])
    target = rts_interpreter(model, args.channels_last) if interpreter == "rts" else interpreter
    return build_attack("adv2", "pgd", target, **opts)


def fastest(attack: ADV2, model, x, y_t, repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` timed runs of the attack on the batch."""
    return min(timed(lambda: attack(model, x, y_t), device) for _ in range(repeats))


def rates(interpreter: str, model, x, y_t, sched: dict[str, int], args: argparse.Namespace,
          device: torch.device) -> dict[str, float]:
    """Per-step seconds of the warm start (``t_pgd``) and of the joint stage (``t_joint``), the setup and the
    seconds of one MASK reset solve (``t_reset``), each on the batch."""
    lo, hi = args.measure_steps
    build(interpreter, model, 0, lo, sched, args, resets=False)(model, x, y_t)  # warm-up (cudnn, allocator)
    pgd = {s: fastest(build(interpreter, model, s, 0, sched, args), model, x, y_t, args.repeats, device) for s in (lo, hi)}
    joint = {s: fastest(build(interpreter, model, 0, s, sched, args, resets=False), model, x, y_t, args.repeats, device)
             for s in (lo, hi)}
    t_pgd = max(pgd[hi] - pgd[lo], 1e-9) / (hi - lo)
    t_joint = max(joint[hi] - joint[lo], 1e-9) / (hi - lo)
    out = {"t_pgd": t_pgd, "t_joint": t_joint, "setup": max(joint[lo] - lo * t_joint, 0.0), "t_reset": 0.0}
    if interpreter == "mask":
        term = build(interpreter, model, 0, 1, sched, args).term
        with frozen(model):
            out["t_reset"] = timed(lambda: term.interpreter.solve(model, x, y_t, iterations=term.reset_iterations), device)
    return out


def cost_row(interpreter: str, model, x, y_t, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Predict the whole attack's time from measured rates; run it when it fits the budget (``measured``)."""
    start = time.perf_counter()
    sched = schedule(interpreter, args.scale)
    r = rates(interpreter, model, x, y_t, sched, args, device)
    n_resets = sched["steps"] // sched["reset_every"] if interpreter == "mask" else 0
    predicted = r["setup"] + sched["warm_steps"] * r["t_pgd"] + sched["steps"] * r["t_joint"] + n_resets * r["t_reset"]
    left = args.budget_seconds - (time.perf_counter() - start)
    row: dict[str, Any] = {"interpreter": interpreter, **sched, "n_resets": n_resets, **{k: r[k] for k in r},
                           "predicted_seconds": predicted, "budget_seconds": args.budget_seconds}
    if predicted <= left:
        attack = build(interpreter, model, sched["warm_steps"], sched["steps"], sched, args)
        holder: dict[str, Any] = {}
        seconds = timed(lambda: holder.setdefault("res", attack(model, x, y_t)), device)
        row.update(status="measured", seconds=seconds, measured_over_predicted=seconds / max(predicted, 1e-12),
                   asr=float(holder["res"].success.float().mean()))
    else:
        row.update(status="extrapolated", seconds=predicted, measured_over_predicted=None, asr=None)
    row["seconds_per_input"] = row["seconds"] / x.shape[0]
    row["table3_seconds_per_input"] = TABLE3[interpreter]
    row["speedup_vs_table3"] = TABLE3[interpreter] / row["seconds_per_input"] if args.scale == 1 else None
    row["wall_seconds"] = time.perf_counter() - start
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| interpreter | warm + joint steps | batch | status | s / input | Table III s / input | speed-up | "
             "predicted s (batch) | note |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['interpreter']} | - | {r['batch_size']} | failed | - | {r['table3_seconds_per_input']} "
                         f"| - | - | {r['error']} |")
            continue
        speed = "-" if r["speedup_vs_table3"] is None else f"{r['speedup_vs_table3']:.1f}x"
        note = f"{r['n_resets']} resets, {r['t_reset']:.3g} s each" if r["interpreter"] == "mask" else ""
        lines.append(f"| {r['interpreter']} | {r['warm_steps']} + {r['steps']} | {r['batch_size']} | {r['status']} | "
                     f"{r['seconds_per_input']:.4g} | {r['table3_seconds_per_input']} | {speed} | "
                     f"{r['predicted_seconds']:.4g} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per interpreter; ``OUT/metrics.json`` is rewritten after each."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tf32 = set_tf32(args.tf32) if device.type == "cuda" else None
    model = load_model(args, device)
    x, y_t = make_batch(args.batch_size, int(getattr(model, "in_channels", 3)), args.image_size, args.num_classes,
                        args.seed, device, args.channels_last)
    info = {"device": device_name(device), "arch": args.arch, "image_size": args.image_size,
            "batch_size": args.batch_size, "dtype": "bf16-autocast" if args.bf16 else "fp32",
            "channels_last": bool(args.channels_last), "scale": args.scale, "tf32": tf32, "eps": EPS, "alpha": ALPHA,
            "torch": torch.__version__}
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    for interpreter in args.interpreters:
        try:
            rows.append({**cost_row(interpreter, model, x, y_t, args, device), **info})
        except Exception as exc:  # one interpreter failing (an OOM) should not lose the others
            rows.append({"interpreter": interpreter, "status": "failed", **info,
                         "table3_seconds_per_input": TABLE3[interpreter],
                         "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r = rows[-1]
        print(f"[paper_cost] {interpreter:<5} {r['status']:<12} "
              f"{r.get('seconds_per_input', float('nan')):.4g} s/input", file=sys.stderr, flush=True)
        write_json(out / "metrics.json", rows)
    table = markdown(rows)
    atomic_write_text(out / "table.md", table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
