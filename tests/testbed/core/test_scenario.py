"""Scenario loading: lowband loads, every bad input is one ScenarioError naming field and value, overrides."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.core.scenario import Scenario, ScenarioError, apply_override, load_scenario, parse_scenario

LOWBAND = Path(__file__).resolve().parents[3] / "scenarios" / "lowband.yaml"
RAW = yaml.safe_load(LOWBAND.read_text())


def raw(**changes) -> dict:
    """The lowband mapping with `a__b=value` changes (None as value deletes the key)."""
    data = copy.deepcopy(RAW)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return data


_DELETE = object()


def error_of(data, overrides=None) -> str:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(data, "x.yaml", overrides)
    return str(caught.value)


def test_lowband_loads():
    scenario = load_scenario(LOWBAND)
    assert scenario.name == "lowband"
    assert scenario.device_ids() == ["jetson-nano-0", "jetson-nano-1", "rpi4-0", "rpi4-1", "rpi4-2"]
    assert scenario.device_profiles()["rpi4-2"] == "rpi4"
    downlink = scenario.channel.downlink
    assert downlink is not None
    assert downlink.rate_bps == 50_000
    assert downlink.delay_s == pytest.approx(0.1)
    assert downlink.jitter_s == pytest.approx(0.01)
    assert downlink.loss == pytest.approx(0.01)
    assert scenario.update.chunk_size == 1024
    assert scenario.update.settings == {"lambda": 0.5}
    assert scenario.round_timeout_s == 120.0
    assert scenario.broker.embedded


def test_load_accepts_a_string_path():
    assert load_scenario(str(LOWBAND)) == load_scenario(LOWBAND)


@pytest.mark.parametrize(
    ("data", "field", "value_shown"),
    [
        (raw(bogus=1), "bogus", "unknown field"),
        (raw(update__ratoi=0.1), "update.ratoi", "unknown field"),
        (raw(channel__downlink__bandwidth="1kbit"), "channel.downlink.bandwidth", "unknown field"),
        (raw(channel__downlink__rate="fast"), "channel.downlink.rate", "'fast'"),
        (raw(channel__downlink__rate=[1]), "channel.downlink.rate", "[1]"),
        (raw(channel__downlink__rate=".nan"), "channel.downlink.rate", "'.nan'"),
        (raw(channel__downlink__rate=float("nan")), "channel.downlink.rate", "nan"),
        (raw(channel__downlink__rate="1e400kbit"), "channel.downlink.rate", "1e400kbit"),
        (raw(channel__downlink__loss="150%"), "channel.downlink.loss", "150%"),
        (raw(channel__downlink__loss="100%"), "channel.downlink.loss", "100%"),
        (raw(channel__uplink__loss=1), "channel.uplink.loss", "1"),
        (raw(channel__downlink__delay="-5ms"), "channel.downlink.delay", "-5ms"),
        (raw(channel__downlink__delay=-5), "channel.downlink.delay", "-5"),
        (raw(channel__downlink__jitter=float("inf")), "channel.downlink.jitter", "inf"),
        (raw(round_timeout="forever"), "round_timeout", "forever"),
        (raw(update__strategy="magic"), "update.strategy", "magic"),
        (raw(update__ratio=0), "update.ratio", "0"),
        (raw(update__ratio=True), "update.ratio", "True"),
        (raw(update__lr=float("inf")), "update.lr", "inf"),
        (raw(update__chunk_size="big"), "update.chunk_size", "big"),
        (raw(rounds=True), "rounds", "True"),
        (raw(rounds=0), "rounds", "0"),
        (raw(seed=-1), "seed", "-1"),
        (raw(name="has space"), "name", "has space"),
        (raw(channel__profile="carrier-pigeon"), "channel.profile", "carrier-pigeon"),
        (raw(devices=[{"profile": "toaster", "count": 2}]), "devices.0.profile", "toaster"),
        (raw(devices=[{"profile": "rpi4", "count": 0}]), "devices.0.count", "0"),
        (raw(devices=[{"profile": "rpi4", "count": 2, "name": "pi"}]), "devices.0", "count"),
        (raw(devices=[{"profile": "rpi4", "name": "pi"}, {"profile": "jetson-nano", "name": "pi"}]), "devices", "'pi'"),
        (raw(devices=[{"profile": "rpi4", "count": 2}, {"profile": "rpi4", "name": "rpi4-1"}]), "devices", "'rpi4-1'"),
        (raw(devices=[]), "devices", "[]"),
        (raw(devices="rpi4"), "devices", "rpi4"),
        (raw(name=_DELETE), "name", "Field required"),
        (raw(rounds=_DELETE), "rounds", "Field required"),
        (raw(devices=_DELETE), "devices", "Field required"),
        (raw(broker="http://x"), "broker.url", "http://x"),
        (raw(broker="mqtt://"), "broker.url", "mqtt://"),
        (raw(broker="mqtt://h:99999"), "broker.url", "mqtt://h:99999"),
        (raw(broker="mqtt://h:abc"), "broker.url", "mqtt://h:abc"),
        (raw(broker="mqtt://h:0"), "broker.url", "mqtt://h:0"),
        (raw(broker={"url": "mqtt://h", "tls": {"insecure": "maybe"}}), "broker.tls.insecure", "maybe"),
        (raw(metrics__port=70000), "metrics.port", "70000"),
        (raw(metrics__enabled="perhaps"), "metrics.enabled", "perhaps"),
    ],
)
def test_bad_field_is_one_error_naming_path_and_value(data, field, value_shown):
    message = error_of(data)
    assert message.startswith("x.yaml: invalid scenario")
    lines = [line for line in message.splitlines()[1:] if line.strip()]
    assert len(lines) == 1, message
    assert lines[0].strip().startswith(f"{field}:"), message
    assert value_shown in lines[0], message


def test_unknown_nested_key_message():
    message = error_of(raw(update__ratoi=0.1))
    assert "update.ratoi" in message
    assert "unknown field" in message


def test_booleans_still_allowed_for_boolean_fields():
    scenario = parse_scenario(raw(metrics__enabled=False, broker={"url": "mqtt://h", "tls": {"insecure": True}}))
    assert scenario.metrics.enabled is False
    assert scenario.broker.tls is not None and scenario.broker.tls.insecure is True


@pytest.mark.parametrize("data", [[1, 2], "lowband", 42, None, True])
def test_non_mapping(data):
    with pytest.raises(ScenarioError, match="mapping"):
        parse_scenario(data, "x.yaml")


def test_non_mapping_file(tmp_path):
    for text in ("- a\n- b\n", "just a string\n", ""):
        path = tmp_path / "s.yaml"
        path.write_text(text)
        with pytest.raises(ScenarioError, match="mapping") as caught:
            load_scenario(path)
        assert str(path) in str(caught.value)


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nrounds: [1, 2\n")
    with pytest.raises(ScenarioError, match="not valid YAML") as caught:
        load_scenario(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ScenarioError, match="cannot read") as caught:
        load_scenario(path)
    assert "nope.yaml" in str(caught.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path)


def test_not_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ScenarioError):
        load_scenario(path)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(LOWBAND.read_text().replace("ratio: 0.05", "ratoi: 0.05"))
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert str(path) in str(caught.value)
    assert "update.ratoi" in str(caught.value)


# --set overrides


def test_override_ratio():
    assert load_scenario(LOWBAND, ["update.ratio=0.01"]).update.ratio == 0.01


def test_override_count():
    scenario = load_scenario(LOWBAND, ["devices.0.count=20"])
    assert len(scenario.device_ids()) == 23


def test_override_loss_with_unit():
    downlink = load_scenario(LOWBAND, ["channel.downlink.loss=5%"]).channel.downlink
    assert downlink is not None and downlink.loss == pytest.approx(0.05)


def test_override_creates_a_nested_section():
    data = raw(channel=_DELETE)
    scenario = parse_scenario(data, overrides=["channel.downlink.rate=20kbit", "channel.downlink.delay=1s"])
    assert scenario.channel.downlink is not None
    assert scenario.channel.downlink.rate_bps == 20_000
    assert scenario.channel.downlink.delay_s == 1.0


def test_override_whole_list_and_broker_shorthand():
    scenario = load_scenario(LOWBAND, ["devices=[{profile: rpi4, name: pi}]", "broker=mqtt://h:1884"])
    assert scenario.device_ids() == ["pi"]
    assert (scenario.broker.host, scenario.broker.port) == ("h", 1884)


def test_overrides_apply_in_order():
    assert load_scenario(LOWBAND, ["update.ratio=0.5", "update.ratio=0.25"]).update.ratio == 0.25


def test_overrides_do_not_touch_the_callers_mapping():
    data = raw()
    before = copy.deepcopy(data)
    parse_scenario(data, overrides=["update.ratio=0.5", "channel.downlink.loss=5%", "devices.0.count=9"])
    assert data == before


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("devices.9.count=1", "devices.9"),
        ("devices.x.count=1", "devices.x"),
        ("devices.-1.count=1", "devices.-1"),
        ("seed.x=1", "seed"),
        ("update.ratio.x=1", "update.ratio"),
        ("update.ratio", "update.ratio"),
        ("=1", "=1"),
        ("update..ratio=1", "update..ratio"),
        ("update.ratio=[unclosed", "update.ratio"),
    ],
)
def test_bad_override_names_the_assignment(assignment, named):
    message = error_of(raw(), [assignment])
    assert message.startswith("--set")
    assert named in message


def test_override_without_equals_says_what_to_write():
    assert "path=value" in error_of(raw(), ["update.ratio"])


@pytest.mark.parametrize(
    ("assignment", "field", "value_shown"),
    [
        ("update.ratio=2", "update.ratio", "2"),
        ("update.ratio=abc", "update.ratio", "abc"),
        ("update.ratio=yes", "update.ratio", "True"),
        ("update.ratoi=0.1", "update.ratoi", "unknown field"),
        ("channel.downlink.loss=100%", "channel.downlink.loss", "100%"),
        ("devices.0.profile=toaster", "devices.0.profile", "toaster"),
        ("metrics.nested.x=1", "metrics.nested", "unknown field"),
    ],
)
def test_overrides_are_validated_like_the_file(assignment, field, value_shown):
    message = error_of(raw(), [assignment])
    lines = message.splitlines()[1:]
    assert len(lines) == 1, message
    assert lines[0].strip().startswith(f"{field}:")
    assert value_shown in lines[0]


def test_apply_override_parses_yaml_values():
    data: dict = {}
    apply_override(data, "a.b=[1, 2]")
    apply_override(data, "a.c=text=with=equals")
    apply_override(data, "d=")
    assert data == {"a": {"b": [1, 2], "c": "text=with=equals"}, "d": None}


# round trip and broker


def test_to_yaml_round_trip_lowband():
    scenario = load_scenario(LOWBAND)
    assert parse_scenario(yaml.safe_load(scenario.to_yaml())) == scenario


def test_to_yaml_round_trip_with_everything_set():
    scenario = parse_scenario(raw(
        broker={"url": "mqtts://broker.example:8883", "username": "u", "password": "p",
                "tls": {"ca_file": "/etc/ca.pem", "insecure": True}},
        channel__profile="nb-iot",
        devices=[{"profile": "rpi4", "count": 3}, {"profile": "jetson-nano", "name": "board-1"}],
        update__chunk_size="4KiB",
        channel__uplink=_DELETE,
    ))
    again = parse_scenario(yaml.safe_load(scenario.to_yaml()))
    assert again == scenario
    assert again.device_ids() == ["rpi4-0", "rpi4-1", "rpi4-2", "board-1"]


@settings(max_examples=60, deadline=None)
@given(
    ratio=st.floats(min_value=1e-9, max_value=1.0, exclude_min=False),
    loss=st.floats(min_value=0.0, max_value=0.999999),
    rate=st.floats(min_value=1e-3, max_value=1e12),
    delay=st.floats(min_value=0.0, max_value=1e6),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    count=st.integers(min_value=1, max_value=1000),
)
def test_to_yaml_round_trip_property(ratio, loss, rate, delay, seed, name, count):
    scenario = parse_scenario(raw(
        name=name, seed=seed, update__ratio=ratio, channel__downlink__loss=loss, channel__downlink__rate=rate,
        channel__downlink__delay=delay, devices=[{"profile": "rpi4", "count": count}],
    ))
    assert parse_scenario(yaml.safe_load(scenario.to_yaml())) == scenario


def test_broker_shorthand_url():
    broker = parse_scenario(raw(broker="mqtt://h:1884")).broker
    assert not broker.embedded
    assert (broker.host, broker.port, broker.uses_tls) == ("h", 1884, False)


def test_broker_default_ports():
    assert parse_scenario(raw(broker="mqtt://h")).broker.port == 1883
    tls_broker = parse_scenario(raw(broker="mqtts://h")).broker
    assert (tls_broker.port, tls_broker.uses_tls) == (8883, True)


def test_broker_embedded():
    broker = parse_scenario(raw(broker="embedded")).broker
    assert broker.embedded
    default = parse_scenario(raw(broker=_DELETE)).broker
    assert default.embedded


def test_scenario_is_frozen():
    scenario = load_scenario(LOWBAND)
    with pytest.raises(Exception):  # pydantic's ValidationError for a frozen instance
        scenario.rounds = 3  # type: ignore[misc]
    assert isinstance(scenario, Scenario)


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
_paths = st.sampled_from([
    "name", "seed", "rounds", "round_timeout", "data", "data.initial_samples", "model.hidden", "update",
    "update.ratio", "update.strategy", "update.chunk_size", "update.lambda", "channel", "channel.profile",
    "channel.downlink", "channel.downlink.rate", "channel.downlink.loss", "channel.uplink.delay", "devices",
    "devices.0", "devices.0.count", "devices.1.name", "broker", "broker.url", "metrics.port", "extra",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_paths, _values), max_size=4))
def test_any_mutation_is_a_scenario_or_one_scenario_error(changes):
    data = raw()
    for path, value in changes:
        node = data
        *parents, last = path.split(".")
        for key in parents:
            if isinstance(node, dict):
                node = node.setdefault(key, {})
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                node = None
        if isinstance(node, dict):
            node[last] = value
        elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
    try:
        parse_scenario(data, "x.yaml")
    except ScenarioError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30) | st.tuples(_paths, st.text(max_size=12)).map("=".join), max_size=3))
def test_any_override_is_a_scenario_or_one_scenario_error(assignments):
    try:
        parse_scenario(raw(), "x.yaml", assignments)
    except ScenarioError:
        pass


# --- errors that say what to write instead (issue 15) -------------------------------------------------------

def _error_of(changes: dict) -> str:
    raw = {"name": "e", "rounds": 2, "devices": [{"profile": "rpi4"}], **changes}
    with pytest.raises(ScenarioError) as failure:
        parse_scenario(raw)
    return str(failure.value)


@pytest.mark.parametrize(("changes", "expected"), [
    ({"update": {"stratgy": "dpu"}}, "update.stratgy: unknown field for strategy dpu (it takes checkpoint, lambda, "
                                     "optimizer_state, reinit, reinit_rule, skip_if_worse); did you mean 'strategy'?"),
    ({"chanel": {}}, "chanel: unknown field; did you mean 'channel'?"),
    ({"devices": [{"profle": "rpi4"}]}, "devices.0.profle: unknown field; did you mean 'profile'?"),
    ({"channel": {"downlink": {"dealy": "10ms"}}}, "channel.downlink.dealy: unknown field; did you mean 'delay'?"),
    ({"channel": {"downlink": {"rate": "-50kbit"}}}, "rate must be positive and finite, got '-50kbit'"),
    ({"channel": {"downlink": {"delay": "-5ms"}}}, "duration must not be negative, got '-5ms'"),
])
def test_errors_name_the_fix(changes: dict, expected: str) -> None:
    assert expected in _error_of(changes)


def test_a_value_the_message_already_shows_is_not_shown_twice() -> None:
    message = _error_of({"channel": {"downlink": {"loss": "150%"}}})
    assert message.count("'150%'") == 1


def test_unknown_fields_far_from_any_name_get_no_guess() -> None:
    assert "did you mean" not in _error_of({"zzzzqqq": 1})


@pytest.mark.parametrize(("written", "ratio"), [("5%", 0.05), (0.05, 0.05), ("0.5 %", 0.005), (1, 1.0)])
def test_the_update_ratio_takes_a_percentage_as_every_fraction_does(written: object, ratio: float) -> None:
    scenario = parse_scenario({"name": "r", "rounds": 2, "devices": [{"profile": "rpi4"}],
                               "update": {"ratio": written}})
    assert scenario.update.ratio == pytest.approx(ratio)
    assert "must be between 0% and 100%" in _error_of({"update": {"ratio": "150%"}})


def test_an_error_from_an_override_names_the_override() -> None:
    raw = {"name": "o", "rounds": 2, "devices": [{"profile": "rpi4"}], "update": {"ratio": 0.1}}
    with pytest.raises(ScenarioError) as failure:
        parse_scenario(raw, "s.yaml", ["update.ratio=7", "channel.downlink={rate: -3kbit}"])
    message = str(failure.value)
    assert "update.ratio: must be between 0% and 100%, got 7 (set by --set update.ratio=7)" in message
    assert "(set by --set channel.downlink={rate: -3kbit})" in message
    with pytest.raises(ScenarioError) as failure:
        parse_scenario({**raw, "update": {"ratio": 7}}, "s.yaml", ["rounds=3"])
    assert "--set" not in str(failure.value)  # the file's own mistake is not blamed on an override
