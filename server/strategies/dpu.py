"""Full updating and Deep Partial Updating with its ablations GCPU (λ = 1) and LCPU (λ = 0)."""

from __future__ import annotations

import numpy as np

from testbed.core.plugins import register_strategy
from server.models import WeightDict
from server.strategies.base import RoundContext, Strategy, StrategyResult
from server.strategies.selection import (
    dpu_metric,
    global_contribution,
    partial_count_for_ratio,
    partial_tensor_count,
    rewind,
    select_top_k,
)


@register_strategy("full")
class FullUpdating(Strategy):
    """FU: retrain every weight for 2·E epochs (DPU's total) and send all of them as a full snapshot.

    `spec.full_variant`: "last_round" starts from the deployed weights, "same_init" from w⁰ every round.
    """


    def update(self, context: RoundContext) -> StrategyResult:
        start = context.required_initial_weights() if self.spec.full_variant == "same_init" else None
        self.train_fully(context, 2 * self.spec.epochs, start=start)
        return self.result_from_model(context, selected=None, snapshot="full")


@register_strategy("dpu")
class DeepPartialUpdating(Strategy):
    """DPU: full training with local contribution, top-⌊k·I⌋ by λ·Ĝ + (1−λ)·L̂, rewind, sparse tuning."""

    reinitialises = True
    skips_when_worse = True

    @property
    def lambda_(self) -> float:
        """Weight of the global contribution (subclasses fix it: 1 for GCPU, 0 for LCPU)."""
        return self.spec.lambda_

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


@register_strategy("gcpu")
class GlobalContributionPartialUpdating(DeepPartialUpdating):
    """GCPU: DPU ranked by the global contribution (w^f − w^s)² only (λ = 1)."""


    @property
    def lambda_(self) -> float:
        return 1.0


@register_strategy("lcpu")
class LocalContributionPartialUpdating(DeepPartialUpdating):
    """LCPU: DPU ranked by the local contribution Σ −g·Δw only (λ = 0)."""


    @property
    def lambda_(self) -> float:
        return 0.0
