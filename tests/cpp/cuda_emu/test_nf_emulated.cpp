// The quantized-weight CUDA kernels (cuda/nf/) run by the CPU emulator, over the whole format family (NF-b for b = 2
// .. 8; statistics in float32, bitsandbytes' dynamic 8 bits or the uniform 2 .. 7 bits, float32 / bfloat16 / float16
// scales): quantize gives the CPU op's bytes, dequantize is bit-exact with the CPU op (so NF4 with bitsandbytes), and
// the decode GEMV matches a float64 reference; partial blocks, odd sizes, strided rows, the 16-bit types. The same
// source nvcc compiles; on a GPU the tests/python/ops CUDA cases check the real thing.
#include <ATen/ATen.h>
#include <lorafuse/ops/nf.h>

#include <sstream>
#include <vector>

#include "catch.h"
#include "csrc/ops/common/nf_checks.h"
#include "cuda_emu/dtype_of.h"
// the emulator's macros (threadIdx, __shared__, ...) come after other headers and before the kernels'
#include "cuda_emu/emulator.h"

#include "cuda/nf/nf_launch.cuh"

namespace {

using lorafuse::cuda::NfView;
using lorafuse_test::dtype_of;

struct Case {
  std::vector<int64_t> format;
  at::ScalarType stat_dtype = at::kFloat;
};

std::string describe(const Case& c) {
  std::ostringstream out;
  out << "format [" << c.format[0] << ", " << c.format[1] << ", " << c.format[2] << ", " << c.format[3] << "] scales "
      << c.stat_dtype;
  return out.str();
}

// The formats the tests sweep: bitsandbytes' NF4 (with and without double quantization) and LQ-LoRA's others.
const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {{4, 64, 8, 256}},                 // bitsandbytes' QLoRA default
      {{4, 32, 0, 0}},                   // NF4 without double quantization
      {{2, 16, 3, 64}},                  // 2 bits, uniform 3-bit statistics
      {{3, 64, 8, 16}},                  // 3 bits, dynamic statistics in small groups
      {{5, 32, 4, 256}, at::kBFloat16},  // codes crossing byte boundaries; bfloat16 scales
      {{8, 16, 2, 16}, at::kHalf},       // the widest code; float16 scales
      {{6, 128, 7, 32}},                 //
      {{3, 4096, 8, 256}, at::kHalf},    // one partial block
      {{7, 16, 0, 0}},                   // float32 statistics, 7 bits
  };
  return all;
}

struct Quantized {
  lorafuse::NfWeight q;
  lorafuse::nf::Format f;
  at::Tensor nested_f32;  // the scales widened to float32 (what the host wrapper hands the kernels)
  std::vector<float> code, stat_code;

  NfView view() const {
    return lorafuse::cuda::nf_view(
        f, q.packed.data_ptr<uint8_t>(), f.nested() ? nullptr : q.absmax.data_ptr<float>(),
        f.nested() ? q.absmax.data_ptr<uint8_t>() : nullptr, f.nested() ? nested_f32.data_ptr<float>() : nullptr,
        f.nested() ? q.offset.data_ptr<float>() : nullptr, code.data(), f.nested() ? stat_code.data() : nullptr);
  }
  at::Tensor dequantized(at::IntArrayRef shape, at::ScalarType dtype) const {
    const std::vector<int64_t> format = lorafuse::detail::format_list(f);
    return lorafuse::dequantize_nf(q.packed, q.absmax, q.nested_absmax, q.offset, format, shape, dtype);
  }
};

Quantized quantize(const at::Tensor& w, const Case& c) {
  Quantized out;
  out.q = lorafuse::quantize_nf(w, c.format, c.stat_dtype);
  out.f = lorafuse::detail::parse_nf_format("test", c.format);
  out.nested_f32 = out.q.nested_absmax.to(at::kFloat).contiguous();
  out.code = lorafuse::detail::weight_code(out.f.bits);
  if (out.f.nested()) out.stat_code = lorafuse::detail::statistics_code(out.f.stat_bits);
  return out;
}

// The quantize kernels against the CPU op: the same codes, statistics, statistics' codes and scales (the offset as the
// host wrapper takes it: on the CPU, the mean for 8 bits, the minimum for fewer).
void check_quantize(const at::Tensor& weight, const Case& c) {
  INFO(describe(c) << " numel " << weight.numel());
  const Quantized want = quantize(weight, c);
  const auto& f = want.f;
  const at::Tensor flat = weight.reshape(-1).to(at::kFloat).contiguous();
  const int64_t n = flat.numel();
  const int64_t blocks = lorafuse::nf::blocks_of(n, f.blocksize);
  at::Tensor absmax = at::full({blocks}, -1.0);
  at::Tensor packed = at::full({lorafuse::nf::stream_bytes(n, f.bits), 1}, 0xAB, at::kByte);
  lorafuse::cuda::run_nf_quantize(lorafuse_emu::Launcher{}, lorafuse::cuda::nf_quantize_params(
                                                                f, want.code.data(), flat.data_ptr<float>(), n,
                                                                absmax.data_ptr<float>(), packed.data_ptr<uint8_t>()));
  CHECK(at::equal(packed, want.q.packed));
  if (!f.nested()) {
    CHECK(at::equal(absmax, want.q.absmax));
    return;
  }
  const std::vector<uint8_t>& lut = lorafuse::detail::dynamic_lut();
  const at::Tensor offset = lorafuse::detail::statistics_offset(f, absmax);
  at::Tensor codes = at::full({lorafuse::nf::stream_bytes(blocks, f.stat_bits)}, 0xAB, at::kByte);
  at::Tensor scales = at::full({lorafuse::nf::blocks_of(blocks, f.stat_blocksize)}, -1.0);
  const int scale_dtype = c.stat_dtype == at::kHalf ? 1 : (c.stat_dtype == at::kBFloat16 ? 2 : 0);
  lorafuse::cuda::run_nf_quantize_statistics(
      lorafuse_emu::Launcher{},
      lorafuse::cuda::nf_quantize_statistics_params(f, want.stat_code.data(), lut.data(), absmax.data_ptr<float>(),
                                                    offset.data_ptr<float>(), blocks, scale_dtype,
                                                    scales.data_ptr<float>(), codes.data_ptr<uint8_t>()));
  CHECK(at::equal(offset, want.q.offset));
  CHECK(at::equal(codes, want.q.absmax));
  CHECK(at::equal(scales.to(c.stat_dtype), want.q.nested_absmax));
}

template <typename T>
void check_dequantize(int64_t rows, int64_t cols, const Case& c, int64_t max_blocks) {
  at::manual_seed(rows * 131 + cols);
  const auto q = quantize(at::randn({rows, cols}) * 3, c);
  at::Tensor out = at::full({rows * cols}, 7.0, at::TensorOptions().dtype(dtype_of<T>()));
  lorafuse::cuda::run_nf_dequantize<T>(lorafuse_emu::Launcher{}, q.view(), reinterpret_cast<T*>(out.data_ptr()),
                                       rows * cols, max_blocks);
  INFO(describe(c) << " rows " << rows << " cols " << cols << " max_blocks " << max_blocks);
  CHECK(at::equal(out.reshape({rows, cols}), q.dequantized({rows, cols}, dtype_of<T>())));  // bit for bit
}

template <typename T>
void check_gemv(int64_t tokens, int64_t in, int64_t out, const Case& c, bool bias, int64_t x_stride) {
  at::manual_seed(tokens * 1000 + in * 10 + out);
  const auto q = quantize(at::randn({out, in}), c);
  const at::ScalarType dtype = dtype_of<T>();
  const at::Tensor storage = at::randn({tokens, x_stride}).to(dtype);
  const at::Tensor x = storage.narrow(1, 0, in);
  const at::Tensor b = bias ? at::randn({out}).to(dtype) : at::Tensor();
  at::Tensor y = at::full({tokens, out}, 7.0, at::TensorOptions().dtype(dtype));
  lorafuse::cuda::NfGemvParams<T> p{q.view(),
                                    reinterpret_cast<const T*>(storage.data_ptr()),
                                    bias ? reinterpret_cast<const T*>(b.data_ptr()) : nullptr,
                                    reinterpret_cast<T*>(y.data_ptr()),
                                    tokens,
                                    in,
                                    out,
                                    x_stride};
  lorafuse::cuda::run_nf_gemv<T>(lorafuse_emu::Launcher{}, p);
  const at::Tensor w = q.dequantized({out, in}, dtype).to(at::kDouble);  // W as the layer computes with it
  at::Tensor want = at::matmul(x.to(at::kDouble), w.t());
  if (bias) want = want + b.to(at::kDouble);
  const double scale = want.abs().max().item<double>() + 1e-6;
  const double err = (y.to(at::kDouble) - want).abs().max().item<double>() / scale;
  const double tol = dtype == at::kFloat ? 1e-5 : (dtype == at::kHalf ? 2e-3 : 1e-2);  // one rounding of the output
  INFO(describe(c) << " tokens " << tokens << " in " << in << " out " << out << " err " << err);
  CHECK(err < tol);
}

}  // namespace

TEST_CASE("emulated quantized-weight kernels: quantize gives the CPU op's bytes", "[cuda-emu][nf4][nf]") {
  at::manual_seed(4);
  for (const auto& c : cases()) {
    check_quantize(at::randn({8, 64}) * 3, c);
    check_quantize(at::randn({7, 33}), c);                     // odd n, a partial last block
    check_quantize(at::randn({75, 128}), c);                   // many blocks: several groups of statistics
    check_quantize(at::randn({3, 300}).to(at::kBFloat16), c);  // bfloat16 input
    check_quantize(at::zeros({4, 64}), c);                     // all-zero blocks and statistics
  }
  // ties: values exactly halfway between two NF4 codes (scaled by the block's absmax of 1) take the lower code
  at::Tensor ties = at::empty({64});
  for (int64_t i = 0; i < 64; ++i)
    ties[i] = i == 0 ? 1.0f : (lorafuse::nf4::kCode[i % 15] + lorafuse::nf4::kCode[i % 15 + 1]) / 2.0f;
  check_quantize(ties, Case{{4, 64, 0, 0}});
  check_quantize(ties, Case{{4, 32, 8, 256}});
}

TEST_CASE("emulated quantized-weight kernels: dequantize is bit-exact with the CPU op", "[cuda-emu][nf4][nf]") {
  for (const auto& c : cases()) {
    check_dequantize<float>(8, 64, c, 1024);
    check_dequantize<float>(7, 33, c, 1024);  // odd n: partial blocks, a last byte the codes leave partial
    check_dequantize<float>(40, 100, c, 2);   // two blocks looping over many elements each
    check_dequantize<__nv_bfloat16>(9, 64, c, 1024);
    check_dequantize<__half>(5, 77, c, 3);
  }
  check_dequantize<float>(75, 128, Case{{4, 32, 8, 256}}, 16);  // statistics over more than one group of 256
}

TEST_CASE("emulated quantized-weight kernels: the decode GEMV against float64", "[cuda-emu][nf4][nf]") {
  for (const auto& c : cases()) {
    check_gemv<float>(1, 64, 9, c, true, 64);
    check_gemv<float>(5, 33, 17, c, false, 40);  // odd in_features (rows straddle bytes), strided rows
    check_gemv<__nv_bfloat16>(3, 96, 12, c, true, 96);
  }
  check_gemv<float>(16, 128, 8, Case{{4, 64, 8, 256}}, true, 128);
  check_gemv<__half>(16, 64, 10, Case{{3, 16, 8, 16}}, true, 70);
}
