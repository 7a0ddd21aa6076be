#!/usr/bin/env bash
# The GPU suite: environment, an import check with a tiny attack, the device tests, attack throughput against batch
# size (with the PGD step's MFU), seconds per input at the papers' iteration counts, and a DDP attack evaluation.
#
#   bash benchmarks/gpu_suite.sh [--device cuda|cpu] [--tiny] [--out DIR]
#
# --device   cuda (default) or cpu
# --tiny     small settings (small_cnn at 32 px, few steps, iteration counts / 100): the CPU smoke run
# --out DIR  output folder (default: $OUT if set, else runs/gpu_suite)
#
# Uses the `python` on PATH (the machine's own torch: nothing here installs or upgrades torch). If a .whl/ folder
# exists, its wheels whose distribution the machine lacks are installed with `pip install --no-index --no-deps
# --target <tmp>/site` and that folder goes on PYTHONPATH after the repository root. Every step is timed and runs
# under a time limit; a failing step is recorded and the suite goes on. The whole run keeps within
# GPU_SUITE_SECONDS (default 470 on cuda, 900 on cpu). Writes summary.json and summary.md (every step: status,
# seconds, key figures) under the output folder; exits 1 when any step is not ok.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
TINY=0
OUT_DIR="${OUT:-}"

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --tiny) TINY=1; shift ;;
    --out) OUT_DIR="${2:?--out needs a value}"; shift 2 ;;
    --out=*) OUT_DIR="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_suite: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac

OUT_DIR="${OUT_DIR:-$ROOT/runs/gpu_suite}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
rm -rf "$OUT_DIR/steps" "$OUT_DIR/logs"
mkdir -p "$OUT_DIR/steps" "$OUT_DIR/logs"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if ! command -v python >/dev/null; then  # a machine with only python3: the same interpreter under its usual name
  command -v python3 >/dev/null || { echo "gpu_suite: no python (nor python3) on PATH" >&2; exit 2; }
  mkdir -p "$WORK/bin" && ln -s "$(command -v python3)" "$WORK/bin/python" && export PATH="$WORK/bin:$PATH"
fi

if [ "$DEVICE" = cuda ]; then SUITE_SECONDS="${GPU_SUITE_SECONDS:-470}"; else SUITE_SECONDS="${GPU_SUITE_SECONDS:-900}"; fi
SUITE_START="$(date +%s.%N)"
DEADLINE=$(( ${SUITE_START%.*} + SUITE_SECONDS ))
STEP_ORDER=()
TINY_FLAG=()
[ "$TINY" = 1 ] && TINY_FLAG=(--tiny)

log() { echo "[gpu_suite $(date +%H:%M:%S)] $*" >&2; }

# run_step NAME CAP RESERVE CMD...: run CMD under min(CAP, time left - RESERVE) seconds with its output in
# logs/NAME.log; steps/NAME.json records status (ok | failed | timeout | skipped), exit code and seconds.
run_step() {
  local name="$1" cap="$2" reserve="$3"
  shift 3
  STEP_ORDER+=("$name")
  local left=$(( DEADLINE - $(date +%s) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  local status rc=0 t0 t1 seconds
  if [ "$limit" -lt 5 ]; then
    log "$name: skipped (suite time limit)"
    printf '{"step": "%s", "status": "skipped", "rc": null, "seconds": 0, "limit_s": %d, "log": null}\n' \
      "$name" "$limit" > "$OUT_DIR/steps/$name.json"
    return 0
  fi
  log "$name: start (limit ${limit}s)"
  t0="$(date +%s.%N)"
  STEP_LIMIT="$limit" timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/logs/$name.log" 2>&1 || rc=$?
  t1="$(date +%s.%N)"
  seconds="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
  case "$rc" in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %s, "limit_s": %d, "log": "logs/%s.log"}\n' \
    "$name" "$status" "$rc" "$seconds" "$limit" "$name" > "$OUT_DIR/steps/$name.json"
  log "$name: $status (${seconds}s)"
  if [ "$status" != ok ]; then tail -n 15 "$OUT_DIR/logs/$name.log" | sed 's/^/    /' >&2 || true; fi
}

# ------------------------------------------------------------------------------------------------ helper scripts
cat > "$WORK/wheels.py" <<'PY'
"""Install the wheels of .whl/ whose distribution this Python lacks (never one it has: torch is never touched)."""
import importlib.metadata as md
import json
import subprocess
import sys
import zipfile
from pathlib import Path


def missing(wheels: list[Path]) -> tuple[list[Path], dict[str, str]]:
    """The wheels to install, and the distributions already present (name -> installed version)."""
    todo, present = [], {}
    for w in wheels:
        name = w.name.split("-")[0]
        try:
            present[name] = md.version(name)
        except md.PackageNotFoundError:
            todo.append(w)
    return todo, present


def install(todo: list[Path], site: Path) -> str:
    """pip --no-index --no-deps --target; where pip is missing, unpack the wheels (enough for these wheels)."""
    if not todo:
        return "none needed"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(site),
           *map(str, todo)]
    if subprocess.run(cmd).returncode == 0:
        return "pip"
    for w in todo:
        zipfile.ZipFile(w).extractall(site)
    return "unzip (pip failed or is missing)"


def main(whl_dir: str, site: str, record: str) -> None:
    wheels = sorted(Path(whl_dir).glob("*.whl"))
    todo, present = missing(wheels)
    how = install(todo, Path(site))
    info = {"folder": whl_dir, "site": site if todo else None, "installed": [w.name for w in todo],
            "already_present": present, "method": how,
            "total_bytes": sum(w.stat().st_size for w in wheels)}
    Path(record).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
PY

cat > "$WORK/env.py" <<'PY'
"""env.json: nvidia-smi, Python / torch / torchvision / Lightning / torchmetrics versions, the device, the wheels."""
import importlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def version(module: str):
    """The module's version, or why it does not import."""
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as exc:  # record it: a missing package is a finding, not a crash
        return f"missing ({type(exc).__name__}: {exc})"


def nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"present": False}
    query = "name,memory.total,driver_version,power.limit,clocks.max.sm,compute_cap"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True)
    full = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
    return {"present": True, "query": query, "gpus": out.stdout.strip().splitlines(), "text": full.stdout}


def nccl():
    """NCCL's version (a tuple or an int depending on the torch release), or why it is not known."""
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def device_info(device: str) -> dict:
    import torch

    info = {"requested": device, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported(), nccl=nccl())
    else:
        info["name"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def main(out: str, device: str, wheels: str) -> None:
    mods = ["torch", "torchvision", "pytorch_lightning", "torchmetrics", "jsonargparse", "yaml", "numpy", "sklearn",
            "scipy", "tqdm", "pytest", "docstring_parser", "typeshed_client"]
    env = {"python": sys.version, "executable": sys.executable, "platform": platform.platform(),
           "versions": {m: version(m) for m in mods}, "device": device_info(device), "nvidia_smi": nvidia_smi(),
           "wheels": json.loads(Path(wheels).read_text()) if Path(wheels).is_file() else None}
    Path(out).write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps({k: v for k, v in env.items() if k != "nvidia_smi"}, indent=2))
    if device == "cuda" and not env["device"]["cuda_available"]:
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")


if __name__ == "__main__":
    main(*sys.argv[1:4])
PY

cat > "$WORK/import_attack.py" <<'PY'
"""import attacks, defend; ADV2 (PGD) against CAM for 5 + 5 steps on an untrained small CNN, on the device."""
import json
import sys
import time
from pathlib import Path

import torch

import attacks
import defend
from attacks import build_attack, random_targets
from defend.models import build_classifier


def main(out: str, device_name: str) -> None:
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 10, width=8).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (8, 3, 32, 32), generator=gen).float() / 255).to(device)
    target = random_targets(torch.randint(0, 10, (8,), generator=gen), 10, gen).to(device)
    attack = build_attack("adv2", "pgd", "cam", warm_steps=5, steps=5)
    start = time.perf_counter()
    res = attack(model, x, target)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    eps = attack.threat.eps
    linf = float((res.x_adv - x).abs().max())
    on_grid = bool(((res.x_adv * 255 - (res.x_adv * 255).round()).abs() <= 1e-3).all())
    report = {"attacks_module": attacks.__file__, "defend_version": defend.__version__, "device": str(res.x_adv.device),
              "seconds": seconds, "eps": eps, "linf": linf, "on_uint8_grid": on_grid, "inside_eps": linf <= eps + 1e-6,
              "success_rate": float(res.success.float().mean()), "dtype": str(res.x_adv.dtype)}
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not (on_grid and report["inside_eps"] and res.x_adv.device.type == device.type):
        raise SystemExit(f"bad adversarial batch: {report}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
PY

cat > "$WORK/throughput.py" <<'PY'
"""attack_speed.py in one process for each configuration: fp32 and bf16 (channels_last), and bf16 PGD without
channels_last for comparison; each gets a share of the step's time limit ($STEP_LIMIT)."""
import os
import sys
import time

import attack_speed

FULL = ["--arch", "resnet50", "--image-size", "224", "--num-classes", "1000", "--batch-sizes", "16", "32", "64",
        "128", "256", "--variants", "pgd", "adv2_cam", "adv2_grad", "adv2_mask", "adv2_rts", "--steps", "2", "6",
        "--repeats", "1"]
TINY = ["--arch", "small_cnn", "--width", "8", "--image-size", "32", "--num-classes", "10", "--batch-sizes", "4", "8",
        "--variants", "pgd", "adv2_rts", "--steps", "2", "5", "--repeats", "3"]
#: (sub-folder, extra options, share of the time, peak TFLOP/s on CUDA: H200 dense fp32 / bf16)
RUNS = [("fp32_channels_last", ["--channels-last", "--tf32", "off"], 0.45, 67),
        ("bf16_channels_last", ["--channels-last", "--bf16"], 0.38, 989),
        ("bf16_contiguous_pgd", ["--bf16", "--variants", "pgd"], 0.17, 989)]


def main(out: str, device: str, tiny: bool) -> None:
    budget = float(os.environ.get("STEP_LIMIT", "600")) - 10
    start = time.perf_counter()
    for name, extra, share, peak in RUNS:
        args = ["--out", f"{out}/{name}", "--device", device, *(TINY if tiny else FULL), *extra,
                "--max-seconds", f"{max(budget * share - 8, 1):.0f}"]
        if device == "cuda":
            args += ["--peak-tflops", str(peak)]
        print(f"[throughput] {name}: attack_speed.py {' '.join(args)}", flush=True)
        attack_speed.main(args)
        print(f"[throughput] {name} done at {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
PY

cat > "$WORK/summary.py" <<'PY'
"""summary.json / summary.md: every step with its status, seconds and key figures."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def env_figures(out: Path) -> dict:
    env = load(out / "env.json") or {}
    dev, ver = env.get("device") or {}, env.get("versions") or {}
    return {"device": dev.get("name"), "python": (env.get("python") or "").split()[0] or None,
            **{k: ver.get(k) for k in ("torch", "torchvision", "pytorch_lightning", "torchmetrics", "jsonargparse")},
            "cuda": dev.get("cuda"), "gpus": (env.get("nvidia_smi") or {}).get("gpus")}


def wheel_figures(out: Path) -> dict:
    w = load(out / "wheels.json") or {}
    return {"installed": w.get("installed"), "already_present": sorted(w.get("already_present") or {}),
            "method": w.get("method")}


def test_figures(out: Path) -> dict:
    try:
        root = ET.parse(out / "tests.xml").getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped", "time")
    return {k: float(suite.get(k, 0)) if k == "time" else int(suite.get(k, 0)) for k in keys}


def throughput_figures(out: Path) -> dict:
    rows = [r for p in sorted((out / "throughput").glob("*/metrics.json")) for r in (load(p) or [])]
    pgd = [r for r in rows if r["variant"] == "pgd" and r.get("inputs_per_second")]
    best = {}
    for r in pgd:
        key = f"{r['dtype']}{'/channels_last' if r.get('channels_last') else ''}"
        if r["inputs_per_second"] > best.get(key, {}).get("pgd_inputs_per_second", 0):
            best[key] = {"pgd_inputs_per_second": round(r["inputs_per_second"], 1), "batch_size": r["batch_size"],
                         "achieved_tflops": r.get("achieved_tflops"), "mfu": r.get("mfu")}
    return {"rows": len(rows), "errors": sum(1 for r in rows if r.get("error")), "best_pgd": best}


def paper_figures(out: Path) -> dict:
    rows = load(out / "paper_cost" / "metrics.json") or []
    return {r["interpreter"]: {"status": r.get("status"), "seconds_per_input": r.get("seconds_per_input"),
                               "table3": r.get("table3_seconds_per_input"), "speedup": r.get("speedup_vs_table3")}
            for r in rows}


def ddp_figures(out: Path) -> dict:
    d = load(out / "ddp" / "metrics.json") or {}
    return {"backend": d.get("backend"), "requested_backend": d.get("requested_backend"),
            "backend_ok": d.get("backend_ok"), "world_size": (d.get("process_group") or {}).get("world_size"),
            "asr": {r["plan"]: r.get("asr") for r in d.get("rows", [])}, "max_abs_diff_vs_single": d.get("max_abs_diff_vs_single")}


def import_figures(out: Path) -> dict:
    d = load(out / "import_attack.json") or {}
    return {k: d.get(k) for k in ("device", "seconds", "linf", "eps", "on_uint8_grid", "inside_eps")}


FIGURES = {"wheels": wheel_figures, "env": env_figures, "import_attack": import_figures, "tests": test_figures,
           "throughput": throughput_figures, "paper_cost": paper_figures, "ddp": ddp_figures}


def throughput_table(out: Path) -> list[str]:
    """Inputs per second of every (configuration, variant) at every batch size; PGD rows with TFLOP/s and MFU."""
    cells, sizes = {}, set()
    for p in sorted((out / "throughput").glob("*/metrics.json")):
        for r in load(p) or []:
            sizes.add(r["batch_size"])
            if r.get("inputs_per_second"):
                cell = f"{r['inputs_per_second']:.0f}"
                if r.get("mfu") is not None:
                    cell += f" ({r['achieved_tflops']:.1f} TF/s, MFU {100 * r['mfu']:.1f}%)"
                elif r.get("achieved_tflops") is not None:
                    cell += f" ({r['achieved_tflops']:.3g} TF/s)"
            else:
                cell = "skipped" if str(r.get("error", "")).startswith("skipped") else "error"
            cells.setdefault((p.parent.name, r["variant"]), {})[r["batch_size"]] = cell
    if not cells:
        return []
    cols = sorted(sizes)
    lines = ["", "## Throughput (inputs / s per attack step)", "",
             "| run | variant | " + " | ".join(f"batch {b}" for b in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for (run, variant), by in cells.items():
        lines.append(f"| {run} | {variant} | " + " | ".join(by.get(b, "-") for b in cols) + " |")
    return lines


def markdown(summary: dict) -> str:
    s = summary["suite"]
    out = Path(summary["out"])
    lines = [f"# GPU suite ({s['device']}{', tiny' if s['tiny'] else ''}): {s['status']} in {s['seconds']:.0f} s", "",
             "| step | status | seconds | key figures |", "|---|---|---:|---|"]
    for st in summary["steps"]:
        figs = json.dumps(st.get("figures") or {}, sort_keys=True)
        lines.append(f"| {st['step']} | {st['status']} | {st['seconds']} | `{figs[:600]}` |")
    lines += throughput_table(out)
    if (out / "paper_cost" / "table.md").is_file():
        lines += ["", "## Seconds per input at the papers' iteration counts", "",
                  (out / "paper_cost" / "table.md").read_text().strip()]
    return "\n".join(lines) + "\n"


def main(out_dir: str, order: str, device: str, tiny: str, seconds: str) -> None:
    out = Path(out_dir)
    steps = []
    for name in order.split():
        st = load(out / "steps" / f"{name}.json") or {"step": name, "status": "failed", "seconds": 0}
        try:
            st["figures"] = FIGURES[name](out) if name in FIGURES else {}
        except Exception as exc:  # a figure that cannot be read is a finding, not a crash of the summary
            st["figures"] = {"error": f"{type(exc).__name__}: {exc}"}
        steps.append(st)
    ok = all(st["status"] == "ok" for st in steps)
    summary = {"suite": {"device": device, "tiny": tiny == "1", "seconds": float(seconds),
                         "status": "ok" if ok else "failed"}, "out": str(out), "steps": steps}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main(*sys.argv[1:6])
PY

# ------------------------------------------------------------------------------------------------ the steps
cd "$ROOT"
SITE="$WORK/site"
mkdir -p "$SITE"
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  run_step wheels 90 300 python "$WORK/wheels.py" "$ROOT/.whl" "$SITE" "$OUT_DIR/wheels.json"
else
  STEP_ORDER+=(wheels)
  echo '{"folder": null, "installed": [], "already_present": {}, "method": "no .whl folder"}' > "$OUT_DIR/wheels.json"
  printf '{"step": "wheels", "status": "ok", "rc": 0, "seconds": 0, "limit_s": 0, "log": null}\n' > "$OUT_DIR/steps/wheels.json"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}:$ROOT/benchmarks"
export PYTHONDONTWRITEBYTECODE=1

if [ "$DEVICE" = cuda ]; then
  TEST_CAP=170; TP_CAP=170; PC_CAP=130; PC_BUDGET=25; DDP_ARGS=(--n-images 64 --batch-size 32 --steps 20)
else
  TEST_CAP=400; TP_CAP=240; PC_CAP=240; PC_BUDGET=25; DDP_ARGS=()
fi

run_step env 60 270 python "$WORK/env.py" "$OUT_DIR/env.json" "$DEVICE" "$OUT_DIR/wheels.json"
run_step import_attack 90 250 python "$WORK/import_attack.py" "$OUT_DIR/import_attack.json" "$DEVICE"
run_step tests "$TEST_CAP" 150 env DEFEND_TEST_DEVICE="$DEVICE" python -m pytest tests/test_precision.py \
  tests/test_device.py -q -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml"
run_step throughput "$TP_CAP" 80 python "$WORK/throughput.py" "$OUT_DIR/throughput" "$DEVICE" "$TINY"
run_step paper_cost "$PC_CAP" 35 python benchmarks/paper_cost.py --out "$OUT_DIR/paper_cost" --device "$DEVICE" \
  --budget-seconds "$PC_BUDGET" ${TINY_FLAG[@]+"${TINY_FLAG[@]}"}
run_step ddp 90 0 python benchmarks/ddp_attack_eval.py --out "$OUT_DIR/ddp" --device "$DEVICE" ${DDP_ARGS[@]+"${DDP_ARGS[@]}"}

TOTAL="$(awk -v a="$SUITE_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')"
python "$WORK/summary.py" "$OUT_DIR" "${STEP_ORDER[*]}" "$DEVICE" "$TINY" "$TOTAL" || {
  echo "gpu_suite: the summary could not be written" >&2; exit 1; }
python -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["suite"]["status"] != "ok")' "$OUT_DIR/summary.json"
