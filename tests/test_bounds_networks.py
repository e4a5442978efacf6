"""Whole-network checks of ``LipschitzBound.certified()`` against empirical and exact numbers.

* Non-linear networks: the certified pairwise bound ``K[t, i]`` must never be below the largest
  input-gradient norm of ``F_t - F_i`` found by gradient ascent (double backward), ``value`` never
  below the largest Jacobian spectral norm found, and both must hold for explicit input pairs.
* Affine networks (no activation): the exact Lipschitz constant is the spectral norm of the
  dense Jacobian, which the bound must not undercut. These are much sharper checks of the graph
  rules (residual addition, concatenation, normalisation, broadcasting, reductions, slicing).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipmargin.bounds import LipschitzBound
from lipmargin.errors import UnsupportedOperationError

F64 = torch.float64
REL = 1e-9


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- empirical tools


def jacobians(model: nn.Module, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Per-sample Jacobians ``(B, K, D)`` of a model whose samples are independent."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    out = model(x)
    rows = []
    for k in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, k].sum(), x, create_graph=create_graph, retain_graph=True)
        rows.append(g.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def pair_gradient_norms(model, x, t_idx, i_idx) -> torch.Tensor:
    """``||grad_x (F_t - F_i)(x_b)||`` for every sample ``b`` and its pair ``(t_b, i_b)``."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    diff = out.gather(1, t_idx[:, None]) - out.gather(1, i_idx[:, None])
    (g,) = torch.autograd.grad(diff.sum(), x)
    return g.reshape(x.shape[0], -1).norm(dim=1)


def ascend_pair_gradients(m32, m64, shape, k, starts=32, steps=100, seed=0) -> torch.Tensor:
    """Largest ``||grad_x (F_t - F_i)(x)||`` found for every pair, as a K x K matrix.

    All pairs and starts run in one batch; Adam maximises the gradient norm by double backward
    on the float32 model (fast convolutions); the best points are re-measured in float64."""
    pairs = [(t, i) for t in range(k) for i in range(t + 1, k)]
    t_idx = torch.tensor([t for t, _ in pairs]).repeat_interleave(starts)
    i_idx = torch.tensor([i for _, i in pairs]).repeat_interleave(starts)
    b = len(pairs) * starts
    x = (2.0 * torch.randn((b, *shape), generator=seeded(seed))).requires_grad_(True)
    best_x = x.detach().clone()
    best = torch.full((b,), -1.0)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        out = m32(x)
        diff = out.gather(1, t_idx[:, None]) - out.gather(1, i_idx[:, None])
        (g,) = torch.autograd.grad(diff.sum(), x, create_graph=True)
        gn = g.reshape(b, -1).norm(dim=1)
        better = gn.detach() > best
        best = torch.where(better, gn.detach(), best)
        best_x[better] = x.detach()[better]
        opt.zero_grad()
        (-gn.sum()).backward()
        opt.step()
    final = pair_gradient_norms(m64, best_x.double(), t_idx, i_idx)
    per_pair = final.reshape(len(pairs), starts).max(dim=1).values
    result = torch.zeros((k, k), dtype=F64)
    for (t, i), v in zip(pairs, per_pair, strict=True):
        result[t, i] = result[i, t] = v
    return result


def ascend_jacobian_norm(m32, m64, shape, starts=16, steps=50, seed=1) -> float:
    """Largest ``||J(x)||_2`` found at random and gradient-ascended points (search in float32,
    measured in float64)."""
    x = (2.0 * torch.randn((starts, *shape), generator=seeded(seed))).requires_grad_(True)
    best_x = x.detach().clone()
    best = torch.full((starts,), -1.0)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        s = torch.linalg.matrix_norm(jacobians(m32, x, create_graph=True), ord=2)
        better = s.detach() > best
        best = torch.where(better, s.detach(), best)
        best_x[better] = x.detach()[better]
        opt.zero_grad()
        (-s.sum()).backward()
        opt.step()
    return float(torch.linalg.matrix_norm(jacobians(m64, best_x.double()), ord=2).max())


def random_pair_ratios(model, shape, n=256, seed=2):
    """For random pairs ``x, x'`` at many distances: per-pair ratios ``|d_ti| / ||x - x'||``
    (K x K, max over pairs) and ``||F(x) - F(x')|| / ||x - x'||`` (max)."""
    g = seeded(seed)
    x = 2.0 * torch.randn((n, *shape), generator=g, dtype=F64)
    scale = torch.logspace(-4, 1, n, dtype=F64).reshape(n, *([1] * len(shape)))
    y = x + scale * torch.randn((n, *shape), generator=g, dtype=F64)
    with torch.no_grad():
        dout = model(x) - model(y)
    dist = (x - y).reshape(n, -1).norm(dim=1)
    pair = (dout[:, :, None] - dout[:, None, :]).abs() / dist[:, None, None]
    whole = dout.norm(dim=1) / dist
    return pair.max(dim=0).values, float(whole.max())


def check_against_empirical(model: nn.Module, shape, steps: int = 100) -> None:
    """Certify ``model`` (float32), then test the numbers on a float64 copy (``steps``: Adam
    steps of the gradient ascents; 0 skips them)."""
    model.eval()
    cert = LipschitzBound(model, shape).certified()
    m64 = copy.deepcopy(model).double().eval()
    k = cert.pairwise.shape[0] if cert.pairwise is not None else None

    pair_ratio, whole_ratio = random_pair_ratios(m64, shape)
    assert whole_ratio <= cert.value * (1 + REL), (whole_ratio, cert.value)
    x = 2.0 * torch.randn((64, *shape), generator=seeded(3), dtype=F64)
    J = jacobians(m64, x)
    jac_norm = float(torch.linalg.matrix_norm(J, ord=2).max())
    if steps:
        jac_norm = max(jac_norm, ascend_jacobian_norm(model, m64, shape, steps=steps // 2 + 1))
    assert jac_norm <= cert.value * (1 + REL), (jac_norm, cert.value)

    if k is None:
        return
    K = cert.pairwise
    assert (pair_ratio <= K * (1 + REL) + 1e-12).all(), (pair_ratio, K)
    grad_pairs = (J[:, :, None, :] - J[:, None, :, :]).norm(dim=-1).max(dim=0).values
    if steps:
        found = ascend_pair_gradients(model, m64, shape, k, steps=steps)
        grad_pairs = torch.maximum(grad_pairs, found)
    assert (grad_pairs <= K * (1 + REL) + 1e-12).all(), (grad_pairs, K)
    check_pairwise_structure(model, cert)


def check_pairwise_structure(model: nn.Module, cert) -> None:
    K = cert.pairwise
    assert K.dtype == F64
    assert torch.equal(K, K.T)
    assert (torch.diagonal(K) == 0).all()
    assert (K >= 0).all()
    assert (K <= math.sqrt(2) * cert.value * (1 + 1e-8)).all()
    # F_t - F_i = (w_t - w_i) . h(x): K[t, i] / value = ||w_t - w_i|| / ||W||_2 (Prop. 2)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    w = head.weight.detach().double().numpy()
    ratio = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=-1) / np.linalg.norm(w, 2)
    np.testing.assert_allclose(K.numpy() / cert.value, ratio, rtol=1e-7, atol=1e-12)


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    g = seeded(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                sign = torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0)
                m.weight.copy_(sign * (0.5 + torch.rand(c, generator=g)))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                m.running_var.copy_(0.2 + 1.8 * torch.rand(c, generator=g))


# --------------------------------------------------------------------------- random networks

ACTS = {
    "relu": F.relu,
    "softplus": F.softplus,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
}


class Net(nn.Module):
    """Input normalisation, conv+BN, a residual block, concatenation, pooling, functional calls,
    a hidden dense layer and the logits ``nn.Linear``. Input ``(2, 8, 8)``, 4 classes."""

    def __init__(self, seed: int, act: str, pool: str, flatten: str) -> None:
        super().__init__()
        torch.manual_seed(seed)
        g = seeded(seed)
        self.act = ACTS[act]
        self.pool_kind = pool
        self.flatten_kind = flatten
        self.register_buffer("mean", torch.rand((1, 2, 1, 1), generator=g))
        self.register_buffer("std", 0.2 + 0.4 * torch.rand((1, 2, 1, 1), generator=g))
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 2, 1)
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2)}.get(pool, nn.Identity())
        self.conv4 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(5 * 2 * 2, 8)
        self.fc = nn.Linear(8, 4)
        randomise_batchnorm(self, seed)

    def forward(self, x):
        x = (x - self.mean) / self.std
        h = self.act(self.bn1(self.conv1(x)))
        h = h + self.bn2(self.conv2(h))
        h = self.act(h)
        h = torch.cat([h, self.conv3(h)], dim=1)
        if self.pool_kind == "F.max":
            h = F.max_pool2d(h, 2)
        elif self.pool_kind == "F.avg":
            h = F.avg_pool2d(h, 2)
        else:
            h = self.pool(h)
        h = self.act(self.conv4(h))
        if self.flatten_kind == "view":
            h = h.view(h.size(0), -1)
        else:
            h = torch.flatten(h, 1)
        h = self.act(self.fc1(h))
        return self.fc(h)


NETS = [
    (0, "softplus", "avg", "view"),
    (1, "tanh", "max", "flatten"),
    (2, "gelu", "F.avg", "flatten"),
    (3, "relu", "F.max", "view"),
    (4, "elu", "avg", "flatten"),
    (5, "sigmoid", "max", "view"),
]


@pytest.mark.parametrize("cfg", NETS, ids=["-".join(map(str, c)) for c in NETS])
def test_random_network_bound_above_empirical(cfg) -> None:
    # ReLU + max pooling is piecewise linear: its gradient norm has no gradient to ascend, so
    # only the 32 random starts per pair count
    check_against_empirical(Net(*cfg), (2, 8, 8), steps=1 if cfg[1] == "relu" else 100)


class NoHead(nn.Module):
    """Ends with a convolution and global average pooling: no final nn.Linear."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.pool = pool
        randomise_batchnorm(self, 7)

    def forward(self, x):
        h = F.softplus(self.bn(self.conv1(x)))
        h = self.conv2(h)
        if self.pool == "module":
            return torch.flatten(self.gap(h), 1)
        return h.mean((2, 3))


@pytest.mark.parametrize("pool", ["module", "mean"])
def test_network_without_final_linear(pool) -> None:
    model = NoHead(pool).eval()
    bound = LipschitzBound(model, (2, 6, 6))
    cert = bound.certified()
    assert cert.pairwise is None
    assert not bound.has_pairwise
    check_against_empirical(model, (2, 6, 6))


# --------------------------------------------------------------------------- affine networks


def exact_affine_norms(model: nn.Module, shape):
    """Exact Lipschitz constant of an affine model (float64 dense Jacobian), and the exact
    pairwise constants ``||J_t - J_i||``."""
    m64 = copy.deepcopy(model).double().eval()
    J = jacobians(m64, torch.zeros((1, *shape), dtype=F64))[0]
    whole = float(np.linalg.norm(J.numpy(), 2))
    pair = (J[:, None, :] - J[None, :, :]).norm(dim=-1)
    return whole, pair


def check_affine(model: nn.Module, shape) -> None:
    model.eval()
    cert = LipschitzBound(model, shape).certified()
    whole, pair = exact_affine_norms(model, shape)
    assert cert.value >= whole * (1 - REL), (cert.value, whole)
    if cert.pairwise is not None:
        assert (cert.pairwise >= pair * (1 - REL)).all(), (cert.pairwise, pair)


class AffineNet(Net):
    """``Net`` with every activation replaced by the identity: an affine map."""

    def __init__(self, seed: int, pool: str, flatten: str) -> None:
        super().__init__(seed, "relu", pool, flatten)
        self.act = nn.Identity()


AFFINE = [(0, "avg", "view"), (1, "F.avg", "flatten"), (2, "avg", "flatten")]


@pytest.mark.parametrize("cfg", AFFINE, ids=["-".join(map(str, c)) for c in AFFINE])
def test_affine_network_bound_above_exact(cfg) -> None:
    check_affine(AffineNet(*cfg), (2, 8, 8))


class Residual(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.mode = mode
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        if self.mode == "add":
            h = x + self.a(x)
        elif self.mode == "sub_alpha":
            h = torch.sub(x, self.a(x), alpha=2.5)
        elif self.mode == "add_method":
            h = self.a(x).add(self.b(x))
        elif self.mode == "chain":
            h = x + self.a(x)
            h = h - self.b(h)
        elif self.mode == "scaled":
            h = 0.5 * x + self.a(x) * -3.0
        else:  # "rsub": constant minus input
            h = 1.0 - self.a(x)
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("mode", ["add", "sub_alpha", "add_method", "chain", "scaled", "rsub"])
def test_residual_and_arithmetic_rules(mode) -> None:
    check_affine(Residual(mode), (3, 5, 5))


class Keywords(nn.Module):
    """Arithmetic with keyword arguments (``torch.mul(x, other=c)``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x):
        m = self.mode
        if m == "mul":
            return torch.mul(x, other=3.0)
        if m == "div":
            return torch.div(x, other=0.5)
        if m == "add":
            return torch.add(x, other=x, alpha=2)
        if m == "cat":
            return torch.cat(tensors=[x, x], dim=1)
        return torch.mean(x, dim=1, keepdim=True)


@pytest.mark.parametrize("mode", ["mul", "div", "add", "cat", "mean"])
def test_keyword_arguments_are_bounded_or_refused(mode) -> None:
    """A sound bound, or an ``UnsupportedOperationError``; never an internal IndexError."""
    try:
        check_affine(Keywords(mode), (4,))
    except UnsupportedOperationError:
        pass


class Concat(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.mode = mode
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 3)
        self.fc_stack = nn.Linear(2 * 2 * 4 * 4, 3)
        self.fc_same = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        if self.mode == "cat":
            return self.fc(torch.flatten(torch.cat([self.a(x), self.b(x)], dim=1), 1))
        if self.mode == "cat_with_input":
            h = torch.cat((x, self.a(x)), 1)
            return self.fc(torch.flatten(h, 1))
        if self.mode == "stack":
            return self.fc_stack(torch.flatten(torch.stack([x, self.b(x)], dim=1), 1))
        # the same tensor twice: sqrt(2) times
        return self.fc_same(torch.flatten(torch.cat([x, x], dim=1), 1))


@pytest.mark.parametrize("mode", ["cat", "cat_with_input", "stack", "same_twice"])
def test_concatenation_rules(mode) -> None:
    check_affine(Concat(mode), (2, 4, 4))


class Shapes(nn.Module):
    """Slicing, padding, permutes, reductions and splits, each exactly checkable."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x):
        m = self.mode
        if m == "slice":
            return torch.flatten(x[:, 1:, ::2, :-1], 1)
        if m == "pad":
            return torch.flatten(F.pad(x, (1, 2, 0, 1)), 1)
        if m == "permute":
            return x.permute(0, 3, 1, 2).reshape(x.shape[0], -1)
        if m == "transpose":
            return torch.transpose(x, 1, 3).contiguous().flatten(1)
        if m == "mean_hw":
            return x.mean((2, 3))
        if m == "mean_keepdim":
            return torch.mean(x, dim=-1, keepdim=True).flatten(1)
        if m == "sum_c":
            return x.sum(1).flatten(1)
        if m == "sum_fn":
            return torch.sum(x, dim=(1, 3))
        if m == "split_cat":
            a, b = torch.split(x, [1, 2], dim=1)
            return torch.cat([b, 2.0 * a], dim=1).flatten(1)
        if m == "chunk_cat":
            return torch.cat(x.chunk(3, 1), 1).flatten(1)
        if m == "unsqueeze_squeeze":
            return x.unsqueeze(1).squeeze(1).view(x.size(0), -1)
        raise AssertionError(m)


SHAPE_MODES = [
    "slice",
    "pad",
    "permute",
    "transpose",
    "mean_hw",
    "mean_keepdim",
    "sum_c",
    "sum_fn",
    "split_cat",
    "unsqueeze_squeeze",
]


@pytest.mark.parametrize("mode", SHAPE_MODES)
def test_shape_and_reduction_rules(mode) -> None:
    check_affine(Shapes(mode), (3, 4, 5))


@pytest.mark.parametrize(("mode", "expected"), [("mean_hw", 1 / math.sqrt(20)), ("sum_c", 3**0.5)])
def test_reductions_are_exact(mode, expected) -> None:
    cert = LipschitzBound(Shapes(mode), (3, 4, 5)).certified()
    whole, _ = exact_affine_norms(Shapes(mode), (3, 4, 5))
    assert whole == pytest.approx(expected, rel=1e-12)
    assert cert.value == pytest.approx(expected, rel=1e-8)


def test_tuple_from_chunk_passed_to_cat() -> None:
    """``torch.cat(x.chunk(...))`` passes the tuple node itself: bounded or refused cleanly."""
    try:
        check_affine(Shapes("chunk_cat"), (3, 4, 5))
    except UnsupportedOperationError:
        pass


# --------------------------------------------------------------------------- broadcasting


class Broadcast(nn.Module):
    """Operations whose broadcasting repeats (copies) an input-dependent tensor."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("ones", torch.ones(1, 4, 1, 1))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))
        self.register_buffer("zeros", torch.zeros(1, 4, 1, 1))

    def forward(self, x):
        m = self.mode
        if m == "mul_const":  # 1 channel times a 4-channel constant: 4 copies
            h = x[:, :1] * self.ones
        elif m == "imagenet_norm_on_gray":  # 1-channel image, 3-channel statistics
            h = (x[:, :1] - self.mean) / self.std
        elif m == "add_zeros":
            h = x[:, :1] + self.zeros
        elif m == "add_channel_mean":  # x + broadcast channel mean: norm 2, not 1 + 1/sqrt(C)
            h = x + x.mean(1, keepdim=True)
        elif m == "add_channel_sum":
            h = x.sum(1, keepdim=True) - x
        else:  # no expansion: per-channel scaling must stay exact
            h = (x - self.mean[:, :1]) / self.std[:, :1]
        return torch.flatten(h, 1)


BROADCAST_MODES = [
    "mul_const",
    "imagenet_norm_on_gray",
    "add_zeros",
    "add_channel_mean",
    "add_channel_sum",
    "plain",
]


@pytest.mark.parametrize("mode", BROADCAST_MODES)
def test_broadcasting_is_bounded_or_refused(mode) -> None:
    """A broadcast that repeats an input-dependent tensor multiplies the Lipschitz constant by
    up to ``sqrt(copies)``; the bound must cover it (or the operation must be refused)."""
    shape = (4, 3, 3) if mode.startswith("add_channel") else (1, 3, 3)
    try:
        check_affine(Broadcast(mode), shape)
    except UnsupportedOperationError:
        assert mode != "plain"


# --------------------------------------------------------------------------- discontinuities


class PoolIndices(nn.Module):
    """Uses the argmax indices of a max pooling as values: discontinuous, not Lipschitz."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def forward(self, x):
        v, idx = self.pool(x)
        return torch.flatten(v + idx.float(), 1)


def test_pool_indices_are_refused() -> None:
    model = PoolIndices()
    x = torch.zeros(1, 1, 4, 4)
    y = x.clone()
    y[0, 0, 0, 1] = 1e-3  # moves the argmax of one window: the output jumps by 1
    jump = float((model(y) - model(x)).norm() / (y - x).norm())
    assert jump > 100
    with pytest.raises(UnsupportedOperationError):
        LipschitzBound(model, (1, 4, 4)).certified()


class PoolValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, 1, return_indices=True)

    def forward(self, x):
        v, _ = self.pool(x)
        return torch.flatten(v, 1)


def test_pool_values_with_return_indices() -> None:
    cert = LipschitzBound(PoolValues(), (1, 6, 6)).certified()
    assert cert.value >= 3.0 * (1 - REL)


class HeadTimesTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.fc1 = nn.Linear(6, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(F.elu(self.fc1(x))) * 2.0


def test_scaled_logits_have_no_pairwise_and_are_sound() -> None:
    model = HeadTimesTwo()
    bound = LipschitzBound(model, (6,))
    assert not bound.has_pairwise
    assert bound.certified().pairwise is None
    check_against_empirical(model, (6,), steps=0)
    w1 = model.fc1.weight.detach().double().numpy()
    w2 = model.fc.weight.detach().double().numpy()
    expected = 2.0 * np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2)
    assert bound.certified().value == pytest.approx(expected, rel=1e-8)


# --------------------------------------------------------------------------- registered models


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("wong_kolter", {}),
        ("resnet_small", {}),
        ("resnet_small", {"maxpool": False, "input_size": 16, "activation": "maxmin"}),
    ],
)
def test_registered_models(name, kwargs) -> None:
    models = pytest.importorskip("lipmargin.models")
    torch.manual_seed(0)
    model = models.build(name, **kwargs).eval()
    randomise_batchnorm(model, 1)
    shape = models.default_input_shape(name)
    if "input_size" in kwargs:
        shape = (shape[0], kwargs["input_size"], kwargs["input_size"])
    cert = LipschitzBound(model, shape).certified()
    assert math.isfinite(cert.value) and cert.value > 0
    assert cert.pairwise is not None and cert.pairwise.shape == (10, 10)
    assert cert.guaranteed
    check_pairwise_structure(model, cert)

    m64 = copy.deepcopy(model).double().eval()
    x = torch.randn((6, *shape), generator=seeded(4), dtype=F64)
    J = jacobians(m64, x)
    assert float(torch.linalg.matrix_norm(J, ord=2).max()) <= cert.value
    grads = (J[:, :, None, :] - J[:, None, :, :]).norm(dim=-1).max(dim=0).values
    assert (grads <= cert.pairwise * (1 + REL) + 1e-12).all()
    pair_ratio, whole_ratio = random_pair_ratios(m64, shape, n=16)
    assert whole_ratio <= cert.value
    assert (pair_ratio <= cert.pairwise * (1 + REL) + 1e-12).all()
