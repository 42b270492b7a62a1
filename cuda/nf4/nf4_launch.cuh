// Launch plans of the NF4 kernels over raw pointers, through a Launcher (the CUDA one in nf4_cuda.cu, a CPU emulation
// of blocks and threads in the tests). No torch headers.
#pragma once

#include <vector_types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cuda/nf4/nf4_kernel.cuh"

namespace lorafuse::cuda {

// The view of an NF4 weight with both code tables filled in (`dynamic_code`: the 256 values of the 8-bit code).
inline Nf4View nf4_view(const uint8_t* packed, const float* absmax, const uint8_t* codes, const float* nested_absmax,
                        const float* offset, int64_t blocksize, const float* dynamic_code) {
  Nf4View v;
  v.packed = packed;
  v.absmax = absmax;
  v.codes = codes;
  v.nested_absmax = nested_absmax;
  v.offset = offset;
  v.blocksize = blocksize;
  std::memcpy(v.code, nf4::kCode, sizeof(v.code));
  std::memcpy(v.dynamic_code, dynamic_code, sizeof(v.dynamic_code));
  return v;
}

// The quantize kernel's parameters for w [n] (float32) in blocks of `blocksize`, the code tables filled in.
inline Nf4QuantizeParams nf4_quantize_params(const float* w, int64_t n, int64_t blocksize, float* absmax,
                                             uint8_t* packed) {
  Nf4QuantizeParams p{};
  p.w = w;
  p.n = n;
  p.blocksize = blocksize;
  p.blocks = ceil_div<int64_t>(n, blocksize);
  p.absmax = absmax;
  p.packed = packed;
  for (int i = 0; i < 15; ++i) p.midpoints[i] = (nf4::kCode[i] + nf4::kCode[i + 1]) / 2.0f;  // as nf4::index_of
  p.zero_code = nf4::index_of(0.0f);
  return p;
}

template <typename Launcher>
void run_nf4_quantize(const Launcher& launch, const Nf4QuantizeParams& p) {
  if (p.blocks == 0) return;
  launch(nf4_quantize_kernel, dim3(static_cast<unsigned>(ceil_div<int64_t>(p.blocks, kNf4Threads))), kNf4Threads, 0, p);
}

template <typename Launcher>
void run_nf4_quantize_statistics(const Launcher& launch, const Nf4QuantizeStatisticsParams& p) {
  if (p.groups == 0) return;
  launch(nf4_quantize_statistics_kernel, dim3(static_cast<unsigned>(ceil_div<int64_t>(p.groups, kNf4Threads))),
         kNf4Threads, 0, p);
}

// out [n] = the weight in T; at most max_blocks blocks (a few per SM), each looping over its share.
template <typename T, typename Launcher>
void run_nf4_dequantize(const Launcher& launch, const Nf4View& w, T* out, int64_t n, int64_t max_blocks) {
  if (n == 0) return;
  const int64_t bytes = (n + 1) / 2;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(max_blocks, ceil_div<int64_t>(bytes, kNf4Threads)));
  launch(nf4_dequantize_kernel<T>, dim3(static_cast<unsigned>(blocks)), kNf4Threads, 0,
         Nf4DequantizeParams<T>{w, out, n, blocks});
}

// y [tokens, out] = x·Wᵀ (+ bias) for 1 ≤ tokens ≤ kGemvTokens.
template <typename T, typename Launcher>
void run_nf4_gemv(const Launcher& launch, const Nf4GemvParams<T>& p) {
  if (p.tokens == 0 || p.out == 0) return;
  const int64_t blocks = ceil_div<int64_t>(p.out, kGemvRowsPerBlock);
  launch(nf4_gemv_kernel<T>, dim3(static_cast<unsigned>(blocks)), kNf4Threads, 0, p);
}

}  // namespace lorafuse::cuda
