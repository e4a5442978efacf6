"""Plain convolutional networks from the certified-robustness literature.

All are ``nn.Sequential`` stacks with named children, so ``torch.fx`` traces them into a chain of
``call_module`` nodes ending with the logits ``nn.Linear``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from lipmargin.errors import ConfigError
from lipmargin.layers import activation as make_activation
from lipmargin.models._registry import register

__all__ = ["c4f3", "c6f2", "conv_out_size", "check_common", "wong_kolter"]


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial size after a convolution or pooling layer (no dilation)."""
    return (size + 2 * padding - kernel) // stride + 1


def check_common(in_channels: int, input_size: int, num_classes: int) -> None:
    """Validate the keyword arguments every model takes.

    Raises:
        ConfigError: for a non-integer or out-of-range value.
    """
    for label, value, low in (
        ("in_channels", in_channels, 1),
        ("input_size", input_size, 1),
        ("num_classes", num_classes, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")


def _conv_stack(
    in_channels: int,
    input_size: int,
    convs: list[tuple[int, int, int, int]],
    hidden: list[int],
    num_classes: int,
    act: str,
    model: str,
) -> nn.Sequential:
    """conv/act blocks (out_channels, kernel, stride, padding), flatten, FC/act blocks, logits."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, size = in_channels, input_size
    for i, (out, kernel, stride, padding) in enumerate(convs, start=1):
        layers[f"conv{i}"] = nn.Conv2d(channels, out, kernel, stride=stride, padding=padding)
        layers[f"act{i}"] = make_activation(act)
        channels, size = out, conv_out_size(size, kernel, stride, padding)
        if size < 1:
            raise ConfigError(f"{model}: input_size {input_size} is too small for its convolutions")
    layers["flatten"] = nn.Flatten()
    features = channels * size * size
    for j, width in enumerate(hidden, start=1):
        layers[f"fc{j}"] = nn.Linear(features, width)
        layers[f"act{len(convs) + j}"] = make_activation(act)
        features = width
    layers[f"fc{len(hidden) + 1}"] = nn.Linear(features, num_classes)
    return nn.Sequential(layers)


@register("wong_kolter")
def wong_kolter(
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    activation: str = "relu",
) -> nn.Sequential:
    """The small MNIST network of Wong & Kolter (2018) used in the LMT paper.

    Conv(16, 4x4, s2, p1), act, Conv(32, 4x4, s2, p1), act, flatten, FC 100, act, FC classes.
    At the default 1x28x28 input it has 166,406 parameters.
    """
    check_common(in_channels, input_size, num_classes)
    return _conv_stack(
        in_channels,
        input_size,
        [(16, 4, 2, 1), (32, 4, 2, 1)],
        [100],
        num_classes,
        activation,
        "wong_kolter",
    )


@register("c4f3", aliases=("4c3f",))
def c4f3(
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    activation: str = "relu",
) -> nn.Sequential:
    """The "4C3F" network: four convolutions and three fully connected layers.

    Conv 32 3x3 s1 p1, Conv 32 4x4 s2 p1, Conv 64 3x3 s1 p1, Conv 64 4x4 s2 p1, flatten,
    FC 512, FC 512, FC classes, with the activation after every layer but the last.
    """
    check_common(in_channels, input_size, num_classes)
    return _conv_stack(
        in_channels,
        input_size,
        [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)],
        [512, 512],
        num_classes,
        activation,
        "c4f3",
    )


@register("c6f2", aliases=("6c2f",))
def c6f2(
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    activation: str = "relu",
) -> nn.Sequential:
    """The "6C2F" network: six convolutions and two fully connected layers.

    Conv 32 3x3 p1, Conv 32 3x3 p1, Conv 32 4x4 s2 p1, Conv 64 3x3 p1, Conv 64 3x3 p1,
    Conv 64 4x4 s2 p1, flatten, FC 512, FC classes, with the activation between layers.
    """
    check_common(in_channels, input_size, num_classes)
    return _conv_stack(
        in_channels,
        input_size,
        [(32, 3, 1, 1), (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 1)],
        [512],
        num_classes,
        activation,
        "c6f2",
    )
