"""lorafuse.nn.Linear4bit (a frozen NF4 base), lorafuse.quantize_model and QLoRA through inject_lora, against the
real bitsandbytes and PEFT on the CPU."""

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
import peft
import pytest
import torch
from hf_models import IDS, tiny_llama, tiny_llama_config
from torch import nn

import lorafuse
from lorafuse.nn import Linear4bit


def _bnb_linear4bit(linear: nn.Linear, compute_dtype=torch.float32) -> nn.Module:
    """bitsandbytes' own Linear4bit holding ``linear``'s weight in NF4 (double quantization, blocksize 64)."""
    lin = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    lin.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )._quantize("cpu")
    if linear.bias is not None:
        lin.bias = nn.Parameter(linear.bias.detach().clone())
    return lin


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_holds_bitsandbytes_bytes_and_computes_as_its_linear4bit(compute_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(200, 96)
    ours = Linear4bit.from_linear(linear, compute_dtype=compute_dtype)
    theirs = _bnb_linear4bit(linear, compute_dtype)
    assert torch.equal(ours.packed.reshape(-1), theirs.weight.data.reshape(-1))
    state = theirs.weight.quant_state
    assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.nested_absmax, state.state2.absmax)
    x = torch.randn(5, 200)
    tol = dict(rtol=1e-5, atol=1e-5) if compute_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours(x), theirs(x).to(x.dtype), **tol)
    dense = bnb_f.dequantize_4bit(theirs.weight.data, state).reshape(96, 200)
    torch.testing.assert_close(ours.dequantized_weight(torch.float32), dense.float(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in ours.buffers())
    assert [n for n, _ in ours.named_parameters()] == ["bias"]


def test_quantize_model_converts_plain_linears_but_not_the_output_layer():
    model = tiny_llama(0)
    lorafuse.quantize_model(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))}
    assert kinds.pop("lm_head") == "Linear"
    assert set(kinds.values()) == {"Linear4bit"} and len(kinds) == 14
    with pytest.raises(ValueError, match='quant_type: expected "nf4" .*found "fp4"'):
        lorafuse.QuantConfig(quant_type="fp4")
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        lorafuse.QuantConfig(blocksize=100)
    with pytest.raises(TypeError, match="compute_dtype"):
        lorafuse.QuantConfig(compute_dtype=torch.int8)
    kept = lorafuse.quantize_model(tiny_llama(0), lorafuse.QuantConfig(modules_to_not_convert=["lm_head", "o_proj"]))
    assert type(kept.model.layers[0].self_attn.o_proj) is nn.Linear


def _llama64(seed=0):
    """A tiny Llama whose layers all have in_features a multiple of 64: bitsandbytes 0.50.2's native CPU
    dequantize_4bit decodes rows that are not a multiple of its block size wrongly (a 32×32 weight comes back off by
    up to 1.5), so the comparison with bitsandbytes uses whole blocks per row."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)).eval()


def _qlora_pair(seed=0):
    """The same tiny Llama as (lorafuse: quantize_model + inject_lora) and (PEFT over bitsandbytes' Linear4bit),
    with the same non-zero adapters."""
    base = _llama64(seed)
    theirs = copy.deepcopy(base)
    for name, module in list(theirs.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name != "lm_head":
                setattr(module, child_name, _bnb_linear4bit(child))
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(**config))
    ours = lorafuse.inject_lora(lorafuse.quantize_model(base), lorafuse.LoraConfig(**config))
    layers = dict(lorafuse.lora_layers(ours))
    for name, module in theirs.base_model.model.named_modules():
        if name in layers:
            layers[name].lora_A["default"].weight.data.copy_(module.lora_A["default"].weight)
            layers[name].lora_B["default"].weight.data.copy_(module.lora_B["default"].weight)
    return ours, theirs


def _loss(model):
    return model(input_ids=IDS, labels=IDS).loss


def test_qlora_training_steps_equal_peft_over_bitsandbytes():
    ours, theirs = _qlora_pair()
    assert lorafuse.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    ours.train(), theirs.train()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss_ours, loss_theirs = _loss(ours), _loss(theirs)
        torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-5)
        loss_ours.backward(), loss_theirs.backward()
        for name, layer in lorafuse.lora_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            for which in ("lora_A", "lora_B"):
                torch.testing.assert_close(
                    getattr(layer, which)["default"].weight.grad,
                    getattr(peft_layer, which)["default"].weight.grad,
                    rtol=1e-4,
                    atol=1e-6,
                )
        opt_ours.step(), opt_theirs.step()
        opt_ours.zero_grad(), opt_theirs.zero_grad()


def test_qlora_adapter_files_round_trip_and_merge_is_refused(tmp_path):
    ours, _ = _qlora_pair()
    ours.eval()
    expected = ours(input_ids=IDS).logits
    lorafuse.save_adapter(ours, tmp_path / "a")
    fresh = lorafuse.load_adapter(lorafuse.quantize_model(_llama64(0)), tmp_path / "a")
    torch.testing.assert_close(fresh.eval()(input_ids=IDS).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="merge: the base is 4-bit.*requantize=True"):
        lorafuse.merge(ours)
    assert torch.equal(ours(input_ids=IDS).logits, expected)  # nothing changed


def test_linear4bit_bad_input():
    with pytest.raises(TypeError, match="compute_dtype: expected torch.float32, bfloat16 or float16"):
        Linear4bit(64, 64, compute_dtype=torch.float64)
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(64, 64, blocksize=48)
    layer = Linear4bit(64, 32)
    with pytest.raises(AttributeError, match=r"no dense 'weight'.*dequantized_weight\(dtype\) gives a dense copy"):
        layer.weight
    assert getattr(layer, "weight", None) is None and layer.packed.shape == (1024, 1)  # other attributes as before


@pytest.mark.parametrize("shape", [(32, 32), (64, 96), (40, 1376)])
def test_rows_not_a_multiple_of_the_block_decode_to_the_documented_values(shape):
    """Where bitsandbytes 0.50.2's native CPU kernel goes wrong (rows shorter than a block, or not a multiple of
    it), lorafuse decodes the same bytes to code · absmax, as bitsandbytes' own pure-torch reference does."""
    torch.manual_seed(3)
    out_features, in_features = shape
    linear = nn.Linear(in_features, out_features)
    ours = Linear4bit.from_linear(linear)
    state = _bnb_linear4bit(linear).weight.quant_state
    absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = ours.packed.reshape(-1)
    index = torch.stack([packed >> 4, packed & 15], 1).reshape(-1).long()
    n = out_features * in_features
    reference = (bnb_f.get_4bit_type("nf4", device="cpu")[index] * absmax.repeat_interleave(64)[:n]).reshape(shape)
    torch.testing.assert_close(ours.dequantized_weight(torch.float32), reference, rtol=0, atol=0)


def _transformers_4bit(tmp_path, seed=0):
    """A tiny Llama saved and loaded back by transformers with BitsAndBytesConfig(load_in_4bit=True, nf4,
    double quantization): bitsandbytes' own Linear4bit layers."""
    import transformers

    path = tmp_path / f"llama{seed}"
    if not path.exists():
        _llama64(seed).save_pretrained(path)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()


def test_inject_lora_on_a_transformers_4bit_model_uses_bitsandbytes_bytes_and_equals_peft(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    theirs = peft.get_peft_model(_transformers_4bit(tmp_path), peft.LoraConfig(**config))
    model = _transformers_4bit(tmp_path)
    q_proj = model.model.layers[0].self_attn.q_proj
    kind = lorafuse.nn.base_kind_of(q_proj)
    assert type(q_proj).__module__.startswith("bitsandbytes") and kind.name == "bnb_linear4bit"
    assert kind.fused(q_proj)  # no hooks: lorafuse's nf4_linear computes it, not bitsandbytes' forward
    packed = q_proj.weight.data_ptr()
    ours = lorafuse.inject_lora(model, lorafuse.LoraConfig(**config))
    layers = dict(lorafuse.lora_layers(ours))
    wrapped = layers["model.layers.0.self_attn.q_proj"].base_layer
    assert wrapped is q_proj and wrapped.weight.data_ptr() == packed  # bitsandbytes' own bytes, no copy
    assert set(layers) == {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    for name, module in theirs.base_model.model.named_modules():
        if name in layers:
            layers[name].lora_A["default"].weight.data.copy_(module.lora_A["default"].weight)
            layers[name].lora_B["default"].weight.data.copy_(module.lora_B["default"].weight)
    ours.train(), theirs.train()
    loss_ours, loss_theirs = _loss(ours), _loss(theirs)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-5)
    loss_ours.backward(), loss_theirs.backward()
    for name, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.lora_B["default"].weight.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
    with pytest.raises(ValueError, match="merge: the base is 4-bit \\(bitsandbytes' Linear4bit\\)"):
        lorafuse.merge(ours)


@pytest.mark.parametrize("source", ["lorafuse", "bitsandbytes"])
def test_merge_and_unload_of_a_4bit_model_gives_a_dense_model_with_the_adapter(tmp_path, source):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    if source == "lorafuse":
        model = lorafuse.quantize_model(_llama64(0))
    else:
        model = _transformers_4bit(tmp_path)
    model = lorafuse.inject_lora(model, lorafuse.LoraConfig(**config)).eval()
    expected = model(input_ids=IDS).logits
    layer = dict(lorafuse.lora_layers(model))["model.layers.1.mlp.down_proj"]
    dense_w = lorafuse.nn.base_kind_of(layer.base_layer).dense_weight(layer.base_layer) + layer.delta_weight("default")
    lorafuse.merge_and_unload(model)
    assert not lorafuse.lora_layers(model)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds == {"Linear"}
    down = model.model.layers[1].mlp.down_proj
    assert type(down) is nn.Linear and down.weight.dtype == torch.float32 and not down.weight.requires_grad
    torch.testing.assert_close(down.weight, dense_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source", ["lorafuse", "bitsandbytes"])
def test_merge_into_4_bits_on_request_reports_its_error_and_unmerges_exactly(tmp_path, source):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = lorafuse.quantize_model(_llama64(0)) if source == "lorafuse" else _transformers_4bit(tmp_path)
    torch.manual_seed(1)  # the random adapters
    model = lorafuse.inject_lora(model, lorafuse.LoraConfig(**config)).eval().requires_grad_(False)
    expected = model(input_ids=IDS).logits
    layers = dict(lorafuse.lora_layers(model))
    kind = lorafuse.nn.base_kind_of(layers["model.layers.0.self_attn.q_proj"].base_layer)
    before = {p: [t.clone() for t in kind.nf4_state(layer.base_layer)[:4] if t is not None] for p, layer in layers.items()}
    down = layers["model.layers.1.mlp.down_proj"]
    exact = kind.dense_weight(down.base_layer) + down.delta_weight("default")
    with pytest.raises(ValueError, match="requantize=True"):
        lorafuse.merge(model)
    report = lorafuse.merge(model, requantize=True)
    assert set(report) == set(layers)
    for path, error in report.items():
        assert isinstance(error, lorafuse.nn.MergeError) and layers[path].merge_error == error
        assert 0 < error.output_error < 0.2 and error.adapter_error > 0
    # the new bytes are quantize_nf4(dequant(W) + scale·B·A); the reported errors are what they cost
    packed, absmax, nested, offset, blocksize = kind.nf4_state(down.base_layer)
    q = lorafuse.quantize_nf4(exact, 64, True)
    assert torch.equal(packed.reshape(-1), q.packed.reshape(-1)) and torch.equal(absmax, q.absmax)
    rounded = torch.ops.lorafuse.dequantize_nf4(packed, absmax, nested, offset, blocksize, list(exact.shape), torch.float32)
    err = (rounded - exact).double().norm()
    assert report["model.layers.1.mlp.down_proj"].output_error == pytest.approx(float(err / exact.double().norm()), rel=1e-5)
    merged = model(input_ids=IDS).logits
    assert not torch.equal(merged, expected)
    assert float((merged - expected).norm() / expected.norm()) < 0.5  # changed, not destroyed
    lorafuse.unmerge(model)
    for path, layer in layers.items():
        now = [t for t in kind.nf4_state(layer.base_layer)[:4] if t is not None]
        assert len(now) == len(before[path]) == 4
        assert all(torch.equal(a, b) for a, b in zip(now, before[path])) and layer.merge_error is None
    # a failing merge rolls back to the earlier requantized merge, bytes and all
    lorafuse.merge(model, requantize=True)
    merged_bytes = {p: [t.clone() for t in kind.nf4_state(layer.base_layer)[:4]] for p, layer in layers.items()}
    lorafuse.add_adapter(model, "b", lorafuse.LoraConfig(**config))
    with pytest.raises(ValueError, match="requantize=True"):
        lorafuse.merge(model, ["b"])
    for path, layer in layers.items():
        assert layer.merged_adapters == ["default"]
        assert all(torch.equal(a, b) for a, b in zip(kind.nf4_state(layer.base_layer)[:4], merged_bytes[path]))
    lorafuse.unmerge(model)
    lorafuse.delete_adapter(model, "b")
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=0)
    # merge_and_unload after a requantized merge starts from the unmerged bytes: one rounding
    lorafuse.merge(model, requantize=True)
    lorafuse.merge_and_unload(model)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_into_4_bits_on_the_cpp_llama():
    """lorafuse.quantize_model, inject_lora and merge(requantize=True) on the C++ reference Llama run the C++ code."""
    config = lorafuse.models.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = lorafuse.models.Llama(config)
    lorafuse.quantize_model(model)
    buffers = dict(model.named_buffers())
    assert buffers["model.layers.0.self_attn.q_proj.packed"].dtype == torch.uint8
    assert "lm_head.weight" in dict(model.named_parameters())  # kept dense
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    model.eval()
    ids = torch.arange(12).reshape(2, 6)
    expected = model(ids)
    with pytest.raises(ValueError, match="requantize"):
        lorafuse.merge(model)
    report = lorafuse.merge(model, requantize=True)
    assert len(report) == 4 and all(0 < e.output_error < 0.2 for e in report.values())
    lorafuse.unmerge(model)
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


def test_from_peft_converts_a_peft_qlora_model_over_bitsandbytes(tmp_path):
    theirs = peft.get_peft_model(
        _transformers_4bit(tmp_path),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    theirs.train()  # in training mode bitsandbytes keeps its standard layout (no dropout: the same outputs)
    expected = theirs(input_ids=IDS).logits.detach()
    ours = lorafuse.from_peft(theirs)
    layers = dict(lorafuse.lora_layers(ours))
    assert len(layers) == 4
    q_proj = layers["model.layers.0.self_attn.q_proj"]
    kind = lorafuse.nn.base_kind_of(q_proj.base_layer)
    assert kind.name == "bnb_linear4bit" and kind.fused(q_proj.base_layer)
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_layer_bitsandbytes_repacked_for_its_cpu_kernel_is_called_as_it_is(tmp_path):
    """On AVX512-BF16 CPUs bitsandbytes repacks a Linear4bit's weight into its own layout on an inference forward;
    lorafuse then calls the layer as it is (same outputs), and merge_and_unload restores the standard layout first."""
    model = _transformers_4bit(tmp_path)
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model(input_ids=IDS)  # bitsandbytes may repack here
    if not getattr(q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16)")
    kind = lorafuse.nn.base_kind_of(q_proj)
    assert kind.name == "bnb_linear4bit" and not kind.fused(q_proj)
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    lorafuse.merge_and_unload(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        # bitsandbytes computes its repacked layers in bfloat16, and its inverse re-quantizes the block statistics
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=5e-3, atol=5e-3)
