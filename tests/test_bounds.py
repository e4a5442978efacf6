"""Per-operation checks of ``lipmargin.bounds`` against independent computations.

Every guaranteed bound is compared with a number computed here, without the implementation:
the exact operator norm of the dense float64 matrix of the operation (torch applies the operation
to an identity basis, NumPy takes the largest singular value), the largest derivative of an
activation on a fine grid, or an explicit input pair that realises a Lipschitz ratio.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lipmargin.bounds import LipschitzBound, norms
from lipmargin.errors import InputError, UnsupportedOperationError

F64 = torch.float64
REL = 1e-9  # relative slack allowed below an exact norm (float64 rounding)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_MOD = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# --------------------------------------------------------------------------- helpers


def dense_norm(fn, in_shape) -> float:
    """Exact ``||A||_2`` of a linear map ``fn`` on ``in_shape`` (no batch): apply ``fn`` to the
    float64 identity basis and take the largest singular value with NumPy."""
    d = math.prod(in_shape)
    basis = torch.eye(d, dtype=F64).reshape(d, *in_shape)
    with torch.no_grad():
        cols = fn(basis).reshape(d, -1)
    return float(np.linalg.norm(cols.numpy(), 2))


def affine_norm(fn, in_shape) -> float:
    """Exact norm of the linear part of an affine map: ``x -> fn(x) - fn(0)``."""
    zero = torch.zeros((1, *in_shape), dtype=F64)
    with torch.no_grad():
        off = fn(zero)
    return dense_norm(lambda u: fn(u) - off, in_shape)


def certified(model: nn.Module, shape, **kw):
    return LipschitzBound(model, shape, **kw).certified()


def linear_rows(cert):
    """The per-layer rows of linear maps (those reporting a power-iteration estimate)."""
    return [r for r in cert.layers if r.estimate is not None]


def node_names(model: nn.Module, pred) -> set[str]:
    """Names of the fx nodes (plain ``symbolic_trace``) selected by ``pred``."""
    gm = torch.fx.symbolic_trace(model)
    return {n.name for n in gm.graph.nodes if pred(n)}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- convolutions

# (dim, c_in, c_out, kernel, stride, padding, dilation, groups, input spatial size)
CONV_CASES = [
    # Conv1d
    (1, 2, 3, 3, 1, 1, 1, 1, (11,)),
    (1, 2, 2, 5, 2, 2, 1, 2, (13,)),
    (1, 1, 2, 4, 3, 0, 2, 1, (17,)),
    (1, 3, 2, 2, 1, "same", 2, 1, (9,)),
    (1, 4, 4, 1, 2, 0, 1, 2, (8,)),
    # Conv2d
    (2, 1, 1, 3, 1, 1, 1, 1, (8, 8)),
    (2, 3, 4, 3, 1, 1, 1, 1, (8, 10)),
    (2, 2, 3, 3, 2, 1, 1, 1, (9, 7)),
    (2, 2, 2, 3, 3, 2, 1, 2, (10, 8)),
    (2, 2, 4, 5, 1, 2, 1, 2, (7, 9)),
    (2, 2, 2, 4, 2, 1, 1, 1, (9, 6)),
    (2, 1, 2, 3, 1, "same", 2, 1, (7, 9)),
    (2, 2, 2, 4, 1, "same", 1, 2, (6, 7)),
    (2, 2, 3, 2, 1, 0, 2, 1, (6, 8)),
    (2, 3, 2, 1, 1, 0, 1, 1, (5, 7)),
    (2, 1, 3, 5, 3, 0, 1, 1, (11, 13)),
    (2, 2, 2, 3, 2, 2, 2, 2, (9, 8)),
    (2, 4, 4, 3, 1, 0, 1, 4, (6, 6)),
    (2, 2, 2, (2, 5), (1, 2), (0, 2), (2, 1), 1, (7, 9)),
    # Conv3d
    (3, 2, 2, 3, (1, 2, 1), 1, 1, 1, (3, 5, 4)),
]


def _conv_weight(dim, c_in, c_out, kernel, groups, seed):
    k = kernel if isinstance(kernel, tuple) else (kernel,) * dim
    return torch.randn((c_out, c_in // groups, *k), generator=seeded(seed), dtype=F64)


def _exact_conv_norm(w, stride, padding, dilation, groups, size):
    fn = _CONV[w.dim() - 2]
    return dense_norm(
        lambda u: fn(u, w, None, stride, padding, dilation, groups), (w.shape[1] * groups, *size)
    )


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_bounds_are_above_the_dense_norm(case) -> None:
    dim, c_in, c_out, kernel, stride, padding, dilation, groups, size = case
    w = _conv_weight(dim, c_in, c_out, kernel, groups, seed=len(size) + c_in + c_out)
    exact = _exact_conv_norm(w, stride, padding, dilation, groups, size)
    fft = float(norms.conv_fft_bound(w, size, stride, padding, dilation, groups))
    closed = float(norms.conv_closed_form_bound(w, stride, dilation, groups))
    assert fft >= exact * (1 - REL), (fft, exact)
    assert closed >= exact * (1 - REL), (closed, exact)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_guaranteed_bound_is_the_minimum(case, monkeypatch) -> None:
    """The rule's bound skips the closed form only where it cannot be the minimum: the same
    value as min(FFT, closed form), also when the FFT bound is made the larger one."""
    dim, c_in, c_out, kernel, stride, padding, dilation, groups, size = case
    w = _conv_weight(dim, c_in, c_out, kernel, groups, seed=len(size) + c_in + c_out)
    fft = norms.conv_fft_bound(w, size, stride, padding, dilation, groups)
    closed = norms.conv_closed_form_bound(w, stride, dilation, groups)
    got = norms.conv_guaranteed_bound(w, size, stride, padding, dilation, groups)
    assert float(got) == float(torch.minimum(fft, closed))
    monkeypatch.setattr(norms, "conv_fft_bound", lambda *a: closed * 1.5)
    got = norms.conv_guaranteed_bound(w, size, stride, padding, dilation, groups)
    assert float(got) == float(closed)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_layer_row_via_lipschitz_bound(case) -> None:
    """The per-layer row of a one-convolution model, for every conv method."""
    dim, c_in, c_out, kernel, stride, padding, dilation, groups, size = case
    torch.manual_seed(3)
    conv = _CONV_MOD[dim](c_in, c_out, kernel, stride, padding, dilation, groups)
    model = nn.Sequential(conv, nn.Flatten())
    w = conv.weight.detach().to(F64)
    exact = _exact_conv_norm(w, stride, padding, dilation, groups, size)
    for method in ("fft", "closed_form"):
        cert = certified(model, (c_in, *size), conv_method=method)
        (row,) = linear_rows(cert)
        assert row.bound >= exact * (1 - REL), (method, row.bound, exact)
        assert cert.value >= exact * (1 - REL)
        assert cert.value == pytest.approx(row.bound, rel=1e-12)
        assert cert.guaranteed
        assert cert.pairwise is None
        # the reported estimate is a lower estimate of the same norm
        assert row.estimate <= exact * (1 + 1e-6)
    power = certified(model, (c_in, *size), conv_method="power")
    assert not power.guaranteed
    assert power.value <= exact * (1 + 1e-6)


@pytest.mark.parametrize("size", [(8, 8), (8, 11), (12, 9), (16, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_fft_bound_is_tight_for_padded_3x3(size, seed) -> None:
    c_in, c_out = 1 + seed, 2 + seed
    w = torch.randn((c_out, c_in, 3, 3), generator=seeded(seed), dtype=F64)
    exact = _exact_conv_norm(w, 1, 1, 1, 1, size)
    fft = float(norms.conv_fft_bound(w, size, 1, 1, 1, 1))
    assert exact * (1 - REL) <= fft <= 1.2 * exact


def test_conv_fft_bound_is_exact_for_a_1x1_conv() -> None:
    """A 1x1 convolution is ``W`` applied at every pixel: its norm is ``||W||_2``."""
    w = torch.randn((3, 4, 1, 1), generator=seeded(7), dtype=F64)
    svd = float(np.linalg.norm(w.reshape(3, 4).numpy(), 2))
    assert float(norms.conv_fft_bound(w, (5, 6))) == pytest.approx(svd, rel=1e-8)
    assert _exact_conv_norm(w, 1, 0, 1, 1, (5, 6)) == pytest.approx(svd, rel=1e-8)


@st.composite
def conv_configs(draw):
    dim = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 5)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    same = draw(st.booleans()) and draw(st.booleans())
    if same:
        stride = (1,) * dim
        padding = "same"
        pad = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(dim))
        padding = tuple(draw(st.integers(0, 3)) for _ in range(dim))
        pad = [2 * p for p in padding]
    size = []
    for k, d, p in zip(kernel, dilation, pad, strict=True):
        lo = max(1, d * (k - 1) + 1 - p)
        size.append(draw(st.integers(lo, lo + (7 if dim == 1 else 4))))
    # keep the dense matrix small (its SVD dominates the run time)
    assume(c_in * math.prod(size) <= 600)
    seed = draw(st.integers(0, 2**31 - 1))
    return dim, c_in, c_out, kernel, stride, padding, dilation, groups, tuple(size), seed


@settings(max_examples=60, deadline=None)
@given(conv_configs())
def test_conv_bounds_never_below_exact_property(cfg) -> None:
    dim, c_in, c_out, kernel, stride, padding, dilation, groups, size, seed = cfg
    w = _conv_weight(dim, c_in, c_out, kernel, groups, seed)
    exact = _exact_conv_norm(w, stride, padding, dilation, groups, size)
    fft = float(norms.conv_fft_bound(w, size, stride, padding, dilation, groups))
    closed = float(norms.conv_closed_form_bound(w, stride, dilation, groups))
    assert fft >= exact * (1 - REL), (fft, exact)
    assert closed >= exact * (1 - REL), (closed, exact)
    # power iteration estimates from below
    u = torch.randn((1, c_in, *size), generator=seeded(seed + 1), dtype=F64)
    fn = _CONV[dim]
    _, est = norms.power_iteration(
        lambda x: fn(x, w, None, stride, padding, dilation, groups), u / u.norm(), steps=5
    )
    assert float(est) <= exact * (1 + 1e-9)


@settings(max_examples=30, deadline=None)
@given(conv_configs())
def test_conv_module_bound_never_below_exact_property(cfg) -> None:
    dim, c_in, c_out, kernel, stride, padding, dilation, groups, size, seed = cfg
    conv = _CONV_MOD[dim](c_in, c_out, kernel, stride, padding, dilation, groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(_conv_weight(dim, c_in, c_out, kernel, groups, seed))
    model = nn.Sequential(conv, nn.Flatten())
    exact = _exact_conv_norm(conv.weight.detach().to(F64), stride, padding, dilation, groups, size)
    cert = certified(model, (c_in, *size))
    assert cert.value >= exact * (1 - REL), (cert.value, exact)


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 1, 3, 3, generator=seeded(11)))

    def forward(self, x):
        y = F.conv2d(x, self.weight, None, 1, "same", 2, 2)
        return torch.flatten(y, 1)


def test_functional_conv2d_bound() -> None:
    model = FunctionalConv()
    exact = _exact_conv_norm(model.weight.detach().to(F64), 1, "same", 2, 2, (7, 6))
    cert = certified(model, (2, 7, 6))
    assert cert.value >= exact * (1 - REL)
    assert cert.value <= 2.5 * exact


def test_non_zero_padding_mode_is_bounded_as_pad_then_conv() -> None:
    """(Refused until session 7; now traced through: F.pad's rule times the unpadded conv's.)"""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten())
    bound = LipschitzBound(model.double(), (1, 6, 6))
    assert any(n.target is F.pad for n in bound._graph_module.graph.nodes)
    conv = model[0]
    exact = dense_norm(
        lambda u: F.conv2d(F.pad(u, (1, 1, 1, 1), mode="reflect"), conv.weight), (1, 6, 6)
    )
    assert exact <= bound.certified().value <= 2.5 * exact


# --------------------------------------------------------------------------- conv + batch norm


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_batchnorm_fused_bound(dim, seed) -> None:
    g = seeded(seed)
    size = (9,) if dim == 1 else (7, 8)
    conv = _CONV_MOD[dim](2, 3, 3, stride=1 + seed % 2, padding=1)
    bn = (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        bn.weight.copy_(torch.tensor([1.7, -2.3, 0.4]) * (1 + seed))
        bn.bias.copy_(torch.randn(3, generator=g))
        bn.running_mean.copy_(torch.randn(3, generator=g))
        bn.running_var.copy_(torch.rand(3, generator=g) * 3 + 0.05)
    model = nn.Sequential(conv, bn, nn.Flatten()).eval()
    shape = (2, *size)

    m64 = copy.deepcopy(model).double()
    exact = affine_norm(m64, shape)
    cert = certified(model, shape)
    (row,) = linear_rows(cert)
    assert row.bound >= exact * (1 - REL), (row.bound, exact)
    assert cert.value >= exact * (1 - REL)

    conv_alone = certified(nn.Sequential(conv, nn.Flatten()), shape).value
    scale = (bn.weight.detach().double().abs() / torch.sqrt(bn.running_var.double() + bn.eps)).max()
    assert cert.value <= conv_alone * float(scale) * (1 + 1e-7)


def test_batchnorm_alone_is_its_largest_scale() -> None:
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -3.0, 1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.01, 9.0]))
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 2.0, 0.0]))
    lin = nn.Linear(3, 4)
    model = nn.Sequential(lin, bn).eval()
    scales = [0.5 / math.sqrt(1 + 1e-5), 3.0 / math.sqrt(4 + 1e-5), 1 / math.sqrt(0.01 + 1e-5)]
    expected_bn = max(scales + [2.0 / math.sqrt(9 + 1e-5)])
    cert = certified(model, (3,))
    exact = affine_norm(copy.deepcopy(model).double(), (3,))
    lin_norm = float(np.linalg.norm(lin.weight.detach().double().numpy(), 2))
    assert cert.value >= exact * (1 - REL)
    assert cert.value == pytest.approx(lin_norm * expected_bn, rel=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_batchnorm_without_running_statistics_is_refused(fused) -> None:
    first = nn.Conv2d(1, 2, 3) if fused else nn.Identity()
    bn = nn.BatchNorm2d(2 if fused else 1, track_running_stats=False)
    model = nn.Sequential(first, bn, nn.Flatten())
    with pytest.raises(UnsupportedOperationError):
        LipschitzBound(model, (1, 5, 5)).certified()


# --------------------------------------------------------------------------- dense layers


@pytest.mark.parametrize("shape", [(7, 5), (3, 9), (6, 6), (1, 4)])
def test_linear_is_exact_svd(shape) -> None:
    out_f, in_f = shape
    w = torch.randn(shape, generator=seeded(out_f * 10 + in_f), dtype=F64)
    svd = float(np.linalg.svd(w.numpy(), compute_uv=False)[0])
    assert float(norms.spectral_norm_exact(w)) == pytest.approx(svd, rel=3e-9)
    assert float(norms.spectral_norm_exact(w)) >= svd

    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(w)
    cert = certified(nn.Sequential(lin), (in_f,))
    (row,) = linear_rows(cert)
    w32 = lin.weight.detach().double().numpy()
    svd32 = float(np.linalg.svd(w32, compute_uv=False)[0])
    assert row.bound == pytest.approx(svd32, rel=3e-9)
    assert row.bound >= svd32
    assert cert.value == pytest.approx(svd32, rel=3e-9)


def test_linear_on_a_sequence_has_the_same_norm() -> None:
    lin = nn.Linear(4, 3, bias=False)
    model = nn.Sequential(lin, nn.Flatten())
    exact = dense_norm(lambda u: F.linear(u, lin.weight.detach().double()), (5, 4))
    cert = certified(model, (5, 4))
    assert cert.value >= exact * (1 - REL)
    assert cert.value == pytest.approx(exact, rel=1e-8)


class FunctionalLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6, generator=seeded(5)))

    def forward(self, x):
        return F.linear(x, self.w)


def test_functional_linear_is_exact() -> None:
    model = FunctionalLinear()
    svd = float(np.linalg.norm(model.w.detach().double().numpy(), 2))
    assert certified(model, (6,)).value == pytest.approx(svd, rel=3e-9)


# --------------------------------------------------------------------------- pooling


def pool_value(pool: nn.Module, shape) -> float:
    return certified(nn.Sequential(pool, nn.Flatten()), shape).value


@pytest.mark.parametrize(
    ("pool", "shape", "expected"),
    [
        (nn.AvgPool2d(8), (1, 8, 8), 1 / 8),
        (nn.AvgPool2d(2, 2), (2, 8, 8), 1 / 2),
        (nn.AdaptiveAvgPool2d(1), (3, 8, 8), 1 / 8),
        (nn.MaxPool2d(3, 2), (1, 33, 33), 2.0),
        (nn.MaxPool2d(2, 2), (1, 8, 8), 1.0),
        (nn.AvgPool1d(4), (2, 16), 1 / 2),
    ],
)
def test_pooling_paper_values(pool, shape, expected) -> None:
    assert pool_value(pool, shape) == pytest.approx(expected, rel=1e-6)


AVG_POOLS = [
    (nn.AvgPool2d(3, 2, padding=1), (1, 7, 8)),
    (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), (1, 7, 8)),
    (nn.AvgPool2d(3, 2, ceil_mode=True), (1, 8, 9)),
    (nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), (1, 8, 6)),
    (nn.AvgPool2d(2, 1, divisor_override=1), (1, 5, 5)),
    (nn.AvgPool2d((2, 3), (1, 2)), (2, 6, 7)),
    (nn.AvgPool1d(3, 2, padding=1, count_include_pad=False), (1, 9)),
    (nn.AdaptiveAvgPool2d((3, 5)), (1, 7, 9)),
    (nn.AdaptiveAvgPool2d((4, 4)), (1, 5, 6)),
    (nn.AdaptiveAvgPool1d(4), (2, 7)),
]


@pytest.mark.parametrize(("pool", "shape"), AVG_POOLS)
def test_average_pooling_bound_above_dense_norm(pool, shape) -> None:
    exact = dense_norm(pool, shape)
    value = pool_value(pool, shape)
    assert value >= exact * (1 - REL), (value, exact)


class FunctionalAvgPool(nn.Module):
    def forward(self, x):
        y = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False, ceil_mode=True)
        return torch.flatten(y, 1)


def test_functional_average_pooling_keywords() -> None:
    model = FunctionalAvgPool()
    exact = dense_norm(model, (1, 8, 7))
    assert certified(model, (1, 8, 7)).value >= exact * (1 - REL)


class PositionalAvgPool(nn.Module):
    """``F.avg_pool2d(input, kernel, stride, padding, ceil_mode, count_include_pad,
    divisor_override)`` with every argument positional."""

    def __init__(self, *args) -> None:
        super().__init__()
        self.args = args

    def forward(self, x):
        return torch.flatten(F.avg_pool2d(x, *self.args), 1)


@pytest.mark.parametrize(
    "args", [(2, 2, 0, False, True, 1), (3, 1, 1, False, False), (3, 2, 1, True, False)]
)
def test_functional_average_pooling_positional_arguments(args) -> None:
    model = PositionalAvgPool(*args)
    shape = (1, 8, 8)
    exact = dense_norm(model, shape)
    assert certified(model, shape).value >= exact * (1 - REL)


def max_pool_spike_ratio(fn, shape) -> float:
    """Largest ``||P(2 e_p) - P(e_p)|| / ||e_p||`` over positions ``p``: with one positive entry,
    every window containing it outputs that entry, so this is ``sqrt`` of the largest number of
    windows containing one input element (a lower bound of the Lipschitz constant)."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=F64).reshape(d, *shape)
    with torch.no_grad():
        diff = fn(2 * basis) - fn(basis)
    return float(diff.reshape(d, -1).norm(dim=1).max())


def max_pool_random_ratio(fn, shape, seed=0, n=512) -> float:
    g = seeded(seed)
    x = torch.randn((n, *shape), generator=g, dtype=F64)
    scale = torch.logspace(-6, 0, n, dtype=F64).reshape(n, *([1] * len(shape)))
    y = x + scale * torch.randn((n, *shape), generator=g, dtype=F64)
    with torch.no_grad():
        num = (fn(x) - fn(y)).reshape(n, -1).norm(dim=1)
    return float((num / (x - y).reshape(n, -1).norm(dim=1)).max())


MAX_POOLS = [
    (nn.MaxPool2d(3, 2), (1, 33, 33), 2.0),
    (nn.MaxPool2d(3, 1), (1, 9, 9), 3.0),
    (nn.MaxPool2d(2, 2), (1, 8, 8), 1.0),
    (nn.MaxPool2d(3, 2, padding=1), (1, 9, 8), 2.0),
    (nn.MaxPool2d(3, 2, ceil_mode=True), (1, 8, 9), None),
    # true constant 2 (an element lies in 2 dilated windows per axis); ceil(k_eff/s) gives 3
    (nn.MaxPool2d(2, 1, dilation=2), (1, 7, 7), None),
    (nn.MaxPool2d((3, 2), (1, 2)), (2, 7, 8), math.sqrt(3)),
    (nn.MaxPool1d(4, 1), (1, 12), 2.0),
    (nn.MaxPool1d(5, 2, padding=2, dilation=1), (1, 12), math.sqrt(3)),
    (nn.AdaptiveMaxPool2d((3, 4)), (1, 7, 9), None),
    (nn.AdaptiveMaxPool2d(1), (2, 6, 6), 1.0),
    (nn.AdaptiveMaxPool1d(5), (1, 7), None),
]


@pytest.mark.parametrize(("pool", "shape", "expected"), MAX_POOLS)
def test_max_pooling_bound_above_empirical(pool, shape, expected) -> None:
    value = pool_value(pool, shape)
    spike = max_pool_spike_ratio(pool, shape)
    rand = max_pool_random_ratio(pool, shape)
    assert value >= spike * (1 - REL), (value, spike)
    assert value >= rand * (1 - REL), (value, rand)
    if expected is not None:
        assert spike == pytest.approx(expected, rel=1e-9)
        assert value == pytest.approx(expected, rel=1e-6)


class FunctionalMaxPool(nn.Module):
    def forward(self, x):
        return torch.flatten(F.max_pool2d(x, 3, 2, 1), 1)


def test_functional_max_pool() -> None:
    model = FunctionalMaxPool()
    value = certified(model, (1, 9, 9)).value
    assert value >= max_pool_spike_ratio(model, (1, 9, 9)) * (1 - REL)
    assert value == pytest.approx(2.0, rel=1e-6)


class GlobalPoolFromSize(nn.Module):
    """Global pooling whose kernel is read from the input size (a common idiom)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        fn = F.avg_pool2d if self.kind == "avg" else F.max_pool2d
        return torch.flatten(fn(x, x.size(3)), 1)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pooling_kernel_from_input_size_is_bounded_or_refused(kind) -> None:
    """Either a sound bound or an ``UnsupportedOperationError``; never a raw TypeError."""
    model = GlobalPoolFromSize(kind)
    shape = (2, 4, 4)
    try:
        value = certified(model, shape).value
    except UnsupportedOperationError:
        return
    exact = 0.25 if kind == "avg" else 1.0
    assert value >= exact * (1 - REL)


# --------------------------------------------------------------------------- activations

GRID = torch.linspace(-30.0, 30.0, 600_001, dtype=F64)


def grid_max_slope(fn) -> float:
    x = GRID.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    # also finite differences between grid points (catches kinks)
    with torch.no_grad():
        y = fn(GRID)
        fd = ((y[1:] - y[:-1]) / (GRID[1:] - GRID[:-1])).abs().max()
    return max(float(g.abs().max()), float(fd))


def _prelu(weight: float) -> nn.PReLU:
    m = nn.PReLU()
    with torch.no_grad():
        m.weight.fill_(weight)
    return m


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


ACTIVATIONS = [
    ("sigmoid", nn.Sigmoid(), 0.25),
    ("gelu", nn.GELU(), 1.1289),
    ("gelu_tanh", nn.GELU(approximate="tanh"), None),
    ("silu", nn.SiLU(), 1.1),
    ("leaky0.2", nn.LeakyReLU(0.2), 1.0),
    ("leaky3", nn.LeakyReLU(3.0), 3.0),
    ("elu2", nn.ELU(alpha=2.0), 2.0),
    ("elu0.5", nn.ELU(alpha=0.5), 1.0),
    ("celu", nn.CELU(alpha=0.5), 1.0),
    ("softplus", nn.Softplus(beta=2.0), 1.0),
    ("tanh", nn.Tanh(), 1.0),
    ("relu", nn.ReLU(), 1.0),
    ("relu6", nn.ReLU6(), 1.0),
    ("hardtanh", nn.Hardtanh(-2.0, 3.0), 1.0),
    ("softsign", nn.Softsign(), 1.0),
    ("hardswish", nn.Hardswish(), 1.5),
    ("hardsigmoid", nn.Hardsigmoid(), 1 / 6 * (1 + 1e-7)),
    ("prelu", _prelu(-2.5), 2.5),
    ("F.gelu_tanh", Fn(lambda x: F.gelu(x, approximate="tanh")), None),
    ("F.leaky_relu", Fn(lambda x: F.leaky_relu(x, 0.3)), 1.0),
    ("F.elu", Fn(lambda x: F.elu(x, alpha=3.0)), 3.0),
    ("torch.sigmoid", Fn(torch.sigmoid), 0.25),
    ("F.silu", Fn(F.silu), 1.1),
    ("x.tanh()", Fn(lambda x: x.tanh()), 1.0),
]


@pytest.mark.parametrize(("name", "act", "expected"), ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_activation_factor_against_grid(name, act, expected) -> None:
    value = certified(nn.Sequential(act), (5,)).value
    slope = grid_max_slope(copy.deepcopy(act).double())
    # 1e-9 covers finite-difference rounding only: torch's float64 backward of hardsigmoid uses
    # float32 1/6 (3e-8 above 1/6), which the rule must (and does) cover
    assert value >= slope * (1 - 1e-9), (name, value, slope)
    assert value <= slope * (1 + 1e-3) + 1e-9, (name, value, slope)
    if expected is not None:
        assert value == pytest.approx(expected, rel=1e-4)


def test_activation_in_a_network_multiplies() -> None:
    lin = nn.Linear(4, 3)
    model = nn.Sequential(nn.Sigmoid(), lin)
    svd = float(np.linalg.norm(lin.weight.detach().double().numpy(), 2))
    assert certified(model, (4,)).value == pytest.approx(0.25 * svd, rel=1e-8)


# --------------------------------------------------------------------------- refusals


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class Square(nn.Module):
    def forward(self, x):
        return x * x


class Normalise(nn.Module):
    def forward(self, x):
        return x / x.norm()


class Power(nn.Module):
    def forward(self, x):
        return x**2


class SoftmaxInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.softmax(x, dim=1))


class IndexTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("idx", torch.tensor([0, 0, 1, 1, 2]))

    def forward(self, x):
        return x[:, self.idx]


class IndexList(nn.Module):
    def forward(self, x):
        return x[:, [0, 0, 0, 1]]


class ItemScale(nn.Module):
    """``x * sum(x)``: the scalar leaves the graph through ``.item()``; not Lipschitz."""

    def forward(self, x):
        return x * x.sum().item()


class Bicubic(nn.Module):  # reflect padding, refused before issue 14, has a rule now
    def forward(self, x):
        return torch.flatten(F.interpolate(x, scale_factor=2, mode="bicubic"), 1)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


REFUSED = [
    ("exp", Exp(), (4,), {"exp"}),
    ("x*x", Square(), (4,), {"mul"}),
    ("x/x.norm()", Normalise(), (4,), {"norm", "truediv"}),
    ("x**2", Power(), (4,), {"pow_1", "pow"}),
    ("layernorm", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (4,), {"_1"}),
    ("groupnorm", nn.Sequential(nn.GroupNorm(2, 4), nn.Flatten()), (4, 3, 3), {"_0"}),
    ("softmax", SoftmaxInside(), (4,), {"softmax"}),
    ("nn.Softmax", nn.Sequential(nn.Softmax(dim=1)), (4,), {"_0"}),
    ("index tensor", IndexTensor(), (4,), {"getitem"}),
    ("index list", IndexList(), (4,), {"getitem"}),
    ("bicubic", Bicubic(), (1, 3, 3), {"interpolate"}),
    ("item", ItemScale(), (4,), {"sum_1", "item", "mul", "sum"}),
]


@pytest.mark.parametrize(("name", "model", "shape", "nodes"), REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_operations_are_refused_with_node_name(name, model, shape, nodes) -> None:
    traced = node_names(model, lambda n: n.op not in ("placeholder", "output", "get_attr"))
    assert nodes & traced, f"test set-up: expected node names {nodes} not in {traced}"
    with pytest.raises(UnsupportedOperationError) as info:
        LipschitzBound(model, shape).certified()
    msg = str(info.value)
    assert any(repr(n) in msg or f"'{n}'" in msg for n in nodes & traced), msg


def test_untraceable_model_raises() -> None:
    with pytest.raises(UnsupportedOperationError):
        LipschitzBound(DataDependent(), (4,))


def test_invalid_conv_method_raises() -> None:
    with pytest.raises(InputError):
        LipschitzBound(nn.Sequential(nn.Linear(2, 2)), (2,), conv_method="svd")


# --------------------------------------------------------------------------- training mode


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4),
    )
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.5, -0.7, 2.0]))
        net[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return net


SHAPE = (1, 6, 6)


def test_training_bound_is_differentiable() -> None:
    net = small_net().eval()
    bound = LipschitzBound(net, SHAPE)
    bound.train()
    K = bound()
    assert K.shape == (4, 4)
    assert K.requires_grad
    K.sum().backward()
    for name in ("0.weight", "1.weight", "3.weight", "5.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    net.zero_grad()
    scalar = bound(pairwise=False)
    assert scalar.dim() == 0
    scalar.backward()
    assert net[5].weight.grad.abs().sum() > 0


def _layer_norms_exact(net) -> dict[str, float]:
    """Exact norms of the three linear maps of ``small_net`` (conv0+bn1 fused, conv3, fc5)."""
    m = copy.deepcopy(net).double().eval()
    fused = affine_norm(nn.Sequential(m[0], m[1]), SHAPE)
    conv3 = dense_norm(lambda u: F.conv2d(u, m[3].weight, None, 2, 1), (3, 6, 6))
    fc = float(np.linalg.norm(m[5].weight.detach().numpy(), 2))
    return {"fused": fused, "conv": conv3, "fc": fc}


def test_training_estimates_converge_from_below() -> None:
    net = small_net(1).eval()
    bound = LipschitzBound(net, SHAPE)
    cert = bound.certified()
    exact = _layer_norms_exact(net)
    bound.train()
    prev_scalar = 0.0
    for _ in range(60):
        K = bound().detach().double()
        scalar = float(bound(pairwise=False).detach())
        # never above the guaranteed numbers (up to float32 noise)
        assert (K <= cert.pairwise * (1 + 1e-5) + 1e-7).all()
        assert scalar <= cert.value * (1 + 1e-5)
        # power iteration is monotone; allow float32 noise
        assert scalar >= prev_scalar * (1 - 1e-4)
        prev_scalar = scalar
    sigmas = sorted(float(s.detach()) for s in bound.last_sigmas.values())
    assert len(sigmas) == 3
    for s, e in zip(sigmas, sorted(exact.values()), strict=True):
        assert s <= e * (1 + 1e-5)
        assert s >= 0.97 * e
    assert scalar >= 0.97 * math.prod(exact.values())
    # eval mode: no power step, same estimate on every call
    bound.eval()
    a, b = bound().detach(), bound().detach()
    assert torch.equal(a, b)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_training_power_iteration_converges_to_the_conv_norm(case) -> None:
    """The training-time estimate (power iteration on the persistent vector, with whatever
    transpose the engine uses) rises to the exact norm and never exceeds it."""
    dim, c_in, c_out, kernel, stride, padding, dilation, groups, size = case
    torch.manual_seed(5)
    conv = _CONV_MOD[dim](c_in, c_out, kernel, stride, padding, dilation, groups)
    model = nn.Sequential(conv, nn.Flatten())
    exact = _exact_conv_norm(conv.weight.detach().to(F64), stride, padding, dilation, groups, size)
    bound = LipschitzBound(model, (c_in, *size)).train()
    for _ in range(60):
        est = float(bound(pairwise=False).detach())
        assert est <= exact * (1 + 1e-5)
    assert est >= 0.95 * exact


def test_state_dict_round_trip() -> None:
    net = small_net(2).eval()
    bound = LipschitzBound(net, SHAPE)
    keys = set(bound.state_dict())
    assert keys and all(k.startswith("u_") for k in keys)
    assert len(keys) == 3
    bound.train()
    for _ in range(5):
        bound()
    sd = {k: v.clone() for k, v in bound.state_dict().items()}
    bound.eval()
    trained = bound().detach()

    fresh = LipschitzBound(net, SHAPE).eval()
    assert not torch.allclose(fresh().detach(), trained)
    fresh.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert torch.equal(fresh().detach(), trained)


def test_state_dict_has_no_model_weights() -> None:
    net = small_net()
    bound = LipschitzBound(net, SHAPE)
    assert not any("weight" in k or "bias" in k or "running" in k for k in bound.state_dict())
    assert len(list(bound.parameters())) == 0


@pytest.mark.parametrize("layer", [0, 3, 5])
def test_no_nan_when_a_weight_is_zero(layer) -> None:
    net = small_net(3).eval()
    with torch.no_grad():
        net[layer].weight.zero_()
    bound = LipschitzBound(net, SHAPE)
    bound.train()
    for pairwise in (True, False):
        net.zero_grad()
        for _ in range(3):
            K = bound(pairwise=pairwise)
        assert torch.isfinite(K).all()
        assert float(K.detach().abs().max()) == 0.0
        K.sum().backward()
        for name, p in net.named_parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), (pairwise, name)
    cert = bound.certified()
    assert cert.value == 0.0


def test_no_nan_gradient_with_two_identical_logit_rows() -> None:
    net = small_net(4).eval()
    with torch.no_grad():
        net[5].weight[1].copy_(net[5].weight[0])
    bound = LipschitzBound(net, SHAPE)
    bound.train()
    bound().sum().backward()
    assert torch.isfinite(net[5].weight.grad).all()
    assert torch.isfinite(net[0].weight.grad).all()


def test_training_uses_batch_statistics_when_the_model_trains() -> None:
    """With the model in training mode, the BN scale uses the batch variance of the last
    forward pass, and gradients flow through it into the convolution weights."""
    net = small_net(5).train()
    bound = LipschitzBound(net, SHAPE).train()
    x = torch.randn(16, *SHAPE, generator=seeded(0))
    net(x)
    K = bound()
    assert torch.isfinite(K).all()
    K.sum().backward()
    assert net[1].weight.grad.abs().sum() > 0
    assert net[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- caching


def chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 5 * 5, 3))


def test_certified_is_cached_until_weights_change() -> None:
    net = chain()
    bound = LipschitzBound(net, (1, 5, 5))
    first = bound.certified()
    assert bound.certified() is first
    bound.train()
    bound()  # power-iteration steps do not change the certified numbers
    assert bound.certified().value == pytest.approx(first.value, rel=1e-12)
    with torch.no_grad():
        net[0].weight.mul_(2)
    second = bound.certified()
    assert second is not first
    assert second.value == pytest.approx(2 * first.value, rel=1e-9)
    assert torch.allclose(second.pairwise, 2 * first.pairwise, rtol=1e-9)
    with torch.no_grad():
        net[2].weight.mul_(-3)
    assert bound.certified().value == pytest.approx(6 * first.value, rel=1e-8)


def test_cache_sees_load_state_dict() -> None:
    net = chain()
    bound = LipschitzBound(net, (1, 5, 5))
    first = bound.certified().value
    sd = {k: v * 0.5 for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    assert bound.certified().value == pytest.approx(0.25 * first, rel=1e-9)


def test_cache_sees_in_place_change_through_data() -> None:
    """``p.data`` has its own version counter; an in-place change through it must not leave a
    stale (too small) certificate in the cache."""
    net = chain()
    bound = LipschitzBound(net, (1, 5, 5))
    first = bound.certified().value
    net[0].weight.data.mul_(2)
    assert bound.certified().value == pytest.approx(2 * first, rel=1e-9)


def test_cache_sees_a_replaced_parameter() -> None:
    net = chain()
    bound = LipschitzBound(net, (1, 5, 5))
    first = bound.certified().value
    net[2].weight = nn.Parameter(net[2].weight.detach() * 4)
    assert bound.certified().value == pytest.approx(4 * first, rel=1e-9)
