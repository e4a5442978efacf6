"""Linear maps (paper Thm. 1): dense, convolution, convolution + BatchNorm. Power iteration while
training; exact SVD / FFT bound when certifying."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...errors import UnsupportedOperationError
from .. import norms, power
from ..operators import LinearOperator
from ..registry import register_function, register_module
from ._common import _args, _first

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# --- linear maps (paper Thm. 1; exact SVD / FFT bound when certifying) ---------------------
def _conv_norm(
    ctx: WalkContext,
    key_node: Node,
    kind: str,
    weight: torch.Tensor,
    params: dict[str, Any],
    input_shape: tuple[int, ...],
) -> torch.Tensor:
    nsp = weight.dim() - 2
    conv = _CONV_FN[nsp]

    def apply(u: torch.Tensor) -> torch.Tensor:
        return conv(
            u,
            weight,
            None,
            params["stride"],
            params["padding"],
            params["dilation"],
            params["groups"],
        )

    def guaranteed() -> torch.Tensor:
        if ctx.conv_method == "closed_form":
            return norms.conv_closed_form_bound(
                weight, params["stride"], params["dilation"], params["groups"]
            )
        return norms.conv_guaranteed_bound(weight, input_shape[1:], **params)

    adjoint = _conv_adjoint(weight, params, input_shape)
    weight_grad = None
    if not isinstance(params["padding"], str):
        grad_fn = _CONV_WEIGHT_GRAD[nsp]

        def weight_grad(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return grad_fn(
                u,
                weight.shape,
                v,
                params["stride"],
                params["padding"],
                params["dilation"],
                params["groups"],
            )

    op = LinearOperator(
        kind,
        tuple(input_shape),
        power.wide_kernels(apply, weight),
        guaranteed,
        None if adjoint is None else power.wide_kernels(adjoint, weight),
        weight,
        None if weight_grad is None else power.wide_kernels(weight_grad, weight),
        estimate_only=ctx.conv_method == "power",
    )
    return ctx.linear(key_node, op)


_CONV_WEIGHT_GRAD = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_adjoint(weight: torch.Tensor, params: dict[str, Any], input_shape: tuple[int, ...]):
    """``A^T`` of a zero-padded convolution as a transposed convolution (cheaper than autograd),
    or None where padding is asymmetric (then autograd supplies the transpose)."""
    nsp = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    stride = norms._as_tuple(params["stride"], nsp)
    dil = norms._as_tuple(params["dilation"], nsp)
    pads = norms.conv_padding(params["padding"], kernel, dil, stride)
    if any(a != b for a, b in pads):
        return None
    pad = tuple(a for a, _ in pads)
    size = input_shape[1:]
    outs = [
        (h + 2 * p - d * (k - 1) - 1) // s + 1
        for h, p, d, k, s in zip(size, pad, dil, kernel, stride, strict=True)
    ]
    extra = tuple(
        h - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for h, o, p, d, k, s in zip(size, outs, pad, dil, kernel, stride, strict=True)
    )
    conv_t = _CONV_T_FN[nsp]

    def adjoint(v: torch.Tensor) -> torch.Tensor:
        return conv_t(v, weight, None, stride, pad, extra, params["groups"], dil)

    return adjoint


def _conv_params(m: nn.Module, node: Node) -> dict[str, Any]:
    if getattr(m, "padding_mode", "zeros") != "zeros":
        raise UnsupportedOperationError(
            f"node {node.name!r}: padding_mode={m.padding_mode!r} has no rule (only 'zeros')"
        )
    return {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Convolution: operator norm on its actual input shape (paper Thm. 1). When a BatchNorm
    follows, it is folded in at the BN node and the convolution passes its input bound on."""
    if ctx.fused_bn(node) is not None:
        return _first(ctx, node)
    m = ctx.module(node)
    params = _conv_params(m, node)
    weight = ctx.tensor(m.weight)
    return _first(ctx, node) * _conv_norm(
        ctx, node, f"conv{weight.dim() - 2}d", weight, params, ctx.in_shape(node)
    )


@register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def batch_norm(ctx: WalkContext, node: Node) -> torch.Tensor:
    """BatchNorm after a convolution: one linear map, kernel scaled per output channel by
    ``gamma / sqrt(var + eps)`` (paper §5, tighter than the product). Alone: a diagonal map,
    ``max_c |gamma_c| / sqrt(var_c + eps)``."""
    src = node.args[0]
    scale = ctx.bn_scale(node)
    if isinstance(src, Node) and ctx.fused_bn(src) is node:
        m = ctx.module(src)
        params = _conv_params(m, src)
        w = ctx.tensor(m.weight)
        weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        kind = f"conv{w.dim() - 2}d+bn"
        return ctx.L(src) * _conv_norm(ctx, src, kind, weight, params, ctx.in_shape(src))
    f = scale.abs().max()
    ctx.record(node, "batch_norm", f)
    return _first(ctx, node) * f


@register_module(nn.Linear)
def linear(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Dense layer: spectral norm (exact float64 SVD when certifying; power iteration while
    training). Applied to the last axis of any leading shape, its norm is the same.

    No ``weight_grad``: the training estimate ``||W u||`` goes through autograd (its backward
    is one outer product), which costs fewer passes over a large matrix than Euler's
    ``<W, d sigma / dW>`` (WK's 1568 x 100 layer: bound forward+backward ~0.99 -> 0.76 ms)."""
    w = ctx.tensor(ctx.module(node).weight)
    op = LinearOperator(
        "linear",
        ctx.in_shape(node),
        lambda u: F.linear(u, w),
        lambda: norms.spectral_norm_exact(w),
        lambda v: v @ w,
        w,
    )
    return _first(ctx, node) * ctx.linear(node, op)


@register_function(F.linear)
def linear_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(ctx, node, ["input", "weight", "bias"], {"bias": None})
    if ctx.L(a["weight"]) is not None or ctx.L(a["bias"]) is not None:
        raise UnsupportedOperationError(
            f"node {node.name!r}: F.linear with a weight or bias that depends on the input"
        )
    w = ctx.tensor(ctx.value(a["weight"]))
    shape = ctx.shape(a["input"])
    op = LinearOperator(
        "linear", shape, lambda u: F.linear(u, w), lambda: norms.spectral_norm_exact(w)
    )
    return ctx.L(a["input"]) * ctx.linear(node, op)


@register_function(F.conv1d, F.conv2d, F.conv3d)
def conv_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": None}
    a = _args(ctx, node, names, defaults)
    if ctx.L(a["weight"]) is not None or ctx.L(a["bias"]) is not None:
        raise UnsupportedOperationError(
            f"node {node.name!r}: a convolution whose weight or bias depends on the input"
        )
    w = ctx.tensor(ctx.value(a["weight"]))
    params = {k: a[k] for k in ("stride", "padding", "dilation", "groups")}
    shape = ctx.shape(a["input"])
    return ctx.L(a["input"]) * _conv_norm(ctx, node, f"conv{w.dim() - 2}d", w, params, shape)


# --- issue 14: transposed convolutions ----------------------------------------------------------
def _conv_transpose(
    ctx: WalkContext, node: Node, weight: torch.Tensor, params: dict[str, Any]
) -> torch.Tensor:
    """Transposed convolution (zeros padding, any stride/padding/output_padding/dilation/groups).

    ``conv_transpose(x; W, s, p, op, g, d)`` on an input of spatial size ``h`` is the adjoint of
    ``conv(y; W, s, p, d, g)`` (the same weight tensor, read as a convolution from ``C_out``
    to ``C_in`` channels) on inputs ``y`` of the transposed convolution's OUTPUT size
    ``h' = (h - 1) s - 2p + d (k - 1) + op + 1``: output position ``i`` of that convolution reads
    ``i s - p + d t``, exactly where input position ``i`` of the transposed one writes. The
    convolution on ``h'`` has ``floor(((h - 1) s + op) / s) + 1 >= h`` outputs (``h`` when
    ``op < s``), so ``conv_transpose = A^T E`` with ``E`` the zero embedding of the ``h`` inputs
    into those outputs, and ``||conv_transpose|| <= ||A^T|| = ||A||`` (equality when ``op < s``).
    ``||A||`` is bounded by the convolution rule's guaranteed bounds on the size ``h'``: the
    minimum of ``conv_fft_bound`` and the Cor. 1 closed form. While training, power iteration runs
    on the transposed convolution itself (autograd gives its adjoint)."""
    nsp = weight.dim() - 2
    conv_t = _CONV_T_FN[nsp]
    in_shape = ctx.in_shape(node)
    out_shape = ctx.shape(node)
    stride, padding, dilation, groups = (
        params["stride"],
        params["padding"],
        params["dilation"],
        params["groups"],
    )
    output_padding = params["output_padding"]

    def apply(u: torch.Tensor) -> torch.Tensor:
        return conv_t(u, weight, None, stride, padding, output_padding, groups, dilation)

    def guaranteed() -> torch.Tensor:
        if ctx.conv_method == "closed_form":
            return norms.conv_closed_form_bound(weight, stride, dilation, groups)
        return norms.conv_guaranteed_bound(weight, out_shape[1:], stride, padding, dilation, groups)

    kind = f"conv_transpose{nsp}d"
    op = LinearOperator(kind, in_shape, apply, guaranteed, estimate_only=ctx.conv_method == "power")
    return ctx.linear(node, op)


@register_module(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    if getattr(m, "padding_mode", "zeros") != "zeros":  # pragma: no cover - torch refuses it
        raise UnsupportedOperationError(
            f"node {node.name!r}: padding_mode={m.padding_mode!r} has no rule (only 'zeros')"
        )
    # output_size= in forward() only changes output_padding; apply() must match the node, so
    # read it back from the actual output shape.
    nsp = m.weight.dim() - 2
    size_in, size_out = ctx.in_shape(node)[1:], ctx.shape(node)[1:]
    output_padding = tuple(
        o - ((h - 1) * s - 2 * p + d * (k - 1) + 1)
        for o, h, s, p, d, k in zip(
            size_out,
            size_in,
            norms._as_tuple(m.stride, nsp),
            norms._as_tuple(m.padding, nsp),
            norms._as_tuple(m.dilation, nsp),
            m.kernel_size,
            strict=True,
        )
    )
    params = {
        "stride": m.stride,
        "padding": m.padding,
        "output_padding": output_padding,
        "dilation": m.dilation,
        "groups": m.groups,
    }
    return _first(ctx, node) * _conv_transpose(ctx, node, ctx.tensor(m.weight), params)


@register_function(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def conv_transpose_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    names = ["input", "weight", "bias", "stride", "padding", "output_padding", "groups"]
    names += ["dilation"]
    a = _args(
        ctx,
        node,
        names,
        {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1},
    )
    if ctx.L(a["weight"]) is not None:
        raise UnsupportedOperationError(f"node {node.name!r}: weight depends on the input")
    w = ctx.tensor(ctx.value(a["weight"]))
    params = {k: a[k] for k in ("stride", "padding", "output_padding", "dilation", "groups")}
    return ctx.L(a["input"]) * _conv_transpose(ctx, node, w, params)
