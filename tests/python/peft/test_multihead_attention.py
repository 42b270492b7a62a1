"""LoRA on torch.nn.MultiheadAttention (lorafuse.nn.MultiheadAttention; PEFT's lora.MultiheadAttention) beside the real
peft and a reference attention whose weights are W + scale·B·A: selection, outputs, gradients, files both ways, merges,
adapters and scopes; refusals named.

PEFT 0.21 adds the output projection's delta twice (its pull request #3774 fixes it); lorafuse adds it once. The
comparisons with PEFT's outputs therefore give the output projection a zero lora_B; with both non-zero the reference
attention decides."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lorafuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_zoo  # noqa: E402

peft = pytest.importorskip("peft")

E = 16


class Net(nn.Module):
    def __init__(self, batch_first=True, **attn) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, batch_first=batch_first, **attn)
        self.head = nn.Linear(E, 4)

    def forward(self, x, key_padding_mask=None):
        return self.head(self.attn(x, x, x, key_padding_mask=key_padding_mask)[0])


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw).eval()


X = torch.randn(3, 5, E, generator=torch.Generator().manual_seed(1))


def _randomize(model, out_proj_b_zero=False, seed=2):
    """Non-zero adapter weights in every trainable factor (the output projection's lora_B zero if asked)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if out_proj_b_zero and "out_proj.lora_B" in name:
                    p.zero_()


def _reference(base, layer, x, name="default", mask=None):
    """The base model with its attention's weights replaced by W + scale·B·A (functional_call: gradients reach A, B)."""
    out = layer.out_proj_layer
    s, so = layer.adapters[name].scale, out.adapters[name].scale
    weights = {
        "attn.in_proj_weight": base.attn.in_proj_weight + s * layer.lora_B[name].weight @ layer.lora_A[name].weight,
        "attn.out_proj.weight": base.attn.out_proj.weight + so * out.lora_B[name].weight @ out.lora_A[name].weight,
    }
    return functional_call(base, weights, (x,), {"key_padding_mask": mask})


@pytest.mark.parametrize("batch_first", [True, False])
def test_outputs_gradients_and_selection(batch_first):
    base = _net(batch_first=batch_first)
    x = X if batch_first else X.transpose(0, 1)
    config = dict(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False)
    theirs = hf_zoo.peft_model(copy.deepcopy(base), **config).eval()
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(**config)).eval()
    layer = ours.attn
    assert isinstance(layer, lorafuse.nn.MultiheadAttention)
    assert isinstance(layer.base_layer, nn.MultiheadAttention) and layer.out_proj_layer is layer.base_layer.out_proj
    assert [p for p, _ in lorafuse.lora_layers(ours)] == ["attn"]
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = {n[len(hf_zoo.PEFT_PREFIX):]: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(ours_params) == sorted(theirs_params)  # PEFT's names: attn.base_layer.out_proj.lora_A.default...
    assert lorafuse.trainable_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())

    # the packed q/k/v projection's adapter alone (output projection's B zero): PEFT's outputs
    _randomize(ours, out_proj_b_zero=True)
    with torch.no_grad():
        for name, p in theirs_params.items():
            p.copy_(ours_params[name])
        hf_zoo.assert_close(ours(x), theirs(x))
        assert (ours(x) - base(x)).abs().max() > 1e-2
    # both: W + scale·B·A in both projections, the gradients with it
    _randomize(ours)
    mask = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 5])
    y = ours(x, key_padding_mask=mask)
    reference = _reference(base, layer, x, mask=mask)
    hf_zoo.assert_close(y, reference)
    ours_grads = torch.autograd.grad(y.square().mean(), list(ours_params.values()))
    ref_grads = torch.autograd.grad(reference.square().mean(), list(ours_params.values()))
    for name, g, r in zip(ours_params, ours_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)
    assert all(g.abs().max() > 0 for g in ours_grads)
    frozen = (layer.base_layer.in_proj_weight, layer.base_layer.in_proj_bias, layer.out_proj_layer.weight)
    assert not any(p.requires_grad for p in frozen)

    # "all-linear" leaves the attention (and its out_proj, which it never calls) alone
    plain = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(target_modules="all-linear"))
    assert [p for p, _ in lorafuse.lora_layers(plain)] == ["head"]


def test_files_both_ways_merges_and_unload(tmp_path):
    base = _net()
    config = dict(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False)
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(**config)).eval()
    _randomize(ours)
    with torch.no_grad():
        expected = _reference(base, ours.attn, X)
        hf_zoo.assert_close(ours(X), expected)
    lorafuse.save_adapter(ours, tmp_path / "ours")
    names = sorted(lorafuse.read_adapter(tmp_path / "ours")["config"]["target_modules"])
    assert names == ["attn"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ours_params = {n: p for n, p in ours.named_parameters() if ".lora_" in n}
    for name, p in theirs.named_parameters():
        if ".lora_" in name:
            assert torch.equal(p, ours_params[name[len(hf_zoo.PEFT_PREFIX):]]), name
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        hf_zoo.assert_close(loaded(X), expected)

    # merge / unmerge exactly; merge_and_unload gives the nn.MultiheadAttention back with the adapters inside
    weights = (ours.attn.base_layer.in_proj_weight.clone(), ours.attn.out_proj_layer.base_layer.weight.clone())
    lorafuse.merge(ours)
    with torch.no_grad():
        hf_zoo.assert_close(ours(X), expected, rtol=1e-5, atol=1e-5)
    lorafuse.unmerge(ours)
    assert torch.equal(ours.attn.base_layer.in_proj_weight, weights[0])
    assert torch.equal(ours.attn.out_proj_layer.base_layer.weight, weights[1])
    merged = lorafuse.merge_and_unload(ours)
    assert type(merged.attn) is nn.MultiheadAttention
    assert type(merged.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        hf_zoo.assert_close(merged(X), expected, rtol=1e-5, atol=1e-5)
    unloaded = lorafuse.unload(loaded)
    assert type(unloaded.attn) is nn.MultiheadAttention
    assert type(unloaded.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        hf_zoo.assert_close(unloaded(X), base(X))


def test_adapters_scopes_disable_and_refusals():
    base = _net()
    ours = lorafuse.inject_lora(
        copy.deepcopy(base), lorafuse.LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False)
    ).eval()
    lorafuse.add_adapter(ours, "b", lorafuse.LoraConfig(r=4, target_modules=["attn"], init_lora_weights=False))
    _randomize(ours)
    layer = ours.attn
    assert list(layer.out_proj_layer.adapters) == ["default", "b"]
    with torch.no_grad():
        first = ours(X)
        hf_zoo.assert_close(first, _reference(base, layer, X, "default"))
        lorafuse.set_adapter(ours, "b")
        assert layer.out_proj_layer.active_adapter == "b"
        hf_zoo.assert_close(ours(X), _reference(base, layer, X, "b"))
        with lorafuse.use_adapter("default"):
            hf_zoo.assert_close(ours(X), first)
        with lorafuse.use_adapter(""):
            hf_zoo.assert_close(ours(X), base(X))
        with pytest.raises(ValueError, match="MultiheadAttention's adapters adapt its weights, one set per call"):
            with lorafuse.use_adapter(["default", "b", "default"]):
                ours(X)
        lorafuse.disable_adapters(ours)
        hf_zoo.assert_close(ours(X), base(X))
        lorafuse.enable_adapters(ours)
    lorafuse.delete_adapter(ours, "b")
    assert list(layer.out_proj_layer.adapters) == ["default"] and layer.out_proj_layer.active_adapter == "default"

    with pytest.raises(ValueError, match=r'"attn" \(MultiheadAttention\): its key and value sizes'):
        lorafuse.inject_lora(_net(kdim=8, vdim=8), lorafuse.LoraConfig(target_modules=["attn"]))
    with pytest.raises(ValueError, match="use_dora.*MultiheadAttention"):
        lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(target_modules=["attn"], use_dora=True))
    with pytest.raises(ValueError, match='"out_proj".*LoRA goes into Linear'):
        lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(target_modules=["out_proj"]))
    with pytest.warns(UserWarning, match="lora_dropout=0.1 does not act on nn.MultiheadAttention"):
        lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(target_modules=["attn"], lora_dropout=0.1))


def test_from_peft_names_peft_multihead_attention():
    theirs = hf_zoo.peft_model(_net(), r=2, target_modules=["attn", "head"])
    with pytest.raises(ValueError, match=r'"attn" is PEFT\'s MultiheadAttention LoRA layer.*out_proj delta twice'):
        lorafuse.from_peft(theirs)
    assert type(theirs.base_model.model.head).__module__.startswith("peft.")  # nothing converted


def test_a_transformer_encoder_layer_runs_its_adapted_attention_in_eval_mode():
    """TransformerEncoderLayer's fused eval path reads self_attn's weights and would skip the adapters: the layer
    keeps it on the path that calls lorafuse's attention."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(d_model=E, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    base = copy.deepcopy(layer)
    lorafuse.inject_lora(layer, lorafuse.LoraConfig(r=2, target_modules=["self_attn"], init_lora_weights=False))
    _randomize(layer)
    attn = layer.self_attn
    assert attn.num_heads == 2 and attn.batch_first and attn.embed_dim == E  # the attention's attributes, as PEFT
    with pytest.raises(AttributeError, match="in_proj_weight is adapted"):
        attn.in_proj_weight
    out = attn.out_proj_layer
    weights = {
        "self_attn.in_proj_weight": base.self_attn.in_proj_weight
        + attn.adapters["default"].scale * attn.lora_B["default"].weight @ attn.lora_A["default"].weight,
        "self_attn.out_proj.weight": base.self_attn.out_proj.weight
        + out.adapters["default"].scale * out.lora_B["default"].weight @ out.lora_A["default"].weight,
    }
    with torch.no_grad():
        expected = functional_call(base.train(), weights, (X,))  # train mode, dropout 0: the unfused path
        hf_zoo.assert_close(layer(X), expected)
        assert (layer(X) - base.eval()(X)).abs().max() > 1e-2


def test_the_adapted_weight_op():
    g = torch.Generator().manual_seed(5)
    w, a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((6, 4), (2, 4), (6, 2)))
    torch.testing.assert_close(torch.ops.lorafuse.lora_adapted_weight(w, a, b, 0.5), w + 0.5 * b @ a)
    torch.library.opcheck(torch.ops.lorafuse.lora_adapted_weight, (w, a.requires_grad_(), b.requires_grad_(), 0.5))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.lorafuse.lora_adapted_weight(w, a, b, 0.5), (a, b))
    with pytest.raises(ValueError, match=r"lorafuse.lora_adapted_weight: for weight \[6, 4\] expected lora_a \[r, 4\]"):
        torch.ops.lorafuse.lora_adapted_weight(w, b, a, 0.5)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_train_the_output_projection_bias_as_peft(bias, tmp_path):
    """PEFT's bias modes reach the attention's output projection (a LoRA layer of its own there,
    <path>.base_layer.out_proj): the same trained biases and file names as PEFT, and the file loads back."""
    base = _net()
    config = dict(r=2, target_modules=["attn", "head"], init_lora_weights=False, bias=bias)
    theirs = hf_zoo.peft_model(copy.deepcopy(base), **config)
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(**config)).eval()
    trained = sorted(n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n)
    peft_trained = sorted(
        n[len(hf_zoo.PEFT_PREFIX):] for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n
    )
    assert trained == peft_trained and "attn.base_layer.out_proj.base_layer.bias" in trained
    _randomize(ours)
    with torch.no_grad():
        expected = ours(X)
    lorafuse.save_adapter(ours, tmp_path / "a")
    loaded = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        hf_zoo.assert_close(loaded(X), expected)
