// Helpers shared by the C++ tests of lora_linear: inputs, a float64 reference in plain ATen with the
// dropout mask rebuilt from rng_state, the fp16/bf16 accuracy rule, skipping, and exception messages.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <lorafuse/ops.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "catch.h"
#include "cuda/shared/philox.h"

// Catch2 v3 has SKIP(). v2 has none: under ctest (one process per case, LORAFUSE_SKIP_EXIT_CODE set by
// tests/cpp/CMakeLists.txt with the same SKIP_RETURN_CODE) a skipped case exits with that code, so ctest
// reports it as "Skipped", never as "Passed"; run by hand, it warns and returns early.
#if defined(LORAFUSE_CATCH2_V3)
#define LORAFUSE_SKIP(msg) SKIP(msg)
#else
#define LORAFUSE_SKIP(msg)                             \
  do {                                                 \
    WARN("skipped: " << msg);                          \
    lorafuse_test::exit_if_ctest_skip();               \
    return;                                            \
  } while (0)
#endif

namespace lorafuse_test {

// Under ctest (Catch2 v2), ends the process with the code that ctest reads as "skipped".
inline void exit_if_ctest_skip() {
  if (const char* code = std::getenv("LORAFUSE_SKIP_EXIT_CODE")) {
    std::cout << "lorafuse: test skipped" << std::endl;
    std::fflush(nullptr);
    std::_Exit(std::atoi(code));
  }
}

// A GPU that torch can use (false in a CPU-only torch, without touching CUDA there).
inline bool gpu_available() { return at::hasCUDA() && torch::cuda::is_available(); }

struct Inputs {
  at::Tensor x, weight;
  std::optional<at::Tensor> bias;
  at::Tensor lora_a, lora_b;
};

// O(1)-valued inputs drawn from a private CPU generator (the default generator is left alone), then moved to
// `device` in `dtype` (adapters in `adapter_dtype`). Nothing requires grad.
inline Inputs make_inputs(std::vector<int64_t> lead, int64_t in, int64_t out, int64_t r, at::ScalarType dtype,
                          at::ScalarType adapter_dtype, bool with_bias, at::Device device, uint64_t seed = 0) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto rnd = [&](std::vector<int64_t> shape, double std) {
    return at::normal(0.0, 1.0, shape, gen, at::TensorOptions().dtype(at::kDouble)) * std;
  };
  auto x_shape = lead;
  x_shape.push_back(in);
  const double in_std = 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(in, 1)));
  Inputs t;
  t.x = rnd(x_shape, 1.0).to(device, dtype);
  t.weight = rnd({out, in}, in_std).to(device, dtype);
  if (with_bias) t.bias = rnd({out}, 1.0).to(device, dtype);
  t.lora_a = rnd({r, in}, in_std).to(device, adapter_dtype);
  t.lora_b = rnd({out, r}, 1.0 / std::sqrt(static_cast<double>(r))).to(device, adapter_dtype);
  return t;
}

// The keep mask of x (bool, x's shape, CPU) for the (seed, offset) in rng_state, from the documented rule.
inline at::Tensor mask_from_rng_state(const at::Tensor& x, const at::Tensor& rng_state, double p) {
  const at::Tensor rs = rng_state.cpu();
  const auto seed = static_cast<uint64_t>(rs[0].item<int64_t>());
  const auto offset = static_cast<uint64_t>(rs[1].item<int64_t>());
  const uint32_t threshold = lorafuse::philox::keep_threshold(p);
  at::Tensor mask = at::empty({x.numel()}, at::kBool);
  bool* m = mask.data_ptr<bool>();
  for (int64_t e = 0; e < x.numel(); ++e) {
    m[e] = lorafuse::philox::keep(seed, offset, static_cast<uint64_t>(e), threshold);
  }
  return mask.view(x.sizes());
}

// lora_linear in plain ATen ops, in the tensors' own dtypes: the LoRA branch in the adapters' dtype (x cast
// to it), the sum in x's dtype. `mask` (bool, x's shape) is applied when p > 0.
inline at::Tensor plain_lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                    const at::Tensor& lora_b, double scale, double p, const at::Tensor& mask) {
  at::Tensor base = at::linear(x, weight, bias);
  at::Tensor xl = x.to(lora_a.scalar_type());
  if (p > 0.0) xl = xl * mask.to(xl.device(), xl.scalar_type()) / (1.0 - p);
  at::Tensor lora = at::linear(at::linear(xl, lora_a), lora_b) * scale;
  return base + lora.to(base.scalar_type());
}

// y and the grads (x, lora_a, lora_b, bias) of plain_lora_linear for copies of `t` cast to `dtype` (x, weight,
// bias) and `adapter_dtype`, through ATen's autograd.
struct Result {
  at::Tensor y;
  std::array<at::Tensor, 4> grads;  // x, lora_a, lora_b, bias (undefined when there is no bias)
};

inline Result plain_forward_backward(const Inputs& t, at::ScalarType dtype, at::ScalarType adapter_dtype,
                                     double scale, double p, const at::Tensor& mask, const at::Tensor& grad_out) {
  at::Tensor x = t.x.detach().to(dtype).set_requires_grad(true);
  at::Tensor w = t.weight.detach().to(dtype);
  std::optional<at::Tensor> b;
  if (t.bias) b = t.bias->detach().to(dtype).set_requires_grad(true);
  at::Tensor a = t.lora_a.detach().to(adapter_dtype).set_requires_grad(true);
  at::Tensor bb = t.lora_b.detach().to(adapter_dtype).set_requires_grad(true);
  at::Tensor y = plain_lora_linear(x, w, b, a, bb, scale, p, mask);
  y.backward(grad_out.to(y.scalar_type()));
  return {y.detach(), {x.grad(), a.grad(), bb.grad(), b ? b->grad() : at::Tensor()}};
}

inline double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a.detach().cpu().to(at::kDouble) - b.detach().cpu().to(at::kDouble)).abs().max().item<double>();
}

inline double max_abs(const at::Tensor& a) {
  return a.numel() == 0 ? 0.0 : a.detach().cpu().to(at::kDouble).abs().max().item<double>();
}

// fp32/fp64: |ours - ref| <= tol * max(1, |ref|max) elementwise-max (tol 1e-5 / 1e-10);
// fp16/bf16: err(ours) <= 2 * err(baseline) + atol, both against the float64 reference.
inline void check_accuracy(const std::string& name, const at::Tensor& ours, const at::Tensor& ref,
                           const at::Tensor& baseline) {
  INFO(name << ": dtype " << ours.scalar_type() << ", shape " << ours.sizes());
  REQUIRE(ours.sizes() == ref.sizes());
  const double mag = std::max(1.0, max_abs(ref));
  const double err = max_abs_diff(ours, ref);
  INFO("max error " << err << " at magnitude " << mag);
  REQUIRE(std::isfinite(err));
  switch (ours.scalar_type()) {
    case at::kDouble:
      CHECK(err <= 1e-10 * mag);
      break;
    case at::kFloat:
      CHECK(err <= 1e-5 * mag);
      break;
    default: {
      REQUIRE(baseline.defined());
      REQUIRE(baseline.scalar_type() == ours.scalar_type());
      const double err_torch = max_abs_diff(baseline, ref);
      const double atol = (ours.scalar_type() == at::kHalf ? 1e-4 : 1e-3) * mag;
      INFO("PyTorch's error " << err_torch << ", bound " << 2 * err_torch + atol);
      CHECK(err <= 2.0 * err_torch + atol);
    }
  }
}

// Runs `f`, which must throw E, and returns the message without the backtrace.
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what_without_backtrace();
  }
  FAIL("no exception was thrown");
  return {};
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace lorafuse_test
