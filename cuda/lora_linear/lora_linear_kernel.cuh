// The LoRA kernels of lorafuse.lora_linear: __global__ templates over raw pointers, strides and a params
// struct. No torch headers. The host wrapper (lora_linear_cuda.cu) checks, guards, picks the stream and
// the template constants, and launches.
//
//   forward   u  = drop(x)·Aᵀ                 lora_shrink_kernel / lora_shrink_decode_kernel (T ≤ 16)
//             y  = bias + scale·u·Bᵀ          lora_expand_kernel, then cuBLAS adds x·Wᵀ with beta = 1
//   backward  v  = dY·B,  dB = scale·dYᵀ·u,  dbias = Σ_t dY         lora_grad_out_kernel (one pass over dY)
//             dX = scale·(v·A)⊙mask/(1-p),  dA = scale·vᵀ·drop(x)    lora_grad_x_kernel (one pass over x),
//             then cuBLAS adds dY·W into dX with beta = 1
//   Reductions across blocks go through fp32 partial buffers summed in a fixed order
//   (reduce_splits_kernel), so results are deterministic: no atomics.
//
// Shapes: x [T, in] with row stride ldx and unit column stride; A [r, in], B [out, r], u and v [T, r]
// (fp32), all contiguous. Kernels that keep per-rank registers take a rank tile R (16, 32 or 64) and
// handle ranks [r0, r0 + rc) of the r columns, rc ≤ R; the host loops over tiles when r > 64.
#pragma once

#include <cstdint>

#include "cuda/common/device_utils.cuh"
#include "cuda/common/dropout.cuh"
#include "cuda/common/shrink_tile.cuh"

namespace lorafuse::cuda {

// ------------------------------------------------------------------------------------------------
// forward: shrink u[:, r0:r0+rc] = drop(x)·A[r0:r0+rc]ᵀ
struct ShrinkParams {
  const void* x;  // [T, in], row stride ldx
  int64_t ldx;
  const void* a;  // [r, in]
  float* u;       // [T, r]
  int64_t tokens, in, r;
  int r0, rc;
  DropoutParams drop;
};

// Prefill: each warp owns TPW tokens, each lane every 32nd column of a 128-wide chunk; the A chunk is
// staged in shared memory once per block and reused by its 8·TPW tokens. Accumulators: TPW·R fp32 per lane.
template <typename Tx, typename Ta, int R, int TPW>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(ShrinkParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float a_s[R][kShrinkChunk];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t_first = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * TPW;
  uint64_t seed = 0, offset = 0;
  dropout_rng(p.drop, blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0, seed, offset);
  float acc[TPW][R];
  shrink_accumulate<Tx, Ta, R, TPW>(
      static_cast<const Tx*>(p.x), p.ldx, p.in, static_cast<const Ta*>(p.a), p.r0, p.rc, p.drop, seed, offset,
      [&](int i) -> int64_t { return t_first + i < p.tokens ? t_first + i : -1; }, a_s, acc);
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    const int64_t t = t_first + i;
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const float s = warp_sum(acc[i][rr]);
      if (lane == 0 && t < p.tokens && rr < p.rc) p.u[t * p.r + p.r0 + rr] = s;
    }
  }
}

// Decode (T ≤ MAXT = 16): one block per rank row; each thread strides over in for all tokens, then a
// block reduction. The adapter's cost is reading A (once) and x (tiny).
template <typename Tx, typename Ta, int MAXT>
__global__ void __launch_bounds__(kThreads) lora_shrink_decode_kernel(ShrinkParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float part[kWarps][MAXT];
  const Tx* x = static_cast<const Tx*>(p.x);
  const Ta* a = static_cast<const Ta*>(p.a);
  const int rr = p.r0 + blockIdx.x;  // rank row of this block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  uint64_t seed = 0, offset = 0;
  dropout_rng(p.drop, blockIdx.x == 0 && threadIdx.x == 0, seed, offset);

  float acc[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) acc[t] = 0.f;
  for (int64_t k = threadIdx.x; k < p.in; k += kThreads) {
    const float av = to_float(a[rr * p.in + k]);
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t < p.tokens) acc[t] += apply_dropout(p.drop, seed, offset, t, p.in, k, to_float(x[t * p.ldx + k])) * av;
    }
  }
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    const float s = warp_sum(acc[t]);
    if (lane == 0) part[warp][t] = s;
  }
  __syncthreads();
  if (threadIdx.x < MAXT && threadIdx.x < p.tokens) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += part[w][threadIdx.x];
    p.u[threadIdx.x * p.r + rr] = s;
  }
}

// ------------------------------------------------------------------------------------------------
// forward: expand y[t, o] = bias[o] + scale·Σ_j u[t, j]·B[o, j], written in y's dtype; the base GEMM then
// accumulates x·Wᵀ onto it (beta = 1). Thread ↔ output column o, kExpandTokens tokens per block; token
// tiles on grid x (no 65535 limit), column tiles on grid y.
constexpr int kExpandTokens = 16;
constexpr int kExpandRankChunk = 64;

struct ExpandParams {
  const float* u;    // [T, r]
  const void* b;     // [out, r]
  const void* bias;  // [out] or nullptr
  void* y;           // [T, out] contiguous
  int64_t tokens, out, r;
  float scale;
};

template <typename Ty, typename Tb>
__global__ void __launch_bounds__(kThreads) lora_expand_kernel(ExpandParams p) {
  __shared__ float u_s[kExpandTokens][kExpandRankChunk];
  const Tb* b = static_cast<const Tb*>(p.b);
  const Ty* bias = static_cast<const Ty*>(p.bias);
  Ty* y = static_cast<Ty*>(p.y);
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kExpandTokens;

  float acc[kExpandTokens];
#pragma unroll
  for (int i = 0; i < kExpandTokens; ++i) acc[i] = 0.f;
  for (int64_t j0 = 0; j0 < p.r; j0 += kExpandRankChunk) {
    __syncthreads();
    for (int i = threadIdx.x; i < kExpandTokens * kExpandRankChunk; i += kThreads) {
      const int tt = i / kExpandRankChunk, jj = i % kExpandRankChunk;
      const int64_t t = t0 + tt, j = j0 + jj;
      u_s[tt][jj] = (t < p.tokens && j < p.r) ? p.u[t * p.r + j] : 0.f;
    }
    __syncthreads();
    if (o < p.out) {
      const int64_t jn = p.r - j0 < kExpandRankChunk ? p.r - j0 : kExpandRankChunk;
      for (int64_t jj = 0; jj < jn; ++jj) {
        const float bv = to_float(b[o * p.r + j0 + jj]);
#pragma unroll
        for (int i = 0; i < kExpandTokens; ++i) acc[i] += u_s[i][jj] * bv;
      }
    }
  }
  if (o >= p.out) return;
  const float bias_v = bias != nullptr ? to_float(bias[o]) : 0.f;
#pragma unroll
  for (int i = 0; i < kExpandTokens; ++i) {
    const int64_t t = t0 + i;
    if (t < p.tokens) y[t * p.out + o] = from_float<Ty>(bias_v + p.scale * acc[i]);
  }
}

// ------------------------------------------------------------------------------------------------
// backward: one pass over dY. Block (ot, s) owns output columns [ot·256, ot·256 + 256) and the token split
// s; it walks its tokens in tiles of 16 staged in shared memory and produces
//   v_part[ot][t][r0 + j]   = Σ_{o in its columns} dY[t, o]·B[o, r0 + j]      (summed over ot later)
//   db_part[s][o][r0 + j]   = Σ_{t in its split}  dY[t, o]·u[t, r0 + j]      (summed over s later)
//   bias_part[s][o]         = Σ_{t in its split}  dY[t, o]
constexpr int kGradOutCols = kThreads;
constexpr int kGradOutTokens = 16;

struct GradOutParams {
  const void* dy;    // [T, out] contiguous
  const void* b;     // [out, r]
  const float* u;    // [T, r]
  float* v_part;     // [n_col_tiles, T, r] or nullptr
  float* db_part;    // [splits, out, r] or nullptr
  float* bias_part;  // [splits, out] or nullptr
  int64_t tokens, out, r;
  int64_t tokens_per_split;  // a multiple of kGradOutTokens
  int r0, rc;
};

template <int R>
constexpr size_t grad_out_smem_bytes() {
  return sizeof(float) * (kGradOutTokens * (kGradOutCols + 1) + kGradOutTokens * R + kGradOutCols * R);
}

template <typename Tg, typename Tb, int R>
__global__ void __launch_bounds__(kThreads) lora_grad_out_kernel(GradOutParams p) {
  static_assert(R % 16 == 0, "rank tile must be a multiple of 16");
  LORAFUSE_DYNAMIC_SMEM(smem);
  float* g_s = smem;                                       // [16][257] dY tile
  float* u_s = g_s + kGradOutTokens * (kGradOutCols + 1);  // [16][R]
  float* b_s = u_s + kGradOutTokens * R;                   // [256][R]
  const Tg* dy = static_cast<const Tg*>(p.dy);
  const Tb* b = static_cast<const Tb*>(p.b);
  const int tid = threadIdx.x;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kGradOutCols;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * p.tokens_per_split;
  const int64_t t_end = t_begin + p.tokens_per_split < p.tokens ? t_begin + p.tokens_per_split : p.tokens;

  // B rows of this block's columns, once.
  for (int i = tid; i < kGradOutCols * R; i += kThreads) {
    const int oo = i / R, j = i % R;
    const int64_t o = o0 + oo;
    b_s[i] = (o < p.out && j < p.rc) ? to_float(b[o * p.r + p.r0 + j]) : 0.f;
  }

  // dB and dbias: thread ↔ column o0 + tid, all R ranks. v: thread ↔ (token tid % 16, ranks tid / 16 + 16·i).
  float db_acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) db_acc[j] = 0.f;
  float bias_acc = 0.f;
  const int v_t = tid % kGradOutTokens, v_j0 = tid / kGradOutTokens;

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kGradOutTokens) {
    __syncthreads();  // previous tile consumed (and b_s written, on the first pass)
    for (int i = tid; i < kGradOutTokens * kGradOutCols; i += kThreads) {
      const int tt = i / kGradOutCols, oo = i % kGradOutCols;
      const int64_t t = t0 + tt, o = o0 + oo;
      g_s[tt * (kGradOutCols + 1) + oo] = (t < t_end && o < p.out) ? to_float(dy[t * p.out + o]) : 0.f;
    }
    for (int i = tid; i < kGradOutTokens * R; i += kThreads) {
      const int tt = i / R, j = i % R;
      const int64_t t = t0 + tt;
      u_s[i] = (t < t_end && j < p.rc) ? p.u[t * p.r + p.r0 + j] : 0.f;
    }
    __syncthreads();

    if (p.db_part != nullptr || p.bias_part != nullptr) {
#pragma unroll 4
      for (int tt = 0; tt < kGradOutTokens; ++tt) {
        const float g = g_s[tt * (kGradOutCols + 1) + tid];
        bias_acc += g;
#pragma unroll
        for (int j = 0; j < R; ++j) db_acc[j] += g * u_s[tt * R + j];
      }
    }
    if (p.v_part != nullptr) {
      const int64_t t = t0 + v_t;
#pragma unroll
      for (int i = 0; i < R / 16; ++i) {
        const int j = v_j0 + 16 * i;
        float s = 0.f;
        for (int oo = 0; oo < kGradOutCols; ++oo) s += g_s[v_t * (kGradOutCols + 1) + oo] * b_s[oo * R + j];
        if (t < t_end && j < p.rc) p.v_part[(blockIdx.x * p.tokens + t) * p.r + p.r0 + j] = s;
      }
    }
  }

  const int64_t o = o0 + tid;
  if (o >= p.out) return;
  if (p.db_part != nullptr) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (j < p.rc) p.db_part[(blockIdx.y * p.out + o) * p.r + p.r0 + j] = db_acc[j];
    }
  }
  if (p.bias_part != nullptr) p.bias_part[blockIdx.y * p.out + o] = bias_acc;
}

// ------------------------------------------------------------------------------------------------
// backward: one pass over x. Block (kt, s) owns input columns [kt·256, kt·256 + 256) and token split s;
// thread ↔ column k, holding A[r0:r0+rc, k] in registers:
//   dx[t, k]  (+)= scale·mask[t, k]/(1-p)·Σ_j v[t, r0 + j]·A[r0 + j, k]     (written in x's dtype; cuBLAS
//                                                                          then adds dY·W with beta = 1)
//   da_part[s][r0 + j][k] = Σ_{t in split} v[t, r0 + j]·drop(x)[t, k]      (summed over s later)
constexpr int kGradXCols = kThreads;
constexpr int kGradXTokens = 32;

struct GradXParams {
  const void* x;  // [T, in], row stride ldx
  int64_t ldx;
  const void* a;   // [r, in]
  const float* v;  // [T, r]
  void* dx;        // [T, in] contiguous, or nullptr
  float* da_part;  // [splits, r, in], or nullptr
  int64_t tokens, in, r;
  int64_t tokens_per_split;
  int r0, rc;
  bool accumulate_dx;  // add to dx (rank tiles after the first)
  float scale;
  DropoutParams drop;
};

template <typename Tx, typename Ta, int R>
__global__ void __launch_bounds__(kThreads) lora_grad_x_kernel(GradXParams p) {
  __shared__ float v_s[kGradXTokens][R];
  const Tx* x = static_cast<const Tx*>(p.x);
  const Ta* a = static_cast<const Ta*>(p.a);
  Tx* dx = static_cast<Tx*>(p.dx);
  const int tid = threadIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kGradXCols + tid;
  const bool col_ok = k < p.in;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * p.tokens_per_split;
  const int64_t t_end = t_begin + p.tokens_per_split < p.tokens ? t_begin + p.tokens_per_split : p.tokens;

  uint64_t seed = 0, offset = 0;
  if (p.drop.enabled) resolve_rng(p.drop, seed, offset);

  float a_col[R], da_acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) {
    a_col[j] = (col_ok && j < p.rc) ? to_float(a[(p.r0 + j) * p.in + k]) : 0.f;
    da_acc[j] = 0.f;
  }

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kGradXTokens) {
    __syncthreads();
    for (int i = tid; i < kGradXTokens * R; i += kThreads) {
      const int tt = i / R, j = i % R;
      const int64_t t = t0 + tt;
      v_s[tt][j] = (t < t_end && j < p.rc) ? p.v[t * p.r + p.r0 + j] : 0.f;
    }
    __syncthreads();
    if (!col_ok) continue;
    const int64_t tn = t_end - t0 < kGradXTokens ? t_end - t0 : kGradXTokens;
    for (int tt = 0; tt < tn; ++tt) {
      const int64_t t = t0 + tt;
      // dropped elements are exact zeros (selected, not multiplied: inf·0 would be NaN), as on the CPU
      bool kept = true;
      if (p.drop.enabled) {
        const uint64_t e = static_cast<uint64_t>(t) * static_cast<uint64_t>(p.in) + static_cast<uint64_t>(k);
        kept = philox::keep(seed, offset, e, p.drop.threshold);
      }
      if (dx != nullptr) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < R; ++j) s += v_s[tt][j] * a_col[j];
        float val = kept ? p.scale * p.drop.inv_keep * s : 0.f;
        if (p.accumulate_dx) val += to_float(dx[t * p.in + k]);
        dx[t * p.in + k] = from_float<Tx>(val);
      }
      if (p.da_part != nullptr) {
        const float xd = kept ? to_float(x[t * p.ldx + k]) * p.drop.inv_keep : 0.f;
#pragma unroll
        for (int j = 0; j < R; ++j) da_acc[j] += v_s[tt][j] * xd;
      }
    }
  }

  if (p.da_part == nullptr || !col_ok) return;
#pragma unroll
  for (int j = 0; j < R; ++j) {
    if (j < p.rc) p.da_part[(blockIdx.y * p.r + p.r0 + j) * p.in + k] = da_acc[j];
  }
}

// ------------------------------------------------------------------------------------------------
// out[i] = alpha·Σ_s part[s·n + i], in a fixed order (deterministic), converted to out's dtype.
template <typename To>
struct ReduceParams {
  const float* part;  // [splits, n]
  int64_t splits, n;
  float alpha;
  To* out;  // [n]
};

template <typename To>
__global__ void __launch_bounds__(kThreads) reduce_splits_kernel(ReduceParams<To> p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.n) return;
  float s = 0.f;
  for (int64_t sp = 0; sp < p.splits; ++sp) s += p.part[sp * p.n + i];
  p.out[i] = from_float<To>(p.alpha * s);
}

}  // namespace lorafuse::cuda
