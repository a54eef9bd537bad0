"""The strategy interface: one round's inputs, its result, and the training building blocks strategies share.

The semantics follow the reference code (zqu1992/DPU), cited as file:line; each place where the project
can do otherwise is a setting named in the scenario (README: Strategies and the reference code).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import ValidationError

from server.errors import ServerError
from server.strategies.selection import Masks, partial_tensor_count, selected_count
from testbed.core.scenario import SectionModel
from testbed.core.seeds import RoundStep, round_seed

if TYPE_CHECKING:
    import torch
    from torch import nn

    from server.data import Split
    from server.models import WeightDict
    from server.training import TrainingConfig, TrainingResult
    from testbed.core.scenario import UpdateSpec

# torch (models, training) is imported inside the methods that train, so reading a strategy's Settings
# (testbed.preflight) stays light.

SnapshotKind = Literal["full", "sparse"]
"""How a snapshot result replaces the device model: every weight, or only the non-zero partial entries."""

Checkpoint = Literal["reference", "best_epoch", "last_epoch"]
"""Which weights end a round's last training step, and what they must beat to be sent.

``reference``: the best by validation accuracy of the round's start point (keeping it sends nothing), the
step's own start where it is a candidate (DPU's rewound point, pruning's pruned point: as good as the
round's start suffices) and each epoch (strictly better than all before it): multiround_dpu.py:308-331,
multiround_fu.py:213-228, multiround_rpu.py:258-273, multiround_pruning.py:271-294. ``best_epoch``: the
best epoch by validation accuracy, sent regardless (for the DPU family, unless ``skip_if_worse`` withholds
it). ``last_epoch``: the weights after the last epoch.
"""

OptimizerState = Literal["shared", "fresh"]
"""Whether a strategy's second training step continues the first step's Adam (moments, step count):
one optimizer per round in multiround_dpu.py:177, 245, 323 and multiround_pruning.py:175, 229, 286."""


class StrategySettings(SectionModel):
    """A strategy's own settings: the keys under ``update:`` beyond the shared ones, validated by its strategy.

    A strategy declares them twice on purpose: as this model (types, ranges, defaults) and by name in
    ``@register_strategy(name, settings=(...))``, so the scenario schema rejects an unknown key without
    importing the strategy. tests/server/test_strategy_settings.py keeps the two the same.
    """

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The scenario keys (aliases) these settings read, sorted."""
        return tuple(sorted(field.alias or name for name, field in cls.model_fields.items()))


def settings_problems(settings_model: type[StrategySettings], strategy: str, raw: Mapping[str, Any]) -> list[str]:
    """One ``update.<key>: what is wrong (got value)`` line per bad setting of ``strategy``; empty when all is well."""
    try:
        settings_model.model_validate(dict(raw))
    except ValidationError as error:
        problems = []
        for detail in error.errors():
            key = ".".join(str(part) for part in detail["loc"])
            if detail["type"] == "extra_forbidden":
                takes = ", ".join(settings_model.keys()) or "no settings of its own"
                problems.append(f"update.{key}: unknown field for strategy {strategy} (it takes {takes})")
            else:
                message = detail["msg"].removeprefix("Value error, ")
                problems.append(f"update.{key}: {message} (got {detail['input']!r})")
        return problems
    return []


@dataclass
class RoundContext:
    """Everything a strategy needs for one round."""

    round_index: int
    model: nn.Module
    start_weights: WeightDict
    """Where partial strategies start and what their update is relative to: the deployed weights, or w⁰."""
    train: Split
    validation: Split
    spec: UpdateSpec
    seed: int
    """The scenario seed; a step's own seed is ``round_seed(seed, round_index, RoundStep.X)``."""
    initial_weights: WeightDict | None = None
    """w⁰, the shared initial weights every device can regenerate (needed by `same_init` and pruning)."""
    reinitialised: bool = False
    """True when the server chose w⁰ as `start_weights` because the training set doubled."""
    deployed_validation_accuracy: float | None = None
    """Validation accuracy of the deployed model (None before the first deployment)."""

    def step_seed(self, step: RoundStep) -> int:
        """The seed of one use of randomness in this round (testbed.core.seeds)."""
        return round_seed(self.seed, self.round_index, step)

    def required_initial_weights(self) -> WeightDict:
        """w⁰, or a ServerError when the caller did not provide it."""
        if self.initial_weights is None:
            raise ServerError("this strategy trains from the initial weights w⁰, but the round context has none")
        return self.initial_weights


@dataclass
class StrategyResult:
    """The new weights, how many partial weights were chosen (None: all), and their validation accuracy."""

    weights: WeightDict
    selected: int | None
    partial_count: int
    validation_accuracy: float
    snapshot: SnapshotKind | None = None
    """None: a sparse update relative to `start_weights`; "full": send every weight; "sparse": the device
    replaces its model with `weights`, whose unsent partial entries are zero (pruning)."""
    send_threshold: float | None = None
    """The validation accuracy the result must reach to be sent (None: no such bar); the server judges the
    weights as devices would hold them."""
    ties_send: bool = True
    """Whether validating exactly at `send_threshold` is enough (else strictly better is needed)."""
    checkpoint_epoch: int | None = None
    """Epoch of the last training step the weights come from: 0 is that step's start (e.g. the rewound
    point), None when the step did not choose by validation."""

    def judged_against(self, threshold: float | None, checkpoint: Checkpoint) -> StrategyResult:
        """This result, to be sent only if it validates at `threshold` or better; under the reference checkpoint
        a tie sends only the step's own start (the rewound or pruned point: ``>=`` in multiround_dpu.py:308),
        an epoch must be strictly better (``>`` in multiround_dpu.py:326)."""
        self.send_threshold = threshold
        self.ties_send = checkpoint != "reference" or self.checkpoint_epoch == 0
        return self


class Strategy(ABC):
    """One way to turn the deployed weights and the grown training set into the next version."""

    name: ClassVar[str]
    """The scenario name; set by ``@register_strategy(name)``."""
    Settings: ClassVar[type[StrategySettings]] = StrategySettings
    """This strategy's own keys under ``update:`` (none by default)."""

    def __init__(self, spec: UpdateSpec, settings: StrategySettings | None = None) -> None:
        """Configure from the shared `spec`; `settings` defaults to the strategy's keys in `spec`, validated."""
        self.spec = spec
        if settings is None:
            problems = settings_problems(self.Settings, getattr(self, "name", type(self).__name__), spec.settings)
            if problems:
                raise ServerError("invalid strategy settings\n" + "\n".join(f"  {problem}" for problem in problems))
            settings = self.Settings.model_validate(dict(spec.settings))
        self.settings = settings

    def should_reinitialise(self, train_size: int, size_at_last_init: int) -> bool:
        """Whether this round starts from w⁰ (and updates relative to it) rather than the deployed weights."""
        return False

    def should_send(self, candidate_accuracy: float, deployed_accuracy: float | None) -> bool:
        """A veto of the strategy's own on sending a candidate, besides the result's `send_threshold`."""
        return True

    @abstractmethod
    def update(self, context: RoundContext) -> StrategyResult:
        """Produce the next weights (the model is scratch space; `context.start_weights` is not mutated)."""

    # Building blocks for subclasses.

    def training(self, epochs: int, seed: int) -> TrainingConfig:
        """The shared training settings (lr, batch size) for `epochs` epochs with batch-order `seed`."""
        from server.training import TrainingConfig

        return TrainingConfig(epochs=epochs, lr=self.spec.lr, batch_size=self.spec.batch_size, seed=seed)

    def start_accuracy(self, context: RoundContext, start: WeightDict) -> float:
        """Validation accuracy of `start`, a round's start point (the reference's ``val_accuracy_init``,
        multiround_dpu.py:236)."""
        from server.models import evaluate_accuracy, set_weights

        set_weights(context.model, start)
        return evaluate_accuracy(context.model, context.validation)

    def train_fully(
        self,
        context: RoundContext,
        epochs: int,
        track_local_contribution: bool = False,
        start: WeightDict | None = None,
        checkpoint: Checkpoint = "last_epoch",
    ) -> tuple[WeightDict, TrainingResult]:
        """Train all weights from `start` (default: the context's start point); the weights and what training
        measured. A `checkpoint` other than ``last_epoch`` keeps the best validation epoch."""
        from server.models import get_weights, set_weights
        from server.training import train_epochs

        set_weights(context.model, context.start_weights if start is None else start)
        by_validation = checkpoint != "last_epoch"
        result = train_epochs(context.model, context.train,
                              self.training(epochs, context.step_seed(RoundStep.FULL_TRAINING)),
                              track_local_contribution=track_local_contribution,
                              validation=context.validation if by_validation else None, keep_best=by_validation)
        return get_weights(context.model), result

    def sparse_fine_tune(
        self,
        context: RoundContext,
        base: WeightDict,
        masks: Masks,
        epochs: int | None = None,
        checkpoint: Checkpoint = "best_epoch",
        optimizer: torch.optim.Optimizer | None = None,
    ) -> StrategyResult:
        """From `base`, train only the masked entries for `epochs` (default E), keeping the weights `checkpoint`
        says (``reference``: `base` itself competes as epoch 0); `optimizer` continues an earlier step's."""
        import torch

        from server.models import set_weights
        from server.training import train_epochs

        set_weights(context.model, base)
        training = train_epochs(
            context.model,
            context.train,
            self.training(self.spec.epochs if epochs is None else epochs, context.step_seed(RoundStep.FINE_TUNING)),
            trainable_masks={name: torch.from_numpy(np.ascontiguousarray(mask)) for name, mask in masks.items()},
            validation=context.validation,
            keep_best=checkpoint != "last_epoch",
            start_is_candidate=checkpoint == "reference",
            optimizer=optimizer,
        )
        result = self.result_from_model(context, selected_count(masks))
        result.checkpoint_epoch = training.best_epoch if checkpoint != "last_epoch" else None
        return result

    def result_from_model(
        self, context: RoundContext, selected: int | None, snapshot: SnapshotKind | None = None
    ) -> StrategyResult:
        """Wrap the weights now in `context.model` with their validation accuracy."""
        from server.models import evaluate_accuracy, get_weights

        weights = get_weights(context.model)
        return StrategyResult(
            weights=weights,
            selected=selected,
            partial_count=partial_tensor_count(weights),
            validation_accuracy=evaluate_accuracy(context.model, context.validation),
            snapshot=snapshot,
        )
