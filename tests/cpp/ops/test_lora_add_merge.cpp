// The ops lora_add (the LoRA branch on a base's own output) and lora_delta_weight / lora_merge.
#include <ATen/ATen.h>
#include <lorafuse/ops.h>
#include <torch/csrc/autograd/autograd.h>

#include "catch.h"
#include "nn/nn_test_util.h"

TEST_CASE("lora_add: base_out + scale·x·Aᵀ·Bᵀ and its gradients", "[cpu][ops][lora_add]") {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor base_out = at::randn({2, 3, 5}, f64).requires_grad_(true);
  at::Tensor x = at::randn({2, 3, 7}, f64).requires_grad_(true);
  at::Tensor a = at::randn({4, 7}, f64).requires_grad_(true);
  at::Tensor b = at::randn({5, 4}, f64).requires_grad_(true);
  at::Tensor y = lorafuse::lora_add(base_out, x, a, b, 0.5);
  at::Tensor ref = base_out + 0.5 * at::matmul(at::matmul(x, a.t()), b.t());
  CHECK(at::allclose(y, ref, 1e-12, 1e-12));
  at::Tensor grad = at::randn_like(y);
  auto ours = torch::autograd::grad({y}, {base_out, x, a, b}, {grad});
  auto theirs = torch::autograd::grad({ref}, {base_out, x, a, b}, {grad});
  for (size_t i = 0; i < ours.size(); ++i) CHECK(at::allclose(ours[i], theirs[i], 1e-12, 1e-12));
}

TEST_CASE("lora_merge: rounded once from the weight, non-finite refused", "[cpu][ops][merge]") {
  at::Tensor w = at::randn({5, 7}).to(at::kHalf);
  at::Tensor a = at::randn({4, 7}), b = at::randn({5, 4});
  at::Tensor merged = lorafuse::lora_merge(w, {a, a}, {b, b}, {0.5, 0.25});
  CHECK(merged.scalar_type() == at::kHalf);
  CHECK(at::equal(merged, (w.to(at::kFloat) + 0.75 * at::mm(b, a)).to(at::kHalf)));
  CHECK(at::allclose(lorafuse::lora_delta_weight(a, b, 2.0), 2.0 * at::mm(b, a)));
  lorafuse_test::require_error_parts<c10::ValueError>([&] { lorafuse::lora_merge(w, {a}, {b * 1e6}, {1.0}); },
                                                       {"lora_merge", "non-finite", "Half"});
}
