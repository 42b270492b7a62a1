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

// t *= mask / (1 - p), in place (dropped elements become exact zeros); t contiguous [T, in]. With `rows`, row j of t
// takes the mask of row rows[j] of the batch (the rows of one adapter, gathered by lora_multi_add); else its own.
void dropout_mask_(at::Tensor& t, uint64_t seed, uint64_t offset, double p, const int64_t* rows = nullptr);

// u = dropout(x2)·aᵀ ([T, r], a's dtype: the accumulation dtype), where dropout(x2) = x2 ⊙ keep / (1 - p) in that
// dtype (element e of x2 kept when its mask_words word >= philox::keep_threshold(p); x2 cast when p = 0), without a
// [T, in] copy of it: tiles of rows are cast and masked into a per-thread buffer (in the L2 cache) and multiplied
// there. The LoRA branch's shrink of lora_linear, lora_add and nf4_lora_linear.
at::Tensor lora_shrink(const at::Tensor& x2, const at::Tensor& a, uint64_t seed, uint64_t offset, double p);

// The shrink's backward for A: vᵀ·dropout(x2) ([r, in], v's dtype), by the same tiles (per-thread partial sums added
// at the end); when `masked` is given and p > 0, masked *= mask / (1 - p) too (dX's LoRA term), from the same words.
at::Tensor lora_shrink_backward(const at::Tensor& x2, const at::Tensor& v, uint64_t seed, uint64_t offset, double p,
                                at::Tensor* masked);

// The forward's rng_state [2] int64 (seed, offset 0) on x's device, with a fresh seed when p > 0; `seed` set.
at::Tensor forward_rng_state(const at::Tensor& x, double p, uint64_t& seed);

}  // namespace lorafuse::cpu
