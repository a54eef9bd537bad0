"""The update server: holds the deployed model and produces one new version per round of arriving data."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from server.checkpoint import ServerState
from server.data import DataArrival, Split, device_test_split, load_dataset_arrival
from server.errors import ServerError
from server.models import WeightDict, build_model, evaluate_accuracy, get_weights, set_weights
from server.strategies import (
    FullUpdating,
    RoundContext,
    Strategy,
    StrategyResult,
    make_strategy,
    partial_tensor_count,
    should_send,
)
from testbed.core import wire
from testbed.core.plugins import STRATEGIES

if TYPE_CHECKING:
    from testbed.core.scenario import Scenario


@dataclass
class RoundOutcome:
    """One round's result: the version devices hold afterwards, the payload that gets them there, and how."""

    round_index: int
    version: int
    """The deployed version after this round (unchanged when nothing was sent)."""
    weights: WeightDict
    """Exactly what a device holds after applying `payload` (the previous weights when nothing was sent)."""
    previous_weights: WeightDict | None
    server_accuracy: float
    """Accuracy of the deployed weights (after this round) on the server's test split."""
    best_deployed_accuracy: float
    """Test accuracy of the deployed version, of this round or an earlier one, that validated best (the latest of
    equals): what the reference reports per round (multiround_dpu.py:339-344, "avoid the accuracy degradation
    due to the re-initialization"), whereas devices hold the one `server_accuracy` measures."""
    validation_accuracy: float
    """Validation accuracy of this round's candidate as devices would hold it (sent or not)."""
    selected: int | None
    """Partial weights chosen by the strategy; None for a full update (`full`, or round 0 with ``round0: full``)."""
    partial_count: int
    """I: scalar weights in ndim > 1 tensors."""
    training_samples: int
    seconds: float
    base_version: int | None = None
    """What `payload` applies to: None = a snapshot (any base), 0 = w⁰, v = version v. When nothing was
    sent, the base the withheld update would have had."""
    sent: bool = True
    reinitialised: bool = False
    """The round started from w⁰ because the training set doubled since the last (re)initialisation."""
    payload: bytes = b""
    """The encoded update (scenario index/value codecs); empty when nothing was sent."""


class UpdateServer:
    """Trains the initial deployment (round 0 → version 1), then one version per round that sends something."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.seed = int(scenario.seed)
        self.arrival: DataArrival = load_dataset_arrival(scenario.data, self.seed)
        self.model: nn.Module = self.build_device_model()
        self.initial_weights: WeightDict = get_weights(self.model)
        """w⁰: regenerable on every device from the seed and the tensor layout."""
        self.strategy: Strategy = make_strategy(scenario.update)
        if scenario.rounds > self.arrival.max_rounds:
            # Validation checks this against the data set's official sizes; files of other sizes end up here.
            raise ServerError(f"rounds: {scenario.rounds}, but the data allow {self.arrival.max_rounds} (round 0 on "
                              f"data.initial_samples, then one per data.new_samples_per_round of the rest); write "
                              f"rounds: {self.arrival.max_rounds} or less")
        self.rounds: int = int(scenario.rounds)
        """Exactly the scenario's rounds: announced, run and recorded."""
        self.deployed_weights: WeightDict | None = None
        self.deployed_validation_accuracy: float | None = None
        self.version: int = 0
        self.next_round: int = 0
        self.size_at_last_init: int | None = None
        """Training-set size at the last round that started from w⁰ (round 0 or a re-init, sent or not)."""
        self.best_deployed: tuple[float, float] | None = None
        """(validation, test) accuracy of the deployed version that validated best so far."""

    def checkpoint_state(self) -> ServerState:
        """What carries from this round to the next (server.checkpoint): restored into a new server, the remaining
        rounds give exactly what this server's would."""
        return ServerState(
            next_round=self.next_round, version=self.version,
            deployed_weights=None if self.deployed_weights is None else {
                name: array.copy() for name, array in self.deployed_weights.items()},
            deployed_validation_accuracy=self.deployed_validation_accuracy,
            size_at_last_init=self.size_at_last_init, best_deployed=self.best_deployed,
        )

    def restore(self, state: ServerState) -> None:
        """Continue from `state` (of a server of the same scenario); ServerError if it does not fit this one."""
        if not 0 <= state.next_round <= self.rounds:
            raise ServerError(f"the checkpoint's next round {state.next_round} is outside rounds 0..{self.rounds}")
        if state.deployed_weights is not None:
            layout = {name: array.shape for name, array in self.initial_weights.items()}
            restored = {name: array.shape for name, array in state.deployed_weights.items()}
            if restored != layout:
                raise ServerError("the checkpoint's weights do not fit the scenario's model")
            set_weights(self.model, state.deployed_weights)
        self.next_round, self.version = state.next_round, state.version
        self.deployed_weights = state.deployed_weights
        self.deployed_validation_accuracy = state.deployed_validation_accuracy
        self.size_at_last_init = state.size_at_last_init
        self.best_deployed = state.best_deployed

    def build_device_model(self) -> nn.Module:
        """A fresh model of the served architecture holding w⁰ (testbed.core.initial_weights from the seed)."""
        return build_model(self.scenario.model, self.arrival.num_features, self.arrival.num_classes, self.seed,
                           input_shape=self.arrival.input_shape)

    def device_test_split(self, device_index: int) -> Split:
        """The local test data of device number `device_index`."""
        return device_test_split(self.arrival.test, device_index, self.scenario.data.device_test_samples, self.seed)

    def run_all(self, progress: Callable[[RoundOutcome], None] | None = None) -> list[RoundOutcome]:
        """Run every remaining round in order (server only, no devices); `progress` sees each outcome."""
        outcomes: list[RoundOutcome] = []
        for round_index in range(self.next_round, self.rounds):
            outcome = self.run_round(round_index)
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
        return outcomes

    def run_round(self, round_index: int) -> RoundOutcome:
        """Run round `round_index` (rounds go in order 0, 1, …); deploy its result if it is sent."""
        if round_index != self.next_round:
            raise ServerError(f"round {round_index} requested, but the next round to run is {self.next_round}")
        if round_index >= self.rounds:
            raise ServerError(
                f"round {round_index} is past the last round {self.rounds - 1} "
                f"(scenario rounds {self.scenario.rounds}, data allows {self.arrival.max_rounds})"
            )
        began = time.perf_counter()
        spec = self.scenario.update
        train = self.arrival.training_set(round_index)
        previous = self.deployed_weights
        # Round 0 is the initial deployment: from w⁰, always sent.
        strategy = self.round_zero_strategy() if previous is None else self.strategy
        reinitialised = (
            previous is not None
            and self.size_at_last_init is not None
            and strategy.should_reinitialise(len(train), self.size_at_last_init)
        )
        start = self.initial_weights if previous is None or reinitialised else previous
        context = RoundContext(
            round_index=round_index,
            model=self.model,
            start_weights=start,
            train=train,
            validation=self.arrival.validation,
            spec=spec,
            seed=self.seed,
            initial_weights=self.initial_weights,
            reinitialised=reinitialised,
            deployed_validation_accuracy=self.deployed_validation_accuracy,
        )
        result: StrategyResult = strategy.update(context)
        if previous is None or reinitialised:
            # Counted when the (re)initialised round runs, sent or not: a rejected re-init is not retried
            # every round, only once the data doubles again.
            self.size_at_last_init = len(train)
        target_version = self.version + 1
        base_version, payload = self._encode(result, start, reinitialised, target_version)
        held = wire.held_weights_after(start, payload)
        set_weights(self.model, held)
        validation_accuracy = evaluate_accuracy(self.model, self.arrival.validation)
        sent = previous is None or (
            strategy.should_send(validation_accuracy, self.deployed_validation_accuracy)
            and should_send(validation_accuracy, result.send_threshold, result.ties_send)
        )
        if sent:
            self.deployed_weights = held
            self.deployed_validation_accuracy = validation_accuracy
            self.version = target_version
        else:
            assert previous is not None
            set_weights(self.model, previous)
            payload = b""
        server_accuracy = evaluate_accuracy(self.model, self.arrival.test)
        self.next_round = round_index + 1
        deployed = self.deployed_weights
        assert deployed is not None and self.deployed_validation_accuracy is not None
        if self.best_deployed is None or self.deployed_validation_accuracy >= self.best_deployed[0]:
            self.best_deployed = (self.deployed_validation_accuracy, server_accuracy)
        return RoundOutcome(
            round_index=round_index,
            version=self.version,
            weights=deployed,
            previous_weights=previous,
            server_accuracy=server_accuracy,
            best_deployed_accuracy=self.best_deployed[1],
            validation_accuracy=validation_accuracy,
            selected=result.selected,
            partial_count=partial_tensor_count(deployed),
            training_samples=len(train),
            seconds=time.perf_counter() - began,
            base_version=base_version,
            sent=sent,
            reinitialised=reinitialised,
            payload=payload,
        )

    def round_zero_strategy(self) -> Strategy:
        """The strategy of the first deployment (`update.round0`).

        ``sparse``: the scenario's own strategy from w⁰, as in the reference (multiround_dpu.py:209-214,
        multiround_rpu.py:208-213); one that makes no k-sparse update (registered ``uses_ratio=False``) deploys
        what ``full`` with its default settings would. ``full``: full updating for 2·E epochs from w⁰ keeping
        the last epoch's weights, the project's earlier round 0 (``full`` itself keeps its own settings).
        """
        if isinstance(self.strategy, FullUpdating):
            return self.strategy
        spec = self.scenario.update
        if spec.round0 == "full":
            return FullUpdating(spec, FullUpdating.Settings(checkpoint="last_epoch"))
        if STRATEGIES.attributes(spec.strategy).get("uses_ratio", True):
            return self.strategy
        return FullUpdating(spec, FullUpdating.Settings())

    def _encode(
        self, result: StrategyResult, start: WeightDict, reinitialised: bool, target_version: int
    ) -> tuple[int | None, bytes]:
        """(base version, payload) for a strategy result: a snapshot, or an update relative to w⁰ (version 0: round 0
        and re-init rounds) or to the deployed version."""
        spec = self.scenario.update
        if result.snapshot == "full":
            return None, wire.encode_full_model(result.weights, target_version, value_codec=spec.value_codec)
        if result.snapshot == "sparse":
            return None, wire.encode_sparse_snapshot(result.weights, target_version, index_codec=spec.index_codec,
                                                     value_codec=spec.value_codec)
        base_version = 0 if reinitialised else self.version
        return base_version, wire.encode_update(start, result.weights, base_version, target_version,
                                                index_codec=spec.index_codec, value_codec=spec.value_codec)
