// lorafuse::nf_code (<lorafuse/quant/nf_code.h>, the recipe in cuda/shared/nf_code.h): the NF-b code tables of the
// b-bit quantized bases. NF4 is bitsandbytes' table to the bit; every code is ascending from -1 to 1 with an exact 0
// and one more positive value than negative ones; the normal quantile is accurate to double precision.
#include <ATen/ATen.h>
#include <lorafuse/ops/nf4.h>
#include <lorafuse/quant/nf_code.h>

#include <cmath>

#include "catch.h"
#include "cuda/shared/nf_code.h"
#include "nn/nn_test_util.h"

using lorafuse_test::require_error_parts;

TEST_CASE("nf_code(4) is bitsandbytes' NF4 table to the bit", "[quant][nf_code]") {
  const at::Tensor code = lorafuse::nf_code(4);
  REQUIRE(code.scalar_type() == at::kFloat);
  REQUIRE(code.sizes() == at::IntArrayRef{16});
  CHECK(at::equal(code, lorafuse::nf4_code_map()));
}

TEST_CASE("every NF-b code is ascending in [-1, 1] with an exact 0 and one more positive value", "[quant][nf_code]") {
  for (int64_t bits = 2; bits <= 8; ++bits) {
    INFO("bits " << bits);
    const at::Tensor code = lorafuse::nf_code(bits);
    const int64_t n = int64_t{1} << bits;
    REQUIRE(code.numel() == n);
    const float* v = code.const_data_ptr<float>();
    CHECK(v[0] == -1.0f);
    CHECK(v[n - 1] == 1.0f);
    CHECK(v[n / 2 - 1] == 0.0f);
    for (int64_t i = 1; i < n; ++i) CHECK(v[i] > v[i - 1]);
    // the code is not symmetric: positives are n/2, negatives n/2 - 1, so the smallest positive is closer to 0
    CHECK(v[n / 2] < -v[n / 2 - 2]);
  }
}

TEST_CASE("NF-b codes at 2 and 3 bits", "[quant][nf_code]") {
  // 2 bits: -1, 0, Φ⁻¹(q) / Φ⁻¹(offset) with q the middle of linspace(offset, 0.5, 3), 1
  const at::Tensor two = lorafuse::nf_code(2);
  const float* v = two.const_data_ptr<float>();
  const double mid =
      lorafuse::nf::normal_quantile(static_cast<double>(lorafuse::nf::linspace_f32(0.9677083f, 0.5f, 3, 1)));
  const double top = lorafuse::nf::normal_quantile(static_cast<double>(0.9677083f));
  CHECK(v[2] == static_cast<float>(mid) / static_cast<float>(top));
  CHECK(std::abs(v[2] - 0.3379152) < 1e-6);  // Φ⁻¹(0.73385415) / Φ⁻¹(0.9677083)
  CHECK(lorafuse::nf_code(3).numel() == 8);
}

TEST_CASE("the normal quantile is accurate to double precision", "[quant][nf_code]") {
  using lorafuse::nf::normal_quantile;
  CHECK(normal_quantile(0.5) == 0.0);
  // Φ⁻¹(0.975) = 1.959963984540054..., Φ⁻¹(0.8413447460685429) = 1 (Φ(1) to double precision)
  CHECK(std::abs(normal_quantile(0.975) - 1.959963984540054) < 1e-15);
  CHECK(std::abs(normal_quantile(0.8413447460685429) - 1.0) < 1e-15);
  CHECK(std::abs(normal_quantile(0.001) + 3.090232306167814) < 1e-14);
  CHECK(std::abs(normal_quantile(1e-10) + 6.361340902404056) < 1e-12);
  for (double p = 0.01; p < 1.0; p += 0.01) {
    const double x = normal_quantile(p);
    CHECK(std::abs(0.5 * std::erfc(-x / std::sqrt(2.0)) - p) < 1e-15);
  }
}

TEST_CASE("nf_code refuses bit widths outside 2..8, naming bits", "[quant][nf_code]") {
  for (const int64_t bits : {int64_t{0}, int64_t{1}, int64_t{9}, int64_t{-4}}) {
    require_error_parts<c10::ValueError>([&] { lorafuse::nf_code(bits); },
                                         {"nf_code: bits must be in [2, 8]", "found " + std::to_string(bits)});
  }
}
