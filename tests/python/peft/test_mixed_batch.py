"""One adapter per row (use_adapter with a list, PEFT's adapter_names) on a tiny transformers Llama: each row's logits
equal running that row alone with its adapter ("__base__" rows the base model; layers without an adapter run their
base for its rows), generate with beams, training gradients equal to each adapter trained on its rows alone, and
refusals (a list whose length does not divide the batch, merged layers, different dropouts in training)."""

import pytest
import torch
from hf_models import tiny_llama

import lorafuse

IDS = torch.tensor([[5, 9, 3, 17, 2, 8], [1, 4, 4, 30, 12, 6], [7, 7, 21, 3, 9, 1], [11, 2, 6, 5, 40, 3]])
NAMES = ["a", "b", "__base__", "c"]


def three_adapters(dropout=0.0):
    model = tiny_llama()
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False, lora_dropout=dropout), "a")
    lorafuse.add_adapter(model, "b", lorafuse.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False, lora_dropout=dropout))
    # "c" only in the attention's q/v: the other layers run their base for its row
    lorafuse.add_adapter(model, "c", lorafuse.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                         lora_dropout=dropout))
    return model.eval()


def alone(model, ids, name):
    with lorafuse.use_adapter("" if name == "__base__" else name), torch.no_grad():
        return model(input_ids=ids).logits


def test_each_row_equals_running_it_alone_with_its_adapter():
    model = three_adapters()
    with lorafuse.use_adapter(NAMES), torch.no_grad():
        mixed = model(input_ids=IDS).logits
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i], alone(model, IDS[i : i + 1], name)[0], rtol=1e-5, atol=1e-5)
    # the rows really differ by adapter
    assert not torch.allclose(alone(model, IDS[:1], "a"), alone(model, IDS[:1], "b"))


def test_generate_with_beams_follows_each_rows_adapter():
    model = three_adapters()
    with lorafuse.use_adapter(NAMES):
        out = model.generate(IDS, num_beams=2, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i, name in enumerate(NAMES):
        with lorafuse.use_adapter("" if name == "__base__" else name):
            want = model.generate(IDS[i : i + 1], num_beams=2, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i], want[0]), name


def test_generate_with_several_return_sequences_follows_each_rows_adapter():
    model = three_adapters()
    kw = dict(num_beams=2, num_return_sequences=2, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with lorafuse.use_adapter(NAMES):
        out = model.generate(IDS, **kw)
    assert out.shape[0] == 2 * len(NAMES)
    for i, name in enumerate(NAMES):
        with lorafuse.use_adapter("" if name == "__base__" else name):
            want = model.generate(IDS[i : i + 1], **kw)
        assert torch.equal(out[2 * i : 2 * i + 2], want), name


def test_training_a_mixed_batch_gives_each_adapter_its_rows_gradients():
    model = three_adapters()
    model.train()
    names = ["a", "b", "a", "b"]
    for p in model.parameters():
        p.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters()
              if any(f".lora_{m}.{a}.weight" in n for m in "AB" for a in "ab")}
    for p in params.values():
        p.requires_grad_(True)
    with lorafuse.use_adapter(names):
        model(input_ids=IDS).logits.sum().backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        with lorafuse.use_adapter(name):
            model(input_ids=IDS[rows]).logits.sum().backward()
    for n, p in params.items():
        torch.testing.assert_close(mixed[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert any(g.abs().sum() > 0 for g in mixed.values())


def test_refusals():
    model = three_adapters()
    with pytest.raises(ValueError, match="use_adapter: 3 adapter names for a batch of 4 rows"):
        with lorafuse.use_adapter(["a", "b", "c"]):
            model(input_ids=IDS)
    with pytest.raises(TypeError, match="expected a str or a non-empty list of str"):
        with lorafuse.use_adapter([]):
            pass
    trained = three_adapters(dropout=0.1)
    lorafuse.add_adapter(trained, "d", lorafuse.LoraConfig(r=2, lora_dropout=0.2, init_lora_weights=False))
    trained.train()
    with pytest.raises(ValueError, match="different lora_dropout"):
        with lorafuse.use_adapter(["a", "d", "a", "a"]):
            trained(input_ids=IDS)
    lorafuse.merge(model)  # "a", the active adapter, merged into the weights
    with pytest.raises(ValueError, match="merged into its weight; a batch with one adapter per row needs unmerged"):
        with lorafuse.use_adapter(NAMES):
            model(input_ids=IDS)


def test_a_4bit_base_and_a_base_called_as_it_is_route_rows_too():
    """QLoRA layers (a lorafuse Linear4bit base) and a hooked base (called as it is) give each row its adapter."""
    model = tiny_llama()
    lorafuse.quantize_model(model, lorafuse.QuantConfig(modules_to_not_convert=["lm_head", "o_proj"]))
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: o * 1.0)
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                    init_lora_weights=False), "a")
    lorafuse.add_adapter(model, "b", lorafuse.LoraConfig(r=6, target_modules=["q_proj", "o_proj"],
                                                         init_lora_weights=False))
    model.eval()
    names = ["b", "a", "b", "__base__"]
    with lorafuse.use_adapter(names), torch.no_grad():
        mixed = model(input_ids=IDS).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(model, IDS[i : i + 1], name)[0], rtol=1e-5, atol=1e-5)


def test_unknown_names_are_all_listed_and_an_empty_batch_runs():
    model = three_adapters()
    with pytest.raises(ValueError, match=r'no LoRA layer has adapters named \["zz", "yy"\].*a, b, c'):
        with lorafuse.use_adapter(["a", "zz", "yy", "zz"]):
            pass
    with pytest.raises(ValueError, match=r'adapter names \["bad name!"\] are not valid'):
        with lorafuse.use_adapter(["a", "bad name!"]):
            pass
    layer = model.model.layers[0].self_attn.q_proj
    with lorafuse.use_adapter(["a", "c"]), torch.no_grad():
        out = layer(torch.randn(0, 5, layer.in_features))
    assert out.shape == (0, 5, layer.out_features)


def test_a_cpp_model_follows_the_python_list_too():
    """A bound C++ Llama (lorafuse.models.Llama) under use_adapter with a list: its C++ layers route each row."""
    cpp = lorafuse.models.Llama(lorafuse.models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2))
    cpp.eval()
    lorafuse.inject_lora(cpp, lorafuse.LoraConfig(r=4, init_lora_weights=False), "a")
    lorafuse.add_adapter(cpp, "b", lorafuse.LoraConfig(r=6, target_modules="all-linear", init_lora_weights=False))
    names = ["b", "__base__", "a", "b"]
    with lorafuse.use_adapter(names), torch.no_grad():
        mixed = cpp(IDS)
    for i, name in enumerate(names):
        with lorafuse.use_adapter("" if name == "__base__" else name), torch.no_grad():
            torch.testing.assert_close(mixed[i], cpp(IDS[i : i + 1])[0], rtol=1e-5, atol=1e-5)
