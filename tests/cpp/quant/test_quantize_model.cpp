// lorafuse::quantize_model (<lorafuse/quant/quantize_model.h>) and QLoRA on the reference Llama in C++: every Linear
// but lm_head becomes a Linear4bit holding quantize_nf4's bytes, inject_lora wraps them in LoraLinear4bit, training
// changes only the adapters, adapter files round-trip, model-wide merges (refused into 4 bits unless asked, all or
// nothing) and merge_and_unload to a dense model; QuantConfig's errors.
#include <ATen/ATen.h>
#include <lorafuse/config/quant_config.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/nn/lora_linear4bit.h>
#include <lorafuse/ops/nf4.h>
#include <lorafuse/peft/adapters.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/quant/quantize_model.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <cmath>

#include "catch.h"
#include "models/llama_test_util.h"
#include "nn/nn_test_util.h"

using lorafuse::LoraConfig;
using lorafuse::QuantConfig;
using lorafuse::models::Llama;
using lorafuse::models::LlamaConfig;
using lorafuse::nn::Linear4bitImpl;
using lorafuse::nn::LoraLinear4bitImpl;
using lorafuse_test::require_error_parts;

namespace {

using lorafuse_test::llama_ids;
Llama tiny_llama(uint64_t seed = 0) { return lorafuse_test::tiny_llama_nf4(seed); }

at::Tensor loss_of(Llama& model) {
  const auto input = llama_ids();
  const auto logits = model->forward(input);
  return torch::nn::functional::cross_entropy(logits.slice(1, 0, -1).reshape({-1, 50}),
                                              input.slice(1, 1).reshape({-1}));
}

}  // namespace

TEST_CASE("quantize_model replaces every Linear but lm_head by Linear4bit holding quantize_nf4's bytes",
          "[cpu][quant][nf4]") {
  auto model = tiny_llama();
  auto dense = std::dynamic_pointer_cast<lorafuse::models::LlamaForCausalLMImpl>(model->clone());
  const auto q_weight = model->named_parameters()["model.layers.1.self_attn.q_proj.weight"].clone();
  const auto paths = lorafuse::quantize_model(*model);
  CHECK(paths.size() == 2 * 7);
  CHECK(paths.front() == "model.layers.0.self_attn.q_proj");
  CHECK(std::find(paths.begin(), paths.end(), "lm_head") == paths.end());
  const auto modules = model->named_modules();
  auto q = std::dynamic_pointer_cast<Linear4bitImpl>(modules["model.layers.1.self_attn.q_proj"]);
  REQUIRE(q != nullptr);
  CHECK(std::dynamic_pointer_cast<torch::nn::LinearImpl>(modules["lm_head"]) != nullptr);
  const auto expected = lorafuse::quantize_nf4(q_weight, 64, true);
  CHECK(at::equal(q->packed, expected.packed));
  CHECK(at::equal(q->absmax, expected.absmax));
  CHECK(q->options.compute_dtype() == at::kFloat);
  // the model computes with the dequantized weights: close to the dense model, not equal
  torch::NoGradGuard no_grad;
  model->eval();
  dense->eval();
  const auto y = model->forward(llama_ids());
  const auto y_dense = dense->forward(llama_ids());
  CHECK_FALSE(at::equal(y, y_dense));
  const double relative = ((y - y_dense).norm() / y_dense.norm()).item<double>();
  INFO("relative change of the logits: " << relative);
  CHECK(relative < 0.25);
  // what the weights take: 4.127 bits per quantized weight + the dense rest
  int64_t quantized_bytes = 0, quantized_weights = 0;
  for (const auto& m : model->modules()) {
    if (auto l = std::dynamic_pointer_cast<Linear4bitImpl>(m)) {
      for (const auto& b : l->buffers()) quantized_bytes += b.numel() * b.element_size();
      quantized_weights += l->options.in_features() * l->options.out_features();
    }
  }
  CHECK(8.0 * quantized_bytes / quantized_weights < 4.2);
}

TEST_CASE("QLoRA on the reference Llama: inject_lora over Linear4bit, training changes only the adapters",
          "[cpu][quant][nf4][inject]") {
  auto model = tiny_llama(1);
  lorafuse::quantize_model(*model, QuantConfig().modules_to_not_convert({"lm_head", "down_proj"}));
  CHECK(std::dynamic_pointer_cast<torch::nn::LinearImpl>(model->named_modules()["model.layers.0.mlp.down_proj"]));
  const auto report = lorafuse::inject_lora(*model, LoraConfig().r(4).lora_alpha(8).target_modules("all-linear"));
  // six 4-bit layers and the dense down_proj per block
  CHECK(report.targets.size() == 2 * 7);
  const auto modules = model->named_modules();
  auto v = std::dynamic_pointer_cast<LoraLinear4bitImpl>(modules["model.layers.0.self_attn.v_proj"]);
  REQUIRE(v != nullptr);
  CHECK(std::dynamic_pointer_cast<lorafuse::nn::LoraLinearImpl>(modules["model.layers.0.mlp.down_proj"]) != nullptr);
  std::map<std::string, at::Tensor> before;
  for (const auto& b : model->named_buffers()) before[b.key()] = b.value().clone();
  for (const auto& p : model->named_parameters()) before[p.key()] = p.value().detach().clone();
  model->train();
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-2));
  const double first = loss_of(model).item<double>();
  double last = first;
  for (int step = 0; step < 8; ++step) {
    opt.zero_grad();
    auto loss = loss_of(model);
    loss.backward();
    opt.step();
    last = loss.item<double>();
  }
  CHECK(last < first);
  for (const auto& b : model->named_buffers()) {
    INFO(b.key());
    CHECK(at::equal(b.value(), before[b.key()]));  // the 4-bit bytes never move
  }
  int changed = 0;
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    const bool adapter = p.key().find(".lora_") != std::string::npos;
    if (!adapter) CHECK(at::equal(p.value(), before[p.key()]));
    if (adapter && !at::equal(p.value(), before[p.key()])) ++changed;
  }
  CHECK(changed == 2 * 2 * 7);

  // the adapter in PEFT's files: saved and loaded into another QLoRA model gives the same logits
  const lorafuse_test::TempDir folder("lorafuse_qlora");
  const std::string dir = folder.path + "/adapter";
  lorafuse::save_adapter(*model, dir);
  auto other = tiny_llama(1);
  lorafuse::quantize_model(*other, QuantConfig().modules_to_not_convert({"lm_head", "down_proj"}));
  lorafuse::load_adapter(*other, dir);
  model->eval();
  other->eval();
  torch::NoGradGuard no_grad;
  CHECK(at::equal(other->forward(llama_ids()), model->forward(llama_ids())));
}

TEST_CASE(
    "QLoRA model-wide merges: refused into 4 bits unless asked, reported, unmerged exactly, merge_and_unload "
    "gives a dense model",
    "[cpu][quant][nf4][merge]") {
  auto model = tiny_llama(2);
  lorafuse::quantize_model(*model);
  lorafuse::inject_lora(*model, LoraConfig().r(4).lora_alpha(8).init_lora_weights(false));
  model->eval();
  torch::NoGradGuard no_grad;
  const auto y = model->forward(llama_ids());
  std::map<std::string, at::Tensor> bytes;
  for (const auto& b : model->named_buffers()) bytes[b.key()] = b.value().clone();
  require_error_parts<c10::ValueError>([&] { lorafuse::merge_adapter(*model); }, {"merge", "4-bit", "requantize"});
  for (const auto& b : model->named_buffers()) CHECK(at::equal(b.value(), bytes[b.key()]));

  const auto report = lorafuse::merge_adapter(*model, {}, /*requantize=*/true);
  REQUIRE(report.size() == 4);  // q_proj and v_proj of two blocks
  CHECK(report.count("model.layers.1.self_attn.v_proj") == 1);
  for (const auto& [path, error] : report) {
    INFO(path);
    CHECK(error.output_error > 0.0);
    CHECK(error.output_error < 0.2);
    CHECK(error.adapter_error > 0.0);
  }
  const auto merged = model->forward(llama_ids());
  CHECK_FALSE(at::equal(merged, y));
  const double relative = ((merged - y).norm() / y.norm()).item<double>();
  INFO("relative change of the logits: " << relative);
  CHECK(relative < 0.25);
  lorafuse::unmerge_adapter(*model);
  for (const auto& b : model->named_buffers()) CHECK(at::equal(b.value(), bytes[b.key()]));
  CHECK(at::equal(model->forward(llama_ids()), y));

  // a failing merge rolls back to the earlier requantized merge, bytes and all
  lorafuse::merge_adapter(*model, {}, true);
  std::map<std::string, at::Tensor> merged_bytes;
  for (const auto& b : model->named_buffers()) merged_bytes[b.key()] = b.value().clone();
  lorafuse::add_adapter(*model, "b", LoraConfig().r(2).init_lora_weights(false));
  require_error_parts<c10::ValueError>([&] { lorafuse::merge_adapter(*model, {"b"}); }, {"requantize"});
  for (const auto& b : model->named_buffers()) CHECK(at::equal(b.value(), merged_bytes[b.key()]));
  for (const auto& [path, layer] : lorafuse::lora_layers(*model)) {
    CHECK(layer->merged_adapters() == std::vector<std::string>{"default"});
  }
  lorafuse::unmerge_adapter(*model);
  lorafuse::delete_adapter(*model, "b");

  lorafuse::merge_and_unload(*model);
  const auto modules = model->named_modules();
  auto q = std::dynamic_pointer_cast<torch::nn::LinearImpl>(modules["model.layers.0.self_attn.q_proj"]);
  REQUIRE(q != nullptr);  // dense again, holding dequant(W) + the adapter
  CHECK(std::dynamic_pointer_cast<Linear4bitImpl>(modules["model.layers.0.self_attn.k_proj"]) != nullptr);
  CHECK(at::allclose(model->forward(llama_ids()), y, 1e-4, 1e-4));
}

TEST_CASE("QuantConfig and quantize_model name what is wrong", "[cpu][quant][errors]") {
  auto model = tiny_llama();
  require_error_parts<c10::ValueError>([&] { lorafuse::quantize_model(*model, QuantConfig().quant_type("fp4")); },
                                       {"quant_type", "nf4", "fp4"});
  require_error_parts<c10::ValueError>([&] { lorafuse::quantize_model(*model, QuantConfig().blocksize(100)); },
                                       {"blocksize", "100"});
  require_error_parts<c10::TypeError>(
      [&] { lorafuse::quantize_model(*model, QuantConfig().compute_dtype(at::kDouble)); }, {"compute_dtype", "Double"});
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::quantize_model(*model, QuantConfig().modules_to_not_convert({""})); },
      {"modules_to_not_convert", "empty"});
  CHECK(std::dynamic_pointer_cast<torch::nn::LinearImpl>(model->named_modules()["model.layers.0.self_attn.q_proj"]));
  // a bad layer late in the model: refused before any layer is replaced
  {
    torch::NoGradGuard g;
    model->named_parameters()["model.layers.1.mlp.down_proj.weight"][0][0] = NAN;
  }
  require_error_parts<c10::ValueError>([&] { lorafuse::quantize_model(*model); },
                                       {"model.layers.1.mlp.down_proj", "NaN"});
  CHECK(std::dynamic_pointer_cast<torch::nn::LinearImpl>(model->named_modules()["model.layers.0.self_attn.q_proj"]));
  CHECK(QuantConfig().keeps_dense("lm_head"));
  CHECK(QuantConfig().keeps_dense("model.lm_head"));
  CHECK_FALSE(QuantConfig().keeps_dense("model.not_lm_head"));
  // a Linear held by a typed holder cannot be swapped: nothing changes
  struct TypedImpl : torch::nn::Cloneable<TypedImpl> {
    TypedImpl() { reset(); }
    void reset() override { fc = register_module("fc", torch::nn::Linear(64, 64)); }
    torch::nn::Linear fc{nullptr};
  };
  auto typed = std::make_shared<TypedImpl>();
  require_error_parts<c10::ValueError>([&] { lorafuse::quantize_model(*typed); },
                                       {"quantize_model", "fc", "LinearSlot"});
  CHECK(std::dynamic_pointer_cast<torch::nn::LinearImpl>(typed->named_children()["fc"]) != nullptr);
}
