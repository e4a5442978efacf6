"""The README's Python example, run as-is by tests/test_examples.py."""

import torch
from torch import nn

from lipmargin import LipschitzBound, certify
from lipmargin.losses import lmt_loss

torch.manual_seed(0)
model = nn.Sequential(  # any plain nn.Module; here 1x28x28 images -> 10 logits
    nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
    nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
    nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10),
)  # fmt: skip
x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))  # images in [0, 1], labels

# certification: guaranteed, float64, one forward pass
model.eval()
bound = LipschitzBound(model, input_shape=(1, 28, 28))
radii = certify(model, x, y, bound)  # per point; 0 where misclassified (Prop. 2 / Prop. 1)
cert = bound.certified()  # value, pairwise K x K, per-layer rows (cached)
print(f"Lipschitz bound {cert.value:.4g}, median certified radius {radii.median():.4g}")

# LMT training (paper Alg. 1): the forward pass first, then the bound (one power-iteration
# step, differentiable); deep nets: LipschitzBound(model, shape, power_steps=10)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model.train()
bound.train()
for _ in range(3):
    logits = model(x)
    K = bound()  # pairwise K[t, i] estimate
    loss = lmt_loss(logits, y, K, c=1.0)
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"LMT loss after 3 steps {loss.item():.4f}")
