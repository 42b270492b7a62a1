"""Small Hugging Face transformers Llama models for the tests, built from configs (nothing downloaded)."""

import torch

# [2, 6] token ids for every forward in the tests
IDS = torch.arange(12).remainder(64).reshape(2, 6)


# The tiny Llama's shape: the field names are the same in transformers.LlamaConfig and
# lorafuse.models.LlamaConfig, so both models of the tests are built from it.
TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama_config(**kw):
    import transformers  # here, so that tests without transformers can still use TINY_LLAMA

    return transformers.LlamaConfig(**{**TINY_LLAMA, **kw})


def tiny_llama(seed: int = 0):
    """A 2-layer transformers Llama (hidden 32, 4 heads, 2 kv heads) in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config()).eval()


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
