"""Per-step cost of every attack variant relative to one plain PGD step, and attack throughput.

    python benchmarks/attack_speed.py --out runs/bench/attack_speed [--device cpu|cuda] [--arch small_cnn]
        [--image-size 32] [--batch-sizes 8 32 128] [--repeats 3] [--bf16] [--checkpoint PATH]

For one model and batch, every variant is run as ``ADV2(...)`` with ``warm_steps=0, steps=S`` (the joint
stage only; the plain ``pgd`` baseline with ``warm_steps=S, steps=0``) for two step counts ``S_lo < S_hi``.
The per-step time is ``(t(S_hi) - t(S_lo)) / (S_hi - S_lo)`` with ``t`` the fastest of ``--repeats`` runs,
so setup costs (target maps, the initial MASK solve, edge maps, the final forward) cancel. CUDA is
synchronised around every timed call. Weights do not change the timing, so the model is untrained unless
``--checkpoint`` is given. Writes ``OUT/metrics.json`` (a list of rows) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from attacks import ADV2, build_attack, random_targets  # noqa: E402
from defend.io import write_json  # noqa: E402

#: variant -> (attack name, framework, interpreter); ``cw`` / ``stadv`` are ADV2 (CAM) in those frameworks.
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "pgd": ("pgd", "pgd", None),
    "adv2_cam": ("adv2", "pgd", "cam"),
    "adv2_grad": ("adv2", "pgd", "grad"),
    "adv2_mask": ("adv2", "pgd", "mask"),
    "adv2_rts": ("adv2", "pgd", "rts"),
    "advedge_cam": ("advedge", "pgd", "cam"),
    "advedge_plus_cam": ("advedge_plus", "pgd", "cam"),
    "cw": ("adv2", "cw", "cam"),
    "stadv": ("adv2", "stadv", "cam"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (metrics.json is written there)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="small_cnn", help="zoo architecture (ignored with --checkpoint)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per step count; the fastest is kept")
    p.add_argument("--steps", type=int, nargs=2, default=[3, 13], metavar=("S_LO", "S_HI"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--mask-inner-steps", type=int, default=4, help="inner steps k of the MASK term")
    p.add_argument("--mask-search-steps", type=int, default=4,
                   help="binary-search steps of the per-image MASK step size (0: fixed step)")
    p.add_argument("--bf16", action="store_true", help="run the attacks under bfloat16 autocast")
    p.add_argument("--checkpoint", default=None, help="classifier artifact (defend.classifier.load_classifier)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: leave the default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lo, hi = args.steps
    if not 1 <= lo < hi:
        p.error(f"--steps needs 1 <= S_LO < S_HI, got {lo} {hi}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


def load_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    if args.checkpoint:
        from defend.classifier import load_classifier

        model = load_classifier(args.checkpoint)
    else:
        from defend.models import build_classifier

        torch.manual_seed(args.seed)
        model = build_classifier(args.arch, args.num_classes, input_size=args.image_size)
    return model.to(device).eval()


def make_attack(variant: str, steps: int, mask_inner_steps: int, model: torch.nn.Module | None = None,
                mask_search_steps: int = 4) -> ADV2:
    name, framework, interpreter = VARIANTS[variant]
    schedule = {"warm_steps": steps, "steps": 0} if name == "pgd" else {"warm_steps": 0, "steps": steps}
    options: dict[str, Any] = dict(framework=framework, seed=0, **schedule)
    if framework == "pgd":
        options["framework_options"] = {"eps": 8 / 255, "alpha": 1 / 255}
    if interpreter == "mask":
        # the initial MASK solve is setup (it cancels); no periodic reset falls inside S_HI steps
        options["interpreter_options"] = {"mask": {"iterations": 10}}
        options["term_options"] = {"mask": {"inner_steps": mask_inner_steps, "reset_every": 10_000}}
        options["mask_search_steps"] = mask_search_steps
    if interpreter == "rts":  # an untrained RTS masking network on the model's stages (weights do not change timing)
        from attacks.interpreters import RTSInterpreter, RTSNetwork

        torch.manual_seed(0)
        net = RTSNetwork(model.stage_channels, model.num_classes).to(next(model.parameters()).device).eval()
        return build_attack(name, interpreter=RTSInterpreter(net), **options)
    return build_attack(name, interpreter=interpreter or "cam", **options)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_seconds(model, x, target, variants: list[str], args: argparse.Namespace,
                 device: torch.device) -> dict[str, float | Exception]:
    """Seconds per step of every variant (or the exception it raised) on one batch.

    The repeats are interleaved across variants (r1: v1 v2 ... r2: v1 v2 ...) so that a burst of load on
    a shared machine spreads over all variants instead of skewing one ratio.
    """
    lo, hi = args.steps

    def run(attack: ADV2) -> Callable[[], Any]:
        def go():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                return attack(model, x, target)
        return go

    attacks: dict[str, dict[int, ADV2]] = {}
    result: dict[str, float | Exception] = {}
    for variant in variants:
        try:
            attacks[variant] = {s: make_attack(variant, s, args.mask_inner_steps, model, args.mask_search_steps) for s in (lo, hi)}
            run(attacks[variant][lo])()  # warm-up: lazy initialisation, cudnn autotuning, allocator
        except Exception as exc:  # report and go on: one unsupported variant should not lose the others
            result[variant] = exc
            attacks.pop(variant, None)
    best = {v: {lo: float("inf"), hi: float("inf")} for v in attacks}
    for _ in range(args.repeats):
        for variant, by_steps in attacks.items():
            for s in (lo, hi):
                best[variant][s] = min(best[variant][s], timed(run(by_steps[s]), device))
    for variant, t in best.items():
        result[variant] = max(t[hi] - t[lo], 1e-9) / (hi - lo)
    return result


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | batch | step ms | cost vs pgd | inputs/s | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r['batch_size']} | - | - | - | error: {r['error']} |")
            continue
        note = f"k={r['mask_inner_steps']}, search {r['mask_search_steps']}" if r["mask_inner_steps"] is not None else ""
        ratio = "-" if r["step_cost_vs_pgd"] is None else f"{r['step_cost_vs_pgd']:.2f}"
        lines.append(f"| {r['variant']} | {r['batch_size']} | {1e3 * r['step_seconds']:.2f} | {ratio} | "
                     f"{r['inputs_per_second']:.0f} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args, device)
    arch = getattr(model, "arch", args.arch)
    image_size = int(getattr(model, "input_size", args.image_size)) if args.checkpoint else args.image_size
    num_classes = int(getattr(model, "num_classes", args.num_classes))
    channels = int(getattr(model, "in_channels", 3))
    variants = ["pgd"] + [v for v in args.variants if v != "pgd"]  # the baseline is always measured
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    rows: list[dict[str, Any]] = []
    for batch_size in args.batch_sizes:
        gen = torch.Generator().manual_seed(args.seed)
        x = (torch.randint(0, 256, (batch_size, channels, image_size, image_size), generator=gen).float() / 255).to(device)
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
        target = random_targets(labels, num_classes, gen).to(device)
        timings = step_seconds(model, x, target, variants, args, device)
        base = timings.get("pgd")
        base = base if isinstance(base, float) else None
        for variant in variants:
            name, framework, interpreter = VARIANTS[variant]
            row: dict[str, Any] = {
                "variant": variant, "batch_size": batch_size, "step_seconds": None, "step_cost_vs_pgd": None,
                "inputs_per_second": None, "device": device_name, "arch": arch, "image_size": image_size,
                "mask_inner_steps": args.mask_inner_steps if interpreter == "mask" else None,
                "mask_search_steps": args.mask_search_steps if interpreter == "mask" else None,
                "framework": framework, "interpreter": interpreter,
                "edge": {"advedge": "soft", "advedge_plus": "binary"}.get(name),
                "dtype": "bf16-autocast" if args.bf16 else "fp32", "steps": list(args.steps), "repeats": args.repeats,
            }
            sec = timings[variant]
            if isinstance(sec, Exception):
                row["error"] = f"{type(sec).__name__}: {sec}".splitlines()[0][:200]
                print(f"[attack_speed] {variant} @ batch {batch_size} failed: {row['error']}", file=sys.stderr)
            else:
                row.update(step_seconds=sec, inputs_per_second=batch_size / sec,
                           step_cost_vs_pgd=(sec / base) if base else None)
                print(f"[attack_speed] batch {batch_size:>4} {variant:<17} {1e3 * sec:8.2f} ms/step",
                      file=sys.stderr, flush=True)
            rows.append(row)
    out = Path(args.out)
    write_json(out / "metrics.json", rows)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
