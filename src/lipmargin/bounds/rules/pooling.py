"""Pooling (paper Thm. 3): max pooling sqrt(n) windows, average pooling by the Schur test."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from .. import norms
from ..registry import register_function, register_module
from ._common import _args, _cached, _first, sqrt_up

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext


# --- pooling (paper Thm. 3) -----------------------------------------------------------------
def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(a) for a in v)
    return t * n if len(t) == 1 else t


def max_pool_windows(kernel, stride, dilation, out_size) -> int:
    """Largest number of pooling windows containing one input element (paper Thm. 3):
    per axis ``min(ceil(k_eff / s), out)``, multiplied over axes."""
    return math.prod(
        min(-(-(d * (k - 1) + 1) // s), o)
        for k, s, d, o in zip(kernel, stride, dilation, out_size, strict=True)
    )


_POOL_DIMS = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}


def _spatial(shape: tuple[int, ...], nsp: int) -> tuple[int, ...]:
    """The last ``nsp`` axes: the pooled ones. Torch also accepts inputs without a channel axis
    (its unbatched layout), where the first non-batch axis is pooled too."""
    return tuple(shape[-nsp:])


def _max_pool(ctx: WalkContext, node: Node, params: dict[str, Any], nsp: int) -> torch.Tensor:
    out = ctx.shape(node)
    if isinstance(out, tuple) and out and isinstance(out[0], tuple):
        out = out[0]  # return_indices=True
    k = _tuple(params["kernel_size"], nsp)
    s = _tuple(params["stride"] or params["kernel_size"], nsp)
    d = _tuple(params.get("dilation", 1), nsp)
    n = max_pool_windows(k, s, d, _spatial(out, nsp))
    f = sqrt_up(n)
    ctx.record(node, "max_pool", f)
    return _first(ctx, node) * f


@register_module(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def max_pool_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    params = {"kernel_size": m.kernel_size, "stride": m.stride, "dilation": m.dilation}
    return _max_pool(ctx, node, params, _POOL_DIMS[type(m)])


@register_function(F.max_pool1d, F.max_pool2d, F.max_pool3d)
def max_pool_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    params = _args(ctx, node, names, {"stride": None, "dilation": 1})
    return _max_pool(ctx, node, params, _POOL_DIMS[node.target])


def adaptive_windows(size: int, out: int) -> int:
    """Largest number of adaptive-pooling windows (``[floor(i h/o), ceil((i+1) h/o))``) that
    contain one input index."""
    counts = [0] * size
    for i in range(out):
        for j in range((i * size) // out, -(-((i + 1) * size) // out)):
            counts[j] += 1
    return max(counts)


@register_module(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def adaptive_max_pool(ctx: WalkContext, node: Node) -> torch.Tensor:
    inp, out = ctx.in_shape(node), ctx.shape(node)
    if isinstance(out[0], tuple):
        out = out[0]
    nsp = _POOL_DIMS[type(ctx.module(node))]
    pairs = zip(_spatial(inp, nsp), _spatial(out, nsp), strict=True)
    f = sqrt_up(math.prod(adaptive_windows(h, o) for h, o in pairs))
    ctx.record(node, "adaptive_max_pool", f)
    return _first(ctx, node) * f


def _schur_pool(ctx: WalkContext, node: Node, apply) -> torch.Tensor:
    """Average pooling is a non-negative linear map: guaranteed Schur bound on the actual
    input shape, which equals sqrt(n)/sqrt(kh kw) in the plain case (paper Thm. 3)."""
    shape = (1, *ctx.in_shape(node)[1:])
    f = _cached(ctx, node, lambda: norms.schur_bound(apply, shape))
    ctx.record(node, "avg_pool", f)
    return _first(ctx, node) * f


_AVG_FN = {nn.AvgPool1d: F.avg_pool1d, nn.AvgPool2d: F.avg_pool2d, nn.AvgPool3d: F.avg_pool3d}


@register_module(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def avg_pool_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    fn = _AVG_FN[type(m)]
    kw = {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "ceil_mode": m.ceil_mode,
        "count_include_pad": m.count_include_pad,
    }
    if getattr(m, "divisor_override", None) is not None:
        kw["divisor_override"] = m.divisor_override
    return _schur_pool(ctx, node, lambda u: fn(u, **kw))


@register_function(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def avg_pool_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"]
    names += ["divisor_override"] if node.target is not F.avg_pool1d else []
    rest = _args(ctx, node, names, {})
    rest.pop("input")
    fn = node.target
    return _schur_pool(ctx, node, lambda u: fn(u, **rest))


_ADAPTIVE_AVG = {
    nn.AdaptiveAvgPool1d: F.adaptive_avg_pool1d,
    nn.AdaptiveAvgPool2d: F.adaptive_avg_pool2d,
    nn.AdaptiveAvgPool3d: F.adaptive_avg_pool3d,
}


@register_module(*_ADAPTIVE_AVG)
def adaptive_avg_pool_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    fn = _ADAPTIVE_AVG[type(m)]
    return _schur_pool(ctx, node, lambda u: fn(u, m.output_size))


@register_function(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def adaptive_avg_pool_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    size = _args(ctx, node, ["input", "output_size"], {})["output_size"]
    fn = node.target
    return _schur_pool(ctx, node, lambda u: fn(u, size))
