// A tiny reference Llama for the model-level C++ tests (injection, QLoRA).
#pragma once

#include <ATen/ATen.h>
#include <lorafuse/models/llama.h>

#include <cstdint>

namespace lorafuse_test {

// Two decoder layers, 4 heads over 2 key/value heads, vocabulary 50; seeded.
inline lorafuse::models::Llama tiny_llama(uint64_t seed = 0, int64_t hidden_size = 32, int64_t intermediate_size = 48) {
  at::manual_seed(seed);
  return lorafuse::models::Llama(lorafuse::models::LlamaConfig()
                                     .vocab_size(50)
                                     .hidden_size(hidden_size)
                                     .intermediate_size(intermediate_size)
                                     .num_hidden_layers(2)
                                     .num_attention_heads(4)
                                     .num_key_value_heads(2));
}

// The tiny Llama with every layer's in_features a multiple of the NF4 block (64): for the 4-bit tests.
inline lorafuse::models::Llama tiny_llama_nf4(uint64_t seed = 0) { return tiny_llama(seed, 64, 128); }

// Token ids [2, 8] within the tiny Llama's vocabulary.
inline at::Tensor llama_ids() { return at::arange(16, at::kLong).mul(7).remainder(50).reshape({2, 8}); }

}  // namespace lorafuse_test
