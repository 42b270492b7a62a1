"""lorafuse beside the real peft on tiny models of fifteen transformers families: the same layers selected (default
targets, explicit targets, "all-linear"), the same trainable counts, the same outputs with the same non-zero adapters,
files both ways, merge / unmerge / merge_and_unload / unload, and the same gradients and optimizer step."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lorafuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_zoo  # noqa: E402

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

FAMILIES = hf_zoo.FAMILIES

# Explicit target lists per family: attention and MLP names as users write them.
EXPLICIT = {
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "key", "dense"],
    "roberta": ["query", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "o_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "up_proj"],
    "gemma": ["q_proj", "gate_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "v_proj", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_neox": ["query_key_value", "dense_h_to_4h"],
    "vit": ["q_proj", "v_proj", "dense"],
    "whisper": ["q_proj", "v_proj", "fc1"],
}


_peft_model = hf_zoo.peft_model


def _peft_targets(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer))


def _selected(family: str, targets):
    """(paths, trainable counts) of PEFT and of lorafuse, or the ValueError each raised."""
    out = []
    try:
        model = _peft_model(hf_zoo.build(family), r=4, target_modules=targets)
        out.append((_peft_targets(model), model.get_nb_trainable_parameters()))
    except ValueError as e:
        out.append(e)
    try:
        model = lorafuse.inject_lora(hf_zoo.build(family), lorafuse.LoraConfig(r=4, target_modules=targets))
        out.append((sorted(p for p, _ in lorafuse.lora_layers(model)), lorafuse.trainable_parameters(model)))
    except ValueError as e:
        out.append(e)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_peft_s(family):
    theirs, ours = _selected(family, None)
    if isinstance(theirs, ValueError):  # a type without defaults (phi3): both ask for target_modules
        assert isinstance(ours, ValueError), ours
        assert "target_modules" in str(ours) and hf_zoo.build(family).config.model_type in str(ours)
        assert lorafuse.default_target_modules(hf_zoo.build(family).config.model_type) is None
        return
    assert not isinstance(ours, ValueError), ours
    assert ours[0] == theirs[0] and len(ours[0]) > 0
    assert ours[1] == theirs[1]
    expected = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[
        hf_zoo.build(family).config.model_type
    ]
    assert lorafuse.default_target_modules(hf_zoo.build(family).config.model_type) == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", ["all-linear", "explicit"])
def test_targets_select_what_peft_selects(family, targets):
    theirs, ours = _selected(family, EXPLICIT[family] if targets == "explicit" else targets)
    assert not isinstance(theirs, ValueError), theirs
    assert not isinstance(ours, ValueError), ours
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]


def test_the_default_target_table_is_peft_s():
    table = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for model_type, targets in table.items():
        assert lorafuse.default_target_modules(model_type) == targets, model_type
    assert lorafuse.default_target_modules("phi3") is None
    with pytest.raises(TypeError, match="model_type: expected a str, found int"):
        lorafuse.default_target_modules(3)


def test_all_linear_leaves_out_the_output_layer_whatever_its_name():
    model = lorafuse.inject_lora(hf_zoo.build("whisper"), lorafuse.LoraConfig(r=2, target_modules="all-linear"))
    paths = [p for p, _ in lorafuse.lora_layers(model)]
    assert "proj_out" not in paths and "model.decoder.layers.0.fc1" in paths


def test_a_plain_module_needs_target_modules():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules: not given, and the model has no model_type"):
        lorafuse.inject_lora(model, lorafuse.LoraConfig())
    lorafuse.inject_lora(model, lorafuse.LoraConfig(target_modules=["q_proj"]))
    assert [p for p, _ in lorafuse.lora_layers(model)] == ["q_proj"]


def _randomized_peft(family: str):
    base = hf_zoo.build(family)
    model = _peft_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return base, model.eval()


_close = hf_zoo.assert_close


@pytest.mark.parametrize("family", FAMILIES)
def test_files_merge_and_unload_match_peft(family, tmp_path):
    base, theirs = _randomized_peft(family)
    with torch.no_grad():
        expected = hf_zoo.output(theirs, family)
        plain = hf_zoo.output(base, family)
    assert (expected - plain).abs().max() > 1e-3  # the adapters change the output
    theirs.save_pretrained(tmp_path / "peft")

    # PEFT's files into lorafuse, lorafuse's back into PEFT
    ours = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        _close(hf_zoo.output(ours, family), expected)
    lorafuse.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        _close(hf_zoo.output(again, family), expected)

        lorafuse.merge(ours)
        _close(hf_zoo.output(ours, family), expected)
        lorafuse.unmerge(ours)
        _close(hf_zoo.output(ours, family), expected)
        merged = lorafuse.merge_and_unload(copy.deepcopy(ours))
        assert not lorafuse.lora_layers(merged)
        _close(hf_zoo.output(merged, family), hf_zoo.output(copy.deepcopy(theirs).merge_and_unload(), family))
        unloaded = lorafuse.unload(ours)
        _close(hf_zoo.output(unloaded, family), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_matches_peft(family):
    base, theirs = _randomized_peft(family)
    ours = lorafuse.inject_lora(
        copy.deepcopy(base), lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    ).eval()
    # a gradient is None where the output does not use the layer (ViT's pooler)
    (g_theirs, g_ours), (after_theirs, after_ours) = hf_zoo.sgd_step_side_by_side(
        theirs, ours, lambda m: hf_zoo.output(m, family)
    )
    hf_zoo.assert_same_grads(g_theirs, g_ours)
    assert sum(g is not None and bool(g.abs().max() > 0) for g in g_ours.values()) > len(g_ours) // 2
    _close(after_ours, after_theirs)


# ---- behaviour that PEFT users rely on -------------------------------------------------------------


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_merging_twice_warns_and_changes_nothing_as_in_peft():
    base, theirs = _randomized_peft("llama")
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs.merge_adapter()
    lorafuse.merge(ours)
    with pytest.warns(UserWarning, match="already merged"):
        theirs.merge_adapter()
    weights = {n: p.clone() for n, p in ours.named_parameters()}
    with pytest.warns(UserWarning, match="merge: already merged, left as it is: .*; nothing to do"):
        lorafuse.merge(ours)
    assert all(torch.equal(p, weights[n]) for n, p in ours.named_parameters())
    layer = lorafuse.lora_layers(ours)[0][1]
    with pytest.warns(UserWarning, match=r"merge: \[default\] already merged in this layer; nothing to do"):
        layer.merge(["default"])
    assert layer.merged_adapters == ["default"]


def test_disabled_adapters_do_not_train_as_in_peft():
    base, theirs = _randomized_peft("llama")
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert _trainable(ours) == _trainable(theirs) > 0
    before = _trainable(ours)
    theirs.base_model.disable_adapter_layers()
    lorafuse.disable_adapters(ours)
    assert _trainable(ours) == _trainable(theirs) == 0
    theirs.base_model.enable_adapter_layers()
    lorafuse.enable_adapters(ours)
    assert _trainable(ours) == _trainable(theirs) == before


@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_loaded_adapter_trains_only_when_asked_as_in_peft(tmp_path, is_trainable):
    base, theirs = _randomized_peft("llama")
    theirs.save_pretrained(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base).train(), tmp_path / "a", is_trainable=is_trainable)
    ours = lorafuse.load_adapter(copy.deepcopy(base).train(), tmp_path / "a", is_trainable=is_trainable)
    assert _trainable(ours) == _trainable(loaded)
    assert (_trainable(ours) > 0) == is_trainable
    assert ours.training == loaded.training == is_trainable
    # a second adapter beside the first: frozen and inactive; the first keeps its state
    lorafuse.load_adapter(ours, tmp_path / "a", "second")
    assert (_trainable(ours) > 0) == is_trainable
    assert lorafuse.active_adapter(ours) == "default"
    with pytest.raises(TypeError, match="load_adapter: is_trainable must be a bool, found str"):
        lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "a", is_trainable="yes")


LAYER_CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern=["h"])),
    ("t5", dict(target_modules=["q", "wo"], layers_to_transform=[0], layers_pattern="block")),
    ("bert", dict(target_modules=["query", "dense"], layers_to_transform=[1])),
    ("whisper", dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers")),
    ("llama", dict(target_modules=None, layers_to_transform=[0])),
]


@pytest.mark.parametrize("family, fields", LAYER_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(LAYER_CASES)])
def test_layers_to_transform_selects_what_peft_selects_and_files_load(family, fields, tmp_path):
    base = hf_zoo.build(family)
    theirs = _peft_model(copy.deepcopy(base), r=4, init_lora_weights=False, **fields).eval()
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4, **fields))
    paths = sorted(p for p, _ in lorafuse.lora_layers(ours))
    assert paths == _peft_targets(theirs) and paths
    assert lorafuse.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    # PEFT's file (its config keeps layers_to_transform) loads here: the same layers, the same outputs
    theirs.save_pretrained(tmp_path)
    loaded = lorafuse.load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(p for p, _ in lorafuse.lora_layers(loaded)) == paths
    with torch.no_grad():
        _close(hf_zoo.output(loaded, family), hf_zoo.output(theirs, family))


def test_layers_to_transform_bad_input_is_named():
    with pytest.raises(ValueError, match="layers_to_transform: cannot be used when target_modules is a string"):
        lorafuse.LoraConfig(target_modules="all-linear", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern: given without layers_to_transform"):
        lorafuse.LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ValueError, match="layers_to_transform: expected layer indices >= 0, found -1"):
        lorafuse.LoraConfig(target_modules=["q_proj"], layers_to_transform=[-1])
    with pytest.raises(TypeError, match="layers_to_transform: expected a layer index"):
        lorafuse.LoraConfig(target_modules=["q_proj"], layers_to_transform=["0"])
    with pytest.raises(TypeError, match="layers_pattern: expected a str, a list of str or None, found 3"):
        lorafuse.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=3)
    with pytest.raises(ValueError, match="layers_pattern.*not a valid regular expression"):
        lorafuse.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="lay(ers")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_in_the_base_dtype_on_request_as_in_peft(dtype, tmp_path):
    base = hf_zoo.build("llama").to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=4, init_lora_weights=False), autocast_adapter_dtype=False
        ).eval()
        kept = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4))
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4), autocast_adapter_dtype=False).eval()
    default = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4))

    def dtypes(model):
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}

    assert dtypes(ours) == dtypes(theirs) == {dtype}
    assert dtypes(default) == dtypes(kept) == {torch.float32}
    prefix = "base_model.model."
    with torch.no_grad():
        params = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                params[name[len(prefix) :]].copy_(p)
        torch.testing.assert_close(hf_zoo.output(ours, "llama"), hf_zoo.output(theirs, "llama"), rtol=2e-2, atol=2e-2)
    theirs.save_pretrained(tmp_path)
    loaded = lorafuse.load_adapter(copy.deepcopy(base), tmp_path, autocast_adapter_dtype=False)
    assert dtypes(loaded) == {dtype}
    assert dtypes(lorafuse.load_adapter(copy.deepcopy(base), tmp_path)) == {torch.float32}
    with pytest.raises(TypeError, match="autocast_adapter_dtype: expected a bool, found int"):
        lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4), autocast_adapter_dtype=1)


REGEXES = [
    r"(?i).*\.(Q_PROJ|V_PROJ)",  # inline flags
    r".*(?<!mlp)\.(q_proj|down_proj|up_proj)",  # a lookbehind
    r".*?layers\.(?P<layer>0)\..*_proj",  # a named group, a lazy quantifier
    r"(?=.*self_attn).*\.[qk]_proj",  # a lookahead
    r"\Amodel\.layers\.1\.mlp\.(?:gate|up)_proj\Z",  # \A and \Z
]


@pytest.mark.parametrize("regex", REGEXES)
def test_python_regexes_select_what_peft_selects_and_load_from_files(regex, tmp_path):
    base = hf_zoo.build("llama")
    theirs = _peft_model(copy.deepcopy(base), r=4, init_lora_weights=False, target_modules=regex).eval()
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4, target_modules=regex))
    paths = sorted(p for p, _ in lorafuse.lora_layers(ours))
    assert paths == _peft_targets(theirs) and paths
    # as exclude_modules and rank_pattern too (the same engine)
    excluded = lorafuse.inject_lora(
        copy.deepcopy(base), lorafuse.LoraConfig(r=4, target_modules="all-linear", exclude_modules=regex)
    )
    assert not set(paths) & {p for p, _ in lorafuse.lora_layers(excluded)}
    theirs.save_pretrained(tmp_path)
    loaded = lorafuse.load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(p for p, _ in lorafuse.lora_layers(loaded)) == paths
    with torch.no_grad():
        _close(hf_zoo.output(loaded, "llama"), hf_zoo.output(theirs, "llama"))


def test_a_bad_regex_is_named_with_the_library_s_reason():
    with pytest.raises(ValueError, match=r'target_modules: ".\*\(q_proj" is not a valid regular expression \(.*missing'):
        lorafuse.LoraConfig(target_modules=".*(q_proj")
    with pytest.raises(ValueError, match=r'rank_pattern: "\(\?<name" is not a valid regular expression'):
        lorafuse.LoraConfig(target_modules=["q_proj"], rank_pattern={"(?<name": 4})


def test_a_warning_turned_into_an_error_leaves_a_cpp_model_unchanged():
    model = lorafuse.models.Llama(lorafuse.models.LlamaConfig())
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=2))  # the Llama says "llama": q_proj and v_proj
    assert len(lorafuse.lora_layers(model)) == 4
    lorafuse.merge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="merge_adapter: already merged"):
            lorafuse.merge(model)
        with pytest.raises(UserWarning, match='"nothing" matches no module'):
            lorafuse.add_adapter(model, "b", lorafuse.LoraConfig(target_modules=["q_proj", "nothing"]))
    assert lorafuse.adapter_names(model) == ["default"]
    with pytest.warns(UserWarning, match='"nothing" matches no module'):
        lorafuse.add_adapter(model, "b", lorafuse.LoraConfig(target_modules=["q_proj", "nothing"]))
    assert lorafuse.adapter_names(model) == ["default", "b"]


def test_a_layers_pattern_with_groups_of_its_own_and_unicode_classes():
    base = hf_zoo.build("llama")
    fields = dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="(layers|h)")
    theirs = _peft_model(copy.deepcopy(base), r=2, **fields)
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=2, **fields))
    assert sorted(p for p, _ in lorafuse.lora_layers(ours)) == _peft_targets(theirs) == ["model.layers.1.self_attn.q_proj"]
    model = torch.nn.Sequential()
    model.add_module("blöck", torch.nn.Linear(2, 2))  # \w is Unicode-aware in Python's re, and here
    lorafuse.inject_lora(model, lorafuse.LoraConfig(target_modules=r"\w+"))
    assert [p for p, _ in lorafuse.lora_layers(model)] == ["blöck"]


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_pissa_and_olora_start_as_peft_s_and_their_files_load(init, tmp_path):
    base = hf_zoo.build("llama")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
    torch.manual_seed(5)  # pissa_niter_N: the same random draws (torch.svd_lowrank's) on both sides
    theirs = _peft_model(copy.deepcopy(base), **config).eval()
    torch.manual_seed(5)
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(**config)).eval()
    prefix = "base_model.model."
    theirs_params = {n[len(prefix) :].replace(".base_layer", ""): p for n, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():  # A, B and the residual base weights
        torch.testing.assert_close(p, theirs_params[name.replace(".base_layer", "")], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # the residual plus the adapter is the model as it was
        _close(hf_zoo.output(ours, "llama"), hf_zoo.output(base, "llama"))
    assert lorafuse.lora_layers(ours)[0][1].lora_B["default"].weight.abs().max() > 0
    # PEFT's file (init_lora_weights "pissa"/"olora") loads over the residual base with its own weights
    theirs.save_pretrained(tmp_path)
    residual = copy.deepcopy(theirs).unload()
    loaded = lorafuse.load_adapter(residual, tmp_path)
    with torch.no_grad():
        _close(hf_zoo.output(loaded, "llama"), hf_zoo.output(theirs, "llama"))


def test_a_bad_pissa_niter_and_a_quantized_base_are_refused_by_name():
    for bad in ("pissa_niter_", "pissa_niter_two", "pissa_niter_-1"):
        with pytest.raises(ValueError, match=f'init_lora_weights: "{bad}": expected "pissa_niter_N"'):
            lorafuse.LoraConfig(init_lora_weights=bad)
        with pytest.raises(ValueError, match=f'init_lora_weights: "{bad}": expected "pissa_niter_N"'):
            lorafuse.nn.AdapterOptions(4, init_lora_weights=bad)
    model = lorafuse.quantize_model(hf_zoo.build("llama"), lorafuse.QuantConfig(modules_to_not_convert=["lm_head"]))
    with pytest.raises(ValueError, match='init_lora_weights "olora": .*no full-precision nn.Linear weight'):
        lorafuse.inject_lora(model, lorafuse.LoraConfig(r=2, init_lora_weights="olora"))
