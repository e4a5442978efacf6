"""The LMT loss (paper Alg. 1), its c schedule and the baseline regularisers, against hand
computations: explicit loops over samples and classes, closed forms for the schedule and for the
singular values after a Parseval retraction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipmargin.bounds import LipschitzBound
from lipmargin.errors import ConfigError
from lipmargin.losses import (
    CSchedule,
    lmt_logits,
    lmt_loss,
    parseval_retraction,
    spectral_norm_penalty,
)

F64 = torch.float64


def _data(n: int = 12, k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=F64) * 2
    y = torch.randint(0, k, (n,), generator=g)
    a = torch.rand(k, k, generator=g, dtype=F64) + 0.2
    pair = (a + a.T) / 2
    pair.fill_diagonal_(0.0)
    return logits, y, pair


def _hand_logits(logits, y, pair, c, release: bool):
    """Loop version of paper Alg. 1 (with the release's per-sample factor when ``release``)."""
    n, k = logits.shape
    out = logits.clone()
    for j in range(n):
        t = int(y[j])
        add = [0.0 if i == t else c * float(pair[t, i]) for i in range(k)]
        f = 1.0
        if release:
            for i in range(k):
                if i == t:
                    continue
                ratio = (float(logits[j, t]) - float(logits[j, i])) / add[i]
                f = min(f, min(1.0, max(0.0, ratio)))
        for i in range(k):
            out[j, i] = out[j, i] + f * add[i]
    return out


# --------------------------------------------------------------------------- lmt_loss


def test_c_zero_is_cross_entropy_exactly() -> None:
    logits, y, pair = _data()
    for release in (True, False):
        assert torch.equal(
            lmt_loss(logits, y, pair, 0.0, release_factor=release), F.cross_entropy(logits, y)
        )
        assert torch.equal(
            lmt_loss(logits, y, torch.tensor(3.0, dtype=F64), 0.0), F.cross_entropy(logits, y)
        )
    assert lmt_logits(logits, y, pair, 0.0) is logits


@pytest.mark.parametrize("c", [0.1, 1.0, 7.5])
def test_plain_pairwise_form(c: float) -> None:
    logits, y, pair = _data(seed=1)
    expected = _hand_logits(logits, y, pair, c, release=False)
    got = lmt_logits(logits, y, pair, c, release_factor=False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # target logits untouched; every other logit grows by exactly c K[t, i]
    for j in range(logits.shape[0]):
        t = int(y[j])
        assert got[j, t] == logits[j, t]
    loss = lmt_loss(logits, y, pair, c, release_factor=False)
    torch.testing.assert_close(loss, F.cross_entropy(expected, y), rtol=1e-12, atol=1e-12)
    assert loss > F.cross_entropy(logits, y)


def test_prop1_global_form_adds_sqrt2_c_l() -> None:
    logits, y, _ = _data(seed=2)
    c, lip = 0.3, 2.5
    got = lmt_logits(logits, y, torch.tensor(lip, dtype=F64), c, release_factor=False)
    n, k = logits.shape
    expected = logits.clone()
    for j in range(n):
        for i in range(k):
            if i != int(y[j]):
                expected[j, i] += math.sqrt(2) * c * lip
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The global form is the pairwise form with every off-diagonal entry sqrt(2) L.
    full = torch.full((k, k), math.sqrt(2) * lip, dtype=F64)
    full.fill_diagonal_(0.0)
    torch.testing.assert_close(got, lmt_logits(logits, y, full, c, release_factor=False))


@pytest.mark.parametrize("c", [0.05, 0.5, 2.0, 50.0])
def test_release_factor_matches_hand_computation(c: float) -> None:
    logits, y, pair = _data(n=40, seed=3)
    expected = _hand_logits(logits, y, pair, c, release=True)
    got = lmt_logits(logits, y, pair, c, release_factor=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        lmt_loss(logits, y, pair, c), F.cross_entropy(expected, y), rtol=1e-10, atol=1e-12
    )
    # global form with the factor
    lip = torch.tensor(1.7, dtype=F64)
    full = torch.full((5, 5), math.sqrt(2) * 1.7, dtype=F64)
    full.fill_diagonal_(0.0)
    torch.testing.assert_close(
        lmt_logits(logits, y, lip, c), _hand_logits(logits, y, full, c, release=True)
    )


def test_release_factor_zero_for_misclassified() -> None:
    logits, _, pair = _data(n=30, seed=4)
    y = logits.argmin(1)  # every sample misclassified
    got = lmt_logits(logits, y, pair, 1.0)
    assert torch.equal(got, logits)
    assert torch.equal(lmt_loss(logits, y, pair, 1.0), F.cross_entropy(logits, y))
    # and with a huge margin (factor clipped to 1) the plain form comes back
    y_ok = logits.argmax(1)
    big = logits.clone()
    big[torch.arange(30), y_ok] += 100.0
    torch.testing.assert_close(
        lmt_logits(big, y_ok, pair, 1.0), lmt_logits(big, y_ok, pair, 1.0, release_factor=False)
    )


def test_release_factor_is_constant_in_backward() -> None:
    logits0, _, pair0 = _data(n=20, seed=5)
    y = logits0.argmax(1)  # correct, with margins of order 1: the factor lies inside (0, 1)
    c = 2.0

    def grads(fn):
        z = logits0.clone().requires_grad_(True)
        k = pair0.clone().requires_grad_(True)
        fn(z, k).backward()
        return z.grad, k.grad

    def manual(detach: bool):
        def fn(z, k):
            add = c * k[y] * (1 - F.one_hot(y, 5).to(F64))
            zt = z.gather(1, y[:, None])
            ratio = ((zt - z) / add.clamp_min(1e-12)).clamp(0, 1)
            ratio = ratio.masked_fill(F.one_hot(y, 5).bool(), 1.0)
            f = ratio.min(1, keepdim=True).values
            if detach:
                f = f.detach()
            return F.cross_entropy(z + f * add, y)

        return fn

    with torch.no_grad():
        f_vals = _factor(logits0, y, pair0, c)
    assert ((f_vals > 0.05) & (f_vals < 0.95)).sum() >= 5

    gz, gk = grads(lambda z, k: lmt_loss(z, y, k, c))
    mz, mk = grads(manual(detach=True))
    torch.testing.assert_close(gz, mz, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gk, mk, rtol=1e-10, atol=1e-12)
    assert gk.abs().sum() > 0  # the gradient reaches the bound
    # the test can tell: letting the gradient through the factor gives another gradient
    nz, _ = grads(manual(detach=False))
    assert not torch.allclose(gz, nz, rtol=1e-6, atol=1e-8)


def _factor(logits, y, pair, c):
    out = []
    for j in range(logits.shape[0]):
        t = int(y[j])
        f = 1.0
        for i in range(logits.shape[1]):
            if i != t:
                f = min(
                    f,
                    max(
                        0.0, min(1.0, float(logits[j, t] - logits[j, i]) / (c * float(pair[t, i])))
                    ),
                )
        out.append(f)
    return torch.tensor(out, dtype=F64)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 9),
    k=st.integers(2, 7),
    c=st.floats(1e-3, 100.0),
    release=st.booleans(),
)
def test_lmt_logits_property(seed: int, n: int, k: int, c: float, release: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=F64) * 3
    y = torch.randint(0, k, (n,), generator=g)
    a = torch.rand(k, k, generator=g, dtype=F64) + 0.01
    a.fill_diagonal_(0.0)
    got = lmt_logits(logits, y, a, c, release_factor=release)
    expected = _hand_logits(logits, y, a, c, release=release)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    if release:
        # with the factor, a correctly classified sample stays correct or ties: z_t >= z_i + ...
        ok = logits.argmax(1) == y
        zt = got.gather(1, y[:, None])
        assert (got[ok] <= zt[ok] + 1e-9).all()


def test_bad_c_raises() -> None:
    logits, y, pair = _data()
    for c in (-0.1, math.inf, math.nan):
        with pytest.raises(ConfigError):
            lmt_loss(logits, y, pair, c)


# --------------------------------------------------------------------------- CSchedule


def test_constant_schedule() -> None:
    s = CSchedule(0.7)
    assert [s(i) for i in (0, 1, 10, 10**6)] == [0.7] * 4
    s2 = CSchedule(0.7, c0=None, warmup_epochs=5, steps_per_epoch=10)  # no c0: constant
    assert s2(0) == 0.7 and s2(13) == 0.7
    s3 = CSchedule(0.7, c0=0.1, warmup_epochs=0, steps_per_epoch=10)  # no warm-up: constant
    assert s3(0) == 0.7


def test_warmup_schedule_linear_per_iteration() -> None:
    c0, c, epochs, spe = 1e-5, 1e-2, 5, 40
    s = CSchedule(c, c0=c0, warmup_epochs=epochs, steps_per_epoch=spe)
    total = epochs * spe
    assert s(0) == pytest.approx(c0, rel=1e-12)
    assert s(total // 2) == pytest.approx((c0 + c) / 2, rel=1e-12)
    assert s(37) == pytest.approx(c0 + 37 / total * (c - c0), rel=1e-12)
    assert s(total) == pytest.approx(c, rel=1e-12)
    assert s(total + 1) == pytest.approx(c, rel=1e-12) and s(10 * total) == pytest.approx(c)
    values = [s(i) for i in range(total + 5)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    half = CSchedule(1.0, c0=0.0, warmup_epochs=0.5, steps_per_epoch=10)  # 5 steps
    assert half(1) == pytest.approx(0.2) and half(5) == 1.0 and half(6) == 1.0


def test_schedule_rejects_bad_values() -> None:
    for kwargs in (
        {"c": -1.0},
        {"c": 1.0, "c0": -1e-3},
        {"c": 1.0, "c0": 0.1, "warmup_epochs": -1},
        {"c": 1.0, "c0": 0.1, "warmup_epochs": 1, "steps_per_epoch": 0},
    ):
        with pytest.raises(ConfigError):
            CSchedule(**kwargs)


# --------------------------------------------------------------------------- baselines


def test_spectral_norm_penalty_value_and_gradient() -> None:
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    p = spectral_norm_penalty({"a": a, "b": b}, 0.1)
    assert float(p.detach()) == pytest.approx(0.5 * 0.1 * (4 + 9))
    p.backward()
    assert float(a.grad) == pytest.approx(0.1 * 2) and float(b.grad) == pytest.approx(0.1 * 3)


def _svals(w: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(w.detach().reshape(w.shape[0], -1).double().numpy(), compute_uv=False)


@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(20, 8), lambda: nn.Linear(5, 12), lambda: nn.Conv2d(3, 4, 3)]
)
def test_parseval_retraction_step_and_convergence(make) -> None:
    torch.manual_seed(0)
    layer = make()
    w0 = layer.weight.reshape(layer.weight.shape[0], -1)
    # singular values spread over (0.3, 1.8): u diag(s) v^T
    u, _, vh = torch.linalg.svd(torch.randn_like(w0), full_matrices=False)
    s = torch.linspace(0.3, 1.8, u.shape[1])
    with torch.no_grad():
        layer.weight.copy_((u @ torch.diag(s) @ vh).reshape(layer.weight.shape))
    beta = 0.1
    before = _svals(layer.weight)
    bias = None if layer.bias is None else layer.bias.detach().clone()
    model = nn.Sequential(layer)
    parseval_retraction(model, beta)
    # W <- (1 + b) W - b W W^T W maps each singular value s to (1 + b) s - b s^3.
    expected = np.sort((1 + beta) * before - beta * before**3)[::-1]
    np.testing.assert_allclose(_svals(layer.weight), expected, rtol=1e-5, atol=1e-6)
    if bias is not None:
        assert torch.equal(layer.bias, bias)
    for _ in range(150):
        parseval_retraction(model, beta)
    after = _svals(layer.weight)
    np.testing.assert_allclose(after, 1.0, atol=1e-4)
    assert np.abs(after - 1).max() < np.abs(before - 1).max()


def test_parseval_default_beta_moves_toward_one() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight.mul_(8.0)
    before = _svals(lin.weight)
    parseval_retraction(lin)
    after = _svals(lin.weight)
    beta = 1e-4
    np.testing.assert_allclose(
        after, np.sort((1 + beta) * before - beta * before**3)[::-1], rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- bound gradients


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 8),
        nn.ReLU(),
        nn.Linear(8, 4),
    )


def test_pairwise_bound_gradient_is_finite_and_reaches_weights() -> None:
    model = _net()
    bound = LipschitzBound(model, (1, 6, 6)).train()
    k = bound()
    assert k.shape == (4, 4)
    assert torch.all(torch.diagonal(k) == 0)
    (k.sum() + bound(pairwise=False)).backward()
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    # The head's gradient of sum_{t != i} L_in ||w_t - w_i||, by hand (eval mode: no
    # power-iteration step, so L_in is the same number in both computations).
    bound.eval()
    model.zero_grad()
    k = bound()
    k.sum().backward()
    w = model[5].weight.detach()
    l_in = float(k[0, 1].detach()) / float(torch.linalg.vector_norm(w[0] - w[1]))
    head = w.clone().requires_grad_(True)
    total = sum(
        torch.linalg.vector_norm(head[t] - head[i]) for t in range(4) for i in range(4) if t != i
    )
    (g,) = torch.autograd.grad(total * l_in, head)
    torch.testing.assert_close(model[5].weight.grad, g, rtol=1e-4, atol=1e-6)


def test_lmt_loss_through_bound_has_finite_gradients() -> None:
    model = _net()
    bound = LipschitzBound(model, (1, 6, 6)).train()
    x = torch.rand(10, 1, 6, 6)
    logits = model(x)
    for y in (logits.argmax(1), logits.argmin(1)):  # correct / all misclassified
        model.zero_grad()
        loss = lmt_loss(model(x), y, bound(), 1.0)
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        for name, buf in bound.named_buffers():
            assert torch.isfinite(buf).all(), name
            assert float(buf.norm()) == pytest.approx(1.0, rel=1e-5), name


def test_pairwise_gradient_finite_with_identical_class_rows() -> None:
    """A head whose rows coincide (e.g. zero-initialised) must not give NaN gradients."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[3].weight.zero_()
    bound = LipschitzBound(model, (6,)).train()
    x = torch.randn(4, 6)
    y = torch.tensor([0, 1, 2, 0])
    lmt_loss(model(x), y, bound(), 1.0, release_factor=False).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
