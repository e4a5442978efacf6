"""Property-based soundness of ``LipschitzBound.certified()`` on random composed networks.

Hypothesis draws small float64 networks built from every supported rule (README "Supported
operations"): convolutions (any kernel / stride / padding / dilation / groups), conv + BatchNorm
fusions, BatchNorm alone, every listed activation (module and functional forms), max / average /
adaptive pooling, residual ``x + f(x)`` / ``x - f(x)``, concatenation, constant scaling and
shifting (Python floats and per-channel tensors, including broadcasting that copies entries),
reductions, padding, slicing, transposition, flattening, then one or two ``nn.Linear`` (plus,
sometimes, an operation after the last one, so that only ``.value`` exists); some networks
have no dense stage at all (their output is the flattened feature map), so that a single
convolution, pooling or normalisation is bounded alone, where its bound is nearly tight.

For every network and a few random points, the exact float64 Jacobian ``J`` must satisfy
``||J||_2 <= value`` and ``||J_t - J_i||_2 <= pairwise[t, i]``: a certified bound can never be
below a local Lipschitz constant. A refusal (``UnsupportedOperationError``) of any of these
supported operations fails the test as well.

Reproducing a failure: hypothesis prints the drawn ``NetSpec`` (structure and the torch seed of
all weights); ``build(spec)`` rebuilds the same float64 network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lipmargin.bounds import LipschitzBound
from lipmargin.layers import GroupSort, MaxMin

F64 = torch.float64
REL = 1e-7
#: largest number of entries of an intermediate tensor (keeps every example cheap)
MAX_NUMEL = 512
MAX_CHANNELS = 8
#: largest number of outputs of a network without a dense stage
MAX_OUTPUTS = 48


# --------------------------------------------------------------------------- the network spec


@dataclass
class NetSpec:
    """Structure of a network: input shape, torch seed of every weight, the blocks in order."""

    input_shape: tuple[int, ...]
    seed: int
    blocks: list[dict[str, Any]] = field(default_factory=list)
    ends_with_linear: bool = True


# --------------------------------------------------------------------------- building blocks


class Seq(nn.Module):
    """A plain container whose forward the tracer inlines (unlike ``nn.Sequential``'s type, it
    is not a torch.nn leaf, so every block is traced through)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Fn(nn.Module):
    """A functional activation ``name`` with constant keyword arguments."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__()
        self.name = name
        self.kw = kw

    def forward(self, x):
        n, kw = self.name, self.kw
        if n == "relu":
            return F.relu(x)
        if n == "torch.relu":
            return torch.relu(x)
        if n == ".relu":
            return x.relu()
        if n == "relu6":
            return F.relu6(x)
        if n == "leaky_relu":
            return F.leaky_relu(x, kw["negative_slope"])
        if n == "elu":
            return F.elu(x, kw["alpha"])
        if n == "celu":
            return F.celu(x, kw["alpha"])
        if n == "tanh":
            return torch.tanh(x)
        if n == ".tanh":
            return x.tanh()
        if n == "hardtanh":
            return F.hardtanh(x, kw["min_val"], kw["max_val"])
        if n == "softplus":
            return F.softplus(x, kw["beta"], kw["threshold"])
        if n == "softsign":
            return F.softsign(x)
        if n == "gelu":
            return F.gelu(x, approximate=kw["approximate"])
        if n == "silu":
            return F.silu(x)
        if n == "sigmoid":
            return torch.sigmoid(x)
        if n == ".sigmoid":
            return x.sigmoid()
        raise AssertionError(n)

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.kw}"


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return self.bn(self.conv(x))


class Branch(nn.Module):
    """``a(x)``, or ``b(act(a(x)))``."""

    def __init__(self, a: nn.Module, act: nn.Module | None, b: nn.Module | None) -> None:
        super().__init__()
        self.a, self.act, self.b = a, act, b

    def forward(self, x):
        h = self.a(x)
        if self.act is not None:
            h = self.b(self.act(h))
        return h


class Residual(nn.Module):
    def __init__(self, branch: nn.Module, op: str, alpha: float) -> None:
        super().__init__()
        self.branch, self.op, self.alpha = branch, op, alpha

    def forward(self, x):
        if self.op == "add":
            return x + self.branch(x)
        if self.op == "sub":
            return x - self.branch(x)
        if self.op == "rsub":
            return self.branch(x) - x
        return torch.add(x, self.branch(x), alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"op={self.op!r}, alpha={self.alpha}"


class Cat(nn.Module):
    """``cat([f(x), g(x)], dim)``; ``g`` None means ``x`` itself."""

    def __init__(self, f: nn.Module, g: nn.Module | None, dim: int, fn: str) -> None:
        super().__init__()
        self.f, self.g, self.dim, self.fn = f, g, dim, fn

    def forward(self, x):
        other = x if self.g is None else self.g(x)
        if self.fn == "concat":
            return torch.concat([self.f(x), other], dim=self.dim)
        return torch.cat([self.f(x), other], self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, fn={self.fn!r}"


class Const(nn.Module):
    """``x * c``, ``c * x``, ``x / c``, ``x + c`` or ``x - c`` with a float or a tensor ``c``."""

    def __init__(self, op: str, value: float | torch.Tensor) -> None:
        super().__init__()
        self.op = op
        if isinstance(value, torch.Tensor):
            self.register_buffer("c", value)
            self.f = None
        else:
            self.c = None
            self.f = value

    def forward(self, x):
        c = self.c if self.c is not None else self.f
        if self.op == "mul":
            return x * c
        if self.op == "rmul":
            return c * x
        if self.op == "torch.mul":
            return torch.mul(x, c)
        if self.op == "div":
            return x / c
        if self.op == "torch.div":
            return torch.div(x, c)
        if self.op == "add":
            return x + c
        return x - c

    def extra_repr(self) -> str:
        c = self.f if self.c is None else f"tensor{tuple(self.c.shape)}"
        return f"op={self.op!r}, c={c}"


class ExpandMul(nn.Module):
    """``x.mean(1, keepdim=True) * c`` with ``c`` of shape ``(C', 1, 1)``: broadcasting copies
    every entry C' times."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("c", value)

    def forward(self, x):
        return x.mean(1, keepdim=True) * self.c


class Center(nn.Module):
    """``x - x.mean(dim, keepdim=True)``: a sum of two input-dependent terms with broadcasting."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x - x.mean(self.dim, keepdim=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Reduce(nn.Module):
    def __init__(self, op: str, dim: Any, keepdim: bool, style: str) -> None:
        super().__init__()
        self.op, self.dim, self.keepdim, self.style = op, dim, keepdim, style

    def forward(self, x):
        if self.style == "method":
            return getattr(x, self.op)(self.dim, keepdim=self.keepdim)
        fn = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax, "amin": torch.amin}
        return fn[self.op](x, dim=self.dim, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"{self.op}, dim={self.dim}, keepdim={self.keepdim}, style={self.style!r}"


class Pad(nn.Module):
    def __init__(self, pads: tuple[int, ...], value: float) -> None:
        super().__init__()
        self.pads, self.value = pads, value

    def forward(self, x):
        return F.pad(x, self.pads, value=self.value)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, value={self.value}"


class Slice(nn.Module):
    def __init__(self, c0: int, h0: int, w1: int | None) -> None:
        super().__init__()
        self.c0, self.h0, self.w1 = c0, h0, w1

    def forward(self, x):
        return x[:, self.c0 :, self.h0 :, : self.w1]

    def extra_repr(self) -> str:
        return f"[:, {self.c0}:, {self.h0}:, :{self.w1}]"


class Transpose(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def forward(self, x):
        if self.style == "transpose":
            return x.transpose(2, 3)
        if self.style == "torch.transpose":
            return torch.transpose(x, 2, 3)
        if self.style == "rot90":  # session 7: permutations of entries
            return torch.rot90(x, 1, (2, 3))
        if self.style == "flip":
            return torch.flip(x, (1, 3))
        if self.style == "roll":
            return x.roll((1, -2), (2, 3))
        if self.style == "maximum":  # entrywise maximum of two maps of the input
            return torch.maximum(x, x.flip(-1))
        return x.permute(0, 1, 3, 2)

    def extra_repr(self) -> str:
        return self.style


class Flat(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def forward(self, x):
        s = self.style
        if s == "torch.flatten":
            return torch.flatten(x, 1)
        if s == "view":
            return x.contiguous().view(x.size(0), -1)  # after a transpose
        if s == "reshape":
            return x.reshape(x.shape[0], -1)
        if s == "method":
            return x.flatten(1)
        if s == "mean23":
            return x.mean(dim=(2, 3))
        if s == "sum23":
            return torch.sum(x, dim=(2, 3))
        if s == "mean-1":
            return x.mean(-1).flatten(1)
        raise AssertionError(s)

    def extra_repr(self) -> str:
        return self.style


# --------------------------------------------------------------------------- block factories


def _signed(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    """Random values with magnitudes in [lo, hi] and random signs (global torch RNG)."""
    mag = lo + (hi - lo) * torch.rand(shape)
    return torch.where(torch.rand(shape) < 0.5, -mag, mag)


def randomise_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    c = bn.num_features
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(_signed((c,), 0.1, 2.0))  # negative gammas included
            bn.bias.copy_(torch.randn(c))
        bn.running_mean.copy_(torch.randn(c))
        bn.running_var.copy_(0.05 + 2.0 * torch.rand(c))


def make_activation(p: dict[str, Any], channels: int) -> nn.Module:
    name, fn = p["name"], p.get("functional")
    if fn:
        kw = {k: p[k] for k in ("negative_slope", "alpha", "min_val", "max_val", "beta") if k in p}
        if "threshold" in p:
            kw["threshold"] = p["threshold"]
        if name == "gelu":
            kw["approximate"] = p["approximate"]
        return Fn(fn if fn.startswith((".", "torch.")) else name, **kw)
    if name == "relu":
        return nn.ReLU()
    if name == "relu6":
        return nn.ReLU6()
    if name == "leaky_relu":
        return nn.LeakyReLU(p["negative_slope"])
    if name == "prelu":
        m = nn.PReLU(channels if p["per_channel"] else 1)
        with torch.no_grad():
            m.weight.copy_(_signed(m.weight.shape, 0.0, 2.5))
        return m
    if name == "elu":
        return nn.ELU(p["alpha"])
    if name == "celu":
        return nn.CELU(p["alpha"])
    if name == "tanh":
        return nn.Tanh()
    if name == "hardtanh":
        return nn.Hardtanh(p["min_val"], p["max_val"])
    if name == "softplus":
        return nn.Softplus(p["beta"], p["threshold"])
    if name == "softsign":
        return nn.Softsign()
    if name == "gelu":
        return nn.GELU(approximate=p["approximate"])
    if name == "silu":
        return nn.SiLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "hardsigmoid":
        return nn.Hardsigmoid()
    if name == "hardswish":
        return nn.Hardswish()
    if name == "maxmin":
        return MaxMin()
    if name == "groupsort":
        return GroupSort(p["group_size"])
    raise AssertionError(name)


def make_conv(p: dict[str, Any], c_in: int) -> nn.Module:
    return nn.Conv2d(
        c_in,
        p["c_out"],
        p["k"],
        stride=p["stride"],
        padding=p["padding"],
        dilation=p["dilation"],
        groups=p["groups"],
        bias=p["bias"],
    )


def make_bn2d(c: int, affine: bool) -> nn.Module:
    bn = nn.BatchNorm2d(c, affine=affine)
    randomise_bn(bn)
    return bn


def make_block(p: dict[str, Any], shape: tuple[int, ...]) -> nn.Module:
    """The module of block spec ``p`` applied to inputs of ``shape`` (weights from the global
    torch RNG)."""
    kind, c = p["kind"], shape[0]
    if kind == "act":
        return make_activation(p, c)
    if kind == "conv":
        return make_conv(p, c)
    if kind == "convbn":
        return ConvBN(make_conv(p, c), make_bn2d(p["c_out"], p["affine"]))
    if kind == "bn":
        return make_bn2d(c, p["affine"])
    if kind == "bn1d":
        bn = nn.BatchNorm1d(c, affine=p["affine"])
        randomise_bn(bn)
        return bn
    if kind == "maxpool":
        return nn.MaxPool2d(
            p["k"], p["stride"], p["padding"], p["dilation"], ceil_mode=p["ceil_mode"]
        )
    if kind == "fmaxpool":
        return _FnPool("max", p)
    if kind == "avgpool":
        return nn.AvgPool2d(
            p["k"],
            p["stride"],
            p["padding"],
            ceil_mode=p["ceil_mode"],
            count_include_pad=p["count_include_pad"],
            divisor_override=p["divisor_override"],
        )
    if kind == "favgpool":
        return _FnPool("avg", p)
    if kind == "adaptive_avg":
        if p["functional"]:
            return _FnPool("adaptive_avg", p)
        return nn.AdaptiveAvgPool2d(p["out"])
    if kind == "adaptive_max":
        return nn.AdaptiveMaxPool2d(p["out"])
    if kind == "residual":
        b = p["branch"]
        conv_p = {**b, "c_out": c, "stride": 1, "bias": b["bias"]}
        a = make_conv(conv_p, c)
        if b["bn"]:
            a = ConvBN(a, make_bn2d(c, True))
        act = second = None
        if b["act"] is not None:
            act = make_activation(b["act"], c)
            second = make_conv(conv_p, c)
        return Residual(Branch(a, act, second), p["op"], p["alpha"])
    if kind == "cat":
        f = make_conv({**p["conv"], "c_out": p["c1"], "groups": 1}, c)
        g = None if p["c2"] is None else make_conv({**p["conv"], "c_out": p["c2"], "groups": 1}, c)
        return Cat(f, g, p["dim"], p["fn"])
    if kind == "cat_act":
        return Cat(make_activation(p["act"], c), None, p["dim"], p["fn"])
    if kind == "const":
        if p["tensor"] is None:
            return Const(p["op"], p["value"])
        shape_c = (c, 1, 1) if p["tensor"] == "channel" else tuple(shape)
        lo = 0.3 if p["op"] in ("div", "torch.div") else 0.0
        return Const(p["op"], _signed(shape_c, lo, 2.5))
    if kind == "expand":
        return ExpandMul(_signed((p["c_out"], 1, 1), 0.0, 2.0))
    if kind == "center":
        return Center(p["dim"])
    if kind == "reduce":
        return Reduce(p["op"], p["dim"], True, p["style"])
    if kind == "pad":
        return Pad(p["pads"], p["value"])
    if kind == "slice":
        return Slice(p["c0"], p["h0"], p["w1"])
    if kind == "transpose":
        return Transpose(p["style"])
    if kind == "dropout":
        return nn.Dropout2d(0.5) if len(shape) == 3 else nn.Dropout(0.5)
    if kind == "flatten":
        return nn.Flatten() if p["style"] == "nn.Flatten" else Flat(p["style"])
    if kind == "linear":
        return nn.Linear(c, p["out"], bias=p["bias"])
    raise AssertionError(kind)


class _FnPool(nn.Module):
    """Functional pooling (``F.max_pool2d`` / ``F.avg_pool2d`` / ``F.adaptive_avg_pool2d``)."""

    def __init__(self, which: str, p: dict[str, Any]) -> None:
        super().__init__()
        self.which = which
        self.p = {k: v for k, v in p.items() if k not in ("kind", "functional")}

    def forward(self, x):
        p = self.p
        if self.which == "max":
            return F.max_pool2d(x, p["k"], p["stride"], p["padding"], p["dilation"])
        if self.which == "avg":
            return F.avg_pool2d(x, p["k"], p["stride"], p["padding"])
        return F.adaptive_avg_pool2d(x, p["out"])

    def extra_repr(self) -> str:
        return f"{self.which}, {self.p}"


def out_shape(p: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of block ``p``; ``()`` when some output is not finite (e.g. a dilated
    max-pooling window that lies entirely in the padding gives -inf)."""
    with torch.random.fork_rng(), torch.no_grad():
        m = make_block(p, shape).double().eval()
        y = m(torch.randn((1, *shape), dtype=F64))
        return tuple(y.shape[1:]) if torch.isfinite(y).all() else ()


def build(spec: NetSpec) -> nn.Module:
    """The float64 evaluation-mode network of ``spec``; the same spec gives the same weights."""
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        shape = spec.input_shape
        blocks = []
        for p in spec.blocks:
            blocks.append(make_block(p, shape))
            shape = out_shape(p, shape)
    return Seq(blocks).double().eval()


# --------------------------------------------------------------------------- strategies

#: activations that are registered in their functional form too, and the spellings drawn
FUNCTIONAL = {
    "relu": ["relu", "torch.relu", ".relu"],
    "relu6": ["relu6"],
    "leaky_relu": ["leaky_relu"],
    "elu": ["elu"],
    "celu": ["celu"],
    "tanh": ["tanh", ".tanh"],
    "hardtanh": ["hardtanh"],
    "softplus": ["softplus"],
    "softsign": ["softsign"],
    "gelu": ["gelu"],
    "silu": ["silu"],
    "sigmoid": ["sigmoid", ".sigmoid"],
}
ELEMENTWISE = [
    "relu",
    "relu6",
    "leaky_relu",
    "prelu",
    "elu",
    "celu",
    "tanh",
    "hardtanh",
    "softplus",
    "softsign",
    "gelu",
    "silu",
    "sigmoid",
    "hardsigmoid",
    "hardswish",
]


def _f(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def _scale(lo: float) -> st.SearchStrategy[float]:
    """A constant factor: 0, or a magnitude in [max(lo, 1e-3), 3] with either sign, and (for
    multipliers) tiny magnitudes whose squares underflow float64 (squared bounds once did)."""
    mag = _f(max(lo, 1e-3), 3.0)
    if lo == 0.0:
        mag = st.one_of(st.just(0.0), mag, st.sampled_from([1e-170, 1e-200]))
    return st.tuples(mag, st.sampled_from([-1.0, 1.0])).map(lambda t: t[0] * t[1])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def activations(draw, channels: int, elementwise_only: bool = False) -> dict[str, Any]:
    names = list(ELEMENTWISE)
    sizes = [g for g in _divisors(channels) if g >= 2]
    if not elementwise_only:
        names += ["maxmin"] * 2 * (channels % 2 == 0) + ["groupsort"] * 2 * bool(sizes)
    p: dict[str, Any] = {"kind": "act", "name": draw(st.sampled_from(names))}
    name = p["name"]
    if name in FUNCTIONAL and draw(st.booleans()):
        p["functional"] = draw(st.sampled_from(FUNCTIONAL[name]))
    if name == "leaky_relu":
        p["negative_slope"] = draw(_f(-2.0, 3.0))  # slopes above 1 and negative ones
    elif name == "prelu":
        p["per_channel"] = draw(st.booleans())
    elif name == "elu":
        p["alpha"] = draw(_f(0.1, 2.5))
    elif name == "celu":
        p["alpha"] = draw(_f(0.2, 2.5))
    elif name == "hardtanh":
        p["min_val"] = draw(_f(-2.0, 0.5))
        p["max_val"] = p["min_val"] + draw(_f(0.1, 3.0))
    elif name == "softplus":
        p["beta"] = draw(_f(0.5, 3.0))
        p["threshold"] = draw(_f(20.0, 40.0))  # below ~20 softplus jumps (refused)
    elif name == "gelu":
        p["approximate"] = draw(st.sampled_from(["none", "tanh"]))
    elif name == "groupsort":
        p["group_size"] = draw(st.sampled_from(sizes))
    return p


@st.composite
def conv_params(draw, shape: tuple[int, ...], same_shape: bool = False) -> dict[str, Any]:
    c, h, w = shape
    k = draw(st.integers(1, 3))
    d = draw(st.integers(1, 2))
    eff = d * (k - 1) + 1
    p: dict[str, Any] = {"k": k, "dilation": d, "bias": draw(st.booleans())}
    if same_shape:  # stride 1, output shape = input shape
        p["padding"] = "same" if eff % 2 == 0 or draw(st.booleans()) else (eff - 1) // 2
        p["stride"] = 1
        p["groups"] = draw(st.sampled_from(_divisors(c)))
        return p
    need = max(0, -(-(eff - min(h, w)) // 2))
    p["stride"] = draw(st.integers(1, 2))
    if p["stride"] == 1 and draw(st.integers(0, 4)) == 0:
        p["padding"] = "same"  # asymmetric zero padding for even effective kernels
    else:
        p["padding"] = draw(st.integers(need, 2))
    p["c_out"] = draw(st.integers(1, 6))
    p["groups"] = draw(st.sampled_from([g for g in _divisors(c) if p["c_out"] % g == 0]))
    return p


@st.composite
def pool_params(draw, shape: tuple[int, ...], kind: str) -> dict[str, Any]:
    _, h, w = shape
    k = draw(st.integers(1, 3))
    pad = draw(st.integers(0, k // 2))
    d = draw(st.integers(1, 2)) if "max" in kind else 1
    while d * (k - 1) + 1 > min(h, w) + 2 * pad:
        k -= 1
        pad = min(pad, k // 2)
    p = {
        "kind": kind,
        "k": k,
        "stride": draw(st.sampled_from([None, 1, 2, 3])),
        "padding": pad,
    }
    if "max" in kind:
        p["dilation"] = d
    if kind in ("maxpool", "avgpool"):
        p["ceil_mode"] = draw(st.booleans())
    if kind == "avgpool":
        p["count_include_pad"] = draw(st.booleans())
        p["divisor_override"] = draw(st.one_of(st.none(), st.integers(1, k * k)))
    return p


CONV_STAGE = [
    *["act"] * 3,
    *["conv"] * 3,
    *["convbn"] * 2,
    "residual",
    "bn",
    "maxpool",
    "fmaxpool",
    "avgpool",
    "favgpool",
    "adaptive_avg",
    "adaptive_max",
    "residual",
    "cat",
    "cat_act",
    "const",
    "expand",
    "center",
    "reduce",
    "pad",
    "slice",
    "transpose",
    "dropout",
]


@st.composite
def conv_block(draw, shape: tuple[int, ...]) -> dict[str, Any]:
    c, h, w = shape
    kind = draw(st.sampled_from(CONV_STAGE))
    if kind == "act":
        return draw(activations(c))
    if kind in ("conv", "convbn"):
        p = {"kind": kind, **draw(conv_params(shape))}
        if kind == "convbn":
            p["affine"] = draw(st.booleans())
        return p
    if kind == "bn":
        return {"kind": "bn", "affine": draw(st.booleans())}
    if kind in ("maxpool", "fmaxpool", "avgpool", "favgpool"):
        return draw(pool_params(shape, kind))
    if kind in ("adaptive_avg", "adaptive_max"):
        out = (draw(st.integers(1, h + 2)), draw(st.integers(1, w + 2)))  # also upsampling
        p = {"kind": kind, "out": out}
        if kind == "adaptive_avg":
            p["functional"] = draw(st.booleans())
        return p
    if kind == "residual":
        branch = draw(conv_params(shape, same_shape=True))
        branch["bn"] = draw(st.booleans())
        branch["act"] = draw(st.one_of(st.none(), activations(c)))
        return {
            "kind": kind,
            "branch": branch,
            "op": draw(st.sampled_from(["add", "sub", "rsub", "torch.add"])),
            "alpha": draw(_f(-2.0, 2.0)),
        }
    if kind == "cat":
        conv = draw(conv_params(shape))
        c1 = draw(st.integers(1, 4))
        p = {"kind": kind, "c1": c1, "dim": 1, "fn": draw(st.sampled_from(["cat", "concat"]))}
        conv.pop("c_out"), conv.pop("groups")
        if draw(st.booleans()):  # cat([conv(x), x]): the conv must keep the spatial shape
            conv.update(stride=1, padding="same")
            p["c2"] = None
            p["dim"] = draw(st.sampled_from([1, 1, 2, 3])) if c1 == c else 1
        else:
            p["c2"] = draw(st.integers(1, 4))
        p["conv"] = conv
        return p
    if kind == "cat_act":
        return {
            "kind": kind,
            "act": draw(activations(c, elementwise_only=True)),
            "dim": draw(st.sampled_from([1, 2, 3])),
            "fn": draw(st.sampled_from(["cat", "concat"])),
        }
    if kind == "const":
        op = draw(st.sampled_from(["mul", "rmul", "torch.mul", "div", "torch.div", "add", "sub"]))
        tensor = draw(st.sampled_from([None, "channel", "full"]))
        p = {"kind": kind, "op": op, "tensor": tensor}
        if tensor is None:
            p["value"] = draw(_scale(0.2 if op in ("div", "torch.div") else 0.0))
        return p
    if kind == "expand":
        return {"kind": kind, "c_out": draw(st.integers(1, 4))}
    if kind == "center":
        return {"kind": kind, "dim": draw(st.sampled_from([1, 2, 3, -1]))}
    if kind == "reduce":
        dims = [1, 2, 3, -1, (2, 3), (1, 2), (1, 2, 3)]
        return {
            "kind": kind,
            "op": draw(st.sampled_from(["mean", "sum", "amax", "amin"])),
            "dim": draw(st.sampled_from(dims)),
            "style": draw(st.sampled_from(["method", "function"])),
        }
    if kind == "pad":
        pads = tuple(draw(st.integers(0, 2)) for _ in range(draw(st.sampled_from([2, 4]))))
        return {"kind": kind, "pads": pads, "value": draw(_f(-1.0, 1.0))}
    if kind == "slice":
        return {
            "kind": kind,
            "c0": draw(st.integers(0, c - 1)),
            "h0": draw(st.integers(0, h - 1)),
            "w1": draw(st.one_of(st.none(), st.integers(1, w))),
        }
    if kind == "transpose":
        return {
            "kind": kind,
            "style": draw(
                st.sampled_from(
                    ["transpose", "torch.transpose", "permute", "rot90", "flip", "roll", "maximum"]
                )
            ),
        }
    return {"kind": "dropout"}


@st.composite
def dense_block(draw, width: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(["act", "act", "bn1d", "const", "dropout"]))
    if kind == "act":
        return draw(activations(width))
    if kind == "bn1d":
        return {"kind": kind, "affine": draw(st.booleans())}
    if kind == "const":
        op = draw(st.sampled_from(["mul", "rmul", "div", "add", "sub"]))
        tensor = draw(st.sampled_from([None, "full"]))
        p = {"kind": kind, "op": op, "tensor": tensor}
        if tensor is None:
            p["value"] = draw(_scale(0.2 if op == "div" else 0.0))
        return p
    return {"kind": "dropout"}


def _fits(shape: tuple[int, ...]) -> bool:
    return (
        bool(shape)
        and math.prod(shape) <= MAX_NUMEL
        and shape[0] <= MAX_CHANNELS
        and min(shape) >= 1
    )


@st.composite
def net_specs(draw) -> NetSpec:
    shape = (draw(st.integers(1, 3)), draw(st.integers(4, 8)), draw(st.integers(4, 8)))
    spec = NetSpec(input_shape=shape, seed=draw(st.integers(0, 2**31 - 1)))
    for _ in range(draw(st.integers(0, 6))):
        p = draw(conv_block(shape))
        new = out_shape(p, shape)
        if not _fits(new):  # too large for a cheap Jacobian: an activation instead
            p = draw(activations(shape[0]))
            new = shape
        spec.blocks.append(p)
        shape = new
    if draw(st.integers(0, 4)) == 3:  # no dense stage: the output is the feature map itself
        if math.prod(shape) > MAX_OUTPUTS:
            side = max(1, int(math.sqrt(MAX_OUTPUTS // shape[0])))
            spec.blocks.append({"kind": "adaptive_avg", "out": (side, side), "functional": False})
        spec.blocks.append({"kind": "flatten", "style": "nn.Flatten"})
        spec.ends_with_linear = False
        return spec
    flat = draw(
        st.sampled_from(
            ["nn.Flatten", "torch.flatten", "view", "reshape", "method"] * 2
            + ["mean23", "sum23", "mean-1"]
        )
    )
    spec.blocks.append({"kind": "flatten", "style": flat})
    shape = out_shape(spec.blocks[-1], shape)
    # dense stage: hidden linear layers, each followed by a few element-wise blocks
    for _ in range(draw(st.integers(0, 1))):
        spec.blocks.append({"kind": "linear", "out": draw(st.integers(2, 12)), "bias": True})
        shape = (spec.blocks[-1]["out"],)
        for _ in range(draw(st.integers(0, 2))):
            spec.blocks.append(draw(dense_block(shape[0])))
    spec.blocks.append(
        {"kind": "linear", "out": draw(st.integers(2, 10)), "bias": draw(st.booleans())}
    )
    shape = (spec.blocks[-1]["out"],)
    if draw(st.integers(0, 3)) == 2:  # an operation after the last Linear: no pairwise bound
        spec.blocks.append(draw(dense_block(shape[0]).filter(lambda p: p["kind"] != "dropout")))
        spec.ends_with_linear = False
    return spec


# --------------------------------------------------------------------------- the check


def jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full float64 Jacobian ``(outputs, flattened inputs)`` at one point ``x`` (no batch)."""
    shape = x.shape

    def f(v: torch.Tensor) -> torch.Tensor:
        return model(v.reshape(1, *shape)).reshape(-1)

    return torch.autograd.functional.jacobian(f, x.reshape(-1))


def check_bounds(model, points, value: float, pairwise: torch.Tensor | None, what: str) -> None:
    """``||J(x)||_2 <= value`` and ``||J_t(x) - J_i(x)|| <= pairwise[t, i]`` at every point."""
    for n, x in enumerate(points):
        J = jacobian(model, x)
        norm = float(torch.linalg.matrix_norm(J, 2))
        assert norm <= value * (1 + REL), (
            f"point {n}: ||J||_2 = {norm!r} > certified value {value!r}\n{what}"
        )
        if pairwise is None:
            continue
        diff = torch.linalg.vector_norm(J[:, None, :] - J[None, :, :], dim=-1)
        bad = diff > pairwise * (1 + REL)
        assert not bad.any(), (
            f"point {n}: pairs {bad.nonzero().tolist()} have ||J_t - J_i|| "
            f"{diff[bad].tolist()} > certified {pairwise[bad].tolist()}\n{what}"
        )


def sample_points(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """A standard normal point, one near 0 (where most activations have their kinks) and a
    large one (saturated activations, the far side of Hardtanh / Softplus thresholds)."""
    g = torch.Generator().manual_seed(seed)
    return [s * torch.randn(shape, generator=g, dtype=F64) for s in (1.0, 0.02, 3.0)]


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=net_specs())
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_certified_bounds_above_jacobian_norms(spec: NetSpec) -> None:
    model = build(spec)
    what = f"spec = {spec!r}\nmodel = {model!r}"
    bound = LipschitzBound(model, spec.input_shape)  # a refusal of a supported op fails here
    cert = bound.certified()
    assert (cert.pairwise is not None) == spec.ends_with_linear, what
    check_bounds(model, sample_points(spec.input_shape, spec.seed), cert.value, cert.pairwise, what)


# --------------------------------------------------------------------------- the check can fail


def test_check_fails_against_a_halved_tight_bound() -> None:
    """A single Linear layer: the bound equals its top singular value, the Jacobian is ``W``,
    so the same check must reject half the bound (for ``value`` and for ``pairwise``)."""
    torch.manual_seed(0)
    model = Seq([nn.Linear(6, 4)]).double().eval()
    cert = LipschitzBound(model, (6,)).certified()
    assert cert.pairwise is not None
    sigma = float(torch.linalg.matrix_norm(model.blocks[0].weight.detach(), 2))
    assert cert.value == pytest.approx(sigma, rel=1e-8)
    points = sample_points((6,), 0)
    check_bounds(model, points, cert.value, cert.pairwise, "exact bound")
    with pytest.raises(AssertionError, match="certified value"):
        check_bounds(model, points, cert.value / 2, None, "halved value")
    with pytest.raises(AssertionError, match="certified"):
        check_bounds(model, points, cert.value, cert.pairwise / 2, "halved pairwise")


# --------------------------------------------------------------------------- known bug


def _scaled_linear() -> nn.Module:
    torch.manual_seed(0)
    model = Seq([nn.Linear(4, 3)]).double()
    with torch.no_grad():
        model.blocks[0].weight.mul_(1e-170)  # ||W|| ~ 1e-170 (float64; float32 would be 0)
    return model


def _scaled_conv() -> nn.Module:
    torch.manual_seed(0)
    model = Seq([nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()]).double()
    with torch.no_grad():
        model.blocks[0].weight.mul_(1e-170)
    return model


def _scaled_cat() -> nn.Module:
    # cat([x * 1e-200, x * 1e-200], 1), flattened: Lipschitz constant sqrt(2) * 1e-200
    return Seq([Cat(Const("mul", 1e-200), Const("mul", 1e-200), 1, "cat"), nn.Flatten()])


UNDERFLOW = {
    # spectral_norm_exact: eigvalsh of the Gram matrix W W^T, whose entries underflow to 0
    "linear-gram": (_scaled_linear, (4,)),
    # conv_fft_bound / closed form: squared Fourier coefficients underflow the same way
    "conv-fft": (_scaled_conv, (1, 4, 4)),
    # rules.cat: sqrt(sum L_j^2) with L_j ~ 1e-200
    "cat-sum-of-squares": (_scaled_cat, (1, 4, 4)),
}


@pytest.mark.parametrize("case", list(UNDERFLOW))
def test_tiny_bounds_do_not_underflow(case: str) -> None:
    make, shape = UNDERFLOW[case]
    model = make().double().eval()
    cert = LipschitzBound(model, shape).certified()
    check_bounds(model, sample_points(shape, 0), cert.value, cert.pairwise, repr(model))
