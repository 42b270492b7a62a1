// The base-kind list (<lorafuse/nn/base_kind.h>) and the lora_add / merge ops that LoRA layers over other kinds use.
#include <ATen/ATen.h>
#include <lorafuse/nn/base_kind.h>
#include <lorafuse/ops.h>
#include <lorafuse/peft/inject.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/modules/container/moduledict.h>

#include "catch.h"
#include "nn/nn_test_util.h"

namespace {

// A LinearImpl subclass: LibTorch's forward is not virtual, so no wrapper could call this forward.
struct ScaledLinearImpl : torch::nn::LinearImpl {
  ScaledLinearImpl() : torch::nn::LinearImpl(torch::nn::LinearOptions(4, 3)) {}
  at::Tensor forward(const at::Tensor& x) { return torch::nn::LinearImpl::forward(x) * 2; }
};

}  // namespace

TEST_CASE("base kinds: exactly torch::nn::Linear; a subclass is refused by name", "[cpu][nn][base_kind]") {
  using lorafuse::nn::base_kind_of;
  REQUIRE(lorafuse::nn::base_kinds().size() == 1);
  torch::nn::Linear plain(4, 3);
  const auto* kind = base_kind_of(*plain);
  REQUIRE(kind != nullptr);
  CHECK(std::string(kind->name()) == "linear");
  CHECK(kind->in_features(*plain) == 4);
  CHECK(kind->out_features(*plain) == 3);
  auto sub = std::make_shared<ScaledLinearImpl>();
  CHECK(base_kind_of(*sub) == nullptr);

  torch::nn::ModuleDict dict;
  dict->update({{"q_proj", sub}});
  lorafuse_test::require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*dict, lorafuse::LoraConfig().target_modules({"q_proj"})); },
      {"q_proj", "ScaledLinearImpl"});
  CHECK(lorafuse::lora_layers(*dict).empty());
  CHECK(dict["q_proj"].get() == sub.get());  // nothing changed
}

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

TEST_CASE("lora_merge: rounded once from the weight; non-finite refused", "[cpu][ops][merge]") {
  at::Tensor w = at::randn({5, 7}).to(at::kHalf);
  at::Tensor a = at::randn({4, 7}), b = at::randn({5, 4});
  at::Tensor merged = lorafuse::lora_merge(w, {a, a}, {b, b}, {0.5, 0.25});
  CHECK(merged.scalar_type() == at::kHalf);
  CHECK(at::equal(merged, (w.to(at::kFloat) + 0.75 * at::mm(b, a)).to(at::kHalf)));
  CHECK(at::allclose(lorafuse::lora_delta_weight(a, b, 2.0), 2.0 * at::mm(b, a)));
  lorafuse_test::require_error_parts<c10::ValueError>([&] { lorafuse::lora_merge(w, {a}, {b * 1e6}, {1.0}); },
                                                       {"lora_merge", "non-finite", "Half"});
}
