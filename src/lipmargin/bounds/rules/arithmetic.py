"""Arithmetic: addition adds, constants scale, concatenation takes the root of the sum of squares
(paper §5); reductions by Cauchy-Schwarz."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch.fx import Node

from ...errors import UnsupportedOperationError
from ..registry import register_function, register_method
from ._common import _args, _first, sqrt_up

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext


# --- arithmetic: addition adds, constants scale -------------------------------------------
def _copies(ctx: WalkContext, node: Node, arg: Any) -> float:
    """sqrt of how many times broadcasting repeats each entry of ``arg`` in ``node``'s output
    (broadcasting copies every entry equally often)."""
    if not isinstance(arg, Node):
        return 1.0
    n_in, n_out = math.prod(ctx.shape(arg)), math.prod(ctx.shape(node))
    return sqrt_up(n_out / n_in) if n_out > n_in else 1.0


def _abs_max(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().abs().max())
    return abs(float(value))


def _abs_min(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().abs().min())
    return abs(float(value))


@register_function(operator.add, operator.sub, torch.add, torch.sub)
@register_method("add", "sub")
def add(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Residual connection / shift: ``L(a + alpha b) <= L(a) + |alpha| L(b)`` (paper §5), each
    term times sqrt(copies) where broadcasting repeats an operand."""
    a = _args(ctx, node, ["input", "other", "alpha"], {"alpha": 1})
    parts = []
    la, lb = ctx.L(a["input"]), ctx.L(a["other"])
    if la is not None:
        parts.append(la * _copies(ctx, node, a["input"]))
    if lb is not None:
        parts.append(lb * abs(float(a["alpha"])) * _copies(ctx, node, a["other"]))
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


@register_function(operator.mul, torch.mul)
@register_method("mul")
def mul(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Multiplication by a constant ``c``: factor ``max |c|`` (times sqrt(copies) under
    broadcasting). A product of two input-dependent tensors is not globally Lipschitz."""
    a = _args(ctx, node, ["input", "other"], {})
    x, y = a["input"], a["other"]
    lx, ly = ctx.L(x), ctx.L(y)
    if lx is not None and ly is not None:
        raise UnsupportedOperationError(
            f"graph node {node.name!r} multiplies two input-dependent tensors: not globally "
            "Lipschitz, no certificate can cover it." + _product_hint(ctx, x, y)
        )
    (bound, dep), const = ((lx, x), y) if lx is not None else ((ly, y), x)
    return bound * _abs_max(ctx.value(const)) * _copies(ctx, node, dep)


@register_function(operator.truediv, torch.div)
@register_method("div")
def div(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Division by a constant ``c`` (e.g. an input normalisation's std): factor ``1/min |c|``
    (times sqrt(copies) under broadcasting)."""
    a = _args(ctx, node, ["input", "other"], {"rounding_mode": None})
    x, y = a["input"], a["other"]
    if ctx.L(y) is not None:
        raise UnsupportedOperationError(
            f"graph node {node.name!r} divides by an input-dependent tensor: not globally "
            "Lipschitz, no certificate can cover it."
        )
    if a["rounding_mode"] is not None:
        raise UnsupportedOperationError(f"node {node.name!r}: rounding division has no rule")
    smallest = _abs_min(ctx.value(y))
    if smallest == 0:
        raise UnsupportedOperationError(f"node {node.name!r}: division by zero")
    return ctx.L(x) / smallest * _copies(ctx, node, x)


@register_function(torch.cat, torch.concat, torch.stack)
def cat(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Concatenation of maps of the same input: ``sqrt(sum_j L_j^2)`` (paper §5)."""
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    if isinstance(tensors, Node):  # a tuple node (x.chunk(...)): each part is L(source)
        bound = ctx.L(tensors)
        return bound * sqrt_up(len(ctx.shape(tensors)))
    bounds = ctx.L_all(tensors)
    # scaled by the largest, so that tiny bounds do not underflow to 0 when squared
    top = bounds[0]
    for b in bounds[1:]:
        top = torch.maximum(top, b)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return top * torch.sqrt(sum((b / safe) ** 2 for b in bounds))


def _reduced_count(ctx: WalkContext, node: Node) -> int:
    a = _args(ctx, node, ["input", "dim", "keepdim", "dtype"], {"dim": None})
    shape = ctx.shape(a["input"])
    dim = a["dim"]
    if dim is None:
        return math.prod(shape)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    full = (1, *shape)
    if any(d % len(full) == 0 for d in dims):
        raise UnsupportedOperationError(f"node {node.name!r}: reduction over the batch dimension")
    return math.prod(full[d] for d in dims)


@register_function(torch.mean)
@register_method("mean")
def mean(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Mean of n entries: ``(sum d / n)^2 <= sum d^2 / n`` (Cauchy-Schwarz), factor 1/sqrt(n)."""
    f = (1.0 + 1e-12) / math.sqrt(_reduced_count(ctx, node))
    ctx.record(node, "mean", f)
    return _first(ctx, node) * f


@register_function(torch.sum)
@register_method("sum")
def total(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Sum of n entries: factor sqrt(n) (Cauchy-Schwarz)."""
    f = sqrt_up(_reduced_count(ctx, node))
    ctx.record(node, "sum", f)
    return _first(ctx, node) * f


# --- issue 14: a hint for x * sigmoid(x) ----------------------------------------------------
def _is_sigmoid_of(ctx: WalkContext, node: Any, other: Any) -> bool:
    """True when ``node`` computes ``sigmoid(other)`` (function, method or ``nn.Sigmoid``)."""
    if not isinstance(node, Node) or not node.args or node.args[0] is not other:
        return False
    if node.op == "call_function":
        return node.target in (torch.sigmoid, torch.nn.functional.sigmoid)
    if node.op == "call_method":
        return node.target == "sigmoid"
    if node.op == "call_module":
        return isinstance(ctx.module(node), torch.nn.Sigmoid)
    return False


def _product_hint(ctx: WalkContext, x: Any, y: Any) -> str:
    if _is_sigmoid_of(ctx, x, y) or _is_sigmoid_of(ctx, y, x):
        return (
            " x * sigmoid(x) is SiLU (Swish): write nn.SiLU() or F.silu(x), which has a rule "
            "(constant 1.1)."
        )
    return ""
