"""Issue 14 rules (resampling, transposed convolutions, clamp/abs/where, padding modes, more
activations) against independent computations: the exact spectral norm of the dense float64
Jacobian of each linear map on its actual input shape (``torch.autograd.functional.jacobian``,
NumPy SVD), and the largest |f'| of each activation on a fine float64 grid."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipmargin.bounds import LipschitzBound
from lipmargin.bounds.rules.activations import HARDSIGMOID_LIPSCHITZ
from lipmargin.errors import UnsupportedOperationError

F64 = torch.float64
REL = 1e-9


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def bound(model: nn.Module, shape) -> float:
    """Certified bound of ``model`` (its output flattened to (N, K) logits)."""
    return LipschitzBound(nn.Sequential(model, nn.Flatten()), shape).certified().value


def jacobian_norm(model: nn.Module, shape, seed: int = 0) -> float:
    """Exact ``||J||_2`` of ``model`` at a random point (for a linear map: its norm)."""
    m = copy.deepcopy(model).double().eval()
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed), dtype=F64)
    with torch.no_grad():
        n_out = m(x).numel()
    jac = torch.autograd.functional.jacobian(m, x).reshape(n_out, -1)
    return float(np.linalg.norm(jac.numpy(), 2))


def check_exact(model: nn.Module, shape, *, exact: bool = True) -> tuple[float, float]:
    value = bound(model, shape)
    ref = jacobian_norm(model, shape)
    assert value >= ref * (1 - REL), (value, ref)
    if exact:
        assert value <= ref * 1.01, (value, ref)
    return value, ref


# --------------------------------------------------------------------------- interpolation

INTERPOLATE = [
    ("up2_nearest", nn.Upsample(scale_factor=2), (2, 5, 6), 2.0),
    ("up3x2_nearest", nn.Upsample(scale_factor=(3, 2)), (1, 4, 3), math.sqrt(6)),
    ("size_nearest", nn.Upsample(size=(7, 9)), (2, 4, 5), None),
    ("size_nearest_exact", nn.Upsample(size=(7, 4), mode="nearest-exact"), (1, 5, 6), None),
    ("down_nearest", nn.Upsample(size=(3, 2)), (1, 7, 5), None),
    ("bilinear", nn.Upsample(scale_factor=2, mode="bilinear"), (2, 4, 5), None),
    ("bilinear_ac", nn.Upsample(size=(9, 6), mode="bilinear", align_corners=True), (1, 4, 4), None),
    ("bilinear_1.5", nn.Upsample(scale_factor=1.5, mode="bilinear"), (1, 5, 4), None),
    ("linear1d", nn.Upsample(scale_factor=2.5, mode="linear"), (3, 7), None),
    ("linear1d_ac", nn.Upsample(size=11, mode="linear", align_corners=True), (2, 6), None),
    ("trilinear", nn.Upsample(scale_factor=2, mode="trilinear"), (1, 3, 2, 4), None),
    ("down_bilinear", nn.Upsample(size=(3, 3), mode="bilinear"), (1, 7, 8), None),
    ("UpsamplingNearest2d", nn.UpsamplingNearest2d(scale_factor=2), (2, 3, 4), 2.0),
    ("UpsamplingBilinear2d", nn.UpsamplingBilinear2d(size=(7, 5)), (1, 4, 3), None),
    (
        "F.interpolate",
        Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")),
        (1, 4, 4),
        None,
    ),
    (
        "F.interpolate_pos",
        Fn(lambda x: F.interpolate(x, (6, 7), None, "bilinear", True)),
        (2, 3, 5),
        None,
    ),
    ("F.interpolate_nearest", Fn(lambda x: F.interpolate(x, size=(5, 8))), (1, 3, 3), None),
    ("F.upsample_bilinear", Fn(lambda x: F.upsample_bilinear(x, (5, 6))), (1, 3, 4), None),
    ("size_from_shape", Fn(lambda x: F.interpolate(x, x.shape[-1] * 2)), (2, 3), math.sqrt(2)),
]


@pytest.mark.parametrize(
    ("name", "op", "shape", "expected"), INTERPOLATE, ids=[c[0] for c in INTERPOLATE]
)
@pytest.mark.filterwarnings("ignore:.*upsample.* is deprecated")
def test_interpolate_bound_is_the_exact_norm(name, op, shape, expected) -> None:
    value, _ = check_exact(nn.Sequential(op), shape)
    if expected is not None:
        assert value == pytest.approx(expected, rel=1e-8)


def test_interpolate_area_is_bounded() -> None:
    check_exact(nn.Sequential(nn.Upsample(size=(3, 4), mode="area")), (2, 7, 9), exact=False)


@pytest.mark.parametrize(
    "op",
    [
        nn.Upsample(scale_factor=2, mode="bicubic"),
        Fn(lambda x: F.interpolate(x, size=(3, 3), mode="bilinear", antialias=True)),
    ],
    ids=["bicubic", "antialias"],
)
def test_interpolate_other_modes_are_refused(op) -> None:
    with pytest.raises(UnsupportedOperationError, match="interpolate"):
        bound(nn.Sequential(op), (1, 6, 6))


# --------------------------------------------------------------------------- padding

PADS = [
    ("reflect1d", Fn(lambda x: F.pad(x, (2, 3), mode="reflect")), (2, 6)),
    ("reflect2d", Fn(lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect")), (2, 4, 5)),
    ("replicate1d", Fn(lambda x: F.pad(x, (3, 1), mode="replicate")), (1, 5)),
    ("replicate2d", Fn(lambda x: F.pad(x, (2, 2, 0, 3), "replicate")), (2, 4, 3)),
    ("replicate3d", Fn(lambda x: F.pad(x, (1, 0, 1, 1, 2, 0), mode="replicate")), (1, 3, 2, 3)),
    ("circular1d", Fn(lambda x: F.pad(x, (2, 2), mode="circular")), (2, 5)),
    ("circular2d", Fn(lambda x: F.pad(x, (1, 3, 2, 1), mode="circular")), (1, 4, 5)),
    ("constant", Fn(lambda x: F.pad(x, (1, 1), value=2.0)), (2, 5)),
    ("crop_replicate", Fn(lambda x: F.pad(x, (-1, 2), mode="replicate")), (2, 5)),
    ("ReflectionPad1d", nn.ReflectionPad1d((1, 3)), (2, 5)),
    ("ReflectionPad2d", nn.ReflectionPad2d(2), (1, 4, 4)),
    ("ReplicationPad1d", nn.ReplicationPad1d(2), (2, 4)),
    ("ReplicationPad2d", nn.ReplicationPad2d((1, 2, 0, 3)), (1, 3, 4)),
    ("CircularPad2d", nn.CircularPad2d(1), (2, 3, 3)),
    ("ZeroPad2d", nn.ZeroPad2d((1, 0, 2, 1)), (2, 3, 3)),
    ("ConstantPad1d", nn.ConstantPad1d(2, 3.5), (2, 4)),
    ("ConstantPad2d", nn.ConstantPad2d((1, 1, 0, 2), -1.0), (1, 3, 3)),
]


@pytest.mark.parametrize(("name", "op", "shape"), PADS, ids=[c[0] for c in PADS])
def test_padding_bound_is_the_exact_norm(name, op, shape) -> None:
    check_exact(nn.Sequential(op), shape)


def test_replicate_padding_copies_a_corner() -> None:
    # 1-D replicate padding (3, 1) of 5 entries: the first entry appears 4 times, but it is
    # a rank-one block; the exact norm is sqrt(4) = 2 (columns are orthogonal).
    value = bound(nn.Sequential(nn.ReplicationPad1d((3, 1))), (1, 5))
    assert value == pytest.approx(2.0, rel=1e-8)


# ------------------------------------------------------------------ transposed convolutions

# (dim, c_in, c_out, kernel, stride, padding, output_padding, dilation, groups, size)
CONV_T = [
    (1, 2, 3, 3, 1, 0, 0, 1, 1, (6,)),
    (1, 2, 2, 4, 2, 1, 1, 1, 2, (5,)),
    (1, 3, 2, 3, 3, 2, 2, 2, 1, (4,)),
    (1, 2, 1, 2, 1, 0, 1, 2, 1, (5,)),  # output_padding >= stride (allowed: < dilation)
    (2, 2, 3, 3, 2, 1, 1, 1, 1, (3, 4)),
    (2, 4, 2, (2, 3), (2, 1), (0, 1), (1, 0), (1, 2), 2, (3, 3)),
    (2, 1, 2, 4, 2, 1, 0, 1, 1, (4, 4)),
    (3, 2, 2, 2, 2, 0, 1, 1, 2, (2, 3, 2)),
]


def _conv_t_module(dim, c_in, c_out, k, s, p, op, d, g, seed=0):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    torch.manual_seed(seed)
    return cls(c_in, c_out, k, stride=s, padding=p, output_padding=op, dilation=d, groups=g)


@pytest.mark.parametrize("case", CONV_T)
def test_conv_transpose_module_bound_above_exact(case) -> None:
    dim, c_in, *_, size = case
    m = _conv_t_module(*case[:-1])
    value, ref = check_exact(nn.Sequential(m), (c_in, *size), exact=False)
    # the FFT bound of the adjoint convolution is close to exact on these small grids
    assert value <= ref * 2.0


class FunctionalConvT(nn.Module):
    def __init__(self, dim, weight, **kw) -> None:
        super().__init__()
        self.fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dim]
        self.weight = nn.Parameter(weight)
        self.kw = kw

    def forward(self, x):
        return self.fn(x, self.weight, None, **self.kw)


@pytest.mark.parametrize("case", CONV_T[:3] + CONV_T[4:6] + CONV_T[7:])
def test_conv_transpose_function_bound_above_exact(case) -> None:
    dim, c_in, c_out, k, s, p, op, d, g, size = case
    w = _conv_t_module(*case[:-1]).weight.detach()
    model = FunctionalConvT(dim, w, stride=s, padding=p, output_padding=op, groups=g, dilation=d)
    value = check_exact(model, (c_in, *size), exact=False)[0]
    module_value = bound(nn.Sequential(_conv_t_module(*case[:-1])), (c_in, *size))
    assert value == pytest.approx(module_value, rel=1e-9)


class ConvTOutputSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(x, output_size=[8, 7])


def test_conv_transpose_output_size_argument() -> None:
    check_exact(ConvTOutputSize(), (2, 4, 4), exact=False)


def test_conv_transpose_training_estimate_is_differentiable() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 3, stride=2), nn.Flatten(), nn.Linear(162, 3))
    lb = LipschitzBound(model, (2, 4, 4))
    lb.train()
    for _ in range(30):
        value = lb(pairwise=False)
    value.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    cert = lb.certified()
    assert float(value.detach()) <= cert.value * (1 + 1e-4)
    row = next(r for r in cert.layers if r.kind == "conv_transpose2d")
    assert row.estimate <= row.bound * (1 + 1e-9)


# --------------------------------------------------------------------------- unfold


UNFOLD = [
    ("overlap", Fn(lambda x: x.unfold(2, 3, 1)), (2, 7), math.sqrt(3)),
    ("overlap_step2", Fn(lambda x: x.unfold(-1, 5, 2)), (1, 9), math.sqrt(3)),
    ("disjoint", Fn(lambda x: x.unfold(1, 2, 2)), (6, 3), 1.0),
    ("gaps", Fn(lambda x: x.unfold(2, 2, 3)), (2, 8), 1.0),
    ("F.unfold", Fn(lambda x: F.unfold(x, 3)), (2, 5, 5), 3.0),
    (
        "F.unfold_stride",
        Fn(lambda x: F.unfold(x, (2, 3), stride=(2, 1), padding=1)),
        (1, 4, 5),
        None,
    ),
    ("F.unfold_dil", Fn(lambda x: F.unfold(x, 2, dilation=2, stride=1)), (1, 5, 4), None),
    ("nn.Unfold", nn.Unfold(kernel_size=(3, 2), stride=2, padding=(1, 0)), (2, 5, 4), None),
]


@pytest.mark.parametrize(("name", "op", "shape", "expected"), UNFOLD, ids=[c[0] for c in UNFOLD])
def test_unfold_bound_is_the_exact_norm(name, op, shape, expected) -> None:
    value, _ = check_exact(nn.Sequential(op), shape)
    if expected is not None:  # sqrt factors are rounded up by a relative 1e-12
        assert value == pytest.approx(expected, rel=2e-12)


def test_unfold_over_batch_is_refused() -> None:
    with pytest.raises(UnsupportedOperationError, match="batch"):
        bound(Fn(lambda x: x.unfold(0, 1, 1)), (3,))


# --------------------------------------------------------------------------- clamp / abs / where


class Where(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.register_buffer("mask", torch.tensor([True, False, True, False]))
        self.kind = kind

    def forward(self, x):
        if self.kind == "both":
            return torch.where(self.mask, self.a(x), self.b(x))
        if self.kind == "scalar":
            return torch.where(self.mask, self.a(x), 0.0)
        if self.kind == "method":
            return self.a(x).where(self.mask, -x)
        return torch.where(x > 0, x, 2 * x)  # condition depends on the input


def test_where_with_constant_condition() -> None:
    m = Where("both")
    la = np.linalg.norm(m.a.weight.detach().double().numpy(), 2)
    lb = np.linalg.norm(m.b.weight.detach().double().numpy(), 2)
    value, _ = check_exact(m, (4,), exact=False)
    assert value == pytest.approx(math.hypot(la, lb), rel=1e-8)
    assert check_exact(Where("scalar"), (4,), exact=False)[0] == pytest.approx(la, rel=1e-8)
    assert check_exact(Where("method"), (4,), exact=False)[0] == pytest.approx(
        math.hypot(la, 1.0), rel=1e-8
    )


def test_where_root_of_sum_of_squares_is_attained() -> None:
    # (t, 0) and (0, t), one entry from each: (t, t) has slope sqrt 2 = sqrt(1 + 1).
    class Pick(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.tensor([True, False]))

        def forward(self, x):
            return torch.where(self.mask, F.pad(x, (0, 1)), F.pad(x, (1, 0)))

    value, ref = check_exact(Pick(), (1,))
    assert ref == pytest.approx(math.sqrt(2))


def test_where_with_input_dependent_condition_is_refused() -> None:
    with pytest.raises(UnsupportedOperationError, match="step function"):
        bound(Where("data"), (4,))


CLAMPS = [
    ("torch.clamp", Fn(lambda x: torch.clamp(x, -0.5, 0.5)), 1.0),
    ("clamp_method", Fn(lambda x: x.clamp(min=0.1)), 1.0),
    ("clip", Fn(lambda x: torch.clip(x, max=0.2)), 1.0),
    ("clip_method", Fn(lambda x: x.clip(-1, 1)), 1.0),
    ("clamp_min", Fn(lambda x: x.clamp_min(0.0)), 1.0),
    ("clamp_max", Fn(lambda x: torch.clamp_max(x, 0.3)), 1.0),
    ("abs", Fn(torch.abs), 1.0),
    ("abs_method", Fn(lambda x: x.abs()), 1.0),
    ("abs_builtin", Fn(lambda x: abs(x)), 1.0),
    ("clamp_by_input", Fn(lambda x: torch.clamp(x, min=-x)), math.sqrt(2)),
]


@pytest.mark.parametrize(("name", "op", "expected"), CLAMPS, ids=[c[0] for c in CLAMPS])
def test_clamp_and_abs(name, op, expected) -> None:
    value = bound(op, (6,))
    assert value == pytest.approx(expected, rel=1e-12)
    for seed in range(3):
        assert jacobian_norm(op, (6,), seed) <= value * (1 + REL)


# --------------------------------------------------------------------------- activations

GRID = torch.linspace(-30.0, 30.0, 600_001, dtype=F64)


def grid_max_slope(fn) -> float:
    """max |f'| on the grid (autograd) and of the finite differences between grid points."""
    x = GRID.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    with torch.no_grad():
        y = fn(GRID)
        fd = ((y[1:] - y[:-1]) / (GRID[1:] - GRID[:-1])).abs().max()
    return max(float(g.abs().max()), float(fd))


class ConstPReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.tensor([-2.0]))

    def forward(self, x):
        return F.prelu(x, self.w)


ACTIVATIONS = [
    ("mish", nn.Mish(), None),
    ("F.mish", Fn(F.mish), None),
    ("selu", nn.SELU(), 1.0507009873554805 * 1.6732632423543772),
    ("F.selu", Fn(F.selu), None),
    ("torch.selu", Fn(torch.selu), None),
    ("F.hardswish", Fn(F.hardswish), 1.5),
    ("F.hardsigmoid", Fn(F.hardsigmoid), HARDSIGMOID_LIPSCHITZ),
    ("logsigmoid", nn.LogSigmoid(), 1.0),
    ("F.logsigmoid", Fn(F.logsigmoid), 1.0),
    ("tanhshrink", nn.Tanhshrink(), 1.0),
    ("F.tanhshrink", Fn(F.tanhshrink), 1.0),
    ("softshrink", nn.Softshrink(0.7), 1.0),
    ("F.softshrink", Fn(lambda x: F.softshrink(x, 0.3)), 1.0),
    ("softplus", nn.Softplus(beta=0.5, threshold=25), 1.0),
    ("F.softplus", Fn(lambda x: F.softplus(x, beta=3.0)), 1.0),
    ("threshold_continuous", nn.Threshold(0.5, 0.5), 1.0),
    ("F.threshold", Fn(lambda x: F.threshold(x, -1.0, -1.0)), 1.0),
    ("F.prelu", ConstPReLU(), 2.0),
    ("rrelu", nn.RReLU(0.1, 0.3), 1.0),
    ("rrelu_steep", nn.RReLU(2.0, 4.0), 3.0),
    ("F.rrelu", Fn(lambda x: F.rrelu(x, 1.5, 2.5)), 2.0),
    ("hardshrink0", nn.Hardshrink(0.0), 1.0),
    ("celu", nn.CELU(alpha=0.3), 1.0),
    ("F.celu", Fn(lambda x: F.celu(x, 2.0)), 1.0),
    ("torch.celu", Fn(torch.celu), 1.0),
    ("x.relu_()", Fn(lambda x: (2 * x).relu_()), 2.0),
    ("x.sigmoid_()", Fn(lambda x: (x + 1).sigmoid_()), 0.25),
    ("x.clamp_()", Fn(lambda x: (x - 1).clamp_(min=0.0)), 1.0),
    ("x.abs_()", Fn(lambda x: (x * 1).abs_()), 1.0),
]


@pytest.mark.parametrize(("name", "act", "expected"), ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_activation_constant_against_grid(name, act, expected) -> None:
    value = bound(nn.Sequential(act), (5,))
    slope = grid_max_slope(copy.deepcopy(act).double().eval())
    assert value >= slope * (1 - 1e-6), (name, value, slope)
    assert value <= slope * (1 + 1e-3) + 1e-9, (name, value, slope)
    if expected is not None:
        assert value == pytest.approx(expected, rel=1e-9)


def test_mish_constant_is_rigorous() -> None:
    # the docstring's argument: grid step 1e-5 on [-20, 20] and |f''| < 4
    from lipmargin.bounds.rules.activations import MISH_LIPSCHITZ

    x = torch.linspace(-20, 20, 4_000_001, dtype=F64).requires_grad_(True)
    (g,) = torch.autograd.grad(F.mish(x).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), x)
    assert float(g2.abs().max()) < 4.0
    assert float(g.detach().abs().max()) + 4.0 * 1e-5 / 2 <= MISH_LIPSCHITZ


JUMPS = [
    ("hardshrink", nn.Hardshrink(0.5), "jumps"),
    ("F.hardshrink", Fn(F.hardshrink), "jumps"),
    ("threshold", nn.Threshold(0.1, 20.0), "jumps"),
    ("F.threshold", Fn(lambda x: F.threshold(x, 0.0, 1.0)), "jumps"),
    ("softplus_low_threshold", nn.Softplus(threshold=1.0), "threshold"),
    ("F.softplus_low_threshold", Fn(lambda x: F.softplus(x, 2.0, 5.0)), "threshold"),
    ("F.rrelu_training", Fn(lambda x: F.rrelu(x, training=True)), "random"),
    ("celu_negative_alpha", nn.CELU(alpha=-1.0), "unbounded"),
    ("F.celu_negative_alpha", Fn(lambda x: F.celu(x, -0.5)), "unbounded"),
]


@pytest.mark.parametrize(("name", "act", "match"), JUMPS, ids=[a[0] for a in JUMPS])
def test_discontinuous_activations_are_refused(name, act, match) -> None:
    with pytest.raises(UnsupportedOperationError, match=match):
        bound(nn.Sequential(act), (5,))


# --------------------------------------------------------------------------- SiLU hint


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x * x.sigmoid(),
        lambda x: torch.sigmoid(x) * x,
        lambda x: torch.mul(x, F.sigmoid(x)),
    ],
    ids=["method", "function", "torch.mul"],
)
def test_product_with_own_sigmoid_suggests_silu(fn) -> None:
    with pytest.raises(UnsupportedOperationError, match="nn.SiLU"):
        bound(Fn(fn), (4,))


def test_product_with_own_sigmoid_module_suggests_silu() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Sigmoid()

        def forward(self, x):
            return x * self.s(x)

    with pytest.raises(UnsupportedOperationError, match="SiLU"):
        bound(M(), (4,))


def test_other_products_get_no_silu_hint() -> None:
    with pytest.raises(UnsupportedOperationError, match="multiplies") as info:
        bound(Fn(lambda x: x * torch.tanh(x)), (4,))
    assert "SiLU" not in str(info.value)


# ------------------------------------------------ permutations and maxima (session 7)
class _ConvThen(nn.Module):
    """conv -> op -> flatten: the op's rule against the exact norm of the whole map."""

    def __init__(self, op, c_out: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(2, c_out, 3, padding=1)
        self.op = op

    def forward(self, x):
        return self.op(self.conv(x))


PERMUTATIONS = [
    ("flip", lambda h: torch.flip(h, (2, 3))),
    ("flip method", lambda h: h.flip(-1)),
    ("fliplr", lambda h: torch.fliplr(h)),
    ("roll", lambda h: torch.roll(h, shifts=(1, 2), dims=(2, 3))),
    ("roll method", lambda h: h.roll(3, -1)),
    ("rot90", lambda h: torch.rot90(h, 1, (2, 3))),
    ("pixel_shuffle", nn.PixelShuffle(2)),
    ("pixel_unshuffle", nn.PixelUnshuffle(2)),
    ("F.pixel_shuffle", lambda h: F.pixel_shuffle(h, 2)),
    ("channel_shuffle", nn.ChannelShuffle(2)),
]


@pytest.mark.parametrize("name,op", PERMUTATIONS, ids=[p[0] for p in PERMUTATIONS])
def test_permutations_keep_the_exact_norm(name, op) -> None:
    fn = op if isinstance(op, nn.Module) else Fn(op)
    with_op = check_exact(_ConvThen(fn).double(), (2, 6, 6), exact=False)[0]
    without = bound(_ConvThen(nn.Identity()).double(), (2, 6, 6))  # the conv's own bound
    assert with_op == pytest.approx(without, rel=1e-9)


def test_flip_over_the_batch_is_refused() -> None:
    with pytest.raises(Exception, match="depends on the other examples|batch"):
        LipschitzBound(nn.Sequential(Fn(lambda x: torch.flip(x, (0,))), nn.Flatten()), (3,))


MAXIMA = [
    ("maximum of two maps", lambda h: torch.maximum(h[:, :2], h[:, 2:])),
    ("minimum with a constant", lambda h: torch.minimum(h, torch.zeros(1))),
    ("amax over channels", lambda h: h.amax(1)),
    ("amin over space", lambda h: torch.amin(h, (2, 3))),
    ("max over dim, values", lambda h: torch.max(h, 1)[0]),
    ("max method over dim", lambda h: h.max(dim=-1)[0]),
    ("max of two maps", lambda h: torch.max(h[:, :2], h[:, 2:])),
]


@pytest.mark.parametrize("name,op", MAXIMA, ids=[m[0] for m in MAXIMA])
def test_maxima_are_bounded(name, op) -> None:
    model = _ConvThen(Fn(op)).double()
    value = bound(model, (2, 5, 5))
    for seed in range(5):  # a local Jacobian norm is a lower bound of the Lipschitz constant
        assert value >= jacobian_norm(model, (2, 5, 5), seed=seed) * (1 - REL)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: x.amax(0, keepdim=True),
        lambda x: torch.amin(x, (0, 1), keepdim=True),
        lambda x: torch.max(x, 0, keepdim=True)[0],
        lambda x: x.min(dim=0, keepdim=True)[0],
    ],
)
def test_maxima_over_the_batch_are_refused(op) -> None:
    with pytest.raises(UnsupportedOperationError, match="batch dimension"):
        LipschitzBound(nn.Sequential(Fn(op), nn.Flatten()), (3, 4))


def test_max_indices_are_refused() -> None:
    with pytest.raises(UnsupportedOperationError, match="non-floating"):
        LipschitzBound(nn.Sequential(Fn(lambda x: torch.max(x, 1)[1].float())), (3, 4))


# ------------------------------------------- convolutions with a padding_mode (session 7)
PADDING_MODES = [
    (mode, dim, stride, dilation)
    for mode in ("reflect", "replicate", "circular")
    for dim, stride, dilation in ((1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 1, 2))
]


@pytest.mark.parametrize("mode,dim,stride,dilation", PADDING_MODES)
def test_conv_with_padding_mode_is_bounded(mode, dim, stride, dilation) -> None:
    """Traced through as F.pad then an unpadded convolution: bound >= the exact norm of the
    (linear) map on its input shape."""
    torch.manual_seed(5)
    conv_cls = nn.Conv1d if dim == 1 else nn.Conv2d
    conv = conv_cls(2, 3, 3, stride=stride, padding=2, dilation=dilation, padding_mode=mode)
    shape = (2, 9) if dim == 1 else (2, 7, 7)
    value, ref = check_exact(conv.double(), shape, exact=False)
    assert value <= 3.0 * ref  # the pad's copies and the conv's norm, multiplied


def test_conv_subclass_with_own_forward_and_padding_mode_is_traced_through() -> None:
    class Mine(nn.Conv2d):  # a user's class: fx traces through its forward, F.pad included
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(6)
    value, ref = check_exact(
        Mine(2, 3, 3, padding=1, padding_mode="reflect").double(), (2, 6, 6), exact=False
    )
    assert value <= 3.0 * ref
