"""The C++ reference models, bound from C++ (torch.nn.Module wrappers of lorafuse::models::*).

``Llama(LlamaConfig(...))`` is a Llama decoder with Hugging Face's module paths
(``model.layers.N.self_attn.q_proj`` ... ``lm_head``); ``LlamaConfig(..., device=torch.device("meta"))``
builds a skeleton of any size without memory. :func:`lorafuse.inject_lora` and the other model-wide
functions run their C++ implementation on it.
"""

from . import _C

LlamaConfig = _C.LlamaConfig
Llama = _C.Llama
Llama.__module__ = __name__

__all__ = ["Llama", "LlamaConfig"]
