// The many-adapters-in-one-batch kernels of lorafuse.lora_multi_add (segmented: SGMV) and lorafuse.lora_token_add
// (per token: BGMV): __global__ templates over raw pointers and params structs. No torch headers; the host wrapper
// (lora_multi_cuda.cu) checks, guards, picks the stream and launches; the CPU emulator runs the same code in tests.
//
//   y = base_out;  y[t] += scaleᵢ·(drop(x[t])·Aᵢᵀ)·Bᵢᵀ  for the adapter i of row t (none: y[t] stays base_out[t])
//
//   segmented  rows grouped by adapter (lorafuse.lora_segments: order [T'], offsets [n + 1]); a block owns a tile of
//              one adapter's rows, so it stages that adapter's A (shrink) once for all of them
//              u[j] = drop(x[order[j]])·Aᵢᵀ          multi_shrink_kernel   (fp32 u [T', ldu], row j of the sorted rows)
//              y[order[j]] += scaleᵢ·u[j]·Bᵢᵀ         multi_expand_kernel
//   per token  row_adapter [T] (decode: one token per sequence, no grouping): a block per (row, rank row) and per
//              (row, column tile)
//              u[t] = x[t]·Aᵢᵀ                       token_shrink_kernel
//              y[t] += scaleᵢ·u[t]·Bᵢᵀ                token_expand_kernel
//
// Adapters may differ in rank: each is a slot {A, B, r, scale}; a block computes only its own adapter's ranks
// (the segmented shrink keeps R = 16, 32 or 64 accumulators per lane, launched once per tile size, each block
// running only under the launch whose R is its rank's tile, so a rank-8 adapter costs 16 accumulators, not the
// largest adapter's 64). The delta is rounded to y's dtype before it is added, as the CPU kernel does.
#pragma once

#include <cstdint>

#include "cuda/common/device_utils.cuh"
#include "cuda/common/dropout.cuh"
#include "cuda/common/shrink_tile.cuh"

namespace lorafuse::cuda {

// One adapter of a batch: A [r, in] and B [out, r], contiguous, of the launch's adapter dtype.
struct AdapterSlot {
  const void* a;
  const void* b;
  int64_t r;
  float scale;
};

// The segment tiles of a launch: block b of grid.x works on tile (b - first tile of adapter i) of adapter i, where
// adapter i has ceil(nᵢ / tile) tiles (nᵢ = offsets[i + 1] - offsets[i]). Blocks past the last tile find none.
struct SegmentTile {
  int64_t adapter = -1;  // -1: no work
  int64_t row0 = 0;      // first sorted row of the tile
  int64_t rows = 0;      // rows in the tile (≤ tile)
};

__device__ __forceinline__ SegmentTile find_segment_tile(const int64_t* offsets, int64_t num_adapters, int64_t tile,
                                                         int64_t block) {
  SegmentTile st;
  int64_t first = 0;
  for (int64_t i = 0; i < num_adapters; ++i) {
    const int64_t n = offsets[i + 1] - offsets[i];
    const int64_t tiles = (n + tile - 1) / tile;
    if (block < first + tiles) {
      st.adapter = i;
      st.row0 = offsets[i] + (block - first) * tile;
      st.rows = n - (block - first) * tile < tile ? n - (block - first) * tile : tile;
      return st;
    }
    first += tiles;
  }
  return st;
}

// The rank tile (16, 32 or 64 accumulators) that holds rc ranks (1 ≤ rc ≤ 64).
__host__ __device__ constexpr int rank_tile_of(int64_t rc) { return rc <= 16 ? 16 : (rc <= 32 ? 32 : 64); }

// y += delta, the delta rounded to y's dtype first (as the CPU kernel's index_add of a rounded delta).
template <typename Ty>
__device__ __forceinline__ void add_rounded(Ty* y, float delta) {
  *y = from_float<Ty>(to_float(*y) + to_float(from_float<Ty>(delta)));
}

// ------------------------------------------------------------------------------------------------
// segmented shrink: u[j, r0 : r0 + rcᵢ] = drop(x[order[j]])·Aᵢ[r0 : r0 + rcᵢ]ᵀ for the sorted rows j of adapter i
struct MultiShrinkParams {
  const void* x;  // [T, in], row stride ldx
  int64_t ldx, in;
  const AdapterSlot* adapters;  // [num_adapters]
  int64_t num_adapters;
  const int64_t* order;    // [T'] row of x of each sorted row
  const int64_t* offsets;  // [num_adapters + 1]
  float* u;                // [T', ldu]
  int64_t ldu;
  int r0;  // the rank tile: ranks [r0, r0 + min(64, r - r0)) of each adapter whose tile size is this launch's R
  DropoutParams drop;
};

// Each warp owns TPW sorted rows of the block's tile (8·TPW rows per block) and runs lora_linear's shrink loop
// (shrink_accumulate) on them; the adapter's A chunk is staged in shared memory once per block.
template <typename Tx, typename Ta, int R, int TPW>
__global__ void __launch_bounds__(kThreads) multi_shrink_kernel(MultiShrinkParams p) {
  constexpr int kWarps = kThreads / 32, kTile = kWarps * TPW;
  __shared__ float a_s[R][kShrinkChunk];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t seed = 0, offset = 0;
  dropout_rng(p.drop, blockIdx.x == 0 && threadIdx.x == 0, seed, offset);
  const SegmentTile st = find_segment_tile(p.offsets, p.num_adapters, kTile, blockIdx.x);
  if (st.adapter < 0) return;  // the whole block: no barrier is skipped by part of it
  const AdapterSlot slot = p.adapters[st.adapter];
  const int64_t rc64 = slot.r - p.r0;
  if (rc64 <= 0 || rank_tile_of(rc64 < 64 ? rc64 : 64) != R) return;  // another launch's (or no) work
  const int rc = static_cast<int>(rc64 < R ? rc64 : R);
  float acc[TPW][R];
  shrink_accumulate<Tx, Ta, R, TPW>(
      static_cast<const Tx*>(p.x), p.ldx, p.in, static_cast<const Ta*>(slot.a), p.r0, rc, p.drop, seed, offset,
      [&](int i) -> int64_t {
        const int64_t local = static_cast<int64_t>(warp) * TPW + i;
        return local < st.rows ? p.order[st.row0 + local] : -1;
      },
      a_s, acc);
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    const int64_t local = static_cast<int64_t>(warp) * TPW + i;
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const float s = warp_sum(acc[i][rr]);
      if (lane == 0 && local < st.rows && rr < rc) p.u[(st.row0 + local) * p.ldu + p.r0 + rr] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// segmented expand: y[order[j], o] += scaleᵢ·Σ_k u[j, k]·Bᵢ[o, k] for the sorted rows j of adapter i. Thread ↔ output
// column o (grid.y: column tiles of kThreads), kMultiExpandRows sorted rows per block (grid.x: segment tiles); u's
// rows staged in shared memory kMultiExpandRankChunk ranks at a time.
constexpr int kMultiExpandRows = 16;
constexpr int kMultiExpandRankChunk = 64;

struct MultiExpandParams {
  const float* u;  // [T', ldu]
  int64_t ldu;
  const AdapterSlot* adapters;  // [num_adapters]
  int64_t num_adapters;
  const int64_t* order;    // [T']
  const int64_t* offsets;  // [num_adapters + 1]
  void* y;                 // [T, out] contiguous, holding base_out
  int64_t out;
};

template <typename Ty, typename Tb>
__global__ void __launch_bounds__(kThreads) multi_expand_kernel(MultiExpandParams p) {
  __shared__ float u_s[kMultiExpandRows][kMultiExpandRankChunk];
  const SegmentTile st = find_segment_tile(p.offsets, p.num_adapters, kMultiExpandRows, blockIdx.x);
  if (st.adapter < 0) return;  // the whole block: no barrier is skipped by part of it
  const AdapterSlot slot = p.adapters[st.adapter];
  const Tb* b = static_cast<const Tb*>(slot.b);
  Ty* y = static_cast<Ty*>(p.y);
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;

  float acc[kMultiExpandRows];
#pragma unroll
  for (int i = 0; i < kMultiExpandRows; ++i) acc[i] = 0.f;
  for (int64_t k0 = 0; k0 < slot.r; k0 += kMultiExpandRankChunk) {
    __syncthreads();
    for (int i = threadIdx.x; i < kMultiExpandRows * kMultiExpandRankChunk; i += kThreads) {
      const int row = i / kMultiExpandRankChunk, kk = i % kMultiExpandRankChunk;
      const int64_t k = k0 + kk;
      u_s[row][kk] = (row < st.rows && k < slot.r) ? p.u[(st.row0 + row) * p.ldu + k] : 0.f;
    }
    __syncthreads();
    if (o < p.out) {
      const int64_t kn = slot.r - k0 < kMultiExpandRankChunk ? slot.r - k0 : kMultiExpandRankChunk;
      for (int64_t kk = 0; kk < kn; ++kk) {
        const float bv = to_float(b[o * slot.r + k0 + kk]);
#pragma unroll
        for (int i = 0; i < kMultiExpandRows; ++i) acc[i] += u_s[i][kk] * bv;
      }
    }
  }
  if (o >= p.out) return;
#pragma unroll
  for (int i = 0; i < kMultiExpandRows; ++i) {
    if (i < st.rows) add_rounded(&y[p.order[st.row0 + i] * p.out + o], slot.scale * acc[i]);
  }
}

// ------------------------------------------------------------------------------------------------
// per token (decode): row t runs adapter row_adapter[t] (-1: none). No dropout (inference).
struct TokenParams {
  const void* x;  // [T, in], row stride ldx
  int64_t ldx, in;
  const AdapterSlot* adapters;  // [num_adapters]
  const int64_t* row_adapter;   // [T]
  float* u;                     // [T, ldu]
  int64_t ldu;
  void* y;  // [T, out] contiguous, holding base_out
  int64_t out;
};

// u[t, k] = x[t]·Aᵢ[k]: block (t, k) (grid.x rows, grid.y the largest rank); the adapter's cost is reading A once.
template <typename Tx, typename Ta>
__global__ void __launch_bounds__(kThreads) token_shrink_kernel(TokenParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float part[kWarps];
  const int64_t t = blockIdx.x, k = blockIdx.y;
  const int64_t i = p.row_adapter[t];
  if (i < 0) return;
  const AdapterSlot slot = p.adapters[i];
  if (k >= slot.r) return;
  const Tx* x = static_cast<const Tx*>(p.x) + t * p.ldx;
  const Ta* a = static_cast<const Ta*>(slot.a) + k * p.in;
  float acc = 0.f;
  for (int64_t c = threadIdx.x; c < p.in; c += kThreads) acc += to_float(x[c]) * to_float(a[c]);
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += part[w];
    p.u[t * p.ldu + k] = s;
  }
}

// y[t, o] += scaleᵢ·u[t]·Bᵢ[o]: block (t, column tile), thread ↔ column.
template <typename Ty, typename Tb>
__global__ void __launch_bounds__(kThreads) token_expand_kernel(TokenParams p) {
  const int64_t t = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t i = p.row_adapter[t];
  if (i < 0 || o >= p.out) return;
  const AdapterSlot slot = p.adapters[i];
  const Tb* b = static_cast<const Tb*>(slot.b) + o * slot.r;
  const float* u = p.u + t * p.ldu;
  float acc = 0.f;
  for (int64_t k = 0; k < slot.r; ++k) acc += u[k] * to_float(b[k]);
  add_rounded(&static_cast<Ty*>(p.y)[t * p.out + o], slot.scale * acc);
}

// ------------------------------------------------------------------------------------------------
// backward helper: rows[j, k] *= keep(row_ids[j], k) / (1 - p), the forward's mask of batch row row_ids[j], on fp32
// rows [n, in] gathered from x (or dX's LoRA terms). One thread per element.
struct RowsDropoutParams {
  float* rows;             // [n, in] contiguous
  const int64_t* row_ids;  // [n]
  int64_t n, in;
  DropoutParams drop;  // rng_in: the forward's (seed, offset)
};

__global__ void __launch_bounds__(kThreads) rows_dropout_kernel(RowsDropoutParams p) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= p.n * p.in) return;
  uint64_t seed = 0, offset = 0;
  resolve_rng(p.drop, seed, offset);
  const int64_t j = e / p.in, k = e % p.in;
  p.rows[e] = apply_dropout(p.drop, seed, offset, p.row_ids[j], p.in, k, p.rows[e]);
}

}  // namespace lorafuse::cuda
