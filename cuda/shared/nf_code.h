// NF-b codes: the b-bit NormalFloat code tables (b = 2 .. 8) that LQ-LoRA's quantization configurations choose
// from, built as bitsandbytes builds its NF4 table (create_normal_map); for b = 4 they are bitsandbytes' NF4 values
// (nf4::kCode) to the bit. Host code, no torch headers: the kernels receive a table as data.
//
// The recipe, for n = 2^b values: the quantiles q_i = linspace(offset, 0.5, n/2 + 1) (the last, 0.5, dropped) give
// n/2 positive values Φ⁻¹(q_i), linspace(offset, 0.5, n/2) (last dropped) gives n/2 − 1 negative ones −Φ⁻¹(q_i), and
// 0 is exact: an asymmetric code with one more positive value. The linspace is float32 (start + step·i for the first
// half, end − step·(steps − 1 − i) for the rest, as torch.linspace computes it element by element), Φ⁻¹ is evaluated
// in double on those float32 quantiles, the values are rounded to float32, sorted, and divided (in float32) by the
// largest, so that the code spans [−1, 1]. offset = 0.9677083 for every b, bitsandbytes' NF4 constant, as the LQ-LoRA
// reference code uses it for every bit width.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lorafuse::nf {

/// bitsandbytes' NF4 offset: the largest quantile, whose value becomes 1.
constexpr double kOffset = 0.9677083;
/// The bit widths a code exists for.
constexpr int kMinBits = 2;
constexpr int kMaxBits = 8;

/// Φ⁻¹(p), the standard normal quantile, for p in (0, 1), to double precision: Acklam's rational approximation
/// (relative error below 1.2e-9), then one Halley step on Φ(x) = erfc(−x/√2)/2.
inline double normal_quantile(double p) {
  constexpr double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,  -2.759285104469687e+02,
                          1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  constexpr double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
                          -1.328068155288572e+01};
  constexpr double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                          -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  constexpr double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00};
  constexpr double low = 0.02425;
  double x;
  if (p < low) {
    const double q = std::sqrt(-2 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  } else if (p <= 1 - low) {
    const double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
  } else {
    const double q = std::sqrt(-2 * std::log(1 - p));
    x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  const double e = 0.5 * std::erfc(-x / std::sqrt(2.0)) - p;
  const double u = e * std::sqrt(2 * M_PI) * std::exp(x * x / 2);
  return x - u / (1 + x * u / 2);
}

/// Element i of a float32 linspace(start, end, steps), computed as torch.linspace computes it element by element.
inline float linspace_f32(float start, float end, int64_t steps, int64_t i) {
  const float step = (end - start) / static_cast<float>(steps - 1);
  return i < steps / 2 ? start + step * static_cast<float>(i) : end - step * static_cast<float>(steps - i - 1);
}

/// The 2^bits values of the NF-bits code, ascending: −1 first, an exact 0 at index 2^(bits−1) − 1, 1 last.
/// `bits` must be in [kMinBits, kMaxBits] (the caller checks).
inline std::vector<float> code(int bits) {
  const int64_t half = int64_t{1} << (bits - 1);
  const auto start = static_cast<float>(kOffset);
  std::vector<float> values;
  values.reserve(static_cast<size_t>(2 * half));
  for (int64_t i = 0; i < half; ++i) {  // positive: linspace(offset, 0.5, half + 1) without its last element
    values.push_back(static_cast<float>(normal_quantile(static_cast<double>(linspace_f32(start, 0.5f, half + 1, i)))));
  }
  values.push_back(0.0f);
  for (int64_t i = 0; i + 1 < half; ++i) {  // negative: linspace(offset, 0.5, half) without its last element
    values.push_back(-static_cast<float>(normal_quantile(static_cast<double>(linspace_f32(start, 0.5f, half, i)))));
  }
  std::sort(values.begin(), values.end());
  const float largest = values.back();
  for (auto& v : values) v /= largest;
  return values;
}

}  // namespace lorafuse::nf
