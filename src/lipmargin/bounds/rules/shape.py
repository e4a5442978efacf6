"""Identities and shape changes: isometries or selections, 1-Lipschitz (paper §5)."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...errors import UnsupportedOperationError
from .. import norms
from ..registry import register_function, register_method, register_module
from ._common import _args, _cached, _first, identity
from .arithmetic import _copies

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext


# --- identities and shape changes: 1-Lipschitz (isometries or selections) ------------------
register_module(
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)(identity)
register_function(
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.clone,
    operator.pos,
    operator.neg,
    torch.neg,
    torch.split,
    torch.chunk,
    torch.unbind,
)(identity)
register_method(
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "clone",
    "neg",
    "split",
    "chunk",
    "unbind",
    "float",
)(identity)


@register_method("view")
def view(ctx: WalkContext, node: Node) -> torch.Tensor:
    """``x.view(shape)`` is a reshape (1-Lipschitz); ``x.view(dtype)`` reinterprets the bits
    (e.g. float32 as int32): not Lipschitz, refused."""
    if any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values())):
        raise UnsupportedOperationError(
            f"node {node.name!r}: x.view(dtype) reinterprets the bits of the input: not Lipschitz"
        )
    return _first(ctx, node)


#: functional dropouts and whether each is active by default (``training`` argument)
_DROPOUT_DEFAULT_TRAINING = {
    F.dropout: True,
    F.dropout1d: True,
    F.dropout2d: True,
    F.dropout3d: True,
    F.alpha_dropout: False,
    F.feature_alpha_dropout: False,
}


@register_function(*_DROPOUT_DEFAULT_TRAINING)
def functional_dropout(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Functional dropout is the identity only when inactive (``training=False`` or ``p=0``).
    ``F.dropout(x, p)`` without ``training=self.training`` stays active in ``eval()`` (it
    scales kept entries by 1/(1-p) at random) and is refused. The model is traced in
    evaluation mode, so ``training=self.training`` reads False."""
    default = _DROPOUT_DEFAULT_TRAINING[node.target]
    a = _args(ctx, node, ["input", "p", "training", "inplace"], {"p": 0.5, "training": default})
    if a["training"] is not False and float(a["p"]) != 0.0:
        raise UnsupportedOperationError(
            f"node {node.name!r}: {node.target.__name__}(..., training=True) is active in "
            "evaluation mode (random, scales by 1/(1-p)); pass training=self.training or use "
            "nn.Dropout"
        )
    return _first(ctx, node)


@register_function(F.pad)
def pad(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Constant (zero) padding embeds the input: 1-Lipschitz. Reflect/replicate padding
    duplicates entries and is refused."""
    a = _args(ctx, node, ["input", "pad", "mode", "value"], {"mode": "constant"})
    if a["mode"] != "constant":
        raise UnsupportedOperationError(
            f"node {node.name!r}: F.pad mode {a['mode']!r} has no rule (only constant padding)"
        )
    return _first(ctx, node)


@register_function(operator.getitem)
def getitem(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Selecting a tuple element, or slicing a tensor with ints/slices: 1-Lipschitz.
    Index tensors or lists may repeat entries and are refused."""
    src, index = node.args
    if (
        isinstance(ctx.shape(src), tuple)
        and ctx.shape(src)
        and isinstance(ctx.shape(src)[0], tuple)
    ):
        if not ctx.float_output(node):
            raise UnsupportedOperationError(
                f"node {node.name!r} selects a non-floating output of {src.name!r} (e.g. pooling "
                "indices): not Lipschitz in the input"
            )
        return ctx.L(src)
    items = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        raise UnsupportedOperationError(
            f"node {node.name!r}: indexing with {index!r} has no rule (only ints and slices)"
        )
    return ctx.L(src)


# --- issue 14: clamp, abs, where, padding modes and padding modules ---------------------------
def _max_like(ctx: WalkContext, node: Node, args) -> torch.Tensor:
    """Entrywise, ``min``/``max``/selection of several maps ``g_i`` of the input is 1-Lipschitz
    in the max norm of its arguments at that entry: ``|d out_e| <= max_i |d g_i(e)| <=
    sqrt(sum_i |d g_i(e)|^2)``. Summing squares over entries: ``L <= sqrt(sum_i (c_i L_i)^2)``
    with ``c_i`` the sqrt of broadcast copies of ``g_i``. (The max of the L_i is NOT a bound:
    taking one entry from ``(t, 0)`` and the other from ``(0, t)`` gives ``(t, t)``, sqrt 2.)"""
    deps = [a for a in args if isinstance(a, Node) and ctx.L(a) is not None]
    parts = [ctx.L(a) * _copies(ctx, node, a) for a in deps]
    if len(parts) == 1:
        return parts[0]
    return torch.sqrt(sum(p * p for p in parts))


@register_function(torch.clamp, torch.clip)
@register_method("clamp", "clip")
def clamp(ctx: WalkContext, node: Node) -> torch.Tensor:
    """``clamp(x, lo, hi) = min(max(x, lo), hi)``: 1-Lipschitz in x for constant bounds
    (input-dependent bounds: ``_max_like``)."""
    a = _args(ctx, node, ["input", "min", "max"], {"min": None, "max": None})
    return _max_like(ctx, node, [a["input"], a["min"], a["max"]])


@register_function(torch.clamp_min)
@register_method("clamp_min")
def clamp_min(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(ctx, node, ["input", "min"], {})
    return _max_like(ctx, node, [a["input"], a["min"]])


@register_function(torch.clamp_max)
@register_method("clamp_max")
def clamp_max(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(ctx, node, ["input", "max"], {})
    return _max_like(ctx, node, [a["input"], a["max"]])


# ``| |a| - |b| | <= |a - b|`` entrywise: 1-Lipschitz.
register_function(torch.abs, torch.absolute, operator.abs)(identity)
register_method("abs", "absolute")(identity)


def _where(ctx: WalkContext, node: Node, a: dict) -> torch.Tensor:
    """``where(cond, a, b)`` with a constant condition selects each entry from ``a`` or ``b``:
    ``sqrt(L_a^2 + L_b^2)`` (``_max_like``; exact for ``(t, t)`` from ``(t, 0)``/``(0, t)``).
    A condition computed from the input switches branches, a jump in general: refused."""
    if ctx.L(a["condition"]) is not None:
        raise UnsupportedOperationError(
            f"node {node.name!r}: torch.where with a condition computed from the input switches "
            "between branches (a jump in general): not Lipschitz. Use relu / clamp / maximum of "
            "a supported form instead."
        )
    return _max_like(ctx, node, [a["input"], a["other"]])


_COMPARISONS = (operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne)


@register_function(*_COMPARISONS, torch.gt, torch.ge, torch.lt, torch.le, torch.eq, torch.ne)
@register_method("gt", "ge", "lt", "le", "eq", "ne")
def comparison(ctx: WalkContext, node: Node) -> torch.Tensor:
    """A comparison of input-dependent values is a step function: refused with an explanation
    (e.g. ``torch.where(x > 0, a, b)`` switches branches where ``x`` crosses 0)."""
    raise UnsupportedOperationError(
        f"graph node {node.name!r} compares input-dependent values: a step function, not "
        "Lipschitz (as a torch.where condition it switches branches with a jump). Use relu / "
        "clamp / abs instead."
    )


@register_function(torch.where)
def where_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    if len(node.args) + len(node.kwargs) < 3:
        raise UnsupportedOperationError(f"node {node.name!r}: torch.where(cond) returns indices")
    return _where(ctx, node, _args(ctx, node, ["condition", "input", "other"], {}))


@register_method("where")
def where_method(ctx: WalkContext, node: Node) -> torch.Tensor:
    return _where(ctx, node, _args(ctx, node, ["input", "condition", "other"], {}))


def _pad_factor(ctx: WalkContext, node: Node, pad, mode: str) -> float:
    """Padding is a linear map acting separably on each padded axis (``constant``: its linear
    part is the zero padding, an isometric embedding, factor 1). ``reflect``, ``replicate`` and
    ``circular`` copy border entries: the exact norm is the product over padded axes of the
    norms of the 1-D padding matrices on the actual sizes (``norms.separable_bound``, float64),
    at most sqrt(max copies of one entry)."""
    if mode == "constant":
        return 1.0
    if mode not in ("reflect", "replicate", "circular"):
        raise UnsupportedOperationError(f"node {node.name!r}: F.pad mode {mode!r} has no rule")
    shape = ctx.in_shape(node)
    pad = tuple(int(p) for p in pad)
    n = len(pad) // 2
    if n > len(shape):
        raise UnsupportedOperationError(f"node {node.name!r}: padding of the batch dimension")
    axes = list(range(len(shape) - n, len(shape)))

    def compute() -> float:
        try:
            return float(norms.separable_bound(lambda u: F.pad(u, pad, mode), shape, axes))
        except ValueError as exc:  # pragma: no cover - padding is always separable
            raise UnsupportedOperationError(f"node {node.name!r}: {exc}") from exc

    f = _cached(ctx, node, compute)
    ctx.record(node, f"pad_{mode}", f)
    return f


@register_function(F.pad)
def pad_any(ctx: WalkContext, node: Node) -> torch.Tensor:
    """(Replaces ``pad`` above, which refused every mode but constant.)"""
    a = _args(ctx, node, ["input", "pad", "mode", "value"], {"mode": "constant", "value": None})
    return _first(ctx, node) * _pad_factor(ctx, node, a["pad"], a["mode"] or "constant")


_PAD_MODULES = {
    nn.ReflectionPad1d: "reflect",
    nn.ReflectionPad2d: "reflect",
    nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate",
    nn.ReplicationPad2d: "replicate",
    nn.ReplicationPad3d: "replicate",
    nn.CircularPad1d: "circular",
    nn.CircularPad2d: "circular",
    nn.CircularPad3d: "circular",
    nn.ZeroPad1d: "constant",
    nn.ZeroPad2d: "constant",
    nn.ZeroPad3d: "constant",
    nn.ConstantPad1d: "constant",
    nn.ConstantPad2d: "constant",
    nn.ConstantPad3d: "constant",
}


@register_module(*_PAD_MODULES)
def pad_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    mode = next(v for k, v in _PAD_MODULES.items() if isinstance(m, k))
    return _first(ctx, node) * _pad_factor(ctx, node, m.padding, mode)


register_method("abs_", "absolute_")(identity)
register_method("clamp_", "clip_")(clamp)
register_method("clamp_min_")(clamp_min)
register_method("clamp_max_")(clamp_max)


# --- permutations of entries: isometries (session 7) ------------------------------------------
# Flips, rolls, rotations by 90 degrees and pixel / channel shuffles move entries without
# changing them: ``||P x|| = ||x||``, Lipschitz constant 1, exact. Along the batch axis they
# would mix examples: the trace check's batch-independence test refuses that.
register_module(nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)(identity)
register_function(
    torch.flip,
    torch.fliplr,
    torch.flipud,
    torch.roll,
    torch.rot90,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    torch.pixel_shuffle,
    torch.pixel_unshuffle,
    torch.channel_shuffle,
    torch.nn.functional.channel_shuffle,
)(identity)
register_method("flip", "fliplr", "flipud", "roll", "rot90")(identity)


# --- maxima and minima of maps (session 7) -----------------------------------------------------
@register_function(torch.maximum, torch.minimum, torch.fmax, torch.fmin)
@register_method("maximum", "minimum", "fmax", "fmin")
def maximum(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Entrywise maximum / minimum of two maps: ``_max_like`` (root of the sum of squares of
    their constants, with broadcast copies)."""
    a = _args(ctx, node, ["input", "other"], {})
    return _max_like(ctx, node, [a["input"], a["other"]])


def _group_max(ctx: WalkContext, node: Node, dim: Any) -> torch.Tensor:
    """The maximum (or minimum) of each group of entries along ``dim``: the groups are
    disjoint, ``|max a_g - max b_g| <= max |a_g - b_g| <= ||a_g - b_g||``, and summing squares
    over the groups gives Lipschitz constant 1. Over the batch axis (or all axes) it would
    mix examples: refused."""
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    ndim = len(ctx.shape(node.args[0])) + 1
    if dim is None or not dims or any(not isinstance(d, int) or d % ndim == 0 for d in dims):
        raise UnsupportedOperationError(
            f"node {node.name!r}: a maximum / minimum over the batch dimension (or all "
            "dimensions) mixes the examples of a batch"
        )
    return _first(ctx, node)


@register_function(torch.amax, torch.amin)
@register_method("amax", "amin")
def amax(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(ctx, node, ["input", "dim", "keepdim"], {"dim": (), "keepdim": False})
    return _group_max(ctx, node, a["dim"])


@register_function(torch.max, torch.min)
@register_method("max", "min")
def max_or_min(ctx: WalkContext, node: Node) -> torch.Tensor:
    """``torch.max(x, dim)`` (values and indices: selecting the indices is refused by
    ``getitem``), ``torch.max(x, other)`` (entrywise: ``_max_like``); ``torch.max(x)`` reduces
    over the batch: refused."""
    second = (
        node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("other"))
    )
    if isinstance(second, Node):
        return _max_like(ctx, node, [node.args[0], second])
    return _group_max(ctx, node, second)
