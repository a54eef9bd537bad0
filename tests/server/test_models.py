"""Model building (seeded, no global RNG use), weight dict round trips and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.data import Split
from server.errors import ServerError
from server.models import build_model, evaluate_accuracy, get_weights, set_weights
from testbed.core.initial_weights import initial_weights, layout_of
from testbed.core.scenario import ModelSpec


def test_build_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = get_weights(build_model(ModelSpec(hidden=[16, 8]), 64, 10, seed=7))
    assert torch.equal(torch.rand(1), expected_next)
    b = get_weights(build_model(ModelSpec(hidden=[16, 8]), 64, 10, seed=7))
    c = get_weights(build_model(ModelSpec(hidden=[16, 8]), 64, 10, seed=8))
    assert list(a) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [v.shape for v in a.values()] == [(16, 64), (16,), (8, 16), (8,), (10, 8), (10,)]
    assert all(np.array_equal(a[n], b[n]) and a[n].dtype == np.float32 for n in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_set_weights_round_trip_and_errors() -> None:
    model = build_model(ModelSpec(hidden=[4]), 3, 2, seed=0)
    weights = {name: np.full_like(value, 0.5) for name, value in get_weights(model).items()}
    set_weights(model, weights)
    assert all(np.array_equal(v, weights[n]) for n, v in get_weights(model).items())
    weights["0.weight"][0, 0] = 9.0
    assert get_weights(model)["0.weight"][0, 0] == 0.5  # get_weights copies
    with pytest.raises(ServerError, match="missing \\['2.bias'\\]"):
        set_weights(model, {n: v for n, v in weights.items() if n != "2.bias"})
    with pytest.raises(ServerError, match="unexpected \\['extra'\\]"):
        set_weights(model, {**weights, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ServerError, match="shape \\(3, 4\\)"):
        set_weights(model, {**weights, "0.weight": np.zeros((3, 4), np.float32)})


def test_evaluate_accuracy_restores_training_mode() -> None:
    model = build_model(ModelSpec(hidden=[4]), 3, 2, seed=0)
    x = np.eye(3, dtype=np.float32)
    predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    model.train()
    assert evaluate_accuracy(model, Split(x, predictions.astype(np.int64))) == 1.0
    assert model.training
    assert evaluate_accuracy(model, Split(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))) == 0.0


SHAPES = {"digits": (64,), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
SPECS = {
    "mlp": ModelSpec(kind="mlp", hidden=[16]),
    "vgg": ModelSpec(kind="vgg", channels=[4, 8]),
    "resnet": ModelSpec(kind="resnet", channels=[4, 8], blocks_per_stage=2),
}


def _build(kind: str, dataset: str, seed: int = 0) -> torch.nn.Module:
    shape = SHAPES[dataset]
    return build_model(SPECS[kind], int(np.prod(shape)), 10, seed, input_shape=shape)


def _expected_parameter_count(kind: str, in_channels: int, features: int) -> int:
    conv_bn = lambda i, o, k=3: i * o * k * k + 2 * o  # noqa: E731  (conv without bias, BN scale and shift)
    if kind == "mlp":
        return features * 16 + 16 + 16 * 10 + 10
    if kind == "vgg":
        return conv_bn(in_channels, 4) + conv_bn(4, 4) + conv_bn(4, 8) + conv_bn(8, 8) + 8 * 10 + 10
    stem = conv_bn(in_channels, 4)
    stage1 = 2 * (conv_bn(4, 4) + conv_bn(4, 4))
    stage2 = conv_bn(4, 8) + conv_bn(8, 8) + conv_bn(4, 8, 1) + conv_bn(8, 8) + conv_bn(8, 8)
    return stem + stage1 + stage2 + 8 * 10 + 10


@pytest.mark.parametrize("kind", ["mlp", "vgg", "resnet"])
@pytest.mark.parametrize("dataset", ["digits", "mnist", "cifar10"])
def test_every_kind_builds_for_every_input_shape(kind: str, dataset: str) -> None:
    model = _build(kind, dataset)
    shape = SHAPES[dataset]
    model.eval()
    assert tuple(model(torch.zeros(3, *shape)).shape) == (3, 10)
    in_channels = 1 if len(shape) == 1 else shape[0]  # digits feed the CNNs as one 8×8 channel
    count = sum(p.numel() for p in model.parameters())
    assert count == _expected_parameter_count(kind, in_channels, int(np.prod(shape)))
    weights = get_weights(model)
    assert all(value.dtype == np.float32 for value in weights.values())
    assert "num_batches_tracked" not in " ".join(weights)
    if kind != "mlp":
        assert any(name.endswith("running_var") for name in weights)
        assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("kind", ["mlp", "vgg", "resnet"])
def test_initial_weights_come_from_the_shared_layout_and_seed(kind: str) -> None:
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a = get_weights(_build(kind, "cifar10", seed=11))
    assert torch.equal(torch.rand(1), expected_next)  # the global torch RNG is untouched
    b = get_weights(_build(kind, "cifar10", seed=11))
    c = get_weights(_build(kind, "cifar10", seed=12))
    assert list(a) == list(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert any(a[n].tobytes() != c[n].tobytes() for n in a)
    from_layout = initial_weights(layout_of(a), 11)
    assert all(np.array_equal(from_layout[n], a[n]) for n in a)


def test_resnet_layout_has_projection_shortcuts_only_where_needed() -> None:
    names = list(get_weights(_build("resnet", "cifar10")))
    assert [n for n in names if "shortcut" in n and n.endswith("weight") and "1.weight" not in n] == [
        "stages.1.0.shortcut.0.weight"
    ]
    model = _build("resnet", "cifar10")
    model.eval()
    stem_out = model.stem(torch.zeros(1, 3, 32, 32))
    assert tuple(model.stages(stem_out).shape) == (1, 8, 16, 16)


def test_cnn_input_errors_are_clear() -> None:
    with pytest.raises(ServerError, match="needs image input"):
        build_model(SPECS["vgg"], 10, 2, 0)
    with pytest.raises(ServerError, match="too small for 4 VGG stages"):
        build_model(ModelSpec(kind="vgg", channels=[2, 2, 2, 2]), 64, 10, 0)
    with pytest.raises(ServerError, match="does not hold num_features"):
        build_model(SPECS["mlp"], 10, 2, 0, input_shape=(1, 3, 3))


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
def test_get_set_round_trip_includes_batch_norm_statistics(kind: str) -> None:
    model = _build(kind, "mnist", seed=1)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, 28, 28))  # moves the running statistics
    trained = get_weights(model)
    assert any(not np.array_equal(trained[n], np.zeros_like(trained[n])) for n in trained if "running_mean" in n)
    fresh = _build(kind, "mnist", seed=2)
    set_weights(fresh, trained)
    assert all(np.array_equal(get_weights(fresh)[n], trained[n]) for n in trained)
    model.eval()
    fresh.eval()
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    bn = next(n for n in trained if n.endswith("running_var"))
    with pytest.raises(ServerError, match=f"missing \\['{bn}'\\]"):
        set_weights(fresh, {n: v for n, v in trained.items() if n != bn})


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
def test_cnn_training_steps_reduce_the_loss(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 16, 16, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    model = build_model(SPECS[kind], 768, 10, seed=3, input_shape=(3, 16, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
