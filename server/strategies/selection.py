"""Pure selection rules over weight dicts (numpy only): contributions, DPU metric, top-k, masks, rewind."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from server.errors import ServerError

WeightDict = dict[str, np.ndarray]
"""Tensor name → array (the same alias as server.models.WeightDict, without importing torch)."""

Masks = dict[str, np.ndarray]
"""Boolean arrays by tensor name (only the partially updated, ndim > 1 tensors)."""

Rounding = Literal["round", "floor"]
"""How a per-layer count k·I_l becomes whole: Python's round (the reference's RPU) or floor."""


def partial_count_for_ratio(total: int, ratio: float) -> int:
    """k = ⌊ratio · total⌋ (robust to float error such as 0.29 · 100 = 28.999…), clamped to [0, total]."""
    if total < 0 or not 0.0 <= ratio <= 1.0:
        raise ServerError(f"need total >= 0 and 0 <= ratio <= 1, got total={total}, ratio={ratio}")
    return max(0, min(total, math.floor(ratio * total + 1e-9)))


def partial_tensor_count(weights: dict[str, np.ndarray]) -> int:
    """I: the number of scalar weights in partially updated tensors (ndim > 1)."""
    return sum(int(value.size) for value in weights.values() if value.ndim > 1)


def per_layer_count(size: int, ratio: float, rounding: Rounding) -> int:
    """How many of a tensor's `size` entries RPU updates: round(size · ratio) as the reference does
    (Python's round, halves to even: multiround_rpu.py:243), or ⌊size · ratio⌋ (`partial_count_for_ratio`)."""
    if rounding == "round":
        return max(0, min(size, round(size * ratio)))
    return partial_count_for_ratio(size, ratio)


def should_reinitialise(train_size: int, size_at_last_init: int, strictly: bool = True) -> bool:
    """True when the training set has grown to more than twice its size at the last (re)initialisation, as the
    reference tests it (``len(train_dataset) > 2*num_samples``, multiround_dpu.py:221); with
    ``strictly=False``, already at exactly twice."""
    if train_size < 0 or size_at_last_init < 1:
        raise ServerError(f"need train_size >= 0 and size_at_last_init >= 1, got {train_size}, {size_at_last_init}")
    return train_size > 2 * size_at_last_init if strictly else train_size >= 2 * size_at_last_init


def should_send(candidate_accuracy: float, threshold: float | None, ties_send: bool = True) -> bool:
    """Send unless the candidate validates worse than `threshold` (None: send); exactly `threshold` sends only
    with `ties_send` (the reference keeps a fine-tuned epoch only when strictly better, multiround_dpu.py:326)."""
    if threshold is None:
        return True
    return candidate_accuracy >= threshold if ties_send else candidate_accuracy > threshold


def global_contribution(start: WeightDict, final: WeightDict) -> dict[str, np.ndarray]:
    """G_i = (w^f_i − w^s_i)² for every partially updated tensor (ndim > 1), in float64."""
    contribution: dict[str, np.ndarray] = {}
    for name, start_value in start.items():
        if start_value.ndim > 1:
            if name not in final or final[name].shape != start_value.shape:
                raise ServerError(f"final weights lack {name!r} of shape {start_value.shape}")
            contribution[name] = np.square(final[name].astype(np.float64) - start_value.astype(np.float64))
    return contribution


def absolute_change(start: WeightDict, final: WeightDict) -> dict[str, np.ndarray]:
    """|w^f_i − w^s_i| for every partially updated tensor (the naive magnitude-of-change ranking)."""
    return {name: np.sqrt(value) for name, value in global_contribution(start, final).items()}


def absolute_value(weights: WeightDict) -> dict[str, np.ndarray]:
    """|w_i| for every partially updated tensor (the pruning ranking), in float64."""
    return {name: np.abs(value.astype(np.float64)) for name, value in weights.items() if value.ndim > 1}


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


def select_top_k(metric: dict[str, np.ndarray], k: int) -> Masks:
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
    masks: Masks = {}
    offset = 0
    for name in names:
        shape = np.shape(metric[name])
        size = int(np.prod(shape, dtype=np.int64))
        masks[name] = chosen[offset : offset + size].reshape(shape)
        offset += size
    return masks


def random_layer_masks(weights: WeightDict, ratio: float, rng: np.random.Generator,
                       rounding: Rounding = "round") -> Masks:
    """Per partially updated tensor, `per_layer_count` positions drawn uniformly without replacement from `rng`."""
    masks: Masks = {}
    for name, value in weights.items():
        if value.ndim > 1:
            chosen = np.zeros(value.size, dtype=bool)
            chosen[rng.choice(value.size, size=per_layer_count(int(value.size), ratio, rounding), replace=False)] = True
            masks[name] = chosen.reshape(value.shape)
    return masks


def rewind(start: WeightDict, trained: WeightDict, masks: Masks) -> WeightDict:
    """Trained values at selected positions of masked tensors, start values elsewhere in them; others trained."""
    return {
        name: (np.where(masks[name], value, start[name]).astype(np.float32) if name in masks else value.copy())
        for name, value in trained.items()
    }


def zero_unselected(weights: WeightDict, masks: Masks) -> WeightDict:
    """Pruning: masked tensors keep their selected entries and are zero elsewhere; other tensors unchanged."""
    return {
        name: (np.where(masks[name], value, np.float32(0.0)).astype(np.float32) if name in masks else value.copy())
        for name, value in weights.items()
    }


def selected_count(masks: Masks) -> int:
    """How many positions the masks select in total."""
    return int(sum(int(np.count_nonzero(mask)) for mask in masks.values()))


def changed_partial_weights(before: WeightDict, after: WeightDict) -> int:
    """How many scalar weights of the ndim > 1 tensors differ between two weight dicts."""
    return sum(int(np.count_nonzero(after[name] != value)) for name, value in before.items() if value.ndim > 1)
