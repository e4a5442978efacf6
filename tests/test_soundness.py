"""Issue 12: ordinary PyTorch habits must never yield a false certificate.

Each case below certified falsely before (bound or radius provably too small); each must now
certify soundly (bound >= the float64 Jacobian norm at random points) or be refused with a clear
error. The last tests show that the defences (trace check, gradient self-check) fire.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipmargin import LipschitzBound, certify
from lipmargin.bounds import register_module
from lipmargin.bounds.registry import MODULE_RULES, find_module_rule
from lipmargin.certify import evaluate
from lipmargin.errors import CertificationError, InputError, UnsupportedOperationError

REFUSED = (CertificationError, UnsupportedOperationError, InputError)


def jacobian_norm(model: nn.Module, shape: tuple[int, ...], points: int = 4, seed: int = 0):
    """Largest spectral norm of the float64 Jacobian of the logits over random points: a LOWER
    bound of the true Lipschitz constant, independent of lipmargin."""
    g = torch.Generator().manual_seed(seed)
    if next(model.parameters()).dtype != torch.float64:
        model = copy.deepcopy(model).double()
    model = model.eval()
    best = 0.0
    for _ in range(points):
        x = torch.randn((1, *shape), generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: model(v)[0], x)
        jac = jac.reshape(jac.shape[0], -1)
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


def assert_sound(model: nn.Module, shape: tuple[int, ...]) -> float:
    value = LipschitzBound(model, shape).certified().value
    true = jacobian_norm(model, shape)
    assert value >= true * (1 - 1e-9), (value, true)
    return value


# -- 1. input shape ----------------------------------------------------------------------------
class ShapeAgnostic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_inputs_of_another_shape_are_refused() -> None:
    torch.manual_seed(0)
    model = ShapeAgnostic().eval()
    bound = LipschitzBound(model, (1, 28, 28))
    x, y = torch.rand(5, 1, 4, 4), torch.zeros(5, dtype=torch.long)
    with pytest.raises(InputError, match="shape"):
        certify(model, x, y, bound)
    with pytest.raises(InputError, match="shape"):
        certify(model, x, y, bound.certified())
    with pytest.raises(InputError, match="shape"):
        evaluate(model, bound, [(x, y)], [0.1])
    # the right shape certifies, and soundly
    small = LipschitzBound(model, (1, 4, 4)).certified()
    assert small.value >= jacobian_norm(model, (1, 4, 4))
    certify(model, x, y, small)


def test_half_precision_and_autocast_are_refused() -> None:
    model = ShapeAgnostic().eval()
    bound = LipschitzBound(model, (1, 6, 6))
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(InputError, match="float32"):
        certify(model, torch.rand(2, 1, 6, 6).half(), y, bound)
    with pytest.raises(InputError, match="autocast"), torch.autocast("cpu", torch.bfloat16):
        certify(model, torch.rand(2, 1, 6, 6), y, bound)
    with pytest.raises(InputError, match="bfloat16"):
        LipschitzBound(ShapeAgnostic().to(torch.bfloat16), (1, 6, 6)).certified()


# -- 2. in-place writes through aliases --------------------------------------------------------
class AliasAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        out = h
        out += 3 * x  # eager: h changes too
        return self.head(torch.cat([out, h], 1))


class InplaceHardswish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.Hardswish(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        a = self.act(h)  # overwrites h, which is used again
        return self.head(torch.cat([a, h], 1))


class InplaceChain(nn.Module):
    """In-place activations on a tensor nobody else reads are fine (torchvision style)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin(x)))


@pytest.mark.parametrize("cls", [AliasAdd, InplaceHardswish])
def test_in_place_writes_through_aliases_are_refused(cls) -> None:
    torch.manual_seed(0)
    with pytest.raises((CertificationError, UnsupportedOperationError), match="in place|traced"):
        LipschitzBound(cls().eval(), (4,)).certified()


def test_in_place_activation_on_an_unshared_tensor_certifies() -> None:
    torch.manual_seed(0)
    assert_sound(InplaceChain(), (4,))


# -- 3. keyword aliases of reductions ----------------------------------------------------------
class Reduce(nn.Module):
    def __init__(self, reduce) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 12)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.lin(x).view(-1, 4, 3))


@pytest.mark.parametrize(
    "reduce",
    [
        lambda h: h.mean(axis=1),
        lambda h: h.mean(axis=-2),
        lambda h: h.sum(axis=1),
        lambda h: torch.mean(h, dim=1),
        lambda h: h.mean(1, keepdims=True).flatten(1),
        lambda h: torch.sum(h, axis=(1,)),
        lambda h: h.mean(dim=-1, keepdim=False),
    ],
)
def test_reductions_with_any_keyword_spelling_are_sound(reduce) -> None:
    torch.manual_seed(0)
    assert_sound(Reduce(reduce).double(), (6,))


def test_unknown_keyword_arguments_are_refused() -> None:
    model = Reduce(lambda h: h.mean(1, out_of_nowhere=True) if False else h.mean(1))
    LipschitzBound(model, (6,))  # control: the plain call is fine

    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(x, negative_slope=0.2, inplace=False, **{})

    assert LipschitzBound(Odd(), (3,)).certified().value == pytest.approx(1.0)


# -- 4. stale bounds ---------------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def test_data_write_keeping_the_sum_is_seen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    bound = LipschitzBound(model, (4,))
    before = bound.certified().value
    w = model[0].weight.data
    w[0, 0], w[1, 0] = w[0, 0] + 5.0, w[1, 0] - 5.0  # parameter sum unchanged
    after = bound.certified().value
    assert after != before
    assert after >= jacobian_norm(model, (4,))


def test_replaced_submodule_is_seen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    bound = LipschitzBound(model, (4,))
    bound.certified()
    model[2] = nn.Linear(4, 3).double()
    with torch.no_grad():
        model[2].weight.mul_(50)
    after = bound.certified()
    fresh = LipschitzBound(model, (4,)).certified()
    assert after.value == fresh.value
    assert torch.equal(after.pairwise, fresh.pairwise)
    assert after.value >= jacobian_norm(model, (4,))


def test_legacy_weight_norm_change_is_seen() -> None:
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        lin = nn.utils.weight_norm(nn.Linear(4, 3).double())
    model = nn.Sequential(lin)
    bound = LipschitzBound(model, (4,))
    bound.certified()
    with torch.no_grad():
        lin.weight_g.mul_(4.0)  # ``weight`` is recomputed only by the next forward's pre-hook
    cert = bound.certified()
    assert cert.value >= jacobian_norm(model, (4,))


def test_python_attribute_changed_after_tracing_is_seen() -> None:
    torch.manual_seed(0)
    model = Scaled().double()
    bound = LipschitzBound(model, (5,))
    first = bound.certified().value
    model.scale = 10.0
    second = bound.certified().value
    assert second == pytest.approx(10 * first, rel=1e-9)
    assert second >= jacobian_norm(model, (5,))


def test_attribute_read_by_a_rule_is_seen() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.5), nn.Linear(3, 2)).double()
    bound = LipschitzBound(model, (3,))
    first = bound.certified().value
    model[1].negative_slope = 4.0
    assert bound.certified().value > first
    assert bound.certified().value >= jacobian_norm(model, (3,))


# -- 5. functional dropout left active ---------------------------------------------------------
class ActiveDropout(nn.Module):
    def __init__(self, pass_training: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.pass_training = pass_training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pass_training:
            return self.fc(F.dropout(x, 0.5, training=self.training))
        return self.fc(F.dropout(x, 0.5))


def test_functional_dropout_active_in_eval_is_refused() -> None:
    with pytest.raises(REFUSED, match="dropout|deterministic"):
        LipschitzBound(ActiveDropout(False), (6,)).certified()
    model = ActiveDropout(True)
    model.train()  # built while training: the trace is still the evaluation-mode function
    assert_sound(model, (6,))


# -- hooks, pickling, scripting ----------------------------------------------------------------
def _conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


def test_bound_leaves_no_hooks_on_the_users_modules() -> None:
    model = _conv_bn()
    bounds = [LipschitzBound(model, (1, 6, 6)) for _ in range(3)]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    buf = io.BytesIO()
    torch.save(model, buf)  # picklable: no local hook functions attached
    torch.jit.script(model)
    assert len(bounds) == 3


def test_bound_before_forward_order_trains_conv_bn() -> None:
    """The README order ``K = bound()`` then ``model(x)`` used to fail on Conv+BN nets with
    'backward through the graph a second time'."""
    torch.manual_seed(0)
    model = _conv_bn().train()
    bound = LipschitzBound(model, (1, 6, 6)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        k = bound()
        logits = model(torch.rand(8, 1, 6, 6))
        loss = F.cross_entropy(logits + k[0], torch.zeros(8, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _ in range(2):  # and the paper's order
        logits = model(torch.rand(8, 1, 6, 6))
        loss = F.cross_entropy(logits + bound()[0], torch.zeros(8, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()


# -- user layers -------------------------------------------------------------------------------
class Doubler(nn.Module):
    """A user layer whose forward fx cannot trace (data-dependent control flow)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # never true; untraceable
            return x
        return 2.0 * x


def test_registered_user_layer_is_a_leaf_and_its_rule_is_used() -> None:
    model = nn.Sequential(nn.Linear(3, 3), Doubler(), nn.Linear(3, 2)).double()
    with pytest.raises(UnsupportedOperationError):
        LipschitzBound(model, (3,))
    try:
        register_module(Doubler)(lambda ctx, node: ctx.L(node.args[0]) * 2.0)
        cert = LipschitzBound(model, (3,)).certified()
        assert cert.value >= jacobian_norm(model, (3,))
        # a wrong user rule is caught by the gradient self-check, not returned
        register_module(Doubler)(lambda ctx, node: ctx.L(node.args[0]) * 0.5)
        with pytest.raises(CertificationError, match="self-check"):
            LipschitzBound(model, (3,)).certified()
    finally:
        MODULE_RULES.pop(Doubler, None)


def test_subclass_with_its_own_forward_does_not_inherit_the_rule() -> None:
    class TripleConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 3.0

    class SameConv(nn.Conv2d):
        pass

    assert find_module_rule(TripleConv(1, 1, 3)) is None
    assert find_module_rule(SameConv(1, 1, 3)) is find_module_rule(nn.Conv2d(1, 1, 3))
    model = nn.Sequential(TripleConv(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).double()
    assert_sound(model, (1, 6, 6))


# -- meta device, NaN weights ------------------------------------------------------------------
def test_meta_model_is_refused_clearly() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(InputError, match="meta"):
        LipschitzBound(model, (3,))


def test_nan_weights_are_refused_clearly() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    bound = LipschitzBound(model, (3,))
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(InputError, match="NaN"):
        bound.certified()


# -- the defences fire -------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["linear", "scaling"])
def test_gradient_self_check_fires_on_a_rule_that_under_estimates(monkeypatch, which) -> None:
    """A rule monkeypatched to return half its constant must give an error, not radii."""
    torch.manual_seed(0)
    if which == "linear":
        key, table = nn.Linear, MODULE_RULES
        model = nn.Sequential(nn.Linear(4, 3), nn.Identity())
    else:
        import operator

        from lipmargin.bounds.registry import FUNCTION_RULES

        key, table = operator.mul, FUNCTION_RULES

        class Times5(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(x) * 5.0

        model = Times5()
    original = table[key]
    monkeypatch.setitem(table, key, lambda ctx, node: original(ctx, node) * 0.5)
    bound = LipschitzBound(model, (4,))
    with pytest.raises(CertificationError, match="self-check"):
        bound.certified()
    x, y = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(CertificationError, match="self-check"):
        certify(model, x, y, bound)


def test_gradient_self_check_in_certify_sees_a_wrong_certified_bound() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    cert = LipschitzBound(model, (4,)).certified()
    cert.pairwise = cert.pairwise / 4
    x, y = torch.randn(6, 4), torch.zeros(6, dtype=torch.long)
    with pytest.raises(CertificationError, match="self-check"):
        certify(model, x, y, cert)


class Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.fc.register_forward_hook(lambda m, i, o: o * 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + 0.1 * torch.randn(4))


class BatchMixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([x[1:], x[:1]], 0))  # rolls the batch


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (Hooked, "forward hook"),
        (Noisy, "not deterministic"),
        (BatchMixing, "other examples of the batch"),
    ],
)
def test_trace_check_fires(cls, message) -> None:
    torch.manual_seed(0)
    with pytest.raises((CertificationError, UnsupportedOperationError), match=message):
        LipschitzBound(cls(), (4,))


def test_trace_check_runs_again_at_certified() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    bound = LipschitzBound(model, (4,))
    bound.certified()
    model[1].register_forward_hook(lambda m, i, o: o * 10)  # a new hook invalidates the cache
    with pytest.raises(UnsupportedOperationError, match="forward hook"):
        bound.certified()


def test_pooling_attribute_changed_after_certification_is_seen() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)
    ).double()
    bound = LipschitzBound(model, (1, 6, 6))
    bound.certified()
    model[1].stride = 1  # overlapping windows now: a larger constant, and a new output shape
    model[3] = nn.Linear(2 * 5 * 5, 2).double()
    assert bound.certified().value >= jacobian_norm(model, (1, 6, 6))


# -- refusals a user can act on ----------------------------------------------------------------
class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).softmax(1)  # the refused line


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer3 = nn.Sequential(nn.Identity(), _Inner())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(x).flatten(1)


def test_refusal_names_module_path_and_source_line() -> None:
    with pytest.raises(UnsupportedOperationError) as info:
        LipschitzBound(_Outer(), (2, 4, 4))
    message = str(info.value)
    assert "'layer3.1'" in message
    assert "test_soundness.py" in message and "the refused line" in message


def test_shape_arithmetic_trace_failure_is_named_as_such() -> None:
    class Ratio(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(x.size(0), int(x.size(1) * 0.5), -1).flatten(1)

    with pytest.raises(UnsupportedOperationError) as info:
        LipschitzBound(Ratio(), (2, 4))
    assert "Python number" in str(info.value)
    assert "control flow" not in str(info.value)


@pytest.mark.parametrize(
    "wrap",
    [
        nn.utils.parametrizations.weight_norm,
        nn.utils.parametrizations.spectral_norm,
        nn.utils.parametrizations.orthogonal,
    ],
)
def test_parametrized_layers_are_sound_and_followed(wrap) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(wrap(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    bound = LipschitzBound(model, (4,))
    bound.certified()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert bound.certified().value >= jacobian_norm(model, (4,))


def test_compiled_model_is_certified_through_its_original_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    compiled = torch.compile(model, backend="eager")
    cert = LipschitzBound(compiled, (4,)).certified()
    assert cert.value == pytest.approx(LipschitzBound(model, (4,)).certified().value)
    radii = certify(compiled, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), cert)
    assert radii.shape == (5,)


def test_vectors_on_another_device_than_the_model_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    bound = LipschitzBound(model, (3,))
    bound.to("meta")
    with pytest.raises(InputError, match="bound.to"):
        bound()
    with pytest.raises(InputError, match="bound.to"):
        bound.certified()


def test_sync_batch_norm_is_bounded_like_batch_norm() -> None:
    torch.manual_seed(0)
    plain = _conv_bn().double().eval()
    plain[1].running_var.uniform_(0.2, 2.0)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).eval()
    assert isinstance(synced[1], nn.SyncBatchNorm)
    a = LipschitzBound(plain, (1, 6, 6)).certified().value
    b = LipschitzBound(synced, (1, 6, 6)).certified().value
    assert a == pytest.approx(b, rel=1e-12)


def test_stacked_hardsigmoids_cover_the_float32_slope_of_torch_backward() -> None:
    """Found by the hypothesis suite in CI: ATen's hardsigmoid backward multiplies by float32 1/6
    (> 1/6) even in float64, so four layers' gradients exceeded an exact (1/6)^4 bound."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Hardsigmoid() for _ in range(4)], nn.Flatten(), nn.Linear(16, 2))
    model = model.double()
    bound = LipschitzBound(model, (1, 4, 4))
    value = float(bound.certified().value)
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64) * 0.5
    J = torch.autograd.functional.jacobian(lambda v: model(v).reshape(-1), x).reshape(2, -1)
    assert float(torch.linalg.matrix_norm(J, 2)) <= value


def test_trace_check_runs_again_for_new_tensors_or_a_new_graph(monkeypatch) -> None:
    """certified() skips the trace check only for the graph and tensors it was passed for
    (right after construction); changed weights or a changed forward are checked again."""
    from lipmargin.bounds import checks

    calls = []
    real = checks.check_trace

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(checks, "check_trace", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    bound = LipschitzBound(model, (4,))
    assert len(calls) == 1
    bound.certified()
    assert len(calls) == 1  # same graph, same tensors
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    bound.certified()
    assert len(calls) == 2  # new tensors
    model[1] = nn.Tanh()
    bound.certified()
    assert len(calls) == 3  # a new graph
