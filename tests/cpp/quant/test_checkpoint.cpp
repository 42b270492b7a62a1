// lorafuse::load_checkpoint / save_checkpoint (<lorafuse/quant/checkpoint.h>) on the reference Llama: a quantized
// model saved and loaded into a skeleton on the meta device computes the same logits; a dense checkpoint quantizes
// while it loads; what does not fit is refused before the model changes; LlamaConfig's config.json both ways.
#include <ATen/ATen.h>
#include <lorafuse/io/checkpoint.h>
#include <lorafuse/io/files.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/quant/checkpoint.h>
#include <lorafuse/quant/quantize_model.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "catch.h"
#include "models/llama_test_util.h"
#include "nn/nn_test_util.h"

using lorafuse::LoadCheckpointOptions;
using lorafuse::QuantConfig;
using lorafuse::models::Llama;
using lorafuse::models::LlamaConfig;
using lorafuse::nn::Linear4bitImpl;
using lorafuse_test::require_error_parts;
using lorafuse_test::TempDir;

namespace {

using lorafuse_test::llama_ids;
Llama tiny_llama(uint64_t seed = 0) { return lorafuse_test::tiny_llama_nf4(seed); }

LlamaConfig skeleton_config(const Llama& model) {
  return LlamaConfig(model->config).tensor_options(at::TensorOptions().device(at::kMeta).dtype(at::kFloat));
}

at::Tensor logits(Llama& model) {
  torch::NoGradGuard no_grad;
  model->eval();
  return model->forward(llama_ids());
}

}  // namespace

TEST_CASE("a quantized Llama saved and loaded into a meta skeleton computes the same logits", "[cpu][quant][nf4][io]") {
  TempDir dir;
  auto model = tiny_llama();
  lorafuse::quantize_model(*model, QuantConfig().compute_dtype(at::kFloat));
  const auto expected = logits(model);
  lorafuse::save_checkpoint(*model, dir.path, model->config.to_hf_json());

  const auto config = nlohmann::json::parse(lorafuse::io::read_text(dir.path + "/config.json", "config.json"));
  CHECK(config["model_type"] == "llama");
  CHECK(config["quantization_config"]["quant_method"] == "bitsandbytes");
  CHECK(config["quantization_config"]["bnb_4bit_use_double_quant"] == true);
  CHECK(config["quantization_config"]["llm_int8_skip_modules"] == nlohmann::json::array({"lm_head"}));
  lorafuse::io::CheckpointReader reader(dir.path);
  CHECK(reader.nf4_weights().size() == 14);
  CHECK(reader.contains("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"));

  Llama loaded(skeleton_config(model));
  REQUIRE(loaded->model->embed_tokens->weight.is_meta());
  const auto paths = lorafuse::load_checkpoint(*loaded, dir.path);
  CHECK(paths.size() == 14);
  for (const auto& p : loaded->named_parameters()) CHECK_FALSE(p.value().is_meta());
  for (const auto& b : loaded->named_buffers()) CHECK_FALSE(b.value().is_meta());
  CHECK(at::equal(logits(loaded), expected));
  // the same bytes, in a Linear4bit in the same slot
  auto q = std::dynamic_pointer_cast<Linear4bitImpl>(loaded->named_modules()["model.layers.1.mlp.down_proj"]);
  auto q0 = std::dynamic_pointer_cast<Linear4bitImpl>(model->named_modules()["model.layers.1.mlp.down_proj"]);
  REQUIRE(q != nullptr);
  CHECK(at::equal(q->packed, q0->packed));
  CHECK(at::equal(q->absmax, q0->absmax));
  // QLoRA goes on as usual
  lorafuse::inject_lora(*loaded, lorafuse::LoraConfig().r(4).lora_alpha(8));
  CHECK(at::equal(logits(loaded), expected));
  require_error_parts<c10::ValueError>([&] { lorafuse::save_checkpoint(*loaded, dir.path); },
                                       {"save_checkpoint: the model has LoRA layers", "save_adapter"});
  require_error_parts<c10::ValueError>([&] { lorafuse::load_checkpoint(*loaded, dir.path); },
                                       {"load_checkpoint: the model has LoRA layers", "before inject_lora"});
}

TEST_CASE("a dense checkpoint quantizes layer by layer while it loads", "[cpu][quant][nf4][io]") {
  TempDir dir;
  auto dense = tiny_llama(1);
  lorafuse::save_checkpoint(*dense, dir.path, dense->config.to_hf_json());
  const auto config = nlohmann::json::parse(lorafuse::io::read_text(dir.path + "/config.json", "config.json"));
  CHECK_FALSE(config.contains("quantization_config"));

  auto reference = std::dynamic_pointer_cast<lorafuse::models::LlamaForCausalLMImpl>(dense->clone());
  lorafuse::quantize_model(*reference, QuantConfig().blocksize(128));
  Llama loaded(skeleton_config(dense));
  const auto paths =
      lorafuse::load_checkpoint(*loaded, dir.path, LoadCheckpointOptions().quantize(QuantConfig().blocksize(128)));
  CHECK(paths.size() == 14);
  Llama ref(reference);
  CHECK(at::equal(logits(loaded), logits(ref)));
  CHECK(std::dynamic_pointer_cast<torch::nn::LinearImpl>(loaded->named_modules()["lm_head"]) != nullptr);
  // without quantize: a dense model equal to the saved one
  Llama plain(skeleton_config(dense));
  CHECK(lorafuse::load_checkpoint(*plain, dir.path).empty());
  CHECK(at::equal(logits(plain), logits(dense)));
  // into a model whose weights are real: copied in place, converted to the model's dtype
  auto half = Llama(LlamaConfig(dense->config).tensor_options(at::TensorOptions().dtype(at::kBFloat16)));
  lorafuse::load_checkpoint(*half, dir.path);
  const auto half_head = half->named_parameters()["lm_head.weight"];
  CHECK(half_head.scalar_type() == at::kBFloat16);
  CHECK(at::equal(half_head, dense->named_parameters()["lm_head.weight"].to(at::kBFloat16)));
  // a weight that NF4 cannot hold, named
  {
    torch::NoGradGuard no_grad;
    dense->named_parameters()["model.layers.1.mlp.up_proj.weight"][3][5] = INFINITY;
  }
  TempDir bad;
  lorafuse::save_checkpoint(*dense, bad.path, dense->config.to_hf_json());
  Llama target(skeleton_config(dense));
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::load_checkpoint(*target, bad.path, LoadCheckpointOptions().quantize(QuantConfig())); },
      {"load_checkpoint: \"model.layers.1.mlp.up_proj.weight\"", "expected finite values, found inf"});
  CHECK(target->model->embed_tokens->weight.is_meta());
}

TEST_CASE("load_checkpoint refuses what does not fit before the model changes", "[cpu][quant][io][errors]") {
  TempDir dir;
  auto model = tiny_llama();
  lorafuse::quantize_model(*model);
  lorafuse::save_checkpoint(*model, dir.path, model->config.to_hf_json());
  // another shape
  auto wider = Llama(skeleton_config(lorafuse_test::tiny_llama(0, 64, 192)));
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::load_checkpoint(*wider, dir.path); },
      {"\"model.layers.0.mlp.gate_proj.weight\" is [128, 64]", "the model's layer is [192, 64]"});
  CHECK(wider->model->embed_tokens->weight.is_meta());  // nothing loaded
  // a model with fewer layers: the checkpoint's extra tensors are named
  auto shallow = Llama(skeleton_config(model).num_hidden_layers(1));
  require_error_parts<c10::ValueError>([&] { lorafuse::load_checkpoint(*shallow, dir.path); },
                                       {"tensor(s) that the model has no place for", "model.layers.1."});
  CHECK(shallow->model->embed_tokens->weight.is_meta());
  // a model with more layers: the missing ones are named; strict(false) still refuses to leave meta tensors
  auto deep = Llama(skeleton_config(model).num_hidden_layers(3));
  require_error_parts<c10::ValueError>([&] { lorafuse::load_checkpoint(*deep, dir.path); },
                                       {"lacks", "model.layers.2."});
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::load_checkpoint(*deep, dir.path, LoadCheckpointOptions().strict(false)); },
      {"on the meta device", "model.layers.2."});
  // a real model with more layers and strict(false): loads what is there
  auto deep_real = Llama(LlamaConfig(model->config).num_hidden_layers(3));
  CHECK(lorafuse::load_checkpoint(*deep_real, dir.path, LoadCheckpointOptions().strict(false)).size() == 14);
  // a 4-bit weight where the model has no Linear layer
  TempDir odd;
  const auto q = lorafuse::quantize_nf4(at::ones({64}), 64, true);
  lorafuse::io::write_checkpoint(
      odd.path, "{}",
      lorafuse::io::nf4_checkpoint_tensors("model.norm.weight",
                                           {{q.packed, q.absmax, q.nested_absmax, q.offset}, 64, {64}, at::kFloat}));
  auto target = Llama(skeleton_config(model));
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::load_checkpoint(*target, odd.path); },
      {"stores \"model.norm.weight\" in 4 bits", "is a", "LlamaRMSNorm", "not a Linear layer"});
  // saving a skeleton
  Llama skeleton(skeleton_config(model));
  require_error_parts<c10::ValueError>([&] { lorafuse::save_checkpoint(*skeleton, dir.path); },
                                       {"is on the meta device"});
  require_error_parts<c10::ValueError>([&] { lorafuse::save_checkpoint(*model, dir.path, "[]"); },
                                       {"config_json: expected a JSON object"});
}

TEST_CASE("LlamaConfig from and to a Hugging Face config.json", "[cpu][models]") {
  const auto c = LlamaConfig::llama2_7b();
  const auto back = LlamaConfig::from_hf_json(c.to_hf_json());
  CHECK(back.hidden_size() == 4096);
  CHECK(back.num_key_value_heads() == 32);
  CHECK(back.rms_norm_eps() == 1e-5);
  CHECK(back.max_position_embeddings() == 4096);
  // transformers 5 keeps rope_theta in rope_parameters; without num_key_value_heads it is multi-head attention
  const auto v5 = LlamaConfig::from_hf_json(
      R"({"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,)"
      R"("num_attention_heads":2,"rope_parameters":{"rope_type":"default","rope_theta":500000.0}})");
  CHECK(v5.rope_theta() == 500000.0);
  CHECK(v5.num_key_value_heads() == 2);
  const std::string base =
      R"({"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,)"
      R"("num_attention_heads":2)";
  const auto refused = [&](const std::string& extra, const std::vector<std::string>& parts) {
    require_error_parts<c10::ValueError>([&] { LlamaConfig::from_hf_json(base + extra + "}"); }, parts);
  };
  CHECK(LlamaConfig::from_hf_json(base + R"(,"tie_word_embeddings":true})").tie_word_embeddings());
  refused(R"(,"tie_word_embeddings":1)", {"tie_word_embeddings: expected true or false, found 1"});
  refused(R"(,"rope_scaling":{"type":"linear","factor":2.0})", {"rope_scaling", "plain rotary"});
  refused(R"(,"rope_parameters":{"rope_type":"llama3"})", {"rope_parameters", "\"default\""});
  refused(R"(,"attention_bias":true)", {"attention_bias = true"});
  refused(R"(,"hidden_act":"gelu")", {"hidden_act: expected \"silu\""});
  refused(R"(,"head_dim":8)", {"head_dim = 8", "hidden_size / num_attention_heads = 4"});
  refused(R"(,"model_type":"mistral")", {"model_type"});
  require_error_parts<c10::ValueError>([&] { LlamaConfig::from_hf_json(R"({"model_type":"llama"})"); },
                                       {"vocab_size: expected an integer, found null"});
  require_error_parts<c10::ValueError>([&] { LlamaConfig::from_hf_json("{"); }, {"config.json: not valid JSON"});
}

TEST_CASE("a tied weight saves once and loads under any of its names", "[cpu][quant][io]") {
  TempDir dir;
  const auto make = [] {
    torch::nn::Linear shared(64, 8);
    torch::nn::ModuleDict dict;
    dict->update({{"q", shared.ptr()}, {"k", shared.ptr()}});  // one layer in two places: its weights tied
    return std::make_pair(dict, shared);
  };
  auto [model, shared] = make();
  lorafuse::save_checkpoint(*model, dir.path);
  lorafuse::io::CheckpointReader reader(dir.path);
  CHECK(reader.names() == std::vector<std::string>{"q.weight", "q.bias"});  // once, under the first name
  auto [loaded, loaded_shared] = make();
  lorafuse::load_checkpoint(*loaded, dir.path);
  CHECK(at::equal(loaded_shared->weight, shared->weight));
  // a file holding it under the other name loads too
  TempDir other;
  lorafuse::io::write_checkpoint(other.path, "{}", {{"k.weight", shared->weight * 2}, {"k.bias", shared->bias}});
  lorafuse::load_checkpoint(*loaded, other.path);
  CHECK(at::equal(loaded_shared->weight, shared->weight * 2));
  // quantizing one holder of a tied weight: that one in 4 bits, the other keeps the dense values (untied, both right)
  auto [split, split_shared] = make();
  lorafuse::load_checkpoint(*split, dir.path,
                            LoadCheckpointOptions().quantize(QuantConfig().modules_to_not_convert({"k"})));
  CHECK(split->named_children()["q"]->as<Linear4bitImpl>() != nullptr);
  CHECK(at::equal(split_shared->weight, shared->weight));
}
