"""Checks of a scenario that need its plugins (link profiles, trace files, strategy settings): run before a run starts.

``testbed.core.scenario`` validates a file against the schema and the registered plugin names without
importing any plugin; what only the plugins can tell (a profile's rate under a queue, a trace file that
does not parse, a value the strategy's own Settings model rejects) is checked here, with the same
one-error-per-field format, before any data is loaded.
"""

from __future__ import annotations

from channel.errors import ChannelError
from server.strategies import settings_problems, strategy_class
from testbed.core.scenario import Scenario, ScenarioError
from testbed.links import resolve_cell_links, resolve_links


def _strategy_problems(scenario: Scenario) -> list[str]:
    """``update.<key>: ...`` for every strategy setting the chosen strategy's Settings model rejects."""
    update = scenario.update
    return settings_problems(strategy_class(update.strategy).Settings, update.strategy, update.settings)


def _channel_problems(scenario: Scenario) -> list[str]:
    channel = scenario.channel
    problems: list[str] = []
    try:
        resolved = resolve_links(channel)
    except ChannelError as error:
        return [f"channel: {error}"]
    for name, spec, link in zip(("downlink", "uplink"), (channel.downlink, channel.uplink), resolved):
        if spec is not None and spec.queue_bytes is not None and link.rate_bps is None and link.trace is None:
            problems.append(f"channel.{name}.queue: needs a rate (or trace) to queue at: without a bottleneck "
                            "it never fills")
    for index, cell in enumerate(channel.cells):
        try:
            resolve_cell_links(channel, cell)
        except ChannelError as error:
            problems.append(f"channel.cells.{index} ({cell.name!r}): {error}")
    return problems


def check_scenario(scenario: Scenario, source: str = "<scenario>") -> Scenario:
    """``scenario`` if its plugins accept it; otherwise one ScenarioError listing every problem by field path."""
    problems = _strategy_problems(scenario) + _channel_problems(scenario)
    if problems:
        raise ScenarioError("\n".join([f"{source}: invalid scenario", *(f"  {problem}" for problem in problems)]))
    return scenario
