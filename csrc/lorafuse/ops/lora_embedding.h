// lorafuse — the C++ API of lora_embedding (csrc/ops/lora_embedding.cpp): the LoRA branch of an embedding layer, as
// PEFT computes it (lora_embedding_A [r, num_embeddings], lora_embedding_B [embedding_dim, r]).
#pragma once

#include <ATen/core/Tensor.h>

namespace lorafuse {

/// y = base_out + scale · embedding(indices, Aᵀ) · Bᵀ
///
/// base_out [..., dim]: the embedding layer's output for `indices` (any integer shape [...]); lora_a [r, num];
/// lora_b [dim, r]. The sum is formed in the wider of base_out's and the adapter's dtypes and rounded once to
/// base_out's. padding_idx (−1: none), scale_grad_by_freq and sparse act on A's gradient as the base embedding's do.
/// Differentiable in base_out, lora_a and lora_b.
at::Tensor lora_embedding(const at::Tensor& base_out, const at::Tensor& indices, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, double scale, int64_t padding_idx = -1,
                          bool scale_grad_by_freq = false, bool sparse = false);

}  // namespace lorafuse
