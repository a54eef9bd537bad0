"""The DPU reference code's round semantics (zqu1992/DPU), each checked on small real data, and the old rules beside."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.data import DataArrival, Split, load_dataset_arrival
from server.errors import ServerError
from server.models import build_model, evaluate_accuracy, get_weights, set_weights
from server.strategies import (
    DeepPartialUpdating,
    FullUpdating,
    RoundContext,
    StrategyResult,
    changed_partial_weights,
)
from server.training import TrainingConfig, train_epochs
from server.update_server import RoundOutcome, UpdateServer
from testbed.core.scenario import DataSpec, ModelSpec, UpdateSpec, parse_scenario
from testbed.core.wire import decode_update

# ---------------------------------------------------------------- training: a shared Adam, the start as a candidate


def toy_problem(samples: int) -> tuple[nn.Module, Split]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 3)).astype(np.float32)
    y = (x @ rng.normal(size=(3, 3))).argmax(axis=1).astype(np.int64)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3)), Split(x, y)


def test_a_continued_optimizer_carries_adam_moments_and_restarts_the_learning_rate() -> None:
    model, split = toy_problem(40)
    lr = 0.05
    first = train_epochs(model, split, TrainingConfig(3, lr, 8, seed=1))  # 3 epochs × 5 batches, lr decays to lr/1000
    optimizer = first.optimizer
    assert optimizer is not None
    parameters = list(model.parameters())
    assert [int(optimizer.state[p]["step"]) for p in parameters] == [15, 15]
    carried = [(optimizer.state[p]["exp_avg"].clone(), optimizer.state[p]["exp_avg_sq"].clone()) for p in parameters]
    before = [p.detach().clone() for p in parameters]
    # The gradient of one full-batch step (the same in any sample order).
    model.zero_grad()
    F.cross_entropy(model(torch.from_numpy(split.x)), torch.from_numpy(split.y)).backward()
    gradients = [p.grad.detach().clone() for p in parameters]

    second = train_epochs(model, split, TrainingConfig(1, lr, len(split), seed=2), optimizer=optimizer)
    assert second.optimizer is optimizer
    assert [int(optimizer.state[p]["step"]) for p in parameters] == [16, 16]
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 16
    for p, start, g, (m0, v0) in zip(parameters, before, gradients, carried):
        m, v = beta1 * m0 + (1 - beta1) * g, beta2 * v0 + (1 - beta2) * g * g
        # Adam at step 16 with the moments of the first call, at the restarted learning rate lr.
        expected = start - lr / (1 - beta1**step) * m / ((v / (1 - beta2**step)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        fresh = start - lr * g / (g.abs() + eps)  # what a new Adam's first step would have been
        assert not torch.allclose(p.detach(), fresh, rtol=1e-3, atol=1e-5)


def test_an_optimizer_of_other_parameters_is_refused() -> None:
    model, split = toy_problem(20)
    other, _ = toy_problem(20)
    with pytest.raises(ServerError, match="does not hold this model's parameters"):
        train_epochs(model, split, TrainingConfig(1, 0.05, 8, 0), optimizer=torch.optim.Adam(other.parameters()))


def test_the_starting_weights_compete_as_epoch_zero() -> None:
    model, split = toy_problem(120)
    validation = Split(split.x, (split.y + 1) % 3)  # training makes validation accuracy fall
    start = get_weights(model)
    result = train_epochs(model, split, TrainingConfig(6, 0.1, 16, 5), validation=validation, start_is_candidate=True)
    assert result.best_epoch == 0
    assert all(get_weights(model)[name].tobytes() == value.tobytes() for name, value in start.items())
    set_weights(model, start)
    epochs_only = train_epochs(model, split, TrainingConfig(6, 0.1, 16, 5), validation=validation, keep_best=True)
    assert epochs_only.best_epoch == 1 and epochs_only.best_validation_accuracy < result.best_validation_accuracy


# ------------------------------------------------------- DPU's round: one Adam for both steps, the rewound point


class RecordingDPU(DeepPartialUpdating):
    """DPU that remembers the optimizer its sparse fine-tuning continued (None: a fresh one)."""

    def sparse_fine_tune(self, context, base, masks, *args, **kwargs):  # type: ignore[no-untyped-def]
        optimizer = kwargs.get("optimizer")
        self.continued = None if optimizer is None else {id(p): int(s["step"]) for p, s in optimizer.state.items()}
        self.rewound = base
        return super().sparse_fine_tune(context, base, masks, *args, **kwargs)


@pytest.fixture(scope="module")
def deployed_round() -> tuple[DataArrival, dict[str, np.ndarray]]:
    arrival = load_dataset_arrival(DataSpec(initial_samples=200, new_samples_per_round=100), seed=1)
    model = build_model(ModelSpec(hidden=[32]), arrival.num_features, arrival.num_classes, seed=1)
    train_epochs(model, arrival.training_set(0), TrainingConfig(20, 0.005, 32, seed=0))
    return arrival, get_weights(model)


def dpu_round(deployed_round: tuple[DataArrival, dict[str, np.ndarray]], **settings: Any) -> tuple[RecordingDPU,
                                                                                                   StrategyResult]:
    arrival, deployed = deployed_round
    spec = UpdateSpec(strategy="dpu", ratio=0.02, epochs=3, batch_size=32, **settings)
    model = build_model(ModelSpec(hidden=[32]), arrival.num_features, arrival.num_classes, seed=1)
    strategy = RecordingDPU(spec)
    context = RoundContext(1, model, deployed, arrival.training_set(1), arrival.validation, spec, seed=1,
                           deployed_validation_accuracy=0.5)
    return strategy, strategy.update(context)


def test_dpu_fine_tunes_with_the_full_training_adam_by_default(deployed_round) -> None:  # type: ignore[no-untyped-def]
    shared, _ = dpu_round(deployed_round)
    # 3 epochs of 300 samples in batches of 32: 30 Adam steps per parameter carried into the fine-tuning.
    assert shared.continued is not None and set(shared.continued.values()) == {30}
    # The last epoch of each, so the checkpoint rule cannot pick the (shared) rewound point for both.
    _, shared_result = dpu_round(deployed_round, checkpoint="last_epoch")
    fresh, fresh_result = dpu_round(deployed_round, checkpoint="last_epoch", optimizer_state="fresh")
    assert fresh.continued is None
    assert any(shared_result.weights[n].tobytes() != fresh_result.weights[n].tobytes() for n in shared_result.weights)


def test_dpu_judges_the_rewound_point_and_epochs_against_its_start_point(  # type: ignore[no-untyped-def]
        deployed_round) -> None:
    arrival, deployed = deployed_round
    strategy, result = dpu_round(deployed_round)
    model = build_model(ModelSpec(hidden=[32]), arrival.num_features, arrival.num_classes, seed=1)
    set_weights(model, deployed)
    # reinit_rule reference: the bar is the start point's own validation accuracy, not the deployed model's 0.5.
    assert result.send_threshold == evaluate_accuracy(model, arrival.validation)
    assert result.checkpoint_epoch is not None and 0 <= result.checkpoint_epoch <= 3
    assert result.ties_send == (result.checkpoint_epoch == 0)
    if result.checkpoint_epoch == 0:
        assert all(result.weights[n].tobytes() == strategy.rewound[n].tobytes() for n in result.weights)
    _, old = dpu_round(deployed_round, reinit_rule="deployed", checkpoint="best_epoch", optimizer_state="fresh")
    assert (old.send_threshold, old.ties_send) == (0.5, True) and old.checkpoint_epoch not in (None, 0)
    _, unconditional = dpu_round(deployed_round, skip_if_worse=False)
    assert unconditional.send_threshold is None


@pytest.mark.parametrize(("checkpoint", "epoch", "ties_send"), [
    ("reference", 0, True), ("reference", 2, False), ("best_epoch", 2, True), ("last_epoch", None, True)])
def test_a_tie_with_the_threshold_sends_only_the_rewound_point(checkpoint: str, epoch: int | None,
                                                               ties_send: bool) -> None:
    result = StrategyResult({}, 1, 1, 0.9, checkpoint_epoch=epoch)
    result.judged_against(0.9, checkpoint)  # type: ignore[arg-type]
    assert (result.send_threshold, result.ties_send) == (0.9, ties_send)


# ----------------------------------------------------- the server: re-initialisation, reporting, full updating


def reinit_run(**update: Any) -> list[RoundOutcome]:
    # 300, 500, 700, 900 samples: 700 > 2·300 re-initialises round 2. Round 0 deploys a full model, so the
    # k-sparse candidate from w⁰ in round 2 validates far below the deployed one.
    scenario = parse_scenario({
        "name": "reinit", "seed": 3, "rounds": 4, "devices": [{"profile": "rpi4", "count": 1}],
        "data": {"initial_samples": 300, "new_samples_per_round": 200}, "model": {"hidden": [32]},
        "update": {"strategy": "dpu", "ratio": 0.02, "epochs": 4, "round0": "full", **update},
    })
    return UpdateServer(scenario).run_all()


@pytest.fixture(scope="module")
def reference_reinit() -> list[RoundOutcome]:
    return reinit_run()


def test_a_reinit_candidate_is_kept_and_the_next_round_builds_on_it(reference_reinit: list[RoundOutcome]) -> None:
    zero, one, two, three = reference_reinit
    assert [o.reinitialised for o in reference_reinit] == [False, False, True, False]
    assert two.validation_accuracy < one.validation_accuracy  # worse than the deployed model, and still sent
    assert two.sent and two.base_version == 0 and two.version == 3 and two.server_accuracy < one.server_accuracy
    k = math.floor(0.02 * two.partial_count)
    assert three.base_version == 3 and three.previous_weights is two.weights
    assert 0 < changed_partial_weights(two.weights, three.weights) <= k
    assert decode_update(three.payload).header.base_version == 3


def test_the_deployed_rule_withholds_the_worse_reinit_candidate(reference_reinit: list[RoundOutcome]) -> None:
    zero, one, two, three = reinit_run(reinit_rule="deployed")
    assert two.reinitialised and not two.sent and two.payload == b"" and two.weights is one.weights
    assert two.validation_accuracy == reference_reinit[2].validation_accuracy  # the same candidate
    assert three.base_version == 2 and three.previous_weights is one.weights


def test_best_deployed_accuracy_is_the_test_accuracy_of_the_best_validated_version(
    reference_reinit: list[RoundOutcome],
) -> None:
    best: tuple[float, float] | None = None
    deployed_validation = None
    for outcome in reference_reinit:
        if outcome.sent:
            deployed_validation = outcome.validation_accuracy
        assert deployed_validation is not None
        if best is None or deployed_validation >= best[0]:
            best = (deployed_validation, outcome.server_accuracy)
        assert outcome.best_deployed_accuracy == best[1]
    two = reference_reinit[2]
    # The re-init round: devices hold the worse model; the reference's report shows the one before it.
    assert two.best_deployed_accuracy == reference_reinit[1].server_accuracy > two.server_accuracy


def full_run(**update: Any) -> list[RoundOutcome]:
    scenario = parse_scenario({
        "name": "full", "seed": 2, "rounds": 2, "devices": [{"profile": "rpi4", "count": 1}],
        "data": {"initial_samples": 200, "new_samples_per_round": 100}, "model": {"hidden": [16]},
        "update": {"strategy": "full", "epochs": 1, **update},
    })
    return UpdateServer(scenario).run_all()


def test_full_updating_sends_only_an_epoch_strictly_better_than_its_start() -> None:
    # At lr 1e-12 no weight moves: no epoch validates better than the deployed model, so nothing is sent.
    zero, one = full_run(lr=1e-12)
    assert zero.sent and not one.sent and one.version == 1
    zero, one = full_run(lr=1e-12, checkpoint="last_epoch")
    assert one.sent and one.version == 2


def test_full_updating_keeps_its_best_validation_epoch(deployed_round) -> None:  # type: ignore[no-untyped-def]
    arrival, deployed = deployed_round
    results = {}
    for checkpoint in ("reference", "last_epoch"):
        spec = UpdateSpec(strategy="full", epochs=3, batch_size=32, checkpoint=checkpoint)
        model = build_model(ModelSpec(hidden=[32]), arrival.num_features, arrival.num_classes, seed=1)
        context = RoundContext(1, model, deployed, arrival.training_set(1), arrival.validation, spec, seed=1)
        results[checkpoint] = FullUpdating(spec).update(context)
    best, last = results["reference"], results["last_epoch"]
    # The same batches: the last epoch is one of the candidates the best-validation checkpoint chose among.
    assert best.checkpoint_epoch is not None and 1 <= best.checkpoint_epoch <= 6 and last.checkpoint_epoch is None
    assert best.validation_accuracy >= last.validation_accuracy
    assert best.send_threshold is not None and not best.ties_send and last.send_threshold is None
