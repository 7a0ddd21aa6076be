"""``defend bench`` (IDLS-Bench): the Pareto front, the ranking by each column, cards refused in one line (schema,
edited battery, missing hashes, not JSON, too large, not an object, a 1.x card, a spoofed protocol name), protocols
never mixed in one ranking, the md / csv / static page (structure, escaping of a hostile name, the cell format), the
scatter (PNG front, SVG front), the CLI's refusals and its --overwrite protection, and the page in headless Chromium
where it is installed. Entries are built by hand; the cards that must pass validation derive from one tiny real
``defend evaluate`` run (schema 2.0, its protocol hash recomputed after each edit)."""
from __future__ import annotations

import copy
import csv
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from defend.bench.cli import main
from defend.bench.leaderboard import COLUMN_KEYS, MAX_CARD_BYTES, BenchCard, build_tables, collect, rank, table_columns
from defend.bench.page import SORT_SCRIPT, page_html, scatter_svg
from defend.bench.pareto import pareto_front
from defend.bench.writers import csv_text, figure_text, markdown
from defend.evaluate.card import validate_card
from defend.evaluate.protocol import FROZEN_PROTOCOLS, protocol_hash, protocol_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from browser_check import check_page, parse_page  # noqa: E402

HOSTILE = "<script>alert(1)</script>"
HIGHER = {"clean_acc", "autoattack_acc", "topk_tau", "dual_robustness", "dual_robustness_adaptive",
          "dual_certified_acc", "attack/adv2/cam/iou"}
LOWER = {"adaptive_gap", "number_forward_passes", "eval_seconds", "attack/adv2/cam/success"}
TEXT = {"defence", "architecture", "training_data", "device", "source"}


def entry(name: str, dra: float | None = 0.5, aa: float | None = 0.4, tau: float | None = 0.3) -> dict:
    """A hand-made leaderboard entry (every field of the schema's entry; intervals symmetric, n stated)."""
    def fig(key: str, v: float | None, half: float = 0.05) -> dict:
        return {key: v, f"{key}_ci_low": None if v is None else v - half,
                f"{key}_ci_high": None if v is None else v + half}

    e = {"name": name, "source": "this run", "architecture": "small_cnn", "training_data": "digits",
         "defence": {"name": "normal", "recipe": None}, "threat_model": {"norm": "Linf", "eps": 8 / 255},
         **fig("clean_acc", 0.9), "clean_n": 1000, **fig("autoattack_acc", aa), "autoattack_n": 1000,
         **fig("topk_tau", tau), "topk_n": 100, "topk_interpreter": "cam", "topk_protocol": "ghorbani",
         **fig("dual_robustness", dra), **fig("dual_robustness_adaptive", dra), **fig("adaptive_gap", 0.0),
         "adaptive_gap_p": 1.0, "dual_n": 50, "adaptive_attacks": [],
         "attacks": [{"attack": "adv2", "interpreter": "cam", "kind": "standard", **fig("success", 0.3),
                      **fig("l1", 0.1), **fig("iou", 0.5), "n": 50, "budget_preset": "paper"}],
         "number_forward_passes": 1000, "eval_seconds": 10.0, "device": "cpu", "external_evaluations": [],
         "inputs_sha256": "1" * 64, "weights_sha256": {"classifier": "2" * 64, "rts": None, "detector": None}}
    return e


def bench_card(e: dict, protocol: str = "a" * 64) -> BenchCard:
    return BenchCard(f"cards/{e['name']}/card.json", protocol, None, e)


def set_cell(e: dict, key: str, value) -> None:
    if key == "defence":
        e["defence"]["name"] = value
    elif key.startswith("attack/"):
        e["attacks"][0][key.split("/")[3]] = value
    else:
        e[key] = value


def names(entries) -> list[str]:
    return [e["name"] for e in entries]


# ------------------------------------------------------------------------------------------------ pareto
@pytest.mark.parametrize("points, front", [
    ([(0.5, 0.5), (0.4, 0.4), (0.6, 0.2), (0.2, 0.6)], [0, 2, 3]),   # (0.4, 0.4) dominated by (0.5, 0.5)
    ([(0.5, 0.5), (0.5, 0.5), (0.5, 0.4)], [0, 1]),                  # equal points both on; (0.5, 0.4) dominated
    ([(0.5, 0.4), (0.5, 0.5)], [1]),                                 # same x, lower y: dominated
    ([(0.3, 0.7)], [0]),
    ([(0.1, 0.9), (0.2, 0.8), (0.3, 0.7), (0.4, 0.6)], [0, 1, 2, 3]),  # all on the front
    ([], []),
])
def test_pareto_front_maximises_both(points, front):
    assert pareto_front(points) == front


# ------------------------------------------------------------------------------------------------ ranking
def test_the_ranked_columns_are_the_declared_ones():
    cols = {c.key for c in table_columns([entry("x")])} - {"rank", "name"}
    assert cols == HIGHER | LOWER | TEXT
    assert set(COLUMN_KEYS) == {k for k in HIGHER | LOWER | TEXT if not k.startswith("attack/")} | {"name"}


@pytest.mark.parametrize("key", sorted(HIGHER | LOWER | TEXT))
def test_rank_by_each_column_direction_nulls_last_ties_by_name(key):
    values = {"w": 0.2, "x": 0.5, "y": None, "z": 0.5} if key not in TEXT else {"w": "b", "x": "A", "y": None,
                                                                                   "z": "a"}
    entries = []
    for n in ("z", "y", "x", "w"):
        e = entry(n)
        set_cell(e, key, values[n])
        entries.append(e)
    want = ["x", "z", "w", "y"] if key in HIGHER or key in TEXT else ["w", "x", "z", "y"]
    assert names(rank(entries, key)) == want
    reverse = ["w", "x", "z", "y"] if key in HIGHER or key in TEXT else ["x", "z", "w", "y"]
    assert names(rank(entries, key, descending=key not in HIGHER)) == reverse  # nulls stay last


def test_rank_by_name_and_the_default_ranking():
    assert names(rank([entry("b"), entry("C"), entry("a")], "name")) == ["a", "b", "C"]
    es = [entry("p", dra=0.5, aa=0.1), entry("q", dra=0.6, aa=0.0), entry("r", dra=0.5, aa=0.3),
          entry("s", dra=None, aa=0.9)]
    assert names(rank(es)) == ["q", "r", "p", "s"]  # adaptive dual robustness, then AutoAttack, nulls last


def test_unknown_rank_column_names_the_choices():
    with pytest.raises(ValueError, match="unknown column 'accuracy'; the columns: name, defence"):
        rank([entry("a")], "accuracy")


# ------------------------------------------------------------------------------------------------ real cards
@pytest.fixture(scope="module")
def real_card(tmp_path_factory, one_thread) -> dict:
    """The card.json of a tiny real ``defend evaluate`` run (schema 2.0)."""
    import torch

    from defend import save_classifier
    from defend.evaluate import main as evaluate
    from defend.models.small import small_cnn

    torch.manual_seed(0)
    model = small_cnn(num_classes=10, width=4).eval()  # untrained: the card's figures do not matter here
    root = tmp_path_factory.mktemp("bench")
    save_classifier(model, root / "tiny.pt", {"width": 4})
    tiny = str(Path(__file__).parent / "data" / "evaluate_tiny.yaml")
    assert evaluate(["--classifier", str(root / "tiny.pt"), "--out", str(root / "run"), "--battery", tiny,
                     "--no-progress"]) == 0
    return json.loads((root / "run" / "card.json").read_text())


def variant(card: dict, name: str, weights: str = "3", battery: dict | None = None, rehash: bool = True) -> dict:
    """A copy of ``card`` named ``name`` with other weights, its battery updated by ``battery`` (the protocol
    record recomputed unless ``rehash`` is False: an edit after the hash)."""
    c = copy.deepcopy(card)
    c["entry"]["name"] = name
    c["entry"]["weights_sha256"]["classifier"] = weights * 64
    c["battery"].update(battery or {})
    if rehash:
        c["protocol"] = protocol_record(c["battery"])
    return c


def put(root: Path, sub: str, card) -> Path:
    p = root / sub / "card.json"
    p.parent.mkdir(parents=True)
    p.write_text(card if isinstance(card, str) else json.dumps(card))
    return p


def test_valid_cards_are_collected_and_a_foreign_protocol_gets_its_own_table(real_card, tmp_path):
    validate_card(variant(real_card, "a"))
    put(tmp_path, "a", variant(real_card, "a", "3"))
    put(tmp_path, "b", variant(real_card, "b", "4"))
    put(tmp_path, "c", variant(real_card, "c", "5", {"seed": real_card["battery"]["seed"] + 1}))
    cards, invalid = collect([tmp_path])
    assert invalid == [] and sorted(c.entry["name"] for c in cards) == ["a", "b", "c"]
    tables = build_tables(cards)
    assert [sorted(c.entry["name"] for c in t.cards) for t in tables] == [["a", "b"], ["c"]]
    assert tables[0].main and not tables[1].main
    assert tables[1].title == f"custom protocol {tables[1].protocol[:12]}"
    chosen = build_tables(cards, protocol=tables[1].protocol[:12])
    assert [c.entry["name"] for c in chosen[0].cards] == ["c"] and chosen[0].main


def test_bench_v1_is_the_main_table_by_default_even_with_fewer_cards():
    v1 = FROZEN_PROTOCOLS["bench-v1"]
    cards = [bench_card(entry("a")), bench_card(entry("b")), bench_card(entry("v"), protocol=v1)]
    tables = build_tables(cards)
    assert [(t.title, t.main, len(t.cards)) for t in tables] == [
        ("bench-v1", True, 1), (f"custom protocol {'a' * 12}", False, 2)]
    assert build_tables(cards[:2])[0].main  # without bench-v1: the protocol with the most cards
    with pytest.raises(ValueError, match="no valid card was evaluated under protocol 'bench-v1-quick'"):
        build_tables(cards, protocol="bench-v1-quick")


def test_changing_one_battery_key_changes_the_hash_and_moves_the_card(real_card, tmp_path):
    same = variant(real_card, "same")
    moved = variant(real_card, "moved", "4", {"batch_size": real_card["battery"]["batch_size"] + 1})
    assert moved["protocol"]["sha256"] != same["protocol"]["sha256"] == protocol_hash(real_card["battery"])
    put(tmp_path, "same", same)
    put(tmp_path, "moved", moved)
    tables = build_tables(collect([tmp_path])[0])
    assert {t.protocol: [c.entry["name"] for c in t.cards] for t in tables} == {
        same["protocol"]["sha256"]: ["same"], moved["protocol"]["sha256"]: ["moved"]}


def test_invalid_cards_are_kept_with_one_line_each(real_card, tmp_path):
    no_inputs = variant(real_card, "no-inputs")
    no_inputs["entry"]["inputs_sha256"] = None
    spoofed = variant(real_card, "spoofed", "6")
    spoofed["protocol"]["name"] = "bench-v1"
    old = copy.deepcopy(real_card)
    old["schema_version"] = "1.4.0"
    del old["entry"]
    bad = {"edited": variant(real_card, "edited", "4", {"seed": 99}, rehash=False), "no-inputs": no_inputs,
           "not-json": "{not json", "a-list": "[1, 2]", "nan": '{"a": NaN}', "spoofed": spoofed, "old": old,
           "schema": {**variant(real_card, "schema", "7"), "entry": {"name": "x"}}}
    for sub, card in bad.items():
        put(tmp_path, sub, card)
    big = tmp_path / "big" / "card.json"
    big.parent.mkdir()
    big.write_bytes(b" " * (MAX_CARD_BYTES + 1))
    cards, invalid = collect([tmp_path])
    assert cards == []
    reasons = {Path(p).parent.name: r for p, r in invalid}
    assert all("\n" not in r for r in reasons.values()) and len(reasons) == len(bad) + 1
    assert reasons["edited"].startswith("protocol hash does not match its battery: edited?")
    assert reasons["no-inputs"].startswith("no inputs sha256: re-evaluate with defend evaluate, or defend card "
                                           "upgrade cannot fill it")
    assert reasons["not-json"].startswith("not JSON") and reasons["nan"].startswith("not JSON (NaN is not JSON)")
    assert reasons["a-list"] == "not a card: the JSON is a list, not an object"
    assert reasons["big"].startswith("larger than 5 MB")
    assert reasons["spoofed"].startswith("protocol name 'bench-v1' is not its battery's (a custom protocol)")
    assert reasons["old"] == "a schema 1.4.0 card (no entry): convert it with `defend card upgrade`"
    assert reasons["schema"].startswith("does not follow card schema 2.0.0: entry: missing required field")


def test_a_duplicate_entry_is_listed_once_with_a_note(real_card, tmp_path):
    put(tmp_path, "a", variant(real_card, "dup", "3"))
    put(tmp_path, "b", variant(real_card, "dup", "3"))
    cards, invalid = collect([tmp_path])
    assert [c.path for c in cards] == [str(tmp_path / "a" / "card.json")]
    assert invalid == [(str(tmp_path / "b" / "card.json"),
                        f"duplicate of {tmp_path / 'a' / 'card.json'} (same name, weights and protocol): listed once")]


# ------------------------------------------------------------------------------------------------ writers
def test_cell_text_is_value_plus_minus_half_width_or_bounds_when_lopsided():
    assert figure_text(0.48, 0.42, 0.54) == "0.48 ± 0.06"
    assert figure_text(0.02, 0.005, 0.07) == "0.02 [0.01, 0.07]"
    assert figure_text(0.48, None, None) == "0.48" and figure_text(None, None, None) == "-"


def _two_protocols() -> list:
    hostile = entry(HOSTILE, dra=0.7, aa=0.48, tau=0.2)
    hostile["autoattack_acc_ci_low"], hostile["autoattack_acc_ci_high"] = 0.42, 0.54
    return [bench_card(hostile), bench_card(entry("b", dra=0.6, aa=0.3, tau=0.6)),
            bench_card(entry("c", dra=None)), bench_card(entry("other", dra=0.9), protocol="b" * 64)]


def test_page_structure_escaping_and_cell_format():
    tables = build_tables(_two_protocols())
    text = page_html(tables, [("bad/card.json", f"not JSON {HOSTILE}")], "2026-01-01")
    page = parse_page(text)
    assert [t.attrs["data-protocol"] for t in page.tables] == ["a" * 64, "b" * 64]
    for t, pt in zip(tables, page.tables):
        assert [h["data-col"] for h in pt.headers] == [c.key for c in t.columns]
        assert [r[1][1] for r in pt.rows] == [c.entry["name"] for c in t.cards]  # name column, rank order
    main = page.tables[0]
    assert [r[0][1] for r in main.rows] == ["1", "2", "3"]
    assert main.rows[0][main.column("autoattack_acc")] == ("0.48", "0.48 ± 0.06")
    assert main.rows[2][main.column("dual_robustness_adaptive")] == ("", "-")
    assert page.scripts == [SORT_SCRIPT] and page.links == []  # no src / href: nothing loaded from outside
    assert not any(k in text for k in ("url(", "@import", "@font-face", "https:"))
    assert text.count("http:") == text.count('xmlns="http://www.w3.org/2000/svg"') == 1  # a name, not a load
    assert text.count("<script") == 1 and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "not JSON &lt;script&gt;" in text  # the reason of an invalid card is escaped too


def test_markdown_and_csv_keep_protocols_apart():
    tables = build_tables(_two_protocols())
    md = markdown(tables, [("x.json", "not JSON")], "2026-01-01", "scatter.png")
    assert f"## custom protocol {'a' * 12} (main ranking)" in md and f"`{'b' * 64}`" in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and HOSTILE not in md
    assert "| 0.48 ± 0.06 |" in md and "- `x.json`: not JSON" in md
    rows = list(csv.DictReader(io.StringIO(csv_text(tables))))
    assert [(r["protocol_sha256"][0], r["name"]) for r in rows] == [
        ("a", HOSTILE), ("a", "b"), ("a", "c"), ("b", "other")]
    assert (rows[0]["autoattack_acc"], rows[0]["autoattack_acc_ci_low"], rows[0]["autoattack_acc_ci_high"],
            rows[0]["autoattack_acc_n"]) == ("0.48", "0.42", "0.54", "1000")


def test_scatter_svg_and_png_draw_the_front_through_the_front_points(tmp_path):
    from defend.figures import scatter_ci_plot

    points = [(0.2, 0.1, 0.3, 0.8, 0.7, 0.9, "a"), (0.6, 0.5, 0.7, 0.4, 0.3, 0.5, "b"),
              (0.3, 0.2, 0.4, 0.3, 0.2, 0.4, "$\\frac{$ dominated")]  # a card's name: no mathtext
    fig = scatter_ci_plot(tmp_path / "s.png", points, pareto_front([(p[0], p[3]) for p in points]), "x", "y")
    front = next(line for line in fig.axes[0].get_lines() if "Pareto" in str(line.get_label()))
    assert list(front.get_xdata()) == [0.2, 0.6] and list(front.get_ydata()) == [0.8, 0.4]
    assert (tmp_path / "s.png").stat().st_size > 0
    svg = scatter_svg(points)
    d = svg.split('class="front" d="')[1].split('"')[0]
    assert d.count("L") == 2 and svg.count("<circle") == 3  # one step: down at a's x, across to b


# ------------------------------------------------------------------------------------------------ cli
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    cases = [([], "no CARDS"), ([str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no such card or folder"),
             ([str(tmp_path), "--out", str(tmp_path / "o"), "--sort", "speed"],
              "--sort 'speed' is not a column; the columns: name, defence"),
             ([str(tmp_path), "--out", str(tmp_path / "o"), "--protocol", "bench-v9"], "is neither a frozen protocol")]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("defend bench: error: ") and fragment in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_help_names_every_sort_column(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(f" {k}," in text or f" {k} (" in text for k in COLUMN_KEYS)


def test_cli_never_overwrites_a_file_it_did_not_write(real_card, tmp_path, capsys):
    put(tmp_path / "cards", "a", variant(real_card, "a"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "leaderboard.md").write_text("my notes\n")
    assert main([str(tmp_path / "cards"), "--out", str(out)]) == 2
    assert "refusing to overwrite 1 file(s)" in capsys.readouterr().err
    assert (out / "leaderboard.md").read_bytes() == b"my notes\n" and sorted(p.name for p in out.iterdir()) == [
        "leaderboard.md"]
    assert main([str(tmp_path / "cards"), "--out", str(out), "--overwrite"]) == 0
    assert "| 1 | a |" in (out / "leaderboard.md").read_text()
    assert main([str(tmp_path / "cards"), "--out", str(out)]) == 0  # its own output: replaced without --overwrite
    printed = capsys.readouterr().out
    assert f"wrote {out / 'index.html'}" in printed


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_the_page_sorts_in_headless_chromium_without_console_errors(tmp_path):
    page = tmp_path / "index.html"
    page.write_text(page_html(build_tables(_two_protocols()), [("x", HOSTILE)], "2026-01-01"))
    assert check_page(page, tmp_path / "shots", shutil.which("chromium"), "topk_tau") == []
    assert (tmp_path / "shots" / "before.png").stat().st_size > 0 and (tmp_path / "shots" / "after.png").is_file()
    page.write_text(page.read_text().replace('"data-ready", "1"', '"data-ready", "2"'))  # not the hashed script
    problems = check_page(page, tmp_path / "shots", shutil.which("chromium"), "topk_tau")
    assert any("Content Security Policy" in p for p in problems) and any("did not run" in p for p in problems)


def test_a_defence_adapts_only_its_own_keys_and_stays_under_the_frozen_protocol(real_card, tmp_path):
    """The detector's card skips AutoAttack and the top-k attack and reads its own interpreters (its battery hook):
    it is still ranked under bench-v1-quick; a `normal` card that skips AutoAttack is another protocol; a card whose
    adapted keys were edited is refused in one line."""
    from defend.defences import defence
    from defend.evaluate.battery import battery_mapping, load_battery, parse_battery, set_dotted
    from defend.evaluate.protocol import defence_adapted_keys

    quick = yaml.safe_load(parse_battery(battery_mapping("bench-v1-quick"))[1])
    hook = defence("detector").battery(load_battery("bench-v1-quick")[0], {
        "detector_interpreters": ["grad", "cam"], "detector_product": False, "beta": 1.0})
    assert sorted(hook) == defence_adapted_keys("detector") and "autoattack.eps" in hook
    adapted = copy.deepcopy(quick)
    for key, value in hook.items():
        set_dotted(adapted, key, value)
    plain, det, skipped = (variant(real_card, n, w) for n, w in (("plain", "3"), ("det", "4"), ("skips", "5")))
    plain["battery"], det["battery"] = quick, adapted
    skipped["battery"] = {**copy.deepcopy(quick), "autoattack": {"eps": [], "n": 16}}
    det["entry"]["defence"] = {"name": "detector", "recipe": None}
    skipped["entry"]["defence"] = {"name": "normal", "recipe": None}
    for c in (plain, det, skipped):
        c["protocol"] = protocol_record(c["battery"], c["entry"]["defence"]["name"])
    assert det["protocol"]["name"] == plain["protocol"]["name"] == "bench-v1-quick"
    assert skipped["protocol"]["name"] is None
    edited = copy.deepcopy(det)
    edited["entry"]["name"], edited["protocol"]["adapted_keys"] = "edited", []
    for sub, card in {"plain": plain, "det": det, "skipped": skipped, "edited": edited}.items():
        put(tmp_path, sub, card)
    cards, invalid = collect([tmp_path])
    tables = build_tables(cards)
    assert [(t.title, sorted(c.entry["name"] for c in t.cards)) for t in tables][0] == ("bench-v1-quick",
                                                                                       ["det", "plain"])
    assert [sorted(c.entry["name"] for c in t.cards) for t in tables[1:]] == [["skips"]]
    assert [Path(p).parent.name for p, _ in invalid] == ["edited"]
    assert invalid[0][1].startswith("protocol.adapted_keys [] are not those its defence 'detector' adapts")
