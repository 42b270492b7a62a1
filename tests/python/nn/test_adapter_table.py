"""The adapter table that lorafuse.nn.Linear keeps (lorafuse._C.AdapterTable, the C++ layer's own): copies,
pickling, the options type, and the same description in both languages."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import lorafuse
from lorafuse import _C
from lorafuse.nn import AdapterOptions, Linear


def _reference(layer: Linear, x: torch.Tensor, name: str) -> torch.Tensor:
    """base(x) + scale · (x·Aᵀ)·Bᵀ in float64, from the layer's unmerged tensors (eval: no dropout)."""
    d = lambda t: t.detach().double()  # noqa: E731
    base = layer.weight_unmerged if layer.merged else layer.base_layer.weight
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    y = d(x) @ d(base).t() + d(layer.base_layer.bias) + layer.adapters[name].scale * (d(x) @ d(a).t() @ d(b).t())
    return y.float()


def _layer() -> Linear:
    torch.manual_seed(0)
    layer = Linear(nn.Linear(16, 8), r=4, lora_alpha=8, init_lora_weights=False)
    layer.add_adapter("b", r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True, init_lora_weights=False)
    return layer


def test_adapter_options_are_the_cpp_options_validated_and_picklable():
    o = AdapterOptions(4, 8.0, 0.1, True, "gaussian", "lora_only", torch.float32)
    assert (o.r, o.lora_alpha, o.lora_dropout, o.use_rslora, o.init_lora_weights, o.bias, o.dtype) == (
        4, 8.0, 0.1, True, "gaussian", "lora_only", torch.float32,
    )
    assert o.scale == pytest.approx(8.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert AdapterOptions(4, 8.0).scale == pytest.approx(2.0)
    assert pickle.loads(pickle.dumps(o)) == o
    assert AdapterOptions(4) != o
    assert o != None and o not in [None, 3]  # noqa: E711 (comparing with another type is False, not an error)
    assert len({o, pickle.loads(pickle.dumps(o)), AdapterOptions(4)}) == 2  # hashable, by value
    with pytest.raises(ValueError, match="r: expected a rank > 0, found 0"):
        AdapterOptions(0)
    with pytest.raises(ValueError, match='bias: expected "none", "all" or "lora_only", found "some"'):
        AdapterOptions(4, bias="some")
    with pytest.raises(ValueError, match="init_lora_weights"):
        AdapterOptions(4, init_lora_weights="eva")


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_layer_keeps_its_table_and_computes_the_same(how):
    layer = _layer().eval()
    layer.merge(["b"])
    x = torch.randn(3, 16)
    expected = layer(x)
    if how == "deepcopy":
        other = copy.deepcopy(layer)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(layer))
    else:
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    assert other._table is not layer._table
    assert other.extra_repr() == layer.extra_repr()
    assert other.merged_adapters == ["b"] and other.active_adapter == "default"
    torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    # the copy is independent: unmerging it restores its own weight exactly and leaves the original merged
    original_weight = layer.base_layer.weight.clone()
    other.unmerge()
    assert not other.merged and layer.merged_adapters == ["b"]
    torch.testing.assert_close(layer.base_layer.weight, original_weight, rtol=0, atol=0)
    # the copy routes scopes as the original does (its merged state included)
    with lorafuse.use_adapter("b"), pytest.raises(ValueError, match=r'AdapterScope\("b"\)'):
        layer(x)
    other.set_adapter("b")
    assert other.lora_A["b"].weight.requires_grad and not other.lora_A["default"].weight.requires_grad
    with lorafuse.use_adapter("b"):
        torch.testing.assert_close(other(x), _reference(other, x, "b"))


def test_a_copied_merged_layer_refuses_other_scopes_as_the_original():
    layer = _layer().eval()
    layer.merge()
    x = torch.randn(2, 16)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        for name in ("b", "absent"):
            with lorafuse.use_adapter(name), pytest.raises(ValueError, match="merged into its weight"):
                copied(x)
        with lorafuse.use_adapter("default"):
            torch.testing.assert_close(copied(x), copied.base_layer(x), rtol=0, atol=0)


def test_python_and_cpp_layers_describe_the_same_table():
    py_layer = _layer()
    cpp_layer = _C.LoraLinear(16, 8, r=4, lora_alpha=8.0)
    cpp_layer.add_adapter("b", r=2, lora_alpha=4.0, lora_dropout=0.1, use_rslora=True)
    assert py_layer.extra_repr() in repr(cpp_layer)
    py_layer.merge(["b"])
    cpp_layer.merge(["b"])
    py_layer.disable_adapters()
    cpp_layer.disable_adapters()
    assert py_layer.extra_repr() in repr(cpp_layer)
    assert py_layer.extra_repr().endswith("active=default, disabled")


def test_the_same_refusals_from_both_layers():
    py_layer = _layer()
    cpp_layer = _C.LoraLinear(16, 8, r=4, lora_alpha=8.0)
    cpp_layer.add_adapter("b", r=2, lora_alpha=4.0)
    for call in (
        lambda layer: layer.set_adapter("nope"),
        lambda layer: layer.delete_adapter("nope"),
        lambda layer: layer.merge(["b", "b"]),
        lambda layer: layer.unmerge(),
    ):
        with pytest.raises(ValueError) as py_error:
            call(py_layer)
        with pytest.raises(ValueError) as cpp_error:
            call(cpp_layer)
        assert str(py_error.value) == str(cpp_error.value)


def test_scope_routes_follow_the_table():
    layer = _layer().eval()
    x = torch.randn(2, 16)
    base = layer.base_layer(x)
    with lorafuse.use_adapter("b"):
        b_out = layer(x)
    torch.testing.assert_close(b_out, _reference(layer, x, "b"))
    torch.testing.assert_close(layer(x), _reference(layer, x, "default"))  # outside scopes: the active one
    with lorafuse.use_adapter(""):  # "" runs the base
        torch.testing.assert_close(layer(x), base)
    with lorafuse.use_adapter("absent"):  # a name this layer lacks runs its base
        torch.testing.assert_close(layer(x), base)
    layer.merge()  # "default" merged: a scope may run it (the weight holds it) but nothing else
    with lorafuse.use_adapter("default"):
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    for other in ("b", "absent"):
        with lorafuse.use_adapter(other), pytest.raises(ValueError, match=f'AdapterScope\\("{other}"\\)'):
            layer(x)
    layer.unmerge()
    with lorafuse.use_adapter("b"):
        torch.testing.assert_close(layer(x), b_out)


def test_set_adapter_needs_a_name_and_clear_active_adapter_clears():
    layer = _layer()
    with pytest.raises(ValueError, match='set_adapter: no adapter named ""'):
        layer.set_adapter("")
    layer.merge()
    layer.clear_active_adapter()  # unmerges first
    assert layer.active_adapter is None and not layer.merged
    assert not any(p.requires_grad for n, p in layer.named_parameters() if "lora_" in n)
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_rules_refuse_a_missing_table_by_path():
    with pytest.raises(TypeError, match='"q" has no adapter table'):
        _C._rules_adapter_names([("q", None)])
