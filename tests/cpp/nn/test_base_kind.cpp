// The base-kind list (<lorafuse/nn/base_kind.h>).
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

TEST_CASE("base kinds: exactly torch::nn::Linear, a subclass is refused by name", "[cpu][nn][base_kind]") {
  using lorafuse::nn::base_kind_of;
  // dense, 4-bit (test_lora_linear4bit.cpp), embedding, attention (test_lora_attention.cpp)
  REQUIRE(lorafuse::nn::base_kinds().size() == 4);
  CHECK(std::string(lorafuse::nn::base_kinds().back()->name()) == "multihead_attention");
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
