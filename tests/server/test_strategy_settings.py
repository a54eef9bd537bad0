"""Each strategy owns its settings: names declared for the schema, values validated by its own model."""

from __future__ import annotations

from typing import Any

import pytest

from server.errors import ServerError
from server.strategies import make_strategy, strategy_class
from testbed.core.plugins import STRATEGIES
from testbed.core.scenario import ScenarioError, parse_scenario
from testbed.preflight import check_scenario


def scenario_with(update: dict[str, Any]):  # type: ignore[no-untyped-def]
    return parse_scenario({"name": "s", "rounds": 2, "update": update, "devices": [{"profile": "rpi4", "count": 1}]},
                          "s.yaml")


def preflight_error(update: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as caught:
        check_scenario(scenario_with(update), "s.yaml")
    return str(caught.value)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_declared_setting_names_are_the_settings_model_keys(name: str) -> None:
    assert tuple(sorted(STRATEGIES.attributes(name).get("settings") or ())) == strategy_class(name).Settings.keys()


def test_a_bad_value_names_the_field_path_and_the_value() -> None:
    message = preflight_error({"strategy": "dpu", "lambda": 1.5})
    assert message.startswith("s.yaml: invalid scenario\n")
    assert "  update.lambda: Input should be less than or equal to 1 (got 1.5)" in message


def test_a_boolean_where_a_number_belongs_is_refused() -> None:
    assert "update.lambda: expected a value of this field's type, not a boolean" in preflight_error(
        {"strategy": "dpu", "lambda": True})


def test_every_bad_setting_is_listed() -> None:
    message = preflight_error({"strategy": "dpu", "lambda": "half", "reinit": "sometimes"})
    assert "update.lambda:" in message and "'half'" in message
    assert "update.reinit:" in message and "'sometimes'" in message


def test_a_bad_full_variant() -> None:
    assert "update.full_variant: Input should be 'last_round' or 'same_init' (got 'never')" in preflight_error(
        {"strategy": "full", "full_variant": "never"})


@pytest.mark.parametrize(("update", "key"), [
    ({"strategy": "dpu", "full_variant": "same_init"}, "full_variant"),
    ({"strategy": "full", "lambda": 0.5}, "lambda"),
    ({"strategy": "gcpu", "lambda": 0.5}, "lambda"),
    ({"strategy": "rpu", "reinit": False}, "reinit"),
    ({"strategy": "full", "reinit_rule": "reference"}, "reinit_rule"),
    ({"strategy": "magnitude", "checkpoint": "reference"}, "checkpoint"),
    ({"strategy": "dpu", "layer_count": "round"}, "layer_count"),
])
def test_a_key_the_chosen_strategy_does_not_take_is_unknown_at_load(update: dict[str, Any], key: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        scenario_with(update)
    assert f"update.{key}: unknown field for strategy {update['strategy']}" in str(caught.value)


def test_good_settings_pass_and_reach_the_strategy() -> None:
    scenario = check_scenario(scenario_with({"strategy": "dpu", "lambda": 0.25, "reinit": False,
                                             "checkpoint": "best_epoch", "optimizer_state": "fresh"}))
    strategy = make_strategy(scenario.update)
    assert strategy.settings.lambda_ == 0.25 and not strategy.settings.reinit and strategy.settings.skip_if_worse
    assert (strategy.settings.checkpoint, strategy.settings.optimizer_state) == ("best_epoch", "fresh")
    assert not strategy.should_reinitialise(400, 100)


def test_defaults_are_the_reference_round_rules() -> None:
    strategy = make_strategy(scenario_with({"strategy": "dpu"}).update)
    settings = strategy.settings
    assert (settings.reinit, settings.reinit_rule, settings.skip_if_worse) == (True, "reference", True)
    assert (settings.checkpoint, settings.optimizer_state) == ("reference", "shared")
    # More than twice the size at the last (re)init (multiround_dpu.py:221); the old rule: at least twice.
    assert strategy.should_reinitialise(201, 100) and not strategy.should_reinitialise(200, 100)
    deployed = make_strategy(scenario_with({"strategy": "dpu", "reinit_rule": "deployed"}).update)
    assert deployed.should_reinitialise(200, 100) and not deployed.should_reinitialise(199, 100)
    for name in ("full", "rpu", "pruning", "magnitude", "gcpu"):
        other = make_strategy(scenario_with({"strategy": name}).update)
        assert not other.should_reinitialise(10_000, 1) and other.should_send(0.0, 1.0)


def test_gcpu_runs_without_reinitialisation_unless_asked() -> None:
    gcpu = make_strategy(scenario_with({"strategy": "gcpu"}).update)
    assert gcpu.lambda_ == 1.0 and not gcpu.settings.reinit
    assert make_strategy(scenario_with({"strategy": "gcpu", "reinit": True}).update).should_reinitialise(201, 100)
    assert make_strategy(scenario_with({"strategy": "lcpu"}).update).settings.reinit


def test_baselines_default_to_the_reference_too() -> None:
    full = make_strategy(scenario_with({"strategy": "full"}).update).settings
    rpu = make_strategy(scenario_with({"strategy": "rpu"}).update).settings
    pruning = make_strategy(scenario_with({"strategy": "pruning"}).update).settings
    assert (full.checkpoint, full.full_variant) == ("reference", "last_round")
    assert (rpu.checkpoint, rpu.layer_count) == ("reference", "round")
    assert (pruning.checkpoint, pruning.optimizer_state) == ("reference", "shared")


@pytest.mark.parametrize(("update", "expected"), [
    ({"strategy": "dpu", "reinit_rule": "always"}, "update.reinit_rule: Input should be 'reference' or 'deployed'"),
    ({"strategy": "gcpu", "checkpoint": "best"},
     "update.checkpoint: Input should be 'reference', 'best_epoch' or 'last_epoch'"),
    ({"strategy": "pruning", "optimizer_state": "kept"}, "update.optimizer_state: Input should be 'shared' or 'fresh'"),
    ({"strategy": "rpu", "layer_count": "ceil"}, "update.layer_count: Input should be 'round' or 'floor'"),
    ({"strategy": "full", "checkpoint": 1}, "update.checkpoint: Input should be 'reference', 'best_epoch' or"),
])
def test_a_bad_reference_setting_names_the_allowed_values(update: dict[str, Any], expected: str) -> None:
    message = preflight_error(update)
    assert expected in message
    assert len([line for line in message.splitlines() if line.startswith("  update.")]) == 1


def test_a_bad_round0_is_refused_at_load_with_the_allowed_values() -> None:
    with pytest.raises(ScenarioError) as caught:
        scenario_with({"strategy": "dpu", "round0": "dense"})
    assert "update.round0: Input should be 'sparse' or 'full' (got 'dense')" in str(caught.value)
    assert scenario_with({"strategy": "rpu", "round0": "full"}).update.round0 == "full"
    assert scenario_with({"strategy": "rpu"}).update.round0 == "sparse"


def test_the_server_refuses_bad_settings_too() -> None:
    with pytest.raises(ServerError, match=r"update\.lambda: Input should be greater than or equal to 0"):
        make_strategy(scenario_with({"strategy": "dpu", "lambda": -1}).update)


def test_reading_settings_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from server.strategies import strategy_class; strategy_class('dpu').Settings; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
