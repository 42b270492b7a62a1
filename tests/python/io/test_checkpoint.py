"""Hugging Face checkpoint folders with 4-bit layers: lorafuse.load_checkpoint / save_checkpoint against the real
transformers + bitsandbytes, both ways, for Python models and the C++ Llama; sharded folders; quantizing while
loading; what is refused.

bitsandbytes computes an inference forward on AVX512-BF16 CPUs in bfloat16 from a repacked copy; in training mode it
dequantizes exactly as lorafuse does, so the reference logits are taken in training mode (the tiny Llama has no
dropout) and compared exactly."""

import json

import peft
import pytest
import torch
import transformers
from accelerate import init_empty_weights
from hf_models import tiny_llama_config
from torch import nn

import lorafuse
from lorafuse import _C
from lorafuse.nn import Linear4bit

IDS = torch.arange(16).mul(7).remainder(64).reshape(2, 8)
# every layer's in_features a multiple of 64: bitsandbytes' CPU kernels need whole blocks per row
SHAPE = dict(hidden_size=64, intermediate_size=128)


def _dense_folder(tmp_path, seed=0):
    path = tmp_path / f"dense{seed}"
    if not path.exists():
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(tiny_llama_config(**SHAPE)).save_pretrained(path)
    return path


def _bnb_model(path, double_quant=True, compute_dtype=torch.float32):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


def _bnb_folder(tmp_path, **kw):
    """A tiny Llama quantized by transformers + bitsandbytes and saved by transformers."""
    path = tmp_path / ("bnb" + "".join(f"_{k}{v}" for k, v in sorted(kw.items())).replace("torch.", ""))
    model = _bnb_model(_dense_folder(tmp_path), **kw)
    model.save_pretrained(path)
    return path, model


def _logits(model):
    if isinstance(model, transformers.PreTrainedModel):
        model.train()  # bitsandbytes' exact path (see the module docstring)
        with torch.no_grad():
            return model(input_ids=IDS).logits
    with torch.no_grad():
        out = model(IDS) if isinstance(model, lorafuse.models.Llama) else model(input_ids=IDS).logits
    return out


def _skeleton():
    """transformers' Llama with its parameters on the meta device (no memory); buffers stay on the CPU."""
    with init_empty_weights():
        return transformers.LlamaForCausalLM(tiny_llama_config(**SHAPE))


def _cpp_skeleton(folder):
    config = (folder / "config.json").read_text()
    return lorafuse.models.Llama(lorafuse.models.LlamaConfig.from_hf_json(config, device=torch.device("meta")))


def _bnb_bytes(module):
    return module.weight.data.view(torch.uint8).reshape(-1)


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_transformers_4bit_checkpoint_loads_into_a_meta_skeleton_with_equal_logits(tmp_path, double_quant):
    folder, theirs = _bnb_folder(tmp_path, double_quant=double_quant)
    ours = _skeleton()
    paths = lorafuse.load_checkpoint(ours, folder)
    assert len(paths) == 14 and "lm_head" not in paths
    assert not any(p.is_meta for p in ours.parameters()) and not any(b.is_meta for b in ours.buffers())
    q_proj = ours.model.layers[1].self_attn.q_proj
    assert type(q_proj) is Linear4bit and q_proj.double_quant == double_quant
    assert q_proj.compute_dtype == torch.float32
    assert torch.equal(q_proj.packed.reshape(-1), _bnb_bytes(theirs.model.layers[1].self_attn.q_proj))
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)


def test_a_4bit_checkpoint_loads_into_a_model_with_real_weights_too(tmp_path):
    folder, theirs = _bnb_folder(tmp_path)
    torch.manual_seed(5)
    ours = transformers.LlamaForCausalLM(tiny_llama_config(**SHAPE)).to(torch.bfloat16)
    embed = ours.model.embed_tokens.weight
    lorafuse.load_checkpoint(ours, folder)
    assert ours.model.embed_tokens.weight is embed and embed.dtype == torch.bfloat16  # copied in, the model's dtype
    assert type(ours.model.layers[0].self_attn.q_proj) is Linear4bit
    ours.float()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-2, atol=1e-2)  # bfloat16 norms and embeddings


def test_bfloat16_compute_dtype_comes_from_the_checkpoint(tmp_path):
    folder, theirs = _bnb_folder(tmp_path, compute_dtype=torch.bfloat16)
    ours = _skeleton()
    lorafuse.load_checkpoint(ours, folder)
    assert ours.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    # both round x to bfloat16 and multiply by the same bfloat16 weight; the GEMMs may sum in another order
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=2e-2, atol=2e-2)


def test_a_transformers_4bit_checkpoint_loads_into_the_cpp_llama(tmp_path):
    folder, theirs = _bnb_folder(tmp_path)
    ours = _cpp_skeleton(folder)
    assert len(lorafuse.load_checkpoint(ours, folder)) == 14
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)
    # QLoRA on it as usual: training moves the adapters only
    lorafuse.inject_lora(ours, lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    # the 4-bit weights count out × in parameters each, as PEFT counts them over bitsandbytes
    peft_model = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert lorafuse.trainable_parameters(ours) == tuple(peft_model.get_nb_trainable_parameters())
    before = {n: b.clone() for n, b in ours.named_buffers()}
    trainable = [p for p in ours.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    logits = ours(IDS)
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), IDS[:, 1:].reshape(-1)).backward()
    opt.step()
    assert all(torch.equal(b, before[n]) for n, b in ours.named_buffers())


@pytest.mark.parametrize("source", ["python", "cpp"])
def test_a_lorafuse_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, source):
    if source == "python":
        model = transformers.LlamaForCausalLM.from_pretrained(_dense_folder(tmp_path))
    else:
        torch.manual_seed(0)
        model = lorafuse.models.Llama(lorafuse.models.LlamaConfig(vocab_size=64, **SHAPE))
    lorafuse.quantize_model(model)
    expected = _logits(model)
    folder = tmp_path / "ours"
    lorafuse.save_checkpoint(model, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)
    down = theirs.model.layers[1].mlp.down_proj
    assert type(down).__module__.startswith("bitsandbytes")
    packed = dict(model.named_buffers())["model.layers.1.mlp.down_proj.packed"]
    assert torch.equal(_bnb_bytes(down), packed.reshape(-1))
    torch.testing.assert_close(_logits(theirs), expected, rtol=0, atol=0)
    # and back into lorafuse
    again = _skeleton()
    lorafuse.load_checkpoint(again, folder)
    torch.testing.assert_close(_logits(again), expected, rtol=0, atol=0)


def test_a_model_on_bitsandbytes_layers_saves_as_transformers_does(tmp_path):
    _, theirs = _bnb_folder(tmp_path)
    expected = _logits(theirs)
    folder = tmp_path / "from_bnb"
    lorafuse.save_checkpoint(theirs, folder)
    ours = _skeleton()
    lorafuse.load_checkpoint(ours, folder)
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits(transformers.AutoModelForCausalLM.from_pretrained(folder)), expected, rtol=0, atol=0)


def test_a_sharded_checkpoint_loads(tmp_path):
    _, theirs = _bnb_folder(tmp_path)
    folder = tmp_path / "sharded"
    theirs.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists()
    ours = _skeleton()
    lorafuse.load_checkpoint(ours, folder)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)
    # saving over it replaces the shards by one file; the other files stay
    (folder / "notes.txt").write_text("kept")
    lorafuse.save_checkpoint(ours, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "notes.txt",
    ]


def test_a_dense_checkpoint_quantizes_while_it_loads(tmp_path):
    folder = _dense_folder(tmp_path, seed=2)
    reference = lorafuse.quantize_model(
        transformers.LlamaForCausalLM.from_pretrained(folder), lorafuse.QuantConfig(blocksize=128)
    )
    ours = _skeleton()
    paths = lorafuse.load_checkpoint(ours, folder, quantize=lorafuse.QuantConfig(blocksize=128))
    assert len(paths) == 14 and type(ours.lm_head) is nn.Linear
    layer, ref = ours.model.layers[0].mlp.gate_proj, reference.model.layers[0].mlp.gate_proj
    assert layer.blocksize == 128 and torch.equal(layer.packed, ref.packed) and torch.equal(layer.absmax, ref.absmax)
    torch.testing.assert_close(_logits(ours), _logits(reference), rtol=0, atol=0)
    # without quantize: the dense model as saved, into a meta skeleton or a real model (copied in place)
    plain = lorafuse.load_checkpoint(_skeleton(), folder)
    assert plain == []
    # a weight NF4 cannot hold, named; nothing loaded
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    skeleton = _skeleton()
    with pytest.raises(ValueError, match='"model.layers.1.mlp.up_proj.weight": .*expected finite values, found nan'):
        lorafuse.load_checkpoint(skeleton, tmp_path / "nan", quantize=lorafuse.QuantConfig())
    assert skeleton.model.embed_tokens.weight.is_meta


def test_load_checkpoint_refuses_what_does_not_fit_and_leaves_the_model_as_it_was(tmp_path):
    folder, _ = _bnb_folder(tmp_path)
    # another shape
    with init_empty_weights():
        wider = transformers.LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=192))
    with pytest.raises(ValueError, match=r'"model.layers.0.mlp.gate_proj.weight" is \[128, 64\] in the checkpoint'):
        lorafuse.load_checkpoint(wider, folder)
    assert wider.model.embed_tokens.weight.is_meta and type(wider.model.layers[0].self_attn.q_proj) is nn.Linear
    # fewer layers: the checkpoint's extra tensors are named; strict=False loads the rest
    with init_empty_weights():
        shallow = transformers.LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1, **SHAPE))
    with pytest.raises(ValueError, match=r"tensor\(s\) that the model has no place for: .*model.layers.1."):
        lorafuse.load_checkpoint(shallow, folder)
    assert shallow.model.embed_tokens.weight.is_meta
    assert len(lorafuse.load_checkpoint(shallow, folder, strict=False)) == 7
    # more layers: what is missing is named, and strict=False still refuses to leave meta tensors
    with init_empty_weights():
        deep = transformers.LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3, **SHAPE))
    with pytest.raises(ValueError, match=r"lacks .* tensor\(s\) of the model: .*model.layers.2."):
        lorafuse.load_checkpoint(deep, folder)
    with pytest.raises(ValueError, match="on the meta device"):
        lorafuse.load_checkpoint(deep, folder, strict=False)
    # a model already in 4 bits (on the meta device) whose one 4-bit layer the checkpoint lacks: strict=False names
    # that layer's tensors rather than leave them without values
    reader = _C._CheckpointReader(str(folder))
    lacking = [(n, reader.read(n)) for n in reader.names() if not n.startswith("model.layers.0.mlp.up_proj.")]
    _C._write_checkpoint(str(tmp_path / "lacking"), reader.config_json, lacking)
    skeleton = lorafuse.quantize_model(_skeleton())
    with pytest.raises(ValueError, match=r"lacks .* tensor\(s\) of the model: \"model.layers.0.mlp.up_proj.weight\""):
        lorafuse.load_checkpoint(skeleton, tmp_path / "lacking")
    with pytest.raises(ValueError, match=r"on the meta device \(no values at all\): \"model.layers.0.mlp.up_proj."):
        lorafuse.load_checkpoint(skeleton, tmp_path / "lacking", strict=False)
    # a 4-bit weight where the model has no Linear layer
    q = lorafuse.quantize_nf4(torch.ones(64))
    _C._write_checkpoint(
        str(tmp_path / "odd"), "{}", _C._nf4_checkpoint_tensors("model.norm.weight", *q, 64, [64], torch.float32)
    )
    with pytest.raises(ValueError, match='stores "model.norm.weight" in 4 bits, but the model\'s "model.norm" is a '
                       "LlamaRMSNorm, not a Linear layer"):
        lorafuse.load_checkpoint(_skeleton(), tmp_path / "odd")
    # a LoRA model: load the base first
    model = _skeleton()
    lorafuse.load_checkpoint(model, folder)
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="the model has LoRA layers .* load it before inject_lora"):
        lorafuse.load_checkpoint(model, folder)
    with pytest.raises(ValueError, match="the model has LoRA layers .* save_adapter"):
        lorafuse.save_checkpoint(model, tmp_path / "lora")
    with pytest.raises(TypeError, match="config: expected a dict"):
        lorafuse.save_checkpoint(_skeleton(), tmp_path / "x", config="{}")
    with pytest.raises(ValueError, match="is on the meta device"):
        lorafuse.save_checkpoint(_skeleton(), tmp_path / "x")
    with pytest.raises(ValueError, match="has neither model.safetensors nor model.safetensors.index.json"):
        lorafuse.load_checkpoint(_skeleton(), tmp_path)


def test_a_checkpoint_whose_quant_state_disagrees_is_refused_with_the_tensor_named(tmp_path):
    folder, _ = _bnb_folder(tmp_path)
    tensors, metadata = _C._read_safetensors(str(folder / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.weight.quant_state.bitsandbytes__nf4"
    broken = []
    for n, t in tensors:
        if n == name:
            state = json.loads(bytes(t.tolist()))
            state["blocksize"] = 128
            t = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
        broken.append((n, t))
    _C._write_safetensors(str(folder / "model.safetensors"), broken, metadata)
    model = _skeleton()
    with pytest.raises(ValueError, match=r'"model.layers.0.self_attn.o_proj.weight.absmax" has shape \[64\]'):
        lorafuse.load_checkpoint(model, folder)
    assert model.model.embed_tokens.weight.is_meta
    with pytest.raises(ValueError, match="bnb_4bit_quant_type: lorafuse has NF4 kernels only"):
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
        (folder / "config.json").write_text(json.dumps(config))
        lorafuse.load_checkpoint(model, folder)


def test_tied_embeddings_load_and_save_under_either_name(tmp_path):
    """A model whose lm_head shares the input embeddings (tie_word_embeddings, as SmolLM2): transformers saves the
    weight once; a skeleton made under init_empty_weights is tied before loading, and a file holding both names
    loads too."""
    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=True, **SHAPE)
    dense = transformers.LlamaForCausalLM(config)
    dense.save_pretrained(tmp_path / "dense")
    with init_empty_weights():
        ours = transformers.LlamaForCausalLM(config)
    lorafuse.load_checkpoint(ours, tmp_path / "dense", quantize=lorafuse.QuantConfig())
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and not ours.lm_head.weight.is_meta
    expected = _logits(lorafuse.quantize_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense")))
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=0)
    lorafuse.save_checkpoint(ours, tmp_path / "nf4")
    names = _C._CheckpointReader(str(tmp_path / "nf4")).names()
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # once, as transformers saves it
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    torch.testing.assert_close(_logits(theirs), expected, rtol=0, atol=0)
    # both names in the file (some writers keep both): loads, neither is "unexpected"
    tensors = [(n, t) for n, t in dense.state_dict().items()]
    assert any(n == "lm_head.weight" for n, _ in tensors)
    _C._write_checkpoint(str(tmp_path / "both"), dense.config.to_json_string(), [(n, t.contiguous()) for n, t in tensors])
    with init_empty_weights():
        again = transformers.LlamaForCausalLM(config)
    lorafuse.load_checkpoint(again, tmp_path / "both")
    torch.testing.assert_close(_logits(again), _logits(dense), rtol=0, atol=0)
