// lorafuse::inject_lora and the model-wide adapter functions, on the reference Llama and on small
// hand-made modules: selection rules (names, regex, all-linear, exclude, patterns), trainability, bias
// modes, a second adapter, switching, merging, merge_and_unload, clone, save/load, counts, bad input.
#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/linalg_svd.h>
#include <lorafuse/config/default_targets.h>
#include <lorafuse/config/peft_json.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/peft/inject.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/serialize.h>

#include <unistd.h>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "catch.h"
#include "models/llama_test_util.h"
#include "nn/nn_test_util.h"

using lorafuse::LoraConfig;
using lorafuse::models::Llama;
using lorafuse::models::LlamaConfig;
using lorafuse::nn::LoraLinearImpl;
using lorafuse_test::require_error_parts;

namespace {

using lorafuse_test::tiny_llama;

at::Tensor ids() { return at::arange(12, at::kLong).remainder(50).reshape({2, 6}); }

std::set<std::string> paths_of(const std::vector<std::string>& v) { return {v.begin(), v.end()}; }

// Two slot-called Linear layers with biases.
struct SlotBlockImpl : torch::nn::Cloneable<SlotBlockImpl>, lorafuse::nn::LinearSlotOwner {
  SlotBlockImpl() { reset(); }
  void reset() override {
    fc1.reset(*this, "fc1", torch::nn::LinearOptions(8, 16));
    fc2.reset(*this, "fc2", torch::nn::LinearOptions(16, 4));
  }
  lorafuse::nn::LinearSlot* linear_slot(const std::string& name) override {
    return name == "fc1" ? &fc1 : name == "fc2" ? &fc2 : nullptr;
  }
  at::Tensor forward(const at::Tensor& x) { return fc2(fc1(x).relu()); }
  lorafuse::nn::LinearSlot fc1, fc2;
};
TORCH_MODULE(SlotBlock);

// A Linear held by a typed holder: LibTorch would keep calling the old layer after a swap.
struct TypedImpl : torch::nn::Cloneable<TypedImpl> {
  TypedImpl() { reset(); }
  void reset() override { fc = register_module("fc", torch::nn::Linear(4, 4)); }
  at::Tensor forward(const at::Tensor& x) { return fc(x); }
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(Typed);

int64_t numel_sum(torch::nn::Module& m, bool trainable_only) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += (!trainable_only || p.requires_grad()) ? p.numel() : 0;
  return n;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("lorafuse_test_" + name + "_" + std::to_string(::getpid())))
      .string();
}

}  // namespace

TEST_CASE("inject_lora into q_proj and v_proj of a Llama", "[cpu][nn][inject]") {
  auto model = tiny_llama();
  model->eval();
  const auto before = model->forward(ids());
  const int64_t total_before = numel_sum(*model, false);
  const auto report = lorafuse::inject_lora(*model, LoraConfig().r(4).lora_alpha(8));

  CHECK(report.adapter_name == "default");
  CHECK(report.targets == std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                                   "model.layers.1.self_attn.q_proj",
                                                   "model.layers.1.self_attn.v_proj"});
  CHECK(report.wrapped == report.targets);
  // q_proj 32→32, v_proj 32→16 (2 kv heads of 8): r·(in + out) each, per layer
  const int64_t lora_params = 2 * (4 * (32 + 32) + 4 * (32 + 16));
  CHECK(report.trainable == lora_params);
  CHECK(report.total == total_before + lora_params);
  CHECK(numel_sum(*model, true) == lora_params);
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    CHECK(p.value().requires_grad() == (p.key().find(".lora_A.default.") != std::string::npos ||
                                        p.key().find(".lora_B.default.") != std::string::npos));
  }
  // PEFT's module paths, one to one
  const auto params = model->named_parameters();
  CHECK(params.find("model.layers.1.self_attn.v_proj.lora_B.default.weight") != nullptr);
  CHECK(params.find("model.layers.1.self_attn.v_proj.base_layer.weight") != nullptr);
  CHECK(params["model.layers.0.self_attn.q_proj.lora_A.default.weight"].sizes() == at::IntArrayRef({4, 32}));
  // B starts at zero: the model is unchanged...
  CHECK(at::equal(model->forward(ids()), before));
  // ...and the forward really goes through the LoRA layers once B is non-zero
  {
    torch::NoGradGuard g;
    for (auto& [path, layer] : lorafuse::lora_layers(*model)) layer->lora_b("default").fill_(0.05);
  }
  CHECK_FALSE(at::allclose(model->forward(ids()), before, 1e-4, 1e-4));
  CHECK(lorafuse::adapter_names(*model) == std::vector<std::string>{"default"});
  CHECK(lorafuse::active_adapter(*model) == "default");
}

TEST_CASE("training after injection changes only the adapters", "[cpu][nn][inject]") {
  auto model = tiny_llama(1);
  lorafuse::inject_lora(*model, LoraConfig().r(2).init_lora_weights(false));
  std::map<std::string, at::Tensor> before;
  for (const auto& p : model->named_parameters()) before[p.key()] = p.value().clone();
  auto logits = model->forward(ids());
  logits.pow(2).mean().backward();
  {
    torch::NoGradGuard g;
    for (auto& p : model->parameters()) {
      if (p.requires_grad()) p.sub_(p.grad() * 10);
    }
  }
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    const bool lora = p.key().find(".lora_") != std::string::npos;
    CHECK(at::equal(p.value(), before[p.key()]) != lora);
    if (!lora) CHECK_FALSE(p.value().grad().defined());
  }
}

TEST_CASE("target_modules: all-linear, a regex, exclude_modules", "[cpu][nn][inject]") {
  {
    auto model = tiny_llama();
    const auto r = lorafuse::inject_lora(*model, LoraConfig().target_modules("ALL-Linear"));  // any case
    CHECK(r.targets.size() == 14);  // 7 per layer, not lm_head
    CHECK(paths_of(r.targets).count("lm_head") == 0);
    CHECK(paths_of(r.targets).count("model.layers.1.mlp.down_proj") == 1);
  }
  {
    auto model = tiny_llama();
    const auto r =
        lorafuse::inject_lora(*model, LoraConfig().target_modules(R"(model\.layers\.0\.self_attn\.(q|k)_proj)"));
    CHECK(r.targets == std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"});
  }
  {
    auto model = tiny_llama();
    const auto r = lorafuse::inject_lora(
        *model,
        LoraConfig().target_modules("all-linear").exclude_modules(lorafuse::TargetModules({"down_proj", "o_proj"})));
    CHECK(r.targets.size() == 10);
    CHECK(paths_of(r.targets).count("model.layers.0.mlp.down_proj") == 0);
    CHECK(paths_of(r.targets).count("model.layers.0.mlp.up_proj") == 1);
  }
  {
    auto model = tiny_llama();
    const auto r =
        lorafuse::inject_lora(*model, LoraConfig().target_modules({"q_proj"}).exclude_modules(R"(.*layers\.1\..*)"));
    CHECK(r.targets == std::vector<std::string>{"model.layers.0.self_attn.q_proj"});
  }
}

// A plain module (no nn::PretrainedModel): no model type, no output layer.
struct HeadedImpl : torch::nn::Cloneable<HeadedImpl> {
  HeadedImpl() { reset(); }
  void reset() override {
    modules = register_module("modules", torch::nn::ModuleDict());
    modules->update({{"q_proj", torch::nn::Linear(4, 4).ptr()}, {"lm_head", torch::nn::Linear(4, 8).ptr()}});
  }
  torch::nn::ModuleDict modules{nullptr};
};
TORCH_MODULE(Headed);

TEST_CASE("target_modules not given: the model type's defaults (PEFT's table)", "[cpu][nn][inject]") {
  // the reference Llama says it is "llama": q_proj and v_proj, as PEFT's table
  auto model = tiny_llama();
  CHECK(model->model_type() == "llama");
  const auto r = lorafuse::inject_lora(*model, LoraConfig().r(2));
  CHECK(paths_of(r.targets) ==
        std::set<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                              "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"});
  const auto gpt2 = lorafuse::default_target_modules("gpt2");
  REQUIRE(gpt2.has_value());
  CHECK(gpt2->names() == std::vector<std::string>{"c_attn"});
  CHECK(lorafuse::default_target_modules("bert")->names() == std::vector<std::string>{"query", "value"});
  CHECK(lorafuse::default_target_modules("gemma4")->is_regex());
  CHECK_FALSE(lorafuse::default_target_modules("phi3").has_value());
  CHECK_FALSE(lorafuse::default_target_modules("").has_value());
  const auto types = lorafuse::model_types_with_default_targets();
  CHECK(types.size() == 40);
  CHECK(std::is_sorted(types.begin(), types.end()));

  // a module of no known type must say what to target, as PEFT asks
  Headed plain;
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*plain, LoraConfig()); },
                                       {"target_modules: not given", "no model_type", "\"all-linear\"", "llama"});
  std::vector<lorafuse::ModuleInfo> infos = {{"h.0.attn.c_attn", "Linear", true}, {"lm_head", "Linear", true}};
  CHECK(lorafuse::select_targets(infos, LoraConfig(), "gpt2").size() == 1);
  require_error_parts<c10::ValueError>([&] { lorafuse::select_targets(infos, LoraConfig(), "phi3"); },
                                       {"target_modules: not given", "model_type \"phi3\" has no default targets"});
}

TEST_CASE("all-linear leaves out the output layer the model declares, whatever its name", "[cpu][nn][inject]") {
  // a plain module declares none: PEFT adapts every Linear of a model that is not a transformers one
  Headed plain;
  const auto r = lorafuse::inject_lora(*plain, LoraConfig().target_modules("all-linear"));
  CHECK(paths_of(r.targets) == std::set<std::string>{"modules.q_proj", "modules.lm_head"});
  // the output layer is the one flagged, not one named lm_head
  std::vector<lorafuse::ModuleInfo> infos = {
      {"decoder.fc1", "Linear", true}, {"proj_out", "Linear", true}, {"lm_head", "Linear", true}};
  infos[1].is_output_layer = true;
  const auto chosen = lorafuse::select_targets(infos, LoraConfig().target_modules("all-linear"), "whisper");
  REQUIRE(chosen.size() == 2);
  CHECK(chosen[0].index == 0);
  CHECK(chosen[1].index == 2);
}

TEST_CASE("a target entry that matches nothing warns while others match (PEFT: no error)", "[cpu][nn][inject]") {
  std::vector<lorafuse::ModuleInfo> infos = {{"a.q_proj", "Linear", true}, {"a.v_proj", "Linear", true}};
  std::vector<std::string> warnings;
  const auto chosen =
      lorafuse::select_targets(infos, LoraConfig().target_modules({"query", "q_proj", "value"}), "", &warnings);
  CHECK(chosen.size() == 1);
  REQUIRE(warnings.size() == 2);
  CHECK(warnings[0].find("\"query\" matches no module (the other entries select 1 layers)") != std::string::npos);
  CHECK(warnings[0].find("q_proj (1), v_proj (1)") != std::string::npos);
  CHECK(warnings[1].find("\"value\"") != std::string::npos);
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::select_targets(infos, LoraConfig().target_modules({"query", "value"}));
      },
      {"target_modules: {\"query\", \"value\"} matches no module", "q_proj (1)"});
}

TEST_CASE("layers_to_transform and layers_pattern select layers as PEFT does", "[cpu][nn][inject]") {
  {
    auto model = tiny_llama();
    const auto r =
        lorafuse::inject_lora(*model, LoraConfig().target_modules({"q_proj", "down_proj"}).layers_to_transform({1}));
    CHECK(paths_of(r.targets) ==
          std::set<std::string>{"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"});
  }
  {
    auto model = tiny_llama();  // with a pattern, and the model type's default targets
    const auto r = lorafuse::inject_lora(*model, LoraConfig().layers_to_transform({0}).layers_pattern({"layers"}));
    CHECK(paths_of(r.targets) ==
          std::set<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"});
  }
  // the first index in the path counts (an expert's index inside a layer does not), a path named exactly is
  // selected whatever its layer, and a pattern that finds no index selects nothing there
  const auto config = LoraConfig().target_modules({"w1", "model.layers.0.extra.w1"}).layers_to_transform({2});
  CHECK(config.selects("model.layers.2.experts.0.w1"));
  CHECK_FALSE(config.selects("model.layers.0.experts.2.w1"));
  CHECK(config.selects("model.layers.0.extra.w1"));
  CHECK_FALSE(LoraConfig(config).layers_pattern({"blocks"}).selects("model.layers.2.experts.0.w1"));
  CHECK(LoraConfig(config).layers_pattern({"h", "layers"}).selects("model.layers.2.experts.0.w1"));
  CHECK_FALSE(config.selects("mlp.w1"));  // no layer index at all
  // files: written and read back
  const auto text = lorafuse::lora_config_to_peft_json(LoraConfig(config).layers_pattern({"layers"}));
  CHECK(text.find("\"layers_to_transform\": [\n    2\n  ]") != std::string::npos);
  const auto back = lorafuse::lora_config_from_peft_json(text, "test", true).config;
  CHECK(back.layers_to_transform() == std::vector<int64_t>{2});
  CHECK(back.layers_pattern() == std::vector<std::string>{"layers"});
  const auto one = lorafuse::lora_config_from_peft_json(
      R"({"peft_type": "LORA", "target_modules": ["q"], "layers_to_transform": 3, "layers_pattern": "block"})", "f",
      true);
  CHECK(one.config.layers_to_transform() == std::vector<int64_t>{3});
  CHECK(one.config.layers_pattern() == std::vector<std::string>{"block"});
  // bad input, named
  require_error_parts<c10::ValueError>(
      [&] { LoraConfig().target_modules("all-linear").layers_to_transform({0}).validate(); },
      {"layers_to_transform: cannot be used when target_modules is a string"});
  require_error_parts<c10::ValueError>(
      [&] { LoraConfig().target_modules({"q"}).layers_pattern({"layers"}).validate(); },
      {"layers_pattern: given without layers_to_transform"});
  require_error_parts<c10::ValueError>([&] { LoraConfig().layers_to_transform({-2}).validate(); },
                                       {"layers_to_transform: expected layer indices >= 0, found -2"});
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::lora_config_from_peft_json(R"({"peft_type": "LORA", "layers_to_transform": "0"})", "f.json", true);
      },
      {"f.json", "layers_to_transform must be a layer index, a list of them or null", "\"0\""});
}

TEST_CASE("autocast_adapter_dtype = false keeps adapters in the base's dtype (PEFT)", "[cpu][nn][inject]") {
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    auto model = tiny_llama();
    model->to(dtype);
    lorafuse::inject_lora(*model, LoraConfig().r(2), "default", /*autocast_adapter_dtype=*/false);
    lorafuse::add_adapter(*model, "kept", LoraConfig().r(2));  // the default: float32
    for (const auto& [path, layer] : lorafuse::lora_layers(*model)) {
      CHECK(layer->lora_a("default").scalar_type() == dtype);
      CHECK(layer->lora_b("default").scalar_type() == dtype);
      CHECK(layer->lora_a("kept").scalar_type() == at::kFloat);
    }
  }
}

TEST_CASE("target_modules regexes are read as Python's re reads them (PCRE2)", "[cpu][nn][inject]") {
  const std::string q = "model.layers.0.self_attn.q_proj";
  CHECK(lorafuse::TargetModules("(?i).*\\.Q_PROJ").matches(q));        // inline flags
  CHECK(lorafuse::TargetModules(R"(.*(?<!mlp)\.q_proj)").matches(q));  // a lookbehind
  CHECK_FALSE(lorafuse::TargetModules(R"(.*(?<!self_attn)\.q_proj)").matches(q));
  CHECK(lorafuse::TargetModules(R"(.*?layers\.(?P<layer>0)\..*_proj)").matches(q));  // a named group, lazy
  CHECK(lorafuse::TargetModules(R"(\Amodel\..*\Z)").matches(q));
  CHECK_FALSE(lorafuse::TargetModules("q_proj").matches(q));  // the whole path must match
  auto model = tiny_llama();
  const auto r = lorafuse::inject_lora(*model, LoraConfig().target_modules(R"((?i).*layers\.1\..*(?=_PROJ)_proj)"));
  CHECK(r.targets.size() == 7);
  require_error_parts<c10::ValueError>(
      [&] { LoraConfig().target_modules(".*(q_proj").validate(); },
      {"target_modules: \".*(q_proj\" is not a valid regular expression", "missing closing parenthesis"});
  require_error_parts<c10::ValueError>(
      [&] { LoraConfig().target_modules({"q_proj"}).exclude_modules(R"(\)").validate(); },
      {"exclude_modules", "not a valid regular expression"});
}

TEST_CASE("pissa and olora start from the base weight, which keeps the residual", "[cpu][nn][inject]") {
  for (const std::string init : {"pissa", "olora", "pissa_niter_4"}) {
    INFO(init);
    auto model = tiny_llama();
    const auto before = model->forward(ids()).detach();
    std::map<std::string, at::Tensor> weights;
    for (const auto& p : model->named_parameters()) weights[p.key()] = p.value().detach().clone();
    lorafuse::inject_lora(*model, LoraConfig().r(4).lora_alpha(8).target_modules({"q_proj"}).init_lora_weights(init));
    // the model computes what it did: residual + scale·B·A = W
    CHECK(at::allclose(model->forward(ids()), before, 1e-4, 1e-5));
    for (const auto& [path, layer] : lorafuse::lora_layers(*model)) {
      const at::Tensor w = weights.at(path + ".weight");
      const at::Tensor a = layer->lora_a("default"), b = layer->lora_b("default");
      CHECK(b.abs().max().item<double>() > 0);
      if (init == "olora") {  // B = Q[:, :r], A = R[:r]
        const auto [q, r] = at::linalg_qr(w);
        CHECK(at::allclose(a, r.narrow(0, 0, 4), 1e-4, 1e-5));
        CHECK(at::allclose(b, q.narrow(1, 0, 4), 1e-4, 1e-5));
      } else {  // s·B·A is W's best rank-4 approximation (pissa), or close to it (a randomized SVD)
        const auto [u, sv, vh] = at::linalg_svd(w, false);
        const at::Tensor best = at::matmul(u.narrow(1, 0, 4) * sv.narrow(0, 0, 4), vh.narrow(0, 0, 4));
        if (init == "pissa") {
          CHECK(at::allclose(at::matmul(b, a) * 2.0, best, 1e-4, 1e-5));
        } else {
          const double optimal = (w - best).norm().item<double>();
          const double got = (w - at::matmul(b, a) * 2.0).norm().item<double>();
          CHECK(got >= optimal * (1 - 1e-5));
          CHECK(got <= optimal * 1.05);
        }
      }
    }
  }
  const lorafuse::nn::InitLoraWeights niter("pissa_niter_12");
  CHECK(niter.niter() == 12);
  CHECK(niter.str() == "pissa_niter_12");
  CHECK(niter.changes_base());
  CHECK_FALSE(niter == lorafuse::nn::InitLoraWeights("pissa_niter_2"));
  for (const std::string bad : {"pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "pissa_niter_1234567"}) {
    require_error_parts<c10::ValueError>([&] { lorafuse::nn::InitLoraWeights{bad}; },
                                         {"init_lora_weights", "\"" + bad + "\"", "pissa_niter_N"});
  }
}

TEST_CASE("rank_pattern and alpha_pattern override per module", "[cpu][nn][inject]") {
  auto model = tiny_llama();
  lorafuse::inject_lora(*model, LoraConfig()
                                    .r(8)
                                    .lora_alpha(16)
                                    .target_modules("all-linear")
                                    .rank_pattern({{"v_proj", 2}, {R"(layers\.1\.mlp\.down_proj)", 4}})
                                    .alpha_pattern({{R"(layers\.0\.self_attn\.q_proj)", 64.0}}));
  for (const auto& [path, layer] : lorafuse::lora_layers(*model)) {
    INFO(path);
    const auto& a = layer->adapter_options("default");
    const bool v = path.find("v_proj") != std::string::npos;
    const bool down1 = path == "model.layers.1.mlp.down_proj";
    CHECK(a.r() == (v ? 2 : down1 ? 4 : 8));
    CHECK(a.lora_alpha() == (path == "model.layers.0.self_attn.q_proj" ? 64.0 : 16.0));
    CHECK(layer->lora_a("default").size(0) == a.r());
  }
}

TEST_CASE("bias modes: none, all, lora_only", "[cpu][nn][inject]") {
  auto trainable_biases = [](const std::string& mode) {
    torch::nn::ModuleList seq{SlotBlock{}, SlotBlock{}};
    lorafuse::inject_lora(*seq, LoraConfig().target_modules({"fc1"}).bias(mode));
    std::set<std::string> names;
    for (const auto& p : seq->named_parameters()) {
      if (p.value().requires_grad() && p.key().find("bias") != std::string::npos) names.insert(p.key());
    }
    return names;
  };
  CHECK(trainable_biases("none").empty());
  CHECK(trainable_biases("all") ==
        std::set<std::string>{"0.fc1.base_layer.bias", "0.fc2.bias", "1.fc1.base_layer.bias", "1.fc2.bias"});
  CHECK(trainable_biases("lora_only") == std::set<std::string>{"0.fc1.base_layer.bias", "1.fc1.base_layer.bias"});
}

TEST_CASE("the active adapter's bias mode decides, biases get gradients through the fused op", "[cpu][nn][inject]") {
  torch::nn::ModuleList seq{SlotBlock{}, SlotBlock{}};
  lorafuse::inject_lora(*seq, LoraConfig().target_modules({"fc1"}).bias("lora_only").init_lora_weights(false));
  lorafuse::add_adapter(*seq, "b", LoraConfig().target_modules({"fc2"}).bias("none"));  // waits: default stays active
  auto trainable = [&] {
    std::set<std::string> names;
    for (const auto& p : seq->named_parameters()) {
      if (p.value().requires_grad() && p.key().find("bias") != std::string::npos) names.insert(p.key());
    }
    return names;
  };
  CHECK(trainable() == std::set<std::string>{"0.fc1.base_layer.bias", "1.fc1.base_layer.bias"});
  auto* block = seq[0]->as<SlotBlockImpl>();
  block->forward(at::randn({3, 8})).sum().backward();
  auto* fc1 = block->fc1.module()->as<LoraLinearImpl>();
  REQUIRE(fc1 != nullptr);
  REQUIRE(fc1->base_layer->bias.grad().defined());
  CHECK(fc1->base_layer->bias.grad().abs().sum().item<double>() > 0);
  CHECK_FALSE(fc1->base_layer->weight.grad().defined());
}

TEST_CASE("set_adapter on a merged model unmerges first", "[cpu][nn][inject]") {
  auto model = tiny_llama(6);
  model->eval();
  lorafuse::inject_lora(*model, LoraConfig().r(2).init_lora_weights(false));
  lorafuse::add_adapter(*model, "b", LoraConfig().r(2).target_modules({"q_proj"}).init_lora_weights(false));
  std::map<std::string, at::Tensor> weights;
  for (const auto& p : model->named_parameters()) weights[p.key()] = p.value().clone();
  lorafuse::set_adapter(*model, "b");
  const auto y_b = model->forward(ids());
  lorafuse::set_adapter(*model, "default");
  lorafuse::merge_adapter(*model);
  lorafuse::set_adapter(*model, "b");  // v_proj lacks b: cleared and unmerged; q_proj: switched and unmerged
  for (const auto& [path, layer] : lorafuse::lora_layers(*model)) CHECK_FALSE(layer->merged());
  for (const auto& p : model->named_parameters()) CHECK(at::equal(p.value(), weights[p.key()]));
  CHECK(at::equal(model->forward(ids()), y_b));
}

TEST_CASE("model-wide merges are all or nothing", "[cpu][nn][inject][errors]") {
  torch::nn::ModuleList seq{SlotBlock{}, SlotBlock{}};
  seq->to(at::kHalf);
  lorafuse::inject_lora(*seq, LoraConfig().target_modules({"fc1", "fc2"}).init_lora_weights(false));
  std::map<std::string, at::Tensor> weights;
  for (const auto& p : seq->named_parameters()) weights[p.key()] = p.value().clone();
  {
    torch::NoGradGuard g;  // the last layer's merge overflows float16; the three before it merge fine
    // A = 1, B = 1e5: every delta is r·1e5 = 8e5, whatever the random init
    auto* last = seq[1]->as<SlotBlockImpl>()->fc2.module()->as<LoraLinearImpl>();
    last->lora_a("default").fill_(1.0);
    last->lora_b("default").fill_(1e5);
  }
  weights["1.fc2.lora_A.default.weight"] = seq->named_parameters()["1.fc2.lora_A.default.weight"].clone();
  weights["1.fc2.lora_B.default.weight"] = seq->named_parameters()["1.fc2.lora_B.default.weight"].clone();
  require_error_parts<c10::ValueError>([&] { lorafuse::merge_adapter(*seq); }, {"merge", "non-finite"});
  for (const auto& [path, layer] : lorafuse::lora_layers(*seq)) CHECK_FALSE(layer->merged());
  for (const auto& p : seq->named_parameters()) CHECK(at::equal(p.value(), weights[p.key()]));
  require_error_parts<c10::ValueError>([&] { lorafuse::merge_and_unload(*seq); }, {"merge", "non-finite"});
  CHECK(lorafuse::lora_layers(*seq).size() == 4);
  for (const auto& p : seq->named_parameters()) CHECK(at::equal(p.value(), weights[p.key()]));
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::merge_adapter(*seq, {"default", "default"});
      },
      {"merge_adapter", "named twice"});
}

TEST_CASE("model-wide merge_and_unload while adapters are disabled keeps the adapter", "[cpu][nn][inject]") {
  auto model = tiny_llama(7);
  model->eval();
  lorafuse::inject_lora(*model, LoraConfig().init_lora_weights(false));
  const auto y = model->forward(ids());
  lorafuse::disable_adapters(*model);
  lorafuse::merge_and_unload(*model);
  CHECK(lorafuse::lora_layers(*model).empty());
  CHECK(at::allclose(model->forward(ids()), y, 1e-4, 1e-4));
}

TEST_CASE("new LoRA layers keep the model's train/eval mode and its disabled adapters", "[cpu][nn][inject]") {
  auto model = tiny_llama(11);
  model->eval();
  lorafuse::inject_lora(*model, LoraConfig().init_lora_weights(false));
  for (const auto& [path, layer] : lorafuse::lora_layers(*model)) CHECK_FALSE(layer->module().is_training());
  lorafuse::disable_adapters(*model);
  lorafuse::add_adapter(*model, "b", LoraConfig().target_modules({"k_proj"}));
  for (const auto& [path, layer] : lorafuse::lora_layers(*model)) CHECK_FALSE(layer->adapters_enabled());
}

TEST_CASE("a Linear in a ModuleDict is replaced in the dict", "[cpu][nn][inject]") {
  torch::nn::ModuleDict dict;
  dict->update({{"head", torch::nn::Linear(6, 3).ptr()}});
  torch::nn::ModuleList root{dict};
  lorafuse::inject_lora(*root, LoraConfig().target_modules({"head"}));
  CHECK(dict["head"]->as<LoraLinearImpl>() != nullptr);
  CHECK(root->named_parameters().find("0.head.lora_A.default.weight") != nullptr);
}

TEST_CASE("a second adapter is added beside the first, set_adapter switches model-wide", "[cpu][nn][inject]") {
  auto model = tiny_llama(2);
  model->eval();
  const auto base = model->forward(ids());
  lorafuse::inject_lora(*model, LoraConfig().r(4).init_lora_weights(false));
  const auto y_default = model->forward(ids());
  const auto r = lorafuse::add_adapter(*model, "b",
                                       LoraConfig().r(2).target_modules({"k_proj", "q_proj"}).init_lora_weights(false));
  CHECK(r.wrapped == std::vector<std::string>{"model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"});
  CHECK(lorafuse::adapter_names(*model) == std::vector<std::string>{"default", "b"});
  CHECK(lorafuse::active_adapter(*model) == "default");
  CHECK(at::equal(model->forward(ids()), y_default));  // the new adapter waits, also in the new k_proj layers
  for (const auto& p : model->named_parameters()) {
    if (p.key().find(".b.") != std::string::npos) CHECK_FALSE(p.value().requires_grad());
  }

  lorafuse::set_adapter(*model, "b");
  const auto y_b = model->forward(ids());
  CHECK_FALSE(at::allclose(y_b, y_default, 1e-4, 1e-4));
  for (const auto& [path, layer] : lorafuse::lora_layers(*model)) {
    INFO(path);
    CHECK(layer->active_adapter() == (layer->has_adapter("b") ? "b" : ""));  // v_proj has only default
  }
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    CHECK(p.value().requires_grad() ==
          (p.key().find(".lora_A.b.") != std::string::npos || p.key().find(".lora_B.b.") != std::string::npos));
  }
  lorafuse::set_adapter(*model, "default");
  CHECK(at::equal(model->forward(ids()), y_default));

  lorafuse::disable_adapters(*model);
  CHECK(at::equal(model->forward(ids()), base));
  lorafuse::enable_adapters(*model);
  CHECK(at::equal(model->forward(ids()), y_default));

  lorafuse::delete_adapter(*model, "default");
  CHECK(lorafuse::adapter_names(*model) == std::vector<std::string>{"b"});
  CHECK(lorafuse::active_adapter(*model) == "b");
  CHECK(at::equal(model->forward(ids()), y_b));
}

TEST_CASE("model-wide merge, unmerge and merge_and_unload", "[cpu][nn][inject]") {
  auto model = tiny_llama(3);
  model->eval();
  lorafuse::inject_lora(*model, LoraConfig().target_modules("all-linear").init_lora_weights(false));
  std::map<std::string, at::Tensor> weights;
  for (const auto& p : model->named_parameters()) weights[p.key()] = p.value().clone();
  const auto y = model->forward(ids());

  lorafuse::merge_adapter(*model);
  CHECK(at::allclose(model->forward(ids()), y, 1e-4, 1e-4));
  for (const auto& [path, layer] : lorafuse::lora_layers(*model)) CHECK(layer->merged());
  lorafuse::unmerge_adapter(*model);
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    CHECK(at::equal(p.value(), weights[p.key()]));
  }
  CHECK(at::equal(model->forward(ids()), y));

  lorafuse::merge_and_unload(*model);
  CHECK(lorafuse::lora_layers(*model).empty());
  for (const auto& m : model->named_modules()) {
    if (m.key().size() > 5 && m.key().substr(m.key().size() - 5) == "_proj") {
      INFO(m.key());
      CHECK(m.value()->as<torch::nn::LinearImpl>() != nullptr);
    }
  }
  CHECK(model->named_parameters().find("model.layers.0.mlp.up_proj.weight") != nullptr);
  CHECK(at::allclose(model->forward(ids()), y, 1e-4, 1e-4));
  // the slot calls the plain Linear now: changing its weight changes the output
  {
    torch::NoGradGuard g;
    model->named_parameters()["model.layers.0.self_attn.o_proj.weight"].mul_(0);
  }
  CHECK_FALSE(at::allclose(model->forward(ids()), y, 1e-4, 1e-4));
}

TEST_CASE("clone() of an injected Llama keeps the LoRA layers and is independent", "[cpu][nn][inject]") {
  auto model = tiny_llama(4);
  model->eval();
  lorafuse::inject_lora(*model, LoraConfig().r(2).init_lora_weights(false));
  lorafuse::add_adapter(*model, "b", LoraConfig().r(3).target_modules({"o_proj"}).init_lora_weights(false));
  auto copy = std::dynamic_pointer_cast<lorafuse::models::LlamaForCausalLMImpl>(model->clone());
  REQUIRE(copy != nullptr);
  CHECK(lorafuse::lora_layers(*copy).size() == lorafuse::lora_layers(*model).size());
  CHECK(at::equal(copy->forward(ids()), model->forward(ids())));
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    const auto& q = copy->named_parameters()[p.key()];
    CHECK(q.data_ptr() != p.value().data_ptr());
    CHECK(q.requires_grad() == p.value().requires_grad());
  }
  lorafuse::set_adapter(*copy, "b");  // the copy's forward uses the copy's layers, not the original's
  CHECK_FALSE(at::allclose(copy->forward(ids()), model->forward(ids()), 1e-5, 1e-5));
  CHECK(lorafuse::active_adapter(*model) == "default");
}

TEST_CASE("torch::save / torch::load of an injected Llama", "[cpu][nn][inject]") {
  auto model = tiny_llama(5);
  lorafuse::inject_lora(*model, LoraConfig().r(2).init_lora_weights(false));
  lorafuse::add_adapter(*model, "b", LoraConfig().r(3).init_lora_weights(false));
  lorafuse::set_adapter(*model, "b");
  const auto path = temp_path("llama.pt");
  torch::save(model, path);

  auto loaded = tiny_llama(77);  // other weights
  lorafuse::inject_lora(*loaded, LoraConfig().r(2));
  torch::load(loaded, path);  // adds adapter "b", reads every weight
  std::remove(path.c_str());
  CHECK(lorafuse::adapter_names(*loaded) == std::vector<std::string>{"default", "b"});
  CHECK(lorafuse::active_adapter(*loaded) == "b");
  model->eval();
  loaded->eval();
  CHECK(at::equal(loaded->forward(ids()), model->forward(ids())));
}

TEST_CASE("trainable parameter counts and PEFT's line", "[cpu][nn][inject]") {
  SlotBlock block;
  lorafuse::inject_lora(*block, LoraConfig().r(2).target_modules({"fc2"}));
  // fc1 8·16+16, fc2 16·4+4, adapter 2·16 + 4·2
  const auto count = lorafuse::trainable_parameters(*block);
  CHECK(count.trainable == 40);
  CHECK(count.total == 144 + 68 + 40);
  CHECK(count.str() == "trainable params: 40 || all params: 252 || trainable%: 15.8730");
  std::ostringstream out;
  lorafuse::print_trainable_parameters(*block, out);
  CHECK(out.str() == count.str() + "\n");
}

TEST_CASE("meta-device Llama 2 7B and Llama 3 70B: injected and counted without memory", "[cpu][nn][inject][meta]") {
  {
    Llama model(LlamaConfig::llama2_7b().tensor_options(at::TensorOptions(at::kMeta)));
    const auto r = lorafuse::inject_lora(*model, LoraConfig().r(8).lora_alpha(16));
    // 32 layers · (q: 8·(4096+4096) + v: 8·(4096+4096)) = 4,194,304 trainable; base 6,738,415,616
    CHECK(r.targets.size() == 64);
    CHECK(r.trainable == 32 * 2 * 8 * (4096 + 4096));
    CHECK(r.trainable == 4194304);
    CHECK(r.total == 6738415616LL + 4194304);
    CHECK(lorafuse::trainable_parameters(*model).str() ==
          "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622");
    for (const auto& p : model->parameters()) CHECK(p.is_meta());
    require_error_parts<c10::ValueError>([&] { model->clone(); }, {"clone", "meta device", "config"});
  }
  {
    const auto cfg = LlamaConfig::llama3_70b().tensor_options(at::TensorOptions(at::kMeta));
    Llama model(cfg);
    const auto r = lorafuse::inject_lora(*model, LoraConfig().r(16).target_modules("all-linear"));
    // per layer, r·(in + out): q, o 8192→8192; k, v 8192→1024; gate, up 8192→28672; down 28672→8192
    const int64_t per_layer = 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672));
    CHECK(per_layer == 2588672);
    CHECK(r.trainable == 80 * per_layer);
    CHECK(r.total == cfg.num_parameters() + 80 * per_layer);
    CHECK(r.targets.size() == 560);
  }
}

TEST_CASE("bad input to inject_lora and the model-wide functions", "[cpu][nn][inject][errors]") {
  auto model = tiny_llama();
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*model, LoraConfig().target_modules({"qkv_proj"})); },
      {"target_modules", "\"qkv_proj\"", "matches no module", "q_proj (2)", "lm_head (1)"});
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*model, LoraConfig().target_modules(".*nothing.*")); },
      {"target_modules", "matches no module", "down_proj (2)"});
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*model, LoraConfig().target_modules({"self_attn"})); },
      {"target_modules", "model.layers.0.self_attn", "Linear and embedding layers only"});
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*model, LoraConfig().r(0)); }, {"r", "0"});
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*model, LoraConfig().lora_alpha(0)); },
                                       {"lora_alpha", "0"});
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*model, LoraConfig().lora_dropout(1.5)); },
                                       {"lora_dropout", "1.5"});
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*model, LoraConfig().bias("some")); },
                                       {"bias", "\"some\"", "lora_only"});
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*model, LoraConfig().target_modules("(q_proj")); },
                                       {"target_modules", "(q_proj", "regular expression"});
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::inject_lora(*model, LoraConfig().rank_pattern({{"q_proj", -2}}));
      },
      {"rank_pattern", "-2"});
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::inject_lora(*model, LoraConfig().target_modules({"q_proj"}).exclude_modules({"q_proj"})); },
      {"exclude_modules", "excludes every layer"});
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*model, LoraConfig(), "bad name"); },
                                       {"adapter_name", "bad name"});
  CHECK(lorafuse::lora_layers(*model).empty());  // nothing changed by any of the failures

  lorafuse::inject_lora(*model, LoraConfig());
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*model, LoraConfig()); },
                                       {"adapter_name", "\"default\"", "already"});
  require_error_parts<c10::ValueError>([&] { lorafuse::set_adapter(*model, "x"); },
                                       {"set_adapter", "\"x\"", "default"});
  require_error_parts<c10::ValueError>([&] { lorafuse::delete_adapter(*model, "x"); }, {"delete_adapter", "\"x\""});
  require_error_parts<c10::ValueError>([&] { lorafuse::unmerge_adapter(*model); },
                                       {"unmerge_adapter", "nothing is merged"});
  lorafuse::merge_adapter(*model);
  lorafuse_test::require_warning_parts([&] { lorafuse::merge_adapter(*model); },
                                       {"merge_adapter: already merged, left as it is", "nothing to do"});

  Typed typed;
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*typed, LoraConfig().target_modules({"fc"})); },
                                       {"\"fc\"", "typed holder", "LinearSlot"});
  CHECK(typed->fc->as<torch::nn::LinearImpl>() != nullptr);
  torch::nn::Linear lone(4, 4);
  require_error_parts<c10::ValueError>([&] { lorafuse::inject_lora(*lone, LoraConfig()); }, {"module", "LoraLinear"});
}

TEST_CASE("merging into a weight another module holds too (tied) is refused, naming both", "[cpu][peft][merge]") {
  torch::nn::Linear shared(8, 8);
  torch::nn::ModuleDict dict;
  dict->update({{"q_proj", shared.ptr()}, {"k_proj", shared.ptr()}});  // one layer in two places: tied weights
  lorafuse::inject_lora(*dict, LoraConfig().r(2).lora_alpha(4).init_lora_weights(false).target_modules({"q_proj"}));
  const auto before = shared->weight.clone();
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::merge_adapter(*dict); },
      {"merge_adapter: \"q_proj.base_layer.weight\" is also \"k_proj.weight\"", "tied weights", "untie them"});
  require_error_parts<c10::ValueError>([&] { lorafuse::merge_and_unload(*dict); },
                                       {"merge_and_unload: \"q_proj.base_layer.weight\"", "tied weights"});
  CHECK(at::equal(shared->weight, before));  // nothing changed
  CHECK(lorafuse::lora_layers(*dict).size() == 1);
}
