"""The strategy interface: one round's inputs, its result, and the training building blocks strategies share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch

from server.errors import ServerError
from server.models import WeightDict, evaluate_accuracy, get_weights, set_weights
from server.seeds import derive_seed
from server.strategies.selection import Masks, partial_tensor_count, selected_count
from server.training import train_epochs

if TYPE_CHECKING:
    from torch import nn

    from server.data import Split
    from testbed.core.scenario import UpdateSpec

SnapshotKind = Literal["full", "sparse"]
"""How a snapshot result replaces the device model: every weight, or only the non-zero partial entries."""

# Path components for derive_seed(context.seed, …): one stream per use within a round.
FULL_TRAINING_STREAM = 1
FINE_TUNING_STREAM = 2
RANDOM_MASK_STREAM = 3


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
    initial_weights: WeightDict | None = None
    """w⁰, the shared initial weights every device can regenerate (needed by `same_init` and pruning)."""
    reinitialised: bool = False
    """True when the server chose w⁰ as `start_weights` because the training set doubled."""

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
    reinitialises: ClassVar[bool] = False
    """Whether the server may start a round from w⁰ when the data doubled (honoured when `spec.reinit`)."""
    skips_when_worse: ClassVar[bool] = False
    """Whether a result validating worse than the deployed model is withheld (when `spec.skip_if_worse`)."""

    def __init__(self, spec: UpdateSpec) -> None:
        self.spec = spec

    @abstractmethod
    def update(self, context: RoundContext) -> StrategyResult:
        """Produce the next weights (the model is scratch space; `context.start_weights` is not mutated)."""

    # Building blocks for subclasses.

    def train_fully(
        self,
        context: RoundContext,
        epochs: int,
        track_local_contribution: bool = False,
        start: WeightDict | None = None,
    ) -> tuple[WeightDict, dict[str, np.ndarray] | None]:
        """Train all weights from `start` (default: the context's start point); weights and local contribution."""
        set_weights(context.model, context.start_weights if start is None else start)
        result = train_epochs(
            context.model,
            context.train,
            epochs=epochs,
            lr=self.spec.lr,
            batch_size=self.spec.batch_size,
            seed=derive_seed(context.seed, FULL_TRAINING_STREAM),
            track_local_contribution=track_local_contribution,
        )
        return get_weights(context.model), result.local_contribution

    def sparse_fine_tune(
        self, context: RoundContext, base: WeightDict, masks: Masks, epochs: int | None = None
    ) -> StrategyResult:
        """From `base`, train only the masked entries for `epochs` (default E) and keep the best validation epoch."""
        set_weights(context.model, base)
        train_epochs(
            context.model,
            context.train,
            epochs=self.spec.epochs if epochs is None else epochs,
            lr=self.spec.lr,
            batch_size=self.spec.batch_size,
            seed=derive_seed(context.seed, FINE_TUNING_STREAM),
            trainable_masks={name: torch.from_numpy(np.ascontiguousarray(mask)) for name, mask in masks.items()},
            validation=context.validation,
            keep_best=True,
        )
        return self.result_from_model(context, selected_count(masks))

    def result_from_model(
        self, context: RoundContext, selected: int | None, snapshot: SnapshotKind | None = None
    ) -> StrategyResult:
        """Wrap the weights now in `context.model` with their validation accuracy."""
        weights = get_weights(context.model)
        return StrategyResult(
            weights=weights,
            selected=selected,
            partial_count=partial_tensor_count(weights),
            validation_accuracy=evaluate_accuracy(context.model, context.validation),
            snapshot=snapshot,
        )
