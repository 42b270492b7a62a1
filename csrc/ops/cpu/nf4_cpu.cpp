// NF4 quantize / dequantize on the CPU, bit-exact with bitsandbytes' CPU backend (its rules in cuda/shared/nf4.h).
// This file is compiled without floating-point contraction (CMakeLists.txt): every product and sum is rounded
// on its own, as bitsandbytes' code rounds them.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sub.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "csrc/ops/common/nf4_checks.h"
#include "cuda/shared/nf4.h"

namespace lorafuse::cpu {
namespace {

// Finite values only: bitsandbytes turns a NaN into a NaN block statistic (and the whole block into NaN) and an
// infinity into NaN codes; with double quantization the result depends on undefined float-to-int conversions.
void check_finite(const at::Tensor& flat) {
  const auto bad = at::isfinite(flat).logical_not();
  if (!bad.any().item<bool>()) return;
  const int64_t index = at::nonzero(bad)[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "lorafuse.quantize_nf4: weight: expected finite values, found ", flat[index].item<float>(),
                    " at flat index ", index);
}

// First level: one absmax per block; the codes of a block written two per byte (blocksizes are even, so a byte
// never holds two blocks). Full blocks scale by the reciprocal of their absmax; a partial last block divides by
// its absmax clamped to kMinAbsmax, which is also what it stores — bitsandbytes' arithmetic, kept for its bits.
void quantize_blocks(const float* w, int64_t n, int64_t blocksize, float* absmax, uint8_t* packed) {
  const int64_t blocks = detail::nf4_blocks(n, blocksize);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(static_cast<size_t>(blocksize) + 1);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      float am = 0.0f;
      for (int64_t i = 0; i < len; ++i) am = std::max(am, std::fabs(w[start + i]));
      const bool full = len == blocksize;
      if (full) {
        absmax[b] = am;
        const float inv = 1.0f / std::max(am, nf4::kMinAbsmax);
        for (int64_t i = 0; i < len; ++i) codes[i] = nf4::index_of(std::clamp(w[start + i] * inv, -1.0f, 1.0f));
      } else {
        am = std::max(am, nf4::kMinAbsmax);
        absmax[b] = am;
        for (int64_t i = 0; i < len; ++i) codes[i] = nf4::index_of(std::clamp(w[start + i] / am, -1.0f, 1.0f));
      }
      int64_t count = len;
      if (count % 2) codes[count++] = nf4::index_of(0.0f);  // an odd total: the last byte's low nibble is 0's code
      for (int64_t i = 0; i < count; i += 2) packed[(start + i) / 2] = nf4::pack(codes[i], codes[i + 1]);
    }
  });
}

// Second level (double quantization): bitsandbytes' quantize_blockwise of the centred statistics with the dynamic
// code, in blocks of 256, through the 65536-point table its CPU kernel uses.
void quantize_statistics(const float* v, int64_t n, float* nested_absmax, uint8_t* codes) {
  static const std::vector<uint8_t> lut = [] {
    std::vector<uint8_t> table(nf4::kLutSize);
    nf4::build_lut(detail::dynamic_code().data(), table.data());
    return table;
  }();
  const int64_t blocks = detail::nf4_blocks(n, nf4::kNestedBlocksize);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * nf4::kNestedBlocksize;
    const int64_t end = std::min(start + nf4::kNestedBlocksize, n);
    float am = 0.0f;
    for (int64_t i = start; i < end; ++i) am = std::max(am, std::fabs(v[i]));
    nested_absmax[b] = am;
    if (am == 0.0f) {
      std::fill(codes + start, codes + end, uint8_t{0});
      continue;
    }
    const float inv = 1.0f / am;
    for (int64_t i = start; i < end; ++i) codes[i] = lut[nf4::lut_position(v[i] * inv)];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& weight,
                                                                             int64_t blocksize, bool double_quant) {
  detail::check_quantize_nf4_args(weight, blocksize);
  const at::Tensor flat = weight.reshape(-1).to(at::kFloat).contiguous();  // row-major, as bitsandbytes reads it
  check_finite(flat);
  const int64_t n = flat.numel();
  const int64_t blocks = detail::nf4_blocks(n, blocksize);
  const auto f32 = flat.options();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, f32.dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, f32);
  quantize_blocks(flat.data_ptr<float>(), n, blocksize, absmax.data_ptr<float>(), packed.data_ptr<uint8_t>());
  if (!double_quant) return {packed, absmax, at::empty({0}, f32), at::empty({0}, f32)};
  const at::Tensor offset = at::mean(absmax);  // the same reduction bitsandbytes' absmax.mean() runs
  const at::Tensor centred = absmax.sub(offset).contiguous();
  at::Tensor codes = at::empty({blocks}, f32.dtype(at::kByte));
  at::Tensor nested = at::empty({detail::nf4_blocks(blocks, nf4::kNestedBlocksize)}, f32);
  quantize_statistics(centred.data_ptr<float>(), blocks, nested.data_ptr<float>(), codes.data_ptr<uint8_t>());
  return {packed, codes, nested, offset};
}

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  const bool nested = detail::check_dequantize_nf4_args(packed, absmax, nested_absmax, offset, blocksize, shape, dtype);
  int64_t n = 1;
  for (const auto d : shape) n *= d;
  const int64_t blocks = detail::nf4_blocks(n, blocksize);
  // The float32 statistics: decoded from their 8-bit codes (code · nested absmax, then + offset) when nested.
  at::Tensor scales = at::empty({blocks}, packed.options().dtype(at::kFloat));
  float* s = scales.data_ptr<float>();
  if (nested) {
    const at::Tensor codes = absmax.contiguous();
    const at::Tensor nest = nested_absmax->contiguous();
    const uint8_t* q = codes.data_ptr<uint8_t>();
    const float* na = nest.data_ptr<float>();
    const float off = offset->to(at::kFloat).reshape(-1)[0].item<float>();
    const auto& code = detail::dynamic_code();
    for (int64_t b = 0; b < blocks; ++b) {
      const float decoded = code[q[b]] * na[b / nf4::kNestedBlocksize];
      s[b] = decoded + off;
    }
  } else {
    const at::Tensor a = absmax.contiguous();
    std::copy(a.data_ptr<float>(), a.data_ptr<float>() + blocks, s);
  }
  const at::Tensor bytes = packed.contiguous();
  const uint8_t* p = bytes.data_ptr<uint8_t>();
  at::Tensor out = at::empty({n}, packed.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t byte = p[i / 2];
      const uint8_t index = (i % 2 == 0) ? nf4::high(byte) : nf4::low(byte);
      o[i] = nf4::kCode[index] * s[i / blocksize];
    }
  });
  return out.to(dtype).reshape(shape);
}

}  // namespace
}  // namespace lorafuse::cpu

TORCH_LIBRARY_IMPL(lorafuse, CPU, m) {
  m.impl("quantize_nf4", &lorafuse::cpu::quantize_nf4_cpu);
  m.impl("dequantize_nf4", &lorafuse::cpu::dequantize_nf4_cpu);
}
