// CPU helpers for the LoRA branch's dropout. The mask comes from cuda/shared/philox.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace lorafuse::cpu {

// The mask words of elements e0 .. e0 + n - 1 (element e keeps when its word >= philox::keep_threshold(p)), as
// philox::keep draws them, a whole range at once (AVX2: 8 Philox blocks per step; LORAFUSE_PHILOX_SCALAR=1 or a CPU
// without AVX2: one at a time). Written into `buffer`; returns where element e0's word is.
const uint32_t* mask_words(uint64_t seed, uint64_t offset, uint64_t e0, int64_t n, std::vector<uint32_t>& buffer);

// A fresh seed from torch's default CPU generator (so torch.manual_seed makes runs reproducible).
uint64_t draw_seed();

// [T, in] contiguous tensor of dtype `dtype`: x2 * mask / (1 - p) when p > 0, else x2 cast. x2 may have
// any strides.
at::Tensor dropout_cast(const at::Tensor& x2, at::ScalarType dtype, uint64_t seed, uint64_t offset, double p);

// dropout_cast(x2, ...) and dropout_mask_(t, ...) with the same (seed, offset, p) in one pass over the mask (each row's
// words drawn once for both); t contiguous with x2's shape.
at::Tensor dropout_cast_and_mask_(const at::Tensor& x2, at::ScalarType dtype, at::Tensor& t, uint64_t seed,
                                  uint64_t offset, double p);

// t *= mask / (1 - p), in place (dropped elements become exact zeros); t contiguous [T, in].
void dropout_mask_(at::Tensor& t, uint64_t seed, uint64_t offset, double p);

// dropout(x2) in the accumulation dtype; x2 itself when that is already the same thing.
inline at::Tensor lora_input(const at::Tensor& x2, at::ScalarType acc, uint64_t seed, uint64_t offset, double p) {
  if (p == 0.0 && x2.scalar_type() == acc) return x2;
  return dropout_cast(x2, acc, seed, offset, p);
}

// The forward's rng_state [2] int64 (seed, offset 0) on x's device, with a fresh seed when p > 0; `seed` set.
at::Tensor forward_rng_state(const at::Tensor& x, double p, uint64_t& seed);

}  // namespace lorafuse::cpu
