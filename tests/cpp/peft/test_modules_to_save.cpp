// modules_to_save in C++ (PEFT's ModulesToSaveWrapper as lorafuse::nn::ModulesToSave): the selection rules (PEFT's
// suffix rule, task types' heads, LoRA left out inside kept modules, refusals), the reference Llama's lm_head kept
// whole: training the copy, switching adapters and scopes, files in PEFT's names both ways, merge_and_unload, clone and
// archives.
#include <ATen/ATen.h>
#include <lorafuse/io/adapter.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/modules_to_save.h>
#include <lorafuse/peft/adapters.h>
#include <lorafuse/peft/inject.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/serialize.h>

#include "catch.h"
#include "nn/nn_test_util.h"
#include "peft/tiny_llama.h"

using lorafuse::LoraConfig;
using lorafuse::ModuleInfo;
using lorafuse::nn::ModulesToSaveImpl;
using lorafuse_test::require_error_parts;

namespace {

const at::Tensor& ids() {
  static const at::Tensor t = at::arange(12, at::kLong).remainder(60).reshape({2, 6}) + 2;
  return t;
}

ModulesToSaveImpl* head_of(lorafuse::models::LlamaForCausalLM& model) {
  return lorafuse::nn::as_saved_module(model->lm_head.module().get());
}

}  // namespace

TEST_CASE("modules_to_save selects by PEFT's suffix rule and task types add their heads", "[cpu][modules_to_save]") {
  std::vector<ModuleInfo> infos = {{"bert.encoder.query", "Linear", true, 8, 8},
                                   {"bert.pooler", "BertPooler", false},
                                   {"bert.pooler.dense", "Linear", true, 8, 8},
                                   {"classifier", "Linear", true, 8, 3}};
  const auto seq = LoraConfig().target_modules("all-linear").task_type("SEQ_CLS");
  CHECK(seq.saved_modules() == std::vector<std::string>{"classifier", "score"});
  CHECK(lorafuse::select_saved_modules(infos, seq) == std::vector<size_t>{3});
  const auto chosen = lorafuse::select_targets(infos, seq);  // the classifier is kept whole: no LoRA in it
  REQUIRE(chosen.size() == 2);
  CHECK(chosen[0].index == 0);
  CHECK(chosen[1].index == 2);
  const auto pooler = LoraConfig().target_modules("all-linear").modules_to_save({"pooler"}).task_type("QUESTION_ANS");
  CHECK(pooler.saved_modules() == std::vector<std::string>{"pooler", "qa_outputs"});
  CHECK(lorafuse::select_saved_modules(infos, pooler) == std::vector<size_t>{1});
  CHECK(lorafuse::select_targets(infos, pooler).size() == 2);  // pooler.dense left out, as PEFT does

  require_error_parts<c10::ValueError>(
      [&] { lorafuse::select_saved_modules(infos, LoraConfig().modules_to_save({"head"})); },
      {"modules_to_save: [\"head\"] names no module"});
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::select_saved_modules(infos, LoraConfig().modules_to_save({"pooler", "dense"}));
      },
      {"names both \"bert.pooler\" and \"bert.pooler.dense\""});
  auto lora = infos;
  lora[3].is_lora_layer = true;
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::select_saved_modules(lora, LoraConfig().modules_to_save({"classifier"})); },
      {"names \"classifier\", a LoRA layer"});
  // a module LoRA targets that modules_to_save also names (PEFT's plain suffix rule): refused, as PEFT refuses it
  std::vector<ModuleInfo> heads = {{"pre_classifier", "Linear", true, 8, 8}, {"classifier", "Linear", true, 8, 2}};
  const auto both = LoraConfig().target_modules({"pre_classifier"}).modules_to_save({"classifier"});
  const auto targets = lorafuse::select_targets(heads, both);
  REQUIRE(targets.size() == 1);
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::select_saved_modules(heads, both, true, nullptr, {targets[0].index}); },
      {"names \"pre_classifier\"", "target_modules selects \"pre_classifier\" for LoRA"});
  require_error_parts<c10::ValueError>([&] { LoraConfig().task_type("SEQ_CLASSIFICATION").validate(); },
                                       {"task_type: expected one of PEFT's task types"});
  // the task type's heads alone naming nothing: a warning, not an error (a model may call its head otherwise)
  std::vector<std::string> warnings;
  CHECK(lorafuse::select_saved_modules({infos[0]}, LoraConfig().task_type("TOKEN_CLS"), true, &warnings).empty());
  REQUIRE(warnings.size() == 1);
  CHECK(warnings[0].find("names no module") != std::string::npos);
}

TEST_CASE("the reference Llama's lm_head trains whole, switches with its adapter and round-trips files",
          "[cpu][modules_to_save]") {
  lorafuse_test::TempDir root;
  auto base = lorafuse_test::tiny_llama();
  auto model = lorafuse_test::tiny_llama();
  torch::NoGradGuard no_grad;
  const auto plain = base->forward(ids());
  const auto report =
      lorafuse::inject_lora(*model, LoraConfig().target_modules({"q_proj"}).modules_to_save({"lm_head"}));
  CHECK(report.saved == std::vector<std::string>{"lm_head"});
  auto* head = head_of(model);
  REQUIRE(head != nullptr);
  CHECK(at::equal(model->forward(ids()), plain));  // a fresh copy computes what the original does
  CHECK(head->module_for("default")->parameters()[0].requires_grad());
  CHECK(!head->original_module->parameters()[0].requires_grad());
  CHECK(lorafuse::saved_modules(*model).size() == 1);

  head->module_for("default")->parameters()[0].add_(0.5);
  const auto trained = model->forward(ids());
  CHECK((trained - plain).abs().max().item<double>() > 1e-2);

  lorafuse::add_adapter(*model, "other", LoraConfig().target_modules({"v_proj"}).modules_to_save({"lm_head"}));
  CHECK(head->adapters().names() == std::vector<std::string>{"default", "other"});
  lorafuse::set_adapter(*model, "other");
  CHECK(at::allclose(model->forward(ids()), plain, 1e-6, 1e-6));  // other's copy and B = 0: the base's output
  CHECK(!head->module_for("default")->parameters()[0].requires_grad());
  {
    lorafuse::nn::AdapterScope scope("default");
    CHECK(at::allclose(model->forward(ids()), trained, 1e-6, 1e-6));
  }
  {
    lorafuse::nn::AdapterScope scope(std::vector<std::string>{"default", "__base__"});
    const auto mixed = model->forward(ids());
    CHECK(at::allclose(mixed[0], trained[0], 1e-6, 1e-6));
    CHECK(at::allclose(mixed[1], plain[1], 1e-6, 1e-6));
  }
  lorafuse::set_adapter(*model, "default");
  lorafuse::disable_adapters(*model);
  CHECK(at::allclose(model->forward(ids()), plain, 1e-6, 1e-6));
  lorafuse::enable_adapters(*model);

  // files: PEFT's names, modules_to_save in the config; loading into a fresh model gives the same outputs
  lorafuse::save_adapter(*model, root.path + "/a", "default");
  const auto tensors = lorafuse::io::read_safetensors(root.path + "/a/adapter_model.safetensors").tensors;
  CHECK(std::any_of(tensors.begin(), tensors.end(),
                    [](const auto& kv) { return kv.first == "base_model.model.lm_head.weight"; }));
  const auto file = lorafuse::io::read_adapter(root.path + "/a");
  CHECK(file.config.modules_to_save() == std::vector<std::string>{"lm_head"});
  REQUIRE(file.saved_modules.size() == 1);
  CHECK(file.saved_modules[0].path == "lm_head");
  auto fresh = lorafuse_test::tiny_llama();
  const auto loaded = lorafuse::load_adapter(*fresh, root.path + "/a");
  CHECK(loaded.saved == std::vector<std::string>{"lm_head"});
  CHECK(at::allclose(fresh->forward(ids()), trained, 1e-6, 1e-6));

  // clone and archives keep the copies and which one runs
  auto copy = std::dynamic_pointer_cast<lorafuse::models::LlamaForCausalLMImpl>(model->clone());
  lorafuse::models::LlamaForCausalLM cloned(copy);
  CHECK(at::allclose(cloned->forward(ids()), trained, 1e-6, 1e-6));
  std::stringstream stream;
  torch::save(model, stream);
  auto restored = lorafuse_test::tiny_llama(7);
  lorafuse::inject_lora(*restored, LoraConfig().target_modules({"q_proj"}).modules_to_save({"lm_head"}));
  lorafuse::add_adapter(*restored, "other", LoraConfig().target_modules({"v_proj"}).modules_to_save({"lm_head"}));
  torch::load(restored, stream);
  CHECK(at::allclose(restored->forward(ids()), trained, 1e-6, 1e-6));

  // merge_and_unload: the active adapter's copy takes the head's place
  lorafuse::merge_and_unload(*model);
  CHECK(model->lm_head.module()->as<torch::nn::LinearImpl>() != nullptr);
  CHECK(at::allclose(model->forward(ids()), trained, 1e-5, 1e-5));
}

TEST_CASE("modules_to_save refuses tied weights and files that do not fit", "[cpu][modules_to_save]") {
  lorafuse_test::TempDir root;
  at::manual_seed(0);
  lorafuse::models::LlamaForCausalLM tied(
      lorafuse::models::LlamaConfig().vocab_size(64).hidden_size(32).intermediate_size(48).tie_word_embeddings(true));
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*tied, LoraConfig().target_modules({"q_proj"}).modules_to_save({"lm_head"})); },
      {"modules_to_save: \"lm_head.weight\" is also \"model.embed_tokens.weight\" (tied weights)", "untie"});
  CHECK(lorafuse::lora_layers(*tied).empty());

  auto model = lorafuse_test::tiny_llama();
  lorafuse::inject_lora(*model, LoraConfig().target_modules({"q_proj"}).modules_to_save({"lm_head"}));
  lorafuse::save_adapter(*model, root.path + "/a");
  at::manual_seed(0);
  lorafuse::models::LlamaForCausalLM wider(
      lorafuse::models::LlamaConfig().vocab_size(80).hidden_size(32).intermediate_size(48));
  require_error_parts<c10::ValueError>([&] { lorafuse::load_adapter(*wider, root.path + "/a"); },
                                       {"\"lm_head\" (modules_to_save)", "\"weight\" is [64, 32]"});
  CHECK(lorafuse::lora_layers(*wider).empty());
}
