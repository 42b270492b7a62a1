// Launch plans of the lora_linear kernels: grid shapes, token splits and rank tiles, over raw pointers.
// No torch headers. The launches go through a Launcher, any callable
//   launch(kernel, dim3 grid, unsigned threads, size_t dynamic_smem_bytes, const Params& params)
// — the CUDA one in lora_linear_cuda.cu, and a CPU emulation of blocks and threads in the tests, so this
// very code (kernels and plans) is exercised on machines without a GPU too.
#pragma once

#include <vector_types.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common/static_switch.h"
#include "cuda/lora_linear/lora_linear_kernel.cuh"

namespace lorafuse::cuda {

constexpr int64_t kDecodeTokens = 16;  // T ≤ this takes the decode shrink
constexpr int kMaxRankTile = 64;

// Work split of the two backward passes; the caller allocates the partial buffers from it.
struct BackwardPlan {
  int64_t out_col_tiles, out_splits, out_tokens_per_split;  // pass over dY
  int64_t x_col_tiles, x_splits, x_tokens_per_split;        // pass over x
};

// Token splits: enough blocks to fill the GPU (~4 per SM), each split a whole number of token tiles.
inline void plan_splits(int64_t tokens, int64_t col_tiles, int64_t tile, int sm_count, int64_t& splits,
                        int64_t& tokens_per_split) {
  const int64_t cols = std::max<int64_t>(col_tiles, 1);
  const int64_t want = std::max<int64_t>(1, (4 * static_cast<int64_t>(sm_count) + cols - 1) / cols);
  const int64_t tiles = std::max<int64_t>(1, ceil_div<int64_t>(tokens, tile));
  const int64_t n = std::min<int64_t>(std::min<int64_t>(want, tiles), 256);
  tokens_per_split = ceil_div<int64_t>(tiles, n) * tile;
  splits = std::max<int64_t>(1, ceil_div<int64_t>(tokens, tokens_per_split));
}

inline BackwardPlan plan_backward(int64_t tokens, int64_t in, int64_t out, int sm_count) {
  BackwardPlan plan{};
  plan.out_col_tiles = ceil_div<int64_t>(out, kGradOutCols);
  plan_splits(tokens, plan.out_col_tiles, kGradOutTokens, sm_count, plan.out_splits, plan.out_tokens_per_split);
  plan.x_col_tiles = ceil_div<int64_t>(in, kGradXCols);
  plan_splits(tokens, plan.x_col_tiles, kGradXTokens, sm_count, plan.x_splits, plan.x_tokens_per_split);
  return plan;
}

inline int rank_chunk(int64_t r, int64_t r0) { return static_cast<int>(std::min<int64_t>(kMaxRankTile, r - r0)); }

// u = drop(x)·Aᵀ. p carries everything but the rank tile (r0, rc).
template <typename Tx, typename Ta, typename Launcher>
void run_shrink(const Launcher& launch, ShrinkParams p) {
  if (p.tokens == 0 || p.r == 0) return;
  if (p.tokens <= kDecodeTokens) {
    p.r0 = 0;
    p.rc = static_cast<int>(p.r);
    launch(lora_shrink_decode_kernel<Tx, Ta, kDecodeTokens>, dim3(static_cast<unsigned>(p.r)), kThreads, 0, p);
    return;
  }
  for (int64_t r0 = 0; r0 < p.r; r0 += kMaxRankTile) {
    p.r0 = static_cast<int>(r0);
    p.rc = rank_chunk(p.r, r0);
    LORAFUSE_RANK_TILE_SWITCH(p.rc, R, [&] {
      constexpr int TPW = 64 / R;  // TPW·R = 64 accumulators per lane
      const int64_t tokens_per_block = (kThreads / 32) * TPW;
      launch(lora_shrink_kernel<Tx, Ta, R, TPW>, dim3(static_cast<unsigned>(ceil_div<int64_t>(p.tokens, tokens_per_block))),
             kThreads, 0, p);
    });
  }
}

// y = bias + scale·u·Bᵀ in y's dtype.
template <typename Tx, typename Ta, typename Launcher>
void run_expand(const Launcher& launch, const ExpandParams& p) {
  if (p.tokens == 0 || p.out == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.tokens, kExpandTokens)),
                  static_cast<unsigned>(ceil_div<int64_t>(p.out, kThreads)));
  launch(lora_expand_kernel<Tx, Ta>, grid, kThreads, 0, p);
}

// out[i] = alpha·Σ_s part[s·n + i].
template <typename To, typename Launcher>
void run_reduce(const Launcher& launch, const float* part, int64_t splits, int64_t n, float alpha, To* out) {
  if (n == 0) return;
  launch(reduce_splits_kernel<To>, dim3(static_cast<unsigned>(ceil_div<int64_t>(n, kThreads))), kThreads, 0,
         ReduceParams<To>{part, splits, n, alpha, out});
}

// The pass over dY: partials of v, dB, dbias (whichever pointers are set). p carries all but the tile fields.
template <typename Tx, typename Ta, typename Launcher>
void run_grad_out(const Launcher& launch, GradOutParams p, const BackwardPlan& plan) {
  if (p.tokens == 0 || plan.out_col_tiles == 0) return;
  p.tokens_per_split = plan.out_tokens_per_split;
  float* bias_part = p.bias_part;
  for (int64_t r0 = 0; r0 < p.r; r0 += kMaxRankTile) {
    p.r0 = static_cast<int>(r0);
    p.rc = rank_chunk(p.r, r0);
    p.bias_part = r0 == 0 ? bias_part : nullptr;  // dbias once, with the first rank tile
    LORAFUSE_RANK_TILE_SWITCH(p.rc, R, [&] {
      launch(lora_grad_out_kernel<Tx, Ta, R>,
             dim3(static_cast<unsigned>(plan.out_col_tiles), static_cast<unsigned>(plan.out_splits)), kThreads,
             grad_out_smem_bytes<R>(), p);
    });
  }
}

// The pass over x: the LoRA part of dX and partials of dA (whichever pointers are set).
template <typename Tx, typename Ta, typename Launcher>
void run_grad_x(const Launcher& launch, GradXParams p, const BackwardPlan& plan) {
  if (p.tokens == 0 || plan.x_col_tiles == 0) return;
  p.tokens_per_split = plan.x_tokens_per_split;
  for (int64_t r0 = 0; r0 < p.r; r0 += kMaxRankTile) {
    p.r0 = static_cast<int>(r0);
    p.rc = rank_chunk(p.r, r0);
    p.accumulate_dx = r0 > 0;
    LORAFUSE_RANK_TILE_SWITCH(p.rc, R, [&] {
      launch(lora_grad_x_kernel<Tx, Ta, R>,
             dim3(static_cast<unsigned>(plan.x_col_tiles), static_cast<unsigned>(plan.x_splits)), kThreads, 0, p);
    });
  }
}

}  // namespace lorafuse::cuda
