// Launch plans of the multi-adapter kernels over raw pointers (no torch headers), through a Launcher as in
// lora_linear_launch.cuh: the CUDA one in lora_multi_cuda.cu, the CPU emulation in the tests.
#pragma once

#include <vector_types.h>

#include <cstdint>

#include "cuda/common/static_switch.h"
#include "cuda/lora_multi/lora_multi_kernel.cuh"

namespace lorafuse::cuda {

// What the host knows of a batch's adapters without reading device memory: a bound of the sorted rows (order's length),
// the number of adapters, their largest rank and which rank tiles (16, 32, 64) occur among rank tiles r0 = 0, 64, ...
struct MultiPlan {
  int64_t sorted_rows = 0, num_adapters = 0, max_rank = 0;
  // tiles[q] bit b: some adapter's ranks [64q, 64q + 64) need tile 16 << b
  uint32_t tiles[64] = {};  // ranks up to 4096
};

inline int tile_bit(int tile) { return tile == 16 ? 0 : (tile == 32 ? 1 : 2); }

inline MultiPlan plan_multi(int64_t sorted_rows, const int64_t* ranks, int64_t num_adapters) {
  MultiPlan plan;
  plan.sorted_rows = sorted_rows;
  plan.num_adapters = num_adapters;
  for (int64_t i = 0; i < num_adapters; ++i) {
    plan.max_rank = ranks[i] > plan.max_rank ? ranks[i] : plan.max_rank;
    for (int64_t r0 = 0, q = 0; r0 < ranks[i] && q < 64; r0 += 64, ++q) {
      const int64_t rc = ranks[i] - r0 < 64 ? ranks[i] - r0 : 64;
      plan.tiles[q] |= 1u << tile_bit(rank_tile_of(rc));
    }
  }
  return plan;
}

// Upper bound of the segment tiles of tile size `tile`: Σᵢ ceil(nᵢ / tile) ≤ T' / tile + adapters.
inline unsigned segment_blocks(const MultiPlan& plan, int64_t tile) {
  return static_cast<unsigned>(ceil_div<int64_t>(plan.sorted_rows, tile) + plan.num_adapters);
}

// u = drop(x[order])·Aᵢᵀ for every segment: one launch per (rank tile r0, tile size present there). p carries all
// but r0; p.drop.rng_out is kept for the first launch only (block 0 records the dropout's (seed, offset) there).
template <typename Tx, typename Ta, typename Launcher>
void run_multi_shrink(const Launcher& launch, MultiShrinkParams p, const MultiPlan& plan) {
  if (plan.sorted_rows == 0 || p.in == 0) return;
  for (int64_t r0 = 0, q = 0; r0 < plan.max_rank; r0 += 64, ++q) {
    p.r0 = static_cast<int>(r0);
    for (int bit = 0; bit < 3; ++bit) {
      if ((plan.tiles[q] & (1u << bit)) == 0) continue;
      LORAFUSE_RANK_TILE_SWITCH(16 << bit, R, [&] {
        constexpr int TPW = 64 / R;  // TPW·R = 64 accumulators per lane
        launch(multi_shrink_kernel<Tx, Ta, R, TPW>, dim3(segment_blocks(plan, (kThreads / 32) * TPW)), kThreads, 0, p);
      });
      p.drop.rng_out = nullptr;
    }
  }
}

// y[order[j]] += scaleᵢ·u[j]·Bᵢᵀ in y's dtype.
// plan.sorted_rows = 0 (no rows, or x without columns: u was never written) launches nothing.
template <typename Ty, typename Tb, typename Launcher>
void run_multi_expand(const Launcher& launch, const MultiExpandParams& p, const MultiPlan& plan) {
  if (plan.sorted_rows == 0 || p.out == 0) return;
  launch(multi_expand_kernel<Ty, Tb>,
         dim3(segment_blocks(plan, kMultiExpandRows), static_cast<unsigned>(ceil_div<int64_t>(p.out, kThreads))),
         kThreads, 0, p);
}

// Per token: u[t] = x[t]·Aᵢᵀ, then y[t] += scaleᵢ·u[t]·Bᵢᵀ (rows of no adapter untouched).
template <typename Tx, typename Ta, typename Ty, typename Launcher>
void run_token(const Launcher& launch, const TokenParams& p, int64_t tokens, int64_t max_rank) {
  if (tokens == 0 || max_rank == 0) return;
  launch(token_shrink_kernel<Tx, Ta>, dim3(static_cast<unsigned>(tokens), static_cast<unsigned>(max_rank)), kThreads, 0,
         p);
  if (p.out == 0) return;
  launch(token_expand_kernel<Ty, Ta>,
         dim3(static_cast<unsigned>(tokens), static_cast<unsigned>(ceil_div<int64_t>(p.out, kThreads))), kThreads, 0,
         p);
}

// rows ⊙= the forward's dropout mask of their batch rows.
template <typename Launcher>
void run_rows_dropout(const Launcher& launch, const RowsDropoutParams& p) {
  if (p.n == 0 || p.in == 0 || !p.drop.enabled) return;
  launch(rows_dropout_kernel, dim3(static_cast<unsigned>(ceil_div<int64_t>(p.n * p.in, kThreads))), kThreads, 0, p);
}

}  // namespace lorafuse::cuda
