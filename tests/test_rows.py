"""One result-row type (``defend.rows``): the card schema's row definitions, the CSV columns, the report.md columns
and docs/card.md's field tables are generated from the row dataclasses; a field added to one row type reaches all
of them with no other edit; rows built by the measuring functions follow the schema."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from defend import rows
from defend.evaluate.card import card_errors, card_schema
from defend.evaluate.report import write_report, write_tables

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _row_errors(row: dict, definition: str) -> list[str]:
    """The schema problems of one row against ``$defs/<definition>`` (the checker of defend/evaluate/card.py)."""
    return card_errors(row, {**card_schema(), "$ref": f"#/$defs/{definition}"})


def test_checked_in_schema_is_the_generated_one():
    """defend/card_schema.json holds exactly what the row types generate (regenerate: python -m defend.rows --write),
    and validation uses the generated definitions."""
    text = (ROOT / "defend" / "card_schema.json").read_text()
    checked_in = json.loads(text)
    assert checked_in == rows.generated_schema(checked_in) == card_schema()
    assert text == rows._schema_text(checked_in)
    attack_row = card_schema()["$defs"]["attack_row"]
    assert attack_row["required"][:6] == ["attack", "framework", "interpreter", "kind", "read_by", "asr"]
    assert card_schema()["properties"]["results"]["properties"]["autoattack"] == {
        "type": "array", "items": {"$ref": "#/$defs/autoattack_row"}}


def test_docs_hold_the_generated_field_tables():
    docs = (ROOT / "docs" / "card.md").read_text()
    assert rows.docs_tables() in docs
    assert rows.docs_with_tables(docs) == docs  # --write would change nothing
    assert "| `robust_accuracy_on_correct` | share | the same over the correctly classified ones among them, with " \
           "`_ci_low` / `_ci_high` |" in docs


def test_module_prints_the_tables_and_refuses_other_arguments(capsys):
    assert rows.main(["--docs"]) == 0
    assert capsys.readouterr().out == rows.docs_tables() + "\n"
    assert rows.main(["--schema"]) == 2
    assert capsys.readouterr().err == "usage: python -m defend.rows --docs | --write\n"


def test_csv_headers_are_the_row_fields(tmp_path):
    """Each CSV's header is its row type's fields (a figure with its two interval columns, a budget as its lifted
    keys), nothing else; the columns schema 1.2 wrote are kept in their order."""
    for name, (_, cls) in rows.TABLES.items():
        expected = set()
        for f in dataclasses.fields(cls):
            if f.metadata["lift"]:
                expected |= set(f.metadata["lift"])
            elif f.metadata["csv"]:
                expected |= {f.name, f"{f.name}_ci_low", f"{f.name}_ci_high"} if f.metadata["ci"] else {f.name}
        cols = rows.csv_columns(cls)
        assert len(cols) == len(expected) and set(cols) == expected, name
        assert set(cls.CSV_ORDER) <= set(cols) | {f.name for f in dataclasses.fields(cls)}, name
    assert rows.csv_columns(rows.CleanAccuracyRow) == [
        "metric", "value", "value_ci_low", "value_ci_high", "n", "split", "chance_level", "at_chance", "seed",
        "seconds"]
    det = rows.csv_columns(rows.DetectionRow)
    assert det[5:8] == ["detection_rate_fpr1", "detection_rate_fpr1_ci_low", "detection_rate_fpr1_ci_high"]
    assert det[-3:] == ["eps", "steps", "seed"]


def _clean(cls: type[rows.CleanAccuracyRow] = rows.CleanAccuracyRow, **extra) -> rows.CleanAccuracyRow:
    return cls(value=rows.Fig(0.75, 0.6, 0.85), n=64, split="test", seed=0, seconds=0.5,
                                 chance_level=0.1, at_chance=False, **extra)


def _card(clean: dict) -> dict:
    """A minimal card around one clean-accuracy row (what write_report reads)."""
    return {"schema_version": "1.3.0", "mode": "evaluate", "battery": {"name": "t", "seed": 0},
            "system": {"classifier": {"path": "c.pt", "sha256": "0" * 64, "meta": {"arch": "x"}}, "rts": None,
                       "detector": None},
            "data": {"name": "d", "num_classes": 10, "image_shape": [1, 8, 8], "digest": "x", "n_attack_inputs": 0},
            "provenance": {"seconds": 1.0, "command": "defend evaluate"},
            "validity": {"meaningful": True, "reason": None, "sections": []}, "files": {"figures": []},
            "results": {"clean_accuracy": clean, "autoattack": [], "interpretation_robustness": [], "attacks": [],
                        "transfer": [], "detection": None}}


def test_a_new_column_is_one_field(monkeypatch, tmp_path):
    """A field added to one row type (here a subclass put in place of the clean-accuracy row) appears in the card
    schema (required, with its interval), the CSV header and the report.md table, with no other edit."""

    @dataclasses.dataclass(kw_only=True)
    class WithCalibration(rows.CleanAccuracyRow):
        calibration: rows.Fig = rows.col("expected calibration error", rows.UNIT, unit="share", ci=rows.CI_UNIT)

    monkeypatch.setitem(rows.TABLES, "clean.csv", ("clean_accuracy", WithCalibration))
    monkeypatch.setitem(rows.ROW_DEFS, "clean_accuracy_row", (WithCalibration, False))
    schema = rows.generated_schema(card_schema())
    clean_def = schema["$defs"]["clean_accuracy_row"]
    assert {"calibration", "calibration_ci_low", "calibration_ci_high"} <= set(clean_def["required"])
    row = _clean(WithCalibration, calibration=rows.Fig(0.042, 0.03, 0.055)).to_dict()
    assert card_errors(row, {**schema, "$ref": "#/$defs/clean_accuracy_row"}) == []
    missing = _clean(WithCalibration, calibration=rows.Fig(0.04)).to_dict()
    del missing["calibration_ci_high"]
    assert card_errors(missing, {**schema, "$ref": "#/$defs/clean_accuracy_row"}) == [
        ": missing required field 'calibration_ci_high'"]
    assert write_tables(tmp_path, {"clean_accuracy": row}) == ["clean.csv"]
    header, values = list(csv.reader((tmp_path / "clean.csv").open()))
    assert header[-3:] == ["calibration", "calibration_ci_low", "calibration_ci_high"]
    assert values[-3:] == ["0.042", "0.03", "0.055"]
    write_report(tmp_path, _card(row))
    report = (tmp_path / "report.md").read_text()
    assert "| accuracy | split | chance | calibration |" in report
    assert "| 0.750 [0.60, 0.85], indicative (n = 64) | test | 0.100 | 0.042 [0.03, 0.06] |" in report
    assert "| `calibration` | share | expected calibration error, with `_ci_low` / `_ci_high` |" in rows.docs_tables()


def _constant_classifier(cls: int) -> torch.nn.Module:
    class Constant(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 10)
            out[:, cls] = 1.0
            return out
    return Constant().eval()


def test_the_measured_clean_row_follows_the_schema_and_reaches_the_csv(tmp_path):
    """clean_accuracy builds its row through CleanAccuracyRow: the measured share (a constant classifier: the share
    of its class among the first 64 test inputs) is in the row, the row validates, and the CSV carries it."""
    from defend import DigitsDataModule
    from defend.evaluate.battery import Battery
    from defend.evaluate.measure import clean_accuracy
    from defend.inputs import take_split

    dm = DigitsDataModule(seed=0)
    labels = take_split(dm, "test", 64)["label"]
    cls = int(labels[0])
    battery = Battery()
    battery.clean_n = 64
    row = clean_accuracy(SimpleNamespace(data=dm, classifier=_constant_classifier(cls), say_notices=lambda: None),
                         battery)
    assert list(row) == rows.keys(rows.CleanAccuracyRow)
    assert row["value"] == pytest.approx(float((labels == cls).double().mean())) and row["n"] == 64
    assert _row_errors(row, "clean_accuracy_row") == []
    assert _row_errors({**row, "value": 1.5}, "clean_accuracy_row") == ["value: 1.5 is above the maximum 1"]
    write_tables(tmp_path, {"clean_accuracy": row})
    header, values = list(csv.reader((tmp_path / "clean.csv").open()))
    assert float(values[header.index("value")]) == pytest.approx(row["value"])


def test_a_detection_row_validates_even_when_no_input_succeeded():
    """_detection_row builds a DetectionRow: with successful inputs it carries the AUC and its interval at the end
    (schema 1.2's key order); a set none of whose inputs reached the target still gives every interval key (as
    null), so its row validates (before the row type the AUC interval keys were missing there)."""
    from defend.evaluate.measure import AttackSet, _detection_row, _thresholds

    x = torch.zeros(4, 1, 8, 8)
    s = AttackSet("adv2", "cam", "standard", {"eps": 8 / 255}, x, x, torch.zeros(4, dtype=torch.long),
                  torch.ones(4, dtype=torch.long))
    benign = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6])
    th = _thresholds(benign, benign, 0)
    assert th["fpr1"]["supported"] is False and _row_errors(th["fpr1"], "detection_threshold") == []
    hit = torch.tensor([True, True, False, True])
    row = _detection_row(s, hit, torch.tensor([0.9, 0.7, 0.2]), benign, th, 0)
    assert _row_errors(row, "detection_row") == []
    assert list(row)[-2:] == ["auc_ci_low", "auc_ci_high"] and row["auc"] is not None
    assert row["detection_rate_default"] == pytest.approx(2 / 3) and row["detection_rate_fpr1"] is None
    none = _detection_row(s, torch.zeros(4, dtype=torch.bool), torch.zeros(0), benign, th, 0)
    assert none["auc"] is None and none["auc_ci_low"] is None and none["roc"] is None
    assert _row_errors(none, "detection_row") == []
