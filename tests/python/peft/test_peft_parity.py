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
    "vit": ["query", "value", "dense"],
    "whisper": ["q_proj", "v_proj", "fc1"],
}


def _peft_model(base, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**config))


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


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


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
    prefix = "base_model.model."
    peft_params = {n[len(prefix) :]: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(peft_params) == sorted(our_params)
    with torch.no_grad():
        for name, p in our_params.items():
            p.copy_(peft_params[name])
    steps = []
    for model, params in ((theirs, peft_params), (ours, our_params)):
        opt = torch.optim.SGD(params.values(), lr=0.1)
        out = hf_zoo.output(model, family)
        (out.float() ** 2).mean().backward()
        grads = {n: p.grad for n, p in params.items()}  # None: the output does not use the layer (ViT's pooler)
        opt.step()
        with torch.no_grad():
            steps.append((grads, hf_zoo.output(model, family)))
    (g_theirs, after_theirs), (g_ours, after_ours) = steps
    for name in g_theirs:
        if g_theirs[name] is None:
            assert g_ours[name] is None, name
        else:
            torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sum(g is not None and bool(g.abs().max() > 0) for g in g_ours.values()) > len(g_ours) // 2
    _close(after_ours, after_theirs)
