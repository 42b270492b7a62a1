"""LoftQ (init_lora_weights="loftq") on the CPU: the op against PEFT's loftq_init loop written here with the real
bitsandbytes NF4 quantizer (PEFT's own function needs CUDA), the layer and model-level start (Q + scale·B·A close
to W for any lora_alpha), the quantized model afterwards holding Q's exact bytes, files that load without running
LoftQ again, PEFT reading the written config, and refusals that leave the model unchanged."""

import copy
import json

import pytest
import torch
from hf_models import logits, tiny_llama

import lorafuse
from lorafuse.nn import Linear4bit


def peft_loftq_reference(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int):
    """PEFT's loftq_init (peft/utils/loftq_utils.py) with its CUDA Params4bit replaced by bitsandbytes' CPU
    quantize_4bit at the same settings (NF4, blocks of 64, no double quantization). The matrix goes through
    bitsandbytes flattened: its CPU dequantize_4bit (0.50.2) decodes a 2-D weight whose rows are not a multiple of the
    block size wrongly (a [96, 160] weight came back up to 0.1 off, 5x its rounding error), with the same bytes."""
    import bitsandbytes.functional as F

    weight = weight.float()
    res = weight.clone()
    for i in range(num_iter):
        packed, state = F.quantize_4bit(res.reshape(-1), blocksize=64, compress_statistics=False, quant_type="nf4")
        dequantized = F.dequantize_4bit(packed, state).reshape(weight.shape)
        res = weight - dequantized
        u, s, vh = torch.linalg.svd(res, full_matrices=False)
        lora_b = u @ torch.sqrt(torch.diag(s)[:, :reduced_rank])
        lora_a = torch.sqrt(torch.diag(s)[:reduced_rank, :]) @ vh
        if i + 1 == num_iter:
            break
        res = weight - lora_b @ lora_a
    return dequantized, lora_a, lora_b


@pytest.mark.parametrize("num_iter", [1, 3])
def test_the_op_is_peft_loftq_with_bitsandbytes_nf4(num_iter):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(96, 160) * 0.05
    q, a, b = torch.ops.lorafuse.loftq_init(w, 4, 8, num_iter)
    want_q, want_a, want_b = peft_loftq_reference(w, 4, 8, num_iter)
    assert torch.equal(q, want_q)  # the NF4 values to the bit
    torch.testing.assert_close(b @ a, want_b @ want_a, rtol=1e-5, atol=1e-6)
    assert a.shape == (8, 160) and b.shape == (96, 8) and a.dtype == b.dtype == torch.float32
    # more iterations leave less error
    err = ((q + b @ a - w).norm() / w.norm()).item()
    assert err < ((want_q - w).norm() / w.norm()).item()


def test_the_op_keeps_the_weight_dtype_and_covers_other_bits():
    torch.manual_seed(1)
    w = (torch.randn(64, 64) * 0.1).to(torch.bfloat16)
    errors = []
    for bits in (2, 3, 4, 8):
        q, a, b = torch.ops.lorafuse.loftq_init(w, bits, 4)
        assert q.dtype == torch.bfloat16
        fmt = lorafuse.NfFormat(bits, 64, 0, 0)
        requantized = lorafuse.dequantize_nf(lorafuse.quantize_nf(q.float(), fmt), fmt, [64, 64])
        assert torch.equal(requantized.to(torch.bfloat16), q)  # Q holds NF-b values
        errors.append(((q.float() + b @ a - w.float()).norm() / w.float().norm()).item())
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("lora_alpha", [8, 32])
def test_inject_starts_at_q_plus_the_low_rank_part_and_quantizes_to_q_exactly(lora_alpha):
    model = tiny_llama()
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    before = logits(model)
    config = lorafuse.LoraConfig(r=8, lora_alpha=lora_alpha, target_modules="all-linear", init_lora_weights="loftq",
                                 loftq_config=lorafuse.LoftQConfig(loftq_bits=4, loftq_iter=2))
    lorafuse.inject_lora(model, config)
    scale = lora_alpha / 8
    for path, layer in lorafuse.lora_layers(model):
        w0 = originals[path + ".weight"]
        q = layer.base_layer.weight.detach()
        _, a, b = torch.ops.lorafuse.loftq_init(w0, 4, 8, 2)
        assert torch.equal(q, torch.ops.lorafuse.loftq_init(w0, 4, 8, 2)[0])
        start = q + scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(start, q + b @ a, rtol=1e-5, atol=1e-6)  # scale·B·A = L·R whatever the scale
        assert (start - w0).norm() < (q - w0).norm()
    # the model starts closer to the original than its quantized base alone
    with_adapter = logits(model)
    lorafuse.disable_adapters(model)
    base_only = logits(model)
    lorafuse.enable_adapters(model)
    assert (with_adapter - before).abs().mean() < (base_only - before).abs().mean()
    # QLoRA afterwards: the 4-bit base holds exactly Q (NF4, blocks of 64, no double quantization)
    qs = {p: l.base_layer.weight.detach().clone() for p, l in lorafuse.lora_layers(model)}
    lorafuse.quantize_model(model, lorafuse.QuantConfig(double_quant=False, blocksize=64))
    for path, layer in lorafuse.lora_layers(model):
        assert isinstance(layer.base_layer, Linear4bit)
        assert torch.equal(layer.base_layer.dequantized_weight(torch.float32), qs[path])


def test_saved_adapters_load_without_running_loftq_again_and_peft_reads_the_config(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, lora_alpha=4, init_lora_weights="loftq",
                                                    loftq_config={"loftq_bits": 3, "loftq_iter": 1}))
    lorafuse.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq"
    assert config["loftq_config"] == {"loftq_bits": 3, "loftq_iter": 1}
    read = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert read.init_lora_weights == "loftq" and read.loftq_config["loftq_bits"] == 3
    # the base the adapter was made for (Q), as a user would save and load it
    fresh = tiny_llama()
    with torch.no_grad():
        for path, layer in lorafuse.lora_layers(model):
            fresh.get_submodule(path).weight.copy_(layer.base_layer.weight)
    bases = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    lorafuse.load_adapter(fresh, tmp_path)
    for path, layer in lorafuse.lora_layers(fresh):  # the base as it was: LoftQ did not quantize it again
        assert torch.equal(layer.base_layer.weight, bases[path + ".weight"])
    torch.testing.assert_close(logits(fresh), logits(model), rtol=1e-5, atol=1e-5)


def test_refusals_name_the_cause_and_leave_the_model_unchanged():
    model = tiny_llama()
    lorafuse.quantize_model(model, lorafuse.QuantConfig(modules_to_not_convert=["lm_head", "v_proj"]))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r'loftq.*"model.layers.0.self_attn.q_proj" \(Linear4bit\) has no '
                                         r"full-precision nn.Linear weight"):
        lorafuse.inject_lora(model, lorafuse.LoraConfig(target_modules=["v_proj", "q_proj"],
                                                        init_lora_weights="loftq"))
    assert not lorafuse.lora_layers(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    dense = tiny_llama()
    with pytest.raises(ValueError, match=r'"model.layers.0.self_attn.k_proj": r = 20 exceeds min\(out, in\)'):
        lorafuse.inject_lora(dense, lorafuse.LoraConfig(r=20, target_modules=["k_proj"], init_lora_weights="loftq"))
    with torch.no_grad():
        dense.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r'"model.layers.1.self_attn.q_proj": its weight holds NaN'):
        lorafuse.inject_lora(dense, lorafuse.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq"))
    assert not lorafuse.lora_layers(dense)
    for bad, match in (({"loftq_bits": 1}, "loftq_bits: expected 2 .. 8"), ({"loftq_iter": 0}, "loftq_iter"),
                       ({"bits": 4}, 'unknown field "bits"')):
        with pytest.raises(ValueError, match=match):
            lorafuse.LoraConfig(init_lora_weights="loftq", loftq_config=bad)
    with pytest.raises(TypeError, match="loftq_config: expected a dict"):
        lorafuse.LoraConfig(init_lora_weights="loftq", loftq_config=4)

    # a layer: over a 4-bit base, and over a merged weight
    q4 = Linear4bit.from_linear(torch.nn.Linear(32, 16))
    with pytest.raises(ValueError, match="not a plain nn.Linear with a full-precision weight"):
        lorafuse.nn.Linear(q4, init_lora_weights="loftq")
    layer = lorafuse.nn.Linear(torch.nn.Linear(32, 16), init_lora_weights=False)
    layer.merge()
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="merged adapters now; unmerge them first"):
        layer.add_adapter("second", r=4, init_lora_weights="loftq")
    assert torch.equal(layer.base_layer.weight, weight) and "second" not in layer.lora_A
    assert layer._table.names == ["default"]


def test_a_lora_layer_adds_a_loftq_adapter_and_training_moves_only_it():
    torch.manual_seed(3)
    layer = lorafuse.nn.Linear(torch.nn.Linear(48, 40), r=4, lora_alpha=8, init_lora_weights="loftq",
                               loftq_config={"loftq_bits": 2, "loftq_iter": 4})
    opts = layer._table.options("default")
    assert opts.init_lora_weights == "loftq" and opts.loftq_config == {"loftq_bits": 2, "loftq_iter": 4}
    x = torch.randn(6, 48)
    q = layer.base_layer.weight.detach().clone()
    layer(x).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.lora_A["default"].weight.grad is not None
    assert torch.equal(layer.base_layer.weight, q)
