"""The fast ``conv_fft_bound`` (autocorrelation Gram, float32 screen, Cholesky certificate)
against the dense matrix and against the plain all-frequency computation it replaces
(``_conv_fft_bound_reference``: ``rfftn`` + ``eigvalsh`` at every frequency).

Soundness: never below the exact norm of the dense matrix (up to ``REL``) nor below the
reference. Sameness: at most ``FAST_REL`` above the reference (``sqrt(1 + eta)``, eta the
certificate's excess, is far inside it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lipmargin.bounds import norms

F64 = torch.float64
REL = 1e-9
FAST_REL = 1e-9
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_norm(fn, in_shape) -> float:
    d = math.prod(in_shape)
    basis = torch.eye(d, dtype=F64).reshape(d, *in_shape)
    with torch.no_grad():
        cols = fn(basis).reshape(d, -1)
    return float(np.linalg.norm(cols.numpy(), 2))


def exact_conv_norm(w, stride, padding, dilation, groups, size) -> float:
    fn = _CONV[w.dim() - 2]
    return dense_norm(
        lambda u: fn(u, w, None, stride, padding, dilation, groups), (w.shape[1] * groups, *size)
    )


def fast_and_reference(w, size, stride=1, padding=0, dilation=1, groups=1):
    fast = float(norms.conv_fft_bound(w, size, stride, padding, dilation, groups))
    ref = float(norms._conv_fft_bound_reference(w, size, stride, padding, dilation, groups))
    return fast, ref


def assert_same(fast: float, ref: float) -> None:
    # the fast bound is certified: never below the reference (beyond float64 rounding), and at
    # most FAST_REL above it
    assert fast >= ref * (1 - 1e-12), (fast, ref)
    assert fast <= ref * (1 + FAST_REL), (fast, ref)


# (dim, c_in, c_out, kernel, stride, padding, dilation, groups, size): wide enough (>= 32
# channels on the Gram side) for the float32 screen and the Cholesky certificate to run
WIDE_CASES = [
    (2, 36, 36, 3, 1, 1, 1, 1, (5, 5)),
    (2, 40, 48, 3, 2, 1, 1, 1, (6, 6)),
    (2, 16, 40, 1, 2, 0, 1, 1, (7, 7)),  # strided 1x1: one matrix for every frequency
    (2, 64, 64, 3, 1, 1, 1, 2, (4, 5)),
    (2, 36, 36, 3, 1, 2, 2, 1, (5, 4)),
    (1, 40, 40, 5, 1, 2, 1, 1, (12,)),
    (1, 48, 36, 4, 3, 1, 2, 1, (14,)),
]


@pytest.mark.parametrize("case", WIDE_CASES, ids=[str(i) for i in range(len(WIDE_CASES))])
def test_wide_conv_fft_bound_vs_dense_and_reference(case) -> None:
    dim, c_in, c_out, kernel, stride, padding, dilation, groups, size = case
    k = (kernel,) * dim
    w = torch.randn((c_out, c_in // groups, *k), generator=seeded(c_in + c_out), dtype=F64)
    exact = exact_conv_norm(w, stride, padding, dilation, groups, size)
    fast, ref = fast_and_reference(w, size, stride, padding, dilation, groups)
    assert fast >= exact * (1 - REL), (fast, exact)
    assert ref >= exact * (1 - REL), (ref, exact)
    assert_same(fast, ref)


@pytest.mark.parametrize(
    "shape, size, stride, padding, dilation, groups",
    [
        ((64, 64, 3, 3), (16, 16), 1, 1, 1, 1),
        ((128, 64, 3, 3), (16, 16), 2, 1, 1, 1),
        ((96, 48, 1, 1), (12, 12), 2, 0, 1, 1),
        ((64, 16, 3, 3), (12, 12), 1, 2, 2, 4),
        ((48, 1, 3, 3), (10, 10), 1, 1, 1, 48),  # depthwise: 1x1 Gram matrices
        ((40, 40, 5), (30,), 1, 2, 1, 1),
        ((32, 32, 3, 3, 3), (5, 6, 4), 1, 1, 1, 1),
        ((200, 100, 3, 3), (6, 6), 1, 1, 1, 1),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_equals_reference_on_random_kernels(
    shape, size, stride, padding, dilation, groups, seed
) -> None:
    w = torch.randn(shape, generator=seeded(seed), dtype=F64) / math.sqrt(math.prod(shape[1:]))
    fast, ref = fast_and_reference(w, size, stride, padding, dilation, groups)
    assert_same(fast, ref)


def _near_tied_kernel(c: int, eps: float, seed: int) -> torch.Tensor:
    """An orthogonal centre tap (every frequency's matrix has ALL singular values 1) plus a
    perturbation of size ``eps``: hundreds of frequencies whose top singular values agree to
    ~eps, the adversarial case for any screening (a trained Lipschitz net looks like this)."""
    g = seeded(seed)
    q, _ = torch.linalg.qr(torch.randn((c, c), generator=g, dtype=F64))
    w = eps * torch.randn((c, c, 3, 3), generator=g, dtype=F64)
    w[:, :, 1, 1] += q
    return w


@pytest.mark.parametrize("eps", [0.0, 1e-14, 1e-11, 1e-9, 1e-6, 1e-3])
@pytest.mark.parametrize("c", [8, 48])
def test_fast_equals_reference_when_frequencies_nearly_tie(eps, c) -> None:
    w = _near_tied_kernel(c, eps, seed=int(1e3 * c + 17))
    fast, ref = fast_and_reference(w, (12, 12), 1, 1)
    assert_same(fast, ref)
    if c == 8:  # small enough for the dense matrix
        exact = exact_conv_norm(w, 1, 1, 1, 1, (6, 6))
        fast6 = float(norms.conv_fft_bound(w, (6, 6), 1, 1))
        assert fast6 >= exact * (1 - REL)


def test_fast_handles_trained_like_orthogonal_conv_with_a_strided_shortcut() -> None:
    """Many frequencies tied at the top AND stride 2 (space-to-depth, 4 phases)."""
    w = _near_tied_kernel(32, 1e-8, seed=5)
    fast, ref = fast_and_reference(w, (16, 16), 2, 1)
    assert_same(fast, ref)


def test_zero_and_tiny_and_huge_kernels() -> None:
    z = torch.zeros((40, 40, 3, 3), dtype=F64)
    assert float(norms.conv_fft_bound(z, (8, 8), 1, 1)) == 0.0
    w = torch.randn((40, 40, 3, 3), generator=seeded(3), dtype=F64)
    for scale in (1e-200, 1e-30, 1.0, 1e30, 1e150):
        fast, ref = fast_and_reference(w * scale, (8, 8), 1, 1)
        assert math.isfinite(fast) and fast > 0
        assert_same(fast, ref)
    # one group all zero, the other not
    w2 = torch.randn((64, 16, 3, 3), generator=seeded(4), dtype=F64)
    w2[:32] = 0
    assert_same(*fast_and_reference(w2, (8, 8), 1, 1, 1, 2))


def test_max_gram_eigenvalue_is_certified_on_random_psd_stacks() -> None:
    """The certified maximum directly: never below the largest ``eigvalsh``, at most
    ``(1 + eta)`` above it; stacks where the power-iteration candidates are wrong (a matrix
    whose top eigenvector is orthogonal to every start vector's large components is not
    constructible, so use tiny top gaps and many ties instead)."""
    g = seeded(11)
    for n, nb, spread in [
        (40, 50, 1e-3),
        (64, 30, 1e-9),
        (33, 80, 0.0),
        (100, 8, 0.3),
        (160, 6, 1e-6),
    ]:
        a = torch.randn((nb, n, n), generator=g, dtype=F64) + 1j * torch.randn(
            (nb, n, n), generator=g, dtype=F64
        )
        q, _ = torch.linalg.qr(a)
        ev = torch.rand((nb, n), generator=g, dtype=F64) * 0.9
        ev[:, 0] = 1.0 + spread * torch.rand(nb, generator=g, dtype=F64)
        gram = (q * ev[:, None, :].to(q.dtype)) @ q.mH
        gram = (gram + gram.mH) / 2
        top = float(torch.linalg.eigvalsh(gram)[..., -1].max())
        mu = float(norms._max_gram_eigenvalue(norms._GramStack(gram)))
        assert mu >= top * (1 - 1e-13), (n, mu, top)
        assert mu <= top * (1 + 2e-9), (n, mu, top)


@pytest.mark.parametrize("hidden", [1, 6, 37])
def test_max_gram_eigenvalue_finds_a_maximum_the_subsampled_estimates_skip(hidden) -> None:
    """Candidate estimates run on every ``_ESTIMATE_STRIDE``-th matrix of a large stack: a
    maximum at an unsampled index (far above the rest, or barely) is still found, certified
    and not exceeded by more than ``eta``."""
    assert hidden % norms._ESTIMATE_STRIDE != 0 and norms._ESTIMATE_STRIDE > 1
    g = seeded(hidden)
    n, nb = 48, 64
    a = torch.randn((nb, n, n), generator=g, dtype=F64) + 1j * torch.randn(
        (nb, n, n), generator=g, dtype=F64
    )
    q, _ = torch.linalg.qr(a)
    ev = torch.rand((nb, n), generator=g, dtype=F64) * 0.9
    ev[:, 0] = 1.0
    ev[hidden, 0] = 1.5 if hidden != 6 else 1.0 + 1e-7
    gram = (q * ev[:, None, :].to(q.dtype)) @ q.mH
    gram = (gram + gram.mH) / 2
    top = float(torch.linalg.eigvalsh(gram)[..., -1].max())
    assert top == pytest.approx(float(ev[hidden, 0]), rel=1e-12)
    mu = float(norms._max_gram_eigenvalue(norms._GramStack(gram)))
    assert top * (1 - 1e-13) <= mu <= top * (1 + 2e-9), (mu, top)


@st.composite
def conv_configs(draw):
    dim = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    top = 48 if draw(st.booleans()) else 12  # wide: >= 32 on the Gram side runs the float32 path
    c_in = groups * draw(st.integers(1, top))
    c_out = groups * draw(st.integers(1, top))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    size = []
    for k, d, p in zip(kernel, dilation, padding, strict=True):
        lo = max(1, d * (k - 1) + 1 - 2 * p)
        size.append(draw(st.integers(lo, lo + (12 if dim == 1 else 6))))
    seed = draw(st.integers(0, 2**31 - 1))
    tie = draw(st.sampled_from([None, 0.0, 1e-10, 1e-4]))
    return dim, c_in, c_out, kernel, stride, padding, dilation, groups, tuple(size), seed, tie


@settings(max_examples=40, deadline=None)
@given(conv_configs())
def test_fast_equals_reference_property(cfg) -> None:
    dim, c_in, c_out, kernel, stride, padding, dilation, groups, size, seed, tie = cfg
    g = seeded(seed)
    w = torch.randn((c_out, c_in // groups, *kernel), generator=g, dtype=F64)
    if tie is not None and c_out == c_in and groups == 1:
        # a near-orthogonal centre tap: ties across frequencies
        q, _ = torch.linalg.qr(torch.randn((c_in, c_in), generator=g, dtype=F64))
        centre = tuple(k // 2 for k in kernel)
        w = tie * w
        w[(slice(None), slice(None), *centre)] += q
    fast, ref = fast_and_reference(w, size, stride, padding, dilation, groups)
    assert_same(fast, ref)
    if c_in * math.prod(size) <= 300:
        exact = exact_conv_norm(w, stride, padding, dilation, groups, size)
        assert fast >= exact * (1 - REL), (fast, exact)


def test_scipy_blas_is_held_to_one_thread_in_the_screens() -> None:
    """SciPy's OpenBLAS, used for large Cholesky screens, is limited to one thread while it
    runs (its spinning threads made certified() 35x slower beside busy processes, and 2x slower
    beside torch's own second thread)."""
    pytest.importorskip("scipy.linalg")
    from lipmargin.bounds.norms import _blas_controller, _blas_threads

    blas = [lib for lib in _blas_controller().info() if lib["user_api"] == "blas"]
    if not blas:
        pytest.skip("no BLAS library that threadpoolctl can control")
    with _blas_threads(1):
        from threadpoolctl import threadpool_info

        inside = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert inside and all(n == 1 for n in inside)
