// CUDA kernels of the quantized-weight format (cuda/shared/nf_format.h: NF-b codes, b = 2 .. 8, in absmax blocks,
// the statistics quantized again or not) — one set for QLoRA's NF4 and LQ-LoRA's bases: quantize (the weights'
// codes, then the statistics') and dequantize, bit-exact with the CPU kernels (so for NF4 with bitsandbytes' bytes),
// and the decode GEMV (T ≤ kGemvTokens) that reads the packed codes directly, so a token costs the b-bit bytes, not
// the dense ones. Raw pointers and params structs, no torch headers: the CPU emulator in tests/cpp/cuda_emu runs this
// very code.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common/device_utils.cuh"
#include "cuda/shared/nf4.h"
#include "cuda/shared/nf_format.h"

namespace lorafuse::cuda {

constexpr int kNfThreads = 256;
constexpr int kGemvTokens = 16;                     // T ≤ this takes the GEMV
constexpr int kGemvRowsPerBlock = kNfThreads / 32;  // one warp per output row
constexpr int kMaxCode = 256;                       // values of the widest code (8 bits)

// A quantized weight on the device: the packed codes and the block statistics, with both code tables by value
// (kernel parameters live in constant memory, so they need no device copy). Double-quantized when `codes` is set.
// Block sizes are powers of two, held as shifts.
struct NfView {
  const uint8_t* packed = nullptr;       // the weights' codes, a `bits` bit stream
  const float* absmax = nullptr;         // stat_bits = 0: one float32 per block
  const uint8_t* codes = nullptr;        // nested: the statistics' codes, a `stat_bits` bit stream,
  const float* nested_absmax = nullptr;  // one float32 scale per stat_blocksize statistics (the host widens 16-bit
                                         // scales to float32: exact),
  const float* offset = nullptr;         // and the offset (one float32)
  int bits = 4, stat_bits = 0;
  int block_shift = 6, stat_block_shift = 8;  // log2 of blocksize and stat_blocksize
  float code[kMaxCode];                       // the NF-bits code (2^bits values)
  float stat_code[kMaxCode];  // the statistics' code: 8 bits dynamic, fewer uniform (2^stat_bits values)
};

// Products and sums rounded one at a time, as the CPU kernels (built with -ffp-contract=off) and bitsandbytes do:
// nvcc would otherwise fuse a multiply and an add into one FMA and round once.
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__device__ __forceinline__ float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
__device__ __forceinline__ float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
__device__ __forceinline__ float clamp_to(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// The float32 statistic of block b: absmax, or its code decoded (code · scale, then + offset, rounded one at a time).
__device__ __forceinline__ float nf_block_scale(const NfView& w, int64_t b) {
  if (w.codes == nullptr) return w.absmax[b];
  const uint32_t q = nf::read_code(w.codes, b, w.stat_bits);
  return add_rn(mul_rn(w.stat_code[q], w.nested_absmax[b >> w.stat_block_shift]), *w.offset);
}

// Element e (row-major) of the weight, in float32.
__device__ __forceinline__ float nf_element(const NfView& w, int64_t e) {
  return mul_rn(w.code[nf::read_code(w.packed, e, w.bits)], nf_block_scale(w, e >> w.block_shift));
}

// A value's round trip through the statistics' scale dtype (0 float32, 1 float16, 2 bfloat16), to nearest even.
__device__ __forceinline__ float round_to_scale_dtype(float v, int dtype) {
  if (dtype == 1) return __half2float(__float2half_rn(v));
  if (dtype == 2) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

struct NfQuantizeParams {
  const float* w;  // [n] float32
  int64_t n, blocksize, blocks;
  int bits;
  float* absmax;                  // [blocks]
  uint8_t* packed;                // [stream_bytes(n, bits)]
  int midpoint_count;             // 2^bits − 1
  float midpoints[kMaxCode - 1];  // between neighbouring code values, ascending
  uint8_t zero_code;              // the code of 0: pads a last byte the codes leave partial
};

// First level, one thread per block of the weight: absmax, then the codes as the block's own bytes of the stream
// (blocksize · bits is a multiple of 8), the CPU kernel's arithmetic: a full block scales by the reciprocal of its
// absmax, a partial last one divides by it clamped to kMinAbsmax.
__global__ void __launch_bounds__(kNfThreads) nf_quantize_kernel(NfQuantizeParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kNfThreads + threadIdx.x;
  if (b >= p.blocks) return;
  const int64_t start = b * p.blocksize;
  const int64_t len = p.n - start < p.blocksize ? p.n - start : p.blocksize;
  float am = 0.0f;
  for (int64_t i = 0; i < len; ++i) am = fmaxf(am, fabsf(p.w[start + i]));
  const bool full = len == p.blocksize;
  if (!full) am = fmaxf(am, nf4::kMinAbsmax);
  p.absmax[b] = am;
  const float inv = div_rn(1.0f, fmaxf(am, nf4::kMinAbsmax));
  nf::BitWriter out(p.packed + start * p.bits / 8, p.bits);
  for (int64_t i = 0; i < len; ++i) {
    const float x = full ? mul_rn(p.w[start + i], inv) : div_rn(p.w[start + i], am);
    out.put(static_cast<uint32_t>(nf::count_below(p.midpoints, p.midpoint_count, clamp_to(x, -1.0f, 1.0f))));
  }
  out.finish(p.zero_code);
}

struct NfQuantizeStatisticsParams {
  const float* absmax;  // [n] first-level statistics
  const float* offset;  // 8 bits: their mean; fewer: their minimum (one float32)
  int64_t n, stat_blocksize, groups;
  int stat_bits;
  int scale_dtype;                // 0 float32, 1 float16, 2 bfloat16: the scales are rounded to it
  float* scales;                  // [groups], each already a value of scale_dtype
  uint8_t* codes;                 // [stream_bytes(n, stat_bits)]
  const uint8_t* lut;             // 8 bits: [nf4::kLutSize], nf4::build_lut of the dynamic code
  int midpoint_count;             // fewer bits: 2^stat_bits − 1,
  float midpoints[kMaxCode / 2];  // between the uniform code's levels
};

// nf4::lut_position with each product and sum rounded on its own.
__device__ __forceinline__ uint16_t lut_position_rn(float x) {
  const float scaled = mul_rn(add_rn(clamp_to(x, -1.0f, 1.0f), 1.0f), 0.5f);
  return static_cast<uint16_t>(add_rn(mul_rn(scaled, static_cast<float>(nf4::kLutSize - 1)), 0.5f));
}

// Second level (double quantization), one thread per group of stat_blocksize statistics, as the CPU kernel: v =
// absmax − offset; the scale = max |v| rounded to scale_dtype; 8 bits: the dynamic code through the 65536-point table
// (bitsandbytes' CPU kernel); fewer: the nearest uniform level of v / scale (ties to the lower one). A scale that
// scale_dtype cannot hold is written as it rounds (inf), for the host to refuse.
__global__ void __launch_bounds__(kNfThreads) nf_quantize_statistics_kernel(NfQuantizeStatisticsParams p) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kNfThreads + threadIdx.x;
  if (g >= p.groups) return;
  const int64_t start = g * p.stat_blocksize;
  const int64_t end = start + p.stat_blocksize < p.n ? start + p.stat_blocksize : p.n;
  const float offset = *p.offset;
  float am = 0.0f;
  for (int64_t i = start; i < end; ++i) am = fmaxf(am, fabsf(sub_rn(p.absmax[i], offset)));
  am = round_to_scale_dtype(am, p.scale_dtype);
  p.scales[g] = am;
  nf::BitWriter out(p.codes + start * p.stat_bits / 8, p.stat_bits);
  const bool dynamic = p.stat_bits == 8;
  const float inv = dynamic && am != 0.0f ? div_rn(1.0f, am) : 0.0f;
  for (int64_t i = start; i < end; ++i) {
    const float v = sub_rn(p.absmax[i], offset);
    uint32_t q = 0;
    if (am != 0.0f) {
      q = dynamic ? p.lut[lut_position_rn(mul_rn(v, inv))]
                  : static_cast<uint32_t>(
                        nf::count_below(p.midpoints, p.midpoint_count, clamp_to(div_rn(v, am), 0.0f, 1.0f)));
    }
    out.put(q);
  }
  out.finish(0);
}

template <typename T>
struct NfDequantizeParams {
  NfView w;
  T* out;  // [n]
  int64_t n;
  int64_t blocks;  // grid size (the loop strides by blocks · kNfThreads elements)
};

// out = the weight, an element per thread and step.
template <typename T>
__global__ void __launch_bounds__(kNfThreads) nf_dequantize_kernel(NfDequantizeParams<T> p) {
  const int64_t stride = p.blocks * kNfThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kNfThreads + threadIdx.x; e < p.n; e += stride) {
    p.out[e] = from_float<T>(nf_element(p.w, e));
  }
}

template <typename T>
struct NfGemvParams {
  NfView w;       // [out, in]
  const T* x;     // [tokens, in], row stride x_stride
  const T* bias;  // [out] or nullptr
  T* y;           // [tokens, out], contiguous
  int64_t tokens, in, out, x_stride;
};

// y[t, o] = Σ_k x[t, k] · W[o, k] (+ bias[o]) for t < tokens ≤ kGemvTokens: one warp per output row, its lanes
// striding over k, W decoded from the packed bytes as it is read; sums in float32, one rounding to T at the end.
template <typename T>
__global__ void __launch_bounds__(kNfThreads) nf_gemv_kernel(NfGemvParams<T> p) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kGemvRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (o >= p.out) return;  // the whole warp: its shuffles below see all 32 lanes
  float acc[kGemvTokens];
#pragma unroll
  for (int t = 0; t < kGemvTokens; ++t) acc[t] = 0.0f;
  const int64_t row = o * p.in;
  for (int64_t k = lane; k < p.in; k += 32) {
    const float w = nf_element(p.w, row + k);
#pragma unroll
    for (int t = 0; t < kGemvTokens; ++t) {
      if (t < p.tokens) acc[t] += w * to_float(p.x[t * p.x_stride + k]);
    }
  }
  const float b = p.bias != nullptr ? to_float(p.bias[o]) : 0.0f;
#pragma unroll
  for (int t = 0; t < kGemvTokens; ++t) {
    if (t < p.tokens) {  // tokens is the same for every lane: no lane skips a shuffle its warp makes
      const float sum = warp_sum(acc[t]);
      if (lane == 0) p.y[t * p.out + o] = from_float<T>(sum + b);
    }
  }
}

}  // namespace lorafuse::cuda
