"""transformers' Conv1D (GPT-2's layers, weight stored [in, out]) as a lorafuse base kind: the layer's numbers, merges,
hooks, files (PEFT's fan_in_fan_out) and from_peft."""

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lorafuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_zoo  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _conv1d(nf=24, nx=16, seed=0):
    torch.manual_seed(seed)
    c = Conv1D(nf, nx)
    torch.nn.init.normal_(c.weight)
    torch.nn.init.normal_(c.bias)
    return c


def test_the_layer_computes_conv1d_plus_the_branch_and_its_gradients():
    base = _conv1d()
    reference = copy.deepcopy(base).requires_grad_(False)
    layer = lorafuse.nn.Linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert layer.base_layer is base and base_kind(layer) == "conv1d"
    assert (layer.in_features, layer.out_features) == (16, 24)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, 16) and b.shape == (24, 4)  # PEFT's shapes, as over an nn.Linear
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = layer(x)
    expected = reference(x) + 2.0 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [x, a, b])
    want = torch.autograd.grad(expected.square().sum(), [x, a, b])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    assert base.weight.grad is None and not base.weight.requires_grad


def base_kind(layer) -> str:
    return lorafuse.nn.base_kind_of(layer.base_layer).name


def test_merge_writes_into_the_stored_weight_and_unmerge_restores_it_bit_for_bit():
    layer = lorafuse.nn.Linear(_conv1d(), r=4, lora_alpha=8, init_lora_weights=False).eval()
    before = layer.base_layer.weight.clone()
    x = torch.randn(2, 16)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.base_layer.weight.shape == (16, 24)
        torch.testing.assert_close(layer.base_layer(x), unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)
    unloaded = layer.merge_and_unload()
    assert type(unloaded) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(unloaded(x), unmerged, rtol=1e-5, atol=1e-5)


def test_a_hooked_conv1d_is_called_as_it_is_and_refuses_merges():
    base = _conv1d()
    calls = []
    base.register_forward_hook(lambda m, i, o: calls.append(1))
    layer = lorafuse.nn.Linear(base, r=2, init_lora_weights=False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        out = layer(x)
    assert calls == [1]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = 8 / 2  # lora_alpha / r
    torch.testing.assert_close(out, torch.addmm(base.bias, x, base.weight) + scale * (x @ a.t()) @ b.t())
    with pytest.raises(ValueError, match="merge: Conv1D has forward hooks"):
        layer.merge()


def test_a_subclass_with_its_own_forward_is_no_conv1d():
    class Scaled(Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential()
    model.add_module("c_attn", Scaled(8, 4))
    refused = r'selects "c_attn", a Scaled, but LoRA goes into Linear and embedding layers only'
    with pytest.raises(ValueError, match=refused):
        lorafuse.inject_lora(model, lorafuse.LoraConfig(target_modules=["c_attn"]))


def test_a_gpt2_adapter_file_says_fan_in_fan_out_and_loads_in_peft_and_back(tmp_path):
    base = hf_zoo.build("gpt2")
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4, init_lora_weights=False)).eval()
    assert [p for p, _ in lorafuse.lora_layers(ours)] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    lorafuse.save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # PEFT warns when the flag does not fit
    with torch.no_grad():
        expected = hf_zoo.output(ours, "gpt2")
        torch.testing.assert_close(hf_zoo.output(theirs, "gpt2"), expected, rtol=1e-5, atol=2e-6)
    back = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_zoo.output(back, "gpt2"), expected)


def test_from_peft_carries_a_gpt2_model_over():
    base = hf_zoo.build("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False)
        ).eval()
    with torch.no_grad():
        expected = hf_zoo.output(theirs, "gpt2")
    model = lorafuse.from_peft(theirs)
    assert len(lorafuse.lora_layers(model)) == 6  # c_attn, and c_proj in attention and MLP
    assert {base_kind(layer) for _, layer in lorafuse.lora_layers(model)} == {"conv1d"}
    with torch.no_grad():
        torch.testing.assert_close(hf_zoo.output(model, "gpt2"), expected)


def test_from_peft_refuses_bd_lora_by_name_and_the_kept_wrapper_refuses_to_save(tmp_path):
    from peft.tuners.lora.config import BdLoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bd = peft.get_peft_model(
            hf_zoo.build("llama"),
            peft.LoraConfig(
                r=4,
                target_modules=["q_proj", "o_proj"],
                use_bdlora=BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2),
            ),
        )
    with pytest.raises(ValueError, match=r"uses BD-LoRA \(use_bdlora.*BlockDiagonalLinear"):
        lorafuse.from_peft(bd)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = peft.get_peft_model(hf_zoo.build("llama"), peft.LoraConfig(r=4, init_lora_weights=False))
    model = lorafuse.from_peft(kept)
    with pytest.raises(ValueError, match=r"save_pretrained: .*converted by lorafuse.from_peft.*lorafuse.save_adapter"):
        kept.save_pretrained(tmp_path / "kept")
    assert not (tmp_path / "kept").exists()
    lorafuse.save_adapter(model, tmp_path / "ours")  # the way that keeps the weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(hf_zoo.build("llama"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_zoo.output(again, "llama"), hf_zoo.output(model.eval(), "llama"))
