"""Base kinds (lorafuse.nn.base_kinds) and the ops behind them: a LoRA layer over a base that is not a plain
nn.Linear computes "base module output + LoRA branch", runs the base's hooks once, and refuses what it
cannot do right (merging into a custom forward, a base that returns a tuple)."""

import lorafuse
import pytest
import torch
from lorafuse.nn import BASE_KINDS, base_kind_of
from torch import nn

torch.manual_seed(0)


class Affine2(nn.Linear):
    """An nn.Linear subclass with its own forward: 2·linear(x) + 1."""

    def forward(self, x):
        return 2 * super().forward(x) + 1


class TupleLinear(nn.Linear):
    """Returns (output, logits) as Llama4Router does."""

    def forward(self, x):
        y = super().forward(x)
        return y, y.softmax(-1)


def branch(layer, x, name="default"):
    """scale · x·Aᵀ·Bᵀ computed by plain torch."""
    a = layer.lora_A[name].weight
    b = layer.lora_B[name].weight
    return (x @ a.t() @ b.t()) * layer.adapters[name].scale


class Block(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.q_proj = proj

    def forward(self, x):
        return self.q_proj(x)


def test_kinds_are_one_ordered_list():
    assert [k.name for k in BASE_KINDS] == [
        "linear", "custom_linear", "conv1d", "embedding", "multihead_attention", "attention_out_proj", "linear4bit",
        "bnb_linear4bit",
    ]
    assert base_kind_of(nn.MultiheadAttention(8, 2)).name == "multihead_attention"
    assert base_kind_of(nn.Embedding(5, 3)).name == "embedding"
    assert base_kind_of(nn.Embedding(5, 3, max_norm=1.0)) is None  # its lookups renormalise rows in place
    assert base_kind_of(nn.Linear(3, 4)).name == "linear"
    assert base_kind_of(lorafuse.nn.Linear4bit.from_linear(nn.Linear(64, 4))).name == "linear4bit"

    # a subclass that keeps nn.Linear.forward computes the same thing: the fused kind
    class Plain(nn.Linear):
        pass

    assert base_kind_of(Plain(3, 4)).name == "linear"
    # nn.MultiheadAttention's out_proj is never called by its parent: only lorafuse.nn.MultiheadAttention wraps it,
    # and target_modules never selects it
    out_proj = base_kind_of(nn.modules.linear.NonDynamicallyQuantizableLinear(3, 4))
    assert out_proj.name == "attention_out_proj" and not out_proj.selectable
    assert base_kind_of(Affine2(3, 4)).name == "custom_linear"
    transformers = pytest.importorskip("transformers")
    # a subclass whose own forward is known to compute x·Wᵀ + b (transformers' FalconLinear): the fused kind
    assert base_kind_of(transformers.models.falcon.modeling_falcon.FalconLinear(3, 4)).name == "linear"
    assert base_kind_of(transformers.pytorch_utils.Conv1D(4, 3)).name == "conv1d"
    assert base_kind_of(nn.Conv1d(3, 4, 1)) is None


def test_subclass_with_own_forward_keeps_its_output():
    base = Affine2(6, 5)
    x = torch.randn(3, 6)
    expected = base(x).detach()
    model = lorafuse.inject_lora(Block(base), lorafuse.LoraConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(model.q_proj, lorafuse.nn.Linear)
    # a fresh adapter (B = 0) changes nothing: the subclass's own forward ran
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    layer = model.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    torch.testing.assert_close(model(x), expected + branch(layer, x), rtol=1e-5, atol=1e-5)


def test_subclass_gradients_match_the_reference_chain():
    base = Affine2(6, 5)
    layer = lorafuse.nn.Linear(base, r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(4, 6, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = (
        x.grad.clone(),
        layer.lora_A["default"].weight.grad.clone(),
        layer.lora_B["default"].weight.grad.clone(),
    )
    x2 = x.detach().clone().requires_grad_(True)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    ref = base(x2) + (x2 @ a.t() @ b.t()) * layer.adapters["default"].scale
    ref.backward(grad)
    for ours, theirs in zip(got, (x2.grad, a.grad, b.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None  # the base stays frozen


def test_subclass_with_own_forward_refuses_merge():
    layer = lorafuse.nn.Linear(Affine2(6, 5), init_lora_weights=False)
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="Affine2 has its own forward"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, before)
    model = lorafuse.inject_lora(Block(Affine2(6, 5)), lorafuse.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="own forward"):
        lorafuse.merge_and_unload(model)
    assert isinstance(model.q_proj, lorafuse.nn.Linear)  # nothing changed


def test_base_returning_a_tuple_is_refused_clearly():
    layer = lorafuse.nn.Linear(TupleLinear(6, 5), init_lora_weights=False)
    with pytest.raises(TypeError, match="TupleLinear returned tuple, not a Tensor"):
        layer(torch.randn(2, 6))


@pytest.mark.parametrize("thawed", [False, True])
def test_hooks_run_once_and_output_is_hooked_base_plus_branch(thawed):
    base = nn.Linear(6, 5)
    calls = {"pre": 0, "post": 0}

    def pre(module, args):
        calls["pre"] += 1
        return (args[0] * 2,)

    def post(module, args, out):
        calls["post"] += 1
        return out + 3

    base.register_forward_pre_hook(pre)
    base.register_forward_hook(post)
    x = torch.randn(3, 6)
    hooked = base(x).detach()
    calls.update(pre=0, post=0)
    layer = lorafuse.nn.Linear(base, r=2, init_lora_weights=False)
    if thawed:
        base.weight.requires_grad_(True)
    out = layer(x)
    assert calls == {"pre": 1, "post": 1}
    # the branch sees the layer's input, as PEFT's (the pre-hook changes only what the base sees)
    torch.testing.assert_close(out, hooked + branch(layer, x), rtol=1e-5, atol=1e-5)
    if thawed:  # a thawed base weight gets its gradient through the base's own forward
        out.sum().backward()
        assert base.weight.grad is not None
    # hooks removed: the fused op computes the same thing
    base._forward_pre_hooks.clear()
    base._forward_hooks.clear()
    torch.testing.assert_close(layer(x), base(x) + branch(layer, x), rtol=1e-5, atol=1e-5)


def test_hooked_linear_refuses_merge_until_the_hooks_are_gone():
    base = nn.Linear(6, 5)
    handle = base.register_forward_hook(lambda m, a, out: out * 0.5)
    layer = lorafuse.nn.Linear(base, r=2, init_lora_weights=False)
    x = torch.randn(3, 6)
    before = base.weight.detach().clone()
    # merged, the hook would halve B·A too: 0.5·(W + ΔW)x ≠ 0.5·Wx + ΔWx
    with pytest.raises(ValueError, match="has forward hooks"):
        layer.merge()
    assert torch.equal(base.weight, before)
    handle.remove()
    unmerged = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(base.weight, before)


def test_forward_replaced_on_the_instance_is_called():
    base = nn.Linear(6, 5)
    original = base.forward
    calls = []

    def wrapped(x):  # what accelerate's add_hook_to_module does
        calls.append(1)
        return original(x)

    base.forward = wrapped
    layer = lorafuse.nn.Linear(base, r=2, init_lora_weights=False)
    x = torch.randn(3, 6)
    out = layer(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, original(x) + branch(layer, x), rtol=1e-5, atol=1e-5)


# ---- the ops -----------------------------------------------------------------------------------
def _add_args(dtype=torch.float64, base_dtype=None, requires_grad=False):
    x = torch.randn(2, 3, 7, dtype=dtype, requires_grad=requires_grad)
    base_out = torch.randn(2, 3, 5, dtype=base_dtype or dtype, requires_grad=requires_grad)
    a = torch.randn(4, 7, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(5, 4, dtype=dtype, requires_grad=requires_grad)
    return base_out, x, a, b


def test_lora_add_matches_the_formula_and_gradcheck():
    base_out, x, a, b = _add_args(requires_grad=True)
    y = torch.ops.lorafuse.lora_add(base_out, x, a, b, 0.75, 0.0)
    torch.testing.assert_close(y, base_out + 0.75 * (x @ a.t() @ b.t()))
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.lorafuse.lora_add(*t, 0.75, 0.0), (base_out, x, a, b)
    )


def test_lora_add_output_has_the_base_dtype():
    base_out, x, a, b = _add_args(dtype=torch.float32, base_dtype=torch.bfloat16)
    y = torch.ops.lorafuse.lora_add(base_out, x, a, b, 2.0, 0.0)
    assert y.dtype == torch.bfloat16
    ref = base_out.float() + 2.0 * (x @ a.t() @ b.t())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_lora_add_dropout_backward_uses_the_forward_mask():
    base_out, x, a, b = _add_args(dtype=torch.float32, requires_grad=True)
    torch.manual_seed(3)
    y = torch.ops.lorafuse.lora_add(base_out, x, a, b, 1.0, 0.5)
    y.sum().backward()
    # where the mask dropped an element of x, dx is exactly zero; elsewhere it is (Σ_o B)·A / (1 - p)
    full = (torch.ones(5) @ b.detach() @ a.detach()) / 0.5
    dx = x.grad.reshape(-1, 7)
    kept = dx != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dx[kept], full.expand_as(dx)[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_opcheck_new_ops(device):
    base_out, x, a, b = (t.to(device) for t in _add_args(dtype=torch.float32))
    if device == "cpu":
        for t in (base_out, x, a, b):
            t.requires_grad_(True)
    torch.library.opcheck(torch.ops.lorafuse.lora_add.default, (base_out, x, a, b, 0.5, 0.0))
    w = torch.randn(5, 7, device=device)
    torch.library.opcheck(torch.ops.lorafuse.lora_delta_weight.default, (a.detach(), b.detach(), 0.5))
    torch.library.opcheck(
        torch.ops.lorafuse.lora_merge.default,
        (w, [a.detach(), a.detach()], [b.detach(), b.detach()], [0.5, 1.0]),
    )


def test_merge_ops_numerics_and_errors():
    w = torch.randn(5, 7, dtype=torch.float16)
    a, b = torch.randn(4, 7), torch.randn(5, 4)
    delta = torch.ops.lorafuse.lora_delta_weight(a, b, 0.5)
    torch.testing.assert_close(delta, 0.5 * b @ a)
    merged = torch.ops.lorafuse.lora_merge(w, [a, a], [b, b], [0.5, 0.25])
    assert merged.dtype == torch.float16
    torch.testing.assert_close(merged, (w.float() + 0.75 * b @ a).half())  # rounded once
    with pytest.raises(ValueError, match="non-finite Half"):
        torch.ops.lorafuse.lora_merge(w, [a], [b * 1e6], [1.0])
    with pytest.raises(ValueError, match="must fit the weight"):
        torch.ops.lorafuse.lora_merge(w, [a[:, :6]], [b], [1.0])
    with pytest.raises(ValueError, match="one entry per adapter"):
        torch.ops.lorafuse.lora_merge(w, [a], [b], [1.0, 2.0])


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("shape", "base_out must have shape"),
        ("rank", "lora_b must have shape [out, r] = [5, 4] (out from base_out"),
        ("dtype", "lora_a must have x's dtype"),
    ],
)
def test_lora_add_errors_name_the_argument(case, fragment):
    base_out, x, a, b = _add_args(dtype=torch.float32)
    if case == "shape":
        base_out = torch.randn(2, 4, 5)
    elif case == "rank":
        b = torch.randn(6, 4)
    else:
        a, b = a.half(), b.half()
    with pytest.raises((ValueError, TypeError)) as err:
        torch.ops.lorafuse.lora_add(base_out, x, a, b, 1.0, 0.0)
    assert fragment in str(err.value)


def test_backward_hooks_run_on_the_base():
    base = nn.Linear(6, 5)
    seen = []
    base.register_full_backward_hook(lambda m, gin, gout: seen.append(gout[0].shape))
    layer = lorafuse.nn.Linear(base, r=2, init_lora_weights=False)
    x = torch.randn(3, 6, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert seen == [torch.Size([3, 5])]
    torch.testing.assert_close(out, base(x) + branch(layer, x), rtol=1e-5, atol=1e-5)


def test_integer_weight_linear_is_not_a_target():
    class Int8Linear(nn.Linear):
        def __init__(self):
            super().__init__(6, 5)
            self.weight = nn.Parameter(torch.zeros(5, 6, dtype=torch.int8), requires_grad=False)

    assert base_kind_of(Int8Linear()) is None
    with pytest.raises(TypeError, match="base_layer: expected a torch.nn.Linear"):
        lorafuse.nn.Linear(Int8Linear())
    model = Block(Int8Linear())
    with pytest.raises(ValueError, match="q_proj"):
        lorafuse.inject_lora(model, lorafuse.LoraConfig(target_modules=["q_proj"]))
    assert type(model.q_proj) is Int8Linear


def test_use_adapter_opens_the_cpp_scope_and_compiles():
    model = Block(nn.Linear(6, 5))
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lorafuse.add_adapter(
        model, "b", lorafuse.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    x = torch.randn(3, 6)
    with torch.no_grad():
        y_default = model(x)
        lorafuse.set_adapter(model, "b")
        y_b = model(x)
        lorafuse.set_adapter(model, "default")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert lorafuse._C._current_adapter_scope() is None
    with torch.no_grad(), lorafuse.use_adapter("b"):
        assert lorafuse._C._current_adapter_scope() == "b"  # the C++ layers' scope is the same one
        torch.testing.assert_close(compiled(x), y_b)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), y_default)


def test_config_refuses_non_finite_numbers_by_name():
    with pytest.raises(ValueError, match="lora_alpha: expected a finite number"):
        lorafuse.LoraConfig(lora_alpha=float("nan"))
    assert lorafuse.LoraConfig(init_lora_weights="false").init_lora_weights == "false"


def test_merge_ops_name_the_argument():
    a, b = torch.randn(4, 7), torch.randn(5, 4)
    with pytest.raises(ValueError, match="lora_b must be on lora_a's device"):
        torch.ops.lorafuse.lora_delta_weight(a.to("meta"), b, 2.0)
    with pytest.raises(ValueError, match=r"lora_b\[0\] must have shape \[out, r\]"):
        torch.ops.lorafuse.lora_merge(torch.randn(5, 7), [a], [b[:, :3]], [1.0])
