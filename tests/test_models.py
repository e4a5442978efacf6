"""Model registry, model architectures and the MaxMin/GroupSort layers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from lipmargin import models
from lipmargin.errors import ConfigError, InputError
from lipmargin.layers import (
    LEAF_MODULES,
    GroupSort,
    LipmarginTracer,
    MaxMin,
    activation,
    symbolic_trace,
)

EXPECTED_NAMES = {
    "wong_kolter",
    "c4f3",
    "c6f2",
    "wrn",
    "wrn16_4",
    "wrn16_4_avgpool",
    "resnet_small",
}


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _last_module(gm: torch.fx.GraphModule) -> nn.Module:
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    last = output.args[0]
    assert isinstance(last, torch.fx.Node)
    assert last.op == "call_module", f"last op is {last.op} {last.target}"
    return gm.get_submodule(str(last.target))


# --------------------------------------------------------------------------- registry


def test_registered_names() -> None:
    assert EXPECTED_NAMES <= set(models.names())
    assert models.names() == sorted(models.names())
    assert models.aliases()["4c3f"] == "c4f3"
    assert models.aliases()["6c2f"] == "c6f2"


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_model_forward_trace_and_last_linear(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name).eval()
    shape = models.default_input_shape(name)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()

    gm = symbolic_trace(model)
    assert isinstance(_last_module(gm), nn.Linear)
    assert _last_module(gm).out_features == 10
    with torch.no_grad():
        torch.testing.assert_close(gm(x), out)
    # The explicit tracer gives the same graph as the helper.
    graph = LipmarginTracer().trace(model)
    assert any(n.op == "output" for n in graph.nodes)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
@pytest.mark.parametrize("act", ["maxmin", "groupsort2"])
def test_models_with_sorting_activations_trace_as_leaves(name: str, act: str) -> None:
    kwargs = {"depth": 10, "width": 1} if name.startswith("wrn") else {}
    model = models.build(name, activation=act, **kwargs).eval()
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    gm = symbolic_trace(model)
    leaves = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), LEAF_MODULES)
    ]
    assert leaves, "MaxMin/GroupSort must stay call_module nodes"
    assert isinstance(_last_module(gm), nn.Linear)
    x = torch.randn(2, *models.default_input_shape(name))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_default_input_shapes() -> None:
    assert models.default_input_shape("wong_kolter") == (1, 28, 28)
    assert models.default_input_shape("c4f3") == (1, 28, 28)
    assert models.default_input_shape("4c3f") == (1, 28, 28)
    assert models.default_input_shape("c6f2") == (1, 28, 28)
    assert models.default_input_shape("wrn16_4") == (3, 32, 32)
    assert models.default_input_shape("resnet_small") == (3, 32, 32)
    assert models.default_input_shape("c4f3", in_channels=3, input_size=32) == (3, 32, 32)
    assert models.MODEL_INPUT["wrn16_4_avgpool"] == (3, 32, 32)


def test_wong_kolter_parameter_count() -> None:
    expected = (16 * 1 * 4 * 4 + 16) + (32 * 16 * 4 * 4 + 32) + (1568 * 100 + 100) + (100 * 10 + 10)
    assert expected == 166_406
    model = models.build("wong_kolter")
    assert _param_count(model) == expected
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [type(m).__name__ for m in layers] == ["Conv2d", "Conv2d", "Linear", "Linear"]
    assert layers[0].stride == (2, 2) and layers[0].padding == (1, 1)
    assert layers[2].in_features == 32 * 7 * 7


def test_wrn16_4_parameter_count_and_structure() -> None:
    model = models.build("wrn16_4")
    count = _param_count(model)
    assert abs(count - 2.75e6) < 0.02e6
    assert count == 2_748_890
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 3 and convs[0].out_channels == 16
    widths = {m.out_channels for m in convs}
    assert widths == {16, 64, 128, 256}
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 6 and all(d.p == pytest.approx(0.4) for d in dropouts)
    # Pre-activation: the first node of each block is its batch norm.
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2)
    assert isinstance(block.shortcut, nn.Conv2d) and block.shortcut.stride == (2, 2)
    assert model.layer1[1].shortcut is None


def test_wrn16_4_avgpool_shortcut() -> None:
    model = models.build("wrn16_4_avgpool")
    assert _param_count(model) == _param_count(models.build("wrn16_4"))
    for group in (model.layer2, model.layer3):
        shortcut = group[0].shortcut
        assert isinstance(shortcut, nn.Sequential)
        assert isinstance(shortcut[0], nn.AvgPool2d) and shortcut[0].kernel_size == 2
        assert isinstance(shortcut[1], nn.Conv2d) and shortcut[1].stride == (1, 1)
    # Group 1 changes width at stride 1: a plain 1x1 conv.
    assert isinstance(model.layer1[0].shortcut, nn.Conv2d)


def test_c4f3_and_c6f2_structure() -> None:
    c4f3 = models.build("4c3f")
    convs = [m for m in c4f3.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in c4f3.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert [c.kernel_size[0] for c in convs] == [3, 4, 3, 4]
    assert [f.out_features for f in fcs] == [512, 512, 10]
    assert fcs[0].in_features == 64 * 7 * 7
    c6f2 = models.build("6c2f")
    convs = [m for m in c6f2.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in c6f2.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 32, 32, 64, 64, 64]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1, 2]
    assert [f.out_features for f in fcs] == [512, 10]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("wong_kolter", {"in_channels": 3, "input_size": 32, "num_classes": 5}),
        ("c4f3", {"in_channels": 3, "input_size": 32}),
        ("c6f2", {"in_channels": 3, "input_size": 32, "num_classes": 100}),
        ("wrn", {"depth": 10, "width": 1, "num_classes": 7, "dropout": 0.0}),
        ("wrn", {"depth": 10, "width": 1, "shortcut": "avgpool", "in_channels": 1}),
        ("resnet_small", {"maxpool": False, "in_channels": 1, "input_size": 28}),
    ],
)
def test_model_options(name: str, kwargs: dict[str, object]) -> None:
    model = models.build(name, **kwargs).eval()
    shape = models.default_input_shape(name, **kwargs)
    classes = int(kwargs.get("num_classes", 10))  # type: ignore[call-overload]
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, classes)
    assert isinstance(_last_module(symbolic_trace(model)), nn.Linear)


def test_resnet_small_has_maxpool() -> None:
    model = models.build("resnet_small")
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ConfigError) as info:
        models.build("no_such_net")
    for name in EXPECTED_NAMES:
        assert name in str(info.value)


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="bad arguments"):
        models.build("c4f3", depth=3)
    with pytest.raises(ConfigError, match="depth"):
        models.build("wrn", depth=12)
    with pytest.raises(ConfigError, match="num_classes"):
        models.build("wong_kolter", num_classes=1)
    with pytest.raises(ConfigError, match="activation"):
        models.build("wong_kolter", activation="swish")
    with pytest.raises(ConfigError, match="too small"):
        models.build("c6f2", input_size=2)
    with pytest.raises(ConfigError, match="shortcut"):
        models.build("wrn", depth=10, width=1, shortcut="maxpool")


def test_register_rejects_duplicates() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        models.register("c4f3")(lambda **kw: nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="already registered"):
        models.register("some_new_name", aliases=("4c3f",))(lambda **kw: nn.Linear(1, 1))
    assert "some_new_name" not in models.names()


def test_load_factory_and_build_spec(tmp_path: Path) -> None:
    source = textwrap.dedent(
        """
        from torch import nn

        def make(num_classes=10, hidden=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

        NOT_CALLABLE = 3
        """
    )
    file = tmp_path / "my_model.py"
    file.write_text(source)
    factory = models.load_factory(f"{file}:make")
    assert isinstance(factory(num_classes=3)[-1], nn.Linear)
    model = models.build(f"{file}:make", num_classes=4, hidden=6)
    assert model(torch.randn(2, 1, 2, 2)).shape == (2, 4)
    assert models.load_factory(f"{file}:make") is factory

    with pytest.raises(ConfigError, match="not found"):
        models.load_factory(f"{tmp_path / 'missing.py'}:make")
    with pytest.raises(ConfigError, match="no 'nope'.*make"):
        models.load_factory(f"{file}:nope")
    with pytest.raises(ConfigError, match="not callable"):
        models.load_factory(f"{file}:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="file.py:factory"):
        models.load_factory(str(file))
    with pytest.raises(ConfigError, match="bad arguments"):
        models.build(f"{file}:make", width=3)

    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="boom"):
        models.load_factory(f"{broken}:make")


# --------------------------------------------------------------------------- layers


def _apply(layer: nn.Module, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x, layer(x)


LAYERS = [
    pytest.param(MaxMin(), id="maxmin"),
    pytest.param(GroupSort(2), id="groupsort2"),
    pytest.param(GroupSort(4), id="groupsort4"),
    pytest.param(GroupSort(8), id="groupsort8"),
]
SHAPES = [(5, 8), (3, 8, 4, 5)]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sorting_layers_permute_channels(layer: nn.Module, shape: tuple[int, ...]) -> None:
    x, y = _apply(layer, shape)
    assert y.shape == x.shape
    # At every sample and spatial position the output channels are a permutation of the input.
    torch.testing.assert_close(torch.sort(y, dim=1).values, torch.sort(x, dim=1).values)


def test_maxmin_and_groupsort_values() -> None:
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    torch.testing.assert_close(MaxMin()(x), torch.tensor([[3.0, 1.0, 2.0, 0.0]]))
    x = torch.tensor([[0.0, 1.0, 3.0, -1.0]])
    torch.testing.assert_close(MaxMin()(x), torch.tensor([[3.0, 1.0, 0.0, -1.0]]))
    torch.testing.assert_close(GroupSort(2)(x), torch.tensor([[0.0, 1.0, -1.0, 3.0]]))
    torch.testing.assert_close(GroupSort(4)(x), torch.tensor([[-1.0, 0.0, 1.0, 3.0]]))
    torch.testing.assert_close(GroupSort(1)(x), x)
    # Channels last via dim=-1.
    z = torch.randn(2, 3, 6)
    torch.testing.assert_close(
        GroupSort(2, dim=-1)(z), GroupSort(2)(z.transpose(1, 2)).transpose(1, 2)
    )
    torch.testing.assert_close(MaxMin(dim=-1)(z), MaxMin()(z.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sorting_layers_are_1_lipschitz(layer: nn.Module, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    batch = (64, *shape[1:])
    x = torch.randn(*batch, generator=gen, dtype=torch.float64)
    # Both far and very close pairs.
    for scale in (1.0, 1e-3):
        y = x + scale * torch.randn(*batch, generator=gen, dtype=torch.float64)
        lhs = (layer(x) - layer(y)).flatten(1).norm(dim=1)
        rhs = (x - y).flatten(1).norm(dim=1)
        assert (lhs <= rhs * (1 + 1e-12)).all()


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sorting_layers_preserve_gradient_norm(layer: nn.Module, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    layer(x).backward(g)
    assert x.grad is not None
    torch.testing.assert_close(x.grad.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1))


def test_sorting_layers_reject_bad_channel_counts() -> None:
    with pytest.raises(InputError, match="even"):
        MaxMin()(torch.randn(2, 3))
    with pytest.raises(InputError, match="divisible by 4"):
        GroupSort(4)(torch.randn(2, 6, 2, 2))
    with pytest.raises(InputError, match="out of range"):
        MaxMin(dim=3)(torch.randn(2, 4))
    with pytest.raises(ConfigError):
        GroupSort(0)


def test_tracer_keeps_sorting_layers_as_leaves() -> None:
    net = nn.Sequential(nn.Linear(4, 8), MaxMin(), nn.Linear(8, 8), GroupSort(4), nn.Linear(8, 2))
    gm = symbolic_trace(net)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2", "3", "4"]
    assert LipmarginTracer().is_leaf_module(MaxMin(), "act")
    assert LipmarginTracer().is_leaf_module(nn.ReLU(), "relu")
    assert not LipmarginTracer().is_leaf_module(nn.Sequential(), "seq")
    # Plain torch.fx inlines them (they are not torch.nn built-ins) but still traces correctly.
    plain = torch.fx.symbolic_trace(net)
    plain_targets = [n.target for n in plain.graph.nodes if n.op == "call_module"]
    assert plain_targets == ["0", "2", "4"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), net(x))
    torch.testing.assert_close(gm(x), net(x))


def test_activation_factory() -> None:
    assert isinstance(activation("relu"), nn.ReLU)
    assert isinstance(activation("MaxMin"), MaxMin)
    gs = activation("groupsort4")
    assert isinstance(gs, GroupSort) and gs.group_size == 4
    assert activation("groupsort").group_size == 2  # type: ignore[union-attr]
    assert activation("group_sort2").group_size == 2  # type: ignore[union-attr]
    assert activation("relu") is not activation("relu")
    with pytest.raises(ConfigError, match="unknown activation"):
        activation("tanh")
    with pytest.raises(ConfigError):
        activation("groupsort0")
