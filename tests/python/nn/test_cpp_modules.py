"""The C++ modules bound to Python: lorafuse.nn.LoraLinear and lorafuse.models.Llama (torch::python::
bind_module), with the model-wide functions running their C++ implementation on them."""

import lorafuse
import pytest
import torch
from hf_models import TINY_LLAMA, tiny_llama
from lorafuse import LoraConfig
from lorafuse.models import Llama, LlamaConfig
from lorafuse.nn import LoraLinear


def reference(layer, x, name, scale):
    """x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ in float64, from the layer's own tensors."""
    d = dict(layer.named_parameters())
    w, b = d["base_layer.weight"].double(), d["base_layer.bias"].double()
    a, bb = layer.lora_a(name).double(), layer.lora_b(name).double()
    return x.double() @ w.T + b + scale * (x.double() @ a.T) @ bb.T, (a, bb)


def test_lora_linear_keywords_are_the_options_fields_and_forward_matches():
    torch.manual_seed(0)
    layer = LoraLinear(
        in_features=24,
        out_features=10,
        bias=True,
        adapter_name="default",
        r=4,
        lora_alpha=8.0,
        lora_dropout=0.0,
        use_rslora=False,
        init_lora_weights=False,
        adapter_dtype=None,
    )
    assert isinstance(layer, torch.nn.Module)
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["base_layer.weight", "base_layer.bias", "lora_A.default.weight", "lora_B.default.weight"]
    x = torch.randn(5, 24)
    expected, (a, b) = reference(layer, x, "default", scale=8.0 / 4)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default").double(), 2.0 * b @ a, rtol=1e-6, atol=1e-6)
    layer(x).sum().backward()
    grads = {n for n, p in layer.named_parameters() if p.grad is not None}
    assert grads == {"lora_A.default.weight", "lora_B.default.weight"}


def test_lora_linear_adapters_and_exact_merge():
    layer = LoraLinear(in_features=16, out_features=8, r=2, init_lora_weights=False)
    layer.add_adapter("b", r=3, lora_alpha=6.0, init_lora_weights=False)
    assert layer.adapter_names() == ["default", "b"] and layer.active_adapter() == "default"
    x = torch.randn(4, 16)
    y = layer(x)
    layer.set_adapter("b")
    assert not torch.allclose(layer(x), y, atol=1e-4)
    layer.set_adapter("default")
    w0 = dict(layer.named_parameters())["base_layer.weight"].clone()
    layer.merge()
    assert layer.merged() and layer.merged_adapters() == ["default"]
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(dict(layer.named_parameters())["base_layer.weight"], w0)


@pytest.mark.parametrize(
    "kwargs, exc, part",
    [
        (dict(r=0), ValueError, "r: expected a rank > 0"),
        (dict(lora_alpha=-1.0), ValueError, "lora_alpha"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
        (dict(init_lora_weights="eva"), ValueError, "init_lora_weights"),
        (dict(init_lora_weights=3), TypeError, "init_lora_weights"),
        (dict(adapter_name="a.b"), ValueError, "adapter_name"),
    ],
)
def test_lora_linear_bad_arguments(kwargs, exc, part):
    with pytest.raises(exc, match=part):
        LoraLinear(in_features=4, out_features=4, **kwargs)


def test_lora_linear_runtime_errors():
    layer = LoraLinear(in_features=4, out_features=4)
    with pytest.raises(ValueError, match='"nope"'):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="nothing is merged"):
        layer.unmerge()
    layer.merge()
    merged = dict(layer.named_parameters())["base_layer.weight"].clone()
    with pytest.warns(UserWarning, match=r"merge: \[default\] already merged in this layer; nothing to do"):
        layer.merge()  # as PEFT: a warning, no change
    assert torch.equal(dict(layer.named_parameters())["base_layer.weight"], merged)
    assert layer.merged_adapters() == ["default"]


def small_config(**kw):
    return LlamaConfig(**{**TINY_LLAMA, **kw})


def test_cpp_llama_equals_transformers_llama_with_the_same_weights():
    pytest.importorskip("transformers")
    hf = tiny_llama(seed=1)  # rms_norm_eps 1e-6 and rope_theta 10000, as LlamaConfig's defaults here
    ours = Llama(small_config())
    ours.eval()
    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(hf_params)  # Hugging Face's module paths, one to one
    with torch.no_grad():
        for name, p in ours_params.items():
            p.copy_(hf_params[name])
    ids = torch.arange(12).remainder(64).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_model_wide_functions_run_the_cpp_implementation_on_cpp_models():
    model = Llama(small_config())
    model.eval()
    ids = torch.arange(8).reshape(1, 8)
    before = model(ids)
    out = lorafuse.inject_lora(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    assert out is model
    paths = [p for p, _ in lorafuse.lora_layers(model)]
    assert paths == [f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in ("q", "v")]
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    trainable, total = lorafuse.trainable_parameters(model)
    assert trainable == lora
    y_default = model(ids)
    assert not torch.allclose(y_default, before, atol=1e-4)
    lorafuse.add_adapter(model, "b", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    assert lorafuse.adapter_names(model) == ["default", "b"] and lorafuse.active_adapter(model) == "default"
    lorafuse.set_adapter(model, "b")
    assert not torch.allclose(model(ids), y_default, atol=1e-4)
    lorafuse.set_adapter(model, "default")
    lorafuse.disable_adapters(model)
    assert torch.equal(model(ids), before)
    lorafuse.enable_adapters(model)
    lorafuse.merge(model)
    torch.testing.assert_close(model(ids), y_default, rtol=1e-4, atol=1e-4)
    lorafuse.unmerge(model)
    lorafuse.delete_adapter(model, "b")
    lorafuse.merge_and_unload(model)
    assert lorafuse.lora_layers(model) == []
    torch.testing.assert_close(model(ids), y_default, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="matches no module"):
        lorafuse.inject_lora(model, LoraConfig(target_modules=["qkv"]))


def test_meta_cpp_llama_7b_count():
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        device=torch.device("meta"),
    )
    assert config.num_parameters() == 6738415616
    model = Llama(config)
    lorafuse.inject_lora(model, LoraConfig(r=8, lora_alpha=16))
    assert lorafuse.trainable_parameters(model) == (4194304, 6742609920)


def test_bad_llama_config_names_the_field():
    with pytest.raises(ValueError, match="num_attention_heads"):
        LlamaConfig(hidden_size=30, num_attention_heads=4)


def test_a_tied_cpp_llama_lists_its_tied_weight_once_for_optimizers():
    """tie_word_embeddings: lm_head and embed_tokens hold one tensor, listed under both names but once by
    parameters() (an optimizer over it steps it once: one AdamW step moves it by at most lr)."""
    model = lorafuse.models.Llama(lorafuse.models.LlamaConfig(tie_word_embeddings=True))
    named = dict(model.named_parameters())
    assert named["lm_head.weight"]._cdata == named["model.embed_tokens.weight"]._cdata
    params = list(model.parameters())
    assert len(params) == len({p._cdata for p in params}) == len(named) - 1
    before = named["model.embed_tokens.weight"].detach().clone()
    optimizer = torch.optim.SGD(params, lr=0.1)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    grad = named["model.embed_tokens.weight"].grad.clone()
    optimizer.step()
    torch.testing.assert_close(named["model.embed_tokens.weight"].detach(), before - 0.1 * grad)
