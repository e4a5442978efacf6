"""Model registry: build plain-PyTorch networks by name.

>>> from lipmargin import models
>>> net = models.build("wong_kolter")            # 1x28x28 -> 10 logits
>>> models.default_input_shape("c4f3")
(1, 28, 28)

Registered: ``wong_kolter``, ``c4f3`` (alias ``4c3f``), ``c6f2`` (alias ``6c2f``), ``wrn16_4``,
``wrn16_4_avgpool``, ``wrn`` (any depth/width), ``resnet_small``, and nets of 1-Lipschitz layers:
``liresnet``, ``sll_net``, ``aol_net``. User models are given as
``path/to/file.py:factory`` (see :func:`load_factory`; :func:`build` accepts such specs too).
Every model ends with the ``nn.Linear`` producing the logits and traces with
:class:`lipmargin.layers.LipmarginTracer`.
"""

from lipmargin.models import convnets, lipschitz_nets, resnet, wrn  # noqa: F401  (registers)
from lipmargin.models._registry import (
    MODEL_INPUT,
    aliases,
    build,
    canonical_name,
    default_input_shape,
    load_factory,
    names,
    register,
)

__all__ = [
    "MODEL_INPUT",
    "aliases",
    "build",
    "canonical_name",
    "default_input_shape",
    "load_factory",
    "names",
    "register",
]
