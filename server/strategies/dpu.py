"""Full updating and Deep Partial Updating with its ablations GCPU (λ = 1) and LCPU (λ = 0)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from server.strategies import selection
from server.strategies.base import RoundContext, Strategy, StrategyResult, StrategySettings
from server.strategies.selection import (
    dpu_metric,
    global_contribution,
    partial_count_for_ratio,
    partial_tensor_count,
    rewind,
    select_top_k,
)
from testbed.core.plugins import register_strategy

if TYPE_CHECKING:
    from server.models import WeightDict


class FullUpdatingSettings(StrategySettings):
    """`full_variant`: "last_round" starts from the deployed weights, "same_init" from w⁰ every round."""

    full_variant: Literal["last_round", "same_init"] = "last_round"


@register_strategy("full", settings=("full_variant",))
class FullUpdating(Strategy):
    """FU: retrain every weight for 2·E epochs (DPU's total) and send all of them as a full snapshot."""

    Settings = FullUpdatingSettings
    settings: FullUpdatingSettings

    def update(self, context: RoundContext) -> StrategyResult:
        start = context.required_initial_weights() if self.settings.full_variant == "same_init" else None
        self.train_fully(context, 2 * self.spec.epochs, start=start)
        return self.result_from_model(context, selected=None, snapshot="full")


class ContributionSettings(StrategySettings):
    """The DPU family's round rules (GCPU and LCPU fix λ, so take only these)."""

    reinit: bool = True
    """Re-initialisation: once the training set has doubled since the last (re)init, start from w⁰."""
    skip_if_worse: bool = True
    """Send nothing in a round whose result validates worse than the deployed model."""


class DeepPartialUpdatingSettings(ContributionSettings):
    """DPU's settings: λ, the weight of the global vs. the local contribution, besides the round rules."""

    lambda_: float = Field(0.5, ge=0.0, le=1.0, alias="lambda")


@register_strategy("dpu", settings=("lambda", "reinit", "skip_if_worse"))
class DeepPartialUpdating(Strategy):
    """DPU: full training with local contribution, top-⌊k·I⌋ by λ·Ĝ + (1−λ)·L̂, rewind, sparse tuning."""

    Settings: type[ContributionSettings] = DeepPartialUpdatingSettings
    settings: ContributionSettings

    @property
    def lambda_(self) -> float:
        """Weight of the global contribution (subclasses fix it: 1 for GCPU, 0 for LCPU)."""
        assert isinstance(self.settings, DeepPartialUpdatingSettings)
        return self.settings.lambda_

    def should_reinitialise(self, train_size: int, size_at_last_init: int) -> bool:
        """With `reinit`, once the training set has at least doubled since the last (re)initialisation."""
        return self.settings.reinit and selection.should_reinitialise(train_size, size_at_last_init)

    def should_send(self, candidate_accuracy: float, deployed_accuracy: float | None) -> bool:
        """With `skip_if_worse`, not when the candidate validates strictly worse than the deployed model."""
        return not self.settings.skip_if_worse or selection.should_send(candidate_accuracy, deployed_accuracy)

    def selection_metric(
        self, start: WeightDict, trained: WeightDict, local: dict[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """The per-weight ranking score over the ndim > 1 tensors."""
        return dpu_metric(global_contribution(start, trained), local, self.lambda_)

    def select(
        self, start: WeightDict, trained: WeightDict, local: dict[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """Masks of the top-⌊ratio·I⌋ weights by `selection_metric`."""
        k = partial_count_for_ratio(partial_tensor_count(trained), self.spec.ratio)
        return select_top_k(self.selection_metric(start, trained, local), k)

    def update(self, context: RoundContext) -> StrategyResult:
        trained, local = self.train_fully(context, self.spec.epochs, track_local_contribution=self.lambda_ < 1.0)
        masks = self.select(context.start_weights, trained, local)
        return self.sparse_fine_tune(context, rewind(context.start_weights, trained, masks), masks)


@register_strategy("gcpu", settings=("reinit", "skip_if_worse"))
class GlobalContributionPartialUpdating(DeepPartialUpdating):
    """GCPU: DPU ranked by the global contribution (w^f − w^s)² only (λ = 1)."""

    Settings = ContributionSettings

    @property
    def lambda_(self) -> float:
        return 1.0


@register_strategy("lcpu", settings=("reinit", "skip_if_worse"))
class LocalContributionPartialUpdating(DeepPartialUpdating):
    """LCPU: DPU ranked by the local contribution Σ −g·Δw only (λ = 0)."""

    Settings = ContributionSettings

    @property
    def lambda_(self) -> float:
        return 0.0
