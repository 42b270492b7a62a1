// NF4 CUDA kernels (QLoRA's 4-bit base): dequantize (bit-exact with the CPU kernel and bitsandbytes) and the decode
// GEMV (T ≤ kGemvTokens) that reads the packed weight directly, so a token costs the 4-bit bytes, not the dense ones.
// Raw pointers and params structs, no torch headers: the CPU emulator in tests/cpp/cuda_emu runs this very code.
#pragma once

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
