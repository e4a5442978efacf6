"""Identities and shape changes: isometries or selections, 1-Lipschitz (paper §5)."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...errors import UnsupportedOperationError
from ..registry import register_function, register_method, register_module
from ._common import _args, _first, identity

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
    "view",
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
        if not ctx.owner._float_output[node.name]:
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
