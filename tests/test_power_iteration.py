"""The training-time power iteration: explicit adjoints equal autograd transposes, and the
persistent vector converges to the top singular vector (paper Thm. 1)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipmargin.bounds import LipschitzBound, norms
from lipmargin.bounds.rules import _conv_adjoint


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
