// The tiny reference Llama the adapter tests share: fixed weights for a seed, in eval mode.
#pragma once

#include <ATen/ATen.h>
#include <lorafuse/models/llama.h>

#include <cstdint>

namespace lorafuse_test {

inline lorafuse::models::LlamaForCausalLM tiny_llama(uint64_t seed = 0) {
  at::manual_seed(seed);
  lorafuse::models::LlamaForCausalLM model(
      lorafuse::models::LlamaConfig().vocab_size(64).hidden_size(32).intermediate_size(48));
  model->eval();
  return model;
}

}  // namespace lorafuse_test
