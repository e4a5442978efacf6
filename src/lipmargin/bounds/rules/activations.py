"""Activations (paper Table 2): each rule's constant is max |f'|, derived in its docstring."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...errors import UnsupportedOperationError
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
#: Hardsigmoid ``clamp(x / 6 + 1/2, 0, 1)`` has slope 1/6, but ATen's backward multiplies by the
#: float32 constant ``1.0f / 6.0f`` = 0.16666667163... > 1/6 even for float64 tensors (found by
#: the hypothesis soundness test: gradients exceeded an exact 1/6 bound by 1.2e-7 after four
#: layers). The rule covers both the exact slope and that reported one.
HARDSIGMOID_LIPSCHITZ = float(torch.tensor(1.0 / 6.0, dtype=torch.float32)) * (1 + 1e-7)
register_module(nn.Hardsigmoid)(_scaled(HARDSIGMOID_LIPSCHITZ, "hardsigmoid"))
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


# --- issue 14: more activations and the functional twins of supported modules ---------------
#: Mish ``x tanh(softplus(x))``: max |f'| is 1.08850 (at x ~ 1.49). Derivation: with
#: ``s = softplus(x)``, ``t = tanh(s)``, ``sigma = sigmoid(x)``: ``f' = t + x (1 - t^2) sigma``
#: and ``f'' = 2 (1 - t^2) sigma + x (1 - t^2) sigma (1 - sigma - 2 t sigma)``. Since
#: ``1 - t^2 = sech^2 s <= 4 e^{-2s} <= 4 e^{-2x}`` (s >= x), ``|x| (1 - t^2) <= 2/e`` for
#: x > 0, and ``|x| sigma <= |x| e^x <= 1/e`` for x < 0; so ``|f''| <= 2 + 3 * 2/e < 4``.
#: The float64 grid maximum of |f'| on [-20, 20] (step 1e-5) is 1.0884982; between grid points
#: |f'| grows by at most 4 * 1e-5 / 2 = 2e-5. Beyond: ``f' <= 1 + 4 x e^{-2x} < 1 + 1e-15`` for
#: x >= 20 and ``|f'| <= tanh(e^x) + |x| e^x < 1e-7`` for x <= -20. Rounded up: 1.0886.
MISH_LIPSCHITZ = 1.0886
#: SELU ``scale * (max(0, x) + min(0, alpha (e^x - 1)))``: slope ``scale`` for x > 0 and
#: ``scale * alpha * e^x < scale * alpha`` for x < 0 (the supremum, approached at 0-).
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_LIPSCHITZ = SELU_SCALE * SELU_ALPHA * (1 + 1e-12)

register_module(nn.Mish)(_scaled(MISH_LIPSCHITZ, "mish"))
register_function(F.mish)(_scaled(MISH_LIPSCHITZ, "mish"))
register_module(nn.SELU)(_scaled(SELU_LIPSCHITZ, "selu"))
register_function(F.selu, torch.selu)(_scaled(SELU_LIPSCHITZ, "selu"))
# Functional twins of supported modules (same constants as the modules above).
register_function(F.hardsigmoid)(_scaled(HARDSIGMOID_LIPSCHITZ, "hardsigmoid"))
register_function(F.hardswish)(_scaled(1.5, "hardswish"))
# log sigmoid: derivative 1 - sigmoid(x) in (0, 1). tanhshrink x - tanh x: derivative
# tanh^2 x in [0, 1). softshrink: continuous, piecewise linear with slopes 0 and 1.
register_module(nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink)(_scaled(1.0, "activation"))
register_function(F.logsigmoid, F.tanhshrink, F.softshrink)(_scaled(1.0, "activation"))


def _softplus(node: Node, beta: float, threshold: float) -> float:
    """(Replaces the plain 1-Lipschitz registration above, which ignored ``threshold``.)
    Softplus ``log(1 + e^{beta x}) / beta``, replaced by ``x`` where ``beta x > threshold``:
    slope ``sigmoid(beta x)`` in (0, 1), but a JUMP of ``log1p(e^{-threshold}) / |beta|`` at
    the threshold, so it is not Lipschitz. The jump is accepted only for ``threshold >= 20``
    (torch's default): there it is ``<= 2.1e-9 / |beta|``, below float32 resolution of the
    value ``20 / |beta|`` at the jump (relative 1e-10, a float32 ulp is 6e-8), so the computed
    function has no jump."""
    if float(threshold) < 20.0 or float(beta) == 0.0:
        jump = math.log1p(math.exp(-float(threshold))) / abs(float(beta) or float("nan"))
        raise UnsupportedOperationError(
            f"node {node.name!r}: softplus with threshold={threshold} (beta={beta}) jumps by "
            f"{jump:.3g} where beta*x crosses the threshold: not Lipschitz (use threshold >= 20)"
        )
    return 1.0


@register_module(nn.Softplus)
def softplus_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    return _first(ctx, node) * _softplus(node, m.beta, m.threshold)


@register_function(F.softplus)
def softplus_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(ctx, node, ["input", "beta", "threshold"], {"beta": 1.0, "threshold": 20.0})
    return _first(ctx, node) * _softplus(node, a["beta"], a["threshold"])


def _jump(node: Node, what: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"node {node.name!r}: {what} jumps (is discontinuous), so it is not Lipschitz and no "
        "certificate can cover it"
    )


@register_module(nn.Hardshrink)
def hardshrink_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Hardshrink keeps x where |x| > lambda and is 0 elsewhere: a jump of lambda at +-lambda
    (refused unless lambda = 0, the identity)."""
    if float(ctx.module(node).lambd) != 0.0:
        raise _jump(node, "hardshrink")
    return _first(ctx, node)


@register_function(F.hardshrink)
def hardshrink_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    if float(_args(ctx, node, ["input", "lambd"], {"lambd": 0.5})["lambd"]) != 0.0:
        raise _jump(node, "hardshrink")
    return _first(ctx, node)


def _threshold(node: Node, threshold: float, value: float) -> float:
    """``x if x > threshold else value``: continuous (1-Lipschitz, slopes 0 and 1) only when
    ``value == threshold``; otherwise a jump, refused."""
    if float(threshold) != float(value):
        raise _jump(node, f"threshold (threshold={threshold}, value={value})")
    return 1.0


@register_module(nn.Threshold)
def threshold_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    return _first(ctx, node) * _threshold(node, m.threshold, m.value)


@register_function(F.threshold)
def threshold_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(ctx, node, ["input", "threshold", "value", "inplace"], {})
    return _first(ctx, node) * _threshold(node, a["threshold"], a["value"])


@register_function(F.prelu)
def prelu_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    """``F.prelu(x, w)`` with a constant weight: slopes 1 and w_c, factor max(1, max |w|)."""
    a = _args(ctx, node, ["input", "weight"], {})
    if ctx.L(a["weight"]) is not None:
        raise UnsupportedOperationError(f"node {node.name!r}: PReLU weight depends on the input")
    slope = ctx.tensor(ctx.value(a["weight"])).abs().max()
    return ctx.L(a["input"]) * torch.clamp(slope, min=1.0)


def _rrelu(node: Node, lower: float, upper: float, training: bool) -> float:
    """RReLU in evaluation mode is a leaky ReLU of slope (lower + upper) / 2; in training mode it
    draws random slopes (refused)."""
    if training:
        raise UnsupportedOperationError(
            f"node {node.name!r}: rrelu with training=True draws random slopes"
        )
    return max(1.0, abs((float(lower) + float(upper)) / 2))


@register_module(nn.RReLU)
def rrelu_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    """The evaluation-mode function (what certificates cover), also while training."""
    m = ctx.module(node)
    return _first(ctx, node) * _rrelu(node, m.lower, m.upper, False)


@register_function(F.rrelu)
def rrelu_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(
        ctx,
        node,
        ["input", "lower", "upper", "training", "inplace"],
        {"lower": 1.0 / 8, "upper": 1.0 / 3, "training": False},
    )
    return _first(ctx, node) * _rrelu(node, a["lower"], a["upper"], a["training"])


def _celu(node: Node, alpha: float) -> float:
    """(Replaces the plain 1-Lipschitz registration above, which ignored ``alpha``.)
    CELU ``max(0, x) + min(0, alpha (e^{x/alpha} - 1))``: slope 1 for x > 0 and ``e^{x/alpha}``
    for x < 0, at most 1 when alpha > 0. For alpha < 0 that slope grows without bound as
    x -> -inf (e.g. alpha = -1: f(-10) = -22025), so it is refused."""
    if float(alpha) <= 0.0:
        raise UnsupportedOperationError(
            f"node {node.name!r}: CELU with alpha={alpha} <= 0 has slope e^(x/alpha), unbounded "
            "as x -> -inf: not Lipschitz"
        )
    return 1.0


@register_module(nn.CELU)
def celu_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    return _first(ctx, node) * _celu(node, ctx.module(node).alpha)


@register_function(F.celu, torch.celu)
def celu_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(ctx, node, ["input", "alpha", "inplace"], {"alpha": 1.0})
    return _first(ctx, node) * _celu(node, a["alpha"])


register_function(torch.prelu)(prelu_function)
register_function(torch.rrelu)(rrelu_function)
register_function(torch.threshold)(threshold_function)
register_function(torch.hardshrink)(hardshrink_function)
# In-place method forms (``x.relu_()``): the same functions; the walk refuses an in-place write
# to a tensor that another node still reads.
register_method("relu_", "tanh_")(_scaled(1.0, "activation"))
register_method("sigmoid_")(_scaled(0.25, "sigmoid"))
