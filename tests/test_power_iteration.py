"""The training-time power iteration: explicit adjoints equal autograd transposes, and the
persistent vector converges to the top singular vector (paper Thm. 1)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipmargin.bounds import LipschitzBound, norms
from lipmargin.bounds.rules import _conv_adjoint
from lipmargin.errors import InputError


@pytest.mark.parametrize(
    "k,s,p,d,g,h", list(itertools.product([1, 3, 4], [1, 2, 3], [0, 1, 2], [1, 2], [1, 2], [7, 8]))
)
def test_conv_adjoint_matches_autograd(k, s, p, d, g, h):
    if d * (k - 1) + 1 > h + 2 * p:
        pytest.skip("empty output")
    torch.manual_seed(k * 100 + s * 10 + p)
    w = torch.randn(4, 4 // g, k, k, dtype=torch.float64)
    params = {"stride": s, "padding": p, "dilation": d, "groups": g}
    shape = (4, h, h + 1)
    adjoint = _conv_adjoint(w, params, shape)

    def apply(u):
        return F.conv2d(u, w, None, s, p, d, g)

    u = torch.randn(1, *shape, dtype=torch.float64)
    v = torch.randn_like(apply(u))
    expected = norms.transpose_apply(apply, u, v)
    assert torch.allclose(adjoint(v), expected, atol=1e-10)


def test_power_iteration_converges_to_exact_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    bound = LipschitzBound(model, (2, 10, 10))
    bound.train()
    for _ in range(300):
        bound(pairwise=False)
    sigma = float(bound.last_sigmas["_0"].detach())
    w = model[0].weight.detach().double()
    exact = float(norms.dense_operator_norm(lambda x: F.conv2d(x, w, None, 2, 1), (2, 10, 10)))
    assert sigma <= exact * (1 + 1e-5)
    assert sigma >= exact * (1 - 1e-3)


def _exact_product(model: nn.Module) -> float:
    """Product of the exact spectral norms of the Linear layers (dense SVD, float64)."""
    out = 1.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            out *= float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
    return out


def test_power_steps_tighten_the_training_estimate():
    """Several power steps per call bring the Alg. 1 estimate to the exact norm product; one
    step from a random vector stays below it (the estimate is a lower estimate)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128))
    model.append(nn.ReLU())
    model.append(nn.Linear(128, 10))
    exact = _exact_product(model)
    one = LipschitzBound(model, (1, 8, 8), power_steps=1).train()
    many = LipschitzBound(model, (1, 8, 8), power_steps=300).train()
    est_one = float(one(pairwise=False))
    est_many = float(many(pairwise=False))
    assert est_one < 0.98 * exact
    assert est_many == pytest.approx(exact, rel=1e-3)
    assert est_many <= exact * (1 + 1e-5)
    # the guaranteed bound does not depend on the training setting
    assert many.certified().value == pytest.approx(one.certified().value, rel=1e-12)


def test_power_steps_validated():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError):
            LipschitzBound(model, (1, 2, 2), power_steps=bad)


def test_power_every_moves_vectors_only_every_kth_call() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    bound = LipschitzBound(model, (6,), power_every=3).train()
    snapshots = []
    for _ in range(4):
        bound()
        snapshots.append(bound.u__0.clone())
    # the first call updates, the next two reuse the vector, the fourth updates again
    assert not torch.equal(snapshots[0], snapshots[3])
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])
    # sigma still follows the weights on calls without an update
    before = float(bound(pairwise=False))
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert float(bound(pairwise=False)) == pytest.approx(2 * before, rel=1e-5)


def test_skipped_updates_reuse_the_held_gradient() -> None:
    """Issue 16: on calls ``power_every`` skips, each linear map's sigma is ``<W, G>`` with the
    gradient G of the last update (v^T A u with u, v held): the same value as a fresh
    ``||A u||`` while the weights are unchanged, never above it after they change, and its
    gradient w.r.t. W is G."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(75, 3))
    fresh = LipschitzBound(model, (2, 5, 5), power_every=1).train()
    bound = LipschitzBound(model, (2, 5, 5), power_every=2).train()
    bound()  # an update: stores the gradients
    held = {k: v.clone() for k, v in bound._held_grads.items()}
    # the convolution's (the head is read exactly; dense maps go through autograd instead)
    assert list(held) == ["_0"]

    def sigma(b: LipschitzBound) -> torch.Tensor:
        if b is bound:
            b._calls = 1  # a call that power_every skips
        else:
            b.load_state_dict(bound.state_dict())  # ||A u|| with the same vector u
        return b._walk("train", pairwise=False)[0].sigmas["_0"]

    assert float(sigma(bound)) == pytest.approx(float(sigma(fresh)), rel=1e-6)
    model.zero_grad()
    sigma(bound).backward()
    assert torch.allclose(model[0].weight.grad, held["_0"])
    with torch.no_grad():
        model[0].weight.add_(0.1 * torch.randn(3, 2, 3, 3))
    assert float(sigma(bound)) <= float(sigma(fresh)) * (1 + 1e-6)


def test_bound_every_scaled_holds_the_bound_and_scales_its_gradient() -> None:
    """Issue 16, lazy bound with ``lazy_gradient="scaled"``: with ``bound_every = 3`` the
    first training call computes the bound (the same value as ``bound_every = 1``, its gradient
    3x), the next two return it detached without touching the power-iteration vectors, the
    fourth computes again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    lazy = LipschitzBound(model, (6,), bound_every=3, lazy_gradient="scaled").train()
    every = LipschitzBound(model, (6,)).train()
    every.load_state_dict(lazy.state_dict())
    k_lazy, k_every = lazy(), every()
    assert torch.equal(k_lazy.detach(), k_every.detach())
    (g_lazy,) = torch.autograd.grad(k_lazy.sum(), model[0].weight)
    (g_every,) = torch.autograd.grad(k_every.sum(), model[0].weight)
    assert torch.allclose(g_lazy, 3 * g_every)
    u = lazy.u__0.clone()
    with torch.no_grad():
        model[0].weight.mul_(2)  # held calls do not see it
    for _ in range(2):
        held = lazy()
        assert not held.requires_grad and torch.equal(held, k_lazy.detach())
        assert torch.equal(lazy.u__0, u)
    fresh = lazy()
    assert fresh.requires_grad and not torch.equal(lazy.u__0, u)
    assert float(fresh.max()) > 1.5 * float(k_lazy.max())  # the doubled weight, seen again
    lazy.eval()  # evaluation mode always computes
    assert lazy().requires_grad
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InputError):
            LipschitzBound(model, (6,), bound_every=bad)
    with pytest.raises(InputError, match="lazy_gradient"):
        LipschitzBound(model, (6,), bound_every=2, lazy_gradient="stale")


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("pairwise", [True, False])
def test_bound_every_held_is_a_first_order_model(pairwise: bool) -> None:
    """Issue 16, lazy bound with ``lazy_gradient="held"`` (default): a computed call returns
    the bound with its own (unscaled) gradient; a skipped call at the same weights returns the
    same value and the same gradient without moving the power-iteration vectors; after a small
    weight change it agrees with the exact bound at the held vectors to second order, and the
    head's rows are always the current ones."""
    model = _chain()
    lazy = LipschitzBound(model, (6,), bound_every=3, lazy_gradient="held").train()
    # the estimate at lazy's first vectors, which evaluation mode does not move
    every = LipschitzBound(model, (6,)).eval()
    every.load_state_dict(lazy.state_dict())
    params = [p for p in model.parameters()]

    def grads(k: torch.Tensor) -> list[torch.Tensor]:
        found = torch.autograd.grad(k.sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]

    k_lazy, k_every = lazy(pairwise=pairwise), every(pairwise=pairwise)
    assert torch.equal(k_lazy.detach(), k_every.detach())
    reference = grads(k_every)
    for a, b in zip(grads(k_lazy), reference, strict=True):
        assert torch.allclose(a, b)
    vectors = {k: v.clone() for k, v in lazy.state_dict().items()}
    held = lazy(pairwise=pairwise)  # the same weights: the same value and gradient
    assert torch.allclose(held, k_every.detach(), rtol=1e-5)
    for a, b in zip(grads(held), reference, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    torch.manual_seed(1)
    for eps in (1e-2, 1e-3):
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(eps * torch.randn_like(p))
        lazy._calls = 1  # a skipped call
        approx = lazy(pairwise=pairwise).detach()
        exact = every(pairwise=pairwise).detach()
        err = float((approx - exact).abs().max() / exact.abs().max())
        assert err < 50 * eps**2, (eps, err)  # second order: ~25 eps^2 measured
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    for k, v in lazy.state_dict().items():
        assert torch.equal(v, vectors[k])
    lazy._calls = 3
    assert lazy(pairwise=pairwise).grad_fn is not None  # computed again
    assert not all(torch.equal(v, vectors[k]) for k, v in lazy.state_dict().items())


def test_bound_every_held_sees_the_head_weight_of_a_normalized_linear() -> None:
    """With a head computed from parameters (``F.linear`` with a row-normalised weight) the
    skipped calls recompute the head's weight from its parameters: pairwise distances and
    their gradient are exact there."""
    from lipmargin.layers import NormalizedLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), NormalizedLinear(5, 3))
    lazy = LipschitzBound(model, (6,), bound_every=2, lazy_gradient="held").train()
    assert lazy.has_pairwise
    first = lazy()
    head = model[2]
    (g_first,) = torch.autograd.grad(first.sum(), head.weight)
    second = lazy()
    assert second.grad_fn is not None and torch.allclose(second, first.detach(), rtol=1e-5)
    (g_second,) = torch.autograd.grad(second.sum(), head.weight)
    assert torch.allclose(g_first, g_second, rtol=1e-4, atol=1e-7)


def test_bound_every_scales_sigmas_and_recomputes_for_a_converted_model() -> None:
    """The lazy bound's per-layer sigmas (what the SNR baseline penalises) get the same
    gradient scale as the bound; a held bound is not returned for a model converted to another
    dtype since (it is computed afresh)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    lazy = LipschitzBound(model, (6,), bound_every=2, lazy_gradient="scaled").train()
    every = LipschitzBound(model, (6,)).train()
    every.load_state_dict(lazy.state_dict())
    lazy(pairwise=False)
    every(pairwise=False)
    (g_lazy,) = torch.autograd.grad(lazy.last_sigmas["_0"], model[0].weight)
    (g_every,) = torch.autograd.grad(every.last_sigmas["_0"], model[0].weight)
    assert torch.allclose(g_lazy, 2 * g_every)
    model.double()
    again = lazy(pairwise=False)  # a held call, but the held bound is float32
    assert again.dtype == torch.float64 and again.requires_grad


def _close_top(n: int = 40) -> nn.Module:
    """A dense map with close top singular values (1.0, 0.99, 0.98, ...): slow for power
    iteration, like a convolution's spectrum near its maximum."""
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(n, n))
    q2, _ = torch.linalg.qr(torch.randn(n, n))
    s = 1.0 - 0.01 * torch.arange(n, dtype=torch.float32)
    lin = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(q1 @ torch.diag(s) @ q2.T)
    return nn.Sequential(lin, nn.ReLU(), nn.Linear(n, 3))


@pytest.mark.parametrize("steps", [4, 10])
def test_lanczos_moves_the_vector_closer_than_power_iteration(steps: int) -> None:
    """``power_method="lanczos"``: with the same products as ``steps`` power-iteration steps the
    estimate is closer to the true norm (1.0) where the top singular values are close, never
    above it (a Ritz value), and the persistent vector stays a unit vector."""
    model = _close_top()
    power = LipschitzBound(model, (40,), power_steps=steps).train()
    lanczos = LipschitzBound(model, (40,), power_steps=steps, power_method="lanczos").train()
    lanczos.load_state_dict(power.state_dict())
    est_power = float(power(pairwise=False).detach() / power.last_sigmas["_2"].detach())
    est_lanczos = float(lanczos(pairwise=False).detach() / lanczos.last_sigmas["_2"].detach())
    sigma_power = float(power.last_sigmas["_0"].detach())
    sigma_lanczos = float(lanczos.last_sigmas["_0"].detach())
    assert est_power == pytest.approx(sigma_power, rel=1e-5)  # the product of the two maps
    assert est_lanczos == pytest.approx(sigma_lanczos, rel=1e-5)
    assert sigma_power < sigma_lanczos <= 1.0 + 1e-5
    assert 1.0 - sigma_lanczos < 0.5 * (1.0 - sigma_power)
    assert float(lanczos.u__0.norm()) == pytest.approx(1.0, rel=1e-5)


def test_lanczos_degenerate_maps_and_validation() -> None:
    """A zero map (the Krylov space collapses at once) keeps the vector, with no NaN; a
    rank-one map converges in one Lanczos step; an unknown method is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3))
    bound = LipschitzBound(model, (6,), power_steps=5, power_method="lanczos").train()
    with torch.no_grad():
        model[0].weight.zero_()
    u = bound.u__0.clone()
    assert float(bound(pairwise=False)) == 0.0
    assert torch.allclose(bound.u__0, u, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        model[0].weight.copy_(torch.outer(torch.randn(5), torch.randn(6)))
    bound(pairwise=False)
    exact = float(torch.linalg.matrix_norm(model[0].weight.detach(), 2))
    assert float(bound(pairwise=False).detach()) == pytest.approx(
        exact * float(bound.last_sigmas["_2"].detach()), rel=1e-4
    )
    assert torch.isfinite(bound.u__0).all()
    with pytest.raises(InputError, match="power_method"):
        LipschitzBound(model, (6,), power_method="arnoldi")


def test_lanczos_on_a_convolution_converges_faster_and_stays_below_the_norm() -> None:
    """On a strided convolution (adjoint by conv_transpose) with 20 products the Lanczos
    estimate reaches the exact norm (dense Jacobian, float64) to 1e-4 while power iteration is
    still percents below; it never exceeds it (a Ritz value), nor the guaranteed FFT bound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(128, 3))
    shape = (3, 8, 8)
    conv = model[0]
    dense = torch.autograd.functional.jacobian(
        lambda x: F.conv2d(x, conv.weight.detach(), None, 2, 1).flatten(),
        torch.zeros(1, *shape),
    ).reshape(128, -1)
    exact = float(torch.linalg.matrix_norm(dense.double(), 2))
    power = LipschitzBound(model, shape, power_steps=20).train()
    lanczos = LipschitzBound(model, shape, power_steps=20, power_method="lanczos").train()
    lanczos.load_state_dict(power.state_dict())
    power(pairwise=False)
    lanczos(pairwise=False)
    s_power = float(power.last_sigmas["_0"].detach())
    s_lanczos = float(lanczos.last_sigmas["_0"].detach())
    guaranteed = next(r.bound for r in power.certified().layers if r.name == "_0")
    assert s_power < 0.98 * exact
    assert exact * (1 - 1e-4) <= s_lanczos <= exact * (1 + 1e-5)
    assert exact <= guaranteed


def test_bound_every_held_with_batch_statistics() -> None:
    """A convolution with BatchNorm in training mode: the computed call keeps the batch
    variance's gradient path (the full graph), the skipped calls the held first-order model;
    both give finite gradients, and the held value follows a weight change."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).train()
    bound = LipschitzBound(model, (1, 4, 4), bound_every=2).train()
    x = torch.randn(8, 1, 4, 4, requires_grad=True)
    model(x)
    first = bound()
    (gx,) = torch.autograd.grad(first.sum(), x)  # through the batch variance
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    model(x.detach())
    held = bound()
    (gw,) = torch.autograd.grad(held.sum(), model[0].weight)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0
    with torch.no_grad():
        model[0].weight.mul_(1.01)
    bound._calls = 1
    model(x.detach())
    assert float(bound().max()) > float(held.max())


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.conv(x)).flatten(1))


def test_lanczos_on_a_fused_residual_block() -> None:
    """The residual block's fused operator (``x + conv(x)``, adjoint by autograd) moves by
    Lanczos too: a finite estimate, at least power iteration's, at most the guaranteed bound."""
    torch.manual_seed(0)
    model = _Residual()
    power = LipschitzBound(model, (2, 4, 4), power_steps=8).train()
    lanczos = LipschitzBound(model, (2, 4, 4), power_steps=8, power_method="lanczos").train()
    lanczos.load_state_dict(power.state_dict())
    power(pairwise=False)
    lanczos(pairwise=False)
    name = "add"  # the fused x + conv(x)
    s_power = float(power.last_sigmas[name].detach())
    s_lanczos = float(lanczos.last_sigmas[name].detach())
    guaranteed = next(r.bound for r in power.certified().layers if r.name == name)
    assert s_power <= s_lanczos * (1 + 1e-5) <= guaranteed * (1 + 2e-5)
