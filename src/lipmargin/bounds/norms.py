"""Operator norms of linear maps: guaranteed upper bounds and power-iteration estimates.

Three kinds of number live here, and every function says which one it returns:

* a **guaranteed upper bound** (``conv_fft_bound``, ``spectral_norm_exact``,
  ``conv_closed_form_bound``, ``schur_bound``): never below the true operator norm, up to
  the relative slack ``FLOAT64_SLACK`` applied to cover float64 rounding;
* an **estimate** (``power_iteration``): converges to the norm from below, so it can under-estimate;
* an **exact dense norm** (``dense_operator_norm``): for tests on small inputs only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
       singular value of the ``C_out x C_in`` matrix of kernel DFT coefficients over all
       frequencies. Groups give a block-diagonal map, whose norm is the max over groups.

    Computed in float64 and inflated by ``FLOAT64_SLACK``. Returns a 0-d float64 tensor.
    """
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
    if c_out % groups:
        raise ValueError("out_channels must be divisible by groups")

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
    spec = torch.fft.rfftn(w, s=grid, dim=tuple(range(2, 2 + nsp)))
    # (c_out, cin', f...) -> (f, groups, c_out/g, cin')
    spec = spec.reshape(groups, c_out // groups, spec.shape[1], -1).permute(3, 0, 1, 2)
    return _inflate(top_singular_value(spec).max())


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
    nsp = w.dim() - 2
    stride_t = _as_tuple(stride, nsp)
    dil = _as_tuple(dilation, nsp)
    n = math.prod(
        -(-(d * (k - 1) + 1) // s) for k, d, s in zip(w.shape[2:], dil, stride_t, strict=True)
    )
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
