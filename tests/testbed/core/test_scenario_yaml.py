"""Hostile scenario files: duplicate keys, alias bombs, recursive aliases and huge values each give one short error."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.cli import EXIT_BAD_SCENARIO, main
from testbed.core.scenario import ScenarioError, load_scenario, parse_scenario
from testbed.core.scenario_yaml import MAX_EXPANDED_NODES, ScenarioYamlError, load_scenario_yaml

LOWBAND = Path(__file__).resolve().parents[3] / "scenarios" / "lowband.yaml"


def alias_bomb(levels: int) -> str:
    """The classic "billion laughs": each level is nine uses of the one before."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_a_nine_level_alias_bomb_is_refused_in_well_under_a_second(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(LOWBAND.read_text() + alias_bomb(9))
    started = time.perf_counter()
    assert main(["validate", str(path)]) == EXIT_BAD_SCENARIO
    assert time.perf_counter() - started < 1.0  # the expansion is counted on the node graph, never built
    output = " ".join(capsys.readouterr().out.split())
    assert f"expands (through its aliases) to more than {MAX_EXPANDED_NODES:,} values" in output
    assert len(output) < 400


def test_a_small_shared_alias_is_fine() -> None:
    assert load_scenario_yaml("a: &x {rate: 1}\nb: *x\nc: *x\n") == {"a": {"rate": 1}, "b": {"rate": 1}, "c": {"rate": 1}}


def test_a_four_level_bomb_under_the_bound_still_gives_a_short_error() -> None:
    """Four levels (66,430 values) pass the YAML bound; the schema refuses the field, showing 200 characters of it."""
    raw = load_scenario_yaml(LOWBAND.read_text() + alias_bomb(4))
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(raw, "bomb.yaml")
    message = str(caught.value)
    assert "a4: unknown field" in message and "characters)" in message
    assert len(message) < 2_000


def test_a_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(LOWBAND.read_text().replace("rounds: 8", "rounds: 8\nrounds: 3"))
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    lines = LOWBAND.read_text().splitlines()
    first = next(number for number, line in enumerate(lines, 1) if line.startswith("rounds:"))
    assert str(caught.value) == (f"{path}: line {first + 1}: key 'rounds' is given twice (first on line {first}); "
                                 "keep one")


def test_a_nested_duplicate_key_and_one_in_an_override() -> None:
    with pytest.raises(ScenarioYamlError, match="line 3: key 'rate' is given twice \\(first on line 2\\)"):
        load_scenario_yaml("downlink:\n  rate: 1\n  rate: 2\n")
    with pytest.raises(ScenarioError, match="--set 'channel.downlink=\\{rate: 1, rate: 2\\}': the value is"):
        parse_scenario(load_scenario_yaml(LOWBAND.read_text()), "x.yaml", ["channel.downlink={rate: 1, rate: 2}"])


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(ScenarioYamlError, match="an alias refers to a value that contains it"):
        load_scenario_yaml("a: &x [1, *x]\n")


def test_yaml_syntax_errors_say_line_and_column() -> None:
    with pytest.raises(ScenarioYamlError, match="not valid YAML: line 2, column 1: expected ',' or ']'"):
        load_scenario_yaml("rounds: [1, 2\n")


@given(st.text(max_size=200))
def test_any_text_is_data_or_one_scenario_yaml_error(text: str) -> None:
    try:
        load_scenario_yaml(text)
    except ScenarioYamlError as error:
        assert "\n" not in str(error) and len(str(error)) < 500
