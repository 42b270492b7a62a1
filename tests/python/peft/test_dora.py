"""DoRA (use_dora=True) beside the real peft: the magnitude's start, outputs, gradients, an optimizer step, dropout,
merges (one adapter and several in turn), files both ways, from_peft, on the tiny transformers families; the op's norm
against its definition; bad input named."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lorafuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_zoo  # noqa: E402

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

FAMILIES = hf_zoo.FAMILIES
PREFIX = "base_model.model."


_peft_model = hf_zoo.peft_model
_close = hf_zoo.assert_close


def _perturb_magnitudes(model, seed=1):
    """Magnitudes away from the norms they start at, so that m / ‖W + s·B·A‖ is not 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _randomized_peft_dora(family, **extra):
    base = hf_zoo.build(family)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True) | extra
    model = _peft_model(copy.deepcopy(base), **config)
    _perturb_magnitudes(model)
    return base, model.eval()


class Net(nn.Module):
    def __init__(self, bias=True, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(24, 20, bias=bias, dtype=dtype)
        self.out = nn.Linear(20, 12, dtype=dtype)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


# ---- the op ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_weight_norm_is_the_row_norm_of_the_adapted_weight(wdtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 33, generator=g).to(wdtype)
    adtype = torch.float64 if wdtype == torch.float64 else torch.float32
    a, b = torch.randn(5, 33, generator=g, dtype=adtype), torch.randn(70, 5, generator=g, dtype=adtype)
    ref = torch.linalg.norm(w.double() + 0.7 * (b.double() @ a.double()), dim=1)
    got = torch.ops.lorafuse.dora_weight_norm(w, a, b, 0.7)
    assert got.dtype == adtype and got.shape == (70,)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6 if adtype == torch.float32 else 1e-12, atol=0)
    # a transposed view (Conv1D's weight) and a weight of more rows than one widened block
    wt = w.t().contiguous().t()
    torch.testing.assert_close(torch.ops.lorafuse.dora_weight_norm(wt, a, b, 0.7), got, rtol=1e-6, atol=0)
    big = torch.randn(300, 20000, generator=g).to(wdtype)
    a2, b2 = torch.randn(3, 20000, generator=g), torch.randn(300, 3, generator=g)
    ref2 = torch.linalg.norm(big.double() + 0.1 * (b2.double() @ a2.double()), dim=1)
    torch.testing.assert_close(torch.ops.lorafuse.dora_weight_norm(big, a2, b2, 0.1).double(), ref2, rtol=1e-5, atol=0)


def test_the_dora_op_passes_opcheck_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, dtype=torch.float64, generator=g)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    m = torch.rand(6, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    op = torch.ops.lorafuse.dora_linear

    # the norm is a constant for autograd (DoRA), so A and B are checked against PEFT and ATen elsewhere, not by finite
    # differences (which would see the norm move)
    torch.autograd.gradcheck(lambda *t: op(t[0], w, t[1], a, b, 0.5, 0.0, t[2]), (x, bias, m))
    base_out = (x @ w.t() + bias).detach().requires_grad_()
    torch.autograd.gradcheck(lambda *t: op(t[0], w, bias, a, b, 0.5, 0.0, t[1], t[2]), (x, m, base_out))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "an autograd kernel was not registered": the norm has no graph
        op(x, w, bias, a, b, 0.5, 0.0, m).sum().backward()
        assert not torch.ops.lorafuse.dora_weight_norm(w, a, b, 0.5).requires_grad
    assert a.grad is not None and b.grad is not None and m.grad is not None
    torch.library.opcheck(torch.ops.lorafuse.dora_weight_norm.default, (w, a.detach(), b.detach(), 0.5))
    torch.library.opcheck(op.default, (x, w, bias, a, b, 0.5, 0.0, m, None))
    # the meta device: shapes only
    out = op(x.to("meta"), w.to("meta"), bias.to("meta"), a.to("meta"), b.to("meta"), 0.5, 0.0, m.to("meta"))
    assert out.shape == (3, 6) and out.device.type == "meta"


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(m=torch.ones(5)), ["magnitude", "[6]"]),
        (dict(m=torch.ones(6, 1)), ["magnitude", "1-D"]),
        (dict(x=torch.ones(3, 4)), ["x", "in = 5"]),
        (dict(p=1.0), ["dropout_p", "[0, 1)"]),
        (dict(a=torch.ones(2, 4)), ["lora_a", "weight [out, in]"]),
        (dict(base_out=torch.ones(3, 7)), ["base_out", "[..., out]"]),
    ],
)
def test_bad_input_to_the_dora_op_is_named(change, words):
    args = dict(x=torch.ones(3, 5), w=torch.ones(6, 5), a=torch.ones(2, 5), b=torch.ones(6, 2), m=torch.ones(6), p=0.0,
                base_out=None) | change
    with pytest.raises(ValueError) as e:
        torch.ops.lorafuse.dora_linear(args["x"], args["w"], None, args["a"], args["b"], 1.0, args["p"], args["m"],
                                       args["base_out"])
    for word in words:
        assert word in str(e.value), str(e.value)


# ---- the layer beside PEFT's ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [True, False])
def test_the_magnitude_starts_as_peft_s(init):
    theirs = _peft_model(Net(), r=4, lora_alpha=8, target_modules=["proj"], use_dora=True, init_lora_weights=init)
    ours = lorafuse.inject_lora(Net(), lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    layer = ours.proj
    with torch.no_grad():  # the same A and B (random ones with init False), then the magnitude started again
        layer.lora_A["default"].weight.copy_(theirs.base_model.model.proj.lora_A["default"].weight)
        layer.lora_B["default"].weight.copy_(theirs.base_model.model.proj.lora_B["default"].weight)
    layer._init_magnitude("default")
    expected = theirs.base_model.model.proj.lora_magnitude_vector["default"].weight
    _close(layer.lora_magnitude_vector["default"].weight, expected)
    if init:
        _close(expected, torch.linalg.norm(Net().proj.weight, dim=1))
    assert lorafuse.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_dora_files_merge_and_unload_match_peft(family, tmp_path):
    base, theirs = _randomized_peft_dora(family)
    with torch.no_grad():
        expected = hf_zoo.output(theirs, family)
        plain = hf_zoo.output(base, family)
    assert (expected - plain).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "peft")

    ours = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert all(layer.adapters["default"].use_dora for _, layer in lorafuse.lora_layers(ours))
    with torch.no_grad():
        _close(hf_zoo.output(ours, family), expected)
    lorafuse.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert again.peft_config["default"].use_dora
    with torch.no_grad():
        _close(hf_zoo.output(again, family), expected)
        lorafuse.merge(ours)
        _close(hf_zoo.output(ours, family), expected, rtol=1e-4, atol=1e-5)
        lorafuse.unmerge(ours)
        _close(hf_zoo.output(ours, family), expected)
        merged = lorafuse.merge_and_unload(copy.deepcopy(ours))
        assert not lorafuse.lora_layers(merged)
        peft_merged = copy.deepcopy(theirs).merge_and_unload()
        for (name, w), (peft_name, pw) in zip(merged.state_dict().items(), peft_merged.state_dict().items()):
            assert name == peft_name
            _close(w, pw, rtol=1e-5, atol=1e-6, msg=name)
        _close(hf_zoo.output(lorafuse.unload(ours), family), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dora_training_step_matches_peft(family):
    base, theirs = _randomized_peft_dora(family)
    ours = lorafuse.inject_lora(
        copy.deepcopy(base), lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    ).eval()
    (g_theirs, g_ours), (after_theirs, after_ours) = hf_zoo.sgd_step_side_by_side(
        theirs, ours, lambda m: hf_zoo.output(m, family)
    )
    assert any("lora_magnitude_vector" in n for n in g_ours)
    hf_zoo.assert_same_grads(g_theirs, g_ours)
    magnitude_grads = [g for n, g in g_ours.items() if "magnitude" in n and g is not None]
    assert magnitude_grads and all(bool(g.abs().max() > 0) for g in magnitude_grads)
    # float32 rounding of the two norm formulas (PEFT's ‖W + s·B·A‖, lorafuse's expansion) carried through a step; in
    # float64 the two agree to 1e-14
    _close(after_ours, after_theirs, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("hooked", [False, True])
def test_dropout_training_and_a_hooked_base_match_peft(hooked):
    theirs = _peft_model(Net(), r=4, lora_alpha=8, target_modules=["proj", "out"], use_dora=True,
                         init_lora_weights=False, lora_dropout=0.3)
    _perturb_magnitudes(theirs)
    ours = lorafuse.inject_lora(Net(), lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "out"],
                                                           use_dora=True, lora_dropout=0.3))
    peft_params = {n[len(PREFIX) :]: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in our_params.items():
            p.copy_(peft_params[name])
    if hooked:  # the base is called as it is: its own output, then DoRA on top
        for model in (theirs.base_model.model, ours):
            model.proj.base_layer.register_forward_hook(lambda m, i, o: o)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(3), requires_grad=True)
    results = []
    for model, params in ((theirs.train(), peft_params), (ours.train(), our_params)):
        torch.manual_seed(7)  # the same dropout masks: both draw one per layer, in the same order
        y = model(x)
        (y**2).mean().backward()
        results.append((y.detach(), {n: p.grad for n, p in params.items()}, x.grad.clone()))
        x.grad = None
    (y_t, g_t, gx_t), (y_o, g_o, gx_o) = results
    _close(y_o, y_t)
    _close(gx_o, gx_t, rtol=1e-4, atol=1e-6)
    for name in g_t:
        torch.testing.assert_close(g_o[name], g_t[name], rtol=1e-4, atol=1e-6, msg=name)


def test_several_adapters_merged_in_turn_match_peft():
    base = Net()
    theirs = _peft_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["proj"], use_dora=True,
                         init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_adapter("plain", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False))
        theirs.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["proj"], use_dora=True,
                                                     init_lora_weights=False))
    _perturb_magnitudes(theirs)
    ours = copy.deepcopy(base)
    ours.proj = lorafuse.nn.Linear(ours.proj, "default", r=4, lora_alpha=8, use_dora=True)
    ours.proj.add_adapter("plain", r=2, lora_alpha=4)
    ours.proj.add_adapter("second", r=3, lora_alpha=3, use_dora=True)
    layer, peft_layer = ours.proj, theirs.base_model.model.proj
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad or "lora" in name:
                p.copy_(peft_layer.get_parameter(name))
    names = ["default", "plain", "second"]
    peft_layer.merge(adapter_names=names)
    layer.merge(names)
    _close(layer.base_layer.weight, peft_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
    before = base.proj.weight.clone()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)  # exact: the unmerged weight was kept


def test_from_peft_carries_dora_over_and_adopts_its_magnitudes():
    base = hf_zoo.build("llama")
    theirs = _peft_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                         init_lora_weights=False)
    _perturb_magnitudes(theirs)
    theirs.eval()
    with torch.no_grad():
        expected = hf_zoo.output(theirs, "llama")
    magnitude = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    ours = lorafuse.from_peft(theirs)
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lorafuse.nn.Linear) and layer.lora_magnitude_vector["default"].weight is magnitude
    with torch.no_grad():
        _close(hf_zoo.output(ours, "llama"), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_keeps_float32_magnitudes_and_is_as_exact_as_peft(dtype):
    """Outputs and the gradients of A, B and the magnitude against the same layer in float64 (the norm a constant):
    no further off than twice PEFT's error (the DESIGN's rule), plus a small slack."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.proj = nn.Linear(256, 192, dtype=dtype)
    theirs = _peft_model(copy.deepcopy(base), r=8, lora_alpha=16, target_modules=["proj"], use_dora=True,
                         init_lora_weights=False)
    _perturb_magnitudes(theirs)
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"],
                                                                          use_dora=True))
    layer, peft_layer = ours.proj, theirs.base_model.model.proj
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(theirs.get_parameter(PREFIX + name))
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    grad_out = torch.randn(512, 192, generator=torch.Generator().manual_seed(1)).to(dtype)
    # the float64 reference, the norm detached
    w, bias = base.proj.weight.double(), base.proj.bias.double()
    a, b, m = (t.detach().double().requires_grad_() for t in layer._factors("default") + (
        layer.lora_magnitude_vector["default"].weight,))
    norm = (w + 2.0 * b.detach() @ a.detach()).norm(dim=1)
    exact = (x.double() @ w.t() + 2.0 * (x.double() @ a.t()) @ b.t()) * (m / norm) + bias
    exact.backward(grad_out.double())
    errors = {}
    for who, lay in (("ours", layer), ("peft", peft_layer)):
        y = lay(x)
        assert y.dtype == dtype
        y.backward(grad_out)
        mag = lay.lora_magnitude_vector["default"].weight
        got = (y, lay.lora_A["default"].weight.grad if who == "peft" else lay._factors("default")[0].grad,
               lay.lora_B["default"].weight.grad if who == "peft" else lay._factors("default")[1].grad, mag.grad)
        errors[who] = [float((g.double() - r).abs().max() / r.abs().max()) for g, r in
                       zip(got, (exact, a.grad, b.grad, m.grad))]
    for name, mine, peft_err in zip(("out", "dA", "dB", "dm"), errors["ours"], errors["peft"]):
        assert mine <= 2 * peft_err + 1e-5, (name, errors)


# ---- refusals ------------------------------------------------------------------------------------------------------


def test_dora_over_a_base_it_cannot_rescale_is_refused_by_name():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match=r"use_dora.*own forward"):
        lorafuse.nn.Linear(Doubled(4, 3), use_dora=True)
    with pytest.raises(ValueError, match=r"use_dora.*quantized"):
        lorafuse.nn.Linear(lorafuse.nn.Linear4bit.from_linear(nn.Linear(64, 8)), use_dora=True)
    with pytest.raises(TypeError, match="use_dora"):
        lorafuse.LoraConfig(use_dora="yes")


def test_a_mixed_batch_with_a_dora_adapter_is_refused_by_name():
    model = lorafuse.inject_lora(Net(), lorafuse.LoraConfig(target_modules=["proj"], use_dora=True))
    lorafuse.add_adapter(model, "other", lorafuse.LoraConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match=r'"default" is a DoRA adapter'):
        with lorafuse.use_adapter(["default", "other"]):
            model(torch.randn(2, 3, 24))
    with lorafuse.use_adapter(["default", "default"]):  # one adapter for every row: the plain path
        model(torch.randn(2, 3, 24))


@pytest.mark.parametrize(
    "edit, words",
    [
        ("drop_magnitude", ["lora_magnitude_vector", "use_dora = true"]),
        ("config_off", ["magnitude vector", "use_dora = false"]),
        ("bad_shape", ["lora_magnitude_vector", "[19]", "expected [20]"]),
    ],
)
def test_broken_dora_files_are_refused_by_name(edit, words, tmp_path):
    model = lorafuse.inject_lora(Net(), lorafuse.LoraConfig(target_modules=["proj"], use_dora=True))
    lorafuse.save_adapter(model, tmp_path / "a")
    import json

    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = PREFIX + "proj.lora_magnitude_vector"
    assert key in weights and weights[key].shape == (20,)
    if edit == "drop_magnitude":
        del weights[key]
    elif edit == "bad_shape":
        weights[key] = torch.ones(19)
    else:
        cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        cfg["use_dora"] = False
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(weights, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError) as e:
        lorafuse.load_adapter(Net(), tmp_path / "a")
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("family", ["gpt2", "llama", "vit"])
def test_in_float64_a_dora_step_equals_peft_s_to_rounding(family):
    base, theirs = _randomized_peft_dora(family)
    base, theirs = base.double(), theirs.double()
    ours = lorafuse.inject_lora(
        copy.deepcopy(base), lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    ).eval()
    peft_params = {n[len(PREFIX) :]: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in our_params.items():
            p.copy_(peft_params[name])
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in hf_zoo.inputs(family).items()}

    def output(model):
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    after = []
    for model, params in ((theirs, peft_params), (ours, our_params)):
        opt = torch.optim.SGD(params.values(), lr=0.1)
        (output(model) ** 2).mean().backward()
        opt.step()
        with torch.no_grad():
            after.append(output(model))
    torch.testing.assert_close(after[1], after[0], rtol=1e-10, atol=1e-12)
    for name in peft_params:
        torch.testing.assert_close(our_params[name], peft_params[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_dora_model_compiles_with_fullgraph():
    model = lorafuse.inject_lora(Net(), lorafuse.LoraConfig(target_modules=["proj", "out"], use_dora=True,
                                                           init_lora_weights=False))
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _close(compiled(x), expected)
    compiled(x).sum().backward()
    assert model.proj.lora_magnitude_vector["default"].weight.grad is not None
