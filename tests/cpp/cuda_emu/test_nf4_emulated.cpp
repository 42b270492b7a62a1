// The NF4 CUDA kernels (cuda/nf4/) run by the CPU emulator: dequantize bit-exact with the CPU op (so with
// bitsandbytes), and the decode GEMV against a float64 reference, nested and plain statistics, partial blocks, odd
// sizes, strided rows, the 16-bit types. The same source nvcc compiles; on a GPU the [cuda] cases check the real thing.
#include <ATen/ATen.h>
#include <lorafuse/ops/nf4.h>

#include "catch.h"
#include "cuda_emu/dtype_of.h"
// the emulator's macros (threadIdx, __shared__, ...) come after other headers and before the kernels'
#include "cuda_emu/emulator.h"

#include "cuda/nf4/nf4_launch.cuh"

namespace {

using lorafuse::cuda::Nf4View;

using lorafuse_test::dtype_of;

struct Quantized {
  lorafuse::Nf4Weight q;
  at::Tensor dynamic = lorafuse::dynamic_code_map();
  int64_t blocksize;
  bool nested;

  Nf4View view() const {
    return lorafuse::cuda::nf4_view(
        q.packed.data_ptr<uint8_t>(), nested ? nullptr : q.absmax.data_ptr<float>(),
        nested ? q.absmax.data_ptr<uint8_t>() : nullptr, nested ? q.nested_absmax.data_ptr<float>() : nullptr,
        nested ? q.offset.data_ptr<float>() : nullptr, blocksize, dynamic.data_ptr<float>());
  }
  at::Tensor dequantized(at::IntArrayRef shape, at::ScalarType dtype) const {
    return lorafuse::dequantize_nf4(
        q.packed, q.absmax, nested ? std::optional<at::Tensor>(q.nested_absmax) : std::nullopt,
        nested ? std::optional<at::Tensor>(q.offset) : std::nullopt, blocksize, shape, dtype);
  }
};

Quantized quantize(const at::Tensor& w, int64_t blocksize, bool nested) {
  return {lorafuse::quantize_nf4(w, blocksize, nested), lorafuse::dynamic_code_map(), blocksize, nested};
}

template <typename T>
void check_dequantize(int64_t rows, int64_t cols, int64_t blocksize, bool nested, int64_t max_blocks) {
  at::manual_seed(rows * 131 + cols);
  const auto w = at::randn({rows, cols}) * 3;
  const auto q = quantize(w, blocksize, nested);
  at::Tensor out = at::full({rows * cols}, 7.0, at::TensorOptions().dtype(dtype_of<T>()));
  lorafuse::cuda::run_nf4_dequantize<T>(lorafuse_emu::Launcher{}, q.view(), reinterpret_cast<T*>(out.data_ptr()),
                                        rows * cols, max_blocks);
  const at::Tensor want = q.dequantized({rows, cols}, dtype_of<T>());
  INFO("rows " << rows << " cols " << cols << " blocksize " << blocksize << " nested " << nested);
  CHECK(at::equal(out.reshape({rows, cols}), want));  // bit for bit
}

template <typename T>
void check_gemv(int64_t tokens, int64_t in, int64_t out, bool nested, bool bias, int64_t x_stride) {
  at::manual_seed(tokens * 1000 + in * 10 + out);
  const auto q = quantize(at::randn({out, in}), 64, nested);
  const at::ScalarType dtype = dtype_of<T>();
  const at::Tensor storage = at::randn({tokens, x_stride}).to(dtype);
  const at::Tensor x = storage.narrow(1, 0, in);
  const at::Tensor b = bias ? at::randn({out}).to(dtype) : at::Tensor();
  at::Tensor y = at::full({tokens, out}, 7.0, at::TensorOptions().dtype(dtype));
  lorafuse::cuda::Nf4GemvParams<T> p{q.view(),
                                     reinterpret_cast<const T*>(storage.data_ptr()),
                                     bias ? reinterpret_cast<const T*>(b.data_ptr()) : nullptr,
                                     reinterpret_cast<T*>(y.data_ptr()),
                                     tokens,
                                     in,
                                     out,
                                     x_stride};
  lorafuse::cuda::run_nf4_gemv<T>(lorafuse_emu::Launcher{}, p);
  const at::Tensor w = q.dequantized({out, in}, dtype).to(at::kDouble);  // W as the layer computes with it
  at::Tensor want = at::matmul(x.to(at::kDouble), w.t());
  if (bias) want = want + b.to(at::kDouble);
  const double scale = want.abs().max().item<double>() + 1e-6;
  const double err = (y.to(at::kDouble) - want).abs().max().item<double>() / scale;
  const double tol = dtype == at::kFloat ? 1e-5 : (dtype == at::kHalf ? 2e-3 : 1e-2);  // one rounding of the output
  INFO("tokens " << tokens << " in " << in << " out " << out << " nested " << nested << " err " << err);
  CHECK(err < tol);
}

// The quantize kernels against the CPU op: the same bytes, statistics, nested statistics (offset from the CPU op: the
// host wrapper takes the mean on the CPU too).
void check_quantize(const at::Tensor& weight, int64_t blocksize, bool nested) {
  const at::Tensor flat = weight.reshape(-1).to(at::kFloat).contiguous();
  const int64_t n = flat.numel();
  const auto want = lorafuse::quantize_nf4(weight, blocksize, nested);
  auto p = lorafuse::cuda::nf4_quantize_params(flat.data_ptr<float>(), n, blocksize, nullptr, nullptr);
  at::Tensor absmax = at::full({p.blocks}, -1.0);
  at::Tensor packed = at::full({(n + 1) / 2, 1}, 0xAB, at::kByte);
  p.absmax = absmax.data_ptr<float>();
  p.packed = packed.data_ptr<uint8_t>();
  lorafuse::cuda::run_nf4_quantize(lorafuse_emu::Launcher{}, p);
  INFO("n " << n << " blocksize " << blocksize << " nested " << nested);
  CHECK(at::equal(packed, want.packed));
  if (!nested) {
    CHECK(at::equal(absmax, want.absmax));
    return;
  }
  std::vector<uint8_t> lut(lorafuse::nf4::kLutSize);
  lorafuse::nf4::build_lut(lorafuse::dynamic_code_map().data_ptr<float>(), lut.data());
  const int64_t groups = (p.blocks + 255) / 256;
  at::Tensor codes = at::full({p.blocks}, 0xAB, at::kByte);
  at::Tensor nested_absmax = at::full({groups}, -1.0);
  const at::Tensor offset = at::mean(absmax);
  lorafuse::cuda::run_nf4_quantize_statistics(
      lorafuse_emu::Launcher{}, lorafuse::cuda::Nf4QuantizeStatisticsParams{
                                    absmax.data_ptr<float>(), offset.data_ptr<float>(), p.blocks, groups,
                                    nested_absmax.data_ptr<float>(), codes.data_ptr<uint8_t>(), lut.data()});
  CHECK(at::equal(offset, want.offset));
  CHECK(at::equal(codes, want.absmax));
  CHECK(at::equal(nested_absmax, want.nested_absmax));
}

}  // namespace

TEST_CASE("emulated NF4 kernels: quantize gives the CPU op's bytes", "[cuda-emu][nf4]") {
  at::manual_seed(4);
  check_quantize(at::randn({8, 64}) * 3, 64, true);
  check_quantize(at::randn({7, 33}), 32, false);                      // odd n, a partial last block
  check_quantize(at::randn({75, 128}), 32, true);                     // 300 blocks: two groups of nested statistics
  check_quantize(at::randn({3, 300}).to(at::kBFloat16), 4096, true);  // one partial block
  check_quantize(at::zeros({4, 64}), 64, true);                       // all-zero blocks and statistics
  // ties: values exactly halfway between two codes (scaled by the block's absmax of 1) take the lower code
  at::Tensor ties = at::empty({64});
  for (int64_t i = 0; i < 64; ++i)
    ties[i] = i == 0 ? 1.0f : (lorafuse::nf4::kCode[i % 15] + lorafuse::nf4::kCode[i % 15 + 1]) / 2.0f;
  check_quantize(ties, 64, false);
}

TEST_CASE("emulated NF4 kernels: dequantize is bit-exact with the CPU op", "[cuda-emu][nf4]") {
  check_dequantize<float>(8, 64, 64, true, 1024);
  check_dequantize<float>(7, 33, 32, false, 1024);    // odd n: a last byte with one element, partial blocks
  check_dequantize<float>(40, 100, 128, true, 2);     // two blocks looping over many bytes each
  check_dequantize<float>(3, 300, 4096, true, 1024);  // one partial block
  check_dequantize<__nv_bfloat16>(9, 64, 64, true, 1024);
  check_dequantize<__half>(5, 77, 64, false, 3);
  // 300 blocks of 32: nested statistics over more than one group of 256 blocks
  check_dequantize<float>(75, 128, 32, true, 16);
}

TEST_CASE("emulated NF4 kernels: the decode GEMV against float64", "[cuda-emu][nf4]") {
  check_gemv<float>(1, 64, 9, true, true, 64);
  check_gemv<float>(5, 33, 17, false, false, 40);  // odd in_features (rows straddle bytes), strided rows
  check_gemv<float>(16, 128, 8, true, true, 128);
  check_gemv<__nv_bfloat16>(3, 96, 12, true, true, 96);
  check_gemv<__half>(16, 64, 10, false, true, 70);
}
