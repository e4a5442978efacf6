"""Pre-activation Wide ResNets (Zagoruyko & Komodakis, 2016), as used for CIFAR-10 in LMT.

A block is ``BN-act-conv3x3(stride)-BN-act-dropout-conv3x3`` plus a shortcut: the identity when
the shape is unchanged, otherwise a 1x1 convolution (stride 2 at the first block of groups 2 and
3) applied to the block's pre-activated input, as in the original WRN code. The ``avgpool``
shortcut variant replaces the strided 1x1 convolution with ``AvgPool2d(2, 2)`` followed by a
stride-1 1x1 convolution. The network ends with BN-act, global average pooling, flatten and the
logits ``nn.Linear``.
"""

from __future__ import annotations

from torch import Tensor, nn

from lipmargin.errors import ConfigError
from lipmargin.layers import activation as make_activation
from lipmargin.models._registry import register
from lipmargin.models.convnets import check_common

__all__ = ["PreActBlock", "WideResNet", "wrn", "wrn16_4", "wrn16_4_avgpool"]

SHORTCUTS = ("conv", "avgpool")


class PreActBlock(nn.Module):
    """One pre-activation wide residual block.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first 3x3 convolution (1 or 2).
        dropout: dropout probability between the two convolutions (0 leaves the layer out).
        activation: activation name for :func:`lipmargin.layers.activation`.
        shortcut: ``"conv"`` (strided 1x1 conv) or ``"avgpool"`` (``AvgPool2d(2, 2)`` then a
            1x1 conv) when the shape changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dropout: float = 0.0,
        activation: str = "relu",
        shortcut: str = "conv",
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"PreActBlock stride must be 1 or 2, got {stride}")
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None
        if in_channels == out_channels and stride == 1:
            self.shortcut = None
        elif stride == 1 or shortcut == "conv":
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(2, 2), nn.Conv2d(in_channels, out_channels, 1, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual branch plus shortcut (no data-dependent control flow)."""
        out = self.act1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        y = self.conv1(out)
        y = self.act2(self.bn2(y))
        if self.dropout is not None:
            y = self.dropout(y)
        y = self.conv2(y)
        return y + skip


class WideResNet(nn.Module):
    """A pre-activation WRN-``depth``-``width``.

    Args:
        depth: total depth; ``(depth - 4)`` must be divisible by 6 (16 -> 2 blocks per group).
        width: widening factor; the groups have 16, 32 and 64 times ``width`` channels.
        in_channels: input channels.
        num_classes: number of logits.
        dropout: dropout probability inside every block.
        activation: activation name.
        shortcut: ``"conv"`` or ``"avgpool"`` (see :class:`PreActBlock`).
    """

    def __init__(
        self,
        depth: int = 16,
        width: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dropout: float = 0.4,
        activation: str = "relu",
        shortcut: str = "conv",
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(
                f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, ...), got {depth}"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"WRN width must be a positive integer, got {width!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        blocks = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        channels = 16
        groups = []
        for index, out_channels in enumerate(widths):
            layers = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                layers.append(
                    PreActBlock(channels, out_channels, stride, dropout, activation, shortcut)
                )
                channels = out_channels
            groups.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = groups
        self.bn = nn.BatchNorm2d(channels)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.act(self.bn(x))
        x = self.flatten(self.pool(x))
        return self.fc(x)


def _wrn(
    in_channels: int,
    input_size: int,
    num_classes: int,
    activation: str,
    depth: int,
    width: int,
    dropout: float,
    shortcut: str,
) -> WideResNet:
    check_common(in_channels, input_size, num_classes)
    if input_size < 4:
        raise ConfigError(f"WRN needs input_size >= 4 (two stride-2 stages), got {input_size}")
    return WideResNet(depth, width, in_channels, num_classes, dropout, activation, shortcut)


@register("wrn16_4", aliases=("wrn-16-4",))
def wrn16_4(
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    activation: str = "relu",
    depth: int = 16,
    width: int = 4,
    dropout: float = 0.4,
) -> WideResNet:
    """WRN-16-4 with strided 1x1 convolution shortcuts (about 2.75M parameters)."""
    return _wrn(in_channels, input_size, num_classes, activation, depth, width, dropout, "conv")


@register("wrn16_4_avgpool", aliases=("wrn-16-4-avgpool",))
def wrn16_4_avgpool(
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    activation: str = "relu",
    depth: int = 16,
    width: int = 4,
    dropout: float = 0.4,
) -> WideResNet:
    """WRN-16-4 whose stride-2 shortcuts are ``AvgPool2d(2, 2)`` followed by a 1x1 convolution."""
    return _wrn(in_channels, input_size, num_classes, activation, depth, width, dropout, "avgpool")


@register("wrn")
def wrn(
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    activation: str = "relu",
    depth: int = 16,
    width: int = 4,
    dropout: float = 0.4,
    shortcut: str = "conv",
) -> WideResNet:
    """A pre-activation WRN of any depth/width (``depth=10, width=1`` is a tiny test model)."""
    return _wrn(in_channels, input_size, num_classes, activation, depth, width, dropout, shortcut)
