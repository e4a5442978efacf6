"""Resampling: interpolation / upsampling (separable linear maps, exact norm on the actual shape)
and patch extraction (``unfold``: selections with repeats, exact norm sqrt(max copies))."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...errors import UnsupportedOperationError
from .. import norms
from ..registry import register_function, register_method, register_module
from ._common import _args, _cached, _first, sqrt_up

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext


# --- interpolation ----------------------------------------------------------------------------
_SEPARABLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear")


def _interpolate(ctx: WalkContext, node: Node, kw: dict[str, Any]) -> torch.Tensor:
    """``F.interpolate`` without antialiasing in a nearest or (bi/tri)linear mode is separable:
    along each spatial axis every output entry is one input entry (nearest) or a convex
    combination of two (linear, either ``align_corners``), the same 1-D map ``M_k`` for every
    position along the other axes and every channel. The map is ``I (x) M_1 (x) ... (x) M_d``
    and its norm is exactly ``prod_k ||M_k||_2``, computed on the actual sizes in float64
    (``norms.separable_bound``; nearest with integer scale s per axis gives sqrt(prod s)).
    ``area`` is adaptive average pooling, a non-negative map: Schur test (as ``AvgPool``).
    Bicubic (negative weights, clamped borders) and antialiasing are refused."""
    mode = kw.get("mode", "nearest")
    if kw.get("antialias", False):
        raise UnsupportedOperationError(
            f"node {node.name!r}: interpolate with antialias=True has no rule"
        )
    shape = ctx.in_shape(node)
    probe_kw = {k: v for k, v in kw.items() if k != "input"}

    def apply(u: torch.Tensor) -> torch.Tensor:
        return F.interpolate(u, **probe_kw)

    if mode == "area":
        f = _cached(ctx, node, lambda: norms.schur_bound(apply, (1, *shape[1:])))
    elif mode in _SEPARABLE_MODES:

        def compute() -> torch.Tensor:
            try:
                return norms.separable_bound(apply, shape, list(range(1, len(shape))))
            except ValueError as exc:  # pragma: no cover - these modes are separable
                raise UnsupportedOperationError(f"node {node.name!r}: {exc}") from exc

        f = _cached(ctx, node, compute)
    else:
        raise UnsupportedOperationError(
            f"node {node.name!r}: interpolate mode {mode!r} has no rule (supported: "
            f"{', '.join(_SEPARABLE_MODES)}, area)"
        )
    ctx.record(node, f"interpolate_{mode}", f)
    return _first(ctx, node) * f


_INTERPOLATE_ARGS = [
    "input",
    "size",
    "scale_factor",
    "mode",
    "align_corners",
    "recompute_scale_factor",
    "antialias",
]


@register_function(F.interpolate)
def interpolate_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    """(The deprecated ``F.upsample*`` call ``F.interpolate`` and trace as it.)"""
    return _interpolate(ctx, node, _args(ctx, node, _INTERPOLATE_ARGS, {"mode": "nearest"}))


@register_module(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def upsample_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    kw = {
        "size": m.size,
        "scale_factor": m.scale_factor,
        "mode": m.mode,
        "align_corners": m.align_corners,
        "recompute_scale_factor": m.recompute_scale_factor,
    }
    return _interpolate(ctx, node, kw)


# --- patch extraction -------------------------------------------------------------------------
def window_copies(size: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1) -> int:
    """Largest number of (window, tap) pairs reading one input index along one axis, for windows
    at ``o * stride - padding + t * dilation`` (``t < kernel``) that fit in the padded axis."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    counts = [0] * size
    for o in range(max(out, 0)):
        for t in range(kernel):
            j = o * stride - padding + t * dilation
            if 0 <= j < size:
                counts[j] += 1
    return max(counts) if counts else 0


@register_method("unfold")
def tensor_unfold(ctx: WalkContext, node: Node) -> torch.Tensor:
    """``x.unfold(dim, size, step)``: every output entry is one input entry, entry ``j`` appears
    ``c_j`` times, so ``A^T A = diag(c)`` and the norm is exactly ``sqrt(max_j c_j)``
    (1 for ``step >= size``, at most ``sqrt(ceil(size / step))``)."""
    a = _args(ctx, node, ["input", "dimension", "size", "step"], {})
    full = (1, *ctx.shape(a["input"]))
    dim = int(a["dimension"]) % len(full)
    if dim == 0:
        raise UnsupportedOperationError(f"node {node.name!r}: unfold over the batch dimension")
    c = window_copies(full[dim], int(a["size"]), int(a["step"]))
    f = sqrt_up(max(c, 1))
    ctx.record(node, "unfold", f)
    return _first(ctx, node) * f


def _im2col(ctx: WalkContext, node: Node, kernel, dilation, padding, stride) -> torch.Tensor:
    """``F.unfold`` (im2col) on (C, H, W): zero padding embeds, then each patch entry is one
    input entry. Input ``(j1, j2)`` appears ``c1(j1) c2(j2)`` times (per-axis (window, tap)
    choices), so ``A^T A`` is diagonal and the norm is exactly
    ``sqrt(max c1 * max c2)`` (at most ``sqrt(prod ceil(k_eff / s))``)."""
    shape = ctx.in_shape(node)
    nsp = len(shape) - 1
    k, d, p, s = (norms._as_tuple(v, nsp) for v in (kernel, dilation, padding, stride))
    f = sqrt_up(
        max(
            1,
            math.prod(window_copies(h, *t) for h, *t in zip(shape[1:], k, s, p, d, strict=True)),
        )
    )
    ctx.record(node, "unfold", f)
    return _first(ctx, node) * f


@register_function(F.unfold)
def unfold_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(
        ctx,
        node,
        ["input", "kernel_size", "dilation", "padding", "stride"],
        {"dilation": 1, "padding": 0, "stride": 1},
    )
    return _im2col(ctx, node, a["kernel_size"], a["dilation"], a["padding"], a["stride"])


@register_module(nn.Unfold)
def unfold_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    return _im2col(ctx, node, m.kernel_size, m.dilation, m.padding, m.stride)
