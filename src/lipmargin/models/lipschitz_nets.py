"""Networks built from the 1-Lipschitz-by-construction layers of ``lipmargin.layers``.

* ``liresnet``: LiResNet-style (Hu et al., NeurIPS 2023): a strided stem, ``depth`` linear
  residual blocks ``x + conv(x)`` each followed by MaxMin, a strided neck, one dense layer and
  a row-normalised head. The engine bounds each block exactly as ``I + C`` (a fused operator),
  so the bound does not grow like ``(1 + ||C||)^depth``.
* ``sll_net``: SLL blocks (Araujo et al., ICLR 2023), convolutional then dense.
* ``aol_net``: AOL convolutions and dense layers (Prach & Lampert, ECCV 2022).

All take ``in_channels``, ``input_size`` and ``num_classes`` like the other registered models and
end with a head the engine reads per class pair (paper Prop. 2).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from lipmargin.layers import (
    AOLConv2d,
    AOLLinear,
    LinearResidualConv,
    MaxMin,
    NormalizedLinear,
    SLLConv2d,
    SLLLinear,
)
from lipmargin.models._registry import register
from lipmargin.models.convnets import check_common, conv_out_size

__all__ = ["aol_net", "liresnet", "sll_net"]


def _stem(layers: OrderedDict, name: str, cin: int, cout: int, size: int) -> int:
    """A 4x4 stride-2 convolution (halves the grid) followed by MaxMin; returns the new size."""
    layers[name] = nn.Conv2d(cin, cout, 4, stride=2, padding=1)
    layers[f"{name}_act"] = MaxMin()
    return conv_out_size(size, 4, 2, 1)


@register("liresnet")
def liresnet(
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    width: int = 16,
    depth: int = 8,
    dense: int = 256,
    normalized_head: bool = True,
) -> nn.Sequential:
    """LiResNet-style net: stem, ``depth`` x (``x + conv(x)``, MaxMin), neck, dense, LLN head."""
    check_common(in_channels, input_size, num_classes)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    size = _stem(layers, "stem", in_channels, width, input_size)
    for i in range(1, depth + 1):
        layers[f"block{i}"] = LinearResidualConv(width)
        layers[f"act{i}"] = MaxMin()
    size = _stem(layers, "neck", width, 2 * width, size)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(2 * width * size * size, dense)
    layers["fc_act"] = MaxMin()
    head = NormalizedLinear if normalized_head else nn.Linear
    layers["head"] = head(dense, num_classes)
    return nn.Sequential(layers)


@register("sll_net")
def sll_net(
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    width: int = 16,
    conv_depth: int = 4,
    dense_depth: int = 2,
    dense: int = 256,
) -> nn.Sequential:
    """SLL net: stem, ``conv_depth`` SLL conv blocks, neck, dense, ``dense_depth`` SLL dense
    blocks, LLN head."""
    check_common(in_channels, input_size, num_classes)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    size = _stem(layers, "stem", in_channels, width, input_size)
    for i in range(1, conv_depth + 1):
        layers[f"sll_conv{i}"] = SLLConv2d(width)
    size = _stem(layers, "neck", width, 2 * width, size)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(2 * width * size * size, dense)
    for i in range(1, dense_depth + 1):
        layers[f"sll_dense{i}"] = SLLLinear(dense)
    layers["head"] = NormalizedLinear(dense, num_classes)
    return nn.Sequential(layers)


@register("aol_net")
def aol_net(
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    width: int = 16,
    conv_depth: int = 3,
    dense: int = 256,
) -> nn.Sequential:
    """AOL net: stem, ``conv_depth`` x (AOL conv, MaxMin), neck, AOL dense, MaxMin, LLN head."""
    check_common(in_channels, input_size, num_classes)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    size = _stem(layers, "stem", in_channels, width, input_size)
    for i in range(1, conv_depth + 1):
        layers[f"aol_conv{i}"] = AOLConv2d(width, width)
        layers[f"act{i}"] = MaxMin()
    size = _stem(layers, "neck", width, 2 * width, size)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = AOLLinear(2 * width * size * size, dense)
    layers["fc_act"] = MaxMin()
    layers["head"] = NormalizedLinear(dense, num_classes)
    return nn.Sequential(layers)
