"""lorafuse.inject_lora and the model-wide functions on plain torch modules and on real Hugging Face
transformers Llama models built from small configs (nothing downloaded), compared with the real peft."""

import copy

import lorafuse
import pytest
import torch
from lorafuse import LoraConfig
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import IDS, logits, tiny_llama, tiny_llama_config  # noqa: E402  (after the importorskip)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_inject_q_v_into_hf_llama_counts_and_paths():
    model = tiny_llama()
    before = logits(model)
    total_before = sum(p.numel() for p in model.parameters())
    out = lorafuse.inject_lora(model, LoraConfig(r=4, lora_alpha=8))
    assert out is model
    paths = [p for p, _ in lorafuse.lora_layers(model)]
    assert paths == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    # q_proj 32->32, v_proj 32->16 (2 kv heads of 8): r*(in+out) each, two layers
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert lorafuse.trainable_parameters(model) == (lora, total_before + lora)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {
        n for n, _ in model.named_parameters() if ".lora_A.default." in n or ".lora_B.default." in n
    }
    assert "model.layers.1.self_attn.v_proj.lora_B.default.weight" in dict(model.named_parameters())
    assert torch.equal(logits(model), before)  # B starts at zero
    assert all(not layer.training for _, layer in lorafuse.lora_layers(model))  # the eval model's mode


def test_same_outputs_and_counts_as_peft_for_the_same_adapter_weights():
    base = tiny_llama(1)
    ours = copy.deepcopy(base)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    lorafuse.inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for path, layer in lorafuse.lora_layers(ours):
            theirs_layer = theirs.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(theirs_layer.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(theirs_layer.lora_B["default"].weight)
            assert theirs_layer.lora_B["default"].weight.abs().sum() > 0
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(base), atol=1e-4)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    assert lorafuse.trainable_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())
    # the same layers for all-linear (PEFT leaves out the output head too)
    ours2 = lorafuse.inject_lora(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))
    theirs2 = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear"))
    assert lorafuse.trainable_parameters(ours2) == tuple(theirs2.get_nb_trainable_parameters())


def test_meta_device_llama_7b_is_injected_and_counted_without_memory(capsys):
    config = tiny_llama_config(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    lorafuse.inject_lora(model, LoraConfig(r=8, lora_alpha=16))
    # 32 layers * (q + v) * 8 * (4096 + 4096); the base has 6,738,415,616
    assert lorafuse.trainable_parameters(model) == (4194304, 6738415616 + 4194304)
    assert all(p.is_meta for p in model.parameters())
    lorafuse.print_trainable_parameters(model)
    assert (
        capsys.readouterr().out
        == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"
    )


def test_selection_rules_are_the_cpp_ones():
    model = tiny_llama()
    lorafuse.inject_lora(
        model,
        LoraConfig(
            target_modules="all-linear",
            exclude_modules=["down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.0\.self_attn\.q_proj": 32},
        ),
    )
    layers = dict(lorafuse.lora_layers(model))
    assert len(layers) == 12 and "lm_head" not in layers and "model.layers.0.mlp.down_proj" not in layers
    assert layers["model.layers.1.self_attn.v_proj"].adapters["default"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].lora_alpha == 32
    assert layers["model.layers.1.self_attn.q_proj"].adapters["default"].lora_alpha == 8
    regex = lorafuse.inject_lora(
        tiny_llama(), LoraConfig(target_modules=r"model\.layers\.0\.self_attn\.(q|k)_proj")
    )
    assert [p for p, _ in lorafuse.lora_layers(regex)] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]


def test_training_changes_only_adapters_and_bias_modes():
    model = tiny_llama(2)
    lorafuse.inject_lora(model, LoraConfig(r=2, init_lora_weights=False))
    before = {n: p.clone() for n, p in model.named_parameters()}
    model(input_ids=IDS).logits.pow(2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= 10 * p.grad
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (".lora_" in n), n

    seq = nn.Sequential(Block(), Block())
    lorafuse.inject_lora(seq, LoraConfig(target_modules=["fc1"], bias="lora_only", init_lora_weights=False))
    trainable = {n for n, p in seq.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable == {"0.fc1.base_layer.bias", "1.fc1.base_layer.bias"}
    seq[0](torch.randn(3, 8)).sum().backward()
    assert seq[0].fc1.base_layer.bias.grad.abs().sum() > 0  # through the fused op
    seq2 = nn.Sequential(Block(), Block())
    lorafuse.inject_lora(seq2, LoraConfig(target_modules=["fc1"], bias="all"))
    assert {n for n, p in seq2.named_parameters() if p.requires_grad and n.endswith("bias")} == {
        "0.fc1.base_layer.bias",
        "0.fc2.bias",
        "1.fc1.base_layer.bias",
        "1.fc2.bias",
    }


def test_adapters_switch_disable_delete_and_merge():
    model = tiny_llama(3)
    base = logits(model)
    lorafuse.inject_lora(model, LoraConfig(r=4, init_lora_weights=False))
    y_default = logits(model)
    lorafuse.add_adapter(
        model, "b", LoraConfig(r=2, target_modules=["k_proj", "q_proj"], init_lora_weights=False)
    )
    assert lorafuse.adapter_names(model) == ["default", "b"]
    assert lorafuse.active_adapter(model) == "default"
    assert torch.equal(logits(model), y_default)
    lorafuse.set_adapter(model, "b")
    y_b = logits(model)
    assert not torch.allclose(y_b, y_default, atol=1e-4)
    lorafuse.set_adapter(model, "default")
    assert torch.equal(logits(model), y_default)
    lorafuse.disable_adapters(model)
    assert torch.equal(logits(model), base)
    lorafuse.enable_adapters(model)

    weights = {n: p.clone() for n, p in model.named_parameters()}
    lorafuse.merge(model)
    torch.testing.assert_close(logits(model), y_default, rtol=1e-4, atol=1e-4)
    lorafuse.unmerge(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    lorafuse.merge(model)
    lorafuse.set_adapter(model, "b")  # unmerges first
    assert not any(layer.merged for _, layer in lorafuse.lora_layers(model))
    assert torch.equal(logits(model), y_b)

    lorafuse.delete_adapter(model, "b")
    assert lorafuse.active_adapter(model) == "default"
    assert torch.equal(logits(model), y_default)
    lorafuse.merge_and_unload(model)
    assert lorafuse.lora_layers(model) == []
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(model), y_default, rtol=1e-4, atol=1e-4)


def test_multihead_attention_out_proj_is_left_alone():
    # nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj: a LoRA branch there would
    # never run, so "all-linear" skips it and naming it is an error. (train mode, dropout 0: in eval,
    # TransformerEncoderLayer may take its fused fast path, which reads the weights and skips every submodule)
    torch.manual_seed(10)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = layer(x)
    lorafuse.inject_lora(layer, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert sorted(path for path, _ in lorafuse.lora_layers(layer)) == ["linear1", "linear2"]
    with torch.no_grad():
        assert not torch.allclose(layer(x), before)  # the adapters on linear1/linear2 do run
    other = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    with pytest.raises(ValueError, match="out_proj"):
        lorafuse.inject_lora(other, LoraConfig(target_modules=["out_proj"]))
    assert lorafuse.lora_layers(other) == []


def test_reset_parameters_reinitialises_adapters_after_to_empty():
    with torch.device("meta"):
        model = nn.Sequential(Block())
    lorafuse.inject_lora(model, LoraConfig(target_modules=["fc1"]))
    model.to_empty(device="cpu")
    for _, layer in lorafuse.lora_layers(model):
        layer.reset_parameters()
        assert torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight))
        assert (
            layer.lora_A["default"].weight.abs().max() <= 8**-0.5 + 1e-6
        )  # kaiming(a=sqrt 5): 1/sqrt(fan_in)


def test_adapters_stay_disabled_when_another_adapter_is_injected():
    model = tiny_llama()
    lorafuse.inject_lora(model, LoraConfig(init_lora_weights=False))
    lorafuse.disable_adapters(model)
    lorafuse.add_adapter(model, "b", LoraConfig(target_modules=["k_proj"], init_lora_weights=False))
    assert all(not layer.adapters_enabled for _, layer in lorafuse.lora_layers(model))


def test_merge_unmerge_1000_bfloat16_cycles_are_exact():
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = lorafuse.nn.Linear(base, r=8, lora_alpha=16, init_lora_weights=False)
    w0 = base.weight.clone()
    first = None
    for _ in range(1000):
        layer.merge()
        first = base.weight.clone() if first is None else first
        assert torch.equal(base.weight, first)
        layer.unmerge()
        assert torch.equal(base.weight, w0)
    assert not torch.equal(first, w0)


def test_model_wide_merge_is_all_or_nothing():
    seq = nn.Sequential(Block(), Block()).to(torch.float16)
    lorafuse.inject_lora(seq, LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False))
    with torch.no_grad():
        seq[1].fc2.lora_A["default"].weight.fill_(1.0)  # every delta r * 1e5 = 8e5 overflows float16
        seq[1].fc2.lora_B["default"].weight.fill_(1e5)
    weights = {n: p.clone() for n, p in seq.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        lorafuse.merge(seq)
    with pytest.raises(ValueError, match="non-finite"):
        lorafuse.merge_and_unload(seq)
    assert len(lorafuse.lora_layers(seq)) == 4
    for n, p in seq.named_parameters():
        assert torch.equal(p, weights[n]), n


@pytest.mark.parametrize(
    "kwargs, exc, parts",
    [
        (dict(r=0), ValueError, ["r", "0"]),
        (dict(r=2.5), TypeError, ["r", "float"]),
        (dict(lora_alpha=0), ValueError, ["lora_alpha", "0"]),
        (dict(lora_dropout=1.0), ValueError, ["lora_dropout", "[0, 1)"]),
        (dict(bias="some"), ValueError, ["bias", "some"]),
        (dict(target_modules="(q_proj"), ValueError, ["target_modules", "regular expression"]),
        (dict(target_modules=[1]), TypeError, ["target_modules", "int"]),
        (dict(rank_pattern={"q_proj": -1}), ValueError, ["rank_pattern", "-1"]),
        (dict(init_lora_weights="eva"), ValueError, ["init_lora_weights", "eva"]),
        (dict(rank_pattern={"q_proj": 2.5}), TypeError, ["rank_pattern", "float"]),
        (dict(alpha_pattern={1: 2.0}), TypeError, ["alpha_pattern", "int"]),
    ],
)
def test_bad_config_names_the_field(kwargs, exc, parts):
    with pytest.raises(exc) as info:
        LoraConfig(**kwargs)
    for part in parts:
        assert part in str(info.value)


def test_bad_injection_names_the_problem_and_changes_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r'"qkv_proj" matches no module.*q_proj \(2\).*lm_head \(1\)'):
        lorafuse.inject_lora(model, LoraConfig(target_modules=["qkv_proj"]))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn.*LlamaAttention.*Linear and embedding layers only"):
        lorafuse.inject_lora(model, LoraConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match="adapter_name"):
        lorafuse.inject_lora(model, LoraConfig(), adapter_name="a.b")
    assert lorafuse.lora_layers(model) == []
    lorafuse.inject_lora(model, LoraConfig())
    with pytest.raises(ValueError, match='already has an adapter named "default"'):
        lorafuse.inject_lora(model, LoraConfig())
    with pytest.raises(ValueError, match='no layer has an adapter named "x"'):
        lorafuse.set_adapter(model, "x")
    with pytest.raises(ValueError, match="nothing is merged"):
        lorafuse.unmerge(model)
    lorafuse.merge(model)
    with pytest.warns(UserWarning, match="merge: already merged, left as it is: .*; nothing to do"):
        lorafuse.merge(model)
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT LoRA layer"):
        lorafuse.inject_lora(peft_model, LoraConfig())
    with pytest.raises(ValueError, match="itself a Linear"):
        lorafuse.inject_lora(nn.Linear(4, 4), LoraConfig())
    with pytest.raises(TypeError, match="base_layer"):
        lorafuse.nn.Linear(nn.Conv1d(2, 2, 1))


def test_meta_inject_then_to_empty_and_load_state_dict_assign():
    source = tiny_llama(8)
    lorafuse.inject_lora(source, LoraConfig(r=4, init_lora_weights=False))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(source.config)
    lorafuse.inject_lora(model, LoraConfig(r=4))
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict(), assign=True)
    with torch.no_grad():  # non-persistent buffers (the rotary inv_freq) are not in a state_dict
        for name, buf in source.named_buffers():
            model.get_buffer(name).copy_(buf)
    model.eval()
    torch.testing.assert_close(logits(model), logits(source), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["inductor"])
def test_compile_fullgraph_same_outputs_and_no_recompile_on_switch(backend):
    torch._dynamo.reset()
    model = tiny_llama(9)
    lorafuse.inject_lora(model, LoraConfig(r=4, init_lora_weights=False))
    lorafuse.add_adapter(model, "b", LoraConfig(r=4, init_lora_weights=False))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    eager = logits(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, eager, rtol=1e-5, atol=1e-5)
    lorafuse.set_adapter(model, "b")
    eager_b = logits(model)
    assert not torch.allclose(eager_b, eager, atol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, eager_b, rtol=1e-5, atol=1e-5)
        lorafuse.set_adapter(model, "default")
        torch.testing.assert_close(compiled(input_ids=IDS).logits, eager, rtol=1e-5, atol=1e-5)
    # training through the compiled model: gradients reach the active adapter only
    model.train()
    compiled(input_ids=IDS).logits.pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".default." in n for n in grads)


def test_merging_into_a_tied_lm_head_is_refused_naming_both():
    """An lm_head tied to the input embeddings (tie_word_embeddings): merging its adapter would change the embeddings
    too, silently; refused, all or nothing, until the user unties them."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    lorafuse.inject_lora(model, config)
    before = logits(model)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r'merge: "lm_head.base_layer.weight" is also "model.embed_tokens.weight" '
                                         r"\(tied weights\)"):
        lorafuse.merge(model)
    with pytest.raises(ValueError, match=r'merge_and_unload: "lm_head.base_layer.weight" .*\(tied weights\)'):
        lorafuse.merge_and_unload(model)
    assert torch.equal(model.model.embed_tokens.weight, embeddings) and not dict(lorafuse.lora_layers(model))["lm_head"].merged
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    # untied: the merge goes through and computes the same logits
    head = dict(lorafuse.lora_layers(model))["lm_head"]
    head.base_layer.weight = nn.Parameter(head.base_layer.weight.detach().clone(), requires_grad=False)
    lorafuse.merge(model)
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
