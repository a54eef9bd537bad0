"""Baselines from the DPU paper: random partial updating, pruning, and naive magnitude-of-change updating."""

from __future__ import annotations

from server.strategies.base import Checkpoint, OptimizerState, RoundContext, Strategy, StrategyResult, StrategySettings
from server.strategies.selection import (
    Rounding,
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


class RandomPartialUpdatingSettings(StrategySettings):
    """`layer_count`: round(k·I_l) per layer as the reference (multiround_rpu.py:243), or ⌊k·I_l⌋;
    `checkpoint`: see `Checkpoint` (the reference: best validation epoch, sent only when strictly better
    than the deployed model, multiround_rpu.py:258-273)."""

    layer_count: Rounding = "round"
    checkpoint: Checkpoint = "reference"


@register_strategy("rpu", settings=("checkpoint", "layer_count"))
class RandomPartialUpdating(Strategy):
    """RPU: round(ratio·I_l) random weights per layer (seeded), fine-tuned from the deployed ones for 2·E epochs.

    2·E as in the reference (RPU 60 epochs for the MLP and VGG, multiround_rpu.py:115-119, against DPU's 30
    per step); no re-initialisation (the reference's ``--reinit`` is off by default, multiround_rpu.py:36, 220).
    """

    Settings = RandomPartialUpdatingSettings
    settings: RandomPartialUpdatingSettings

    def update(self, context: RoundContext) -> StrategyResult:
        checkpoint = self.settings.checkpoint
        threshold = self.start_accuracy(context, context.start_weights) if checkpoint == "reference" else None
        rng = generator(context.seed, Stream.ROUND, context.round_index, RoundStep.RANDOM_MASK)
        masks = random_layer_masks(context.start_weights, self.spec.ratio, rng, self.settings.layer_count)
        # The start point is the bar here, not a candidate: keeping it sends nothing.
        result = self.sparse_fine_tune(context, context.start_weights, masks, epochs=2 * self.spec.epochs,
                                       checkpoint="last_epoch" if checkpoint == "last_epoch" else "best_epoch")
        result.send_threshold, result.ties_send = threshold, False
        return result


class PruningSettings(StrategySettings):
    """`checkpoint` and `optimizer_state` as for DPU: the reference prunes with one Adam for both steps and lets the
    pruned point compete (multiround_pruning.py:175, 229, 271-294)."""

    checkpoint: Checkpoint = "reference"
    optimizer_state: OptimizerState = "shared"


@register_strategy("pruning", settings=("checkpoint", "optimizer_state"))
class PruningUpdating(Strategy):
    """Pruning: from w⁰ train E epochs, keep the top-⌊k·I⌋ by |w| (others zero), sparse fine-tune E epochs.

    The result is a sparse snapshot: the device replaces its model, unsent partial entries are zero.
    """

    Settings = PruningSettings
    settings: PruningSettings

    def update(self, context: RoundContext) -> StrategyResult:
        initial = context.required_initial_weights()
        checkpoint = self.settings.checkpoint
        threshold = self.start_accuracy(context, initial) if checkpoint == "reference" else None
        trained, training = self.train_fully(context, self.spec.epochs, start=initial)
        k = partial_count_for_ratio(partial_tensor_count(trained), self.spec.ratio)
        masks = select_top_k(absolute_value(trained), k)
        optimizer = training.optimizer if self.settings.optimizer_state == "shared" else None
        result = self.sparse_fine_tune(context, zero_unselected(trained, masks), masks, checkpoint=checkpoint,
                                       optimizer=optimizer)
        result.snapshot = "sparse"
        return result.judged_against(threshold, checkpoint)


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
