"""Certified radii (paper Prop. 1 and Prop. 2) checked against closed forms and attacks.

For a linear classifier ``z = W x + b`` the exact distance from ``x`` to the set where class ``i``
beats the label ``t`` is ``(z_t - z_i) / ||w_t - w_i||``; Prop. 2 is exact there, so the certified
radius must equal the minimum over ``i`` of that distance up to the documented slack
(``MARGIN_RTOL * (|z_t| + |z_i|)`` subtracted from each logit difference). Everything here is
computed in float64 from the weights, without the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipmargin.attacks import pgd_l2
from lipmargin.bounds import CertifiedBound, LipschitzBound
from lipmargin.certify import (
    MARGIN_RTOL,
    CertificationReport,
    batches,
    certified_accuracy,
    certify,
    evaluate,
    radii_from_logits,
)
from lipmargin.errors import InputError

F64 = torch.float64
SHAPE = (1, 3, 4)  # inputs (N, 1, 3, 4), flattened to d = 12
D = 12


# --------------------------------------------------------------------------- helpers


def linear_model(k: int, seed: int, scale: float = 1.0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, k))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(k, D, generator=g) * scale)
        model[1].bias.copy_(torch.randn(k, generator=g) * scale)
    return model.eval()


def inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g)


def exact_linear(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """(exact radius, per-pair slack in radius units, argmin class) in float64; radius 0 where
    the prediction is wrong."""
    w = model[1].weight.detach().to(F64)
    b = model[1].bias.detach().to(F64)
    z = x.reshape(x.shape[0], -1).to(F64) @ w.T + b
    n, k = z.shape
    radius = torch.zeros(n, dtype=F64)
    slack = torch.zeros(n, dtype=F64)
    closest = torch.zeros(n, dtype=torch.long)
    for j in range(n):
        t = int(y[j])
        if int(z[j].argmax()) != t:
            continue
        best = math.inf
        for i in range(k):
            if i == t:
                continue
            dist = float(torch.linalg.vector_norm(w[t] - w[i]))
            r = float(z[j, t] - z[j, i]) / dist
            if r < best:
                best = r
                closest[j] = i
                slack[j] = 2 * MARGIN_RTOL * float(z[j, t].abs() + z[j, i].abs()) / dist
        radius[j] = best
    return radius, slack, closest


def small_convnet(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    return model.eval()


# --------------------------------------------------------------------------- linear: exactness


def test_binary_linear_radius_is_distance_to_boundary() -> None:
    model = linear_model(2, seed=1)
    x = inputs(64, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correctly classified
    r = certify(model, x, y, LipschitzBound(model, SHAPE))
    assert r.dtype == F64 and r.shape == (64,)
    w = model[1].weight.detach().to(F64)
    b = model[1].bias.detach().to(F64)
    z = x.reshape(64, -1).to(F64) @ w.T + b
    # Two classes: the boundary is the hyperplane (w0 - w1)^T x + (b0 - b1) = 0.
    exact = (z[:, 0] - z[:, 1]).abs() / torch.linalg.vector_norm(w[0] - w[1])
    slack = 2 * MARGIN_RTOL * z.abs().sum(1) / torch.linalg.vector_norm(w[0] - w[1])
    assert (r <= exact).all()  # a certificate never exceeds the true robust radius
    assert (r >= exact - slack - 1e-12).all()
    big = (exact > 0.5) & (slack < 5e-5 * exact)  # where the slack is below the tolerance
    assert big.sum() > 10
    torch.testing.assert_close(r[big], exact[big], rtol=1e-4, atol=0)


@pytest.mark.parametrize("k,seed", [(3, 0), (5, 1), (10, 2)])
def test_multiclass_linear_prop2_is_exact(k: int, seed: int) -> None:
    model = linear_model(k, seed=seed)
    x = inputs(80, seed=seed + 10)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[::4] = (pred[::4] + 1) % k  # a quarter misclassified
    cert = LipschitzBound(model, SHAPE).certified()
    assert cert.pairwise is not None and cert.guaranteed
    r = certify(model, x, y, cert)
    exact, slack, _ = exact_linear(model, x, y)
    assert (r[::4] == 0).all() and (exact[::4] == 0).all()
    assert (r <= exact).all()
    assert (r >= exact - slack - 1e-12).all()
    big = (exact > 0.3) & (slack < 5e-5 * exact)
    assert big.sum() > 10
    torch.testing.assert_close(r[big], exact[big], rtol=1e-4, atol=0)


def test_linear_global_bound_is_spectral_norm_and_prop1_below_prop2() -> None:
    model = linear_model(6, seed=3)
    x = inputs(100, seed=4)
    with torch.no_grad():
        y = model(x).argmax(1)
    cert = LipschitzBound(model, SHAPE).certified()
    w = model[1].weight.detach().double().numpy()
    sigma = float(np.linalg.norm(w, 2))
    assert sigma <= cert.value <= sigma * (1 + 1e-6)
    # pairwise[t, i] bounds ||w_t - w_i||, tightly for a linear model; zero diagonal.
    dist = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=-1)
    pw = cert.pairwise.numpy()
    assert np.all(np.diag(pw) == 0)
    assert np.all(pw >= dist) and np.allclose(pw, dist, rtol=1e-6, atol=0)

    r2 = certify(model, x, y, cert)
    prop1 = CertifiedBound(value=cert.value, pairwise=None)
    r1 = certify(model, x, y, prop1)
    # Prop. 1 by hand: (z_t - max_{i != t} z_i) / (sqrt(2) L).
    b = model[1].bias.detach().double()
    z = torch.from_numpy(x.reshape(100, -1).double().numpy() @ w.T) + b
    top2 = z.topk(2, dim=1).values
    hand = (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * cert.value)
    slack = 2 * MARGIN_RTOL * top2.abs().sum(1) / (math.sqrt(2) * cert.value)
    assert (r1 <= hand).all()
    assert (r1 >= hand - slack - 1e-12).all()
    big = (hand > 0.1) & (slack < 5e-5 * hand)
    assert big.sum() > 10
    torch.testing.assert_close(r1[big], hand[big], rtol=1e-4, atol=0)
    assert (r2 >= r1).all()
    assert (r2 > r1 * 1.01).any()  # strictly better somewhere on a random model


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(2, 8),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
)
def test_linear_radius_property(seed: int, k: int, scale: float) -> None:
    model = linear_model(k, seed=seed, scale=scale)
    x = inputs(16, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    y = torch.randint(0, k, (16,), generator=g)
    r = certify(model, x, y, LipschitzBound(model, SHAPE))
    exact, slack, _ = exact_linear(model, x, y)
    assert (r >= 0).all()
    assert (r <= exact).all()
    assert (r >= exact - slack - 1e-9 * exact - 1e-12).all()


def test_misclassified_and_ties_get_zero() -> None:
    cert = CertifiedBound(value=1.0, pairwise=torch.ones(3, 3, dtype=F64) - torch.eye(3, dtype=F64))
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 3.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    y = torch.tensor([0, 0, 0, 2])
    r = radii_from_logits(logits, y, cert)
    assert r[1] == 0 and r[2] == 0
    # pairwise all ones: radius = min_i (z_t - z_i) less the slack
    assert r[0] == pytest.approx(2.0 - MARGIN_RTOL * 4.0, rel=1e-12)
    assert r[3] == pytest.approx(5.0 - MARGIN_RTOL * 5.0, rel=1e-12)
    r1 = radii_from_logits(logits, y, CertifiedBound(value=1.0, pairwise=None))
    assert r1[1] == 0 and r1[2] == 0
    assert r1[0] == pytest.approx((2.0 - MARGIN_RTOL * 4.0) / math.sqrt(2), rel=1e-12)


def test_certified_radius_follows_weight_changes() -> None:
    """The bound is cached; changing the weights in place must invalidate it."""
    model = linear_model(4, seed=7)
    bound = LipschitzBound(model, SHAPE)
    x = inputs(50, seed=8)
    with torch.no_grad():
        y = model(x).argmax(1)
    certify(model, x, y, bound)
    with torch.no_grad():
        model[1].weight.mul_(3.0)  # bias unchanged: the radii change
        y = model(x).argmax(1)
    r = certify(model, x, y, bound)
    exact, slack, _ = exact_linear(model, x, y)
    assert (r <= exact).all()
    assert (r >= exact - slack - 1e-12).all()


# --------------------------------------------------------------------------- soundness


def _random_unit(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(shape, generator=g)
    return d / d.flatten(1).norm(dim=1).reshape(-1, *([1] * (len(shape) - 1)))


def test_linear_soundness_and_tightness() -> None:
    k = 5
    model = linear_model(k, seed=11)
    x = inputs(60, seed=12)
    with torch.no_grad():
        y = model(x).argmax(1)
    r = certify(model, x, y, LipschitzBound(model, SHAPE))
    assert (r > 0).all()
    col = r.to(torch.float32).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        for s in range(20):
            pert = x + 0.99 * col * _random_unit(x.shape, s)
            assert (model(pert).argmax(1) == y).all()
    adv = pgd_l2(model, x, y, 0.99 * r.float(), steps=30, restarts=2, clip=None)
    assert not adv.success.any()
    # Along w_i - w_t (the closest class i) a step of 1.01 r crosses the boundary, wherever
    # the documented slack is below 0.5 % of the radius.
    exact, slack, closest = exact_linear(model, x, y)
    keep = slack < 0.005 * exact
    assert keep.sum() > 40
    x, y, col, closest = x[keep], y[keep], col[keep], closest[keep]
    w = model[1].weight.detach()
    direction = (w[closest] - w[y]).reshape(x.shape)
    direction = direction / direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        assert (model(x + 1.01 * col * direction).argmax(1) != y).all()
        assert (model(x + 0.99 * col * direction).argmax(1) == y).all()


def test_convnet_soundness_random_and_pgd() -> None:
    model = small_convnet(seed=0)
    shape = (1, 8, 8)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, *shape, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:8] = (y[:8] + 1) % 5  # some misclassified
    bound = LipschitzBound(model, shape, estimate_steps=2)
    r = certify(model, x, y, bound)
    assert (r[:8] == 0).all()
    assert (r[8:] > 0).all()
    col = r.to(torch.float32).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        for s in range(30):
            pert = x + 0.99 * col * _random_unit(x.shape, 100 + s)
            assert (model(pert).argmax(1)[8:] == y[8:]).all()
    adv = pgd_l2(model, x[8:], y[8:], 0.99 * r[8:].float(), steps=40, restarts=2, clip=None)
    assert not adv.success.any()
    # The margin at the strongest perturbation found stays positive.
    with torch.no_grad():
        z = model(adv.x_adv)
    zt = z.gather(1, y[8:, None]).squeeze(1)
    other = z.scatter(1, y[8:, None], -math.inf).max(1).values
    assert (zt > other).all()
    # The attack is able to succeed at all: at 50 r it does somewhere.
    big = pgd_l2(model, x[8:], y[8:], 50 * r[8:].float(), steps=40, clip=None)
    assert big.success.any()
    # What the radii rest on: every input gradient of z_t - z_i has norm <= K[t, i].
    pair = bound.certified().pairwise
    xg = torch.cat([x, big.x_adv]).requires_grad_(True)
    z = model(xg)
    ratios = []
    for t in range(5):
        for i in range(5):
            if t != i:
                (g,) = torch.autograd.grad((z[:, t] - z[:, i]).sum(), xg, retain_graph=True)
                ratios.append(g.flatten(1).norm(dim=1).double() / pair[t, i])
    ratios = torch.cat(ratios)
    assert (ratios <= 1 + 1e-5).all()
    assert ratios.max() > 0.01  # not vacuous (a random ReLU net is far from its bound)


def test_certify_uses_eval_mode_and_restores_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    bound = LipschitzBound(model, SHAPE)
    x = inputs(40, seed=5)
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    model.train()
    r1 = certify(model, x, y, bound)
    r2 = certify(model, x, y, bound)
    assert model.training
    assert torch.equal(r1, r2)  # dropout off: deterministic
    assert (r1 > 0).all()


# --------------------------------------------------------------------------- evaluate / report


def _brute_median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


@pytest.mark.parametrize("n", [75, 76])
def test_evaluate_report_matches_brute_force(n: int) -> None:
    model = linear_model(4, seed=21)
    x = inputs(n, seed=22)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[::3] = (pred[::3] + 1) % 4  # a third wrong
    bound = LipschitzBound(model, SHAPE)
    eps = [0.1, 0.5, 1.0]
    report = evaluate(model, bound, batches(x, y, 16), eps)
    assert isinstance(report, CertificationReport)
    exact, slack, _ = exact_linear(model, x, y)
    radii = certify(model, x, y, bound)
    assert report.n == n
    torch.testing.assert_close(report.radii, radii, rtol=0, atol=0)
    correct = [int(pred[j]) == int(y[j]) for j in range(n)]
    assert report.clean_accuracy == pytest.approx(sum(correct) / n)
    assert report.correct.tolist() == correct
    for e in eps:
        count = sum(1 for v in radii.tolist() if v >= e)
        assert report.certified_accuracy[e] == pytest.approx(count / n)
        # robust to the slack: the exact radii give the same count unless one is right at e
        exact_count = sum(1 for v in exact.tolist() if v >= e)
        assert abs(exact_count - count) <= 1
    assert report.median_radius == pytest.approx(_brute_median(radii.tolist()), abs=0)
    assert report.median_radius == pytest.approx(float(np.median(exact.numpy())), rel=1e-3)
    assert report.lipschitz == bound.certified().value

    curve = report.curve(points=50)
    assert len(curve) == 50
    assert curve[0] == (0.0, report.clean_accuracy)
    accs = [a for _, a in curve]
    assert all(b <= a for a, b in zip(accs, accs[1:], strict=False))
    assert accs[-1] == 0.0  # beyond the largest radius
    for rad, acc in curve[1:]:
        assert acc == pytest.approx(sum(1 for v in radii.tolist() if v >= rad) / n)

    d = report.to_dict()
    assert d["n"] == n and d["median_radius"] == report.median_radius
    assert set(d["certified_accuracy"]) == {"0.1", "0.5", "1.0"}
    assert len(d["curve"]) == 200


def test_evaluate_all_wrong_gives_zero_median_and_flat_curve() -> None:
    model = linear_model(3, seed=31)
    x = inputs(20, seed=32)
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 3
    report = evaluate(model, LipschitzBound(model, SHAPE), batches(x, y, 7), [0.5])
    assert report.clean_accuracy == 0.0
    assert report.median_radius == 0.0
    assert report.certified_accuracy[0.5] == 0.0
    assert all(a == 0.0 for _, a in report.curve(points=10))


def test_certified_accuracy_function() -> None:
    radii = torch.tensor([0.0, 0.2, 0.5, 0.5, 1.0], dtype=F64)
    assert certified_accuracy(radii, 0.5) == pytest.approx(3 / 5)
    assert certified_accuracy(radii, 0.2) == pytest.approx(4 / 5)
    assert certified_accuracy(radii, 1.5) == 0.0
    assert math.isnan(certified_accuracy(torch.zeros(0, dtype=F64), 0.5))
    with pytest.raises(InputError):
        certified_accuracy(radii, 0.0)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_input_error() -> None:
    model = linear_model(3, seed=41)
    bound = LipschitzBound(model, SHAPE)
    x = inputs(10, seed=42)
    y = torch.zeros(10, dtype=torch.long)
    bad = x.clone()
    bad[3, 0, 1, 1] = float("nan")
    with pytest.raises(InputError):
        certify(model, bad, y, bound)
    inf = x.clone()
    inf[0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError):
        certify(model, inf, y, bound)
    with pytest.raises(InputError):
        certify(model, x, y[:9], bound)
    with pytest.raises(InputError):
        certify(model, x, y[:, None], bound)
    with pytest.raises(InputError):
        certify(model, x, torch.full((10,), 3, dtype=torch.long), bound)  # label out of range
    with pytest.raises(InputError, match=r"range \[-1, 0\]"):
        certify(model, x, torch.cat([y[:9], torch.tensor([-1])]), bound)  # a negative label
    # rtol must be a finite number >= 0 (a negative one would certify misclassified points)
    for bad_rtol in (-1e-2, float("nan"), float("inf")):
        with pytest.raises(InputError, match="rtol"):
            certify(model, x, y, bound, rtol=bad_rtol)
    # float64 logits near the overflow limit: z_t - z_i overflows, no NaN radius
    huge = torch.tensor([[1e308, 1.5e308, -1e308], [1.5e308, 1e308, -1e308]], dtype=torch.float64)
    scalar = CertifiedBound(1.0, None)
    r = radii_from_logits(huge, torch.tensor([0, 0]), scalar)
    assert not torch.isnan(r).any() and float(r[0]) == 0.0
    # the radius arithmetic alone, NaN logits
    logits = torch.zeros(2, 3)
    logits[1, 2] = float("nan")
    with pytest.raises(InputError, match="not finite"):
        radii_from_logits(logits, torch.zeros(2, dtype=torch.long), bound.certified())
    with pytest.raises(InputError):
        evaluate(model, bound, [(bad, y)], [0.5])
    with pytest.raises(InputError):
        evaluate(model, bound, [], [0.5])
    with pytest.raises(InputError):
        certify(model, x, y, "not a bound")  # type: ignore[arg-type]


def test_label_dtype_and_empty_batch_never_crash() -> None:
    """Labels of another integer dtype are either accepted (same radii as int64) or refused
    with InputError; float labels are refused; an empty batch gives no radii or InputError.
    A bare RuntimeError from torch is never the answer."""
    model = linear_model(3, seed=61)
    bound = LipschitzBound(model, SHAPE)
    x = inputs(6, seed=62)
    with torch.no_grad():
        y = model(x).argmax(1)
    ref = certify(model, x, y, bound)
    try:
        r32 = certify(model, x, y.to(torch.int32), bound)
    except InputError:
        pass
    else:
        torch.testing.assert_close(r32, ref, rtol=0, atol=0)
    with pytest.raises(InputError):
        certify(model, x, y.to(torch.float32), bound)
    try:
        empty = certify(model, x[:0], y[:0], bound)
    except InputError:
        pass
    else:
        assert empty.shape == (0,)


def test_estimate_bound_refused_unless_allowed() -> None:
    model = linear_model(3, seed=51)
    x = inputs(10, seed=52)
    with torch.no_grad():
        y = model(x).argmax(1)
    good = LipschitzBound(model, SHAPE).certified()
    est = CertifiedBound(value=good.value, pairwise=good.pairwise, guaranteed=False)
    with pytest.raises(InputError):
        certify(model, x, y, est)
    with pytest.raises(InputError):
        evaluate(model, est, [(x, y)], [0.5])
    r = certify(model, x, y, est, allow_estimate=True)
    torch.testing.assert_close(r, certify(model, x, y, good), rtol=0, atol=0)


def test_power_method_bound_refused_on_convnet() -> None:
    model = small_convnet(seed=3)
    bound = LipschitzBound(model, (1, 8, 8), conv_method="power", estimate_steps=5)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.raises(InputError):
        certify(model, x, y, bound)
    assert (certify(model, x, y, bound, allow_estimate=True) >= 0).all()


def test_gradient_self_check_schedule_covers_first_batches_then_every_nth(monkeypatch) -> None:
    """Issue 16: every one of the first SELF_CHECK_FIRST batches a bound certifies is checked,
    then every SELF_CHECK_EVERY-th, on rows that move through the batch; a new bound (changed
    weights) starts the schedule again."""
    import importlib

    certify_module = importlib.import_module("lipmargin.certify")  # the package exports certify()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    bound = LipschitzBound(model, (6,))
    cert = bound.certified()
    seen: list[torch.Tensor] = []
    real = certify_module.check_gradients

    def spy(model, x, cert, **kw):
        seen.append(x.clone())
        return real(model, x, cert, **kw)

    monkeypatch.setattr(certify_module, "check_gradients", spy)
    x = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    for _ in range(20):
        certify_module.certify(model, x, y, cert)
    first, every = certify_module.SELF_CHECK_FIRST, certify_module.SELF_CHECK_EVERY
    expected = first + sum(1 for k in range(first, 20) if k % every == 0)
    assert len(seen) == expected
    assert all(s.shape[0] == certify_module.SELF_CHECK_POINTS for s in seen)
    assert len({tuple(s[0].tolist()) for s in seen}) > 1  # not always the same rows
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    seen.clear()
    certify_module.certify(model, x, y, bound)  # re-certified bound: checked again at once
    assert len(seen) == 1


def test_evaluate_refuses_a_wrong_bound_on_its_first_batch(monkeypatch) -> None:
    """A rule that under-states its constant is caught before any radius is returned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    cert = LipschitzBound(model, (6,)).certified()
    bad = CertifiedBound(
        value=cert.value * 1e-3, pairwise=cert.pairwise * 1e-3, input_shape=cert.input_shape
    )
    x = torch.randn(40, 6)
    y = model(x).argmax(1)
    from lipmargin.errors import CertificationError

    with pytest.raises(CertificationError, match="self-check"):
        evaluate(model, bad, batches(x, y, 10), [0.1])
