"""The update server: holds the deployed model and produces one new version per round of arriving data."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from server.data import DataArrival, Split, device_test_split, load_dataset_arrival
from server.errors import ServerError
from server.models import WeightDict, build_model, evaluate_accuracy, get_weights, set_weights
from server.seeds import derive_seed
from server.strategies import (
    FullUpdating,
    RoundContext,
    Strategy,
    StrategyResult,
    make_strategy,
    partial_tensor_count,
)

if TYPE_CHECKING:
    from testbed.scenario import Scenario


@dataclass
class RoundOutcome:
    """One round's result: version `version` of the weights and how it was made."""

    round_index: int
    version: int
    weights: WeightDict
    previous_weights: WeightDict | None
    server_accuracy: float
    """Accuracy on the server's test split."""
    validation_accuracy: float
    selected: int | None
    """Partial weights chosen by the strategy; None for a full update (round 0 or `full`)."""
    partial_count: int
    """I: scalar weights in ndim > 1 tensors."""
    training_samples: int
    seconds: float


class UpdateServer:
    """Trains the initial deployment (round 0 → version 1), then version r+1 from version r each round."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.seed = int(scenario.seed)
        self.arrival: DataArrival = load_dataset_arrival(scenario.data, self.seed)
        self.model: nn.Module = self.build_device_model()
        self.initial_weights: WeightDict = get_weights(self.model)
        self.strategy: Strategy = make_strategy(scenario.update)
        self.rounds: int = min(int(scenario.rounds), self.arrival.max_rounds)
        self.deployed_weights: WeightDict | None = None
        self.version: int = 0
        self.next_round: int = 0

    def build_device_model(self) -> nn.Module:
        """A fresh model of the served architecture (initialised as w⁰ from the scenario seed)."""
        return build_model(self.scenario.model, self.arrival.num_features, self.arrival.num_classes, self.seed)

    def device_test_split(self, device_index: int) -> Split:
        """The local test data of device number `device_index`."""
        return device_test_split(self.arrival.test, device_index, self.scenario.data.device_test_samples, self.seed)

    def run_round(self, round_index: int) -> RoundOutcome:
        """Run round `round_index` (rounds go in order 0, 1, …) and deploy its result as version r+1."""
        if round_index != self.next_round:
            raise ServerError(f"round {round_index} requested, but the next round to run is {self.next_round}")
        if round_index >= self.rounds:
            raise ServerError(
                f"round {round_index} is past the last round {self.rounds - 1} "
                f"(scenario rounds {self.scenario.rounds}, data allows {self.arrival.max_rounds})"
            )
        began = time.perf_counter()
        train = self.arrival.training_set(round_index)
        previous = self.deployed_weights
        context = RoundContext(
            round_index=round_index,
            model=self.model,
            start_weights=self.initial_weights if previous is None else previous,
            train=train,
            validation=self.arrival.validation,
            spec=self.scenario.update,
            seed=derive_seed(self.seed, round_index),
        )
        # Round 0 is the initial deployment: always trained and sent in full.
        strategy = FullUpdating(self.scenario.update) if round_index == 0 else self.strategy
        result: StrategyResult = strategy.update(context)
        set_weights(self.model, result.weights)
        server_accuracy = evaluate_accuracy(self.model, self.arrival.test)
        self.deployed_weights = result.weights
        self.version = round_index + 1
        self.next_round = round_index + 1
        return RoundOutcome(
            round_index=round_index,
            version=self.version,
            weights=result.weights,
            previous_weights=previous,
            server_accuracy=server_accuracy,
            validation_accuracy=result.validation_accuracy,
            selected=result.selected,
            partial_count=partial_tensor_count(result.weights),
            training_samples=len(train),
            seconds=time.perf_counter() - began,
        )
