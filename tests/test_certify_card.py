"""``defend evaluate``'s ``certify`` section (issue 29): a tiny run's certification rows equal independent calls of
:mod:`attacks.certify` with the battery's seed, dual-certified never exceeds certified, the protocol hash ignores the
section, the entry and the leaderboard read the dual-certified accuracy at the first radius > 0, and bad values are
one-line errors before anything is written."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _tiny import train_tiny_classifier

from attacks import get_interpreter
from attacks.certify import certify_map, certify_prediction, dual_radius
from defend import DigitsDataModule, save_classifier, stats, validate_card
from defend.bench.leaderboard import BenchCard, build_tables, table_columns
from defend.bench.writers import cell_text, csv_text, header_text
from defend.evaluate import main
from defend.evaluate.protocol import protocol_hash
from defend.inputs import take_split

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = str(Path(__file__).parent / "data" / "evaluate_tiny.yaml")
# the cheapest battery around the certificates: no AutoAttack, no top-k attack, one interpreter attacked
FAST = ["--battery", TINY, "--no-progress", "--battery.autoattack.eps=[]", "--battery.topk.interpreters=[]",
        "--battery.attacks.interpreters=[cam]", "--battery.adaptive.ensemble=[]", "--battery.batch_size=8"]
SIGMA, N0, N, ALPHA, SPB, RADII, SHARE = 0.12, 10, 50, 0.01, 25, [0.0, 0.05, 0.25], 0.3
CERTIFY = [f"--battery.certify.sigma={SIGMA}", f"--battery.certify.n0={N0}", f"--battery.certify.n={N}",
           f"--battery.certify.alpha={ALPHA}", "--battery.certify.n_images=8", "--battery.certify.interpreters=[cam]",
           f"--battery.certify.samples_per_batch={SPB}", f"--battery.certify.radii={RADII}",
           f"--battery.certify.share={SHARE}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The tiny classifier and two runs of one battery: with the certify section and without."""
    model, _, _ = train_tiny_classifier()
    root = tmp_path_factory.mktemp("certify")
    save_classifier(model, root / "tiny.pt", {"width": 8})
    outs = {}
    for name, extra in (("on", CERTIFY), ("off", [])):
        outs[name] = root / name
        assert main(["--classifier", str(root / "tiny.pt"), "--out", str(outs[name]), *FAST, *extra]) == 0
    return model, outs


def _card(out: Path) -> dict:
    card = json.loads((out / "card.json").read_text())
    validate_card(card)
    return card


def _independent(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CERTIFY and the CAM map certificate on the first 8 test inputs, each from a generator seeded 0 (the
    battery's seed): correct, the prediction radius, the dual radius."""
    dm = DigitsDataModule(seed=0)
    test = take_split(dm, "test", 8)
    x, y = test["image"], test["label"]
    pred = certify_prediction(model, x, SIGMA, N0, N, ALPHA, samples_per_batch=SPB,
                              generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x).argmax(1)
    target = torch.where(pred.prediction >= 0, pred.prediction, base)
    maps = certify_map(model, get_interpreter("cam"), x, target, SIGMA, N0, N, ALPHA, 10.0, correction="holm",
                       samples_per_batch=SPB, generator=torch.Generator().manual_seed(0))
    return pred.prediction == y, pred.radius, dual_radius(pred, maps, SHARE)


def test_certification_rows_equal_independent_certificates(runs):
    model, outs = runs
    card = _card(outs["on"])
    rows = card["results"]["certification"]
    assert [(r["interpreter"], r["radius"]) for r in rows] == [("cam", r) for r in RADII]
    correct, radius, dual = _independent(model)
    d = int(torch.tensor(card["data"]["image_shape"]).prod())
    assert any(correct & (dual > 0)), "nothing dual-certified: the test would prove nothing"
    for r in rows:
        k = int((correct & (radius >= r["radius"])).sum())
        assert (r["certified_accuracy"], r["n"]) == (pytest.approx(k / 8), 8)
        est = stats.proportion([1] * k + [0] * (8 - k))
        assert (r["certified_accuracy_ci_low"], r["certified_accuracy_ci_high"]) == pytest.approx((est.low, est.high))
        kd = int((correct & (dual > 0) & (dual >= r["radius"])).sum())
        assert r["dual_certified_accuracy"] == pytest.approx(kd / 8)
        assert r["dual_certified_accuracy"] <= r["certified_accuracy"]
        assert r["dual_certified_accuracy"] <= r["map_certified"]
        assert (r["sigma"], r["n0"], r["n_noise"], r["alpha"], r["seed"]) == (SIGMA, N0, N, ALPHA, 0)
        assert r["linf_eps"] == pytest.approx(r["radius"] / d ** 0.5)
        assert r["forward_passes_per_input"] == 2 * (N0 + N) and r["forward_ratio"] > 1
    # the share of certified top-k pixels cannot grow with the radius
    shares = [r["map_certified_share"] for r in rows]
    assert shares == sorted(shares, reverse=True)


def test_card_files_entry_and_report(runs):
    _, outs = runs
    card = _card(outs["on"])
    rows = card["results"]["certification"]
    assert "certified.png" in card["files"]["figures"] and (outs["on"] / "certified.png").is_file()
    with open(outs["on"] / "certification.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [float(t["certified_accuracy"]) for t in table] == [r["certified_accuracy"] for r in rows]
    e = card["entry"]
    first = rows[1]  # the first radius > 0
    assert (e["dual_certified_acc"], e["dual_certified_acc_ci_low"], e["certified_radius"], e["certified_n"],
            e["certify_sigma"]) == (first["dual_certified_accuracy"], first["dual_certified_accuracy_ci_low"], 0.05,
                                    8, SIGMA)
    report = (outs["on"] / "report.md").read_text()
    assert "## Certified robustness (randomized smoothing, L2)" in report
    assert "r / sqrt(d)" in report and "0.25 (L-inf 1.15/255)" in report  # 3 x 32 x 32: 0.25 / 55.4 * 255
    assert "![certified](certified.png)" in report


def test_certify_is_not_part_of_the_protocol_and_off_leaves_no_rows(runs):
    _, outs = runs
    on, off = _card(outs["on"]), _card(outs["off"])
    assert on["protocol"]["sha256"] == off["protocol"]["sha256"] == protocol_hash(off["battery"])
    assert on["battery"]["certify"]["n"] == N and "certify" not in off["battery"]
    assert off["results"]["certification"] == [] and "certified.png" not in off["files"]["figures"]
    assert not (outs["off"] / "certification.csv").exists() and not (outs["off"] / "certified.png").exists()
    e = off["entry"]
    assert (e["dual_certified_acc"], e["certified_radius"], e["certified_n"], e["certify_sigma"]) == (
        None, None, None, None)
    assert "## Certified robustness" not in (outs["off"] / "report.md").read_text()


@pytest.mark.parametrize("bad, want", [
    ("--battery.certify.alpha=0.7", "certify.alpha must lie in (0, 0.5)"),
    ("--battery.certify.radii=[0.5, 0.25]", "certify.radii must be distinct L2 radii >= 0 in increasing order"),
    ("--battery.certify.interpreters=[camm]", "unknown interpreter 'camm' in certify.interpreters (did you mean "
                                              "'cam'?)"),
    ("--battery.certify.n0=0", 'key "certify'),  # the command line names the section; a battery file the key
    ("--battery.certify.interpreters=[rts]", "do not list 'rts' in certify.interpreters"),
])
def test_bad_certify_values_are_one_line_errors_before_any_work(bad, want, runs, tmp_path, capsys):
    out = tmp_path / "out"
    clf = str(runs[1]["on"].parent / "tiny.pt")
    assert main(["--classifier", clf, "--out", str(out), *FAST, bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("defend evaluate: error: ") and "\n" not in err and want in err, err
    assert not out.exists()
    if "n0" in bad:
        assert "must be a whole number >= 1, got 0" in err


def _entry(name: str, acc: float | None, radius: float | None) -> dict:
    return {"name": name, "dual_certified_acc": acc, "dual_certified_acc_ci_low": None if acc is None else acc - 0.1,
            "dual_certified_acc_ci_high": None if acc is None else acc + 0.1, "certified_n": 100,
            "certified_radius": radius, "attacks": []}


def test_leaderboard_column_says_the_radius_in_the_header_when_uniform_else_in_each_cell():
    same = [_entry("a", 0.4, 0.25), _entry("b", 0.3, 0.25), _entry("c", None, None)]
    col = next(c for c in table_columns(same) if c.key == "dual_certified_acc")
    assert col.better == "higher" and header_text([BenchCard("p", "h", None, e) for e in same], col) == (
        "dual-certified acc (L2 r 0.25) (n 100)")
    assert cell_text(same[0], col, 1, 100) == "0.40 ± 0.10" and cell_text(same[2], col, 3, 100) == "-"
    mixed = [_entry("a", 0.4, 0.25), _entry("b", 0.3, 0.5)]
    col = next(c for c in table_columns(mixed) if c.key == "dual_certified_acc")
    assert col.title == "dual-certified acc" and cell_text(mixed[1], col, 2, 100) == "0.30 ± 0.10 at r 0.5"
    table = list(csv.DictReader(csv_text(build_tables([BenchCard(f"{e['name']}.json", "h" * 64, None, e)
                                                        for e in mixed])).splitlines()))
    assert [(t["name"], t["dual_certified_acc"], t["dual_certified_acc_at"]) for t in table] == [
        ("a", "0.4", "0.25"), ("b", "0.3", "0.5")]


def test_a_battery_file_names_the_bad_certify_key(tmp_path):
    from defend.evaluate.battery import load_battery

    bad = tmp_path / "bad.yaml"
    bad.write_text("certify: {n0: 0}\n")
    with pytest.raises(ValueError, match=r'^battery: key "certify.n0": must be a whole number >= 1, got 0$'):
        load_battery(str(bad))
    bad.write_text("certify: {sigmaa: 0.1}\n")
    with pytest.raises(ValueError, match=r"unknown key 'sigmaa' in certify; did you mean 'sigma'\?"):
        load_battery(str(bad))
    battery, text = load_battery("quick")
    assert battery.certify is None and "certify" not in text  # unset: left out of the resolved battery
    battery, text = load_battery("quick", {"certify.sigma": 0.5})
    assert battery.certify.sigma == 0.5 and battery.certify.correction == "holm" and "certify:" in text
