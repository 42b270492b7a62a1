// Launch plans of the quantized-weight kernels over raw pointers, through a Launcher (the CUDA one in nf_cuda.cu, a
// CPU emulation of blocks and threads in the tests). No torch headers: the code tables come in as arrays (the host
// code builds them, nf::code and the statistics' code of csrc/ops/common/nf_checks.h).
#pragma once

#include <vector_types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cuda/nf/nf_kernel.cuh"

namespace lorafuse::cuda {

// log2 of a power of two.
inline int shift_of(int64_t power_of_two) {
  int s = 0;
  while ((int64_t{1} << s) < power_of_two) ++s;
  return s;
}

// The view of a weight in format `f`: `code` holds the 2^f.bits values of its NF code, `stat_code` (nested formats)
// the 2^f.stat_bits values of its statistics' code; `absmax` is read when the format is not nested, `codes`,
// `nested_absmax` (float32) and `offset` when it is.
inline NfView nf_view(const nf::Format& f, const uint8_t* packed, const float* absmax, const uint8_t* codes,
                      const float* nested_absmax, const float* offset, const float* code, const float* stat_code) {
  NfView v;
  v.packed = packed;
  v.bits = static_cast<int>(f.bits);
  v.block_shift = shift_of(f.blocksize);
  std::memset(v.code, 0, sizeof(v.code));
  std::memset(v.stat_code, 0, sizeof(v.stat_code));
  std::memcpy(v.code, code, sizeof(float) * (size_t{1} << f.bits));
  if (f.nested()) {
    v.codes = codes;
    v.nested_absmax = nested_absmax;
    v.offset = offset;
    v.stat_bits = static_cast<int>(f.stat_bits);
    v.stat_block_shift = shift_of(f.stat_blocksize);
    std::memcpy(v.stat_code, stat_code, sizeof(float) * (size_t{1} << f.stat_bits));
  } else {
    v.absmax = absmax;
  }
  return v;
}

// The first-level quantize kernel's parameters for w [n] (float32) in format f, whose NF code is `code`.
inline NfQuantizeParams nf_quantize_params(const nf::Format& f, const float* code, const float* w, int64_t n,
                                           float* absmax, uint8_t* packed) {
  NfQuantizeParams p{};
  p.w = w;
  p.n = n;
  p.blocksize = f.blocksize;
  p.blocks = nf::blocks_of(n, f.blocksize);
  p.bits = static_cast<int>(f.bits);
  p.absmax = absmax;
  p.packed = packed;
  p.midpoint_count = nf::fill_midpoints(code, 1 << f.bits, p.midpoints);
  p.zero_code = static_cast<uint8_t>(nf::count_below(p.midpoints, p.midpoint_count, 0.0f));
  return p;
}

// The statistics' quantize kernel's parameters for n first-level statistics in (nested) format f: `lut` for 8 bits,
// else `stat_code`, the 2^f.stat_bits values of the uniform code. scale_dtype: 0 float32, 1 float16, 2 bfloat16.
inline NfQuantizeStatisticsParams nf_quantize_statistics_params(const nf::Format& f, const float* stat_code,
                                                                const uint8_t* lut, const float* absmax,
                                                                const float* offset, int64_t n, int scale_dtype,
                                                                float* scales, uint8_t* codes) {
  NfQuantizeStatisticsParams p{};
  p.absmax = absmax;
  p.offset = offset;
  p.n = n;
  p.stat_blocksize = f.stat_blocksize;
  p.groups = nf::blocks_of(n, f.stat_blocksize);
  p.stat_bits = static_cast<int>(f.stat_bits);
  p.scale_dtype = scale_dtype;
  p.scales = scales;
  p.codes = codes;
  p.lut = lut;
  if (!f.dynamic_statistics()) p.midpoint_count = nf::fill_midpoints(stat_code, 1 << f.stat_bits, p.midpoints);
  return p;
}

template <typename Launcher>
void run_nf_quantize(const Launcher& launch, const NfQuantizeParams& p) {
  if (p.blocks == 0) return;
  launch(nf_quantize_kernel, dim3(static_cast<unsigned>(ceil_div<int64_t>(p.blocks, kNfThreads))), kNfThreads, 0, p);
}

template <typename Launcher>
void run_nf_quantize_statistics(const Launcher& launch, const NfQuantizeStatisticsParams& p) {
  if (p.groups == 0) return;
  launch(nf_quantize_statistics_kernel, dim3(static_cast<unsigned>(ceil_div<int64_t>(p.groups, kNfThreads))),
         kNfThreads, 0, p);
}

// out [n] = the weight in T; at most max_blocks blocks (a few per SM), each looping over its share.
template <typename T, typename Launcher>
void run_nf_dequantize(const Launcher& launch, const NfView& w, T* out, int64_t n, int64_t max_blocks) {
  if (n == 0) return;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(max_blocks, ceil_div<int64_t>(n, kNfThreads)));
  launch(nf_dequantize_kernel<T>, dim3(static_cast<unsigned>(blocks)), kNfThreads, 0,
         NfDequantizeParams<T>{w, out, n, blocks});
}

// y [tokens, out] = x·Wᵀ (+ bias) for 1 ≤ tokens ≤ kGemvTokens.
template <typename T, typename Launcher>
void run_nf_gemv(const Launcher& launch, const NfGemvParams<T>& p) {
  if (p.tokens == 0 || p.out == 0) return;
  const int64_t blocks = ceil_div<int64_t>(p.out, kGemvRowsPerBlock);
  launch(nf_gemv_kernel<T>, dim3(static_cast<unsigned>(blocks)), kNfThreads, 0, p);
}

}  // namespace lorafuse::cuda
