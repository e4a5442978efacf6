"""Activations (paper Table 2): each rule's constant is max |f'|, derived in its docstring."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ..registry import register_function, register_method, register_module
from ._common import _args, _first, _scaled

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext


# --- activations (paper Table 2) ------------------------------------------------------------
register_module(nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Softsign, nn.CELU, nn.Softplus)(
    _scaled(1.0, "activation")
)
register_function(
    F.relu, torch.relu, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.softsign, F.celu, F.softplus
)(_scaled(1.0, "activation"))
register_method("relu", "tanh")(_scaled(1.0, "activation"))

register_module(nn.Sigmoid)(_scaled(0.25, "sigmoid"))
register_function(torch.sigmoid, F.sigmoid)(_scaled(0.25, "sigmoid"))
register_method("sigmoid")(_scaled(0.25, "sigmoid"))
register_module(nn.Hardsigmoid)(_scaled(1.0 / 6.0, "hardsigmoid"))
register_module(nn.Hardswish)(_scaled(1.5, "hardswish"))

#: max |d/dx x Phi(x)| = Phi(sqrt 2) + sqrt 2 phi(sqrt 2), attained at x = sqrt 2.
GELU_LIPSCHITZ = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1) / math.sqrt(2 * math.pi)
#: Tanh-approximate GELU: grid maximum of |f'| on [-10, 10] (step 1e-5, |f''| <= 1 elsewhere
#: bounded), plus 1e-4 for the grid; beyond +-10 |f'| is within 1e-20 of 0 or 1.
GELU_TANH_LIPSCHITZ = 1.1297
#: max of d/dx x sigmoid(x) is 1.0998 (at x ~ 2.3994); rounded up.
SILU_LIPSCHITZ = 1.1


def _gelu_factor(approximate: str) -> float:
    return GELU_TANH_LIPSCHITZ if approximate == "tanh" else GELU_LIPSCHITZ * (1 + 1e-12)


@register_module(nn.GELU)
def gelu_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    f = _gelu_factor(ctx.module(node).approximate)
    ctx.record(node, "gelu", f)
    return _first(ctx, node) * f


@register_function(F.gelu)
def gelu_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    f = _gelu_factor(
        _args(ctx, node, ["input", "approximate"], {"approximate": "none"})["approximate"]
    )
    ctx.record(node, "gelu", f)
    return _first(ctx, node) * f


register_module(nn.SiLU)(_scaled(SILU_LIPSCHITZ, "silu"))
register_function(F.silu)(_scaled(SILU_LIPSCHITZ, "silu"))


@register_module(nn.LeakyReLU)
def leaky_relu_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    f = max(1.0, abs(ctx.module(node).negative_slope))
    return _first(ctx, node) * f


@register_function(F.leaky_relu)
def leaky_relu_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    slope = _args(ctx, node, ["input", "negative_slope", "inplace"], {"negative_slope": 0.01})[
        "negative_slope"
    ]
    return _first(ctx, node) * max(1.0, abs(float(slope)))


@register_module(nn.ELU)
def elu_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    """ELU: slope 1 for x > 0 and alpha e^x <= |alpha| for x < 0."""
    return _first(ctx, node) * max(1.0, abs(ctx.module(node).alpha))


@register_function(F.elu)
def elu_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    alpha = _args(ctx, node, ["input", "alpha", "inplace"], {"alpha": 1.0})["alpha"]
    return _first(ctx, node) * max(1.0, abs(float(alpha)))


@register_module(nn.PReLU)
def prelu(ctx: WalkContext, node: Node) -> torch.Tensor:
    slope = ctx.tensor(ctx.module(node).weight).abs().max()
    return _first(ctx, node) * torch.clamp(slope, min=1.0)


def _register_layers() -> None:
    """MaxMin / GroupSort (Anil et al. 2019): piecewise permutations, 1-Lipschitz."""
    from ...layers import LEAF_MODULES

    register_module(*LEAF_MODULES)(_scaled(1.0, "activation"))


_register_layers()
