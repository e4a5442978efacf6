"""The audit must find nothing against a sound bound and must catch an unsound one; the
tightness analysis must never see an adversarial perturbation inside a certified radius."""

import pytest
import torch
from torch import nn

from lipmargin.audit import audit, tightness
from lipmargin.bounds import LipschitzBound
from lipmargin.certify import batches
from lipmargin.losses import lmt_loss


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated classes of 1x6x6 images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(99))
    x = (centers[y] + 0.08 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 32),
        nn.ReLU(),
        nn.Linear(32, 3),
    )
    bound = LipschitzBound(model, (1, 6, 6))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = _blobs(1500, 0)
    bound.train()
    for _ in range(6):
        for i in range(0, 1500, 50):
            loss = lmt_loss(model(x[i : i + 50]), y[i : i + 50], bound(), 0.3)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    bound.eval()
    return model, bound


@pytest.mark.slow
def test_sound_bound_has_no_broken_certificate_on_1000_points(trained):
    model, bound = trained
    x, y = _blobs(1000, 1)
    result = audit(model, bound, batches(x, y, 250), pgd_steps=30, cw_steps=50, cw_binary_steps=4)
    assert result.n == 1000
    assert result.n_certified > 500, "the model should certify most points"
    assert result.broken == []
    assert 0 < result.gradient_ratio_max <= 1.0


def test_audit_catches_an_underestimated_bound(trained):
    from dataclasses import replace

    model, bound = trained
    cert = bound.certified()
    bad = replace(cert, value=cert.value * 0.2, pairwise=cert.pairwise * 0.2)
    x, y = _blobs(200, 2)
    result = audit(model, bad, batches(x, y, 200), pgd_steps=30, use_cw=False)
    assert len(result.broken) > 0
    assert result.gradient_ratio_max > 1.0
    assert not result.ok


def test_tightness_attacks_never_beat_certificates(trained):
    model, bound = trained
    x, y = _blobs(60, 3)
    res = tightness(model, bound, x, y, local_samples=4)
    certified = res.a > 0
    assert certified.sum() > 20
    # D (an adversarial perturbation found) is never inside A (a certified radius).
    assert torch.all(res.d[certified] >= res.a[certified])
    ratios = res.ratios()
    assert ratios["B/A"] >= 1.0  # a gradient estimate never exceeds a guaranteed bound
    assert set(ratios) >= {"B/A", "C/B", "D/C", "points"}
