"""A small post-activation ResNet, mainly to exercise the bound engine in tests.

Stem ``conv3x3-BN-act`` then a 2x2 max pooling (``nn.MaxPool2d``; ``maxpool=False`` swaps in
``nn.AvgPool2d``), an identity-shortcut block, a stride-2 block with a ``1x1 conv + BN`` shortcut,
global average pooling, flatten and the logits ``nn.Linear``.
"""

from __future__ import annotations

from torch import Tensor, nn

from lipmargin.errors import ConfigError
from lipmargin.layers import activation as make_activation
from lipmargin.models._registry import register
from lipmargin.models.convnets import check_common

__all__ = ["BasicBlock", "ResNetSmall", "resnet_small"]


class BasicBlock(nn.Module):
    """Post-activation block: ``act(BN(conv(act(BN(conv(x))))) + shortcut(x))``.

    The shortcut is the identity when the shape is unchanged, otherwise a strided 1x1 convolution
    followed by batch norm.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module | None
        if in_channels == out_channels and stride == 1:
            self.shortcut = None
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act2 = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        """Residual branch plus shortcut, then the activation."""
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act2(y + skip)


class ResNetSmall(nn.Module):
    """The network built by :func:`resnet_small`."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        activation: str = "relu",
        maxpool: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation(activation)
        self.pool1 = nn.MaxPool2d(2, 2) if maxpool else nn.AvgPool2d(2, 2)
        self.block1 = BasicBlock(width, width, 1, activation)
        self.block2 = BasicBlock(width, 2 * width, 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        x = self.pool1(self.act1(self.bn1(self.conv1(x))))
        x = self.block2(self.block1(x))
        x = self.flatten(self.pool(x))
        return self.fc(x)


@register("resnet_small")
def resnet_small(
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    activation: str = "relu",
    width: int = 16,
    maxpool: bool = True,
) -> ResNetSmall:
    """A small post-activation ResNet with a max pooling layer (``maxpool=False``: average)."""
    check_common(in_channels, input_size, num_classes)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"resnet_small width must be a positive integer, got {width!r}")
    if input_size < 4:
        raise ConfigError(f"resnet_small needs input_size >= 4, got {input_size}")
    return ResNetSmall(in_channels, num_classes, width, activation, bool(maxpool))
