"""Full updating and Deep Partial Updating with its ablations GCPU (λ = 1) and LCPU (λ = 0)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from server.strategies import selection
from server.strategies.base import (
    Checkpoint,
    OptimizerState,
    RoundContext,
    Strategy,
    StrategyResult,
    StrategySettings,
)
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
    """`full_variant`: "last_round" starts from the deployed weights, "same_init" from w⁰ every round
    (multiround_fu.py:177-197); `checkpoint`: see `Checkpoint` (the reference: best validation epoch, sent
    only when strictly better than the start point, multiround_fu.py:213-228)."""

    full_variant: Literal["last_round", "same_init"] = "last_round"
    checkpoint: Checkpoint = "reference"


@register_strategy("full", settings=("checkpoint", "full_variant"))
class FullUpdating(Strategy):
    """FU: retrain every weight for 2·E epochs and send all of them as a full snapshot.

    2·E is DPU's two steps together, as in the reference (FU 60 epochs for the MLP and VGG,
    multiround_fu.py:111-115, against DPU's 30 per step, multiround_dpu.py:116-120).
    """

    Settings = FullUpdatingSettings
    settings: FullUpdatingSettings

    def update(self, context: RoundContext) -> StrategyResult:
        same_init = self.settings.full_variant == "same_init"
        start = context.required_initial_weights() if same_init else context.start_weights
        checkpoint = self.settings.checkpoint
        threshold = self.start_accuracy(context, start) if checkpoint == "reference" else None
        _, training = self.train_fully(context, 2 * self.spec.epochs, start=start, checkpoint=checkpoint)
        result = self.result_from_model(context, selected=None, snapshot="full")
        result.checkpoint_epoch = training.best_epoch if checkpoint != "last_epoch" else None
        result.send_threshold, result.ties_send = threshold, False
        return result


class ContributionSettings(StrategySettings):
    """The DPU family's round rules (GCPU and LCPU fix λ, so take only these)."""

    reinit: bool = True
    """Re-initialisation: once the training set has doubled since the last (re)init, start from w⁰
    (multiround_dpu.py:221-227; on unless ``--without_reinit``, multiround_dpu.py:36)."""
    reinit_rule: Literal["reference", "deployed"] = "reference"
    """``reference``: re-initialise when the set is more than twice its size at the last (re)init, and judge the
    round's candidate against its start point, w⁰ in a re-init round (multiround_dpu.py:221, 224, 236, 308), so
    the candidate is kept and later rounds build on it. ``deployed``: at exactly twice already, and judge it
    against the deployed model, so a worse re-init candidate is withheld."""
    skip_if_worse: bool = True
    """Send nothing in a round whose result validates worse than what `reinit_rule` judges it against."""
    checkpoint: Checkpoint = "reference"
    optimizer_state: OptimizerState = "shared"


class GlobalContributionSettings(ContributionSettings):
    """GCPU runs without re-initialisation by default, as the reference README's command for it does
    (``--mode gcpu --without_reinit``)."""

    reinit: bool = False


class DeepPartialUpdatingSettings(ContributionSettings):
    """DPU's settings: λ, the weight of the global vs. the local contribution, besides the round rules."""

    lambda_: float = Field(0.5, ge=0.0, le=1.0, alias="lambda")


@register_strategy("dpu", settings=("checkpoint", "lambda", "optimizer_state", "reinit", "reinit_rule",
                                    "skip_if_worse"))
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
        """With `reinit`, once the training set has doubled since the last (re)initialisation (see `reinit_rule`)."""
        strictly = self.settings.reinit_rule == "reference"
        return self.settings.reinit and selection.should_reinitialise(train_size, size_at_last_init, strictly)

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
        settings = self.settings
        threshold = None
        if settings.skip_if_worse:
            threshold = (self.start_accuracy(context, context.start_weights) if settings.reinit_rule == "reference"
                         else context.deployed_validation_accuracy)
        trained, training = self.train_fully(context, self.spec.epochs, track_local_contribution=self.lambda_ < 1.0)
        masks = self.select(context.start_weights, trained, training.local_contribution)
        optimizer = training.optimizer if settings.optimizer_state == "shared" else None
        result = self.sparse_fine_tune(context, rewind(context.start_weights, trained, masks), masks,
                                       checkpoint=settings.checkpoint, optimizer=optimizer)
        return result.judged_against(threshold, settings.checkpoint)


@register_strategy("gcpu", settings=("checkpoint", "optimizer_state", "reinit", "reinit_rule", "skip_if_worse"))
class GlobalContributionPartialUpdating(DeepPartialUpdating):
    """GCPU: DPU ranked by the global contribution (w^f − w^s)² only (λ = 1), without re-initialisation."""

    Settings = GlobalContributionSettings

    @property
    def lambda_(self) -> float:
        return 1.0


@register_strategy("lcpu", settings=("checkpoint", "optimizer_state", "reinit", "reinit_rule", "skip_if_worse"))
class LocalContributionPartialUpdating(DeepPartialUpdating):
    """LCPU: DPU ranked by the local contribution Σ −g·Δw only (λ = 0)."""

    Settings = ContributionSettings

    @property
    def lambda_(self) -> float:
        return 0.0
