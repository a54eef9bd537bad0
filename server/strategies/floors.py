"""Floors for a comparison: never updating after round 0, and updating the biases only (no weight-matrix entry)."""

from __future__ import annotations

import numpy as np

from server.strategies.base import RoundContext, Strategy, StrategyResult
from testbed.core.plugins import register_strategy


@register_strategy("no-update", uses_ratio=False)
class NoUpdateAfterRoundZero(Strategy):
    """The devices keep the round-0 deployment: every later round leaves the weights as they are and sends nothing.

    What any update method must beat: the accuracy of the initial model as the data grow.
    """

    def should_send(self, candidate_accuracy: float, deployed_accuracy: float | None) -> bool:
        return False

    def update(self, context: RoundContext) -> StrategyResult:
        from server.models import set_weights

        set_weights(context.model, context.start_weights)
        return self.result_from_model(context, selected=0)


@register_strategy("biases-only", uses_ratio=False)
class BiasesOnlyUpdating(Strategy):
    """Train only the tensors every update sends whole (ndim ≤ 1: biases, norm scales) for 2·E epochs, keep the
    best validation epoch; no weight-matrix entry changes (k = 0).

    What a partial update gets for free: DPU's biases train through both of its E-epoch steps as well.
    """

    def update(self, context: RoundContext) -> StrategyResult:
        frozen = {name: np.zeros(value.shape, dtype=bool) for name, value in context.start_weights.items()
                  if value.ndim > 1}
        return self.sparse_fine_tune(context, context.start_weights, frozen, epochs=2 * self.spec.epochs)
