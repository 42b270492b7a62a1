// The LoRA branch's dropout on the device: its parameters and the mask of one element, from the same Philox
// function (cuda/shared/philox.h) the CPU kernels use. No torch headers; shared by every kernel family that masks x.
#pragma once

#include <cstdint>

#include "cuda/shared/philox.h"

namespace lorafuse::cuda {

constexpr int kThreads = 256;  // block size of the LoRA kernels

// Dropout of the LoRA branch. The (seed, offset) pair comes from torch's CUDA generator: as values, or
// (under CUDA graph capture) as device pointers read when the kernel runs. The forward writes the pair it
// used to rng_out; the backward reads it from rng_in, so it regenerates exactly the forward's mask.
struct DropoutParams {
  bool enabled = false;
  uint32_t threshold = 0;  // keep an element when its Philox word >= threshold
  float inv_keep = 1.f;    // 1 / (1 - p)
  uint64_t seed = 0, offset = 0;
  const int64_t* seed_ptr = nullptr;    // captured: seed read from here
  const int64_t* offset_ptr = nullptr;  // captured: offset = *offset_ptr + offset_intragraph
  uint64_t offset_intragraph = 0;
  bool captured = false;
  int64_t* rng_out = nullptr;       // forward: where to record (seed, offset)
  const int64_t* rng_in = nullptr;  // backward: (seed, offset) recorded by the forward
};

__device__ __forceinline__ void resolve_rng(const DropoutParams& d, uint64_t& seed, uint64_t& offset) {
  if (d.rng_in != nullptr) {
    seed = static_cast<uint64_t>(d.rng_in[0]);
    offset = static_cast<uint64_t>(d.rng_in[1]);
  } else if (d.captured) {
    seed = static_cast<uint64_t>(*d.seed_ptr);
    offset = static_cast<uint64_t>(*d.offset_ptr) + d.offset_intragraph;
  } else {
    seed = d.seed;
    offset = d.offset;
  }
}

// Value of drop(x)[t, k] given x[t, k] as float.
__device__ __forceinline__ float apply_dropout(const DropoutParams& d, uint64_t seed, uint64_t offset, int64_t t,
                                               int64_t in, int64_t k, float xv) {
  if (!d.enabled) return xv;
  const uint64_t e = static_cast<uint64_t>(t) * static_cast<uint64_t>(in) + static_cast<uint64_t>(k);
  return philox::keep(seed, offset, e, d.threshold) ? xv * d.inv_keep : 0.f;
}

}  // namespace lorafuse::cuda
