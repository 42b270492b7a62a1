// The prefill shrink's inner loop, shared by lora_linear's shrink (lora_shrink_kernel) and the segmented
// multi-adapter shrink (multi_shrink_kernel). No torch headers; device code, also run by the CPU emulator.
#pragma once

#include <cstdint>

#include "cuda/common/device_utils.cuh"
#include "cuda/common/dropout.cuh"

namespace lorafuse::cuda {

constexpr int kShrinkChunk = 128;  // columns of x (and A) per shared-memory stage

// Resolves the dropout's (seed, offset) when it is on; `writer` (one thread of one block per launch) records them
// in rng_out for the backward.
__device__ __forceinline__ void dropout_rng(const DropoutParams& d, bool writer, uint64_t& seed, uint64_t& offset) {
  if (!d.enabled) return;
  resolve_rng(d, seed, offset);
  if (d.rng_out != nullptr && writer) {
    d.rng_out[0] = static_cast<int64_t>(seed);
    d.rng_out[1] = static_cast<int64_t>(offset);
  }
}

// acc[i][rr] = Σ_k drop(x)[row_of(i), k]·A[r0 + rr, k] for the TPW rows of this warp (row_of(i) < 0: no row), with
// each lane taking every 32nd column of a kShrinkChunk-wide chunk; the chunk of A's rank rows [r0, r0 + rc) is staged
// in a_s by the whole block. Every thread of the block must call it (it has barriers); the caller sums acc over the
// warp's lanes.
template <typename Tx, typename Ta, int R, int TPW, typename RowOf>
__device__ __forceinline__ void shrink_accumulate(const Tx* x, int64_t ldx, int64_t in, const Ta* a, int r0, int rc,
                                                  const DropoutParams& drop, uint64_t seed, uint64_t offset,
                                                  RowOf row_of, float (&a_s)[R][kShrinkChunk], float (&acc)[TPW][R]) {
  constexpr int kPerLane = kShrinkChunk / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < TPW; ++i)
#pragma unroll
    for (int j = 0; j < R; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < in; k0 += kShrinkChunk) {
    __syncthreads();  // the previous chunk's readers are done
    for (int i = threadIdx.x; i < R * kShrinkChunk; i += kThreads) {
      const int rr = i / kShrinkChunk, kk = i % kShrinkChunk;
      const int64_t k = k0 + kk;
      a_s[rr][kk] = (rr < rc && k < in) ? to_float(a[(r0 + rr) * in + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int kk = lane + 32 * j;
      const int64_t k = k0 + kk;
      if (k >= in) continue;
#pragma unroll
      for (int i = 0; i < TPW; ++i) {
        const int64_t t = row_of(i);
        if (t < 0) continue;
        const float xv = apply_dropout(drop, seed, offset, t, in, k, to_float(x[t * ldx + k]));
#pragma unroll
        for (int rr = 0; rr < R; ++rr) acc[i][rr] += xv * a_s[rr][kk];
      }
    }
  }
}

}  // namespace lorafuse::cuda
