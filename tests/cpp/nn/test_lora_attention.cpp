// LoRA on torch::nn::MultiheadAttention (nn::LoraMultiheadAttention, PEFT's lora.MultiheadAttention): injection through
// an AttentionSlot, the attention computed with W + scale·B·A in both projections (against a reference attention whose
// weights are set so), gradients, merges, adapters and scopes, files in PEFT's names, clone, archives, refusals.
#include <ATen/ATen.h>
#include <lorafuse/io/adapter.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_attention.h>
#include <lorafuse/ops/adapted_weight.h>
#include <lorafuse/peft/adapters.h>
#include <lorafuse/peft/inject.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/serialize.h>

#include <algorithm>
#include <sstream>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::LoraConfig;
using lorafuse::nn::LoraMultiheadAttentionImpl;
using lorafuse_test::require_error_parts;

namespace {

constexpr int64_t kE = 16;

// A block that calls its attention through an AttentionSlot and its head through a LinearSlot.
struct AttnBlockImpl : torch::nn::Cloneable<AttnBlockImpl>,
                       lorafuse::nn::AttentionSlotOwner,
                       lorafuse::nn::LinearSlotOwner {
  explicit AttnBlockImpl(int64_t kdim = 0) : kdim_(kdim) { reset(); }
  void reset() override {
    auto options = torch::nn::MultiheadAttentionOptions(kE, 2);
    if (kdim_ > 0) options.kdim(kdim_).vdim(kdim_);
    attn.reset(*this, "attn", options);
    head.reset(*this, "head", torch::nn::LinearOptions(kE, 4));
  }
  lorafuse::nn::AttentionSlot* attention_slot(const std::string& n) override { return n == "attn" ? &attn : nullptr; }
  lorafuse::nn::LinearSlot* linear_slot(const std::string& n) override { return n == "head" ? &head : nullptr; }
  at::Tensor forward(const at::Tensor& x) { return head(std::get<0>(attn(x, x, x))); }
  lorafuse::nn::AttentionSlot attn;
  lorafuse::nn::LinearSlot head;
  int64_t kdim_;
};
TORCH_MODULE(AttnBlock);

AttnBlock block(uint64_t seed = 0) {
  at::manual_seed(seed);
  AttnBlock b;
  b->eval();
  return b;
}

const at::Tensor& input() {
  static const at::Tensor x = [] {
    at::manual_seed(1);
    return at::randn({5, 3, kE});  // [L, N, E]
  }();
  return x;
}

LoraMultiheadAttentionImpl* attention_of(AttnBlock& b) { return b->attn.module()->as<LoraMultiheadAttentionImpl>(); }

void randomize(LoraMultiheadAttentionImpl& layer, const std::string& name, uint64_t seed) {
  at::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (at::Tensor* t :
       {&layer.lora_a(name), &layer.lora_b(name), &layer.out_proj_lora_a(name), &layer.out_proj_lora_b(name)}) {
    t->copy_(at::randn(t->sizes()) * 0.3);
  }
}

// The base block with its attention's weights set to W + scale·B·A in both projections.
at::Tensor reference(AttnBlock& base, LoraMultiheadAttentionImpl& layer, const std::string& name) {
  auto copy = std::dynamic_pointer_cast<AttnBlockImpl>(base->clone());
  auto* attn = copy->attn.module()->as<torch::nn::MultiheadAttentionImpl>();
  const double s = layer.adapter_options(name).scale();
  torch::NoGradGuard no_grad;
  attn->in_proj_weight.add_(s * at::matmul(layer.lora_b(name), layer.lora_a(name)));
  attn->out_proj->weight.add_(s * at::matmul(layer.out_proj_lora_b(name), layer.out_proj_lora_a(name)));
  return copy->forward(input());
}

}  // namespace

TEST_CASE("LoraMultiheadAttention computes with W + scale·B·A in both projections", "[cpu][attention]") {
  auto base = block();
  auto model = block();
  const auto report = lorafuse::inject_lora(*model, LoraConfig().r(2).lora_alpha(4).target_modules({"attn"}));
  CHECK(report.targets == std::vector<std::string>{"attn"});
  auto* layer = attention_of(model);
  REQUIRE(layer != nullptr);
  CHECK(lorafuse::lora_layers(*model).size() == 1);
  CHECK(layer->in_features() == kE);
  CHECK(layer->out_features() == 3 * kE);
  {
    torch::NoGradGuard no_grad;
    CHECK(at::allclose(model->forward(input()), base->forward(input()), 1e-6, 1e-6));  // B = 0: the base
  }
  randomize(*layer, "default", 3);
  const auto y = model->forward(input());
  CHECK(at::allclose(y, reference(base, *layer, "default"), 1e-5, 1e-6));
  CHECK((y - base->forward(input())).abs().max().item<double>() > 1e-2);
  y.square().mean().backward();
  for (const at::Tensor* t : {&layer->lora_a("default"), &layer->lora_b("default"), &layer->out_proj_lora_a("default"),
                              &layer->out_proj_lora_b("default")}) {
    REQUIRE(t->grad().defined());
    CHECK(t->grad().abs().max().item<double>() > 0);
  }
  CHECK(!layer->base_layer->in_proj_weight.requires_grad());

  // "all-linear" leaves the attention alone, as PEFT
  auto other = block();
  lorafuse::inject_lora(*other, LoraConfig().target_modules("all-linear"));
  CHECK(lorafuse::lora_layers(*other).front().first == "head");
  CHECK(lorafuse::lora_layers(*other).size() == 1);
}

TEST_CASE("LoraMultiheadAttention merges, switches adapters, saves in PEFT's names, clones and archives",
          "[cpu][attention]") {
  lorafuse_test::TempDir root;
  auto base = block();
  auto model = block();
  lorafuse::inject_lora(*model, LoraConfig().r(2).lora_alpha(4).target_modules({"attn"}));
  lorafuse::add_adapter(*model, "b", LoraConfig().r(4).target_modules({"attn"}));
  auto* layer = attention_of(model);
  randomize(*layer, "default", 3);
  randomize(*layer, "b", 4);
  torch::NoGradGuard no_grad;
  const auto first = reference(base, *layer, "default");
  const auto second = reference(base, *layer, "b");
  CHECK(at::allclose(model->forward(input()), first, 1e-5, 1e-6));
  lorafuse::set_adapter(*model, "b");
  CHECK(at::allclose(model->forward(input()), second, 1e-5, 1e-6));
  {
    lorafuse::nn::AdapterScope scope("default");
    CHECK(at::allclose(model->forward(input()), first, 1e-5, 1e-6));
  }
  {
    lorafuse::nn::AdapterScope scope(std::vector<std::string>{"default", "b", "default"});
    require_error_parts<c10::ValueError>([&] { model->forward(input()); }, {"one adapter per row"});
  }
  lorafuse::disable_adapters(*model);
  CHECK(at::allclose(model->forward(input()), base->forward(input()), 1e-6, 1e-6));
  lorafuse::enable_adapters(*model);

  // merges: both weights, restored exactly
  const auto in_w = layer->base_layer->in_proj_weight.clone(), out_w = layer->base_layer->out_proj->weight.clone();
  lorafuse::merge_adapter(*model);
  CHECK(at::allclose(model->forward(input()), second, 1e-5, 1e-5));
  lorafuse::unmerge_adapter(*model);
  CHECK(at::equal(layer->base_layer->in_proj_weight, in_w));
  CHECK(at::equal(layer->base_layer->out_proj->weight, out_w));

  // files: the packed projection's factors at attn, the output projection's at attn.base_layer.out_proj (PEFT's)
  lorafuse::save_adapter(*model, root.path + "/b", "b");
  const auto tensors = lorafuse::io::read_safetensors(root.path + "/b/adapter_model.safetensors").tensors;
  std::vector<std::string> names;
  for (const auto& [name, t] : tensors) names.push_back(name);
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"base_model.model.attn.base_layer.out_proj.lora_A.weight",
                                          "base_model.model.attn.base_layer.out_proj.lora_B.weight",
                                          "base_model.model.attn.lora_A.weight",
                                          "base_model.model.attn.lora_B.weight"});
  auto fresh = block();
  lorafuse::load_adapter(*fresh, root.path + "/b");
  CHECK(at::allclose(fresh->forward(input()), second, 1e-5, 1e-6));
  // a file without the output projection's part is refused by name
  std::vector<std::pair<std::string, at::Tensor>> half;
  for (const auto& [name, t] : tensors) {
    if (name.find("out_proj") == std::string::npos) half.emplace_back(name, t);
  }
  lorafuse::io::write_safetensors(root.path + "/b/adapter_model.safetensors", half);
  auto another = block();
  require_error_parts<c10::ValueError>([&] { lorafuse::load_adapter(*another, root.path + "/b"); },
                                       {"attention module \"attn\" without its output projection"});

  // clone and archives keep both projections' adapters and the active one
  auto copy = AttnBlock(std::dynamic_pointer_cast<AttnBlockImpl>(model->clone()));
  CHECK(at::allclose(copy->forward(input()), second, 1e-5, 1e-6));
  std::stringstream stream;
  torch::save(model, stream);
  auto restored = block(9);
  lorafuse::inject_lora(*restored, LoraConfig().r(2).lora_alpha(4).target_modules({"attn"}));
  lorafuse::add_adapter(*restored, "b", LoraConfig().r(4).target_modules({"attn"}));
  torch::load(restored, stream);
  CHECK(at::allclose(restored->forward(input()), second, 1e-5, 1e-6));

  // merge_and_unload: the MultiheadAttention back in the slot, the adapter inside its weights
  lorafuse::merge_and_unload(*model);
  CHECK(model->attn.module()->as<torch::nn::MultiheadAttentionImpl>() != nullptr);
  CHECK(at::allclose(model->forward(input()), second, 1e-5, 1e-5));
}

TEST_CASE("LoraMultiheadAttention refuses what it cannot compute, by name", "[cpu][attention]") {
  at::manual_seed(0);
  AttnBlock separate(8);
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*separate, LoraConfig().target_modules({"attn"})); },
                                       {"target_modules: \"attn\"", "keeps separate q/k/v weights"});
  CHECK(lorafuse::lora_layers(*separate).empty());
  auto model = block();
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*model, LoraConfig().target_modules({"attn"}).use_dora(true)); },
      {"use_dora", "\"attn\""});
  CHECK(lorafuse::lora_layers(*model).empty());
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*model, LoraConfig().target_modules({"attn"}).modules_to_save({"head"}).r(0)); },
      {"r"});
  // the attention's out_proj: never called by it, so never a target
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*model, LoraConfig().target_modules({"out_proj"})); },
      {"\"attn.out_proj\"", "target the attention itself"});
  // the op's own checks
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::lora_adapted_weight(at::zeros({4, 3}), at::zeros({2, 5}), at::zeros({4, 2}), 1.0);
      },
      {"lorafuse.lora_adapted_weight", "expected lora_a [r, 3]"});
}

TEST_CASE("bias modes reach the attention's output projection, saved under PEFT's name", "[cpu][attention]") {
  lorafuse_test::TempDir root;
  auto model = block();
  lorafuse::inject_lora(*model, LoraConfig().r(2).target_modules({"attn"}).bias("lora_only"));
  auto* layer = attention_of(model);
  CHECK(layer->base_layer->out_proj->bias.requires_grad());  // PEFT's lora_only: the output projection's bias
  CHECK(!layer->base_layer->in_proj_bias.requires_grad());
  randomize(*layer, "default", 3);
  {
    torch::NoGradGuard no_grad;
    layer->base_layer->out_proj->bias.add_(0.5);
  }
  const auto expected = model->forward(input()).detach();
  lorafuse::save_adapter(*model, root.path + "/a");
  const auto tensors = lorafuse::io::read_safetensors(root.path + "/a/adapter_model.safetensors").tensors;
  CHECK(std::any_of(tensors.begin(), tensors.end(), [](const auto& kv) {
    return kv.first == "base_model.model.attn.base_layer.out_proj.base_layer.bias";
  }));
  auto fresh = block();
  lorafuse::load_adapter(*fresh, root.path + "/a");
  torch::NoGradGuard no_grad;
  CHECK(at::allclose(fresh->forward(input()), expected, 1e-5, 1e-6));
}
