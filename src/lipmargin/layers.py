"""Gradient-norm-preserving activations and the ``torch.fx`` tracer that keeps them as leaves.

``MaxMin`` and ``GroupSort`` (Anil, Lucas, Grosse, "Sorting out Lipschitz function
approximation", ICML 2019) only permute their input values per sample, so they are 1-Lipschitz
in the L2 norm and their Jacobian is a permutation matrix wherever it exists: backpropagated
gradient norms are preserved exactly.

The Lipschitz-bound engine traces models with :class:`LipmarginTracer`, which keeps every class in
:data:`LEAF_MODULES` as a single ``call_module`` node (plain ``torch.fx.symbolic_trace`` would
inline their ``forward``; the forwards are written so that inlining also works).
"""

from __future__ import annotations

import re

import torch
import torch.fx
from torch import Tensor, nn

from lipmargin.errors import ConfigError, InputError

__all__ = [
    "ACTIVATIONS",
    "LEAF_MODULES",
    "AOLConv2d",
    "AOLLinear",
    "GroupSort",
    "LinearResidualConv",
    "NormalizedLinear",
    "SLLConv2d",
    "SLLLinear",
    "LipmarginTracer",
    "MaxMin",
    "activation",
    "symbolic_trace",
]


def _channels(x: Tensor, dim: int) -> int | None:
    """The size of ``x`` along ``dim`` when it is a concrete tensor, ``None`` while tracing."""
    if isinstance(x, torch.fx.Proxy):
        return None
    if not -x.dim() <= dim < x.dim():
        raise InputError(
            f"channel dim {dim} is out of range for an input of shape {tuple(x.shape)}"
        )
    return int(x.shape[dim])


class MaxMin(nn.Module):
    """``cat(max(a, b), min(a, b))`` where ``a, b`` are the two halves of the channels.

    Works on ``(N, C)`` and ``(N, C, H, W)`` inputs (any shape with a channel axis ``dim``).
    The number of channels must be even.

    Args:
        dim: the channel axis (default 1).
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply MaxMin along ``self.dim``."""
        c = _channels(x, self.dim)
        if c is not None and c % 2 != 0:
            raise InputError(
                f"MaxMin needs an even number of channels along dim {self.dim}, got {c}"
            )
        halves = torch.chunk(x, 2, dim=self.dim)
        a = halves[0]
        b = halves[1]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class GroupSort(nn.Module):
    """Sort the channels in ascending order inside consecutive groups of ``group_size``.

    ``GroupSort(2)`` equals ``MaxMin`` up to a fixed permutation of the channels (min first, and
    pairs of neighbouring channels instead of the two halves). The number of channels must be a
    multiple of ``group_size``.

    Args:
        group_size: channels per group (at least 1; 1 is the identity).
        dim: the channel axis (default 1).
    """

    def __init__(self, group_size: int, dim: int = 1) -> None:
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(
                f"GroupSort group_size must be a positive integer, got {group_size!r}"
            )
        self.group_size = group_size
        self.dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply GroupSort along ``self.dim``."""
        c = _channels(x, self.dim)
        if c is not None and c % self.group_size != 0:
            raise InputError(
                f"GroupSort(group_size={self.group_size}) needs a channel count divisible by "
                f"{self.group_size} along dim {self.dim}, got {c}"
            )
        g = self.group_size
        grouped = x.unflatten(self.dim, (-1, g))
        if self.dim >= 0:
            # The groups now sit at self.dim, their members at self.dim + 1.
            ordered = torch.sort(grouped, dim=self.dim + 1).values
            return ordered.flatten(self.dim, self.dim + 1)
        # Negative dims count from the end: the members are at self.dim, the groups just before.
        ordered = torch.sort(grouped, dim=self.dim).values
        return ordered.flatten(self.dim - 1, self.dim)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


#: Module classes outside ``torch.nn`` that tracing must keep as single ``call_module`` nodes.
LEAF_MODULES: tuple[type[nn.Module], ...] = (MaxMin, GroupSort)
# AOL and SLL layers become leaves through their registered rules (bounds/rules/lipschitz.py).


class LipmarginTracer(torch.fx.Tracer):
    """A ``torch.fx`` tracer that also treats the classes in :data:`LEAF_MODULES` as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """True for lipmargin's activation layers, otherwise the default ``torch.fx`` rule
        (convolutions with a non-zero ``padding_mode`` are traced through)."""
        if isinstance(m, LEAF_MODULES):
            return True
        if (
            isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and getattr(m, "padding_mode", "zeros") != "zeros"
            and type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
        ):
            # reflect / replicate / circular padding: traced through, so that the graph holds
            # its F.pad and an unpadded F.conv*d, each with its own rule
            return False
        # A class the user registered a rule for (lipmargin.bounds.register_module) must stay one
        # node, or its rule would never be used.
        from lipmargin.bounds.registry import MODULE_RULES

        if type(m) in MODULE_RULES:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """Trace ``model`` with :class:`LipmarginTracer` and return the ``GraphModule``."""
    tracer = LipmarginTracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


#: Activation names accepted by :func:`activation` (``groupsort<k>`` takes any k >= 1).
ACTIVATIONS: tuple[str, ...] = ("relu", "maxmin", "groupsort2", "groupsort4", "groupsort<k>")

_GROUPSORT = re.compile(r"groupsort(\d+)")


def activation(name: str) -> nn.Module:
    """A new activation module by name (case, spaces, ``_`` and ``-`` are ignored).

    ``"relu"`` -> :class:`torch.nn.ReLU`, ``"maxmin"`` -> :class:`MaxMin`, ``"groupsort<k>"``
    (for example ``"groupsort2"``, ``"groupsort4"``; ``"groupsort"`` alone means 2) ->
    :class:`GroupSort` with group size ``k``. Every call returns a fresh instance.

    Raises:
        ConfigError: for an unknown name.
    """
    if not isinstance(name, str):
        raise ConfigError(f"activation name must be a string, got {type(name).__name__}")
    key = re.sub(r"[\s_-]", "", name.lower())
    if key == "relu":
        return nn.ReLU()
    if key == "maxmin":
        return MaxMin()
    if key == "groupsort":
        return GroupSort(2)
    match = _GROUPSORT.fullmatch(key)
    if match is not None:
        size = int(match.group(1))
        if size < 1:
            raise ConfigError(f"activation {name!r}: the group size must be at least 1")
        return GroupSort(size)
    raise ConfigError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


# -- 1-Lipschitz layers by construction (LMT's successors) ------------------------------------
_AOL_EPS = 1e-12


class AOLLinear(nn.Module):
    """Almost-orthogonal Lipschitz dense layer (Prach & Lampert, ECCV 2022, Thm. 1).

    ``W = P diag(d)`` with ``d_j = (sum_i |P^T P|_ij)^(-1/2)``; then ``W^T W <= I``, so the layer
    is 1-Lipschitz for every parameter ``P``. The bias does not change the constant.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.orthogonal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def rescaling(self) -> Tensor:
        """``d`` (one entry per input feature)."""
        gram = (self.weight.transpose(0, 1) @ self.weight).abs().sum(dim=0)
        return gram.clamp_min(_AOL_EPS).rsqrt()

    def effective_weight(self) -> Tensor:
        """The matrix the layer applies, ``P diag(d)``."""
        return self.weight * self.rescaling()[None, :]

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.effective_weight(), self.bias)


def _kernel_gram(weight: Tensor) -> Tensor:
    """``|K^T K|`` summed over shifts for a conv kernel ``(c_out, c_in, k...)``: entry ``(a, b)``
    is ``sum_shift |sum_c corr(K[c, a], K[c, b])(shift)|``, the absolute row sums of the blocks of
    ``C^T C`` for the (infinite) convolution ``C``."""
    kt = weight.transpose(0, 1)  # (c_in, c_out, k...) used as a batch of c_in images
    pad = tuple(k - 1 for k in weight.shape[2:])
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d}[weight.dim() - 2]
    corr = conv(kt, kt, padding=pad)  # (c_in, c_in, 2k-1...)
    return corr.abs().flatten(2).sum(dim=2)


class AOLConv2d(nn.Module):
    """Almost-orthogonal Lipschitz convolution (Prach & Lampert, ECCV 2022, Thm. 2): stride 1,
    zero padding ``k // 2`` (odd ``k``), kernel rescaled per input channel by
    ``d_j = (sum_i sum_shift |K^T * K|_ij)^(-1/2)``. The rescaled infinite convolution has
    ``C^T C <= I``; the zero-padded one is its restriction: 1-Lipschitz."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"AOLConv2d needs an odd kernel_size, got {kernel_size}")
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def rescaling(self) -> Tensor:
        return _kernel_gram(self.weight).sum(dim=1).clamp_min(_AOL_EPS).rsqrt()

    def effective_weight(self) -> Tensor:
        return self.weight * self.rescaling()[None, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(
            x, self.effective_weight(), self.bias, padding=self.padding
        )


def _sll_t(gram: Tensor, q: Tensor) -> Tensor:
    """``t_i = sum_j |G_ij| q_j / q_i`` with ``q = exp(q_param)`` (SLL Thm. 3): then
    ``diag(t) >= G`` for any symmetric ``G``, by the rescaled Gershgorin argument."""
    qe = torch.exp(q)
    return (gram.abs() * qe[None, :] / qe[:, None]).sum(dim=1)


class SLLLinear(nn.Module):
    """SDP-based Lipschitz dense residual block (Araujo et al., ICLR 2023, Thm. 3):
    ``z = x - 2 W diag(t)^-1 relu(W^T x + b)`` with ``t`` from :func:`_sll_t` on ``G = W^T W``.
    Its Jacobian ``I - 2 W T^-1 D W^T`` (``D`` diagonal in [0, 1]) has eigenvalues in [-1, 1]
    when ``T >= W^T W``: 1-Lipschitz. ``weight`` stores ``W^T`` (hidden x features)."""

    def __init__(self, features: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or features
        self.weight = nn.Parameter(torch.empty(hidden, features))
        nn.init.xavier_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.q = nn.Parameter(torch.zeros(hidden))

    def t(self) -> Tensor:
        return _sll_t(self.weight @ self.weight.transpose(0, 1), self.q)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(torch.nn.functional.linear(x, self.weight, self.bias)) / self.t()
        return x - 2.0 * h @ self.weight


class SLLConv2d(nn.Module):
    """SDP-based Lipschitz convolutional residual block (Araujo et al., ICLR 2023, Thm. 3):
    ``z = x - 2 C^T diag(t)^-1 relu(C x + b)`` with ``C`` a stride-1 convolution (zero padding
    ``k // 2``) and ``C^T`` its exact adjoint (the transposed convolution with the same padding);
    ``t`` from :func:`_sll_t` on the absolute shift sums of ``C C^T``. 1-Lipschitz."""

    def __init__(self, channels: int, hidden: int | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"SLLConv2d needs an odd kernel_size, got {kernel_size}")
        hidden = hidden or channels
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(hidden, channels, kernel_size, kernel_size))
        nn.init.xavier_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.q = nn.Parameter(torch.zeros(hidden))

    def t(self) -> Tensor:
        # C C^T on the hidden channels: the kernel gram of the transposed kernel
        return _sll_t(_kernel_gram(self.weight.transpose(0, 1)), self.q)

    def forward(self, x: Tensor) -> Tensor:
        f = torch.nn.functional
        h = f.conv2d(x, self.weight, self.bias, padding=self.padding)
        h = torch.relu(h) / self.t()[None, :, None, None]
        return x - 2.0 * f.conv_transpose2d(h, self.weight, padding=self.padding)


class LinearResidualConv(nn.Module):
    """LiResNet block (Hu et al., NeurIPS 2023): ``x + conv(x)``, a stride-1 'same' convolution
    with a residual, LINEAR as a whole. The bound engine fuses it into one operator ``I + C``
    whose norm it computes exactly per frequency (not ``1 + ||C||``). Follow it by MaxMin."""

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"LinearResidualConv needs an odd kernel_size, got {kernel_size}")
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=bias)
        nn.init.normal_(self.conv.weight, std=0.1 / (channels * kernel_size**2) ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


class NormalizedLinear(nn.Module):
    """Last layer with unit-norm rows (LiResNet's LLN, Hu et al. 2023):
    ``z_i = <w_i / ||w_i||, x> + b_i``, so the pairwise constants ``||w_t - w_i||`` of paper
    Prop. 2 are at most 2 and training cannot inflate them. The bound engine reads it as the
    ``F.linear`` head with the normalised weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def normalized_weight(self) -> Tensor:
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.normalized_weight(), self.bias)
