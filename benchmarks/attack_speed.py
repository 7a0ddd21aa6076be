"""Per-step cost of every attack variant relative to one plain PGD step, attack throughput, and the PGD step's MFU.

    python benchmarks/attack_speed.py --out runs/bench/attack_speed [--device cpu|cuda] [--arch small_cnn]
        [--image-size 32] [--width W] [--num-classes 10] [--batch-sizes 8 32 128] [--repeats 3] [--bf16] [--channels-last]
        [--peak-tflops 989] [--tf32 default|on|off] [--max-seconds S] [--checkpoint PATH] [--clock auto|cpu|wall]
        [--no-memory]

For one model and batch, every variant is run as ``ADV2(...)`` with ``warm_steps=0, steps=S`` (the joint
stage only; the plain ``pgd`` baseline with ``warm_steps=S, steps=0``) for two step counts ``S_lo < S_hi``.
The per-step time is ``(t(S_hi) - t(S_lo)) / (S_hi - S_lo)`` with ``t`` the fastest of ``--repeats`` runs,
so setup costs (target maps, the initial MASK solve, edge maps, the final forward) cancel. CUDA is
synchronised around every timed call. Weights do not change the timing, so the model is untrained unless
``--checkpoint`` is given. The repeats are interleaved (r1: v1 v2 ... r2: v1 v2 ...) so load hits every variant alike.

The papers' architectures at their size: ``--arch resnet50 --image-size 224 --num-classes 1000`` (also
densenet121, vgg16) builds the torchvision model through the zoo (``defend.models``; untrained, seeded, nothing is
downloaded) and, for ``adv2_rts``, an untrained RTS network on its encoder stages.

Clock (``--clock``): on CPU the default is the process's CPU time (``time.process_time``), not wall time. On a
shared machine wall time also counts the time the process waited for a core, which is what made the slope of two
close step counts swing by 2-3x between runs; the CPU time of a one-thread run does not (with several threads it
counts core-seconds, spin-waits included: pass ``--clock wall`` there). CUDA always uses synchronised wall time.

Work per step: a forward hook on the classifier's first module (``normalize`` of the zoo / wrapped classifiers,
else the model) counts its forward passes, and a hook on that module's output the gradient passes back through it;
``(count(S_hi) - count(S_lo)) / (S_hi - S_lo)`` are the ``forwards`` / ``backwards`` per step beside the time, so a
variant that skips or repeats the classifier shows it (counted on the first repeat).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``. On CPU every variant runs once more (``S_LO`` steps) in a
fresh subprocess, which reads the kernel's peak resident set ``VmHWM`` from ``/proc/self/status``, reset (``5`` to
``/proc/self/clear_refs``) once the model and the batch are built; the row's ``peak_rss_mib`` is that peak minus the
resident set at the reset (the attack's own memory). Why not in-process: tracemalloc does not see torch's C++
allocations, ``ru_maxrss`` cannot be reset, and freed heap that the allocator keeps from an earlier variant would
hide a later variant's growth; sampling RSS from a thread misses short peaks. ``--no-memory`` skips it.

``--bf16`` runs the attacks with the engine's bfloat16 autocast (``ADV2(autocast="bf16")``: the perturbation and
the losses stay float32). ``--channels-last`` puts the model (and the RTS network) and the inputs in channels_last
memory format. The FLOPs of one PGD step on the batch (forward + input gradient, counted by
``torch.utils.flop_counter.FlopCounterMode``) over the measured PGD step time give the achieved TFLOP/s, and over
``--peak-tflops`` the model-FLOP utilisation (``mfu``) of the ``pgd`` rows.

Writes ``OUT/metrics.json`` (a list of rows, rewritten after every batch size, so a run cut short keeps what it
measured) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from attacks import ADV2, build_attack, frozen, random_targets  # noqa: E402
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
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (metrics.json is written there)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="small_cnn", help="zoo architecture (ignored with --checkpoint)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=None, help="width of a zoo model that has one (small_cnn, ...)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per step count; the fastest is kept")
    p.add_argument("--steps", type=int, nargs=2, default=[3, 13], metavar=("S_LO", "S_HI"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--mask-inner-steps", type=int, default=4, help="inner steps k of the MASK term")
    p.add_argument("--mask-search-steps", type=int, default=4,
                   help="binary-search steps of the per-image MASK step size (0: fixed step)")
    p.add_argument("--bf16", action="store_true", help="run the attacks under the engine's bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last memory format")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for this dtype (H200 dense: bf16 989, fp32 67); gives the MFU")
    p.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                   help="TF32 tensor cores for float32 convolutions / matmuls on CUDA (off: true fp32; default: "
                        "PyTorch's, TF32 convolutions and fp32 matmuls)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="skip a batch size predicted to end after this many seconds (rows marked skipped)")
    p.add_argument("--checkpoint", default=None, help="classifier artifact (defend.classifier.load_classifier)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: leave the default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"],
                   help="auto: process CPU time on CPU, synchronised wall time on CUDA (see the module docstring)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess runs on CPU")
    p.add_argument("--memory-of", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)  # the subprocess
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    lo, hi = args.steps
    if not 1 <= lo < hi:
        p.error(f"--steps needs 1 <= S_LO < S_HI, got {lo} {hi}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be positive")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error("--peak-tflops must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` or the default contiguous format."""
    return torch.channels_last if channels_last else torch.contiguous_format


#: PyTorch's TF32 settings when this module was imported (``--tf32 default`` restores them)
_TF32_DEFAULT = (bool(torch.backends.cudnn.allow_tf32), bool(torch.backends.cuda.matmul.allow_tf32))


def set_tf32(mode: str) -> dict[str, bool]:
    """Apply ``--tf32`` (``default``: PyTorch's own settings) and return the settings in force."""
    cudnn, matmul = _TF32_DEFAULT if mode == "default" else (mode == "on", mode == "on")
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.backends.cuda.matmul.allow_tf32 = matmul
    return {"cudnn": bool(torch.backends.cudnn.allow_tf32), "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}


def load_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The classifier of ``--checkpoint``, else an untrained zoo ``--arch`` (seeded), in eval mode on ``device``."""
    if args.checkpoint:
        from defend.classifier import load_classifier

        model = load_classifier(args.checkpoint)
    else:
        from defend.models import build_classifier

        torch.manual_seed(args.seed)
        width = {} if getattr(args, "width", None) is None else {"width": args.width}
        model = build_classifier(args.arch, args.num_classes, input_size=args.image_size, **width)
    return model.to(device, memory_format=memory_format(getattr(args, "channels_last", False))).eval()


def make_attack(variant: str, steps: int, mask_inner_steps: int, model: torch.nn.Module | None = None,
                mask_search_steps: int = 4, autocast: str | None = None, channels_last: bool = False) -> ADV2:
    """The attack of ``variant`` for ``steps`` timed steps (the joint stage; the plain PGD's warm start)."""
    name, framework, interpreter = VARIANTS[variant]
    schedule = {"warm_steps": steps, "steps": 0} if name == "pgd" else {"warm_steps": 0, "steps": steps}
    options: dict[str, Any] = dict(framework=framework, seed=0, autocast=autocast, **schedule)
    if framework == "pgd":
        options["framework_options"] = {"eps": 8 / 255, "alpha": 1 / 255}
    if interpreter == "mask":
        # the initial MASK solve is setup (it cancels); no periodic reset falls inside S_HI steps
        options["interpreter_options"] = {"mask": {"iterations": 10}}
        options["term_options"] = {"mask": {"inner_steps": mask_inner_steps, "reset_every": 10_000}}
        options["mask_search_steps"] = mask_search_steps
    if interpreter == "rts":
        return build_attack(name, interpreter=rts_interpreter(model, channels_last), **options)
    return build_attack(name, interpreter=interpreter or "cam", **options)


def rts_interpreter(model: torch.nn.Module, channels_last: bool = False):
    """An untrained RTS masking network on the model's encoder stages (weights do not change the timing)."""
    from attacks.interpreters import RTSInterpreter, RTSNetwork

    if model is None or not hasattr(model, "stage_channels"):
        raise ValueError("the adv2_rts variant needs a zoo classifier with stage_channels")
    torch.manual_seed(0)
    net = RTSNetwork(model.stage_channels, model.num_classes)
    device = next(model.parameters()).device
    return RTSInterpreter(net.to(device, memory_format=memory_format(channels_last)).eval())


def pgd_step_flops(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: str | None) -> int:
    """FLOPs of one PGD step on the batch: the forward and the gradient with respect to the input (weights frozen,
    as the attacks run), under the same autocast."""
    xr = x.detach().clone().requires_grad_(True)
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16")
    with frozen(model), FlopCounterMode(display=False) as counter:
        with amp:
            loss = F.cross_entropy(model(xr).float(), target)
        loss.backward(inputs=[xr])  # autograd.grad clashes with the counter's module hooks
    return int(counter.get_total_flops())


def timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> float:
    """Seconds of ``fn()``: wall time (CUDA synchronised before and after) or, with ``clock="cpu"``, the process's
    CPU time."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return now() - start


def clock_of(args: argparse.Namespace, device: torch.device) -> str:
    """``--clock`` resolved: ``cpu`` time on a CPU device (``auto``), wall time on CUDA."""
    return "wall" if device.type == "cuda" or args.clock == "wall" else "cpu"


@dataclass
class Passes:
    """Forward and backward passes counted through one module."""

    forwards: int = 0
    backwards: int = 0


@contextmanager
def count_passes(module: torch.nn.Module) -> Iterator[Passes]:
    """Count the forward calls of ``module`` and the gradient passes back through its output while the block runs
    (a double backward that differentiates through the output again counts again); the hooks are removed on exit."""
    passes = Passes()

    def on_grad(grad: torch.Tensor) -> None:
        passes.backwards += 1

    def on_forward(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        passes.forwards += 1
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(on_grad)

    handle = module.register_forward_hook(on_forward)
    try:
        yield passes
    finally:
        handle.remove()


def first_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module every classifier pass goes through first: ``normalize`` of the zoo and wrapped classifiers (which
    ``forward``, ``forward_features`` and ``forward_stages`` all run), else the model itself."""
    module = getattr(model, "normalize", None)
    return module if isinstance(module, torch.nn.Module) else model


def _prepare(model, x, target, variants: list[str], args: argparse.Namespace, device: torch.device,
             failed: dict[str, Exception], memory: dict[str, float]) -> dict[str, dict[int, ADV2]]:
    """Build both step counts of every variant and run each once untimed (lazy initialisation, cudnn autotuning,
    the allocator); a variant that fails is reported in ``failed``, its peak CUDA memory (GiB) in ``memory``."""
    lo, hi = args.steps
    autocast = "bf16" if args.bf16 else None
    attacks: dict[str, dict[int, ADV2]] = {}
    for variant in variants:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            built = {s: make_attack(variant, s, args.mask_inner_steps, model, args.mask_search_steps, autocast,
                                    args.channels_last) for s in (lo, hi)}
            built[lo](model, x, target)
            attacks[variant] = built
            if device.type == "cuda":
                memory[variant] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        except Exception as exc:  # report and go on: one unsupported variant (or an OOM) should not lose the others
            failed[variant] = exc
            _release(device)
    return attacks


def _release(device: torch.device) -> None:
    """Give cached CUDA blocks back (after an out-of-memory error or a finished batch)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_seconds(model, x, target, variants: list[str], args: argparse.Namespace, device: torch.device,
                 passes: dict[str, dict[int, Passes]] | None = None, per_repeat: dict[str, list[float]] | None = None
                 ) -> tuple[dict[str, float | Exception], dict[str, float]]:
    """Seconds per step of every variant (or the exception it raised) on one batch, and peak CUDA memory (GiB);
    ``passes[variant][steps]`` receives the classifier passes counted on the first repeat, ``per_repeat[variant]``
    the per-step seconds of each repeat on its own (its spread; the returned figure uses the fastest run of each
    step count).

    The repeats are interleaved across variants (r1: v1 v2 ... r2: v1 v2 ...) so that a burst of load on
    a shared machine spreads over all variants instead of skewing one ratio.
    """
    lo, hi = args.steps
    clock = clock_of(args, device)
    result: dict[str, float | Exception] = {}
    memory: dict[str, float] = {}
    prepared = _prepare(model, x, target, variants, args, device, result, memory)
    best = {v: {lo: float("inf"), hi: float("inf")} for v in prepared}
    times: dict[str, dict[int, list[float]]] = {v: {lo: [], hi: []} for v in prepared}
    for r in range(args.repeats):
        for variant in list(prepared):
            try:
                for s in (lo, hi):
                    with count_passes(first_module(model)) as counted:
                        t = timed(lambda: prepared[variant][s](model, x, target), device, clock)
                    best[variant][s] = min(best[variant][s], t)
                    times[variant][s].append(t)
                    if r == 0 and passes is not None:
                        passes.setdefault(variant, {})[s] = counted
            except Exception as exc:
                result[variant] = exc
                del prepared[variant], best[variant]
                _release(device)
    for variant, t in best.items():
        result[variant] = max(t[hi] - t[lo], 1e-9) / (hi - lo)
        if per_repeat is not None:
            per_repeat[variant] = [(b - a) / (hi - lo) for a, b in zip(times[variant][lo], times[variant][hi])]
    prepared.clear()
    _release(device)
    return result, memory


def per_step(counts: dict[int, Passes], steps: tuple[int, int]) -> tuple[float, float]:
    """Forward and backward passes per step from the counts of the two step counts."""
    lo, hi = steps
    return ((counts[hi].forwards - counts[lo].forwards) / (hi - lo),
            (counts[hi].backwards - counts[lo].backwards) / (hi - lo))


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (peak memory needs Linux; pass --no-memory)")
    return int(match.group(1))


def measure_memory(args: argparse.Namespace) -> dict[str, float]:
    """The ``--memory-of`` subprocess: run that variant once (``S_LO`` steps: a step's graph is freed before the next,
    so more steps add no memory) on the first batch size and return the peak resident set of the attack (MiB over
    the resident set once model and batch are built)."""
    device = torch.device(args.device)
    model = load_model(args, device)
    size = int(getattr(model, "input_size", args.image_size)) if args.checkpoint else args.image_size
    x, target = make_batch(args.batch_sizes[0], int(getattr(model, "in_channels", 3)), size,
                           int(getattr(model, "num_classes", args.num_classes)), args.seed, device, args.channels_last)
    attack = make_attack(args.memory_of, args.steps[0], args.mask_inner_steps, model, args.mask_search_steps,
                         "bf16" if args.bf16 else None, args.channels_last)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    attack(model, x, target)
    return {"peak_rss_mib": (_status_kib("VmHWM") - base) / 1024, "rss_before_mib": base / 1024}


def peak_rss(variant: str, batch_size: int, args: argparse.Namespace) -> float | None:
    """Peak resident memory (MiB) of ``variant`` on ``batch_size`` inputs, measured in a fresh subprocess (see
    :func:`measure_memory`); ``None`` (and a line on stderr) when that run fails."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--memory-of", variant,
           "--batch-sizes", str(batch_size)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        print(f"[attack_speed] memory of {variant} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}",
              file=sys.stderr)
        return None
    return float(json.loads(lines[-1])["peak_rss_mib"])


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_batch(batch_size: int, channels: int, image_size: int, num_classes: int, seed: int, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8-grid images and random target classes (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch_size, channels, image_size, image_size), generator=gen).float() / 255
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    target = random_targets(labels, num_classes, gen)
    return x.to(device, memory_format=memory_format(channels_last)), target.to(device)


def base_row(variant: str, batch_size: int, info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The descriptive fields of one row (timings filled in by the caller)."""
    name, framework, interpreter = VARIANTS[variant]
    return {
        "variant": variant, "batch_size": batch_size, "step_seconds": None, "step_cost_vs_pgd": None,
        "inputs_per_second": None, **info,
        "mask_inner_steps": args.mask_inner_steps if interpreter == "mask" else None,
        "mask_search_steps": args.mask_search_steps if interpreter == "mask" else None,
        "framework": framework, "interpreter": interpreter,
        "edge": {"advedge": "soft", "advedge_plus": "binary"}.get(name),
        "dtype": "bf16-autocast" if args.bf16 else "fp32", "channels_last": bool(args.channels_last),
        "steps": list(args.steps), "repeats": args.repeats,
        "pgd_step_flops": None, "achieved_tflops": None, "peak_tflops": args.peak_tflops, "mfu": None,
        "peak_memory_gib": None, "peak_rss_mib": None, "forwards_per_step": None, "backwards_per_step": None,
        "clock": clock_of(args, torch.device(args.device)), "repeat_step_seconds": None, "repeat_cost_vs_pgd": None,
    }


def batch_rows(model, batch_size: int, variants: list[str], info: dict[str, Any], args: argparse.Namespace,
               device: torch.device) -> list[dict[str, Any]]:
    """Measure every variant on one batch size; one row each."""
    x, target = make_batch(batch_size, info["in_channels"], info["image_size"], info["num_classes"], args.seed,
                           device, args.channels_last)
    flops = pgd_step_flops(model, x, target, "bf16" if args.bf16 else None)
    passes: dict[str, dict[int, Passes]] = {}
    per_repeat: dict[str, list[float]] = {}
    timings, memory = step_seconds(model, x, target, variants, args, device, passes, per_repeat)
    base = timings.get("pgd") if isinstance(timings.get("pgd"), float) else None
    rows = []
    for variant in variants:
        row = base_row(variant, batch_size, info, args)
        row["pgd_step_flops"] = flops
        row["peak_memory_gib"] = memory.get(variant)
        if variant in per_repeat:  # repeats are interleaved: repeat r of a variant is paired with repeat r of pgd
            row["repeat_step_seconds"] = per_repeat[variant]
            row["repeat_cost_vs_pgd"] = [v / b for v, b in zip(per_repeat[variant], per_repeat.get("pgd", []))]
        if variant in passes:
            row["forwards_per_step"], row["backwards_per_step"] = per_step(passes[variant], tuple(args.steps))
        if device.type == "cpu" and not args.no_memory and variant in passes:
            row["peak_rss_mib"] = peak_rss(variant, batch_size, args)
        sec = timings[variant]
        if isinstance(sec, Exception):
            row["error"] = f"{type(sec).__name__}: {sec}".splitlines()[0][:200]
            print(f"[attack_speed] {variant} @ batch {batch_size} failed: {row['error']}", file=sys.stderr)
        else:
            row.update(step_seconds=sec, inputs_per_second=batch_size / sec, step_cost_vs_pgd=(sec / base) if base else None)
            if variant == "pgd":
                row["achieved_tflops"] = flops / sec / 1e12
                row["mfu"] = row["achieved_tflops"] / args.peak_tflops if args.peak_tflops else None
            print(f"[attack_speed] batch {batch_size:>4} {variant:<17} {1e3 * sec:9.2f} ms/step", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def over_budget(max_seconds: float | None, elapsed: float, last: tuple[int, float] | None, batch_size: int) -> bool:
    """Whether a batch of ``batch_size`` would end after ``max_seconds``: its time is predicted from the last batch
    measured, proportional to the batch size (no prediction before the first batch: it always runs)."""
    if max_seconds is None or last is None:
        return False
    return elapsed + last[1] * batch_size / last[0] > max_seconds


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| variant | dtype | batch | step ms | cost vs pgd | fwd/bwd per step | inputs/s | TFLOP/s | MFU | peak MiB "
             "| note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r['dtype']} | {r['batch_size']} | - | - | - | - | - | - | - | {r['error']} |")
            continue
        note = f"k={r['mask_inner_steps']}, search {r['mask_search_steps']}" if r["mask_inner_steps"] is not None else ""
        ratio = "-" if r["step_cost_vs_pgd"] is None else f"{r['step_cost_vs_pgd']:.2f}"
        tflops = "-" if r.get("achieved_tflops") is None else f"{r['achieved_tflops']:.3g}"
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        work = "-" if r.get("forwards_per_step") is None else f"{r['forwards_per_step']:g} / {r['backwards_per_step']:g}"
        mem = r.get("peak_rss_mib") or (None if r.get("peak_memory_gib") is None else 1024 * r["peak_memory_gib"])
        lines.append(f"| {r['variant']} | {r['dtype']} | {r['batch_size']} | {1e3 * r['step_seconds']:.2f} | {ratio} | "
                     f"{work} | {r['inputs_per_second']:.0f} | {tflops} | {mfu} | {'-' if mem is None else f'{mem:.0f}'} "
                     f"| {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every batch size in turn, rewriting ``OUT/metrics.json`` after each."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:  # the peak-memory subprocess (peak_rss): one JSON line, nothing written
        print(json.dumps(measure_memory(args)))
        return []
    device = torch.device(args.device)
    tf32 = set_tf32(args.tf32) if device.type == "cuda" else None
    model = load_model(args, device)
    info = {"device": device_name(device), "arch": getattr(model, "arch", args.arch),
            "image_size": int(getattr(model, "input_size", args.image_size)) if args.checkpoint else args.image_size,
            "num_classes": int(getattr(model, "num_classes", args.num_classes)),
            "in_channels": int(getattr(model, "in_channels", 3)), "tf32": tf32, "torch": torch.__version__}
    variants = ["pgd"] + [v for v in args.variants if v != "pgd"]  # the baseline is always measured
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    last: tuple[int, float] | None = None  # (batch size, seconds) of the last measured batch
    for batch_size in args.batch_sizes:
        if over_budget(args.max_seconds, time.perf_counter() - start, last, batch_size):
            rows.extend({**base_row(variant, batch_size, info, args),
                         "error": f"skipped: would end after --max-seconds {args.max_seconds:g}"} for variant in variants)
        else:
            t0 = time.perf_counter()
            rows.extend(batch_rows(model, batch_size, variants, info, args, device))
            last = (batch_size, time.perf_counter() - t0)
        write_json(out / "metrics.json", rows)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
