"""Adapter folders for the adapter-file tests: made with lorafuse or with PEFT, then read, edited and
corrupted; and snapshots of a model, to check that a failed load left it as it was."""

import json
import os
import shutil

import torch

import lorafuse
from hf_models import logits, tiny_llama, tiny_llama_config

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
DELETE = object()  # edit_config(dir, field=DELETE) removes the field

# The tiny Llama's adapted modules in a q_proj/v_proj adapter, in module order.
Q0, V0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
Q1, V1 = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
QV = [Q0, V0, Q1, V1]


def tensor_name(module: str, which: str) -> str:
    """PEFT's name of lora_A / lora_B ("A" / "B") of ``module``."""
    return f"{PREFIX}{module}.lora_{which}.weight"


def biased_llama(seed: int = 0):
    """tiny_llama with biases in q_proj, k_proj, v_proj and o_proj."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(attention_bias=True)).eval()


def randomize(model, adapter_name: str, seed: int) -> None:
    """Random A and B (a trained adapter's look: B not zero) for every layer of ``adapter_name``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorafuse.lora_layers(model):
            if adapter_name in layer.adapters:
                for w in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def lorafuse_adapter(dir, r=4, targets=("q_proj", "v_proj"), seed=1, lora_alpha=8, **fields):
    """Saves a lorafuse adapter of ``tiny_llama(0)`` (random weights from ``seed``) to ``dir``; returns the
    model that has it."""
    model = tiny_llama(0)
    config = lorafuse.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(targets), **fields)
    lorafuse.inject_lora(model, config)
    randomize(model, "default", seed)
    lorafuse.save_adapter(model, str(dir))
    return model


def peft_adapter(dir, r=4, targets=("q_proj", "v_proj"), seed=1, lora_alpha=8, **fields):
    """Saves a PEFT adapter of ``tiny_llama(0)`` (random weights from ``seed``) to ``dir`` with
    ``save_pretrained``; returns the PEFT model."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=list(targets), init_lora_weights=False, **fields
    )
    model = peft.get_peft_model(tiny_llama(0), config).eval()
    model.save_pretrained(str(dir))
    return model


def copy_folder(src, dst) -> str:
    shutil.copytree(str(src), str(dst))
    return str(dst)


def read_config(dir) -> dict:
    with open(os.path.join(str(dir), CONFIG)) as f:
        return json.load(f)


def write_config(dir, config) -> None:
    with open(os.path.join(str(dir), CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def edit_config(dir, **fields) -> dict:
    """Sets (or, with DELETE, removes) fields of the folder's adapter_config.json; returns the new config."""
    config = read_config(dir)
    for key, value in fields.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    write_config(dir, config)
    return config


def read_tensors(dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(str(dir), WEIGHTS))


def write_tensors(dir, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, os.path.join(str(dir), WEIGHTS), {"format": "pt"}
    )


def rewrite_tensors(dir, edit) -> dict:
    """``edit(tensors)`` changes the dict of the folder's tensors in place; the file is then written again.
    Returns the tensors written."""
    tensors = read_tensors(dir)
    edit(tensors)
    write_tensors(dir, tensors)
    return tensors


def weights_path(dir) -> str:
    return os.path.join(str(dir), WEIGHTS)


def snapshot(model) -> dict:
    """What a failed load must not change: adapters, the active one, the module tree, every parameter
    (values and requires_grad) and the logits."""
    return dict(
        adapters=lorafuse.adapter_names(model),
        active=lorafuse.active_adapter(model),
        modules=[(name, type(m).__name__) for name, m in model.named_modules()],
        params={name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
        logits=logits(model),
    )


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, grad) in before["params"].items():
        now, now_grad = after["params"][name]
        assert now_grad == grad, name
        assert torch.equal(now, value), name
    assert torch.equal(after["logits"], before["logits"])
