"""The attack evaluation (``defend.evaluation.evaluate_plan``, a Lightning ``Trainer.test`` pass) under DDP.

    python benchmarks/ddp_attack_eval.py --out runs/bench/ddp_attack_eval --device cuda [--backend nccl]
        [--n-images 64] [--batch-size 32] [--steps 20] [--no-compare]

Builds an untrained small CNN, random uint8-grid images with random target classes and a plan of two attacks (plain
PGD, and ADV2 against CAM; both read by CAM), and runs ``evaluate_plan`` with
``Trainer(devices=1, strategy=DDPStrategy(process_group_backend=nccl on CUDA / gloo on CPU), inference_mode=False,
use_distributed_sampler=False, logger=False)``. A callback records, while the test runs, that the process group is
initialised and with which backend and world size. With comparison on (the default) the same plan runs first on a
plain single-device Trainer, and the largest difference of every figure between the two runs is reported.

Writes ``OUT/metrics.json``: ``{"backend", "requested_backend", "process_group": {...}, "rows": [...],
"max_abs_diff_vs_single": {...}, ...}`` and prints it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from attacks import build_attack, get_interpreter, random_targets  # noqa: E402
from defend.evaluation import PlanItem, evaluate_plan  # noqa: E402
from defend.io import write_json  # noqa: E402
from defend.models import build_classifier  # noqa: E402


class ProcessGroupProbe(pl.Callback):
    """Records the process group's state while ``Trainer.test`` runs (Lightning may tear it down afterwards)."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {"initialized": False}

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ok = dist.is_available() and dist.is_initialized()
        self.seen = {"initialized": bool(ok), "backend": str(dist.get_backend()) if ok else None,
                     "world_size": dist.get_world_size() if ok else 1, "rank": dist.get_rank() if ok else 0,
                     "strategy": type(trainer.strategy).__name__, "module_device": str(pl_module.device)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=["nccl", "gloo"], help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=8, help="width of the untrained small_cnn")
    p.add_argument("--steps", type=int, default=5, help="warm-start and joint steps of each attack")
    p.add_argument("--no-compare", action="store_true", help="skip the single-device reference run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if args.backend == "nccl" and args.device != "cuda":
        p.error("the nccl backend needs --device cuda")
    if min(args.n_images, args.batch_size, args.steps) < 1:
        p.error("--n-images, --batch-size and --steps must be positive")
    return args


def build_setup(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, list[PlanItem], dict[str, torch.Tensor]]:
    """The untrained classifier, the interpreters, the two-item plan and the evaluation data (CPU tensors)."""
    torch.manual_seed(args.seed)
    model = build_classifier("small_cnn", 10, width=args.width, input_size=args.image_size).eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (args.n_images, 3, args.image_size, args.image_size), generator=gen).float() / 255
    y = torch.randint(0, 10, (args.n_images,), generator=gen)
    data = {"image": x, "label": y, "target": random_targets(y, 10, gen)}
    interpreters = {"cam": get_interpreter("cam")}
    pgd = {"eps": 8 / 255, "alpha": 2 / 255, "seed": args.seed}
    plan = [PlanItem("pgd", "pgd", None, build_attack("pgd", "pgd", None, warm_steps=args.steps, **pgd), ["cam"]),
            PlanItem("adv2", "pgd", "cam", build_attack("adv2", "pgd", interpreters["cam"], warm_steps=args.steps,
                                                        steps=args.steps, **pgd), ["cam"])]
    return model, interpreters, plan, data


def run(args: argparse.Namespace, ddp: bool) -> tuple[dict[tuple[str, str], dict[str, float]], dict[str, Any], float]:
    """One evaluation pass: ``(results, process-group record, wall seconds)``."""
    model, interpreters, plan, data = build_setup(args)
    probe = ProcessGroupProbe()
    strategy: Any = DDPStrategy(process_group_backend=args.backend) if ddp else "auto"
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, strategy=strategy,
                         inference_mode=False, use_distributed_sampler=False, logger=False, callbacks=[probe],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    ev = evaluate_plan(model, interpreters, plan, data, trainer, batch_size=args.batch_size, progress=False)
    return ev.results, probe.seen, time.perf_counter() - start


def max_diffs(a: dict, b: dict) -> dict[str, float]:
    """Largest absolute difference of every numeric figure over the rows both runs have."""
    out: dict[str, float] = {}
    for key in a.keys() & b.keys():
        for field, value in a[key].items():
            other = b[key].get(field)
            if field != "seconds_per_input" and isinstance(value, (int, float)) and isinstance(other, (int, float)):
                out[field] = max(out.get(field, 0.0), abs(float(value) - float(other)))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Reference run (unless ``--no-compare``), then the DDP run; writes and returns the report."""
    args = parse_args(argv)
    single = None if args.no_compare else run(args, ddp=False)
    results, seen, wall = run(args, ddp=True)
    if seen.get("backend") != args.backend:
        print(f"[ddp_attack_eval] process group backend {seen.get('backend')!r}, requested {args.backend!r}",
              file=sys.stderr)
    report: dict[str, Any] = {
        "requested_backend": args.backend, "backend": seen.get("backend"), "process_group": seen,
        "backend_ok": bool(seen.get("initialized")) and seen.get("backend") == args.backend,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "n_images": args.n_images, "batch_size": args.batch_size, "steps": args.steps, "wall_seconds": wall,
        "rows": [{"plan": k, "reader": r, **v} for (k, r), v in sorted(results.items())],
        "max_abs_diff_vs_single": None if single is None else max_diffs(results, single[0]),
        "single_wall_seconds": None if single is None else single[2], "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    write_json(Path(args.out) / "metrics.json", report)
    print(report)
    if not report["backend_ok"]:
        raise SystemExit(f"DDP did not run over {args.backend}: {seen}")
    return report


if __name__ == "__main__":
    main()
