"""Tests of lipmargin.attacks: exactness on linear models, constraints, bookkeeping, errors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lipmargin.attacks import (
    AttackResult,
    cw_l2,
    deepfool,
    margin,
    pgd_l2,
    smallest_adversarial,
)
from lipmargin.errors import InputError

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Run this module's tiny-tensor attacks on one intra-op thread, then restore.

    The attacks here are thousands of small ops; extra intra-op threads only add
    synchronisation, which becomes very slow when the CPU is shared with other jobs.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def linear_exact(model: nn.Linear, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact minimal L2 distance to a decision boundary of an affine classifier.

    Returns (distance, nearest class, runner-up class by logit).
    """
    w, b = model.weight.detach(), model.bias.detach()
    z = x @ w.T + b
    rows = torch.arange(len(y))
    d = (z[rows, y][:, None] - z) / (w[y][:, None, :] - w[None, :, :]).norm(dim=2)
    d[rows, y] = math.inf
    others = z.clone()
    others[rows, y] = -math.inf
    return d.min(dim=1).values, d.argmin(dim=1), others.argmax(dim=1)


def distance_to_class(model: nn.Linear, x: Tensor, y: Tensor, j: Tensor) -> Tensor:
    """Distance from x to the half-space where class j beats class y (affine model)."""
    w, b = model.weight.detach(), model.bias.detach()
    z = x @ w.T + b
    rows = torch.arange(len(y))
    return (z[rows, y] - z[rows, j]) / (w[y] - w[j]).norm(dim=1)


def linear_problem(
    k: int,
    seed: int,
    n: int = 16,
    d: int = 64,
    unambiguous: bool = False,
    dtype: torch.dtype = torch.float64,
) -> tuple[nn.Linear, Tensor, Tensor, Tensor]:
    """A random affine classifier and correctly classified points at distance in [0.5, 3].

    The dimension matters for C&W: Adam moves each coordinate by about ``lr`` per step, so
    ``steps`` steps reach roughly ``lr * steps * sqrt(d)``; with d = 64 LMT's defaults
    (100 steps, lr 0.01) reach 8, enough for these distances.

    With ``unambiguous`` the nearest boundary belongs to the runner-up class by logit (the
    case where the local methods provably aim at the right boundary).
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, k).to(dtype).eval()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=gen, dtype=dtype))
        model.bias.copy_(torch.randn(k, generator=gen, dtype=dtype))
        x = 2.0 * torch.randn(4000, d, generator=gen, dtype=dtype)
        y = model(x).argmax(dim=1)
        dist, near, top = linear_exact(model, x, y)
    keep = (dist > 0.5) & (dist < 3.0)
    if unambiguous:
        keep &= near == top
    idx = torch.nonzero(keep).flatten()[:n]
    assert len(idx) == n
    return model, x[idx], y[idx], dist[idx]


class Center(nn.Module):
    """``x - 0.5``: inputs in [0, 1] centred, so a random network predicts varied classes."""

    def forward(self, x: Tensor) -> Tensor:
        return x - 0.5


def _sharpen(model: nn.Sequential, index: int, gain: float = 4.0) -> nn.Sequential:
    """Scale the first layer so adversarial distances are small relative to the box."""
    with torch.no_grad():
        model[index].weight.mul_(gain)
        model[index].bias.mul_(gain)
    return model.eval()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        Center(),
        nn.Flatten(),
        nn.Linear(36, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 5),
    )
    return _sharpen(model, 2)


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        Center(),
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    return _sharpen(model, 1)


def image_batch(model: nn.Module, n: int = 16, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Images in [0, 1] (some pixels exactly at the bounds), labelled as the model predicts."""
    gen = torch.Generator().manual_seed(seed)
    x = (1.4 * torch.rand(n, 1, 6, 6, generator=gen) - 0.2).clamp(0.0, 1.0)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return x, y


def check_result(model: nn.Module, x: Tensor, y: Tensor, r: AttackResult) -> None:
    """Invariants every attack result satisfies."""
    assert r.x_adv.shape == x.shape and r.x_adv.dtype == x.dtype
    assert r.norms.shape == (x.shape[0],) and r.success.dtype == torch.bool
    torch.testing.assert_close(r.delta, r.x_adv - x)
    with torch.no_grad():
        fresh = model(r.x_adv).argmax(dim=1) != y
    assert torch.equal(fresh, r.success)
    finite = torch.isfinite(r.norms)
    torch.testing.assert_close(r.norms[finite], r.delta.flatten(1).norm(dim=1)[finite])


def check_minimum_norm(model: nn.Module, x: Tensor, y: Tensor, r: AttackResult) -> None:
    """Invariants of the minimum-norm attacks (failures: x_adv = x, norm inf)."""
    check_result(model, x, y, r)
    assert torch.equal(torch.isinf(r.norms), ~r.success)
    assert torch.equal(r.x_adv[~r.success], x[~r.success])


# ------------------------------------------------------------------------------ margin


def test_margin_sign_matches_prediction() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 2.0, 4.0]])
    y = torch.tensor([0, 0, 2])
    torch.testing.assert_close(margin(logits, y), torch.tensor([-1.0, 5.0, -2.0]))


# -------------------------------------------------------------- linear models: DeepFool


@pytest.mark.parametrize("k", [2, 6])
def test_deepfool_exact_on_linear(k: int) -> None:
    model, x, y, exact = linear_problem(k, seed=k)
    r = deepfool(model, x, y, overshoot=0.0, clip=None)
    check_minimum_norm(model, x, y, r)
    assert bool(r.success.all())
    ratio = r.norms / exact
    assert bool((ratio >= 1.0).all()) and bool((ratio <= 1.001).all()), ratio


@pytest.mark.parametrize("k", [2, 6])
def test_deepfool_default_overshoot_on_linear(k: int) -> None:
    model, x, y, exact = linear_problem(k, seed=10 + k)
    r = deepfool(model, x, y, clip=None)
    assert bool(r.success.all())
    ratio = r.norms / exact
    # one step of length (exact + 1e-4) scaled by 1 + overshoot
    assert bool((ratio >= 1.02).all()) and bool((ratio <= 1.0205).all()), ratio


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 5),
    d=st.integers(1, 12),
    scale=st.floats(0.1, 10.0),
)
def test_deepfool_linear_property(seed: int, k: int, d: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, k).double().eval()
    with torch.no_grad():
        model.weight.copy_(scale * torch.randn(k, d, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(k, generator=gen, dtype=torch.float64))
        x = torch.randn(8, d, generator=gen, dtype=torch.float64)
        y = model(x).argmax(dim=1)
    exact, _, _ = linear_exact(model, x, y)
    r = deepfool(model, x, y, overshoot=0.0, clip=None)
    check_minimum_norm(model, x, y, r)
    assert bool(r.success.all())
    assert bool((r.norms >= exact * (1 - 1e-9)).all())
    assert bool((r.norms <= exact + 1.5e-4).all())


# ------------------------------------------------------------------- linear models: C&W


def test_cw_tuned_exact_on_binary_linear() -> None:
    model, x, y, exact = linear_problem(2, seed=22)
    r = cw_l2(model, x, y, steps=200, binary_steps=15, lr=5e-3, clip=None)
    check_minimum_norm(model, x, y, r)
    assert bool(r.success.all())
    ratio = r.norms / exact
    assert bool((ratio >= 1.0 - 1e-9).all()) and bool((ratio <= 1.01).all()), ratio


def test_cw_tuned_on_multiclass_linear() -> None:
    """Exact where the nearest boundary is the runner-up's; else exact for the class reached.

    C&W follows the gradient of the runner-up logit, so it converges to the closest point of
    *that* class's region, which need not be the globally nearest boundary (a local optimum).
    """
    model, x, y, exact = linear_problem(6, seed=26, n=24)
    _, near, top = linear_exact(model, x, y)
    r = cw_l2(model, x, y, steps=200, binary_steps=15, lr=5e-3, clip=None)
    check_minimum_norm(model, x, y, r)
    assert bool(r.success.all())
    ratio = r.norms / exact
    assert bool((ratio >= 1.0 - 1e-9).all())
    unambiguous = near == top
    assert int(unambiguous.sum()) >= 8
    assert bool((ratio[unambiguous] <= 1.01).all()), ratio[unambiguous]
    with torch.no_grad():
        reached = model(r.x_adv).argmax(dim=1)
    own = distance_to_class(model, x, y, reached)
    assert bool((r.norms <= 1.01 * own).all())


@pytest.mark.parametrize("k", [2, 6])
def test_cw_defaults_on_linear(k: int) -> None:
    """LMT's defaults (100 steps, 9 constants) are coarser: Adam overshoots the boundary."""
    model, x, y, exact = linear_problem(k, seed=30 + k, unambiguous=True)
    r = cw_l2(model, x, y, clip=None)
    assert bool(r.success.all())
    ratio = r.norms / exact
    assert bool((ratio >= 1.0 - 1e-9).all())
    assert float(ratio.median()) <= 1.005
    assert float(ratio.max()) <= 1.03, ratio


# ------------------------------------------------------------------- linear models: PGD


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_pgd_binary_linear_threshold(loss: str) -> None:
    model, x, y, exact = linear_problem(2, seed=50)
    above = pgd_l2(model, x, y, eps=1.01 * exact, random_start=False, clip=None, loss=loss)
    below = pgd_l2(model, x, y, eps=0.99 * exact, random_start=False, clip=None, loss=loss)
    check_result(model, x, y, above)
    assert bool(above.success.all())
    assert not bool(below.success.any())
    assert bool((above.norms <= 1.01 * exact + 1e-9).all())


def test_pgd_binary_linear_random_start() -> None:
    """A random start needs a total path of many radii to turn onto the optimal direction."""
    model, x, y, exact = linear_problem(2, seed=51)
    gen = torch.Generator().manual_seed(0)
    kw = {"steps": 50, "clip": None, "generator": gen}
    above = pgd_l2(model, x, y, eps=1.01 * exact, step_size=0.4 * exact, **kw)
    below = pgd_l2(model, x, y, eps=0.99 * exact, step_size=0.4 * exact, restarts=3, **kw)
    assert bool(above.success.all())
    assert not bool(below.success.any())


def test_pgd_multiclass_linear_threshold() -> None:
    """The margin objective has local maxima (one per class); restarts find the global one."""
    model, x, y, exact = linear_problem(6, seed=52)
    gen = torch.Generator().manual_seed(0)
    kw = {"steps": 50, "restarts": 10, "clip": None, "generator": gen}
    above = pgd_l2(model, x, y, eps=1.01 * exact, step_size=0.4 * exact, **kw)
    below = pgd_l2(model, x, y, eps=0.99 * exact, step_size=0.4 * exact, **kw)
    check_result(model, x, y, above)
    assert bool(above.success.all())
    assert not bool(below.success.any())


# ---------------------------------------------------------------- MLP and conv: PGD


@pytest.mark.parametrize("make", [mlp, convnet])
@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_pgd_constraints(make, loss: str) -> None:
    model = make()
    x, y = image_batch(model)
    eps = torch.linspace(0.0, 2.0, len(y))
    r = pgd_l2(model, x, y, eps=eps, steps=20, restarts=2, loss=loss)
    check_result(model, x, y, r)
    assert bool((r.norms <= eps + 1e-5).all())
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    assert float(r.norms[0]) == 0.0 and torch.equal(r.x_adv[0], x[0])
    big = pgd_l2(model, x, y, eps=3.0, steps=30, loss=loss)
    assert bool((big.norms <= 3.0 + 1e-5).all())
    assert bool(big.success.float().mean() > r.success.float().mean())


def test_pgd_per_example_eps_matches_separate_calls() -> None:
    model = mlp()
    x, y = image_batch(model, n=6)
    eps = torch.tensor([0.1, 0.3, 0.5, 0.8, 1.2, 2.0])
    batched = pgd_l2(model, x, y, eps=eps, steps=15, random_start=False)
    for i in range(len(y)):
        single = pgd_l2(
            model, x[i : i + 1], y[i : i + 1], eps=float(eps[i]), steps=15, random_start=False
        )
        torch.testing.assert_close(batched.x_adv[i : i + 1], single.x_adv, atol=1e-5, rtol=0)


def test_pgd_scalar_tensor_eps_and_unbounded() -> None:
    model = mlp()
    x, y = image_batch(model)
    a = pgd_l2(model, x, y, eps=torch.tensor(0.7), steps=10, random_start=False, clip=None)
    b = pgd_l2(model, x, y, eps=0.7, steps=10, random_start=False, clip=None)
    torch.testing.assert_close(a.x_adv, b.x_adv)
    assert bool((a.norms <= 0.7 + 1e-5).all())


def test_pgd_restarts_never_lose_a_success() -> None:
    model = convnet()
    x, y = image_batch(model, n=24)
    one = pgd_l2(model, x, y, eps=0.6, steps=10, generator=torch.Generator().manual_seed(3))
    three = pgd_l2(
        model, x, y, eps=0.6, steps=10, restarts=3, generator=torch.Generator().manual_seed(3)
    )
    assert bool((three.success | ~one.success).all())


def test_pgd_zero_steps_and_zero_eps() -> None:
    model = mlp()
    x, y = image_batch(model)
    r = pgd_l2(model, x, y, eps=1.0, steps=0, random_start=False)
    assert torch.equal(r.x_adv, x) and bool((r.norms == 0).all())
    r = pgd_l2(model, x, y, eps=0.0, steps=5)
    assert torch.equal(r.x_adv, x) and not bool(r.success.any())


# ------------------------------------------------------- MLP and conv: minimum-norm attacks


@pytest.mark.parametrize("make", [mlp, convnet])
def test_deepfool_and_cw_on_networks(make) -> None:
    model = make()
    x, y = image_batch(model)
    for clip in [(0.0, 1.0), None]:
        df = deepfool(model, x, y, clip=clip)
        cw = cw_l2(model, x, y, clip=clip)
        for r in (df, cw):
            check_minimum_norm(model, x, y, r)
            if clip is not None:
                assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
        assert float(df.success.float().mean()) >= 0.9
        assert float(cw.success.float().mean()) >= 0.9
        # PGD inside a slightly larger ball than DeepFool's norm succeeds where DeepFool did
        eps = torch.where(df.success, 1.05 * df.norms, torch.zeros_like(df.norms))
        pgd = pgd_l2(model, x, y, eps=eps, steps=50, random_start=False, clip=clip)
        assert float(pgd.success[df.success].float().mean()) >= 0.8


def test_smallest_adversarial_takes_minimum() -> None:
    model = convnet()
    x, y = image_batch(model)
    kw = {"cw": {"steps": 50}}
    r = smallest_adversarial(model, x, y, method_kwargs=kw)
    check_minimum_norm(model, x, y, r)
    df = deepfool(model, x, y)
    cw = cw_l2(model, x, y, steps=50)
    torch.testing.assert_close(r.norms, torch.minimum(df.norms, cw.norms))
    assert torch.equal(r.success, df.success | cw.success)
    only_df = smallest_adversarial(model, x, y, methods=("deepfool",))
    torch.testing.assert_close(only_df.norms, df.norms)


def test_cw_confidence_gives_larger_margin() -> None:
    model = mlp()
    x, y = image_batch(model, n=8)
    r = cw_l2(model, x, y, steps=30, confidence=1.0, clip=None)
    with torch.no_grad():
        m = margin(model(r.x_adv), y)
    assert bool((m[r.success] >= 1.0 - 1e-4).all())


# ------------------------------------------------------------------------ bookkeeping


ALL_ATTACKS = {
    "pgd": lambda m, x, y: pgd_l2(m, x, y, eps=0.5, steps=5),
    "cw": lambda m, x, y: cw_l2(m, x, y, steps=10, binary_steps=2),
    "deepfool": lambda m, x, y: deepfool(m, x, y),
    "smallest": lambda m, x, y: smallest_adversarial(
        m, x, y, method_kwargs={"cw": {"steps": 10, "binary_steps": 2}}
    ),
}


@pytest.mark.parametrize("name", list(ALL_ATTACKS))
def test_misclassified_inputs_untouched(name: str) -> None:
    model = mlp()
    x, y = image_batch(model, n=8)
    y = y.clone()
    y[::2] = (y[::2] + 1) % 5  # every other point is now misclassified
    r = ALL_ATTACKS[name](model, x, y)
    assert bool(r.success[::2].all())
    assert bool((r.norms[::2] == 0).all())
    assert torch.equal(r.x_adv[::2], x[::2])


@pytest.mark.parametrize("name", list(ALL_ATTACKS))
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_grad_disabled_callers_and_model_untouched(name: str, context: str) -> None:
    model = mlp()
    model.train()
    model.eval()
    model[2].weight.requires_grad_(False)  # a mix of frozen and trainable parameters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x, y = image_batch(model, n=6)
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        r = ALL_ATTACKS[name](model, x, y)
    assert r.x_adv.shape == x.shape
    assert not model.training and not any(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", list(ALL_ATTACKS))
def test_inference_tensors_as_inputs(name: str) -> None:
    """Inputs created under inference_mode (data pipelines often do) are accepted."""
    model = mlp()
    x, y = image_batch(model, n=6)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        eps = torch.full((6,), 0.5)
        r = ALL_ATTACKS[name](model, xi, yi)
        if name == "pgd":
            r = pgd_l2(model, xi, yi, eps=eps, steps=5)
    with torch.no_grad():
        assert torch.equal(model(r.x_adv).argmax(dim=1) != y, r.success)


@pytest.mark.parametrize("name", list(ALL_ATTACKS))
def test_float64_and_empty_batch(name: str) -> None:
    model = mlp()
    x, y = image_batch(model, n=4)
    model.double()
    r = ALL_ATTACKS[name](model, x.double(), y)
    assert r.x_adv.dtype == torch.float64
    empty = ALL_ATTACKS[name](model, x.double()[:0], y[:0])
    assert empty.x_adv.shape == (0, 1, 6, 6) and empty.norms.shape == (0,)


# ---------------------------------------------------------------------------- errors


def _bad_inputs() -> list[tuple[str, dict]]:
    model = mlp()
    x, y = image_batch(model, n=4)
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = float("nan")
    train_model = mlp()
    train_model.train()
    return [
        ("batch mismatch", {"x": x, "y": y[:3]}),
        ("2-d labels", {"x": x, "y": y[:, None]}),
        ("nan", {"x": nan_x, "y": y}),
        ("inf", {"x": x.masked_fill(x > 0.5, float("inf")), "y": y}),
        ("int x", {"x": (x * 255).to(torch.uint8), "y": y}),
        ("int32 y", {"x": x, "y": y.to(torch.int32)}),
        ("float y", {"x": x, "y": y.float()}),
        ("label range", {"x": x, "y": y + 5}),
        ("negative label", {"x": x, "y": y - 10}),
        ("outside clip", {"x": x + 0.5, "y": y}),
        ("1-d x", {"x": x.flatten()[:4], "y": y}),
        ("numpy x", {"x": x.numpy(), "y": y}),
        ("train mode", {"x": x, "y": y, "model": train_model}),
        ("bad clip", {"x": x, "y": y, "clip": (1.0, 0.0)}),
        ("not a module", {"x": x, "y": y, "model": lambda t: t}),
    ]


@pytest.mark.parametrize("name", list(ALL_ATTACKS))
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_raise(name: str, case: tuple[str, dict]) -> None:
    kwargs = dict(case[1])
    model = kwargs.pop("model", mlp())
    x, y = kwargs.pop("x"), kwargs.pop("y")
    clip = kwargs.pop("clip", (0.0, 1.0))
    funcs = {
        "pgd": lambda: pgd_l2(model, x, y, eps=0.5, steps=2, clip=clip),
        "cw": lambda: cw_l2(model, x, y, steps=2, binary_steps=1, clip=clip),
        "deepfool": lambda: deepfool(model, x, y, steps=2, clip=clip),
        "smallest": lambda: smallest_adversarial(model, x, y, methods=("deepfool",), clip=clip),
    }
    with pytest.raises(InputError):
        funcs[name]()


def test_bad_parameters_raise() -> None:
    model = mlp()
    x, y = image_batch(model, n=4)
    bad = [
        lambda: pgd_l2(model, x, y, eps=-0.1),
        lambda: pgd_l2(model, x, y, eps=float("nan")),
        lambda: pgd_l2(model, x, y, eps=torch.ones(3)),
        lambda: pgd_l2(model, x, y, eps=torch.tensor([0.1, -0.1, 0.1, 0.1])),
        lambda: pgd_l2(model, x, y, eps=0.5, steps=-1),
        lambda: pgd_l2(model, x, y, eps=0.5, steps=2.5),
        lambda: pgd_l2(model, x, y, eps=0.5, restarts=0),
        lambda: pgd_l2(model, x, y, eps=0.5, loss="hinge"),
        lambda: pgd_l2(model, x, y, eps=0.5, step_size=-1.0),
        lambda: cw_l2(model, x, y, lr=0.0),
        lambda: cw_l2(model, x, y, binary_steps=0),
        lambda: cw_l2(model, x, y, confidence=-1.0),
        lambda: cw_l2(model, x, y, initial_const=0.0),
        lambda: deepfool(model, x, y, overshoot=-0.1),
        lambda: deepfool(model, x, y, steps=0),
        lambda: smallest_adversarial(model, x, y, methods=()),
        lambda: smallest_adversarial(model, x, y, methods=("pgd",)),
        lambda: smallest_adversarial(model, x, y, methods="cw"),
        lambda: smallest_adversarial(model, x, y, method_kwargs={"deepfool": {}}, methods=["cw"]),
    ]
    for call in bad:
        with pytest.raises(InputError):
            call()


def test_model_with_bad_output_raises() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 1)).eval()
    x = torch.rand(3, 1, 6, 6)
    y = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(InputError):
        deepfool(model, x, y)
    flat = nn.Sequential(nn.Flatten(0), nn.Linear(108, 5)).eval()
    with pytest.raises(InputError):
        pgd_l2(flat, x, y, eps=0.1)
