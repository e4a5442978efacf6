"""Operator norms of linear maps: guaranteed upper bounds and power-iteration estimates.

Three kinds of number live here, and every function says which one it returns:

* a **guaranteed upper bound** (``conv_fft_bound``, ``spectral_norm_exact``,
  ``conv_closed_form_bound``, ``schur_bound``): never below the true operator norm, up to
  the relative slack ``FLOAT64_SLACK`` applied to cover float64 rounding;
* an **estimate** (``power_iteration``): converges to the norm from below, so it can under-estimate;
* an **exact dense norm** (``dense_operator_norm``): for tests on small inputs only.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Relative inflation applied to every float64 guaranteed bound (SVD / FFT rounding is ~1e-15).
FLOAT64_SLACK = 1e-9

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _inflate(value: torch.Tensor) -> torch.Tensor:
    return value * (1.0 + FLOAT64_SLACK)


def top_singular_value(m: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in a (batched, possibly complex) float64 stack.

    Computed as ``sqrt(lambda_max(G))`` with ``G`` the Gram matrix of the smaller side
    (``eigvalsh`` is much faster than an SVD). Backward-stable: the error of ``lambda_max`` is
    about ``n * eps * sigma^2``, i.e. ~1e-13 relative for n in the thousands, far inside
    ``FLOAT64_SLACK``.
    """
    # Scale by the largest entry first: squaring a tiny (< 1e-154) matrix would underflow to a
    # certified 0, squaring a huge one overflow.
    scale = m.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    m = m / scale
    mh = m.mH if m.is_complex() else m.transpose(-2, -1)
    gram = m @ mh if m.shape[-2] <= m.shape[-1] else mh @ m
    top = torch.linalg.eigvalsh(gram)[..., -1]
    return torch.sqrt(top.clamp_min(0.0)) * scale[..., 0, 0]


def spectral_norm_exact(weight: torch.Tensor) -> torch.Tensor:
    """Guaranteed upper bound of ``||W||_2`` of a matrix: float64 SVD plus ``FLOAT64_SLACK``.

    Paper §5 / release: the exact spectral norm of fully connected layers at evaluation.
    """
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    return _inflate(top_singular_value(w))


def _as_tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return t * n
    return t


def conv_padding(
    padding: int | str | Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """(left, right) zero padding per spatial axis, resolving torch's ``'same'``/``'valid'``."""
    n = len(kernel)
    if padding == "valid":
        return tuple((0, 0) for _ in range(n))
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' requires stride 1")
        out = []
        for k, d in zip(kernel, dilation, strict=True):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    p = _as_tuple(padding, n)
    return tuple((a, a) for a in p)


def _space_to_depth_kernel(
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: int | Sequence[int],
    padding: int | str | Sequence[int],
    dilation: int | Sequence[int],
) -> tuple[torch.Tensor, list[int]]:
    """Steps 1-2 of ``conv_fft_bound``: the float64 stride-1 kernel ``(C_out, C_in', q...)`` after
    dilation and space-to-depth, and the circular grid size ``M`` it acts on."""
    w = weight.detach().to(torch.float64)
    nsp = w.dim() - 2
    if nsp < 1:
        raise ValueError("convolution weight must have at least 3 dimensions")
    kernel = tuple(w.shape[2:])
    stride_t = _as_tuple(stride, nsp)
    dil = _as_tuple(dilation, nsp)
    pads = conv_padding(padding, kernel, dil, stride_t)
    size = _as_tuple(tuple(input_size), nsp)
    c_out, cin_g = w.shape[0], w.shape[1]
    # Dilate the kernel: effective kernel with zeros between taps.
    eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dil, strict=True))
    if any(d != 1 for d in dil):
        wd = w.new_zeros((c_out, cin_g, *eff))
        idx = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in dil)
        wd[idx] = w
        w = wd
    # Pad the effective kernel to a multiple of the stride, then space-to-depth it.
    grid = []
    kq = []
    for e, s, (pl, pr), h in zip(eff, stride_t, pads, size, strict=True):
        kq.append(-(-e // s))
        grid.append(max(-(-(h + pl + pr) // s), -(-e // s)))
    pad_spec: list[int] = []
    for e, s, q in reversed(list(zip(eff, stride_t, kq, strict=True))):
        pad_spec += [0, q * s - e]
    w = F.pad(w, pad_spec)
    # (c_out, cin_g, q1*s1, q2*s2, ...) -> (c_out, cin_g * prod(s), q1, q2, ...)
    shape: list[int] = [c_out, cin_g]
    for q, s in zip(kq, stride_t, strict=True):
        shape += [q, s]
    w = w.reshape(shape)
    perm = [0, 1] + [3 + 2 * i for i in range(nsp)] + [2 + 2 * i for i in range(nsp)]
    w = w.permute(perm).reshape(c_out, cin_g * math.prod(stride_t), *kq)
    return w, grid


def _conv_fft_bound_reference(
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The plain form of ``conv_fft_bound`` (its steps 1-4): ``rfftn`` of the kernel and
    ``eigvalsh`` of the Gram matrix at EVERY frequency. Same guarantee, ~10x slower on wide
    layers; kept as the reference the fast path is tested against."""
    w, grid = _space_to_depth_kernel(weight, input_size, stride, padding, dilation)
    c_out = w.shape[0]
    if c_out % groups:
        raise ValueError("out_channels must be divisible by groups")
    nsp = w.dim() - 2
    spec = torch.fft.rfftn(w, s=grid, dim=tuple(range(2, 2 + nsp)))
    # (c_out, cin', f...) -> (f, groups, c_out/g, cin')
    spec = spec.reshape(groups, c_out // groups, spec.shape[1], -1).permute(3, 0, 1, 2)
    return _inflate(top_singular_value(spec).max())


def conv_fft_bound(
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Guaranteed upper bound of the L2 operator norm of a zero-padded N-d convolution.

    The convolution acts on inputs of spatial size ``input_size`` (its actual input shape,
    paper Thm. 1 setting) with any stride, padding, dilation and groups.
    Derivation (shared reference notes §2, "deterministic alternative"):

    1. Zero padding embeds the input isometrically into a grid of size ``h + p_l + p_r``.
    2. Stride ``s``: split every padded position ``s*q + r`` into phase ``r`` and coarse index
       ``q`` (space-to-depth). This is a permutation (an isometry, after padding the grid with
       zeros to a multiple of ``s``), and turns the strided convolution into a stride-1
       convolution with ``C_in * prod(s)`` channels on a grid of size ``M = ceil((h+p)/s)``.
    3. The stride-1 "valid" convolution on that grid reads only in-grid positions, so it is a
       restriction (output selection) of the circular convolution on the ``M`` grid; its norm is
       at most the circular one.
    4. The circular convolution is block-diagonalised by the DFT: its norm is exactly the largest
       singular value of the ``C_out x C_in`` matrix ``K(w)`` of kernel DFT coefficients over all
       frequencies ``w`` of the grid. Groups give a block-diagonal map, whose norm is the max over
       groups.

    The maximum of step 4 is computed without an eigen-decomposition per frequency
    (``_max_gram_eigenvalue``, where the full argument is): the Gram matrices
    ``G(w) = K(w) K(w)^H`` (smaller side) come from the real kernel autocorrelation and one DFT
    matrix product (``_FrequencyGrams``); the largest eigenvalue ``lam`` is computed
    (``eigvalsh``) only at a few candidate frequencies; every other frequency is PROVEN to
    satisfy ``G(w) < mu I``, ``mu = lam (1 + eta)``, ``eta = 1e-11`` (more for layers wider than
    ~120, 4.4e-11 at 256), by a successful Cholesky factorisation of ``s I - G(w)`` whose margin
    ``mu - s`` covers the factorisation's rounding (Rump's theorem) and the rounding of
    ``G(w)`` itself (a float32 screen first, float64 for what it leaves); a frequency that
    fails gets its own ``eigvalsh``. The result is therefore never below the exact maximum (up
    to the float64 rounding of the autocorrelation that ``FLOAT64_SLACK`` covers, as it covers
    the FFT's in the reference) and at most ``sqrt(1 + eta)`` above the plain all-frequency
    computation ``_conv_fft_bound_reference``. A 1x1 kernel (after space-to-depth) has one
    matrix for every frequency: solved once, exactly as the reference.

    Computed in float64 and inflated by ``FLOAT64_SLACK``. Returns a 0-d float64 tensor.
    """
    w, grid = _space_to_depth_kernel(weight, input_size, stride, padding, dilation)
    c_out = w.shape[0]
    if c_out % groups:
        raise ValueError("out_channels must be divisible by groups")
    return _inflate(_circulant_norm(w, grid, groups))


#: Relative excess ``eta`` of the certified maximum over the computed one (see
#: ``_max_gram_eigenvalue``); the square root of ``1 + eta`` reaches the returned norm.
_CERT_ETA = 1e-11
_U64 = 2.0**-53
_U32 = 2.0**-24
#: Matrices per round whose largest eigenvalue is computed (``eigvalsh``) as candidates.
_N_CANDIDATES = 2
#: Matrices left after a float32 round that go straight to the float64 test (a Cholesky each,
#: cheaper than new estimates and candidates; a failure gets its own ``eigvalsh``).
_FEW_LEFT = 16
#: Lanczos steps of the candidate estimates over the whole stack.
_LANCZOS_STEPS = 6
#: Candidate estimates on every k-th matrix of a large stack (``_subsampled_estimates``).
_ESTIMATE_STRIDE = 4


def _circulant_norm(w: torch.Tensor, grid: Sequence[int], groups: int) -> torch.Tensor:
    """Norm (up to rounding and ``_CERT_ETA``) of the circular stride-1 convolution with kernel
    ``w`` ``(C_out, C_in', q...)`` on ``grid``: ``max_w ||K(w)||_2`` over the DFT grid, per
    group. Not inflated."""
    kq = tuple(w.shape[2:])
    c_out, cin = w.shape[0], w.shape[1]
    top = w.abs().amax()
    if not bool(top > 0):
        return top.new_zeros(())
    if not torch.isfinite(top):
        return top.new_full((), math.inf)
    # Exact power-of-two scaling: the largest entry in [0.5, 1); no rounding, no overflow.
    _, exp = torch.frexp(top)
    w = torch.ldexp(w, -exp)
    # Input channels (of the space-to-depth kernel) that are zero in every group and tap are
    # zero columns of every K(w): dropping them changes no singular value (a strided 1x1
    # convolution keeps 1 phase in prod(s)).
    w = w.reshape(groups, c_out // groups, cin, -1)
    used = w.abs().amax(dim=(0, 1, 3)) > 0
    if not bool(used.all()):
        w = w[:, :, used]
    # Taps as a leading axis: (groups, T, rows, cols), with rows the smaller side; K(w)^H K(w)
    # and K(w) K(w)^H have the same non-zero eigenvalues.
    wt = w.permute(0, 3, 1, 2)
    if wt.shape[-2] > wt.shape[-1]:
        wt = wt.transpose(-2, -1)
    lam = _max_gram_eigenvalue(_FrequencyGrams(wt.contiguous(), kq, grid))
    return torch.sqrt(lam) * torch.ldexp(torch.ones_like(lam), exp)


class _FrequencyGrams:
    """The Gram matrices ``G(w) = K(w) K(w)^H`` of a kernel at the ``rfftn`` half of the DFT
    grid (``G(-w)`` is the complex conjugate: the same eigenvalues), built on demand from the
    real kernel autocorrelation, as ``-G`` (the sign the Cholesky tests want).

    ``K(w) = sum_t W_t e^{-i w.t}`` over the taps ``t``, so ``G(w) = sum_d B_d e^{-i w.d}`` with
    ``B_d = sum_{t - u = d} W_t W_u^T`` (real) and ``B_{-d} = B_d^T``: one GEMM per offset
    ``d >= 0`` (about half of the tap pairs). Then ``Re G = sum_d cos(w.d) S_d`` and
    ``Im G = -sum_d sin(w.d) N_d`` with ``S_d = B_d + B_d^T`` (``S_0 = B_0``, symmetrised) and
    ``N_d = B_d - B_d^T``, exactly symmetric / antisymmetric: one real GEMM for any set of
    frequencies, written straight into the (re, im) layout of a complex tensor.

    "The" matrix ``G*(w)`` below is that sum evaluated exactly from the stored ``S_d``, ``N_d``
    and rounded ``cos``/``sin`` (exactly Hermitian); it differs from the true Gram matrix by the
    float64 rounding of ``B_d`` and of the angles, the kind of rounding the reference computation
    has too and ``FLOAT64_SLACK`` covers. A computed stack differs from ``G*`` entrywise by at
    most ``(2D + 6) u T`` with ``T = sum_d |S_d| + |N_d|`` (a dot product of length ``2D`` with
    coefficients of modulus <= 1, plus the conversions to the working precision), so in 2-norm
    by at most ``err(u) = (2D + 6) u ||T||_F`` per group (``err32``, ``err64``).
    """

    def __init__(self, wt: torch.Tensor, kq: Sequence[int], grid: Sequence[int]) -> None:
        g, n_taps, n, _ = wt.shape
        taps = list(itertools.product(*(range(q) for q in kq)))
        index = {t: i for i, t in enumerate(taps)}
        pairs: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for t in taps:
            for u in taps:
                d = tuple(a - b for a, b in zip(t, u, strict=True))
                if d >= (0,) * len(d):  # lexicographically non-negative offsets
                    pairs.setdefault(d, []).append((index[t], index[u]))
        offsets = sorted(pairs)
        nd = len(offsets)
        x = wt.new_zeros((2 * nd, g * n * n, 2))
        t_sum = wt.new_zeros((g, n, n))  # sum_d |S_d| + |N_d|
        taps_first = wt.permute(0, 2, 1, 3)  # (g, n, T, cols)
        for k, d in enumerate(offsets):
            ti = torch.tensor([a for a, _ in pairs[d]])
            ui = torch.tensor([b for _, b in pairs[d]])
            left = taps_first.index_select(2, ti).reshape(g, n, -1)
            right = left if not any(d) else taps_first.index_select(2, ui).reshape(g, n, -1)
            b = left @ right.transpose(-2, -1)
            bt = b.transpose(-2, -1)
            if any(d):
                sym, anti = b + bt, b - bt
                x[k, :, 0] = sym.reshape(-1)
                x[nd + k, :, 1] = anti.reshape(-1)
                t_sum += sym.abs() + anti.abs()
            else:
                sym = (b + bt) * 0.5  # exactly symmetric
                x[k, :, 0] = sym.reshape(-1)
                t_sum += sym.abs()
        # Frequencies of the rfftn half grid; angles w.d = 2 pi frac reduced exactly in integers.
        axes = [torch.arange(m, dtype=torch.int64) for m in grid[:-1]]
        axes.append(torch.arange(grid[-1] // 2 + 1, dtype=torch.int64))
        if n_taps == 1:  # a 1x1 kernel (after space-to-depth): G(w) is the same at every w
            axes = [a[:1] for a in axes]
        freq = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))
        dmat = torch.tensor(offsets, dtype=torch.int64).reshape(-1, len(grid))
        size = torch.tensor(list(grid), dtype=torch.int64)
        turns = ((freq[:, None, :] * dmat[None, :, :]) % size).to(torch.float64) / size
        angle = 2.0 * math.pi * turns.sum(-1)  # (F, D)
        # coefficients [-cos, sin] give -G
        self.coef = torch.cat([-torch.cos(angle), torch.sin(angle)], dim=1)
        self.x = x.reshape(2 * nd, -1)
        self.groups, self.n, self.nf = g, n, freq.shape[0]
        self.count = self.nf * g
        t_fro = torch.linalg.vector_norm(t_sum, dim=(-2, -1)) * (1.0 + 1e-6)
        self.err64 = (2 * nd + 6) * _U64 * t_fro  # (g,)
        self.err32 = (2 * nd + 6) * _U32 * t_fro
        self._x32: torch.Tensor | None = None

    def neg(self, idx: torch.Tensor | None = None, single: bool = False) -> torch.Tensor:
        """``-G`` of the matrices ``idx`` (frequency-major, group-minor; all when None), as a
        contiguous complex128 (complex64 when ``single``) stack ``(k, n, n)``."""
        g, n = self.groups, self.n
        x = self.x
        coef = self.coef
        if single:
            if self._x32 is None:
                self._x32 = self.x.to(torch.float32)
            x, coef = self._x32, coef.to(torch.float32)
        if idx is None:
            out = coef @ x
            return torch.view_as_complex(out.reshape(-1, n, n, 2))
        f, grp = idx // g, idx % g
        uf, inv = torch.unique(f, return_inverse=True)
        out = torch.view_as_complex((coef[uf] @ x).reshape(-1, g, n, n, 2))
        return out[inv, grp]


class _GramStack:
    """An explicit stack of Hermitian matrices ``G`` in the interface of ``_FrequencyGrams``
    (each its own group): ``G*`` is the stack itself, exact in float64, and its complex64
    rounding is off by at most ``u32 ||G||_F``. For tests of ``_max_gram_eigenvalue``."""

    def __init__(self, gram: torch.Tensor) -> None:
        self.gram = gram.to(torch.complex128)
        self.count = self.groups = gram.shape[0]
        self.n = gram.shape[-1]
        fro = torch.linalg.vector_norm(torch.view_as_real(self.gram), dim=(-3, -2, -1))
        self.err64 = torch.zeros_like(fro)
        self.err32 = _U32 * fro * (1.0 + 1e-6)

    def neg(self, idx: torch.Tensor | None = None, single: bool = False) -> torch.Tensor:
        out = -(self.gram if idx is None else self.gram[idx])
        return out.to(torch.complex64) if single else out.clone()


def _max_gram_eigenvalue(grams: _FrequencyGrams | _GramStack) -> torch.Tensor:
    """Certified ``max_b lambda_max(G*_b)`` over all frequencies and groups, from above.

    Returns ``mu`` with every ``lambda_max(G*_b) <= mu`` and ``mu <= (1 + eta) max_b
    eigvalsh(G_b)[-1]`` (the plain maximum over all ``eigvalsh``, which the reference computes)
    up to ``err64``, ~1e-13 relative. ``G*`` is defined in ``_FrequencyGrams``, ``u`` is the
    unit roundoff of the precision at hand; only lower triangles are read by LAPACK, so a
    computed matrix means the Hermitian matrix of its lower triangle (within ``err`` of ``G*``
    as well, ``T`` being symmetric).

    1. Candidates: batched Lanczos (complex64, 6 steps) gives a Ritz value per matrix, on
       every ``_ESTIMATE_STRIDE``-th matrix of a large stack (ESTIMATES, only used to
       choose: ``_subsampled_estimates``); ``eigvalsh`` of the best two (float64, plus
       ``err64``) gives ``lam``, and ``mu = lam (1 + eta)``. Every later step only shows
       ``lambda_max(G*_b) <= mu``, or computes ``lambda_max(G_b)`` by ``eigvalsh``.
    2. A matrix with a computed diagonal entry ``G_ii > mu`` is sent to ``eigvalsh``; every
       other one has ``G_ii <= mu``, which bounds the rounding of the diagonal shifts below.
    3. Cholesky certificate (Rump, "Verification of positive definiteness", BIT 46, 2006): if
       the floating-point Cholesky factorisation of a Hermitian ``A`` runs to completion
       (LAPACK ``?potrf`` info 0), the computed factor satisfies ``R^H R = A + E`` with
       ``|E| <= gamma |R^H||R|``, hence ``||E||_2 <= c tr(A)``, ``c = gamma / (1 - gamma)``,
       and ``A + E`` is positive definite, so ``lambda_min(A) > -c tr(A)``. We use
       ``gamma = 4 (n + 3) u`` (``gamma_{n+1}`` of the real analysis, doubled for complex
       arithmetic and rounded up). With ``A = fl(s I - G)`` (the shift rounds the diagonal by
       ``<= u (s + |s - G_ii|) <= 3.1 u mu``) success proves ``lambda_max(G*) < s + c tr(A) +
       3.1 u mu + err``; the shift ``s`` is chosen per matrix from its trace so that this is
       below ``mu``, and the inequality is checked after the fact from the computed ``tr(A)``
       (positive diagonal, summed in float64).
    4. First in float32 (when ``32 <= n``, ``c32 n <= 5%`` and ``err32 <= 1e-3 lam``, which
       keeps the diagonal rounding below ``3.2 u32 mu``): every matrix it clears is done.
       Where more than ``_FEW_LEFT`` are left, the candidates were not the maximum: sharper
       estimates of those left, ``eigvalsh`` of their best two, a larger ``mu``, and the
       float32 test again on those left (a cleared matrix stays below any larger ``mu``).
       The first round factorises the whole stack in place (the candidates' results are
       ignored), which saves building a second stack without them.
    5. The rest in float64 (built for those frequencies only); each failure gets its own
       ``eigvalsh`` (of ``A``: ``lambda_max = s - lambda_min(A)``, plus the diagonal rounding
       and ``err64``), and ``mu`` is raised to the largest of them where that is larger.

    Stacks of matrices of size ``n <= 16`` skip all this: ``eigvalsh`` of every one.

    ``eta`` is ``_CERT_ETA`` (1e-11), or 1.5 times the relative float64 margin ``c64 n`` where
    that is larger (``n`` above ~120; 4.4e-11 at ``n = 256``, 6.6e-10 at ``n = 1024``), so that
    a candidate at the maximum itself passes step 3. The norm is the square root: at most
    ``eta / 2`` above the reference per layer.
    """
    n, nb, g = grams.n, grams.count, grams.groups
    u64, u32 = _U64, _U32
    c64 = 4.0 * (n + 3) * u64 / (1.0 - 4.0 * (n + 3) * u64)
    c32 = 4.0 * (n + 3) * u32 / (1.0 - 4.0 * (n + 3) * u32)
    group = torch.arange(nb) % g
    err64 = grams.err64[group]  # per matrix
    err32 = grams.err32[group]
    done = torch.zeros(nb, dtype=torch.bool)  # eigvalsh computed, or certified below mu

    def exact(idx: torch.Tensor) -> torch.Tensor:
        done[idx] = True
        low = torch.linalg.eigvalsh(grams.neg(idx))[..., 0]
        return (-low * (1.0 + 4 * u64) + err64[idx]).max()

    if n <= 16:  # tiny matrices: eigvalsh of every one is cheaper than any screening
        return exact(torch.arange(nb)).clamp_min(0.0)
    screen32 = n >= 32 and c32 * n <= 0.05
    neg32 = grams.neg(single=True) if screen32 else None
    neg64 = None
    if neg32 is not None:
        diag = -neg32.diagonal(dim1=-2, dim2=-1).real.to(torch.float64)
        est = _subsampled_estimates(neg32)
    else:
        neg64 = grams.neg()
        diag = -neg64.diagonal(dim1=-2, dim2=-1).real
        est = _subsampled_estimates(neg64)
    diag_max = diag.amax(-1)
    trace = diag.sum(-1)
    # 1. candidates
    lam = exact(torch.topk(est, min(nb, _N_CANDIDATES)).indices).clamp_min(0.0)
    if not bool(lam > 0):  # all-zero candidates: the plain computation
        return torch.maximum(lam, exact(torch.arange(nb))).clamp_min(0.0)
    eta = max(_CERT_ETA, 1.5 * (c64 * n + 20 * u64 + float(grams.err64.max() / lam)))
    if neg32 is not None and not bool(grams.err32.max() <= 1e-3 * lam):
        neg32 = None  # float32 rounding of the stack too large to screen with (3.2 u32 mu)
    left32 = left_idx = None
    fresh32 = neg32 is not None  # neg32 not yet shifted
    by_cert = False  # whether any matrix was cleared by a certificate (not by eigvalsh)
    for _round in range(6):
        mu = lam * (1.0 + eta)
        # 2. certain failures: eigvalsh, and start over with the larger maximum
        wild = ~done & (diag_max > mu)
        if bool(wild.any()):
            lam = torch.maximum(lam, exact(torch.nonzero(wild).flatten()))
            continue
        if neg32 is None or bool(done.all()):
            break
        # 4. the float32 test of the rest, at a per-matrix shift s32
        idx = torch.nonzero(~done).flatten()
        if fresh32:
            # the whole stack, shifted in place (not needed afterwards); matrices already done
            # (the candidates) are factorised too, and their results ignored: cheaper than a
            # second GEMM for the rest
            idx, a32, fresh32 = torch.arange(nb), neg32, False
        elif left32 is not None and left_idx is not None:
            a32 = left32[~done[left_idx]]  # the float32 matrices of the last round's rest
        else:
            a32 = grams.neg(idx, single=True)
        left32 = left_idx = None
        tr_guess = (n * mu - trace[idx].clamp_min(0.0)) * 1.01 + 4 * n * u32 * mu
        s32 = mu - c32 * tr_guess - 8 * u32 * mu - err32[idx]
        a32.diagonal(dim1=-2, dim2=-1).real.add_(s32[:, None].to(torch.float32))
        tr_a = a32.diagonal(dim1=-2, dim2=-1).real.to(torch.float64).sum(-1).abs()
        ok32 = _cholesky_succeeds(a32)
        del a32
        rhs = s32 + c32 * tr_a * (1.0 + 1e-6) + 3.2 * u32 * mu + err32[idx] + 8 * u64 * mu
        cleared = ok32 & (rhs <= mu) & ~done[idx]
        by_cert = by_cert or bool(cleared.any())
        done[idx[cleared]] = True
        left = idx[~done[idx]]
        if left.numel() <= _FEW_LEFT:
            break  # near-ties (within the float32 margin) or few: the float64 test settles them
        # many left: sharper estimates of those, and the best two of them
        left32, left_idx = grams.neg(left, single=True), left
        est[left] = _rayleigh_estimates(left32, steps=12)
        new = exact(left[torch.topk(est[left], _N_CANDIDATES).indices])
        if not bool(new > lam):
            break  # near-ties: the float64 test settles them
        lam = new
    mu = lam * (1.0 + eta)
    # 5. the float64 test of the rest (all done by eigvalsh, e.g. a 1x1 kernel: no eta)
    if bool(done.all()):
        return mu if by_cert else lam
    idx = torch.nonzero(~done).flatten()
    a64 = grams.neg(idx) if neg64 is None else neg64[idx]
    d64 = -a64.diagonal(dim1=-2, dim2=-1).real
    wild = d64.amax(-1) > mu
    if bool(wild.any()):
        lam = torch.maximum(lam, exact(idx[wild]))
        mu = torch.maximum(mu, lam)
        idx, a64, d64 = idx[~wild], a64[~wild], d64[~wild]
    if idx.numel() == 0:
        return mu if by_cert else lam
    tr_guess = (n * mu - d64.sum(-1).clamp_min(0.0)) * 1.01 + 4 * n * u64 * mu
    shift = mu - c64 * tr_guess - 16 * u64 * mu - err64[idx]
    a64.diagonal(dim1=-2, dim2=-1).real.add_(shift[:, None])
    tr_a = a64.diagonal(dim1=-2, dim2=-1).real.sum(-1).abs()
    ok = _cholesky_succeeds(a64.clone())
    rhs = shift + c64 * tr_a * (1.0 + 1e-6) + 3.2 * u64 * mu + err64[idx] + 8 * u64 * mu
    bad = ~ok | (rhs > mu)
    if bool(bad.any()):
        low = torch.linalg.eigvalsh(a64[bad])[..., 0]
        top = (shift[bad] - low) * (1.0 + 4 * u64) + 3.2 * u64 * mu + err64[idx[bad]]
        mu = torch.maximum(mu, top.max())
    return mu


def _cholesky_succeeds(a: torch.Tensor) -> torch.Tensor:
    """Whether LAPACK's Cholesky factorisation (``?potrf``) runs to completion on each matrix
    of a C-contiguous complex stack (overwritten: scratch). Per matrix, the factorisation reads
    the upper triangle of the transpose, i.e. the lower triangle of the stored matrix (the
    matrix factorised is the complex conjugate of the Hermitian matrix of the lower triangle:
    the same eigenvalues). From ``n = 128`` SciPy's LAPACK, in place, without the copy and the
    triangle clean-up of ``torch.linalg.cholesky_ex`` (twice as fast there); below, torch's
    batched call (which reads the lower triangle as well)."""
    if a.shape[-1] < 128:  # small matrices: torch's batched call (parallel over the batch)
        return torch.linalg.cholesky_ex(a)[1] == 0
    from scipy.linalg import lapack

    arr = a.resolve_conj().numpy()
    potrf = lapack.cpotrf if arr.dtype == np.complex64 else lapack.zpotrf
    ok = torch.zeros(arr.shape[0], dtype=torch.bool)
    with _blas_threads(1):
        for i in range(arr.shape[0]):
            _, info = potrf(arr[i].T, lower=0, clean=0, overwrite_a=1)
            ok[i] = info == 0
    return ok


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the BLAS libraries loaded in this process (SciPy's OpenBLAS)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _blas_threads(n: int):
    """Limit SciPy's BLAS to ``n`` threads (the Cholesky screens use 1: one factorisation of a
    few hundred rows at a time). SciPy's OpenBLAS starts one thread per core whatever
    ``torch.set_num_threads`` says; beside other busy processes its spinning threads made
    WRN-16-4's ``certified()`` 35x slower (62 s instead of 1.8 s with two trainings running on
    this 2-core machine), and even held to torch's two threads they competed with torch's own:
    1.33 s at two torch threads against 0.71 s with one BLAS thread (issue 16)."""
    return _blas_controller().limit(limits=max(1, n), user_api="blas")


def _subsampled_estimates(neg: torch.Tensor) -> torch.Tensor:
    """Candidate estimates (``_rayleigh_estimates``) of every ``_ESTIMATE_STRIDE``-th matrix
    of a large stack, ``-inf`` for the others (never chosen first). ESTIMATES only: the
    top eigenvalue of ``K(w) K(w)^H`` varies smoothly with the frequency ``w`` (a trigonometric
    polynomial of the kernel's few taps), so the best sampled matrices lie near the maximum;
    whatever the samples miss fails the Cholesky rounds and is estimated there."""
    nb = neg.shape[0]
    if _ESTIMATE_STRIDE <= 1 or nb < 8 * _ESTIMATE_STRIDE:
        return _rayleigh_estimates(neg)
    est = torch.full((nb,), -math.inf, dtype=torch.float64)
    est[::_ESTIMATE_STRIDE] = _rayleigh_estimates(neg[::_ESTIMATE_STRIDE])
    return est


def _rayleigh_estimates(neg: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Largest Ritz value of each ``G = -neg`` after ``steps`` batched Lanczos steps from a fixed
    random start (a lower ESTIMATE of its largest eigenvalue, no reorthogonalisation; only used
    to choose candidates)."""
    gen = torch.Generator().manual_seed(0)
    nb, n = neg.shape[0], neg.shape[-1]
    steps = max(1, min(_LANCZOS_STEPS if steps is None else steps, n))
    real = torch.float32 if neg.dtype == torch.complex64 else torch.float64
    # Row vectors x with the operator x -> x G, i.e. G^T = conj(G): Hermitian with the same
    # eigenvalues, and a row-vector product is 2-4x faster than batched ``G @ v`` here.
    shape = (nb, 1, n)
    v = torch.complex(
        torch.randn(shape, generator=gen, dtype=real), torch.randn(shape, generator=gen, dtype=real)
    )
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    v_prev = torch.zeros_like(v)
    beta = torch.zeros(nb, dtype=real)
    alphas, betas = [], []
    for k in range(steps):
        w = -(v @ neg)
        alpha = (v.conj() * w).sum(dim=(-2, -1)).real
        w = w - alpha[:, None, None] * v - beta[:, None, None] * v_prev
        alphas.append(alpha)
        if k == steps - 1:
            break
        beta = torch.linalg.vector_norm(w, dim=(-2, -1))
        betas.append(beta)
        v_prev, v = v, w / beta.clamp_min(1e-30)[:, None, None]
    tri = torch.diag_embed(torch.stack(alphas, -1).to(torch.float64))
    if betas:
        off = torch.stack(betas, -1).to(torch.float64)
        tri = tri + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    return torch.linalg.eigvalsh(tri)[..., -1]


def conv_guaranteed_bound(
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``min(conv_fft_bound, conv_closed_form_bound)``, both guaranteed: the convolution rule's
    bound. The closed form (an ``eigvalsh`` of the ``C_out x C_out`` Gram matrix) is skipped
    where a cheap LOWER bound of it already exceeds the FFT bound: ``||W'||_2`` is at least the
    largest row norm of ``W'`` (taken 1e-9 smaller than computed, which covers its rounding),
    so the minimum is the FFT bound, the same value."""
    fft = conv_fft_bound(weight, input_size, stride, padding, dilation, groups)
    w = weight.detach().to(torch.float64)
    c_out = w.shape[0]
    rows = torch.linalg.vector_norm(w.reshape(c_out, -1), dim=1).max()
    lower = math.sqrt(_closed_form_overlap(w, stride, dilation)) * rows * (1.0 - 1e-9)
    if bool(fft <= lower):
        return fft
    return torch.minimum(fft, conv_closed_form_bound(weight, stride, dilation, groups))


def _closed_form_overlap(w: torch.Tensor, stride, dilation) -> int:
    """``n`` of paper Cor. 1: the most output positions whose receptive field holds one input
    element, ``prod(ceil(k_eff / s))``."""
    nsp = w.dim() - 2
    stride_t = _as_tuple(stride, nsp)
    dil = _as_tuple(dilation, nsp)
    return math.prod(
        -(-(d * (k - 1) + 1) // s) for k, d, s in zip(w.shape[2:], dil, stride_t, strict=True)
    )


def conv_closed_form_bound(
    weight: torch.Tensor,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Guaranteed but loose bound of paper Cor. 1: ``sqrt(n) * ||W'||_2``.

    ``W'`` is the kernel reshaped to ``C_out x (C_in * prod(k))`` and ``n`` the largest number
    of output positions whose receptive field contains one input element,
    ``prod(ceil(k_eff / s))``. Valid for any padding and input size.
    """
    w = weight.detach().to(torch.float64)
    n = _closed_form_overlap(w, stride, dilation)
    c_out = w.shape[0]
    blocks = w.reshape(groups, c_out // groups, -1)
    return _inflate(math.sqrt(n) * top_singular_value(blocks).max())


def schur_bound(
    apply: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int]
) -> torch.Tensor:
    """Guaranteed bound ``sqrt(||A||_1 ||A||_inf)`` (Schur test) of a linear map with A >= 0.

    Row sums are ``A 1`` and column sums ``A^T 1`` (by autograd), both exact for a map whose
    matrix has non-negative entries, such as any average pooling (with or without padding,
    ``ceil_mode``, ``divisor_override``). Computed in float64.
    """
    ones = torch.ones((1, *input_shape), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = apply(ones)
        (col,) = torch.autograd.grad(out, ones, torch.ones_like(out))
    row_max = out.detach().abs().max()
    col_max = col.abs().max()
    return _inflate(torch.sqrt(row_max * col_max))


def transpose_apply(
    apply: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``A^T v`` for a linear map ``A`` given as a function, via autograd (paper Thm. 1)."""
    with torch.enable_grad():
        u_req = u.detach().requires_grad_(True)
        out = apply(u_req)
        (g,) = torch.autograd.grad(out, u_req, v)
    return g


def power_iteration(
    apply: Callable[[torch.Tensor], torch.Tensor],
    u: torch.Tensor,
    steps: int = 1,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` power-iteration steps on ``A^T A`` from ``u``; returns ``(u_new, estimate)``.

    ESTIMATE, not a bound: ``||A u||`` with unit ``u`` converges to ``||A||_2`` from below.
    Runs without building a graph. A map that sends ``u`` to zero keeps the old vector
    (no NaN, unlike the authors' release).
    """
    u = u.detach()
    for _ in range(steps):
        with torch.no_grad():
            v = apply(u)
        w = transpose_apply(apply, u, v)
        norm = w.norm()
        if not torch.isfinite(norm) or norm <= eps:
            break
        u = w / norm
    with torch.no_grad():
        est = apply(u).norm()
    return u, est


def dense_matrix(
    apply: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int]
) -> torch.Tensor:
    """Dense float64 matrix of a linear map on ``input_shape`` (for tests on small inputs)."""
    d = math.prod(input_shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *input_shape)
    with torch.no_grad():
        cols = apply(basis)
    return cols.reshape(d, -1).T


def dense_operator_norm(
    apply: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int]
) -> torch.Tensor:
    """EXACT ``||A||_2`` from the dense matrix (float64 SVD). Small inputs only."""
    return torch.linalg.matrix_norm(dense_matrix(apply, input_shape), ord=2)


def separable_bound(
    apply: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int],
    axes: Sequence[int],
    chunk: int = 16,
) -> torch.Tensor:
    """Guaranteed upper bound (exact up to ``FLOAT64_SLACK``) of the L2 norm of a linear map that
    acts separably on ``axes`` of inputs of ``input_shape`` (no batch) and identically on every
    slice along the other axes (padding, nearest/linear interpolation).

    Such a map is ``I (x) M_1 (x) ... (x) M_d`` (Kronecker product), whose norm is exactly
    ``prod_k ||M_k||_2`` (the singular values of a Kronecker product are the products of the
    factors' singular values). ``M_k`` is read off by applying the map to a probe that is the
    identity along axis ``k`` and all-ones along the other mapped axes: its output is
    ``M_k e_j (x) prod_{l != k} (M_l 1)``. The map must send all-ones to all-ones (each output
    entry is an affine combination of inputs) and the probe's output must be constant along the
    other axes; otherwise ``ValueError``. Then every ``M_l 1 = 1`` up to rounding and the read-off
    ``M_k`` are exact. Computed in float64 by a Gram eigenvalue (``top_singular_value``).
    """
    shape = list(input_shape)
    probe_shape = [n if k in axes else 1 for k, n in enumerate(shape)]
    with torch.no_grad():
        ones = torch.ones((1, *probe_shape), dtype=torch.float64)
        out = apply(ones)
        if not torch.allclose(out, torch.ones_like(out), rtol=0.0, atol=1e-9):
            raise ValueError("the map does not send all-ones to all-ones")
        total = torch.tensor(1.0, dtype=torch.float64)
        for k in axes:
            n = shape[k]
            eye_shape = [n] + [n if j == k else 1 for j in range(len(shape))]
            eye = torch.eye(n, dtype=torch.float64).reshape(eye_shape)
            others = tuple(1 + j for j in range(len(shape)) if j != k)
            rows = []
            for start in range(0, n, chunk):  # bounded memory on large inputs
                probe = eye[start : start + chunk]
                out = apply(probe.expand(probe.shape[0], *probe_shape).contiguous())
                hi, lo = out.amax(dim=others), out.amin(dim=others)
                if not torch.allclose(hi, lo, rtol=0.0, atol=1e-9):
                    raise ValueError(f"the map is not separable along axis {k}")
                rows.append(hi)
            total = total * top_singular_value(torch.cat(rows))
    return _inflate(total)
