"""Layers that are 1-Lipschitz by construction (AOL, SLL): their proven constant while training
(no power iteration needed), and a guaranteed number for the weights as they are when
certifying. Registering them makes them leaves of the trace (``LipmarginTracer``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from ...errors import UnsupportedOperationError
from ...layers import AOLConv2d, AOLLinear, SLLConv2d, SLLLinear, _kernel_gram, _sll_t
from .. import norms
from ..registry import register_module
from ._common import _first

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import WalkContext


@register_module(AOLLinear)
def aol_linear(ctx: WalkContext, node: Node) -> torch.Tensor:
    """AOL dense layer (Prach & Lampert 2022, Thm. 1): ``||P diag(d)|| <= 1``. Training: 1.
    Certifying: the exact spectral norm (float64) of the matrix the forward applies, which the
    theorem keeps at 1 up to float32 rounding of ``d``."""
    if ctx.mode != "certify":
        return _first(ctx, node)
    with torch.no_grad():
        w = ctx.module(node).effective_weight()
    f = norms.spectral_norm_exact(w)
    ctx.record(node, "aol_linear", f)
    return _first(ctx, node) * f


@register_module(AOLConv2d)
def aol_conv(ctx: WalkContext, node: Node) -> torch.Tensor:
    """AOL convolution (Prach & Lampert 2022, Thm. 2): 1-Lipschitz. Training: 1. Certifying: the
    FFT bound of the kernel the forward applies on the actual input shape (at most 1 up to the
    float32 rounding of the rescaling, by the theorem)."""
    if ctx.mode != "certify":
        return _first(ctx, node)
    m = ctx.module(node)
    with torch.no_grad():
        w = m.effective_weight()
    f = norms.conv_fft_bound(w, ctx.in_shape(node)[1:], 1, m.padding, 1, 1)
    ctx.record(node, "aol_conv2d", f)
    return _first(ctx, node) * f


def sll_constant(t_used: torch.Tensor, t_exact: torch.Tensor) -> float:
    """Guaranteed constant of an SLL block whose forward divides by ``t_used`` instead of the
    exact ``t`` (float32 rounding). With ``t_used >= (1 - delta) t`` and ``T >= W^T W`` the
    Jacobian ``I - 2 W T_used^-1 D W^T`` has eigenvalues in ``[1 - 2/(1-delta), 1]``, so its norm
    is at most ``(1 + delta) / (1 - delta)`` (1 when the forward's ``t`` is not below exact)."""
    t_used = t_used.detach().to(torch.float64)
    t_exact = t_exact.detach().to(torch.float64) * (1.0 + norms.FLOAT64_SLACK)
    short = torch.where(t_exact > 0, 1.0 - t_used / t_exact, torch.zeros_like(t_exact))
    delta = max(0.0, float(short.max()))
    if delta >= 0.5:
        raise UnsupportedOperationError(
            f"SLL block: the forward's normalisation is {delta:.3g} below its exact value"
        )
    return (1.0 + delta) / (1.0 - delta) * (1.0 + norms.FLOAT64_SLACK)


@register_module(SLLLinear, SLLConv2d)
def sll_block(ctx: WalkContext, node: Node) -> torch.Tensor:
    """SLL residual block (Araujo et al. 2023, Thm. 3): 1-Lipschitz, not ``1 + ||W|| ||W^T||``.
    Training: 1. Certifying: :func:`sll_constant` with ``t`` recomputed in float64 from the
    parameters (the forward computes it in the model's dtype)."""
    if ctx.mode != "certify":
        return _first(ctx, node)
    m = ctx.module(node)
    with torch.no_grad():
        w = m.weight.detach().to(torch.float64)
        q = m.q.detach().to(torch.float64)
        if isinstance(m, SLLLinear):
            exact = _sll_t(w @ w.transpose(0, 1), q)
        else:
            exact = _sll_t(_kernel_gram(w.transpose(0, 1)), q)
        f = sll_constant(m.t(), exact)
    ctx.record(node, "sll_block", f)
    return _first(ctx, node) * f
