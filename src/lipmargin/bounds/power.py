"""Power iteration on linear operators (paper Thm. 1, Alg. 1): the training-time ESTIMATE of an
operator norm, and the estimate shown beside guaranteed bounds in reports.

Power iteration converges to ``||A||`` FROM BELOW: these numbers are estimates, never
certificates (certificates come from ``LinearOperator.guaranteed``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import norms
from .operators import LinearOperator


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Disable oneDNN for the batch-1 maps of the power iteration (2-6x faster there for
    narrow kernels; ``wide_kernels`` re-enables it for wide ones)."""
    get = getattr(torch._C, "_get_mkldnn_enabled", None)
    set_ = getattr(torch._C, "_set_mkldnn_enabled", None)
    if get is None or set_ is None:  # pragma: no cover - other torch builds
        yield
        return
    previous = get()
    set_(False)
    try:
        yield
    finally:
        set_(previous)


#: channel count from which a convolution of the power iteration runs on oneDNN after all
#: (measured on batch-1 maps: 1.5-2.3x faster from 32 input and 32 output channels, 2-6x slower
#: below, e.g. 1 -> 16 or 16 -> 32 channels at stride 2)
WIDE_CHANNELS = 32


def wide_kernels(fn: Callable[..., torch.Tensor], weight: torch.Tensor) -> Callable:
    """``fn`` (a convolution, its transpose or its weight gradient with ``weight``), run with
    oneDNN enabled inside ``reference_kernels`` where the kernel is wide enough to gain."""
    get = getattr(torch._C, "_get_mkldnn_enabled", None)
    set_ = getattr(torch._C, "_set_mkldnn_enabled", None)
    wide = weight.dim() > 2 and min(weight.shape[0], weight.shape[1]) >= WIDE_CHANNELS
    if get is None or set_ is None or not wide:
        return fn

    def run(*args: Any) -> torch.Tensor:
        previous = get()
        set_(True)
        try:
            return fn(*args)
        finally:
            set_(previous)

    return run


def new_vector(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """A random unit vector of ``shape`` (deterministic in ``seed``), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g)
    return (u / u.norm()).to(device)


def _step(target: torch.Tensor, u: torch.Tensor, v: torch.Tensor, op: LinearOperator) -> None:
    """``target <- A^T v / ||A^T v||`` in place, with ``v = A u`` (``u`` is ``target`` in the
    operator's dtype); keeps the old vector if that is 0."""
    w = _adjoint(op, u, v)
    n = w.norm()
    if w.device.type == "cpu":  # a Python test costs no device synchronisation here
        if n > 1e-12:
            target.copy_(w.div_(n))
        return
    target.copy_(torch.where(n > 1e-12, w / n.clamp_min(1e-12), u))


def _lanczos(target: torch.Tensor, u: torch.Tensor, op: LinearOperator, steps: int) -> None:
    """``target <-`` the top Ritz vector of ``A^T A`` on the Krylov space
    ``span{u, (A^T A) u, ..., (A^T A)^(steps-1) u}`` (Lanczos with full reorthogonalisation,
    Golub & Van Loan §10.1), in place; keeps the old vector if the space degenerates at once.

    The same ``steps`` products with ``A`` and ``A^T`` as power iteration, a far better vector
    where the top singular values are close (convolutions): from a random start on the trained
    4C3F's convolutions 10 steps reach 0.998 of the norm, power iteration 0.993."""
    n = u.numel()
    basis = u.new_empty((steps, n))
    q = u.reshape(-1) / u.norm().clamp_min(1e-30)
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    for j in range(steps):
        basis[j] = q
        w = _gram_apply(op, q.reshape(u.shape)).reshape(-1)
        alphas.append(torch.dot(w, q))
        if j == steps - 1:
            break
        known = basis[: j + 1]
        w = w - known.T @ (known @ w)  # Lanczos three-term step and full reorthogonalisation
        w = w - known.T @ (known @ w)  # (twice is enough: Giraud et al. 2005)
        b = w.norm()
        if not b > 1e-10 * alphas[0].abs():  # an invariant subspace: T is complete
            steps = j + 1
            break
        betas.append(b)
        q = w / b
    t = torch.diag(torch.stack(alphas[:steps]))
    if betas:
        off = torch.stack(betas[: steps - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    _, vectors = torch.linalg.eigh(t.double())
    ritz = vectors[:, -1].to(u.dtype) @ basis[:steps]
    norm = ritz.norm()
    if norm > 0:
        target.copy_((ritz / norm).reshape(u.shape))


def _adjoint(op: LinearOperator, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A^T v`` (``u``: a vector of A's input shape, for the autograd transpose)."""
    return op.adjoint(v) if op.adjoint is not None else norms.transpose_apply(op.apply, u, v)


def _gram_apply(op: LinearOperator, u: torch.Tensor) -> torch.Tensor:
    """``A^T A u``."""
    return _adjoint(op, u, op.apply(u))


def training_estimate(
    op: LinearOperator,
    u: torch.Tensor,
    *,
    steps: int,
    update: bool,
    keep: dict[str, torch.Tensor] | None = None,
    key: str = "",
    method: str = "power",
) -> torch.Tensor:
    """Differentiable estimate ``sigma = ||A u||`` of ``||A||`` with the persistent unit vector
    ``u`` held constant (paper Alg. 1); when ``update``, first ``steps - 1`` power-iteration
    steps (``method="lanczos"``: ``u`` becomes the top Ritz vector of the Krylov space those
    ``steps - 1`` products span, ``_lanczos``), then one more reusing ``A u``
    (``u <- A^T A u / ||A^T A u||``), all in place on ``u``.

    Where the operator gives its ``weight`` and ``weight_grad(u, g)`` (the gradient of
    ``<g, A u>`` w.r.t. the weight), ``sigma`` enters the graph as ``<W, d sigma / dW>``: sigma is
    1-homogeneous in W, so by Euler's identity this has the right value and the right gradient,
    at the cost of one elementwise product in backward. With ``keep``, an update stores that
    gradient at the moved vector as ``keep[key]``: the bound reuses it (``sigma = <W, grad>``,
    the bilinear estimate ``v^T A u`` with both vectors held) on the calls ``power_every``
    skips, so a skipped call costs one elementwise product per linear map (issue 16).
    """
    dtype = op.weight.dtype if op.weight is not None else u.dtype
    if update and steps > 2 and method == "lanczos":
        with torch.no_grad(), reference_kernels():
            _lanczos(u, u.to(dtype, copy=True), op, steps - 1)
    elif update and steps > 1:
        with torch.no_grad(), reference_kernels():
            for _ in range(steps - 1):
                uw = u.to(dtype) if op.weight is not None else u.clone()
                _step(u, uw, op.apply(uw), op)
    if op.weight is not None and op.weight_grad is not None:
        with torch.no_grad(), reference_kernels():
            uw = u.to(dtype)
            v = op.apply(uw)
            grad = op.weight_grad(uw, v / v.norm().clamp_min(1e-30))
            if update:
                _step(u, uw, v, op)
                if keep is not None:  # the gradient at the moved vector, for skipped calls
                    un = u.to(dtype)
                    vn = op.apply(un)
                    keep[key] = op.weight_grad(un, vn / vn.norm().clamp_min(1e-30))
        return (op.weight * grad).sum()
    uw = u.to(dtype, copy=True)  # autograd keeps it: u itself moves below
    v = op.apply(uw)
    sigma = v.norm()
    if update:
        with torch.no_grad():
            _step(u, uw, v.detach(), op)
    return sigma


def report_estimate(op: LinearOperator, u: torch.Tensor, steps: int) -> torch.Tensor:
    """Float64 estimate for reports: ``||A u||`` with the persistent vector (what training
    uses), or ``steps`` further power-iteration steps from it."""
    u64 = u.detach().to(torch.float64)
    if steps > 0:
        return norms.power_iteration(op.apply, u64, steps)[1]
    return op.apply(u64).norm()
