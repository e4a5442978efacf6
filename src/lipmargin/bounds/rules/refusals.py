"""Operations that are not globally Lipschitz: refused with an explanation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...errors import UnsupportedOperationError
from ..registry import register_function, register_module

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext


# --- not globally Lipschitz: refused with an explanation ----------------------------------
def _not_lipschitz(ctx: WalkContext, node: Node) -> torch.Tensor:
    target = ctx.module(node) if node.op == "call_module" else node.target
    name = (
        type(target).__name__ if node.op == "call_module" else getattr(target, "__name__", target)
    )
    if "softmax" in str(name).lower():
        raise UnsupportedOperationError(
            f"graph node {node.name!r} ({name}): certificates are computed on the logits, and a "
            "softmax turns them into probabilities (same argmax, other margins); remove the "
            "final softmax / log_softmax from the model you certify"
        )
    raise UnsupportedOperationError(
        f"graph node {node.name!r} ({name}) is not globally Lipschitz (it divides by a "
        "statistic of its input or multiplies activations), so no certificate can cover it."
    )


register_module(
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
    nn.MultiheadAttention,
    nn.Softmax,
    nn.LogSoftmax,
)(_not_lipschitz)
register_function(F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax)(
    _not_lipschitz
)
