"""Tiny models of the transformers families that PEFT users adapt most, built from configs (nothing downloaded), with
an input for each: the side-by-side tests with the real peft run over them."""

from typing import Callable, Dict

import torch

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64)


def _families() -> Dict[str, Callable[[], torch.nn.Module]]:
    import transformers as T

    def make(config_cls, model_cls, **kw):
        return lambda: model_cls(config_cls(**kw)).eval()

    kv = dict(num_key_value_heads=2)
    return {
        "gpt2": make(
            T.GPT2Config, T.GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
            bos_token_id=0, eos_token_id=0,
        ),
        "bert": make(T.BertConfig, T.BertForMaskedLM, **_SMALL, max_position_embeddings=32),
        "roberta": make(T.RobertaConfig, T.RobertaForMaskedLM, **_SMALL, max_position_embeddings=40),
        "deberta-v2": make(T.DebertaV2Config, T.DebertaV2ForMaskedLM, **_SMALL, max_position_embeddings=32),
        "t5": make(
            T.T5Config, T.T5ForConditionalGeneration, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            vocab_size=64, decoder_start_token_id=0,
        ),
        "llama": make(T.LlamaConfig, T.LlamaForCausalLM, **_SMALL, **kv),
        "mistral": make(T.MistralConfig, T.MistralForCausalLM, **_SMALL, **kv),
        "qwen2": make(T.Qwen2Config, T.Qwen2ForCausalLM, **_SMALL, **kv),
        "gemma": make(T.GemmaConfig, T.GemmaForCausalLM, **_SMALL, **kv, head_dim=8),
        "phi3": make(T.Phi3Config, T.Phi3ForCausalLM, **_SMALL, **kv, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        "opt": make(
            T.OPTConfig, T.OPTForCausalLM, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
            vocab_size=64, word_embed_proj_dim=32, max_position_embeddings=32,
        ),
        "falcon": make(T.FalconConfig, T.FalconForCausalLM, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=64),
        "gpt_neox": make(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, **_SMALL),
        "vit": make(T.ViTConfig, T.ViTModel, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=48, image_size=8, patch_size=4),
        "whisper": make(
            T.WhisperConfig, T.WhisperForConditionalGeneration, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
            vocab_size=64, num_mel_bins=8, max_source_positions=8, max_target_positions=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        ),
    }


FAMILIES = [
    "gpt2", "bert", "roberta", "deberta-v2", "t5", "llama", "mistral", "qwen2", "gemma", "phi3", "opt", "falcon",
    "gpt_neox", "vit", "whisper",
]  # fmt: skip


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny model of ``family`` (eval mode), the same weights for the same seed."""
    torch.manual_seed(seed)
    return _families()[family]()


def inputs(family: str) -> dict:
    """The keyword arguments of one forward of ``family``'s tiny model (batch 2)."""
    ids = torch.arange(12).remainder(60).reshape(2, 6) + 2
    g = torch.Generator().manual_seed(0)
    if family == "t5":
        return dict(input_ids=ids, decoder_input_ids=ids)
    if family == "vit":
        return dict(pixel_values=torch.randn(2, 3, 8, 8, generator=g))
    if family == "whisper":
        return dict(input_features=torch.randn(2, 8, 16, generator=g), decoder_input_ids=ids)
    return dict(input_ids=ids)


def output(model: torch.nn.Module, family: str) -> torch.Tensor:
    """The model's main output (logits, or the last hidden state) for :func:`inputs`."""
    out = model(**inputs(family))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---- side by side with the real peft ----------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def peft_model(base: torch.nn.Module, **config) -> torch.nn.Module:
    """peft.get_peft_model(base, peft.LoraConfig(**config)), its warnings silenced."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**config))


def assert_close(a, b, **kw) -> None:
    """torch.testing.assert_close with the side-by-side tests' float32 tolerances unless given."""
    torch.testing.assert_close(a, b, **({"rtol": 1e-5, "atol": 2e-6} | kw))


def sgd_step_side_by_side(theirs, ours, output) -> tuple:
    """PEFT's model and lorafuse's with the same trainable parameters (names checked equal, PEFT's values copied into
    lorafuse's), one SGD step (lr 0.1) on mean(output(model)²) each: ((PEFT's gradients, lorafuse's), (PEFT's output
    after the step, lorafuse's)). A gradient is None where the output does not use the parameter."""
    peft_params = {n[len(PEFT_PREFIX) :]: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(peft_params) == sorted(our_params)
    with torch.no_grad():
        for name, p in our_params.items():
            p.copy_(peft_params[name])
    grads, after = [], []
    for model, params in ((theirs, peft_params), (ours, our_params)):
        opt = torch.optim.SGD(params.values(), lr=0.1)
        (output(model).float() ** 2).mean().backward()
        grads.append({n: p.grad for n, p in params.items()})
        opt.step()
        with torch.no_grad():
            after.append(output(model))
    return tuple(grads), tuple(after)


def assert_same_grads(theirs: dict, ours: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    for name in theirs:
        if theirs[name] is None:
            assert ours[name] is None, name
        else:
            torch.testing.assert_close(ours[name], theirs[name], rtol=rtol, atol=atol, msg=name)
