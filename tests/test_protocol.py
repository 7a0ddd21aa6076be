"""The protocol hash: each frozen protocol's config file resolves (as a card stores its battery) to its pinned hash;
the hash ignores key order, YAML formatting and the battery's free-text name, and changes with every single value of
the resolved bench-v1 battery; a value with no canonical form (NaN) refuses."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from defend.evaluate.battery import BATTERIES, battery_mapping, parse_battery
from defend.evaluate.protocol import FROZEN_PROTOCOLS, canonical_battery, protocol_hash, protocol_record


def resolved(name: str) -> dict[str, Any]:
    """The battery ``name`` as ``card.json`` stores it."""
    return yaml.safe_load(parse_battery(battery_mapping(name))[1])


@pytest.mark.parametrize("name", ["bench-v1", "bench-v1-quick"])
def test_each_frozen_protocol_file_resolves_to_its_pinned_hash(name):
    assert name in BATTERIES
    battery = resolved(name)
    assert protocol_hash(battery) == FROZEN_PROTOCOLS[name]
    assert protocol_record(battery) == {"name": name, "sha256": FROZEN_PROTOCOLS[name], "adapted_keys": []}


def test_the_two_protocols_differ_and_their_keys_are_what_the_benchmark_says():
    full, quick = resolved("bench-v1"), resolved("bench-v1-quick")
    assert FROZEN_PROTOCOLS["bench-v1"] != FROZEN_PROTOCOLS["bench-v1-quick"]
    assert full["autoattack"] == {"eps": [pytest.approx(8 / 255)], "n": 1000}
    assert (full["topk"]["protocol"], full["topk"]["interpreters"], full["topk"]["with_rts"]) == (
        "boopathy", ["cam", "grad"], True)
    assert (full["attacks"]["attacks"], full["attacks"]["attack_preset"]) == (["adv2", "advedge_plus"], "paper")
    assert full["adaptive"]["ensemble"] == ["adv2", "advedge_plus"] and full["adaptive"]["detector_weights"] == [0, 1, 4]
    assert (full["n_images"], full["seed"], full["detector"]["n_benign"]) == (100, 0, 200)
    assert quick["detector"]["n_benign"] == 200 and quick["adaptive"]["detector_budget_check"] is False


def test_a_battery_of_ones_own_has_no_protocol_name():
    battery = resolved("bench-v1")
    battery["n_images"] = 99
    assert protocol_record(battery)["name"] is None


def test_hash_is_stable_across_key_order_yaml_formatting_and_name():
    from_file = battery_mapping("bench-v1")  # the YAML file: block style, comments, 8/255 as text
    reference = protocol_hash(resolved("bench-v1"))
    # block style with comments -> flow style, keys reversed, 8/255 written as a float, ints as floats, renamed
    raw = yaml.safe_load(yaml.safe_dump(from_file))
    raw = dict(reversed(list(raw.items())))
    raw["autoattack"] = {"n": 1000, "eps": [8 / 255]}
    raw["name"] = "my copy"
    flow = yaml.safe_dump(raw, default_flow_style=True, sort_keys=False)
    again = yaml.safe_load(parse_battery(yaml.safe_load(flow))[1])
    assert protocol_hash(again) == reference
    shuffled = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
                for k, v in reversed(list(resolved("bench-v1").items()))}
    assert protocol_hash(shuffled) == reference
    as_floats = copy.deepcopy(resolved("bench-v1"))
    as_floats["n_images"], as_floats["topk"]["k"] = 100.0, 8.0
    assert protocol_hash(as_floats) == reference


def leaves(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every leaf of a mapping (lists' items included; an empty list or mapping is a leaf) with its path."""
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaves(v, (*path, k))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from leaves(v, (*path, i))
    else:
        yield path, node


def changed(value: Any) -> Any:
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 1
    return ["x"] if value == [] else {"x": 1}  # an empty list / mapping gets an item


def test_any_single_value_changes_the_hash():
    battery = resolved("bench-v1")
    reference = protocol_hash(battery)
    paths = [p for p, _ in leaves(battery) if p != ("name",)]
    assert len(paths) > 50 and ("interpreter_options",) in paths  # every leaf, defaults and empty mappings included
    for path, value in leaves(battery):
        if path == ("name",):
            continue
        other = copy.deepcopy(battery)
        node = other
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = changed(value)
        assert protocol_hash(other) != reference, path


def test_name_is_not_part_of_the_protocol():
    battery = resolved("bench-v1")
    assert protocol_hash({**battery, "name": "anything"}) == protocol_hash(battery)
    assert '"name"' not in canonical_battery(battery)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_value_that_is_not_finite_refuses(bad):
    battery = resolved("bench-v1")
    battery["adaptive"]["rts_enc_weight"] = bad
    with pytest.raises(ValueError, match="not finite"):
        protocol_hash(battery)
