"""The update server's state between rounds as plain tensors and numbers: what `UpdateServer.checkpoint_state()`
returns and `UpdateServer.restore()` takes, and its conversion to and from what torch.save(weights_only) holds.

Only the state that carries from one round to the next is kept: the deployed weights and their validation accuracy,
the deployed version, the next round, the training-set size at the last (re)initialisation and the best-deployed
envelope. Nothing else needs saving: the data arrival is a pure function of the seed and the round
(server.data.load_dataset_arrival), each round's training seeds are derived from the seed and the round
(testbed.core.seeds.round_seed), w⁰ is regenerated from the seed, and the strategies keep no state across rounds.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.errors import ServerError
from server.models import WeightDict

STATE_FORMAT = 1
"""Bumped whenever the fields below change meaning; a state of another format is refused."""


@dataclass(frozen=True)
class ServerState:
    """An UpdateServer after `next_round` rounds (0 … next_round - 1) ran."""

    next_round: int
    version: int
    deployed_weights: WeightDict | None
    deployed_validation_accuracy: float | None
    size_at_last_init: int | None
    best_deployed: tuple[float, float] | None
    """(validation, test) accuracy of the deployed version that validated best so far."""

    def to_saveable(self) -> dict[str, Any]:
        """Tensors, numbers and None only: loadable with torch.load(weights_only=True)."""
        return {
            "format": STATE_FORMAT,
            "next_round": self.next_round,
            "version": self.version,
            "deployed_weights": weights_to_tensors(self.deployed_weights),
            "deployed_validation_accuracy": self.deployed_validation_accuracy,
            "size_at_last_init": self.size_at_last_init,
            "best_deployed": None if self.best_deployed is None else list(self.best_deployed),
        }

    @classmethod
    def from_saveable(cls, saved: dict[str, Any]) -> ServerState:
        """The state `to_saveable` wrote; ServerError if it is of another format or lacks a field."""
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            raise ServerError(f"a server state of format {found!r}, this version reads format {STATE_FORMAT}")
        try:
            weights = saved["deployed_weights"]
            best = saved["best_deployed"]
            return cls(
                next_round=int(saved["next_round"]),
                version=int(saved["version"]),
                deployed_weights=weights_from_tensors(weights),
                deployed_validation_accuracy=_optional_float(saved["deployed_validation_accuracy"]),
                size_at_last_init=None if saved["size_at_last_init"] is None else int(saved["size_at_last_init"]),
                best_deployed=None if best is None else (float(best[0]), float(best[1])),
            )
        except KeyError as error:
            raise ServerError(f"the server state lacks {error.args[0]!r}") from None


def weights_to_tensors(weights: WeightDict | None) -> dict[str, torch.Tensor] | None:
    """Weights as tensors (copies), which torch.load(weights_only=True) reads back; None stays None."""
    if weights is None:
        return None
    return {name: torch.from_numpy(np.ascontiguousarray(array)).clone() for name, array in weights.items()}


def weights_from_tensors(tensors: dict[str, torch.Tensor] | None) -> WeightDict | None:
    """The float32 arrays of `weights_to_tensors`; None stays None."""
    if tensors is None:
        return None
    return {name: tensor.numpy().astype(np.float32, copy=True) for name, tensor in tensors.items()}


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def save_checkpoint(path: Path, contents: dict[str, Any]) -> None:
    """Write `contents` (tensors, numbers, strings, lists, dicts) to `path` atomically: a temporary file beside it,
    fsynced, then renamed over it (and the folder fsynced), so a kill at any moment leaves the old file or the new."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(contents, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """What `save_checkpoint` wrote (tensors and plain data only: torch.load with weights_only); ServerError if the
    file is not one."""
    try:
        contents = torch.load(Path(path), weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ServerError(f"{path} is not a readable checkpoint: {error}") from None
    if not isinstance(contents, dict):
        raise ServerError(f"{path} is not a checkpoint (it holds a {type(contents).__name__})")
    return contents
