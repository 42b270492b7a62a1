// NF4 CUDA kernels (QLoRA's 4-bit base): quantize and dequantize (bit-exact with the CPU kernels, so with
// bitsandbytes' CPU bytes) and the decode
// GEMV (T ≤ kGemvTokens) that reads the packed weight directly, so a token costs the 4-bit bytes, not the dense ones.
// Raw pointers and params structs, no torch headers: the CPU emulator in tests/cpp/cuda_emu runs this very code.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common/device_utils.cuh"
#include "cuda/shared/nf4.h"

namespace lorafuse::cuda {

constexpr int kNf4Threads = 256;
constexpr int kGemvTokens = 16;                      // T ≤ this takes the GEMV
constexpr int kGemvRowsPerBlock = kNf4Threads / 32;  // one warp per output row

// An NF4 weight on the device: the packed codes and the block statistics, with both code tables by value (kernel
// parameters live in constant memory, so they need no device copy). Double-quantized when `codes` is set.
struct Nf4View {
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;         // not nested: one float32 per block
  const uint8_t* codes = nullptr;        // nested: one 8-bit code per block,
  const float* nested_absmax = nullptr;  // one float32 per 256 blocks,
  const float* offset = nullptr;         // and the offset (one float32)
  int64_t blocksize = 64;
  float code[16];
  float dynamic_code[256];
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
__device__ __forceinline__ float clamp_unit(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

// The float32 statistic of block b: absmax, or its 8-bit code decoded (code · nested absmax, then + offset).
__device__ __forceinline__ float nf4_block_scale(const Nf4View& w, int64_t b) {
  if (w.codes == nullptr) return w.absmax[b];
  return add_rn(mul_rn(w.dynamic_code[w.codes[b]], w.nested_absmax[b / nf4::kNestedBlocksize]), *w.offset);
}

// Element e (row-major) of the weight, in float32.
__device__ __forceinline__ float nf4_element(const Nf4View& w, int64_t e) {
  const uint8_t byte = w.packed[e >> 1];
  return mul_rn(w.code[(e & 1) ? nf4::low(byte) : nf4::high(byte)], nf4_block_scale(w, e / w.blocksize));
}

struct Nf4QuantizeParams {
  const float* w;  // [n] float32
  int64_t n, blocksize, blocks;
  float* absmax;        // [blocks]
  uint8_t* packed;      // [ceil(n/2)]
  float midpoints[15];  // between neighbouring NF4 codes (nf4::index_of's)
  uint8_t zero_code;    // the code of 0: the low nibble of an odd total's last byte
};

// The NF4 code of x: how many midpoints lie strictly below it (ties to the lower code), as nf4::index_of.
__device__ __forceinline__ uint8_t nf4_code_of(const float* midpoints, float x) {
  uint8_t index = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) index += midpoints[i] < x ? 1 : 0;
  return index;
}

// First level, one thread per block of the weight: absmax and the codes two per byte, the CPU kernel's arithmetic
// (a full block scales by the reciprocal of its absmax, a partial last one divides by it clamped to kMinAbsmax).
__global__ void __launch_bounds__(kNf4Threads) nf4_quantize_kernel(Nf4QuantizeParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kNf4Threads + threadIdx.x;
  if (b >= p.blocks) return;
  const int64_t start = b * p.blocksize;
  const int64_t len = p.n - start < p.blocksize ? p.n - start : p.blocksize;
  float am = 0.0f;
  for (int64_t i = 0; i < len; ++i) am = fmaxf(am, fabsf(p.w[start + i]));
  const bool full = len == p.blocksize;
  if (!full) am = fmaxf(am, nf4::kMinAbsmax);
  p.absmax[b] = am;
  const float inv = div_rn(1.0f, fmaxf(am, nf4::kMinAbsmax));
  const auto code = [&](int64_t i) {
    const float x = full ? mul_rn(p.w[start + i], inv) : div_rn(p.w[start + i], am);
    return nf4_code_of(p.midpoints, clamp_unit(x));
  };
  for (int64_t i = 0; i < len; i += 2) {
    const uint8_t second = i + 1 < len ? code(i + 1) : p.zero_code;
    p.packed[(start + i) / 2] = nf4::pack(code(i), second);
  }
}

struct Nf4QuantizeStatisticsParams {
  const float* absmax;   // [n] first-level statistics
  const float* offset;   // their mean (one float32)
  int64_t n, groups;     // groups of kNestedBlocksize
  float* nested_absmax;  // [groups]
  uint8_t* codes;        // [n]
  const uint8_t* lut;    // [nf4::kLutSize]: nf4::build_lut of the dynamic code
};

// nf4::lut_position with each product and sum rounded on its own.
__device__ __forceinline__ uint16_t lut_position_rn(float x) {
  const float scaled = mul_rn(add_rn(clamp_unit(x), 1.0f), 0.5f);
  return static_cast<uint16_t>(add_rn(mul_rn(scaled, static_cast<float>(nf4::kLutSize - 1)), 0.5f));
}

// Second level (double quantization), one thread per group of 256 statistics: absmax - offset quantized with the
// dynamic code through the 65536-point table, as the CPU kernel (and bitsandbytes' CPU kernel) does.
__global__ void __launch_bounds__(kNf4Threads) nf4_quantize_statistics_kernel(Nf4QuantizeStatisticsParams p) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kNf4Threads + threadIdx.x;
  if (g >= p.groups) return;
  const int64_t start = g * nf4::kNestedBlocksize;
  const int64_t end = start + nf4::kNestedBlocksize < p.n ? start + nf4::kNestedBlocksize : p.n;
  const float offset = *p.offset;
  float am = 0.0f;
  for (int64_t i = start; i < end; ++i) am = fmaxf(am, fabsf(sub_rn(p.absmax[i], offset)));
  p.nested_absmax[g] = am;
  if (am == 0.0f) {
    for (int64_t i = start; i < end; ++i) p.codes[i] = 0;
    return;
  }
  const float inv = div_rn(1.0f, am);
  for (int64_t i = start; i < end; ++i) p.codes[i] = p.lut[lut_position_rn(mul_rn(sub_rn(p.absmax[i], offset), inv))];
}

template <typename T>
struct Nf4DequantizeParams {
  Nf4View w;
  T* out;  // [n]
  int64_t n;
  int64_t blocks;  // grid size (the loop strides by blocks · kNf4Threads bytes)
};

// out = the weight, a byte (two elements) per thread and step.
template <typename T>
__global__ void __launch_bounds__(kNf4Threads) nf4_dequantize_kernel(Nf4DequantizeParams<T> p) {
  const int64_t bytes = (p.n + 1) / 2;
  const int64_t stride = p.blocks * kNf4Threads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kNf4Threads + threadIdx.x; i < bytes; i += stride) {
    const int64_t e = 2 * i;
    p.out[e] = from_float<T>(nf4_element(p.w, e));
    if (e + 1 < p.n) p.out[e + 1] = from_float<T>(nf4_element(p.w, e + 1));
  }
}

template <typename T>
struct Nf4GemvParams {
  Nf4View w;      // [out, in]
  const T* x;     // [tokens, in], row stride x_stride
  const T* bias;  // [out] or nullptr
  T* y;           // [tokens, out], contiguous
  int64_t tokens, in, out, x_stride;
};

// y[t, o] = Σ_k x[t, k] · W[o, k] (+ bias[o]) for t < tokens ≤ kGemvTokens: one warp per output row, its lanes
// striding over k, W decoded from the packed bytes as it is read; sums in float32, one rounding to T at the end.
template <typename T>
__global__ void __launch_bounds__(kNf4Threads) nf4_gemv_kernel(Nf4GemvParams<T> p) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kGemvRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (o >= p.out) return;  // the whole warp: its shuffles below see all 32 lanes
  float acc[kGemvTokens];
#pragma unroll
  for (int t = 0; t < kGemvTokens; ++t) acc[t] = 0.0f;
  const int64_t row = o * p.in;
  for (int64_t k = lane; k < p.in; k += 32) {
    const float w = nf4_element(p.w, row + k);
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
