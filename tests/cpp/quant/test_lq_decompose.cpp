// lorafuse::lq_decompose (<lorafuse/quant/lq_decompose.h>) and the quantized-weight ops at other bit widths
// (<lorafuse/ops/nf.h>) from LibTorch: the numbers are checked against references in tests/python; here the C++ API
// works without Python — a round trip at 3 bits, the LoRA op over it, a planted decomposition found exactly, the best
// iterate kept, and errors that name the argument.
#include <ATen/ATen.h>
#include <lorafuse/ops/nf.h>
#include <lorafuse/quant/lq_decompose.h>

#include <algorithm>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse_test::require_error_parts;

TEST_CASE("quantize_nf and nf_lora_linear at 3 bits from C++", "[quant][nf]") {
  at::manual_seed(0);
  const std::vector<int64_t> format = {3, 64, 4, 64};
  const at::Tensor w = at::randn({40, 72});
  const lorafuse::NfWeight q = lorafuse::quantize_nf(w, format, at::kBFloat16);
  CHECK(q.packed.numel() == (40 * 72 * 3 + 7) / 8);
  CHECK(q.nested_absmax.scalar_type() == at::kBFloat16);
  const at::Tensor dense =
      lorafuse::dequantize_nf(q.packed, q.absmax, q.nested_absmax, q.offset, format, {40, 72}, at::kFloat);
  const double rel = (dense - w).norm().item<double>() / w.norm().item<double>();
  CHECK(rel > 0.05);  // 3 bits: coarse,
  CHECK(rel < 0.3);   // but the weight
  const at::Tensor x = at::randn({5, 72});
  const at::Tensor a = at::randn({4, 72}) * 0.1, b = at::randn({40, 4}) * 0.1;
  const at::Tensor y =
      lorafuse::nf_lora_linear(x, q.packed, q.absmax, q.nested_absmax, q.offset, format, 40, std::nullopt, a, b, 0.5);
  CHECK(at::allclose(y, at::mm(x, dense.t()) + 0.5 * at::mm(at::mm(x, a.t()), b.t()), 1e-5, 1e-5));
  CHECK(lorafuse::nf_bits_per_weight({4, 64, 8, 256}) == 4.0 + 8.0 / 64 + 32.0 / (64 * 256));
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::quantize_nf(w, {3, 64, 1, 64});
      },
      {"lorafuse.quantize_nf: format: stat_bits: expected 0", "found 1"});
}

TEST_CASE("lq_decompose finds a planted Q + L1·L2 and keeps the best iterate", "[quant][lq_decompose]") {
  at::manual_seed(1);
  const std::vector<int64_t> format = {4, 64, 0, 0};
  at::Tensor corner = at::zeros({64, 96});
  corner.narrow(0, 0, 32).narrow(1, 0, 48).copy_(at::randn({32, 48}) * 0.05);
  const lorafuse::NfWeight q0 = lorafuse::quantize_nf(corner, format);
  at::Tensor low = at::zeros({64, 96});
  low.narrow(0, 32, 32).narrow(1, 48, 48).copy_(at::mm(at::randn({32, 6}), at::randn({6, 48})));
  const at::Tensor w =
      lorafuse::dequantize_nf(q0.packed, q0.absmax, q0.nested_absmax, q0.offset, format, {64, 96}, at::kFloat) + low;
  const auto d = lorafuse::lq_decompose(w, lorafuse::LqDecomposeOptions(6, format).max_iters(10));
  CHECK(d.error / d.norm < 1e-6);
  REQUIRE(d.l1.sizes() == at::IntArrayRef{64, 6});
  REQUIRE(d.l2.sizes() == at::IntArrayRef{6, 96});

  const at::Tensor noisy = at::randn({48, 80});
  const auto n = lorafuse::lq_decompose(noisy, lorafuse::LqDecomposeOptions(4, {2, 32, 8, 256}).max_iters(8));
  CHECK(n.error == *std::min_element(n.errors.begin(), n.errors.end()));
  CHECK(n.errors[n.best_iteration - 1] == n.error);

  require_error_parts<c10::ValueError>([&] { lorafuse::lq_decompose(w, lorafuse::LqDecomposeOptions(64, format)); },
                                       {"lq_decompose: rank: expected 1 <= rank < min(out, in) = 64", "found 64"});
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::lq_decompose(w, lorafuse::LqDecomposeOptions(4, format).fisher(at::ones({96, 64})));
      },
      {"lq_decompose: fisher: expected the weight's shape [64, 96]", "found [96, 64]"});
}
