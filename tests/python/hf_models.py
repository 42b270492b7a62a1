"""Small Hugging Face transformers Llama models for the tests, built from configs (nothing downloaded)."""

import torch
import transformers

# [2, 6] token ids for every forward in the tests
IDS = torch.arange(12).remainder(64).reshape(2, 6)


def tiny_llama_config(**kw) -> transformers.LlamaConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    fields.update(kw)
    return transformers.LlamaConfig(**fields)


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, 4 heads, 2 kv heads) in eval mode."""
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config()).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits
