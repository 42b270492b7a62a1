// lora_linear through the C++ API (<lorafuse/ops.h>) and ATen: forward and autograd backward against a
// float64 reference in plain ATen with the op's own dropout mask (rebuilt from rng_state with the documented
// Philox rule), the building blocks lora_linear_forward / lora_linear_backward, and dropout seeding.
// [cpu] cases always run; [cuda] cases run the same checks on a GPU and skip without one.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <lorafuse/ops.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "catch.h"
#include "ops/lora_test_util.h"

using lorafuse_test::check_accuracy;
using lorafuse_test::Inputs;
using lorafuse_test::make_inputs;
using lorafuse_test::mask_from_rng_state;
using lorafuse_test::max_abs_diff;
using lorafuse_test::plain_forward_backward;

namespace {

const char* const kGradNames[4] = {"x", "lora_a", "lora_b", "bias"};

// The mask lora_linear draws right after at::manual_seed(seed): read from lora_linear_forward's rng_state
// after the same seeding.
at::Tensor op_mask(const Inputs& t, double scale, double p, uint64_t seed) {
  at::manual_seed(seed);
  const auto [y, u, rng_state] = lorafuse::lora_linear_forward(t.x, t.weight, t.bias, t.lora_a, t.lora_b, scale, p);
  return mask_from_rng_state(t.x, rng_state, p);
}

// Runs lora_linear with every input but weight requiring grad (after at::manual_seed(seed)), backpropagates
// grad_out with at::Tensor::backward() and checks y and the four gradients against the float64 reference
// (fp16/bf16: against the accuracy rule with plain ATen in the same dtypes).
void check_against_reference(const Inputs& t, double scale, double p, uint64_t seed = 1234) {
  const at::Tensor mask = op_mask(t, scale, p, seed);
  auto out_shape = t.x.sizes().vec();
  out_shape.back() = t.weight.size(0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(99);
  const at::Tensor grad_out = at::normal(0.0, 1.0, out_shape, gen, at::TensorOptions().dtype(at::kDouble))
                                  .to(t.x.device(), t.x.scalar_type());

  at::Tensor x = t.x.detach().clone().set_requires_grad(true);
  at::Tensor a = t.lora_a.detach().clone().set_requires_grad(true);
  at::Tensor bb = t.lora_b.detach().clone().set_requires_grad(true);
  std::optional<at::Tensor> b;
  if (t.bias) b = t.bias->detach().clone().set_requires_grad(true);
  at::manual_seed(seed);
  at::Tensor y = lorafuse::lora_linear(x, t.weight, b, a, bb, scale, p);
  REQUIRE(y.requires_grad());
  REQUIRE(y.scalar_type() == t.x.scalar_type());
  REQUIRE(y.device() == t.x.device());
  REQUIRE(y.sizes() == at::IntArrayRef(out_shape));
  y.backward(grad_out);
  const std::array<at::Tensor, 4> grads = {x.grad(), a.grad(), bb.grad(), b ? b->grad() : at::Tensor()};
  CHECK_FALSE(t.weight.grad().defined());

  const auto ref = plain_forward_backward(t, at::kDouble, at::kDouble, scale, p, mask, grad_out);
  const bool low = t.x.scalar_type() == at::kHalf || t.x.scalar_type() == at::kBFloat16;
  lorafuse_test::Result base;
  if (low) {
    base = plain_forward_backward(t, t.x.scalar_type(), t.lora_a.scalar_type(), scale, p, mask, grad_out);
  }
  check_accuracy("y", y, ref.y, base.y);
  const std::array<at::ScalarType, 4> dtypes = {t.x.scalar_type(), t.lora_a.scalar_type(), t.lora_b.scalar_type(),
                                                t.x.scalar_type()};
  for (int i = 0; i < 4; ++i) {
    INFO("gradient of " << kGradNames[i]);
    if (i == 3 && !b) {
      CHECK_FALSE(grads[i].defined());
      continue;
    }
    REQUIRE(grads[i].defined());
    CHECK(grads[i].scalar_type() == dtypes[i]);
    CHECK(grads[i].device() == t.x.device());
    check_accuracy(std::string("grad ") + kGradNames[i], grads[i], ref.grads[i], base.grads[i]);
  }
}

// The whole [cpu] battery on `device`.
void forward_backward_battery(at::Device device) {
  SECTION("float32, 2-D x, bias, no dropout") {
    check_against_reference(make_inputs({6}, 33, 20, 8, at::kFloat, at::kFloat, true, device), 0.5, 0.0);
  }
  SECTION("float32, 3-D x, no bias, dropout 0.1") {
    check_against_reference(make_inputs({2, 3}, 65, 17, 4, at::kFloat, at::kFloat, false, device, 1), 2.0, 0.1);
  }
  SECTION("float32, 1-D x, large sizes") {
    check_against_reference(make_inputs({}, 1023, 129, 16, at::kFloat, at::kFloat, true, device, 2), 1.0, 0.1);
  }
  SECTION("float64") {
    check_against_reference(make_inputs({4, 2}, 31, 9, 3, at::kDouble, at::kDouble, true, device, 3), 0.7, 0.2);
  }
  SECTION("bfloat16 by the accuracy rule") {
    check_against_reference(make_inputs({3, 5}, 67, 40, 8, at::kBFloat16, at::kBFloat16, true, device, 4), 0.75,
                            0.1);
  }
  SECTION("float16 by the accuracy rule") {
    check_against_reference(make_inputs({3, 5}, 67, 40, 8, at::kHalf, at::kHalf, false, device, 5), 0.75, 0.0);
  }
  SECTION("bfloat16 x with float32 adapters: adapter grads come back float32") {
    check_against_reference(make_inputs({15}, 67, 40, 16, at::kBFloat16, at::kFloat, true, device, 6), 0.75, 0.1);
  }
  SECTION("float16 x with float32 adapters") {
    check_against_reference(make_inputs({15}, 67, 40, 16, at::kHalf, at::kFloat, false, device, 7), 0.75, 0.0);
  }
  SECTION("zero tokens") {
    for (const std::vector<int64_t>& lead : {std::vector<int64_t>{0}, std::vector<int64_t>{2, 0}}) {
      for (double p : {0.0, 0.1}) {
        const Inputs t = make_inputs(lead, 9, 5, 4, at::kFloat, at::kFloat, true, device, 8);
        check_against_reference(t, 1.5, p);
        at::Tensor a = t.lora_a.detach().clone().set_requires_grad(true);
        at::Tensor y = lorafuse::lora_linear(t.x, t.weight, t.bias, a, t.lora_b, 1.5, p);
        y.sum().backward();
        // no tokens: the adapter's gradient is exactly zero, not uninitialised memory
        CHECK(at::equal(a.grad(), at::zeros_like(a)));
      }
    }
  }
  SECTION("non-contiguous x (transposed view)") {
    Inputs t = make_inputs({4, 6}, 33, 12, 4, at::kFloat, at::kFloat, true, device, 9);
    t.x = t.x.transpose(0, 1);
    REQUIRE_FALSE(t.x.is_contiguous());
    check_against_reference(t, 0.5, 0.1);
  }
}

}  // namespace

TEST_CASE("lora_linear forward and autograd backward match the float64 reference on the CPU", "[cpu]") {
  forward_backward_battery(at::kCPU);
}

TEST_CASE("only the inputs that require grad get a gradient", "[cpu]") {
  for (bool with_bias : {true, false}) {
    const Inputs t = make_inputs({3, 4}, 16, 8, 4, at::kFloat, at::kFloat, with_bias, at::kCPU);
    const at::Tensor grad_out = at::ones({3, 4, 8});
    at::manual_seed(3);
    const auto full = plain_forward_backward(t, at::kFloat, at::kFloat, 0.5, 0.1, op_mask(t, 0.5, 0.1, 3),
                                             grad_out);
    for (int wanted = 0; wanted < 4; ++wanted) {
      if (wanted == 3 && !with_bias) continue;
      INFO("bias: " << with_bias << ", only " << kGradNames[wanted] << " requires grad");
      at::Tensor x = t.x.detach().clone(), a = t.lora_a.detach().clone(), bb = t.lora_b.detach().clone();
      std::optional<at::Tensor> b;
      if (with_bias) b = t.bias->detach().clone();
      at::Tensor* leaves[4] = {&x, &a, &bb, b ? &*b : nullptr};
      leaves[wanted]->set_requires_grad(true);
      at::manual_seed(3);
      at::Tensor y = lorafuse::lora_linear(x, t.weight, b, a, bb, 0.5, 0.1);
      y.backward(grad_out);
      for (int i = 0; i < 4; ++i) {
        if (leaves[i] == nullptr) continue;
        INFO("gradient of " << kGradNames[i]);
        if (i == wanted) {
          REQUIRE(leaves[i]->grad().defined());
          CHECK(max_abs_diff(leaves[i]->grad(), full.grads[i]) < 1e-5);
        } else {
          CHECK_FALSE(leaves[i]->grad().defined());
        }
      }
    }
  }
}

TEST_CASE("nothing requiring grad gives an output without grad_fn, and weight must not require grad", "[cpu]") {
  const Inputs t = make_inputs({5}, 16, 8, 4, at::kFloat, at::kFloat, true, at::kCPU);
  const at::Tensor y = lorafuse::lora_linear(t.x, t.weight, t.bias, t.lora_a, t.lora_b, 0.5);
  CHECK_FALSE(y.requires_grad());
  const at::Tensor w = t.weight.detach().clone().set_requires_grad(true);
  const std::string msg = lorafuse_test::message_of<c10::ValueError>(
      [&] { lorafuse::lora_linear(t.x, w, t.bias, t.lora_a, t.lora_b, 0.5); });
  INFO(msg);
  CHECK(lorafuse_test::contains(msg, "weight"));
  CHECK(lorafuse_test::contains(msg, "requires_grad=True"));
  // without grad mode nothing is differentiated, and the frozen weight's flag is harmless
  at::NoGradGuard no_grad;
  CHECK(at::equal(lorafuse::lora_linear(t.x, w, t.bias, t.lora_a, t.lora_b, 0.5), y));
}

TEST_CASE("dropout follows at::manual_seed and the documented Philox mask", "[cpu]") {
  // x without zeros and lora_a = I: u = dropout(x) exactly, so the mask can be read off u
  const int64_t tokens = 37, in = 61;  // 2257 elements, not a multiple of 4
  const at::Tensor x = at::rand({tokens, in}) + 0.5;
  const at::Tensor w = at::zeros({3, in}), a = at::eye(in), bb = at::ones({3, in});
  for (double p : {0.1, 0.5}) {
    INFO("p = " << p);
    at::manual_seed(11);
    const auto [y1, u1, rng1] = lorafuse::lora_linear_forward(x, w, std::nullopt, a, bb, 1.0, p);
    at::manual_seed(11);
    const auto [y2, u2, rng2] = lorafuse::lora_linear_forward(x, w, std::nullopt, a, bb, 1.0, p);
    at::manual_seed(12);
    const auto [y3, u3, rng3] = lorafuse::lora_linear_forward(x, w, std::nullopt, a, bb, 1.0, p);
    CHECK(at::equal(y1, y2));
    CHECK(at::equal(u1, u2));
    CHECK(at::equal(rng1, rng2));
    CHECK_FALSE(at::equal(u1 != 0, u3 != 0));
    REQUIRE(rng1.scalar_type() == at::kLong);
    REQUIRE(rng1.sizes() == at::IntArrayRef({2}));
    const at::Tensor mask = mask_from_rng_state(x, rng1, p);
    CHECK(at::equal(u1 != 0, mask));
    const double kept = mask.sum().item<double>() / mask.numel();
    CHECK(std::abs(kept - (1 - p)) < 5 * std::sqrt(p * (1 - p) / mask.numel()));
    CHECK(max_abs_diff(u1, at::where(mask, x * static_cast<float>(1.0 / (1.0 - p)), at::zeros_like(x))) < 1e-6);
    // lora_linear itself draws the same mask after the same seed
    at::manual_seed(11);
    CHECK(at::equal(lorafuse::lora_linear(x, w, std::nullopt, a, bb, 1.0, p), y1));
  }
  SECTION("dropout_p = 0 does not consume the generator; p > 0 does") {
    at::manual_seed(5);
    const at::Tensor expected = at::rand({4});
    at::manual_seed(5);
    lorafuse::lora_linear(x, w, std::nullopt, a, bb, 1.0, 0.0);
    CHECK(at::equal(at::rand({4}), expected));
    at::manual_seed(5);
    lorafuse::lora_linear(x, w, std::nullopt, a, bb, 1.0, 0.3);
    CHECK_FALSE(at::equal(at::rand({4}), expected));
  }
  SECTION("dropout touches the LoRA branch only") {
    const Inputs t = make_inputs({4, 3}, 33, 17, 4, at::kFloat, at::kFloat, true, at::kCPU);
    const at::Tensor zero_b = at::zeros_like(t.lora_b);
    const at::Tensor base = at::linear(t.x, t.weight, t.bias);
    CHECK(max_abs_diff(lorafuse::lora_linear(t.x, t.weight, t.bias, t.lora_a, zero_b, 3.0, 0.5), base) <= 1e-6);
    CHECK(max_abs_diff(lorafuse::lora_linear(t.x, t.weight, t.bias, t.lora_a, t.lora_b, 3.0, 0.5), base) > 1e-3);
  }
}

TEST_CASE("backward regenerates the forward's mask", "[cpu]") {
  const Inputs t = make_inputs({16}, 48, 24, 8, at::kFloat, at::kFloat, true, at::kCPU);
  const at::Tensor grad_out = at::ones({16, 24});
  auto grads_with_seed = [&](uint64_t seed, bool draw_in_between) {
    at::Tensor a = t.lora_a.detach().clone().set_requires_grad(true);
    at::Tensor x = t.x.detach().clone().set_requires_grad(true);
    at::manual_seed(seed);
    at::Tensor y = lorafuse::lora_linear(x, t.weight, t.bias, a, t.lora_b, 1.0, 0.5);
    if (draw_in_between) {
      at::rand({1000});
      at::manual_seed(seed + 1000);
    }
    y.backward(grad_out);
    return std::make_pair(x.grad(), a.grad());
  };
  const auto plain = grads_with_seed(77, false);
  const auto disturbed = grads_with_seed(77, true);
  const auto other = grads_with_seed(78, false);
  CHECK(at::equal(plain.first, disturbed.first));
  CHECK(at::equal(plain.second, disturbed.second));
  CHECK_FALSE(at::allclose(plain.second, other.second));
  const at::Tensor mask = op_mask(t, 1.0, 0.5, 77);
  const auto ref = plain_forward_backward(t, at::kDouble, at::kDouble, 1.0, 0.5, mask, grad_out);
  CHECK(max_abs_diff(plain.first, ref.grads[0]) < 1e-4);
  CHECK(max_abs_diff(plain.second, ref.grads[1]) < 1e-4);
}

TEST_CASE("lora_linear_forward and lora_linear_backward: outputs and output_mask", "[cpu]") {
  const Inputs t = make_inputs({4, 2}, 20, 11, 3, at::kBFloat16, at::kFloat, true, at::kCPU);
  for (double p : {0.0, 0.2}) {
    INFO("p = " << p);
    at::manual_seed(21);
    const auto [y, u, rng_state] = lorafuse::lora_linear_forward(t.x, t.weight, t.bias, t.lora_a, t.lora_b, 0.5, p);
    at::manual_seed(21);
    CHECK(at::equal(y, lorafuse::lora_linear(t.x, t.weight, t.bias, t.lora_a, t.lora_b, 0.5, p)));
    CHECK(u.sizes() == at::IntArrayRef({8, 3}));
    CHECK(u.scalar_type() == at::kFloat);  // accumulation dtype for bf16 x
    CHECK(rng_state.sizes() == at::IntArrayRef({2}));
    CHECK(rng_state.scalar_type() == at::kLong);
    const at::Tensor mask = mask_from_rng_state(t.x, rng_state, p);
    at::Tensor xd = t.x.to(at::kDouble).reshape({8, 20});
    if (p > 0) xd = xd * mask.reshape({8, 20}) / (1 - p);
    CHECK(max_abs_diff(u, at::mm(xd, t.lora_a.to(at::kDouble).t())) < 1e-5);

    const at::Tensor grad_out = at::randn({4, 2, 11}).to(at::kBFloat16);
    const auto ref = plain_forward_backward(t, at::kBFloat16, at::kFloat, 0.5, p, mask, grad_out);
    const auto all = lorafuse::lora_linear_backward(grad_out, t.x, t.weight, t.lora_a, t.lora_b, u, rng_state, 0.5, p,
                                                    {true, true, true, true});
    const std::array<at::Tensor, 4> all_grads = {std::get<0>(all), std::get<1>(all), std::get<2>(all),
                                                 std::get<3>(all)};
    const std::array<at::ScalarType, 4> dtypes = {at::kBFloat16, at::kFloat, at::kFloat, at::kBFloat16};
    for (int i = 0; i < 4; ++i) {
      INFO("gradient of " << kGradNames[i]);
      CHECK(all_grads[i].scalar_type() == dtypes[i]);
      CHECK(all_grads[i].sizes() == ref.grads[i].sizes());
      // bf16 results: within a few bf16 ulps of plain ATen in the same dtypes
      CHECK(max_abs_diff(all_grads[i], ref.grads[i]) <= 0.05 * std::max(1.0, lorafuse_test::max_abs(ref.grads[i])));
    }
    for (int wanted = 0; wanted < 4; ++wanted) {
      std::array<bool, 4> mask4 = {false, false, false, false};
      mask4[wanted] = true;
      const auto one = lorafuse::lora_linear_backward(grad_out, t.x, t.weight, t.lora_a, t.lora_b, u, rng_state, 0.5,
                                                      p, mask4);
      const std::array<at::Tensor, 4> g = {std::get<0>(one), std::get<1>(one), std::get<2>(one), std::get<3>(one)};
      for (int i = 0; i < 4; ++i) {
        INFO("requested " << kGradNames[wanted] << ", checking " << kGradNames[i]);
        REQUIRE(g[i].defined());
        if (i == wanted) {
          CHECK(at::equal(g[i], all_grads[i]));
        } else {
          CHECK(g[i].sizes() == at::IntArrayRef({0}));  // unrequested: an empty [0] tensor
        }
      }
    }
    const auto none = lorafuse::lora_linear_backward(grad_out, t.x, t.weight, t.lora_a, t.lora_b, u, rng_state, 0.5,
                                                     p, {false, false, false, false});
    CHECK(std::get<0>(none).numel() == 0);
    CHECK(std::get<1>(none).numel() == 0);
    CHECK(std::get<2>(none).numel() == 0);
    CHECK(std::get<3>(none).numel() == 0);
  }
}

TEST_CASE("meta tensors: shapes and dtypes only", "[cpu]") {
  const auto meta = at::TensorOptions().device(at::kMeta);
  const at::Tensor x = at::empty({1000, 1000, 8192}, meta.dtype(at::kBFloat16));
  const at::Tensor w = at::empty({8192, 8192}, meta.dtype(at::kBFloat16));
  const at::Tensor a = at::empty({64, 8192}, meta.dtype(at::kFloat));
  const at::Tensor bb = at::empty({8192, 64}, meta.dtype(at::kFloat));
  const auto [y, u, rng_state] = lorafuse::lora_linear_forward(x, w, std::nullopt, a, bb, 2.0, 0.1);
  CHECK(y.sizes() == at::IntArrayRef({1000, 1000, 8192}));
  CHECK(y.scalar_type() == at::kBFloat16);
  CHECK(y.is_meta());
  CHECK(u.sizes() == at::IntArrayRef({1000000, 64}));
  CHECK(u.scalar_type() == at::kFloat);
  CHECK(rng_state.sizes() == at::IntArrayRef({2}));
  const auto [gx, ga, gb, gbias] = lorafuse::lora_linear_backward(at::empty_like(y), x, w, a, bb, u, rng_state, 2.0,
                                                                  0.1, {true, true, false, true});
  CHECK(gx.sizes() == x.sizes());
  CHECK(ga.sizes() == a.sizes());
  CHECK(ga.scalar_type() == at::kFloat);
  CHECK(gb.sizes() == at::IntArrayRef({0}));
  CHECK(gbias.sizes() == at::IntArrayRef({8192}));
}

TEST_CASE("lora_linear on CUDA matches the float64 reference", "[cuda]") {
  if (!lorafuse_test::gpu_available()) LORAFUSE_SKIP("no GPU");
  if (!lorafuse::has_cuda_kernels()) LORAFUSE_SKIP("this build has no CUDA kernels (see the next case)");
  forward_backward_battery(at::kCUDA);
}

TEST_CASE("dropout on CUDA follows at::manual_seed and the documented Philox mask", "[cuda]") {
  if (!lorafuse_test::gpu_available()) LORAFUSE_SKIP("no GPU");
  if (!lorafuse::has_cuda_kernels()) LORAFUSE_SKIP("this build has no CUDA kernels");
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const int64_t tokens = 257, in = 61;
  const at::Tensor x = at::rand({tokens, in}, cuda) + 0.5;
  const at::Tensor w = at::zeros({3, in}, cuda), a = at::eye(in, cuda), bb = at::ones({3, in}, cuda);
  for (double p : {0.1, 0.5}) {
    at::manual_seed(11);
    const auto [y1, u1, rng1] = lorafuse::lora_linear_forward(x, w, std::nullopt, a, bb, 1.0, p);
    at::manual_seed(11);
    const auto [y2, u2, rng2] = lorafuse::lora_linear_forward(x, w, std::nullopt, a, bb, 1.0, p);
    CHECK(at::equal(u1, u2));
    CHECK(at::equal(rng1, rng2));
    CHECK(rng1.device().is_cuda());
    CHECK(at::equal((u1 != 0).cpu(), mask_from_rng_state(x, rng1, p)));
  }
  at::manual_seed(5);
  const at::Tensor expected = at::rand({4}, cuda);
  at::manual_seed(5);
  lorafuse::lora_linear(x, w, std::nullopt, a, bb, 1.0, 0.0);
  CHECK(at::equal(at::rand({4}, cuda), expected));
}

TEST_CASE("a CUDA call without CUDA kernels raises a clear error", "[cuda]") {
  if (!lorafuse_test::gpu_available()) LORAFUSE_SKIP("no GPU");
  if (lorafuse::has_cuda_kernels()) LORAFUSE_SKIP("this build has CUDA kernels (the other [cuda] cases run)");
  const Inputs t = make_inputs({5}, 16, 8, 4, at::kFloat, at::kFloat, true, at::kCUDA);
  const std::string msg = lorafuse_test::message_of<c10::Error>(
      [&] { lorafuse::lora_linear(t.x, t.weight, t.bias, t.lora_a, t.lora_b, 0.5); });
  INFO(msg);
  CHECK(lorafuse_test::contains(msg, "no CUDA kernels"));
}
