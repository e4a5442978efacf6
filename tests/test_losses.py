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
    cll_loss,
    cll_temperature,
    emma_logits,
    emma_loss,
    gloro_logits,
    gloro_loss,
    lmt_logits,
    lmt_loss,
    margin_loss,
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


# --------------------------------------------------------------------------- issue 15: GloRo


def _loop_bottom(logits, y, pair, eps):
    """z_bot = max_{i != y} (z_i + eps K[y, i]) by explicit loops (Leino et al. 2021)."""
    out = []
    for j in range(logits.shape[0]):
        t = int(y[j])
        out.append(
            max(
                float(logits[j, i]) + eps * float(pair[t, i])
                for i in range(logits.shape[1])
                if i != t
            )
        )
    return torch.tensor(out, dtype=F64)


def _radius(logits, y, pair):
    """Prop. 2 radius by loops (negative allowed: no clipping at 0)."""
    out = []
    for j in range(logits.shape[0]):
        t = int(y[j])
        out.append(
            min(
                (float(logits[j, t]) - float(logits[j, i])) / float(pair[t, i])
                for i in range(logits.shape[1])
                if i != t
            )
        )
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.58, 4.0])
def test_gloro_logits_and_loss_match_loops(eps: float) -> None:
    logits, y, pair = _data(n=25, seed=11)
    ext = gloro_logits(logits, y, pair, eps)
    assert ext.shape == (25, 6)
    assert torch.equal(ext[:, :5], logits)
    torch.testing.assert_close(ext[:, 5], _loop_bottom(logits, y, pair, eps), rtol=0, atol=1e-12)
    # cross-entropy over K + 1 classes with the true class, by hand
    expected = (
        sum(
            -float(ext[j, int(y[j])]) + math.log(sum(math.exp(float(v)) for v in ext[j]))
            for j in range(25)
        )
        / 25
    )
    assert float(gloro_loss(logits, y, pair, eps)) == pytest.approx(expected, rel=1e-12)


def test_gloro_at_eps_zero_counts_the_runner_up_twice() -> None:
    """At eps = 0 GloRo is not cross-entropy: the bottom logit is the best wrong logit."""
    logits, y, pair = _data(n=15, seed=12)
    masked = logits.masked_fill(F.one_hot(y, 5).bool(), -math.inf)
    runner = masked.max(1).values
    expected = (
        -logits.gather(1, y[:, None])[:, 0]
        + torch.logsumexp(torch.cat([logits, runner[:, None]], 1), 1)
    ).mean()
    got = gloro_loss(logits, y, pair, 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got > F.cross_entropy(logits, y)


def test_gloro_bottom_wins_exactly_when_not_certified() -> None:
    """argmax of the K + 1 logits is the true class iff the Prop. 2 radius exceeds eps."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(400, 5, generator=g, dtype=F64) * 3
    y = logits.argmax(1)  # correct points: anchor "label" and "prediction" agree
    _, _, pair = _data(seed=13)
    for eps in (0.2, 1.0, 2.5):
        ext = gloro_logits(logits, y, pair, eps)
        robust = ext.argmax(1) == y
        radius = _radius(logits, y, pair)
        assert torch.equal(robust, radius > eps)
        assert 0 < int(robust.sum()) < 400  # both cases occur
        torch.testing.assert_close(ext, gloro_logits(logits, y, pair, eps, anchor="prediction"))


def test_gloro_anchor_prediction_differs_on_misclassified_points() -> None:
    logits, _, pair = _data(n=20, seed=14)
    y = logits.argmin(1)  # every point misclassified
    lab = gloro_logits(logits, y, pair, 1.0)
    pred = gloro_logits(logits, y, pair, 1.0, anchor="prediction")
    j = logits.argmax(1)
    torch.testing.assert_close(pred[:, 5], _loop_bottom(logits, j, pair, 1.0), rtol=0, atol=1e-12)
    assert not torch.allclose(lab[:, 5], pred[:, 5])
    # label anchor: the predicted (wrong) class is a candidate, so the bottom beats the label
    assert (lab[:, 5] > logits.gather(1, y[:, None])[:, 0]).all()


def test_gloro_loss_decreases_as_certified_margin_grows() -> None:
    logits, _, pair = _data(n=30, seed=15)
    y = logits.argmax(1)
    previous = math.inf
    for extra in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
        z = logits.clone()
        z[torch.arange(30), y] += extra  # larger margin, larger certified radius
        loss = float(gloro_loss(z, y, pair, 1.58))
        assert loss < previous
        previous = loss
    # a smaller Lipschitz bound (larger radii) also lowers the loss; eps larger raises it
    assert gloro_loss(logits, y, 0.5 * pair, 1.58) < gloro_loss(logits, y, pair, 1.58)
    assert gloro_loss(logits, y, pair, 2.0) > gloro_loss(logits, y, pair, 1.58)


@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_gloro_trades_equals_explicit_kl(lam: float) -> None:
    logits, y, pair = _data(n=20, seed=16)
    eps = 1.2
    ext = gloro_logits(logits, y, pair, eps)
    p = torch.cat([torch.softmax(logits, 1), torch.zeros(20, 1, dtype=F64)], 1)
    log_q = torch.log_softmax(ext, 1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(1).mean()  # 0 log 0 = 0 for the bottom class
    expected = F.cross_entropy(logits, y) + lam * kl
    got = gloro_loss(logits, y, pair, eps, trades_lambda=lam)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # at eps = 0 the KL term is log(1 + exp(z_runner) / sum exp z) > 0: not cross-entropy
    assert gloro_loss(logits, y, pair, 0.0, trades_lambda=lam) > F.cross_entropy(logits, y)


def test_gloro_global_bound_is_pairwise_sqrt2_l() -> None:
    logits, y, _ = _data(seed=17)
    lip = torch.tensor(1.3, dtype=F64)
    full = torch.full((5, 5), math.sqrt(2) * 1.3, dtype=F64)
    full.fill_diagonal_(0.0)
    for fn, kw in (
        (gloro_loss, {}),
        (gloro_loss, {"trades_lambda": 1.0}),
        (emma_loss, {}),
        (cll_loss, {}),
        (cll_loss, {"lip_decay": 0.1}),
    ):
        torch.testing.assert_close(fn(logits, y, lip, 0.9, **kw), fn(logits, y, full, 0.9, **kw))


# --------------------------------------------------------------------------- issue 15: EMMA


def _loop_emma(logits, y, pair, eps, floor):
    out = logits.clone()
    for j in range(logits.shape[0]):
        t = int(y[j])
        for i in range(logits.shape[1]):
            if i == t:
                continue
            k = float(pair[t, i])
            r = (float(logits[j, t]) - float(logits[j, i])) / (eps * k)
            out[j, i] += min(1.0, max(floor, r)) * eps * k
    return out


@pytest.mark.parametrize("eps,floor", [(0.5, 0.01), (1.58, 0.01), (3.0, 0.0), (1.0, 0.2)])
def test_emma_matches_loops(eps: float, floor: float) -> None:
    logits, y, pair = _data(n=40, seed=18)
    got = emma_logits(logits, y, pair, eps, floor=floor)
    torch.testing.assert_close(got, _loop_emma(logits, y, pair, eps, floor), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        emma_loss(logits, y, pair, eps, floor=floor),
        F.cross_entropy(_loop_emma(logits, y, pair, eps, floor), y),
        rtol=1e-12,
        atol=1e-12,
    )


def test_emma_eps_zero_is_cross_entropy_and_bounded_by_lmt() -> None:
    logits, y, pair = _data(n=30, seed=19)
    assert emma_logits(logits, y, pair, 0.0) is logits
    assert torch.equal(emma_loss(logits, y, pair, 0.0), F.cross_entropy(logits, y))
    # per-class radii never exceed eps: EMMA's loss lies between CE and plain LMT
    emma = emma_loss(logits, y, pair, 1.0)
    assert F.cross_entropy(logits, y) < emma < lmt_loss(logits, y, pair, 1.0, release_factor=False)
    # misclassified classes get the floor: floor 0 and all points misclassified -> CE
    y_bad = logits.argmin(1)
    z = logits.clone()
    z[torch.arange(30), y_bad] -= 100.0  # every wrong class beats the label
    assert torch.equal(emma_logits(z, y_bad, pair, 1.0, floor=0.0), z)
    # and huge margins give the full LMT margin on every class
    z = logits.clone()
    y_ok = logits.argmax(1)
    z[torch.arange(30), y_ok] += 100.0
    torch.testing.assert_close(
        emma_logits(z, y_ok, pair, 1.0), lmt_logits(z, y_ok, pair, 1.0, release_factor=False)
    )


def test_emma_radius_factor_is_constant_in_backward() -> None:
    logits0, _, pair0 = _data(n=20, seed=20)
    y = logits0.argmax(1)
    eps = 2.0

    def run(detach: bool):
        z = logits0.clone().requires_grad_(True)
        k = pair0.clone().requires_grad_(True)
        rows = k[y] * (1 - F.one_hot(y, 5).to(F64))
        ratio = ((z.gather(1, y[:, None]) - z) / (eps * rows).clamp_min(1e-12)).clamp(0.01, 1)
        if detach:
            ratio = ratio.detach()
        F.cross_entropy(z + ratio * eps * rows, y).backward()
        return z.grad, k.grad

    z = logits0.clone().requires_grad_(True)
    k = pair0.clone().requires_grad_(True)
    emma_loss(z, y, k, eps).backward()
    mz, mk = run(detach=True)
    torch.testing.assert_close(z.grad, mz, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.grad, mk, rtol=1e-10, atol=1e-12)
    assert k.grad.abs().sum() > 0
    nz, _ = run(detach=False)
    assert not torch.allclose(z.grad, nz, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- issue 15: CLL


def test_cll_matches_formula_and_is_scale_invariant() -> None:
    logits, y, pair = _data(n=30, seed=21)
    eps, p = 1.58, 0.3
    sigma = cll_temperature(eps, p)
    q = math.log((1 - p / 2) / (p / 2)) - math.log((p / 2) / (1 - p / 2))
    assert sigma == pytest.approx(2 * eps / q, rel=1e-12)
    expected = 0.0
    for j in range(30):
        t = int(y[j])
        s = sum(
            math.exp(
                (2 * eps - (float(logits[j, t]) - float(logits[j, i])) / float(pair[t, i])) / sigma
            )
            for i in range(5)
            if i != t
        )
        expected += math.log1p(s) / 30
    got = cll_loss(logits, y, pair, eps, p=p, lip_decay=0.0)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # scaling the network's output (logits and bound together) leaves the calibrated term alone
    torch.testing.assert_close(cll_loss(3 * logits, y, 3 * pair, eps, lip_decay=0.0), got)
    # the decay term is lip_decay * (max K)^2
    torch.testing.assert_close(
        cll_loss(logits, y, pair, eps, lip_decay=0.01), got + 0.01 * pair.max() ** 2
    )
    # larger certified radii lower the loss
    z = logits.clone()
    z[torch.arange(30), y] += 2.0
    assert cll_loss(z, y, pair, eps, lip_decay=0.0) < got


def test_cll_detach_bound() -> None:
    logits, y, pair = _data(n=10, seed=22)
    logits.requires_grad_(True)
    k = pair.clone().requires_grad_(True)
    cll_loss(logits, y, k, 1.0, lip_decay=0.0).backward()
    assert k.grad is None or torch.count_nonzero(k.grad) == 0
    k2 = pair.clone().requires_grad_(True)
    cll_loss(logits, y, k2, 1.0, lip_decay=0.0, detach_bound=False).backward()
    assert torch.count_nonzero(k2.grad) > 0
    k3 = pair.clone().requires_grad_(True)
    cll_loss(logits, y, k3, 1.0, lip_decay=0.5).backward()  # only the decay term: max entry
    assert torch.count_nonzero(k3.grad) == 2  # the symmetric pair holding the maximum


# --------------------------------------------------------------------------- issue 15: shared


def _clipped_data(eps: float, floor: float, seed: int):
    """Logits whose EMMA factors are all clipped (locally constant): gradcheck applies."""
    logits, y, pair = _data(n=6, k=4, seed=seed)
    logits = logits.clone()
    for j in range(6):
        t = int(y[j])
        for i in range(4):
            if i != t:
                # either certified well beyond eps, or well below the floor (wrong side)
                sign = 1.0 if (i + j) % 2 else -1.0
                logits[j, i] = logits[j, t] - (2.0 * eps * float(pair[t, i])) * sign
    return logits, y, pair


@pytest.mark.parametrize("name", ["gloro", "gloro-trades", "gloro-pred", "emma", "cll", "cll-k"])
def test_losses_gradcheck(name: str) -> None:
    eps = 0.7
    logits, y, pair = _clipped_data(eps, 0.01, seed=23)
    pair = pair.clone()
    pair.fill_diagonal_(0.0)
    z = logits.clone().requires_grad_(True)
    k = pair.clone().requires_grad_(True)
    fns = {
        "gloro": lambda z, k: gloro_loss(z, y, k, eps),
        "gloro-trades": lambda z, k: gloro_loss(z, y, k, eps, trades_lambda=2.0),
        "gloro-pred": lambda z, k: gloro_loss(z, y, k, eps, anchor="prediction"),
        "emma": lambda z, k: emma_loss(z, y, k, eps),
        "cll": lambda z, k: cll_loss(z, y, k, eps, lip_decay=0.1, detach_bound=False),
        "cll-k": lambda z, k: cll_loss(z, y, k, eps, lip_decay=0.0, detach_bound=False),
    }
    assert torch.autograd.gradcheck(fns[name], (z, k), eps=1e-6, atol=1e-7)
    fns[name](z, k).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(k.grad).all()
    assert k.grad.abs().sum() > 0  # the loss reaches the bound


def test_losses_gradcheck_detached_cll_in_logits() -> None:
    logits, y, pair = _data(n=6, k=4, seed=24)
    z = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: cll_loss(z, y, pair, 0.8), (z,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["gloro", "emma", "cll"])
def test_losses_finite_with_degenerate_bounds(name: str) -> None:
    """Zero diagonal, identical class rows (K[t, i] = 0) and misclassified points: no NaN."""
    logits, y, pair = _data(n=12, seed=25)
    pair = pair.clone()
    pair[0, 1] = pair[1, 0] = 0.0
    y = y.clone()
    y[:6] = logits[:6].argmin(1)  # misclassified
    z = logits.clone().requires_grad_(True)
    k = pair.clone().requires_grad_(True)
    kwargs = {"detach_bound": False, "lip_decay": 1e-3} if name == "cll" else {}
    loss = margin_loss(name, z, y, k, 1.0, **kwargs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and torch.isfinite(k.grad).all()


def test_margin_loss_dispatch_and_bad_values() -> None:
    logits, y, pair = _data(seed=26)
    assert torch.equal(margin_loss("lmt", logits, y, pair, 1.0), lmt_loss(logits, y, pair, 1.0))
    assert torch.equal(margin_loss("gloro", logits, y, pair, 1.0), gloro_loss(logits, y, pair, 1.0))
    bad = [
        lambda: margin_loss("nope", logits, y, pair, 1.0),
        lambda: gloro_loss(logits, y, pair, -1.0),
        lambda: gloro_loss(logits, y, pair, 1.0, trades_lambda=-1.0),
        lambda: gloro_loss(logits, y, pair, 1.0, anchor="bottom"),
        lambda: emma_loss(logits, y, pair, math.nan),
        lambda: emma_loss(logits, y, pair, 1.0, floor=1.5),
        lambda: cll_loss(logits, y, pair, 0.0),
        lambda: cll_loss(logits, y, pair, 1.0, p=1.0),
        lambda: cll_loss(logits, y, pair, 1.0, lip_decay=-1.0),
    ]
    for fn in bad:
        with pytest.raises(ConfigError):
            fn()
    with pytest.raises(ValueError):
        gloro_loss(logits, y, torch.ones(3, 3, dtype=F64), 1.0)


def test_config_loss_keys() -> None:
    from lipmargin.config import config_from_dict

    cfg = config_from_dict({})
    assert cfg.loss == "lmt" and cfg.trades_lambda == 0.0
    cfg = config_from_dict({"loss": "gloro", "trades_lambda": 2, "c": 1.58})
    assert cfg.loss == "gloro"
    for bad in (
        {"loss": "hinge"},
        {"loss": "gloro", "method": "plain"},
        {"trades_lambda": -1.0},
        {"trades_lambda": "1"},
        {"emma_floor": 2.0},
        {"cll_p": 0.0},
        {"cll_lip_decay": True},
        {"gloro_anchor": "pred"},
        {"cll_detach_bound": 1},
        {"loss": "cll", "c": 0.0},
    ):
        with pytest.raises(ConfigError):
            config_from_dict(bad)


@pytest.mark.parametrize("loss", ["gloro", "emma", "cll"])
def test_train_loss_uses_configured_margin_loss(loss: str) -> None:
    from lipmargin.config import config_from_dict
    from lipmargin.train import _loss

    cfg = config_from_dict({"loss": loss, "trades_lambda": 1.0 if loss == "gloro" else 0.0})
    model = _net().eval()
    bound = LipschitzBound(model, (1, 6, 6)).eval()  # eval: no power step, same K twice
    x = torch.rand(8, 1, 6, 6)
    y = torch.arange(8) % 4
    got, logits = _loss(cfg, model, model, bound, x, y, 0.8)
    kwargs = {"gloro": {"trades_lambda": 1.0}, "emma": {}, "cll": {"lip_decay": 1e-4}}[loss]
    expected = margin_loss(loss, model(x), y, bound(), 0.8, **kwargs)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, lmt_loss(logits, y, bound(), 0.8))
