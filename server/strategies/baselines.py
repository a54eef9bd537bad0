"""Baselines from the DPU paper: random partial updating, pruning, and naive magnitude-of-change updating."""

from __future__ import annotations

from server.strategies.base import RoundContext, Strategy, StrategyResult
from server.strategies.selection import (
    absolute_change,
    absolute_value,
    partial_count_for_ratio,
    partial_tensor_count,
    random_layer_masks,
    rewind,
    select_top_k,
    selected_count,
    zero_unselected,
)
from testbed.core.plugins import register_strategy
from testbed.core.seeds import RoundStep, Stream, generator


@register_strategy("rpu")
class RandomPartialUpdating(Strategy):
    """RPU: ⌊ratio·I_l⌋ random weights per layer (seeded), fine-tuned from the deployed ones for 2·E epochs."""

    def update(self, context: RoundContext) -> StrategyResult:
        rng = generator(context.seed, Stream.ROUND, context.round_index, RoundStep.RANDOM_MASK)
        masks = random_layer_masks(context.start_weights, self.spec.ratio, rng)
        return self.sparse_fine_tune(context, context.start_weights, masks, epochs=2 * self.spec.epochs)


@register_strategy("pruning")
class PruningUpdating(Strategy):
    """Pruning: from w⁰ train E epochs, keep the top-⌊k·I⌋ by |w| (others zero), sparse fine-tune E epochs.

    The result is a sparse snapshot: the device replaces its model, unsent partial entries are zero.
    """

    def update(self, context: RoundContext) -> StrategyResult:
        trained, _ = self.train_fully(context, self.spec.epochs, start=context.required_initial_weights())
        k = partial_count_for_ratio(partial_tensor_count(trained), self.spec.ratio)
        masks = select_top_k(absolute_value(trained), k)
        result = self.sparse_fine_tune(context, zero_unselected(trained, masks), masks)
        result.snapshot = "sparse"
        return result


@register_strategy("magnitude")
class MagnitudeUpdating(Strategy):
    """Naive baseline: full training 2·E epochs, send the top-k by |w^f − w^s| at their w^f values, no fine-tune."""

    def update(self, context: RoundContext) -> StrategyResult:
        trained, _ = self.train_fully(context, 2 * self.spec.epochs)
        k = partial_count_for_ratio(partial_tensor_count(trained), self.spec.ratio)
        masks = select_top_k(absolute_change(context.start_weights, trained), k)
        from server.models import set_weights

        set_weights(context.model, rewind(context.start_weights, trained, masks))
        return self.result_from_model(context, selected_count(masks))
