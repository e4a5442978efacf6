"""Issue 14: fused linear segments (LiResNet blocks) and 1-Lipschitz layers (AOL, SLL, LLN head).

Every bound is checked against an independent computation: the dense float64 matrix of the
whole block (its exact spectral norm) or float64 Jacobians at random points and weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fakedata import write_fake_mnist
from lipmargin import LipschitzBound, models
from lipmargin.bounds import norms, operators
from lipmargin.config import config_from_dict
from lipmargin.layers import (
    AOLConv2d,
    AOLLinear,
    LinearResidualConv,
    MaxMin,
    NormalizedLinear,
    SLLConv2d,
    SLLLinear,
)
from lipmargin.train import train


def dense_norm(fn, shape) -> float:
    """Exact operator norm of a linear map (float64 dense matrix, SVD)."""
    return float(torch.linalg.matrix_norm(norms.dense_matrix(fn, shape), 2))


def jacobian_norm(model: nn.Module, shape, points: int = 3, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model).double().eval()
    best = 0.0
    for _ in range(points):
        x = torch.randn((1, *shape), generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: m(v)[0], x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


# -- fused linear segments ---------------------------------------------------------------------
class Residual(nn.Module):
    """``x + alpha * branch(x)`` or ``branch_a(x) - branch_b(x)`` with linear branches."""

    def __init__(self, a: nn.Module | None, b: nn.Module, alpha: float = 1.0, sub: bool = False):
        super().__init__()
        self.a, self.b, self.alpha, self.sub = a, b, alpha, sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x if self.a is None else self.a(x)
        if self.sub:
            return left - self.b(x)
        return torch.add(left, self.b(x), alpha=self.alpha)


def _block_cases():
    c = 3
    conv = lambda **kw: nn.Conv2d(c, c, **kw)  # noqa: E731
    return {
        "x+conv3": (None, conv(kernel_size=3, padding=1), 1.0, False),
        "x+conv5_dil2": (None, conv(kernel_size=3, padding=2, dilation=2), 1.0, False),
        "x-conv": (None, conv(kernel_size=3, padding=1), 1.0, True),
        "x+2conv": (None, conv(kernel_size=3, padding=1), 2.0, False),
        "x+conv_groups": (None, conv(kernel_size=3, padding=1, groups=3), 1.0, False),
        "x+conv_same_even": (None, conv(kernel_size=2, padding="same"), 1.0, False),
        "conv3+conv1": (conv(kernel_size=3, padding=1), conv(kernel_size=1), 1.0, False),
        "conv3+conv5": (conv(kernel_size=3, padding=1), conv(kernel_size=5, padding=2), 1.0, False),
        "valid+valid": (conv(kernel_size=3), conv(kernel_size=3), -0.5, False),
        "x+bn(conv)": (
            None,
            nn.Sequential(conv(kernel_size=3, padding=1), nn.BatchNorm2d(c)),
            1.0,
            False,
        ),
        "pad2+pad2": (conv(kernel_size=3, padding=2), conv(kernel_size=1, padding=1), 1.0, False),
    }


@pytest.mark.parametrize("case", list(_block_cases()))
@pytest.mark.parametrize("size", [5, 8])
def test_fused_block_bound_against_the_dense_matrix(case, size) -> None:
    torch.manual_seed(hash(case) % 1000 + size)
    a, b, alpha, sub = _block_cases()[case]
    block = Residual(a, b, alpha, sub).double().eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_()
            m.weight.data.normal_()
        if isinstance(m, nn.Conv2d):
            m.weight.data.mul_(3.0)
    shape = (3, size, size)
    net = nn.Sequential(block, nn.Flatten()).double().eval()
    cert = LipschitzBound(net, shape).certified()
    assert [r.kind for r in cert.layers] == ["residual"], cert.layers  # one fused operator
    with torch.no_grad():
        zero = block(torch.zeros(1, *shape, dtype=torch.float64))
        exact = dense_norm(lambda u: block(u) - zero, shape)
    assert cert.value >= exact * (1 - 1e-9)
    assert cert.value <= exact * 1.01  # small maps: the dense exact norm is part of the bound
    ((source, _),) = LipschitzBound(net, shape)._segments.values()
    assert source.op == "placeholder"


def test_fft_bound_of_a_fused_sum_is_sound_on_larger_grids(monkeypatch) -> None:
    monkeypatch.setattr(operators, "DENSE_LIMIT", 0)  # force the FFT bound alone
    ratios = []
    for seed, (c, h) in enumerate([(1, 8), (2, 12), (4, 16), (3, 10)]):
        torch.manual_seed(seed)
        block = LinearResidualConv(c).double().eval()
        block.conv.weight.data.normal_(0, 0.3)
        net = nn.Sequential(block, nn.Flatten()).double()
        value = LipschitzBound(net, (c, h, h)).certified().value
        exact = dense_norm(
            lambda u, blk=block: u + F.conv2d(u, blk.conv.weight, padding=1), (c, h, h)
        )
        assert value >= exact * (1 - 1e-9)
        ratios.append(value / exact)
    assert max(ratios) < 1.15, ratios  # the circular embedding's gap, small already at 8x8


def test_dense_residual_and_sum_of_dense_maps() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    other = nn.Linear(6, 6).double()
    for block, fn in [
        (Residual(None, lin), lambda u: u + u @ lin.weight.T),
        (Residual(lin, other, sub=True), lambda u: u @ lin.weight.T - u @ other.weight.T),
    ]:
        net = nn.Sequential(block, nn.ReLU()).double()
        cert = LipschitzBound(net, (6,)).certified()
        assert [r.kind for r in cert.layers] == ["residual"]
        assert cert.value == pytest.approx(dense_norm(fn, (6,)), rel=1e-8)


def test_a_branch_used_twice_is_not_fused() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c = self.conv(x)
            return torch.cat([x + c, c], 1).flatten(1)

    cert = LipschitzBound(Shared().double(), (2, 5, 5)).certified()
    assert "residual" not in [r.kind for r in cert.layers]


def test_fused_bound_beats_the_product_and_trains() -> None:
    torch.manual_seed(0)
    net = models.build("liresnet", depth=4, width=8)
    bound = LipschitzBound(net, (1, 28, 28))
    cert = bound.certified()
    fused = [r.bound for r in cert.layers if r.kind == "residual"]
    convs = [m.conv for m in net.modules() if isinstance(m, LinearResidualConv)]
    assert len(fused) == len(convs) == 4
    for value, conv in zip(fused, convs, strict=True):
        product = 1.0 + float(norms.conv_fft_bound(conv.weight, (14, 14), 1, 1))
        assert value < product
    # training: power iteration on the fused operator, gradients reach the block weights
    net.train()
    bound.train()
    out = net(torch.rand(4, 1, 28, 28))
    (out.sum() + bound().sum()).backward()
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0


# -- 1-Lipschitz layers ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_aol_layers_are_one_lipschitz(seed) -> None:
    torch.manual_seed(seed)
    lin = AOLLinear(7, 5).double()
    lin.weight.data.normal_(0, 3)
    assert float(torch.linalg.matrix_norm(lin.effective_weight(), 2)) <= 1 + 1e-12
    conv = AOLConv2d(3, 4, 3).double()
    conv.weight.data.normal_(0, 3)
    exact = dense_norm(lambda u: F.conv2d(u, conv.effective_weight(), padding=1), (3, 6, 6))
    assert exact <= 1 + 1e-12
    net = nn.Sequential(conv, MaxMin(), nn.Flatten(), AOLLinear(4 * 36, 10)).double()
    cert = LipschitzBound(net, (3, 6, 6)).certified()
    assert jacobian_norm(net, (3, 6, 6)) <= cert.value <= 1 + 1e-9
    assert [r.kind for r in cert.layers][:1] == ["aol_conv2d"]


@pytest.mark.parametrize("seed", range(3))
def test_sll_blocks_are_one_lipschitz_at_random_points_and_weights(seed) -> None:
    torch.manual_seed(seed)
    dense = SLLLinear(6, 9).double()
    conv = SLLConv2d(2, 3).double()
    for m in (dense, conv):
        m.weight.data.normal_(0, 2)
        m.bias.data.normal_()
        m.q.data.normal_()
    # the rule's constant (1, up to rounding) against float64 Jacobians of each block alone
    for block, shape in ((dense, (6,)), (conv, (2, 5, 5))):
        net = nn.Sequential(block, nn.Flatten()).double()
        cert = LipschitzBound(net, shape).certified()
        assert cert.value == pytest.approx(1.0, abs=1e-6)
        assert jacobian_norm(net, shape, points=5, seed=seed) <= cert.value
        # the product bound would be 1 + 2 ||W||^2 / min t: far above
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(50, 6), dense, nn.Linear(6, 3)).double()
    cert = LipschitzBound(net, (2, 5, 5)).certified()
    assert cert.value >= jacobian_norm(net, (2, 5, 5))


def test_sll_constant_covers_a_rounded_normalisation() -> None:
    from lipmargin.bounds.rules.lipschitz import sll_constant

    exact = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert sll_constant(exact, exact) == pytest.approx(1.0, abs=1e-8)
    low = exact * torch.tensor([1.0, 0.99, 1.0], dtype=torch.float64)
    assert sll_constant(low, exact) == pytest.approx(1.01 / 0.99, rel=1e-6)


def test_normalized_head_gives_pairwise_bounds() -> None:
    torch.manual_seed(0)
    head = NormalizedLinear(6, 4).double()
    net = nn.Sequential(nn.Linear(3, 6), MaxMin(), head).double()
    cert = LipschitzBound(net, (3,)).certified()
    assert cert.pairwise is not None
    w = head.normalized_weight().detach()
    first = float(torch.linalg.matrix_norm(net[0].weight.detach(), 2))
    assert cert.pairwise[0, 1] == pytest.approx(first * float((w[0] - w[1]).norm()), rel=1e-8)
    jac = torch.autograd.functional.jacobian(lambda v: net(v)[0], torch.randn(1, 3).double())
    jac = jac.reshape(4, 3)
    for t in range(4):
        for i in range(4):
            assert float((jac[t] - jac[i]).norm()) <= float(cert.pairwise[t, i]) * (1 + 1e-9)


# -- models and training -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["liresnet", "sll_net", "aol_net"])
def test_lipschitz_nets_are_sound_and_train_one_epoch(tmp_path, name) -> None:
    torch.manual_seed(0)
    net = models.build(name, width=4, dense=16)
    cert = LipschitzBound(net, (1, 28, 28)).certified()
    assert cert.pairwise is not None
    data = write_fake_mnist(tmp_path / "data", n_train=100, n_test=40)
    cfg = config_from_dict(
        {
            "name": name,
            "model": name,
            "model_kwargs": {"width": 4, "dense": 16},
            "epochs": 1,
            "batch_size": 50,
            "eval_n": 20,
            "c": 0.5,
            "eval_eps": 0.1,
        }
    )
    record = train(cfg, tmp_path / "run", data_dir=data, progress=False)
    assert record["epoch"] == 1 and record["bound"] > 0


def test_liresnet_bound_grows_far_slower_than_the_product() -> None:
    """Depth 4 -> 16: the fused bound grows like ||I + C||^depth, the product bound like
    (1 + ||C||)^depth (measured at random init: 4.8x against 9.1x)."""
    torch.manual_seed(0)
    fused, product = [], []
    for depth in (4, 16):
        net = models.build("liresnet", depth=depth, width=4, dense=16)
        fused.append(LipschitzBound(net, (1, 28, 28)).certified().value)
        per_block = [
            1.0 + float(norms.conv_fft_bound(m.conv.weight, (14, 14), 1, 1))
            for m in net.modules()
            if isinstance(m, LinearResidualConv)
        ]
        product.append(torch.tensor(per_block).prod().item())
    assert fused[1] / fused[0] < 0.6 * product[1] / product[0]
