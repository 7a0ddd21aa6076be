"""The GPU suite's CPU smoke run: ``bash benchmarks/gpu_suite.sh --device cpu --tiny --out <tmp>`` (about 1.5 minutes
on one thread) passes every step and writes the figures each step promises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["wheels", "env", "import_attack", "tests", "throughput", "paper_cost", "ddp"]
THROUGHPUT_RUNS = {"fp32_channels_last": ["pgd", "adv2_rts"], "bf16_channels_last": ["pgd", "adv2_rts"],
                   "bf16_contiguous_pgd": ["pgd"]}
TINY_BATCHES = [4, 8]


def suite_env() -> dict[str, str]:
    """This interpreter's ``python`` first on PATH (the suite uses the ``python`` it finds), one thread."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("DEFEND_TEST_DEVICE", None)
    return env


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_suite")
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=ROOT, env=suite_env(), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    print(f"gpu_suite --device cpu --tiny: {wall:.1f} s")
    return {"proc": proc, "out": out, "wall": wall}


def load(path: Path):
    return json.loads(path.read_text())


def test_suite_exits_0_with_every_step_ok(suite):
    proc, out = suite["proc"], suite["out"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = load(out / "summary.json")
    assert [s["step"] for s in summary["steps"]] == STEPS
    bad = {s["step"]: s["status"] for s in summary["steps"] if s["status"] != "ok"}
    assert not bad, (bad, proc.stderr[-3000:])
    assert summary["suite"]["status"] == "ok" and summary["suite"]["tiny"] is True
    assert all(isinstance(s["seconds"], (int, float)) for s in summary["steps"])
    md = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in md for name in STEPS), md


def test_env_and_import_check(suite):
    env = load(suite["out"] / "env.json")
    assert env["versions"]["torch"] and env["device"]["requested"] == "cpu"
    assert not str(env["versions"]["jsonargparse"]).startswith("missing")
    check = load(suite["out"] / "import_attack.json")
    assert check["on_uint8_grid"] and check["inside_eps"] and check["linf"] <= check["eps"] + 1e-6


def test_device_tests_ran_and_passed(suite):
    figures = next(s for s in load(suite["out"] / "summary.json")["steps"] if s["step"] == "tests")["figures"]
    assert figures["tests"] >= 8 and figures["failures"] == 0 and figures["errors"] == 0 and figures["skipped"] == 0


def test_throughput_rows_for_every_batch(suite):
    """A row for every batch size: the first measured, a later one measured or skipped with the time-budget reason
    (a run's share of the step's limit, ``--max-seconds``, runs out on a heavily loaded machine: said, never a silent
    gap); FLOPs scale with the batch. Whether throughput rises is a GPU finding read from the suite's output, not
    asserted on a shared CPU where timings are noise."""
    for run, variants in THROUGHPUT_RUNS.items():
        rows = load(suite["out"] / "throughput" / run / "metrics.json")
        for variant in variants:
            got = {r["batch_size"]: r for r in rows if r["variant"] == variant}
            assert sorted(got) == TINY_BATCHES, (run, variant, sorted(got))
            first = got[min(TINY_BATCHES)]
            assert first.get("inputs_per_second") and not first.get("error"), (run, first)
            assert all((r.get("inputs_per_second") and not r.get("error"))
                       or str(r.get("error", "")).startswith("skipped: would end after --max-seconds")
                       for r in got.values()), (run, got)
        pgd = {r["batch_size"]: r for r in rows if r["variant"] == "pgd" and not r.get("error")}
        assert all(r["pgd_step_flops"] > 0 and r["achieved_tflops"] > 0 for r in pgd.values())
        if len(pgd) == len(TINY_BATCHES):
            small, large = pgd[min(TINY_BATCHES)], pgd[max(TINY_BATCHES)]
            assert large["pgd_step_flops"] == 2 * small["pgd_step_flops"]  # FLOPs scale with the batch
        assert all(r["channels_last"] == run.endswith("channels_last") for r in rows)
        assert all(r["dtype"] == ("bf16-autocast" if run.startswith("bf16") else "fp32") for r in rows)


def test_paper_cost_rows_are_marked(suite):
    rows = {r["interpreter"]: r for r in load(suite["out"] / "paper_cost" / "metrics.json")}
    assert sorted(rows) == ["cam", "grad", "mask", "rts"]
    for name, r in rows.items():
        assert r["status"] in ("measured", "extrapolated"), r
        assert r["seconds_per_input"] > 0 and r["table3_seconds_per_input"] > 0, r
        assert r["scale"] == 0.01 and r["steps"] == {"grad": 8, "cam": 12, "mask": 10, "rts": 12}[name]


def test_ddp_step_reports_its_backend(suite):
    d = load(suite["out"] / "ddp" / "metrics.json")
    assert d["backend"] == d["requested_backend"] == "gloo" and d["backend_ok"] is True
    assert d["process_group"]["initialized"] and d["process_group"]["world_size"] == 1
    assert d["process_group"]["strategy"] == "DDPStrategy"
    assert {r["plan"] for r in d["rows"]} == {"pgd/pgd/-", "adv2/pgd/cam"}
    assert all(v == 0 for v in d["max_abs_diff_vs_single"].values()), d["max_abs_diff_vs_single"]


def test_paper_cost_extrapolates_when_the_budget_is_spent(tmp_path):
    """Budget 0: nothing is run whole; every figure is the prediction, marked ``extrapolated``."""
    cmd = [sys.executable, str(ROOT / "benchmarks/paper_cost.py"), "--out", str(tmp_path), "--tiny", "--threads", "1",
           "--budget-seconds", "0", "--interpreters", "cam", "mask"]
    proc = subprocess.run(cmd, cwd=ROOT, env=suite_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = load(tmp_path / "metrics.json")
    assert [r["status"] for r in rows] == ["extrapolated", "extrapolated"]
    for r in rows:
        assert r["seconds"] == pytest.approx(r["predicted_seconds"]) and r["measured_over_predicted"] is None
    mask = rows[1]
    assert mask["n_resets"] == mask["steps"] // mask["reset_every"] and mask["t_reset"] > 0
    assert "extrapolated" in (tmp_path / "table.md").read_text()


def test_attack_speed_skips_a_batch_predicted_past_the_limit():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from attack_speed import over_budget

    assert not over_budget(None, 1e9, (4, 1.0), 8)
    assert not over_budget(10.0, 50.0, None, 256)  # the first batch always runs
    assert over_budget(10.0, 5.0, (4, 3.0), 8)  # 5 s + 6 s predicted > 10 s
    assert not over_budget(12.0, 5.0, (4, 3.0), 8)


def test_suite_rejects_an_unknown_device(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--device", "tpu", "--out", str(tmp_path)],
                          cwd=ROOT, env=suite_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--device must be cuda or cpu" in proc.stderr
