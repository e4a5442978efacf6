"""The built-in Lipschitz rules, one file per operator family (paper §5 and Table 2; shared
reference notes §2). Importing this package registers them.

Each rule returns the Lipschitz bound of the input -> node map from its arguments' bounds.
Linear maps (dense, convolution, convolution + BatchNorm) go through ``ctx.linear``, which
runs power iteration while training and returns a guaranteed bound when certifying.
"""

from . import (  # noqa: F401
    activations,
    arithmetic,
    linear,
    lipschitz,
    pooling,
    refusals,
    resampling,
    shape,
)
from .linear import _conv_adjoint  # noqa: F401  (used by tests)
