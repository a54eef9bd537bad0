"""Update strategies (full updating, DPU and its ablations, baselines), registered by their scenario name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.errors import ServerError
from testbed.core.plugins import STRATEGIES, PluginError
from server.strategies.base import (
    RoundContext,
    SnapshotKind,
    Strategy,
    StrategyResult,
    StrategySettings,
    settings_problems,
)
from server.strategies.baselines import MagnitudeUpdating, PruningUpdating, RandomPartialUpdating
from server.strategies.dpu import (
    DeepPartialUpdating,
    FullUpdating,
    GlobalContributionPartialUpdating,
    LocalContributionPartialUpdating,
)
from server.strategies.floors import BiasesOnlyUpdating, NoUpdateAfterRoundZero
from server.strategies.selection import (
    Masks,
    absolute_change,
    absolute_value,
    changed_partial_weights,
    dpu_metric,
    global_contribution,
    partial_count_for_ratio,
    partial_tensor_count,
    random_layer_masks,
    rewind,
    select_top_k,
    selected_count,
    should_reinitialise,
    should_send,
    zero_unselected,
)

if TYPE_CHECKING:
    from testbed.core.scenario import UpdateSpec


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class registered under `name` (imports only its module)."""
    try:
        return STRATEGIES.get(name)
    except PluginError as error:
        raise ServerError(str(error)) from None


def make_strategy(spec: UpdateSpec) -> Strategy:
    """The strategy registered under `spec.strategy`, configured with `spec` (its settings validated by it)."""
    return strategy_class(spec.strategy)(spec)


__all__ = [
    "BiasesOnlyUpdating",
    "DeepPartialUpdating",
    "FullUpdating",
    "GlobalContributionPartialUpdating",
    "LocalContributionPartialUpdating",
    "MagnitudeUpdating",
    "Masks",
    "NoUpdateAfterRoundZero",
    "PruningUpdating",
    "RandomPartialUpdating",
    "RoundContext",
    "SnapshotKind",
    "Strategy",
    "StrategyResult",
    "StrategySettings",
    "absolute_change",
    "absolute_value",
    "changed_partial_weights",
    "dpu_metric",
    "global_contribution",
    "make_strategy",
    "partial_count_for_ratio",
    "partial_tensor_count",
    "random_layer_masks",
    "rewind",
    "select_top_k",
    "selected_count",
    "settings_problems",
    "should_reinitialise",
    "should_send",
    "strategy_class",
    "zero_unselected",
]
