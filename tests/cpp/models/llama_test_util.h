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

}  // namespace lorafuse_test
