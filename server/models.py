"""The model zoo (MLP, small VGG, small CIFAR-style ResNet) and conversion between torch modules and weight dicts.

Every model is built on the meta device and filled from `testbed.core.initial_weights.initial_weights`
(seed + tensor layout), so a device can regenerate w⁰ without the server and the global torch RNG
is never touched. The weight dict holds every float tensor of `state_dict()`: parameters and float
buffers (BatchNorm running statistics, which devices need for inference); integer buffers such as
`num_batches_tracked` are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from server.errors import ServerError
from testbed.core.initial_weights import initial_weights

if TYPE_CHECKING:
    from server.data import Split
    from testbed.core.scenario import ModelSpec

WeightDict = dict[str, np.ndarray]
"""Float32 arrays by tensor name: the float entries of `model.state_dict()`, in its order."""


class FlatMLP(nn.Sequential):
    """Linear+ReLU layers that flatten each sample first (an `nn.Flatten` without shifting layer names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.flatten(x, 1))


def _conv_bn(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class SmallVGG(nn.Module):
    """Per width: two 3×3 conv + BatchNorm + ReLU, then 2×2 max-pool; global average pool; Linear."""

    def __init__(self, input_shape: tuple[int, int, int], channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.input_shape = input_shape
        layers: list[nn.Module] = []
        in_channels = input_shape[0]
        for width in channels:
            layers += [*_conv_bn(in_channels, width), nn.ReLU(), *_conv_bn(width, width), nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x.reshape(-1, *self.input_shape))
        return self.classifier(features.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """Two 3×3 conv + BatchNorm with a residual: identity, or a 1×1 conv + BatchNorm projection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, out_channels, stride=stride)
        self.conv2, self.bn2 = _conv_bn(out_channels, out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        projection = _conv_bn(in_channels, out_channels, 1, stride) if needs_projection else []
        self.shortcut = nn.Sequential(*projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem, stages of BasicBlocks (stride 2 entering all but the first stage), GAP, Linear."""

    def __init__(
        self, input_shape: tuple[int, int, int], channels: Sequence[int], blocks_per_stage: int, num_classes: int
    ) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.stem = nn.Sequential(*_conv_bn(input_shape[0], channels[0]), nn.ReLU())
        stages: list[nn.Module] = []
        in_channels = channels[0]
        for stage, width in enumerate(channels):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(in_channels, width, 2 if stage > 0 and block == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x.reshape(-1, *self.input_shape)))
        return self.head(features.mean(dim=(2, 3)))


def _image_shape(kind: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width); a flat input of square length s² is read as one s×s channel (digits: 8×8)."""
    if len(input_shape) == 3:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 1 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        side = math.isqrt(input_shape[0])
        return (1, side, side)
    raise ServerError(
        f"model kind {kind!r} needs image input (channels, height, width) or a flat square one, got {input_shape}; "
        "pass input_shape=arrival.input_shape to build_model, or use kind 'mlp'"
    )


def _build_mlp(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    widths = [int(np.prod(input_shape)), *spec.hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return FlatMLP(*layers)


def _build_vgg(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    image = _image_shape("vgg", input_shape)
    if min(image[1:]) >> len(spec.channels) < 1:
        raise ServerError(
            f"a {image[1]}×{image[2]} input is too small for {len(spec.channels)} VGG stages (each halves it); "
            "give model.channels fewer widths"
        )
    return SmallVGG(image, spec.channels, num_classes)


def _build_resnet(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return SmallResNet(_image_shape("resnet", input_shape), spec.channels, spec.blocks_per_stage, num_classes)


MODEL_BUILDERS: dict[str, Callable[[ModelSpec, tuple[int, ...], int], nn.Module]] = {
    "mlp": _build_mlp,
    "vgg": _build_vgg,
    "resnet": _build_resnet,
}


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float tensors of `state_dict()` (parameters and float buffers, live, not detached), in order."""
    return {name: tensor for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_floating_point()}


def build_model(
    spec: ModelSpec,
    num_features: int,
    num_classes: int,
    seed: int,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """The `spec.kind` network for samples of `input_shape` (default `(num_features,)`), w⁰ from `seed` only."""
    shape = (int(num_features),) if input_shape is None else tuple(int(d) for d in input_shape)
    if int(np.prod(shape)) != int(num_features) or not shape or min(shape) < 1:
        raise ServerError(f"input_shape {shape} does not hold num_features ({num_features}) values")
    builder = MODEL_BUILDERS.get(spec.kind)
    if builder is None:
        raise ServerError(f"unknown model kind {spec.kind!r}; choose one of {', '.join(sorted(MODEL_BUILDERS))}")
    # Built on the meta device (no RNG use, no memory), then filled from the shared w⁰ generator.
    with torch.device("meta"):
        model = builder(spec, shape, int(num_classes))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for buffer in model.buffers():
            if not buffer.is_floating_point():
                buffer.zero_()  # e.g. num_batches_tracked; to_empty left it uninitialised
    layout = [(name, tuple(tensor.shape)) for name, tensor in _float_state(model).items()]
    set_weights(model, initial_weights(layout, int(seed)))
    return model


def get_weights(model: nn.Module) -> WeightDict:
    """Detached float32 numpy copies of every float tensor of `state_dict()` (parameters and BN statistics)."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in _float_state(model).items()
    }


def set_weights(model: nn.Module, weights: WeightDict) -> None:
    """Copy `weights` into `model` (parameters and float buffers); the names and shapes must match exactly."""
    tensors = _float_state(model)
    missing = [name for name in tensors if name not in weights]
    extra = [name for name in weights if name not in tensors]
    if missing or extra:
        raise ServerError(f"weights do not fit the model: missing {missing or 'none'}, unexpected {extra or 'none'}")
    for name, tensor in tensors.items():
        value = np.asarray(weights[name])
        if tuple(value.shape) != tuple(tensor.shape):
            raise ServerError(
                f"weight {name!r} has shape {tuple(value.shape)}, the model expects {tuple(tensor.shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(weights[name], dtype=np.float32)))


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Predicted class per row of `x` (eval mode, no gradients; the module's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        outputs = [
            model(torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))).argmax(dim=1)
            for start in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    if not outputs:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(outputs).numpy().astype(np.int64)


def evaluate_accuracy(model: nn.Module, split: Split) -> float:
    """Fraction of `split` classified correctly (0.0 for an empty split)."""
    if len(split) == 0:
        return 0.0
    return float(np.mean(predict(model, split.x) == split.y))
