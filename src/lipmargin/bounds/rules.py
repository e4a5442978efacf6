"""The built-in Lipschitz rules (paper §5 and Table 2; shared reference notes §2).

Each rule returns the Lipschitz bound of the input -> node map from its arguments' bounds.
Linear maps (dense, convolution, convolution + BatchNorm) go through ``ctx.linear``, which
runs power iteration while training and returns a guaranteed bound when certifying.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ..errors import UnsupportedOperationError
from . import norms
from .graph import WalkContext
from .registry import register_function, register_method, register_module

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: numpy-style keyword spellings torch accepts (``x.mean(axis=1)``, ``keepdims=True``)
_KEYWORD_ALIASES = {"axis": "dim", "keepdims": "keepdim"}


def _args(
    ctx: WalkContext, node: Node, names: Sequence[str], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Positional and keyword arguments of a call node, by parameter name. Arguments computed
    from constants (e.g. ``x.shape[2:]``) are replaced by their values; an unexpected extra
    positional argument is refused rather than ignored."""
    if len(node.args) > len(names):
        raise UnsupportedOperationError(
            f"node {node.name!r}: {len(node.args)} positional arguments, the rule knows {names}"
        )
    out = dict(defaults)
    for name, value in zip(names, node.args, strict=False):
        out[name] = value
    for key, value in node.kwargs.items():
        key = _KEYWORD_ALIASES.get(key, key)
        if key not in names and key not in defaults:
            # An argument the rule does not read could change what the node computes (e.g. a
            # reduction's ``axis``): refuse rather than guess.
            raise UnsupportedOperationError(
                f"node {node.name!r}: keyword argument {key!r} has no rule (known: {names})"
            )
        out[key] = value

    def resolve(a: Node) -> Any:
        return a if ctx.L(a) is not None else ctx.value(a)

    return {k: torch.fx.node.map_arg(v, resolve) for k, v in out.items()}


def _first(ctx: WalkContext, node: Node) -> torch.Tensor:
    bound = ctx.L(node.args[0] if node.args else next(iter(node.kwargs.values())))
    if bound is None:  # pragma: no cover - constant nodes never reach a rule
        raise UnsupportedOperationError(f"node {node.name!r}: input is constant")
    return bound


def _scaled(factor: float, kind: str):
    def rule(ctx: WalkContext, node: Node) -> torch.Tensor:
        if factor == 1.0:
            return _first(ctx, node)
        ctx.record(node, kind, factor)
        return _first(ctx, node) * factor

    return rule


def _cached(ctx: WalkContext, node: Node, compute) -> float:
    cache = ctx.owner.__dict__.setdefault("_factor_cache", {})
    if node.name not in cache:
        cache[node.name] = float(compute())
    return cache[node.name]


# --- identities and shape changes: 1-Lipschitz (isometries or selections) ------------------
identity = _scaled(1.0, "identity")
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
    try:
        from ..layers import LEAF_MODULES
    except ImportError:  # pragma: no cover
        return
    register_module(*LEAF_MODULES)(_scaled(1.0, "activation"))


_register_layers()


# --- not globally Lipschitz: refused with an explanation ----------------------------------
def _not_lipschitz(ctx: WalkContext, node: Node) -> torch.Tensor:
    target = ctx.module(node) if node.op == "call_module" else node.target
    name = (
        type(target).__name__ if node.op == "call_module" else getattr(target, "__name__", target)
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


# --- arithmetic: addition adds, constants scale -------------------------------------------
def _copies(ctx: WalkContext, node: Node, arg: Any) -> float:
    """sqrt of how many times broadcasting repeats each entry of ``arg`` in ``node``'s output
    (broadcasting copies every entry equally often)."""
    if not isinstance(arg, Node):
        return 1.0
    n_in, n_out = math.prod(ctx.shape(arg)), math.prod(ctx.shape(node))
    return math.sqrt(n_out / n_in) if n_out > n_in else 1.0


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
            "Lipschitz, no certificate can cover it."
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
        return bound * math.sqrt(len(ctx.shape(tensors)))
    bounds = ctx.L_all(tensors)
    return torch.sqrt(sum(b * b for b in bounds))


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
    f = 1.0 / math.sqrt(_reduced_count(ctx, node))
    ctx.record(node, "mean", f)
    return _first(ctx, node) * f


@register_function(torch.sum)
@register_method("sum")
def total(ctx: WalkContext, node: Node) -> torch.Tensor:
    """Sum of n entries: factor sqrt(n) (Cauchy-Schwarz)."""
    f = math.sqrt(_reduced_count(ctx, node))
    ctx.record(node, "sum", f)
    return _first(ctx, node) * f


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


def _max_pool(ctx: WalkContext, node: Node, params: dict[str, Any]) -> torch.Tensor:
    out = ctx.shape(node)
    if isinstance(out, tuple) and out and isinstance(out[0], tuple):
        out = out[0]  # return_indices=True
    nsp = len(out) - 1
    k = _tuple(params["kernel_size"], nsp)
    s = _tuple(params["stride"] or params["kernel_size"], nsp)
    d = _tuple(params.get("dilation", 1), nsp)
    n = max_pool_windows(k, s, d, out[1:])
    f = math.sqrt(n)
    ctx.record(node, "max_pool", f)
    return _first(ctx, node) * f


@register_module(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def max_pool_module(ctx: WalkContext, node: Node) -> torch.Tensor:
    m = ctx.module(node)
    return _max_pool(
        ctx, node, {"kernel_size": m.kernel_size, "stride": m.stride, "dilation": m.dilation}
    )


@register_function(F.max_pool1d, F.max_pool2d, F.max_pool3d)
def max_pool_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    return _max_pool(ctx, node, _args(ctx, node, names, {"stride": None, "dilation": 1}))


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
    f = math.sqrt(math.prod(adaptive_windows(h, o) for h, o in zip(inp[1:], out[1:], strict=True)))
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
        closed = norms.conv_closed_form_bound(
            weight, params["stride"], params["dilation"], params["groups"]
        )
        if ctx.owner.conv_method == "closed_form":
            return closed
        fft = norms.conv_fft_bound(weight, input_shape[1:], **params)
        return torch.minimum(fft, closed)

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

    return ctx.linear(key_node, kind, apply, input_shape, guaranteed, adjoint, weight, weight_grad)


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


@register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
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
    training). Applied to the last axis of any leading shape, its norm is the same."""
    w = ctx.tensor(ctx.module(node).weight)
    return _first(ctx, node) * ctx.linear(
        node,
        "linear",
        lambda u: F.linear(u, w),
        ctx.in_shape(node),
        lambda: norms.spectral_norm_exact(w),
        lambda v: v @ w,
        w,
        _linear_weight_grad,
    )


def _linear_weight_grad(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Gradient of ``<v, W u>`` w.r.t. ``W`` for inputs with any leading shape."""
    return v.reshape(-1, v.shape[-1]).T @ u.reshape(-1, u.shape[-1])


@register_function(F.linear)
def linear_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    a = _args(ctx, node, ["input", "weight", "bias"], {})
    if ctx.L(a["weight"]) is not None:
        raise UnsupportedOperationError(f"node {node.name!r}: weight depends on the input")
    w = ctx.tensor(ctx.value(a["weight"]))
    return ctx.L(a["input"]) * ctx.linear(
        node,
        "linear",
        lambda u: F.linear(u, w),
        ctx.shape(a["input"]),
        lambda: norms.spectral_norm_exact(w),
    )


@register_function(F.conv1d, F.conv2d, F.conv3d)
def conv_function(ctx: WalkContext, node: Node) -> torch.Tensor:
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    a = _args(ctx, node, names, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    if ctx.L(a["weight"]) is not None:
        raise UnsupportedOperationError(f"node {node.name!r}: weight depends on the input")
    w = ctx.tensor(ctx.value(a["weight"]))
    params = {k: a[k] for k in ("stride", "padding", "dilation", "groups")}
    shape = ctx.shape(a["input"])
    return ctx.L(a["input"]) * _conv_norm(ctx, node, f"conv{w.dim() - 2}d", w, params, shape)
