// LoftQ from LibTorch (init_lora_weights "loftq"): a LoraLinear over a torch::nn::Linear starts at Q + s·B·A = Q + L·R
// (the op lorafuse::loftq_init's factors whatever the scale), inject_lora does it on every targeted layer of the
// reference Llama after checking them all, 4-bit bases and bad layers are refused by name, and the PEFT JSON keeps
// "loftq" and its loftq_config.
#include <ATen/ATen.h>
#include <lorafuse/config/peft_json.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/nn/lora_linear4bit.h>
#include <lorafuse/ops/nf.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/quant/quantize_model.h>

#include "catch.h"
#include "models/llama_test_util.h"
#include "nn/nn_test_util.h"

using lorafuse_test::require_error_parts;

TEST_CASE("LoftQ starts a LoraLinear at its quantized weight plus the low-rank rest", "[peft][loftq]") {
  at::manual_seed(5);
  torch::nn::Linear base(torch::nn::LinearOptions(48, 40));
  const at::Tensor w0 = base->weight.detach().clone();
  const auto options = lorafuse::nn::LoraAdapterOptions(4).lora_alpha(16).init_lora_weights("loftq").loftq_config(
      lorafuse::nn::LoftqConfig().loftq_bits(3).loftq_iter(2));
  lorafuse::nn::LoraLinear layer(base, options);
  const auto want = lorafuse::loftq_init(w0, 3, 4, 2);
  CHECK(at::equal(layer->base_layer->weight, want.qweight));
  CHECK(at::equal(base->weight, want.qweight));  // the caller's Linear is the base: its weight replaced
  const at::Tensor start = at::mm(layer->lora_b("default"), layer->lora_a("default")).mul(4.0);  // s = 16 / 4
  CHECK(at::allclose(start, at::mm(want.lora_b, want.lora_a), 1e-5, 1e-6));
  CHECK((want.qweight + start - w0).norm().item<double>() < (want.qweight - w0).norm().item<double>());
  CHECK(layer->adapter_options("default").init_lora_weights().str() == "loftq");

  // a 4-bit base has no full-precision weight; a merged weight must be unmerged first; nothing changes on refusal
  auto q4 = lorafuse::nn::Linear4bitImpl::from_linear(torch::nn::Linear(torch::nn::LinearOptions(32, 16)));
  require_error_parts<c10::ValueError>([&] { lorafuse::nn::LoraLinear4bit(lorafuse::nn::Linear4bit(q4), options); },
                                       {"init_lora_weights \"loftq\"", "already quantized (Linear4bit)"});
  layer->merge();
  const at::Tensor merged = layer->base_layer->weight.detach().clone();
  require_error_parts<c10::ValueError>([&] { layer->add_adapter("second", options); },
                                       {"holds merged adapters now; unmerge them first"});
  CHECK(at::equal(layer->base_layer->weight, merged));
  CHECK(layer->adapters().names() == std::vector<std::string>{"default"});
}

TEST_CASE("inject_lora with LoftQ on the reference Llama", "[peft][loftq]") {
  auto model = lorafuse_test::tiny_llama();
  model->eval();
  const at::Tensor ids = lorafuse_test::llama_ids();
  const at::Tensor before = model->forward(ids).detach();
  const auto config = lorafuse::LoraConfig().r(4).lora_alpha(8).target_modules("all-linear").init_lora_weights("loftq");
  // every layer checked before any changes: r too large for one of them
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*model, lorafuse::LoraConfig(config).r(40)); },
      {"init_lora_weights \"loftq\": \"model.layers.0.self_attn.q_proj\": r = 40 exceeds min(out, in)"});
  CHECK(lorafuse::lora_layers(*model).empty());
  CHECK(at::equal(model->forward(ids), before));

  lorafuse::inject_lora(*model, config);
  const at::Tensor with_adapter = model->forward(ids).detach();
  lorafuse::disable_adapters(*model);
  const at::Tensor quantized_only = model->forward(ids).detach();
  lorafuse::enable_adapters(*model);
  CHECK((with_adapter - before).abs().mean().item<double>() < (quantized_only - before).abs().mean().item<double>());
  CHECK(lorafuse::lora_layers(*model).size() == 14);

  // the PEFT JSON keeps the initialisation and its settings
  const auto text = lorafuse::lora_config_to_peft_json(
      lorafuse::LoraConfig(config).loftq_config(lorafuse::nn::LoftqConfig().loftq_bits(2).loftq_iter(3)), "");
  CHECK(text.find("\"init_lora_weights\": \"loftq\"") != std::string::npos);
  const auto back = lorafuse::lora_config_from_peft_json(text, "test", /*adapter_file=*/true).config;
  CHECK(back.init_lora_weights().str() == "loftq");
  CHECK(back.loftq_config() == lorafuse::nn::LoftqConfig().loftq_bits(2).loftq_iter(3));
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::lora_config_from_peft_json(
            R"({"peft_type": "LORA", "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 9}})", "file", true);
      },
      {"file: ", "loftq_bits: expected 2 .. 8"});

  // a quantized model refuses it by layer name
  auto q = lorafuse_test::tiny_llama_nf4();
  lorafuse::quantize_model(*q);
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*q, config); },
                                       {"init_lora_weights \"loftq\": \"model.layers.0.self_attn.q_proj\"",
                                        "has no full-precision torch::nn::Linear weight"});
  CHECK(lorafuse::lora_layers(*q).empty());
}
