"""Update strategies (full updating, Deep Partial Updating) and the pure top-k selection they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from server.errors import ServerError
from server.models import WeightDict, evaluate_accuracy, get_weights, set_weights
from server.seeds import derive_seed
from server.training import train_epochs

if TYPE_CHECKING:
    from torch import nn

    from server.data import Split
    from testbed.scenario import UpdateSpec

# ---------------------------------------------------------------- pure selection (numpy only)


def partial_count_for_ratio(total: int, ratio: float) -> int:
    """k = ⌊ratio · total⌋ (robust to float error such as 0.29 · 100 = 28.999…), clamped to [0, total]."""
    if total < 0 or not 0.0 <= ratio <= 1.0:
        raise ServerError(f"need total >= 0 and 0 <= ratio <= 1, got total={total}, ratio={ratio}")
    return max(0, min(total, math.floor(ratio * total + 1e-9)))


def partial_tensor_count(weights: dict[str, np.ndarray]) -> int:
    """I: the number of scalar weights in partially updated tensors (ndim > 1)."""
    return sum(int(value.size) for value in weights.values() if value.ndim > 1)


def global_contribution(start: WeightDict, final: WeightDict) -> dict[str, np.ndarray]:
    """G_i = (w^f_i − w^s_i)² for every partially updated tensor (ndim > 1), in float64."""
    contribution: dict[str, np.ndarray] = {}
    for name, start_value in start.items():
        if start_value.ndim > 1:
            if name not in final or final[name].shape != start_value.shape:
                raise ServerError(f"final weights lack {name!r} of shape {start_value.shape}")
            contribution[name] = np.square(final[name].astype(np.float64) - start_value.astype(np.float64))
    return contribution


def _normalised(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    total = float(sum(float(value.sum(dtype=np.float64)) for value in values.values()))
    if not math.isfinite(total):
        raise ServerError(f"contribution sum is {total}; training diverged (lower the learning rate)")
    if total == 0.0:
        return {name: np.zeros(value.shape, dtype=np.float64) for name, value in values.items()}
    return {name: value.astype(np.float64) / total for name, value in values.items()}


def dpu_metric(
    global_c: dict[str, np.ndarray], local_c: dict[str, np.ndarray] | None, lam: float
) -> dict[str, np.ndarray]:
    """m = λ·G/ΣG + (1−λ)·L/ΣL, sums over all tensors of `global_c` together (a zero sum gives zeros).

    λ = 1 ignores `local_c` (it may be None); λ = 0 ignores the global term. Names are `global_c`'s.
    """
    if not 0.0 <= lam <= 1.0:
        raise ServerError(f"lambda must lie in [0, 1], got {lam}")
    metric = {name: np.zeros(value.shape, dtype=np.float64) for name, value in global_c.items()}
    if lam > 0.0:
        for name, value in _normalised(global_c).items():
            metric[name] += lam * value
    if lam < 1.0:
        if local_c is None:
            raise ServerError("lambda < 1 needs the local contribution (train with track_local_contribution)")
        missing = [name for name in global_c if name not in local_c]
        if missing:
            raise ServerError(f"local contribution lacks tensors {missing}")
        local = {name: np.asarray(local_c[name], dtype=np.float64) for name in global_c}
        for name, value in _normalised(local).items():
            if value.shape != metric[name].shape:
                raise ServerError(
                    f"local contribution of {name!r} has shape {value.shape}, expected {metric[name].shape}"
                )
            metric[name] += (1.0 - lam) * value
    return metric


def select_top_k(metric: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Boolean masks of the k largest metric values across ALL tensors (ties: earlier flat position wins)."""
    names = list(metric)
    flat = np.concatenate([np.asarray(metric[name], dtype=np.float64).ravel() for name in names] or [np.zeros(0)])
    if not 0 <= k <= flat.size:
        raise ServerError(f"cannot select k={k} of {flat.size} weights")
    if np.isnan(flat).any():
        raise ServerError("selection metric contains NaN; training diverged (lower the learning rate)")
    chosen = np.zeros(flat.size, dtype=bool)
    # A stable sort of −m keeps equal values in flat order, so ties go to the earlier position.
    chosen[np.argsort(-flat, kind="stable")[:k]] = True
    masks: dict[str, np.ndarray] = {}
    offset = 0
    for name in names:
        shape = np.shape(metric[name])
        size = int(np.prod(shape, dtype=np.int64))
        masks[name] = chosen[offset : offset + size].reshape(shape)
        offset += size
    return masks


def rewind(start: WeightDict, trained: WeightDict, masks: dict[str, np.ndarray]) -> WeightDict:
    """Trained values at selected positions of masked tensors, start values elsewhere in them; others trained."""
    return {
        name: (np.where(masks[name], value, start[name]).astype(np.float32) if name in masks else value.copy())
        for name, value in trained.items()
    }


def changed_partial_weights(before: WeightDict, after: WeightDict) -> int:
    """How many scalar weights of the ndim > 1 tensors differ between two weight dicts."""
    return sum(int(np.count_nonzero(after[name] != value)) for name, value in before.items() if value.ndim > 1)


# ---------------------------------------------------------------- strategies


@dataclass
class RoundContext:
    """Everything a strategy needs for one round."""

    round_index: int
    model: nn.Module
    start_weights: WeightDict
    train: Split
    validation: Split
    spec: UpdateSpec
    seed: int


@dataclass
class StrategyResult:
    """The new weights, how many partial weights were chosen (None: all), and their validation accuracy."""

    weights: WeightDict
    selected: int | None
    partial_count: int
    validation_accuracy: float


class Strategy(ABC):
    """One way to turn the deployed weights and the grown training set into the next version."""

    name: ClassVar[str]

    def __init__(self, spec: UpdateSpec) -> None:
        self.spec = spec

    @abstractmethod
    def update(self, context: RoundContext) -> StrategyResult:
        """Produce the next weights from `context.start_weights` (the model is scratch space)."""

    # Building blocks for subclasses.

    def train_fully(
        self, context: RoundContext, epochs: int, track_local_contribution: bool = False
    ) -> tuple[WeightDict, dict[str, np.ndarray] | None]:
        """Train all weights from the start point; returns the trained weights and local contribution."""
        set_weights(context.model, context.start_weights)
        result = train_epochs(
            context.model,
            context.train,
            epochs=epochs,
            lr=self.spec.lr,
            batch_size=self.spec.batch_size,
            seed=derive_seed(context.seed, 1),
            track_local_contribution=track_local_contribution,
        )
        return get_weights(context.model), result.local_contribution

    def sparse_fine_tune(
        self, context: RoundContext, base: WeightDict, masks: dict[str, np.ndarray]
    ) -> StrategyResult:
        """From `base`, train only the masked entries for E epochs and keep the best validation epoch."""
        set_weights(context.model, base)
        train_epochs(
            context.model,
            context.train,
            epochs=self.spec.epochs,
            lr=self.spec.lr,
            batch_size=self.spec.batch_size,
            seed=derive_seed(context.seed, 2),
            trainable_masks={name: torch.from_numpy(np.ascontiguousarray(mask)) for name, mask in masks.items()},
            validation=context.validation,
            keep_best=True,
        )
        return StrategyResult(
            weights=get_weights(context.model),
            selected=int(sum(int(mask.sum()) for mask in masks.values())),
            partial_count=partial_tensor_count(base),
            validation_accuracy=evaluate_accuracy(context.model, context.validation),
        )


class FullUpdating(Strategy):
    """FU: retrain every weight from the deployed ones for 2·E epochs (DPU's total) and send all of them."""

    name = "full"

    def update(self, context: RoundContext) -> StrategyResult:
        weights, _ = self.train_fully(context, 2 * self.spec.epochs)
        return StrategyResult(
            weights=weights,
            selected=None,
            partial_count=partial_tensor_count(weights),
            validation_accuracy=evaluate_accuracy(context.model, context.validation),
        )


class DeepPartialUpdating(Strategy):
    """DPU: full training with local contribution, top-⌊k·I⌋ by λ·Ĝ + (1−λ)·L̂, rewind, sparse tuning."""

    name = "dpu"

    @property
    def lambda_(self) -> float:
        """Weight of the global contribution (subclasses fix it: 1 for GCPU, 0 for LCPU)."""
        return self.spec.lambda_

    def selection_metric(
        self, start: WeightDict, trained: WeightDict, local: dict[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """The per-weight ranking score over the ndim > 1 tensors."""
        return dpu_metric(global_contribution(start, trained), local, self.lambda_)

    def update(self, context: RoundContext) -> StrategyResult:
        trained, local = self.train_fully(context, self.spec.epochs, track_local_contribution=self.lambda_ < 1.0)
        metric = self.selection_metric(context.start_weights, trained, local)
        k = partial_count_for_ratio(partial_tensor_count(trained), self.spec.ratio)
        masks = select_top_k(metric, k)
        return self.sparse_fine_tune(context, rewind(context.start_weights, trained, masks), masks)


STRATEGIES: dict[str, type[Strategy]] = {strategy.name: strategy for strategy in (FullUpdating, DeepPartialUpdating)}


def make_strategy(spec: UpdateSpec) -> Strategy:
    """The strategy registered under `spec.strategy`, configured with `spec`."""
    strategy = STRATEGIES.get(spec.strategy)
    if strategy is None:
        raise ServerError(f"unknown strategy {spec.strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    return strategy(spec)
