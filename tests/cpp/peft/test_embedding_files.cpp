// The C++ rules behind LoRA on embedding layers (lorafuse.nn.Embedding in Python): selection (named targets only, never
// "all-linear"), the lora_embedding op, PEFT's start, adapter files with lora_embedding_A/B and PEFT's base weights
// (save_embedding_layers), and loading base weights into the reference Llama's lm_head.
#include <ATen/ATen.h>
#include <lorafuse/io/adapter.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/nn/adapter_table.h>
#include <lorafuse/nn/lora_embedding.h>
#include <lorafuse/ops/lora_embedding.h>
#include <lorafuse/peft/adapters.h>
#include <lorafuse/peft/inject.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/serialize.h>

#include "catch.h"
#include "nn/nn_test_util.h"
#include "peft/tiny_llama.h"

using lorafuse::LoraConfig;
using lorafuse::ModuleInfo;
using lorafuse_test::require_error_parts;

namespace {

std::vector<ModuleInfo> modules() {
  ModuleInfo embed{"model.embed_tokens", "Embedding", false, 64, 32};
  embed.is_embedding = true;
  return {embed, {"model.layers.0.q_proj", "Linear", true, 32, 32}, {"lm_head", "Linear", true, 32, 64}};
}

}  // namespace

TEST_CASE("embedding layers are selected when named, never by all-linear", "[cpu][embedding]") {
  const auto infos = modules();
  const auto named = lorafuse::select_targets(infos, LoraConfig().target_modules({"embed_tokens", "q_proj"}));
  REQUIRE(named.size() == 2);
  CHECK(named[0].index == 0);
  const auto all = lorafuse::select_targets(infos, LoraConfig().target_modules("all-linear"));
  for (const auto& c : all) CHECK(c.index != 0);
  ModuleInfo norm{"model.norm", "RMSNorm", false};
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::select_targets({norm}, LoraConfig().target_modules({"norm"})); },
      {"selects \"model.norm\", a RMSNorm", "Linear and embedding layers only"});
}

TEST_CASE("lora_embedding adds scale·Aᵀ[x]·Bᵀ and PEFT's start", "[cpu][embedding]") {
  at::manual_seed(0);
  const auto table = at::randn({10, 6});
  const auto ids = at::tensor({0, 3, 9, 3}, at::kLong).reshape({2, 2});
  const auto a = at::randn({2, 10}).requires_grad_(), b = at::randn({6, 2}).requires_grad_();
  const auto base = at::embedding(table, ids);
  const auto y = lorafuse::lora_embedding(base, ids, a, b, 1.5, /*padding_idx=*/3);
  const auto expected = base + 1.5 * at::matmul(a.t().index_select(0, ids.reshape(-1)).reshape({2, 2, 2}), b.t());
  CHECK(at::allclose(y, expected, 1e-6, 1e-6));
  y.sum().backward();
  CHECK(a.grad().select(1, 3).abs().max().item<double>() == 0);  // the padding row: no gradient
  CHECK(a.grad().select(1, 9).abs().max().item<double>() > 0);
  require_error_parts<c10::TypeError>([&] { lorafuse::lora_embedding(base, ids.to(at::kFloat), a, b, 1.0); },
                                      {"lorafuse.lora_embedding", "indices", "integer"});

  torch::NoGradGuard no_grad;
  at::Tensor ea = at::ones({4, 100}), eb = at::zeros({16, 4});
  lorafuse::nn::init_adapter_weights(ea, eb, lorafuse::nn::LoraAdapterOptions(4), /*embedding=*/true);
  CHECK(ea.abs().max().item<double>() == 0);  // A zeros, B normal(0, 1): the adapter starts as a no-op
  CHECK(eb.std().item<double>() > 0.5);
  lorafuse::nn::init_adapter_weights(ea, eb, lorafuse::nn::LoraAdapterOptions(4).init_lora_weights(false), true);
  CHECK(ea.std().item<double>() > 0.5);
}

TEST_CASE("adapter files name an embedding's tensors as PEFT does and carry base weights", "[cpu][embedding]") {
  lorafuse_test::TempDir root;
  const auto infos = modules();
  at::manual_seed(1);
  std::vector<lorafuse::io::SaveSource> layers = {
      {0, lorafuse::nn::LoraAdapterOptions(4), at::randn({4, 64}), at::randn({32, 4}), {}},
      {1, lorafuse::nn::LoraAdapterOptions(4), at::randn({4, 32}), at::randn({32, 4}), {}}};
  const auto file = lorafuse::io::describe_adapter(infos, layers);
  lorafuse::io::write_adapter(root.path + "/a", file);
  const auto names = lorafuse::io::read_safetensors(root.path + "/a/adapter_model.safetensors").tensors;
  std::vector<std::string> keys;
  for (const auto& [name, t] : names) keys.push_back(name);
  CHECK(std::find(keys.begin(), keys.end(), "base_model.model.model.embed_tokens.lora_embedding_A") != keys.end());
  CHECK(std::find(keys.begin(), keys.end(), "base_model.model.model.layers.0.q_proj.lora_A.weight") != keys.end());
  auto back = lorafuse::io::read_adapter(root.path + "/a");
  REQUIRE(back.layers.size() == 2);
  CHECK(back.layers[0].embedding);
  CHECK_FALSE(back.layers[1].embedding);
  CHECK(at::equal(back.layers[0].lora_A, layers[0].lora_A));
  // the file's embedding into a Linear layer of another model: named
  auto wrong = modules();
  wrong[0].is_embedding = false;
  wrong[0].is_linear = true;
  require_error_parts<c10::ValueError>([&] { lorafuse::io::plan_adapter_load(back, wrong, false); },
                                       {"model.embed_tokens", "as an embedding layer", "its type: Embedding"});
  // base weights: one per adapted module, of the layer's size
  back.base_weights = {{"model.embed_tokens", at::zeros({64, 31})}};
  require_error_parts<c10::ValueError>([&] { lorafuse::io::plan_adapter_load(back, infos, false); },
                                       {"model.embed_tokens", "base weight is [64, 31]", "64 × 32 elements"});
}

TEST_CASE("load_adapter puts a file's base weight into the reference Llama's lm_head, as PEFT", "[cpu][embedding]") {
  const auto make = [] { return lorafuse_test::tiny_llama(); };
  auto trained = make();
  at::manual_seed(2);
  lorafuse::inject_lora(*trained, LoraConfig().r(4).target_modules({"lm_head"}).init_lora_weights(false));
  lorafuse_test::TempDir root;
  lorafuse::save_adapter(*trained, root.path + "/a");
  auto file = lorafuse::io::read_adapter(root.path + "/a");
  const auto new_head = at::randn({64, 32});
  file.base_weights = {{"lm_head", new_head}};
  auto fresh = make();
  lorafuse::load_adapter(*fresh, file, "default");
  const auto layers = lorafuse::lora_layers(*fresh);
  REQUIRE(layers.size() == 1);
  const auto& head = layers.front();
  CHECK(head.first == "lm_head");
  CHECK(at::equal(head.second->base_module()->named_parameters()["weight"], new_head));
  file.base_weights = {{"lm_head", at::randn({32, 64})}};  // the right size, the wrong shape
  auto other = make();
  require_error_parts<c10::ValueError>([&] { lorafuse::load_adapter(*other, file, "default"); },
                                       {"lm_head", "base weight", "[32, 64]", "[64, 32]"});
  CHECK(lorafuse::lora_layers(*other).empty());
}

TEST_CASE("LoRA on the reference Llama's embed_tokens: the formula, merges, files, clone and archives",
          "[cpu][embedding]") {
  auto model = lorafuse_test::tiny_llama();
  const auto ids = at::arange(12, at::kLong).remainder(64).reshape({2, 6});
  torch::NoGradGuard no_grad;
  const auto before = model->forward(ids);
  const auto report =
      lorafuse::inject_lora(*model, LoraConfig().r(4).lora_alpha(8).target_modules({"embed_tokens", "q_proj"}));
  CHECK(report.targets.size() == 3);
  auto* layer = model->model->named_children()["embed_tokens"]->as<lorafuse::nn::LoraEmbeddingImpl>();
  REQUIRE(layer != nullptr);
  CHECK(at::equal(model->forward(ids), before));  // A zeros: a new adapter changes nothing
  CHECK(layer->lora_a("default").abs().max().item<double>() == 0);
  CHECK(layer->lora_b("default").sizes() == at::IntArrayRef({32, 4}));
  std::vector<std::string> names;
  for (const auto& p : layer->named_parameters()) names.push_back(p.key());
  CHECK(std::find(names.begin(), names.end(), "lora_embedding_A.default.weight") != names.end());

  layer->lora_a("default").normal_();
  const auto adapted = model->forward(ids);
  CHECK_FALSE(at::allclose(adapted, before));
  // the layer alone: E[x] + scale·Aᵀ[x]·Bᵀ
  const auto e = layer->forward(ids);
  const auto expected =
      at::embedding(layer->base_layer->weight, ids) +
      2.0 * at::matmul(at::embedding(layer->lora_a("default").t(), ids), layer->lora_b("default").t());
  CHECK(at::allclose(e, expected, 1e-6, 1e-6));
  const auto table = layer->base_layer->weight.clone();
  layer->merge();
  CHECK(at::allclose(model->forward(ids), adapted, 1e-5, 1e-5));
  layer->unmerge();
  CHECK(at::equal(layer->base_layer->weight, table));

  lorafuse_test::TempDir root;
  lorafuse::save_adapter(*model, root.path + "/a");
  const auto file = lorafuse::io::read_adapter(root.path + "/a");
  CHECK(std::count_if(file.layers.begin(), file.layers.end(), [](const auto& l) { return l.embedding; }) == 1);
  auto fresh = lorafuse_test::tiny_llama();
  lorafuse::load_adapter(*fresh, root.path + "/a");
  CHECK(at::allclose(fresh->forward(ids), adapted, 1e-6, 1e-6));

  auto copy = std::dynamic_pointer_cast<lorafuse::models::LlamaForCausalLMImpl>(model->clone());
  CHECK(at::allclose(copy->forward(ids), adapted, 1e-6, 1e-6));
  std::stringstream layer_archive;  // the LoRA layer's own archive (options, table and weights)
  {
    auto saved = model->model->named_children()["embed_tokens"];
    torch::serialize::OutputArchive out;
    saved->save(out);
    out.save_to(layer_archive);
  }
  lorafuse::nn::LoraEmbedding other(torch::nn::Embedding(torch::nn::EmbeddingOptions(64, 32)),
                                    lorafuse::nn::LoraAdapterOptions(4).lora_alpha(8));
  torch::serialize::InputArchive in;
  in.load_from(layer_archive);
  other->load(in);
  CHECK(at::equal(other->lora_a("default"), layer->lora_a("default")));
  CHECK(at::equal(other->base_layer->weight, layer->base_layer->weight));

  lorafuse::merge_and_unload(*model);
  CHECK(lorafuse::lora_layers(*model).empty());
  CHECK(model->model->named_children()["embed_tokens"]->as<torch::nn::EmbeddingImpl>() != nullptr);
  CHECK(at::allclose(model->forward(ids), adapted, 1e-5, 1e-5));
  require_error_parts<c10::ValueError>(
      [] {
        auto m = lorafuse_test::tiny_llama();
        lorafuse::inject_lora(*m, LoraConfig().target_modules({"q_proj", "embed_tokens"}).use_dora(true));
      },
      {"use_dora", "model.embed_tokens"});
}
