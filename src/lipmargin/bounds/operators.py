"""Linear segments: a residual sum of linear maps of ONE input, bounded as one operator.

A LiResNet block ``x + conv(x)`` (Hu et al., NeurIPS 2023) is linear as a whole; its norm is
that of ``I + C``, not ``1 + ||C||``. The same holds for ``x + BN(conv(x))``, ``x + W x``,
``conv_a(x) + conv_b(x)`` and their differences. This module turns such a sum into one kernel
(convolutions) or one matrix (dense maps), whose norm the existing guaranteed routines bound:

* stride-1 convolutions (any padding, dilation, groups) and the identity are all of the form
  ``out[i] = sum_o K[o] x[i + o]`` for a set of input offsets ``o``; their sum is one
  convolution whose kernel collects every offset. Zero-padded, it is a restriction of the
  circular convolution on a large enough grid (``norms.conv_fft_bound``), exact per frequency;
* dense maps add their matrices (``norms.spectral_norm_exact``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import norms

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: Largest input size (entries) for which a fused convolution's dense matrix is built.
DENSE_LIMIT = 1024


def _as_float64(term: Term) -> Term:
    w = None if term.weight is None else term.weight.detach().to(torch.float64)
    return Term(term.kind, term.coef, w, term.padding, term.dilation, term.groups)


@dataclass
class LinearOperator:
    """A linear map ``A`` on inputs of ``input_shape`` (no batch dimension), as a rule hands it
    to the walk (``WalkContext.linear``).

    ``apply`` (and ``adjoint``, or autograd when None) act on batches; ``guaranteed()`` returns a
    GUARANTEED upper bound of ``||A||`` (float64, certify mode); ``weight`` and
    ``weight_grad(u, g)`` (the gradient of ``<g, A u>`` w.r.t. the weight) let the training
    estimate enter the graph by Euler's identity. ``estimate_only``: the comparison method
    ``conv_method="power"``, whose "bound" is the power-iteration estimate.
    """

    kind: str
    input_shape: tuple[int, ...]
    apply: Callable[[torch.Tensor], torch.Tensor]
    guaranteed: Callable[[], torch.Tensor]
    adjoint: Callable[[torch.Tensor], torch.Tensor] | None = None
    weight: torch.Tensor | None = None
    weight_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    estimate_only: bool = False


@dataclass
class Term:
    """One summand: ``coef * A x`` with ``A`` a convolution, a dense map or the identity.

    ``weight`` is the kernel / matrix as the mode needs it (live while training, float64 when
    certifying), already scaled by a folded BatchNorm; ``None`` for the identity."""

    kind: str  # "conv", "linear" or "identity"
    coef: float
    weight: torch.Tensor | None = None
    padding: int | str | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1


def _full_kernel(term: Term, nsp: int, channels: int, like: torch.Tensor) -> tuple:
    """The term as a dense-channel, undilated kernel over input offsets: (kernel, lowest offset
    per axis, output size minus input size per axis)."""
    if term.kind == "identity":
        eye = torch.eye(channels, dtype=like.dtype, device=like.device)
        return eye.reshape(channels, channels, *([1] * nsp)), (0,) * nsp, (0,) * nsp
    w = term.weight
    c_out, cin_g = w.shape[:2]
    if term.groups > 1:  # block-diagonal over groups
        full = w.new_zeros((c_out, cin_g * term.groups, *w.shape[2:]))
        per = c_out // term.groups
        for g in range(term.groups):
            full[g * per : (g + 1) * per, g * cin_g : (g + 1) * cin_g] = w[g * per : (g + 1) * per]
        w = full
    kernel = tuple(w.shape[2:])
    dil = norms._as_tuple(term.dilation, nsp)
    if any(d != 1 for d in dil):
        eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dil, strict=True))
        wd = w.new_zeros((*w.shape[:2], *eff))
        wd[(slice(None), slice(None), *(slice(None, None, d) for d in dil))] = w
        w = wd
    pads = norms.conv_padding(term.padding, kernel, dil, (1,) * nsp)
    return (
        w,
        tuple(-left for left, _ in pads),
        tuple(left + right - w.shape[2 + a] + 1 for a, (left, right) in enumerate(pads)),
    )


def conv_sum(terms: Sequence[Term], nsp: int, channels: int) -> tuple[torch.Tensor, tuple]:
    """One stride-1 kernel equal to ``sum coef_j A_j`` and the symmetric zero padding per axis
    under which ``norms.conv_fft_bound`` bounds it (any padding at least as large as the sum's
    left and right padding: the true map is a restriction of that one's output rows)."""
    like = next(t.weight for t in terms if t.weight is not None)
    parts = [(_full_kernel(t, nsp, channels, like), t.coef) for t in terms]
    grow = parts[0][0][2]  # equal for every term: the summands have one output shape
    low = [min(lo[a] for (_, lo, _), _ in parts) for a in range(nsp)]
    high = [max(lo[a] + k.shape[2 + a] - 1 for (k, lo, _), _ in parts) for a in range(nsp)]
    size = [h - lo + 1 for lo, h in zip(low, high, strict=True)]
    total = None
    for (k, lo, _), coef in parts:
        pad: list[int] = []
        for a in reversed(range(nsp)):
            before = lo[a] - low[a]
            pad += [before, size[a] - k.shape[2 + a] - before]
        placed = F.pad(k, pad) * coef
        total = placed if total is None else total + placed
    # out[i] reads x[i + o]: left padding -low, right padding (out - in) + high
    padding = tuple(max(-lo, g + h, 0) for lo, h, g in zip(low, high, grow, strict=True))
    return total, padding


def apply_sum(terms: Sequence[Term], nsp: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``u -> sum coef_j A_j u`` (no biases): the fused operator for power iteration."""

    def apply(u: torch.Tensor) -> torch.Tensor:
        out = None
        for t in terms:
            if t.kind == "identity":
                v = u
            elif t.kind == "linear":
                v = F.linear(u, t.weight)
            else:
                v = _CONV[nsp](u, t.weight, None, 1, t.padding, t.dilation, t.groups)
            v = v * t.coef if t.coef != 1 else v
            out = v if out is None else out + v
        return out

    return apply


def guaranteed_norm(
    terms: Sequence[Term], input_shape: Sequence[int]
) -> Callable[[], torch.Tensor]:
    """A GUARANTEED upper bound of the fused operator's norm on ``input_shape`` (no batch)."""

    def bound() -> torch.Tensor:
        if any(t.kind == "linear" for t in terms):
            n = input_shape[-1]
            total = None
            for t in terms:
                m = t.weight if t.kind == "linear" else torch.eye(n, dtype=torch.float64)
                m = m.to(torch.float64) * t.coef
                total = m if total is None else total + m
            return norms.spectral_norm_exact(total)
        nsp = len(input_shape) - 1
        kernel, padding = conv_sum(terms, nsp, input_shape[0])
        fft = norms.conv_fft_bound(kernel, input_shape[1:], 1, padding, 1, 1)
        if math.prod(input_shape) > DENSE_LIMIT:
            return fft
        # Small maps: the exact norm of the dense matrix (float64, basis images) is cheap and
        # removes the circular embedding's gap on tiny grids.
        apply = apply_sum([_as_float64(t) for t in terms], nsp)
        dense = norms.spectral_norm_exact(norms.dense_matrix(apply, tuple(input_shape)))
        return torch.minimum(fft, dense)

    return bound
