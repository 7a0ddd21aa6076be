"""Pleasant on a Monday morning (issue 25): progress lines on long phases, a fast ``defend --help`` that loads no
torch, figures in the format their suffix asks for (log-FPR ROC, perceptual maps, one measure per bar axis) and a
CPU-only install through the Makefile."""
from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import defend.figures as figures
from defend.evaluate.report import write_figures
from defend.progress import Progress, progress_enabled, track

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ progress
def test_progress_lines_state_done_total_rate_and_time_left():
    buf = io.StringIO()
    for _ in track(range(4), "MASK solves", per=8, enabled=True, every=0, stream=buf):
        time.sleep(0.01)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[progress] MASK solves: 8/32 inputs (25 %)")
    assert re.search(r"[\d.]+ inputs/s, about \d+ s left$", lines[0]), lines[0]
    assert lines[2].startswith("[progress] MASK solves: 24/32 inputs (75 %)")
    assert re.fullmatch(r"\[progress\] MASK solves: 32/32 inputs in \d+ s", lines[-1]), lines[-1]


def test_progress_heartbeat_speaks_during_one_long_unit():
    """A batched solve is one unit: the heartbeat still prints (elapsed time before the first unit is done)."""
    buf = io.StringIO()
    with Progress("AutoAttack", 64, enabled=True, every=0.05, stream=buf) as bar:
        time.sleep(0.3)
        bar.update(64)
    text = buf.getvalue()
    assert re.search(r"AutoAttack: 0/64 inputs, \d+ s elapsed", text), text
    assert text.rstrip().endswith("AutoAttack: 64/64 inputs in 0 s")


def test_progress_off_is_silent(capsys):
    buf = io.StringIO()
    with progress_enabled(False):
        for _ in track(range(3), "top-k attack", every=0, stream=buf):
            pass
        with Progress("detection", 2, every=0.01) as bar:
            time.sleep(0.05)
            bar.update(2)
    assert buf.getvalue() == "" and capsys.readouterr().err == ""
    with Progress("detection", 1, every=0) as bar:  # on again outside the switch (the default)
        bar.update(1)
    assert "[progress] detection: 1/1 inputs" in capsys.readouterr().err


def test_an_error_in_the_phase_stops_the_heartbeat_without_a_closing_line():
    buf = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"):
        for _ in track(range(3), "detection", enabled=True, every=0.01, stream=buf):
            raise RuntimeError("boom")
    time.sleep(0.05)
    after = buf.getvalue()
    time.sleep(0.05)
    assert buf.getvalue() == after and " in " not in after


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize(("argv", "shown", "parser"), [(["--help"], "commands:", []),
                                                     (["evaluate", "--help"], "--classifier", ["jsonargparse"])])
def test_help_loads_no_torch_or_lightning(argv, shown, parser):
    """``defend --help`` loads nothing heavy; ``defend evaluate --help`` only its parser (jsonargparse, the one
    front-end of fit / experiment / evaluate), never torch, Lightning or matplotlib."""
    code = (f"import sys, defend.cli\ntry:\n    defend.cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'pytorch_lightning', 'lightning', 'lightning_fabric', 'jsonargparse', 'matplotlib'}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert shown in res.stdout and "evaluate" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == f"HEAVY {parser}"


def test_the_flat_namespace_still_resolves_lazily():
    import defend

    assert defend.map_l1 is __import__("defend.metrics", fromlist=["map_l1"]).map_l1
    assert defend.stats.__name__ == "defend.stats" and "DigitsDataModule" in dir(defend)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        defend.nope  # noqa: B018


# ------------------------------------------------------------------------------------------------ figures
MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": (b"<?xml", b"<svg")}
WRITERS = {
    "map_grid": lambda p: figures.map_grid(p, [("x", torch.rand(2, 3, 8, 8)), ("map", torch.rand(2, 1, 8, 8))], rows=2),
    "line_plot": lambda p: figures.line_plot(p, [0, 1, 2], {"a": [1, 2, 3]}, "x", "y"),
    "roc_plot": lambda p: figures.roc_plot(p, {"adv2": ([0.0, 0.004, 0.1, 1.0], [0.0, 0.5, 0.9, 1.0], 0.93)}),
    "bar_chart": lambda p: figures.bar_chart(p, ["a", "b"], {"s": [0.5, None], "t": [0.2, 0.3]}, "ASR"),
    "bar_panels": lambda p: figures.bar_panels(p, ["a", "b"], {"up": {"s": [0.5, 0.1]}, "down": {"t": [0.2, 0.3]}}),
}


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_each_writer_writes_the_format_its_suffix_asks(tmp_path, writer, suffix):
    path = tmp_path / f"fig{suffix}"
    WRITERS[writer](path)
    assert path.read_bytes()[:5].startswith(MAGIC[suffix]), path.read_bytes()[:20]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_an_unknown_suffix_is_refused_before_plotting(tmp_path, writer, monkeypatch):
    def no_plot(*a, **k):
        raise AssertionError("plotting started before the suffix was checked")

    monkeypatch.setattr(figures.plt, "subplots", no_plot)
    with pytest.raises(ValueError, match=r"unsupported file suffix '\.docx'; use one of .*\.pdf.*\.png.*\.svg") as e:
        WRITERS[writer](tmp_path / "fig.docx")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_roc_fpr_axis_is_log_scaled_and_shows_the_low_fpr_region(tmp_path):
    fig = WRITERS["roc_plot"](tmp_path / "roc.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlim()[0] <= 0.004 / 2 + 1e-12  # the smallest measured FPR is on the page, not squeezed at 0
    drawn = ax.lines[0].get_xdata()
    assert min(drawn) > 0 and list(drawn[1:]) == [0.004, 0.1, 1.0]  # FPR 0 drawn at the axis floor


def test_maps_use_a_perceptual_colour_map_with_the_colour_bar_inside_the_figure(tmp_path):
    fig = figures.map_grid(tmp_path / "narrow.png", [("map", torch.rand(3, 1, 8, 8))], rows=3)
    cmaps = {im.get_cmap().name for ax in fig.axes for im in ax.get_images()}
    assert cmaps == {"viridis"}
    assert fig.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine"
    bar_ax = fig.axes[-1]
    box = bar_ax.get_position()
    assert 0 <= box.x0 and box.x1 <= 1, "the colour bar falls off the figure"


def test_the_card_figures_put_one_measure_per_axis_and_a_log_fpr(tmp_path, monkeypatch):
    made = {}
    real_save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path, fmt: made.setdefault(Path(path).name, real_save(fig, path, fmt)))
    attack = {"attack": "adv2", "interpreter": "cam", "read_by": "cam", "asr": 0.9, "l1": 0.3, "iou": 0.2}
    det = {"n_benign": 50, "rows": [{"attack": "adv2", "interpreter": "cam", "auc": 0.9,
                                     "roc": {"fpr": [0.0, 0.02, 1.0], "tpr": [0.0, 0.7, 1.0]}}]}
    files = write_figures(tmp_path, None, [], {}, {"attacks": [attack], "detection": det}, n_show=0)
    assert files == ["attacks.png", "roc.png"]
    panels = made["attacks.png"].axes
    labels = [ax.get_ylabel() for ax in panels]
    assert len(panels) == 3 and [len(ax.patches) for ax in panels] == [1, 1, 1]
    assert "higher" in labels[0] and "higher" in labels[1] and "lower" in labels[2] and "IoU" in labels[2]
    assert [ax.patches[0].get_height() for ax in panels] == [0.9, 0.3, 0.2]
    assert made["roc.png"].axes[0].get_xscale() == "log"


# ------------------------------------------------------------------------------------------------ CPU install
def _make_n(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "venv", f"VENV={tmp_path / 'venv'}", *extra], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_make_torch_cpu_installs_the_pinned_pair_from_the_cpu_index(tmp_path):
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    cpu = _make_n(tmp_path, "TORCH=cpu")
    assert cpu.returncode == 0, cpu.stderr
    line = next(ln for ln in cpu.stdout.splitlines() if "download.pytorch.org" in ln)
    assert "--index-url https://download.pytorch.org/whl/cpu" in line and "--no-deps" in line
    assert f"torch=={pins['torch']}+cpu torchvision=={pins['torchvision']}+cpu" in line
    rest = [ln for ln in cpu.stdout.splitlines() if "-c constraints.txt" in ln]
    assert rest and all("index-url" not in ln for ln in rest)  # only torch comes from the CPU index
    default = _make_n(tmp_path)
    assert default.returncode == 0 and "download.pytorch.org" not in default.stdout
    bad = _make_n(tmp_path, "TORCH=rocm")
    assert bad.returncode != 0 and "TORCH=rocm is not known" in bad.stderr


def test_make_refuses_a_new_venv_on_a_full_disk_before_any_work(tmp_path):
    venv = tmp_path / "venv"
    run = subprocess.run(["make", "venv", f"VENV={venv}", "NEED_GB=1000000"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode != 0 and not venv.exists()  # nothing installed, nothing half-made
    message = [ln for ln in run.stderr.splitlines() if ln.startswith("make: a new")]
    assert len(message) == 1 and "at least 1000000 GB of free disk" in message[0] and "TORCH=cpu" in message[0]
