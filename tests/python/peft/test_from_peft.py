"""lorafuse.from_peft against the real peft package on a real (small) transformers Llama."""

import copy

import pytest
import torch

import lorafuse

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import IDS, logits, tiny_llama  # noqa: E402  (after the importorskip)

def peft_model(**kw):
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    fields.update(kw)
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(**fields)).eval()


def test_from_peft_gives_the_same_outputs_with_the_same_parameters():
    pm = peft_model()
    pm.add_adapter(
        "b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    )
    pm.set_adapter("default")
    expected = {"default": logits(pm)}
    pm.set_adapter("b")
    expected["b"] = logits(pm)
    pm.set_adapter("default")
    params_before = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    trainable_before = {n for n, p in pm.named_parameters() if p.requires_grad}

    model = lorafuse.from_peft(pm)
    assert model is pm.base_model.model
    assert all(type(m).__module__.split(".")[0] != "peft" for m in model.modules())
    assert len(lorafuse.lora_layers(model)) == 6  # q, v, k in two layers
    torch.testing.assert_close(logits(model), expected["default"], rtol=1e-5, atol=1e-5)
    lorafuse.set_adapter(model, "b")
    torch.testing.assert_close(logits(model), expected["b"], rtol=1e-5, atol=1e-5)
    # the same parameter objects (an optimizer built on the PEFT model keeps working)
    ours = dict(model.named_parameters())
    for n, p in params_before.items():
        key = n.replace("base_model.model.", "", 1)
        assert ours[key] is p, n
    lorafuse.set_adapter(model, "default")
    assert {
        "base_model.model." + n for n, p in model.named_parameters() if p.requires_grad
    } == trainable_before
    # and the converted model trains through lorafuse
    model(input_ids=IDS).logits.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_from_peft_keeps_rslora_dropout_and_disabled_state():
    pm = peft_model(use_rslora=True, lora_dropout=0.1)
    with pm.disable_adapter():
        base = logits(pm)
    expected = logits(pm)
    model = lorafuse.from_peft(pm)
    layer = dict(lorafuse.lora_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.adapters["default"].use_rslora and layer.adapters["default"].lora_dropout == 0.1
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    lorafuse.disable_adapters(model)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    # a PEFT model whose adapter layers are disabled converts to disabled lorafuse layers
    disabled = peft_model()
    disabled.base_model.disable_adapter_layers()
    base2 = logits(disabled)
    converted = lorafuse.from_peft(disabled)
    assert all(not layer.adapters_enabled for _, layer in lorafuse.lora_layers(converted))
    torch.testing.assert_close(logits(converted), base2, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, part",
    [
        (dict(lora_bias=True), "lora_bias"),
        (dict(alora_invocation_tokens=[5]), "variants"),
    ],
)
def test_from_peft_rejects_what_it_cannot_carry_over(kwargs, part):
    pm = peft_model(**kwargs)
    before = copy.deepcopy(pm.state_dict())
    with pytest.raises(ValueError, match=part):
        lorafuse.from_peft(pm)
    assert any(type(m).__module__.startswith("peft") for m in pm.modules())  # unchanged
    after = pm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_from_peft_checks_every_layer_before_changing_any():
    pm = peft_model()
    pm.base_model.model.model.layers[1].self_attn.v_proj.scale_layer(0.5)  # the last LoRA layer
    with pytest.raises(ValueError, match="scaling"):
        lorafuse.from_peft(pm)
    assert all(
        type(m).__module__.split(".")[0] == "peft" for _, m in pm.named_modules() if hasattr(m, "lora_A")
    )
    named = peft_model()
    named.add_adapter("my b", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="adapter_name"):
        lorafuse.from_peft(named)
    assert not any(type(m).__module__.startswith("lorafuse") for m in named.modules())


def test_from_peft_rejects_merged_layers_and_non_peft_models():
    pm = peft_model()
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        lorafuse.from_peft(pm)
    with pytest.raises(TypeError, match="peft_model"):
        lorafuse.from_peft(tiny_llama())
