"""The ``scorecard`` experiment on a tiny setup (width-4 networks, a few batches, 6 attacked images): every defence row
has every column (a figure in range or "not measured"), every row's card validates, the table's cells are the
cards' figures, beta_smoothing's card really explains with grad_softplus, and the cards written by the nested
evaluations belong to the experiment's output manifest (so a second run into the same --out may replace them)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from _tiny import train_tiny_classifier

from defend import load_card, save_classifier, validate_card
from defend.experiments.runner import load_experiments
from defend.experiments.runner import main as experiment
from defend.experiments.scorecard import DEFENCES, NOT_MEASURED
from defend.io import load_artifact

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "scorecard_tiny.yaml")
NUMBER = re.compile(r"-?\d+\.\d+")


@pytest.fixture(scope="module")
def scorecard(tmp_path_factory, one_thread):
    import os

    root = tmp_path_factory.mktemp("scorecard")
    model, _, _ = train_tiny_classifier(steps=60, width=4)
    clf = root / "tiny.pt"
    save_classifier(model, clf, {"width": 4})
    out = root / "out"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the tiny config names tests/data/evaluate_tiny.yaml relative to the repository
    try:
        load_experiments()
        args = ["-c", TINY, "--out", str(out), "--no-progress", f"--classifier.checkpoint={clf}"]
        assert experiment(args) == 0
    finally:
        os.chdir(cwd)
    return out, args


def _table(out: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader((out / "scorecard.csv").read_text().splitlines()))
    return rows[0], rows[1:]


def test_every_defence_row_has_every_column(scorecard):
    out, _ = scorecard
    headers, body = _table(out)
    defences = [r[0].split(" ")[0] for r in body]
    assert set(defences) == set(DEFENCES)
    assert all(len(r) == len(headers) for r in body)
    for r in body:
        for h, cell in zip(headers[1:], r[1:]):
            if cell == NOT_MEASURED:
                continue
            nums = [float(v) for v in NUMBER.findall(cell)]
            assert nums, (r[0], h, cell)
            assert all(0.0 <= v <= 1.0 for v in nums), (r[0], h, cell)
    assert any(h.startswith("ADV2 (eps 8/255") and "n=" in h for h in headers), headers
    report = (out / "report.md").read_text()
    assert headers[0] in report and all(f"**{d}**" in report for d in DEFENCES)
    assert "VGG-16 trunk randomly initialised (no pre-trained weights available; the paper uses ImageNet weights)" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert {m["defence"] for m in metrics} == set(DEFENCES)
    for m in metrics:
        assert m["status"] in ("measured", NOT_MEASURED)
        if m["status"] == NOT_MEASURED:
            assert not any(k in m for k in ("value", "asr", "iou", "dr5"))
    # RTS rows have no ensemble attack: their adaptive ADV2 is adaptive_rts; the detector's is detector-aware
    rts = next(r for r in body if r[0].startswith("rts_aid"))
    assert "(adaptive_rts)" in rts[headers.index(next(h for h in headers if h.startswith("ADV2 adaptive")))]
    det = next(r for r in body if r[0].startswith("detector"))
    assert "adaptive_detector" in " ".join(det) or NOT_MEASURED in det
    assert (out / "scorecard.png").stat().st_size > 0


def test_cards_validate_and_cells_are_their_figures(scorecard):
    out, _ = scorecard
    headers, body = _table(out)
    col = headers.index(next(h for h in headers if h.startswith("ADV2 (")))
    for d in DEFENCES:
        card = load_card(out / "cards" / d)
        validate_card(card)
        assert card["mode"] == "evaluate"
    normal = load_card(out / "cards" / "normal")
    clean = next(r for r in body if r[0] == "normal · CAM")[1]
    c = normal["results"]["clean_accuracy"]
    assert clean == f"{c['value']:.3f} [{c['value_ci_low']:.2f}, {c['value_ci_high']:.2f}]"
    row = next(a for a in normal["results"]["attacks"] if a["attack"] == "adv2" and a["kind"] == "standard"
               and a["interpreter"] == "cam" and a["read_by"] == "cam")
    cell = " · ".join(f"{label} {row[k]:.2f} [{row[k + '_ci_low']:.2f}, {row[k + '_ci_high']:.2f}]"
                      for label, k in (("ASR", "asr"), ("IoU", "iou")))
    assert next(r for r in body if r[0] == "normal · CAM")[col] == cell
    pgd = load_card(out / "cards" / "pgd_at")
    assert pgd["system"]["classifier"]["meta"]["robust_training"]["mode"] == "pgd_at"
    assert load_card(out / "cards" / "rts_aid")["system"]["rts"] is not None


def test_beta_smoothing_explains_with_grad_softplus(scorecard):
    out, _ = scorecard
    card = load_card(out / "cards" / "beta_smoothing")
    b = card["battery"]
    assert "grad_softplus" in b["attacks"]["interpreters"] and "grad" not in b["attacks"]["interpreters"]
    assert b["interpreter_options"]["grad_softplus"]["beta"] == 2.0
    read = {a["read_by"] for a in card["results"]["attacks"]}
    assert "grad_softplus" in read and "grad" not in read
    headers, body = _table(out)
    assert [r[0] for r in body if r[0].startswith("beta_smoothing")] == ["beta_smoothing · GRAD_SOFTPLUS"]


def test_noise_rows_are_trained_with_noise(scorecard):
    """gaussian_aug's card explains a classifier trained in mode gaussian at the configured sigma; rts_noise's RTS was
    fine-tuned from the plain RTS with the noise term (its AID steps counted)."""
    out, _ = scorecard
    card = load_card(out / "cards" / "gaussian_aug")
    trained = card["system"]["classifier"]["meta"]["robust_training"]
    assert (trained["mode"], trained["sigma"]) == ("gaussian", 0.25)
    assert load_card(out / "cards" / "rts_noise")["system"]["rts"]["path"] == str(out / "models" / "rts_noise.pt")
    meta = load_artifact(out / "models" / "rts_noise.pt", "rts")["meta"]
    assert meta["aid_noise_sigma"] == 0.25 and meta["aid_steps"] > 0 and meta["init_from"].endswith("rts.pt")


def test_nested_evaluations_are_in_the_experiments_manifest(scorecard):
    """A later run into the same --out may replace the cards (they are recorded as the experiment's own outputs)."""
    out, _ = scorecard
    manifest = json.loads((out / ".defend-manifest.json").read_text())["files"]
    assert "cards/normal/card.json" in manifest and "models/pgd_at.pt" in manifest


def test_the_leaderboard_ranks_every_row_and_adapted_keys_are_the_defences(scorecard):
    """Every row's card names its defence and is ranked in bench/ (none refused). The tiny battery is a custom
    protocol: the rows whose defence adapts no battery key share one table; a defence that adapts keys lists exactly
    its hook's keys (its card is then hashed without them: under a frozen protocol it joins the main table,
    tests/test_bench.py)."""
    from defend.evaluate.protocol import defence_adapted_keys

    out, _ = scorecard
    plain = set()
    for d in DEFENCES:
        card = load_card(out / "cards" / d)
        assert card["entry"]["defence"]["name"] == d and card["entry"]["name"] == d
        assert card["protocol"]["adapted_keys"] == defence_adapted_keys(d)
        if not card["protocol"]["adapted_keys"]:
            plain.add(card["protocol"]["sha256"])
    assert len(plain) == 1 and defence_adapted_keys("detector") and not defence_adapted_keys("pgd_at")
    md = (out / "bench" / "leaderboard.md").read_text()
    assert md.count("(main ranking)") == 1 and "## Cards not ranked\n\nNone." in md
    ranked = list(csv.DictReader((out / "bench" / "leaderboard.csv").read_text().splitlines()))
    assert sorted(r["name"] for r in ranked) == sorted(DEFENCES)
    assert {r["protocol_sha256"] for r in ranked if not defence_adapted_keys(r["name"])} == plain
    assert "bench/leaderboard.md" in (out / "report.md").read_text()
