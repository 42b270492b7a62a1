"""LoRA on nn.Embedding (PEFT's lora_embedding_A / lora_embedding_B) beside the real peft: selection, the start, outputs,
files both ways, merge / unmerge / merge_and_unload, a training step; refusals named."""

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

PREFIX = "base_model.model."
# families whose input embedding is not tied to their output layer in the tiny configs, with its name
EMBEDDINGS = {"llama": "embed_tokens", "bert": "word_embeddings", "opt": "embed_tokens", "gpt_neox": "embed_in"}


_peft_model = hf_zoo.peft_model
_close = hf_zoo.assert_close


def _targets(family):
    return [EMBEDDINGS[family], "query" if family == "bert" else "query_key_value" if family == "gpt_neox" else "q_proj"]


@pytest.mark.parametrize("family", sorted(EMBEDDINGS))
def test_embedding_adapters_match_peft_outputs_files_and_merges(family, tmp_path):
    base = hf_zoo.build(family)
    config = dict(r=4, lora_alpha=8, target_modules=_targets(family), init_lora_weights=False)
    theirs = _peft_model(copy.deepcopy(base), **config).eval()
    with torch.no_grad():
        expected, plain = hf_zoo.output(theirs, family), hf_zoo.output(base, family)
    assert (expected - plain).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "peft")

    ours = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    layers = dict(lorafuse.lora_layers(ours))
    embedding = next(layer for path, layer in layers.items() if path.endswith(EMBEDDINGS[family]))
    assert isinstance(embedding, lorafuse.nn.Embedding)
    assert embedding.lora_embedding_A["default"].shape == (4, embedding.base_layer.num_embeddings)
    with torch.no_grad():
        _close(hf_zoo.output(ours, family), expected)
    lorafuse.save_adapter(ours, tmp_path / "ours")
    saved = lorafuse.read_adapter(tmp_path / "ours")
    assert [p for p in saved["embeddings"]] == [p for p in layers if p.endswith(EMBEDDINGS[family])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        _close(hf_zoo.output(again, family), expected)
        weight = embedding.base_layer.weight.clone()
        output_layer = ours.get_output_embeddings()
        if output_layer is not None and output_layer.weight is embedding.base_layer.weight:
            # tied to the output layer: PEFT's merge would change the output layer too; lorafuse refuses
            with pytest.raises(ValueError, match="tied weights"):
                lorafuse.merge(ours)
            assert torch.equal(embedding.base_layer.weight, weight)
            return
        lorafuse.merge(ours)
        _close(hf_zoo.output(ours, family), expected, rtol=1e-4, atol=1e-5)
        lorafuse.unmerge(ours)
        assert torch.equal(embedding.base_layer.weight, weight)
        merged = lorafuse.merge_and_unload(copy.deepcopy(ours))
        peft_merged = copy.deepcopy(theirs).merge_and_unload()
        for (name, w), (peft_name, pw) in zip(merged.state_dict().items(), peft_merged.state_dict().items()):
            assert name == peft_name
            _close(w, pw, msg=name)
        _close(hf_zoo.output(lorafuse.unload(ours), family), plain)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_an_embedding_training_step_matches_peft(family):
    base = hf_zoo.build(family)
    config = dict(r=4, lora_alpha=8, target_modules=_targets(family), init_lora_weights=False)
    theirs = _peft_model(copy.deepcopy(base), **config).eval()
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(**config)).eval()
    grads, after = hf_zoo.sgd_step_side_by_side(theirs, ours, lambda m: hf_zoo.output(m, family))
    assert any("lora_embedding_A" in n for n in grads[1])
    hf_zoo.assert_same_grads(*grads)
    assert any(bool(g.abs().max() > 0) for n, g in grads[1].items() if "lora_embedding" in n)
    _close(after[1], after[0], rtol=1e-4, atol=1e-5)


def test_a_new_embedding_adapter_starts_as_peft_s_and_changes_nothing():
    base = hf_zoo.build("llama")
    model = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4, target_modules=["embed_tokens"]))
    layer = model.model.embed_tokens
    assert torch.equal(layer.lora_embedding_A["default"], torch.zeros(4, 64))
    b = layer.lora_embedding_B["default"]
    assert b.shape == (32, 4) and 0.5 < b.std() < 1.5  # normal(0, 1), as PEFT
    with torch.no_grad():
        _close(hf_zoo.output(model, "llama"), hf_zoo.output(base, "llama"), rtol=0, atol=0)
    theirs = _peft_model(copy.deepcopy(base), r=4, target_modules=["embed_tokens"])
    assert lorafuse.trainable_parameters(model)[0] == theirs.get_nb_trainable_parameters()[0]
    # "all-linear" leaves embeddings alone, as PEFT
    paths = [p for p, _ in lorafuse.lora_layers(lorafuse.inject_lora(hf_zoo.build("llama"), lorafuse.LoraConfig(
        target_modules="all-linear")))]
    assert paths and not any("embed" in p for p in paths)


def test_padding_idx_and_bfloat16_bases():
    torch.manual_seed(0)
    base = nn.Embedding(10, 6, padding_idx=0)
    layer = lorafuse.nn.Embedding(base, r=2, init_lora_weights=False)
    ids = torch.tensor([[0, 3, 3], [9, 0, 1]])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    y = layer(ids)
    _close(y, base(ids) + (a.t()[ids] @ b.t()) * (8 / 2))
    y.sum().backward()
    assert torch.equal(a.grad[:, 0], torch.zeros(2))  # the padding row gets no gradient, as in the base
    half = lorafuse.nn.Embedding(nn.Embedding(10, 6).bfloat16(), r=2)
    assert half.lora_embedding_A["default"].dtype == torch.float32 and half(ids).dtype == torch.bfloat16


def test_embedding_refusals_are_named():
    with pytest.raises(TypeError, match="lorafuse.nn.Embedding wraps an nn.Embedding"):
        lorafuse.nn.Linear(nn.Embedding(4, 3))
    with pytest.raises(TypeError, match="expected a torch.nn.Embedding"):
        lorafuse.nn.Embedding(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r'use_dora.*embed_tokens.*DoRA on embedding layers'):
        lorafuse.inject_lora(hf_zoo.build("llama"), lorafuse.LoraConfig(target_modules=["embed_tokens", "q_proj"],
                                                                         use_dora=True))
    model = hf_zoo.build("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r'init_lora_weights "pissa".*embed_tokens.*embedding layer'):
        lorafuse.inject_lora(model, lorafuse.LoraConfig(target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa"))
    assert not lorafuse.lora_layers(model)  # nothing changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = lorafuse.inject_lora(hf_zoo.build("llama"), lorafuse.LoraConfig(target_modules=["embed_tokens"]))
    lorafuse.add_adapter(model, "other", lorafuse.LoraConfig(target_modules=["embed_tokens"]))
    ids = hf_zoo.inputs("llama")["input_ids"]
    with pytest.raises(ValueError, match="embedding layer's adapters"):
        with lorafuse.use_adapter(["default", "other"]):
            model(input_ids=ids)
    with lorafuse.use_adapter(["other", "other"]):
        model(input_ids=ids)


def test_files_with_embedding_tensors_on_the_wrong_layer_are_named(tmp_path):
    base = hf_zoo.build("llama")
    theirs = _peft_model(copy.deepcopy(base), r=4, target_modules=["embed_tokens"], init_lora_weights=False)
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    renamed = {k.replace("model.embed_tokens", "model.layers.0.self_attn.q_proj"): v for k, v in weights.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    import json

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r'adapts "model.layers.0.self_attn.q_proj" as an embedding layer'):
        lorafuse.load_adapter(copy.deepcopy(base), tmp_path, partial=True)


def test_from_peft_carries_embedding_adapters_over_and_adopts_their_parameters():
    base = hf_zoo.build("llama")
    theirs = _peft_model(copy.deepcopy(base), r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    theirs.eval()
    with torch.no_grad():
        expected = hf_zoo.output(theirs, "llama")
    a = theirs.base_model.model.model.embed_tokens.lora_embedding_A["default"]
    ours = lorafuse.from_peft(theirs)
    layer = ours.model.embed_tokens
    assert isinstance(layer, lorafuse.nn.Embedding) and layer.lora_embedding_A["default"] is a
    assert a.requires_grad
    with torch.no_grad():
        _close(hf_zoo.output(ours, "llama"), expected)


def test_peft_files_with_base_weights_load_them_as_peft_does(tmp_path):
    """PEFT saves the base weight of targeted embedding layers (save_embedding_layers: embed_tokens, lm_head); loading
    puts it into the base layer, as PEFT's from_pretrained does (here one that differs from the model's)."""
    base = hf_zoo.build("llama")
    trained = copy.deepcopy(base)
    with torch.no_grad():
        trained.model.embed_tokens.weight.add_(0.01)  # e.g. new token rows trained with the adapter
        trained.lm_head.weight.mul_(1.01)
    theirs = _peft_model(trained, r=4, target_modules=["embed_tokens", "q_proj", "lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting save_embedding_layers to True"
        theirs.save_pretrained(tmp_path)
    saved = lorafuse.read_adapter(tmp_path)
    assert sorted(p for p, _ in saved["base_weights"]) == ["lm_head", "model.embed_tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = lorafuse.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(ours.model.embed_tokens.base_layer.weight, trained.model.embed_tokens.base_layer.weight)
    with torch.no_grad():
        _close(hf_zoo.output(ours, "llama"), hf_zoo.output(reference, "llama"))
        _close(hf_zoo.output(ours, "llama"), hf_zoo.output(theirs.eval(), "llama"))
    # a base weight of the wrong shape is named before anything changes
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights[PREFIX + "lm_head.base_layer.weight"] = torch.zeros(64, 31)
    save_file(weights, tmp_path / "adapter_model.safetensors")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"lm_head.*base weight.*\[64, 31\]"):
        lorafuse.load_adapter(fresh, tmp_path)
    assert not lorafuse.lora_layers(fresh)
