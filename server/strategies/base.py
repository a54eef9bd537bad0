"""The strategy interface: one round's inputs, its result, and the training building blocks strategies share."""

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
    from torch import nn

    from server.data import Split
    from server.models import WeightDict
    from server.training import TrainingConfig
    from testbed.core.scenario import UpdateSpec

# torch (models, training) is imported inside the methods that train, so reading a strategy's Settings
# (testbed.preflight) stays light.

SnapshotKind = Literal["full", "sparse"]
"""How a snapshot result replaces the device model: every weight, or only the non-zero partial entries."""


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
        """Whether a candidate validating at `candidate_accuracy` is sent, given the deployed model's accuracy."""
        return True

    @abstractmethod
    def update(self, context: RoundContext) -> StrategyResult:
        """Produce the next weights (the model is scratch space; `context.start_weights` is not mutated)."""

    # Building blocks for subclasses.

    def training(self, epochs: int, seed: int) -> TrainingConfig:
        """The shared training settings (lr, batch size) for `epochs` epochs with batch-order `seed`."""
        from server.training import TrainingConfig

        return TrainingConfig(epochs=epochs, lr=self.spec.lr, batch_size=self.spec.batch_size, seed=seed)

    def train_fully(
        self,
        context: RoundContext,
        epochs: int,
        track_local_contribution: bool = False,
        start: WeightDict | None = None,
    ) -> tuple[WeightDict, dict[str, np.ndarray] | None]:
        """Train all weights from `start` (default: the context's start point); weights and local contribution."""
        from server.models import get_weights, set_weights
        from server.training import train_epochs

        set_weights(context.model, context.start_weights if start is None else start)
        result = train_epochs(context.model, context.train,
                              self.training(epochs, context.step_seed(RoundStep.FULL_TRAINING)),
                              track_local_contribution=track_local_contribution)
        return get_weights(context.model), result.local_contribution

    def sparse_fine_tune(
        self, context: RoundContext, base: WeightDict, masks: Masks, epochs: int | None = None
    ) -> StrategyResult:
        """From `base`, train only the masked entries for `epochs` (default E) and keep the best validation epoch."""
        import torch

        from server.models import set_weights
        from server.training import train_epochs

        set_weights(context.model, base)
        train_epochs(
            context.model,
            context.train,
            self.training(self.spec.epochs if epochs is None else epochs, context.step_seed(RoundStep.FINE_TUNING)),
            trainable_masks={name: torch.from_numpy(np.ascontiguousarray(mask)) for name, mask in masks.items()},
            validation=context.validation,
            keep_best=True,
        )
        return self.result_from_model(context, selected_count(masks))

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
