"""lorafuse.lq_lora on a tiny configuration of the real transformers Llama: the budget met, each layer holding Q in
its chosen format and an adapter starting at L1·L2 (the model computes with Q + L1·L2), training that moves only
the adapter, the uniform variant, the cost-table cache, Fisher weighting, merges, and bad input."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorafuse
from lorafuse import LqLoraConfig, NfFormat
from lorafuse.quant import empirical_fisher, lq_default_grid, quant_choice_name


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_cpp_llama(seed: int):
    """lorafuse's C++ reference Llama, small, in eval mode."""
    config = lorafuse.models.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(seed)
    model = lorafuse.models.Llama(config)
    model.eval()
    return model


def targeted(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and p != "lm_head"}


def test_the_budget_is_met_and_the_model_computes_with_q_plus_l1_l2():
    model = tiny_llama()
    original = {p: m.weight.detach().clone() for p, m in targeted(model).items()}
    ids = torch.randint(0, 96, (2, 12))
    report = lorafuse.lq_lora(model, LqLoraConfig(budget_bits=2.75, r=8, lora_alpha=16, progress=False))
    assert len(report.matrices) == len(original) == 14
    assert report.average_bits <= 2.75 + 1e-9 and report.allocation.optimal
    numel = sum(w.numel() for w in original.values())
    assert report.average_bits == pytest.approx(sum(m.bits * m.out_features * m.in_features
                                                    for m in report.matrices) / numel)
    lora = sum(8 * (w.shape[0] + w.shape[1]) for w in original.values())
    assert report.average_bits_with_lora == pytest.approx(report.average_bits + 32 * lora / numel)
    names = {quant_choice_name(c) for c in lq_default_grid()}
    modules = dict(model.named_modules())
    dense = copy.deepcopy(tiny_llama())  # the same weights; replaced below by Q + s·B·A
    dense_modules = dict(dense.named_modules())
    for m in report.matrices:
        assert m.config in names and 1 <= m.best_iteration <= m.iterations
        layer = modules[m.name]
        base = layer.base_layer
        assert isinstance(base, lorafuse.nn.Linear4bit)
        assert quant_choice_name((base.nf_format, base.stat_dtype)) == m.config
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.requires_grad and b.requires_grad
        w = base.dequantized_weight(torch.float32) + (16 / 8) * b @ a
        w0 = original[m.name]
        assert ((w - w0).norm() / w0.norm()).item() == pytest.approx(m.relative_error, rel=1e-4, abs=1e-6)
        with torch.no_grad():
            dense_modules[m.name].weight.copy_(w)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
    summary = report.summary()
    assert "14 matrices" in summary and "optimal" in summary
    assert json.loads(report.to_json())["average_bits"] == report.average_bits


def test_more_bits_leave_less_error_and_uniform_nf3():
    errors = []
    for budget in (2.5, 3.0, 4.2):
        model = tiny_llama()
        report = lorafuse.lq_lora(model, LqLoraConfig(budget_bits=budget, r=8, progress=False))
        errors.append(sum(m.relative_error**2 for m in report.matrices))
    assert errors[0] > errors[1] > errors[2], errors
    model = tiny_llama()
    nf3 = (NfFormat(3, 64, 8, 256), torch.float32)
    report = lorafuse.lq_lora(model, LqLoraConfig(budget_bits=None, configs=[nf3], r=8, progress=False))
    assert report.allocation is None and report.average_bits == pytest.approx(3 + 8 / 64 + 32 / (64 * 256))
    assert {m.config for m in report.matrices} == {"nf3-b64-s8x256-fp32"}


def test_training_moves_only_the_adapter_and_lowers_the_loss():
    model = tiny_llama()
    lorafuse.lq_lora(model, LqLoraConfig(budget_bits=3.0, r=4, progress=False))
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("packed", "absmax", "nested_absmax"))}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(any(k in n for k in ("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 96, (4, 16))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in frozen.items())


def test_the_cost_table_is_cached(tmp_path):
    cache = tmp_path / "costs.json"
    first = lorafuse.lq_lora(tiny_llama(), LqLoraConfig(budget_bits=3.0, r=4, cache_path=str(cache), progress=False))
    assert not first.from_cache and cache.is_file()
    second = lorafuse.lq_lora(tiny_llama(), LqLoraConfig(budget_bits=2.5, r=4, cache_path=str(cache), progress=False))
    assert second.from_cache and second.average_bits <= 2.5 + 1e-9
    third = lorafuse.lq_lora(tiny_llama(), LqLoraConfig(budget_bits=3.0, r=4, cache_path=str(cache), progress=False))
    assert third.from_cache and [m.config for m in third.matrices] == [m.config for m in first.matrices]
    other = lorafuse.lq_lora(tiny_llama(seed=1), LqLoraConfig(budget_bits=3.0, r=4, cache_path=str(cache),
                                                              progress=False))
    assert not other.from_cache  # other weights: computed again, the file replaced
    cache.write_text('{"not": "a table"}')
    with pytest.raises(ValueError, match="cache_path .*costs.json.*expected a cost table written by lq_plan"):
        lorafuse.lq_lora(tiny_llama(), LqLoraConfig(budget_bits=3.0, r=4, cache_path=str(cache), progress=False))


def test_several_threads_decompose_as_one_and_report_progress(capsys):
    """threads=2: the matrices decomposed two at a time (the progress bars fed from both threads, the GIL taken back
    for each report) give the allocation and errors of threads=1."""
    one = lorafuse.lq_lora(tiny_llama(), LqLoraConfig(budget_bits=3.0, r=4, max_iters=3, threads=1, progress=False))
    two = lorafuse.lq_lora(tiny_llama(), LqLoraConfig(budget_bits=3.0, r=4, max_iters=3, threads=2, progress=True))
    assert [m.config for m in two.matrices] == [m.config for m in one.matrices]
    assert [m.name for m in two.matrices] == [m.name for m in one.matrices]
    for a, b in zip(one.matrices, two.matrices):
        assert b.relative_error == pytest.approx(a.relative_error, rel=1e-5)
    err = capsys.readouterr().err
    assert "LQ-LoRA cost table" in err and "LQ-LoRA decompositions" in err
    with pytest.raises(ValueError, match="threads: expected >= 0"):
        LqLoraConfig(threads=-1)


def test_fisher_weighting():
    model = tiny_llama()
    batches = [{"input_ids": torch.randint(0, 96, (3, 10)), "labels": torch.randint(0, 96, (3, 10))}]
    fisher = empirical_fisher(model, batches)
    assert set(fisher) == set(targeted(model))
    assert all(f.shape == targeted(model)[p].weight.shape and (f >= 0).all() and f.sum() > 0 for p, f in fisher.items())
    assert not any(p.grad is not None for p in model.parameters())
    weighted = lorafuse.lq_lora(model, LqLoraConfig(budget_bits=3.0, r=4, fisher=fisher, progress=False))
    assert len(weighted.matrices) == 14 and weighted.average_bits <= 3.0 + 1e-9


def test_requantized_merge_and_merge_and_unload():
    model = tiny_llama()
    lorafuse.lq_lora(model, LqLoraConfig(budget_bits=3.0, r=4, progress=False))
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))
        before = model(ids).logits
        lorafuse.merge(model, requantize=True)
        merged = model(ids).logits
        lorafuse.unmerge(model)
        assert torch.equal(model(ids).logits, before)
        assert ((merged - before).norm() / before.norm()).item() < 0.5
        dense = lorafuse.merge_and_unload(model)
        assert torch.allclose(dense(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="budget_bits: 1.5 is below the smallest configuration's 2.127"):
        lorafuse.lq_lora(tiny_llama(), LqLoraConfig(budget_bits=1.5, r=4, progress=False))
    with pytest.raises(ValueError, match="budget_bits: 9 is above the largest configuration's 8.508"):
        lorafuse.lq_lora(tiny_llama(), LqLoraConfig(budget_bits=9.0, r=4, progress=False))
    with pytest.raises(ValueError, match=r"q_proj\": r = 64 must be below min\(out, in\) = 64 of its weight \[64, 64"):
        lorafuse.lq_lora(tiny_llama(), LqLoraConfig(r=64, progress=False))
    with pytest.raises(ValueError, match="configs: expected at least one configuration"):
        LqLoraConfig(configs=[])
    nf3 = (NfFormat(3, 64, 8, 256), torch.float32)
    with pytest.raises(ValueError, match="configs: nf3-b64-s8x256-fp32 is listed twice"):
        LqLoraConfig(configs=[nf3, nf3])
    with pytest.raises(ValueError, match="without a budget .* configs must hold one configuration, found 12"):
        LqLoraConfig(budget_bits=None)
    with pytest.raises(ValueError, match=r"configs\[0\]: .*format: bits: expected 2 .. 8, found 1"):
        LqLoraConfig(configs=[(NfFormat(1, 64, 8, 256), torch.float32)])
    with pytest.raises(TypeError, match=r"configs\[0\]: expected \(NfFormat, stat dtype\)"):
        LqLoraConfig(configs=[NfFormat(3, 64, 8, 256)])
    with pytest.raises(ValueError, match="r: expected >= 1"):
        LqLoraConfig(r=0)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"fisher: \['nowhere'\] are not targeted Linear layers"):
        lorafuse.lq_lora(model, LqLoraConfig(r=4, fisher={"nowhere": torch.ones(2, 2)}, progress=False))
    path = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=f'lq_plan: "{path}": .*fisher: expected the weight\'s shape'):
        lorafuse.lq_lora(model, LqLoraConfig(r=4, fisher={path: torch.ones(3, 3)}, progress=False))
    assert isinstance(dict(model.named_modules())[path], torch.nn.Linear)  # unchanged after the errors
    lorafuse.lq_lora(model, LqLoraConfig(budget_bits=3.0, r=4, progress=False))
    with pytest.raises(ValueError, match=f'lq_lora: "{path}" is a Linear; LQ-LoRA decomposes the dense weight'):
        lorafuse.lq_lora(model, LqLoraConfig(r=4, target_modules=["q_proj"], adapter_name="second", progress=False))
    with pytest.raises(ValueError, match='adapter_name: the model already has an adapter named "default"'):
        lorafuse.lq_lora(model, LqLoraConfig(r=4, target_modules=["q_proj"], progress=False))
    nf3 = torch.nn.Sequential(lorafuse.nn.Linear4bit.from_weight(torch.randn(8, 64), bits=3))
    lorafuse.save_checkpoint(nf3, tmp_path / "ckpt")  # lorafuse's layout, read back as it is
    dense = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False))
    assert lorafuse.load_checkpoint(dense, tmp_path / "ckpt") == ["0"] and dense[0].nf_format == nf3[0].nf_format
    with pytest.raises(ValueError, match="not bitsandbytes' NF4"):  # what needs bitsandbytes' layout says so
        lorafuse.nn.base_kinds.base_kind_of(nf3[0]).nf4_state(nf3[0])


def test_the_cpp_llama_runs_the_cpp_lq_lora():
    """On the C++ reference Llama, lorafuse.lq_lora is lorafuse::lq_lora: the same plan as lq_plan on the same weights
    (the numerics are one C++ implementation), the layers swapped and the adapter initialised in C++."""
    model = tiny_cpp_llama(0)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        before = model(ids)
    params = dict(model.named_parameters())
    weights = {p[: -len(".weight")]: w.detach().clone() for p, w in params.items()
               if p.endswith("_proj.weight")}
    cfg = LqLoraConfig(budget_bits=3.0, r=8, progress=False)
    report = lorafuse.lq_lora(model, cfg)
    assert [m.name for m in report.matrices] == list(weights)
    assert report.average_bits <= 3.0 + 1e-9 and report.allocation.optimal
    from lorafuse.quant.lq_lora import _numeric_fields
    rows, *_ = lorafuse._C._lq_plan([(n, w, None) for n, w in weights.items()], *_numeric_fields(cfg), None)
    assert [m.config for m in report.matrices] == [quant_choice_name(lq_default_grid()[r[3]]) for r in rows]
    assert [m.relative_error for m in report.matrices] == [r[6] for r in rows]
    buffers = dict(model.named_buffers())
    assert buffers["model.layers.0.self_attn.q_proj.base_layer.packed"].dtype == torch.uint8
    assert "lm_head.weight" in dict(model.named_parameters())  # not targeted by all-linear
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        after = model(ids)
    assert ((after - before).norm() / before.norm()).item() < 0.5


def test_errors_found_in_review_leave_the_model_unchanged(tmp_path):
    model = tiny_llama()
    path = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match="adapter"):
        lorafuse.lq_lora(model, LqLoraConfig(r=4, adapter_name="bad.name", progress=False))
    assert isinstance(dict(model.named_modules())[path], torch.nn.Linear)
    with pytest.raises(ValueError, match=r"configs\[0\]: .*stat_dtype: expected float32 without double quantization"):
        LqLoraConfig(budget_bits=None, configs=[(NfFormat(3, 64, 0, 0), torch.bfloat16)])
    weights = {p: m.weight for p, m in targeted(model).items()}
    with pytest.raises(ValueError, match="fisher: given for 1 of the 14 matrices; give it for every matrix or"):
        lorafuse.lq_lora(model, LqLoraConfig(r=4, fisher={path: torch.ones_like(weights[path])}, progress=False))
    zero = {p: torch.zeros_like(w) for p, w in weights.items()}
    with pytest.raises(ValueError, match=f'"{path}": fisher: all zero'):
        lorafuse.lq_lora(model, LqLoraConfig(r=4, fisher=zero, progress=False))
    with pytest.raises(ValueError, match="cache_path: cannot write beside .*its folder must exist"):
        lorafuse.lq_lora(model, LqLoraConfig(r=4, cache_path=str(tmp_path / "missing" / "c.json"), progress=False))
    assert isinstance(dict(model.named_modules())[path], torch.nn.Linear)
    # a weight that requires grad: the factors carry no autograd graph
    d = lorafuse.lq_decompose(weights[path], 4, NfFormat(3, 64, 8, 256))
    assert weights[path].requires_grad and d.l1.grad_fn is None and not d.l1.requires_grad


def test_an_lq_lora_model_saves_and_loads_with_the_same_logits(tmp_path):
    """The LQ-LoRA files: the adapter in PEFT's format (save_adapter), then the quantized base (unload, then
    save_checkpoint: each matrix's format in its quant_state, lorafuse's layout, no quantization_config), loaded into a
    fresh model (load_checkpoint swaps in the quantized layers, load_adapter puts the adapter back): the same logits."""
    model = tiny_llama()
    lorafuse.lq_lora(model, LqLoraConfig(budget_bits=3.0, r=4, progress=False))
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))  # as after some training
        before = model(ids).logits
    lorafuse.save_adapter(model, tmp_path / "adapter")
    lorafuse.unload(model)
    assert not lorafuse.lora_layers(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, lorafuse.nn.Linear4bit)
    lorafuse.save_checkpoint(model, tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert "quantization_config" not in config  # transformers reads bitsandbytes' NF4 only
    from safetensors import safe_open

    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as f:
        states = [k for k in f.keys() if k.endswith(".quant_state.lorafuse__nf")]
        assert len(states) == 14
        state = json.loads(bytes(f.get_tensor(states[0]).tolist()).decode())
        assert state["quant_type"] == "nf" and set(state) >= {"bits", "blocksize", "stat_bits", "offset"}
    fresh = tiny_llama(seed=5)  # other weights: all come from the files
    paths = lorafuse.load_checkpoint(fresh, tmp_path / "base")
    assert len(paths) == 14
    layers = dict(model.named_modules())
    for path in paths:
        got = dict(fresh.named_modules())[path]
        assert got.nf_format == layers[path].nf_format and got.stat_dtype == layers[path].stat_dtype
        assert torch.equal(got.packed, layers[path].packed) and torch.equal(got.absmax, layers[path].absmax)
    lorafuse.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, before)


def test_an_lq_lora_cpp_llama_saves_and_loads_with_the_same_logits(tmp_path):
    model = tiny_cpp_llama(0)
    lorafuse.lq_lora(model, LqLoraConfig(budget_bits=2.75, r=4, progress=False))
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        before = model(ids)
    lorafuse.save_adapter(model, tmp_path / "adapter")
    lorafuse.unload(model)
    lorafuse.save_checkpoint(model, tmp_path / "base")
    fresh = tiny_cpp_llama(1)
    assert len(lorafuse.load_checkpoint(fresh, tmp_path / "base")) == 14
    lorafuse.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(ids), before)
