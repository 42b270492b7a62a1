// save_adapter / load_adapter on the reference Llama (<lorafuse/peft/adapters.h>): round trips, the config
// written for the adapted layers, loading beside other adapters, loading errors leaving the model as it
// was, the atomic folder swap, and hot-swapping while threads run forward with their own adapters.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <lorafuse/config/peft_json.h>
#include <lorafuse/io/adapter.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/peft/adapters.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

#include "catch.h"
#include "nn/nn_test_util.h"
#include "peft/tiny_llama.h"

using lorafuse::LoraConfig;
using lorafuse::models::LlamaConfig;
using lorafuse::models::LlamaForCausalLM;
using lorafuse_test::require_error_parts;

namespace {

std::string temp_dir() {
  std::string pattern = "/tmp/lorafuse_adapter_XXXXXX";
  REQUIRE(::mkdtemp(pattern.data()) != nullptr);
  return pattern;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_file(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

using lorafuse_test::tiny_llama;

at::Tensor ids() { return at::arange(12, at::kLong).remainder(64).reshape({2, 6}); }

at::Tensor logits(LlamaForCausalLM& model) {
  torch::NoGradGuard no_grad;
  return model->forward(ids());
}

// A trained-looking adapter: random A and B (init_lora_weights false).
std::string saved_adapter(const std::string& root, const std::string& name, const LoraConfig& config, uint64_t seed) {
  auto model = tiny_llama();
  at::manual_seed(seed);
  lorafuse::inject_lora(*model, LoraConfig(config).init_lora_weights(false));
  const std::string dir = root + "/" + name;
  lorafuse::save_adapter(*model, dir);
  return dir;
}

}  // namespace

TEST_CASE("save_adapter then load_adapter into a fresh model gives the same outputs", "[cpu][adapters]") {
  const auto root = temp_dir();
  auto trained = tiny_llama();
  at::manual_seed(1);
  lorafuse::inject_lora(*trained, LoraConfig()
                                      .r(8)
                                      .lora_alpha(16)
                                      .target_modules("all-linear")
                                      .rank_pattern({{"down_proj", 2}})
                                      .alpha_pattern({{"o_proj", 3.0}})
                                      .init_lora_weights(false));
  lorafuse::save_adapter(*trained, root + "/a");
  const std::string config = read_file(root + "/a/adapter_config.json");
  CHECK(config.find("\"peft_type\": \"LORA\"") != std::string::npos);
  CHECK(config.find("\"down_proj\": 2") != std::string::npos);
  CHECK(config.find("\"o_proj\": 3") != std::string::npos);

  auto fresh = tiny_llama();
  const auto before = logits(fresh);
  const auto report = lorafuse::load_adapter(*fresh, root + "/a");
  CHECK(report.targets.size() == 14);  // 7 linear layers × 2 decoder layers, lm_head excluded
  CHECK(lorafuse::active_adapter(*fresh) == "default");
  CHECK(at::equal(logits(fresh), logits(trained)));
  CHECK_FALSE(at::allclose(logits(fresh), before));
  for (const auto& [path, layer] : lorafuse::lora_layers(*fresh)) {
    auto* original = lorafuse::lora_layers(*trained)[0].second;
    for (const auto& [p2, l2] : lorafuse::lora_layers(*trained)) {
      if (p2 == path) original = l2;
    }
    CHECK(at::equal(layer->lora_a("default"), original->lora_a("default")));
    CHECK(at::equal(layer->lora_b("default"), original->lora_b("default")));
    CHECK(layer->adapter_options("default").r() == original->adapter_options("default").r());
  }
}

TEST_CASE("task_type is written to adapter_config.json, read back and written again", "[cpu][adapters]") {
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4).task_type("CAUSAL_LM"), 3);
  CHECK(read_file(a + "/adapter_config.json").find("\"task_type\": \"CAUSAL_LM\"") != std::string::npos);
  auto fresh = tiny_llama();
  lorafuse::load_adapter(*fresh, a);
  for (const auto& [path, layer] : lorafuse::lora_layers(*fresh)) {
    CHECK(layer->adapter_options("default").task_type() == "CAUSAL_LM");
  }
  lorafuse::save_adapter(*fresh, root + "/b");
  CHECK(read_file(root + "/b/adapter_config.json").find("\"task_type\": \"CAUSAL_LM\"") != std::string::npos);
  // none: written as null, as PEFT writes it
  const auto c = saved_adapter(root, "c", LoraConfig().r(4), 3);
  CHECK(read_file(c + "/adapter_config.json").find("\"task_type\": null") != std::string::npos);
}

TEST_CASE("task types with a task head name it for modules_to_save; others are refused by name",
          "[cpu][adapters][errors]") {
  for (const std::string t : {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}) {
    LoraConfig().task_type(t).validate();
    CHECK(LoraConfig().task_type(t).saved_modules() == lorafuse::task_heads(t));
  }
  require_error_parts<c10::ValueError>([&] { LoraConfig().task_type("causal").validate(); },
                                       {"task_type: expected one of PEFT's task types", "found \"causal\""});
  // a file that says SEQ_CLS loads into a model without such a head: its LoRA layers, the task type kept
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4), 3);
  std::string config = read_file(a + "/adapter_config.json");
  config.replace(config.find("\"task_type\": null"), std::string("\"task_type\": null").size(),
                 "\"task_type\": \"SEQ_CLS\"");
  write_file(a + "/adapter_config.json", config);
  auto fresh = tiny_llama();
  const auto report = lorafuse::load_adapter(*fresh, a);
  CHECK(report.saved.empty());
  REQUIRE(!lorafuse::lora_layers(*fresh).empty());
  CHECK(lorafuse::lora_layers(*fresh).front().second->adapter_options("default").task_type() == "SEQ_CLS");
}

TEST_CASE("fan_in_fan_out is read and written; over Linear layers it changes nothing (PEFT)", "[cpu][adapters]") {
  const auto parsed = lorafuse::lora_config_from_peft_json(
      R"({"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": true})", "test", true);
  CHECK(parsed.config.fan_in_fan_out());
  CHECK(lorafuse::lora_config_to_peft_json(parsed.config).find("\"fan_in_fan_out\": true") != std::string::npos);
  require_error_parts<c10::ValueError>(
      [&] { lorafuse::lora_config_from_peft_json(R"({"peft_type": "LORA", "fan_in_fan_out": 1})", "f.json", true); },
      {"f.json", "fan_in_fan_out must be true or false", "found 1"});
  // a Llama adapter whose config says true: its Linear layers compute as usual, as PEFT's do (it warns, sets false)
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4), 3);
  CHECK(read_file(a + "/adapter_config.json").find("\"fan_in_fan_out\": false") != std::string::npos);
  auto plain = tiny_llama();
  lorafuse::load_adapter(*plain, a);
  std::string config = read_file(a + "/adapter_config.json");
  config.replace(config.find("\"fan_in_fan_out\": false"), std::string("\"fan_in_fan_out\": false").size(),
                 "\"fan_in_fan_out\": true");
  write_file(a + "/adapter_config.json", config);
  auto flagged = tiny_llama();
  lorafuse::load_adapter(*flagged, a);
  const auto ids = at::arange(12, at::kLong).remainder(50).reshape({2, 6});
  torch::NoGradGuard no_grad;
  CHECK(at::allclose(plain->forward(ids), flagged->forward(ids)));
}

TEST_CASE("a second load_adapter adds the adapter beside the first, inactive and frozen", "[cpu][adapters]") {
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4).target_modules({"q_proj", "v_proj"}), 1);
  const auto b = saved_adapter(root, "b", LoraConfig().r(2).target_modules({"o_proj", "v_proj"}), 2);
  auto only_a = tiny_llama();
  lorafuse::load_adapter(*only_a, a, "a");
  auto only_b = tiny_llama();
  lorafuse::load_adapter(*only_b, b, "b");

  auto model = tiny_llama();
  lorafuse::load_adapter(*model, a, "a");
  lorafuse::load_adapter(*model, b, "b");  // o_proj is wrapped now, without activating b there
  CHECK(lorafuse::adapter_names(*model) == std::vector<std::string>{"a", "b"});
  CHECK(lorafuse::active_adapter(*model) == "a");
  CHECK(at::equal(logits(model), logits(only_a)));
  for (const auto& [path, layer] : lorafuse::lora_layers(*model)) {
    if (layer->has_adapter("b")) CHECK_FALSE(layer->lora_a("b").requires_grad());
  }
  const auto want_b = logits(only_b);
  {
    lorafuse::AdapterScope scope("b");
    CHECK(at::equal(logits(model), want_b));
  }
  lorafuse::set_adapter(*model, "b");
  CHECK(at::equal(logits(model), want_b));
  REQUIRE_THROWS_AS(lorafuse::load_adapter(*model, a, "a"), c10::ValueError);
}

TEST_CASE("load_adapter errors leave the model as it was", "[cpu][adapters][errors]") {
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4).target_modules({"q_proj", "v_proj"}), 1);
  auto model = tiny_llama();
  const auto before = logits(model);

  SECTION("targets missing from the file, then a partial load") {
    // The file keeps layer 0 only.
    auto file = lorafuse::io::read_adapter(a);
    file.layers.erase(std::remove_if(file.layers.begin(), file.layers.end(),
                                     [](const auto& l) { return l.path.find("layers.1.") != std::string::npos; }),
                      file.layers.end());
    lorafuse::io::write_adapter(root + "/half", file);
    require_error_parts<c10::ValueError>([&] { lorafuse::load_adapter(*model, root + "/half"); },
                                         {"model.layers.1.self_attn.q_proj", "partial"});
    CHECK(lorafuse::lora_layers(*model).empty());
    CHECK(at::equal(logits(model), before));
    const auto report =
        lorafuse::load_adapter(*model, root + "/half", "default", lorafuse::LoadAdapterOptions().partial(true));
    CHECK(report.targets ==
          std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"});
  }
  SECTION("a model of another shape") {
    const auto wide = root + "/wide";
    {
      at::manual_seed(3);
      LlamaForCausalLM other(LlamaConfig().vocab_size(64).hidden_size(64).intermediate_size(48));
      lorafuse::inject_lora(*other, LoraConfig().r(4).init_lora_weights(false));
      lorafuse::save_adapter(*other, wide);
    }
    require_error_parts<c10::ValueError>([&] { lorafuse::load_adapter(*model, wide); },
                                         {"model.layers.0.self_attn.q_proj", "lora_A is [4, 64]", "32 inputs"});
    CHECK(lorafuse::lora_layers(*model).empty());
    CHECK(at::equal(logits(model), before));
  }
  SECTION("an unsupported PEFT feature") {
    write_file(a + "/adapter_config.json",
               R"({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "lora_bias": true})");
    require_error_parts<c10::ValueError>([&] { lorafuse::load_adapter(*model, a); }, {"lora_bias", "not support"});
    CHECK(lorafuse::lora_layers(*model).empty());
  }
}

TEST_CASE("save_adapter replaces the folder as a whole and keeps the user's other files", "[cpu][adapters]") {
  const auto root = temp_dir();
  const auto dir = saved_adapter(root, "x", LoraConfig().r(4), 1);
  write_file(dir + "/notes.txt", "mine");
  REQUIRE(::chmod(dir.c_str(), 0700) == 0);
  auto model = tiny_llama();
  at::manual_seed(5);
  lorafuse::inject_lora(*model, LoraConfig().r(2).init_lora_weights(false));
  REQUIRE(::symlink(dir.c_str(), (root + "/latest").c_str()) == 0);
  lorafuse::save_adapter(*model, root + "/latest/");  // through a link, with a trailing slash
  CHECK(read_file(dir + "/notes.txt") == "mine");
  CHECK(lorafuse::io::read_adapter(dir).config.r() == 2);
  struct stat st;
  REQUIRE(::lstat((root + "/latest").c_str(), &st) == 0);
  CHECK(S_ISLNK(st.st_mode));  // the link still points at the folder, which has the new adapter
  REQUIRE(::stat(dir.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);  // the folder keeps its permissions
  // nothing left beside it
  for (const auto* suffix : {".saving-", ".old-"}) {
    const std::string cmd = "ls " + root + " | grep -c -- '" + suffix + "' > " + root + "/count.txt";
    REQUIRE(std::system(cmd.c_str()) >= 0);
    CHECK(std::stoi(read_file(root + "/count.txt")) == 0);
  }
  // A folder with subfolders is refused and left as it was.
  REQUIRE(::mkdir((dir + "/checkpoint-1").c_str(), 0755) == 0);
  const std::string before = read_file(dir + "/adapter_config.json");
  require_error_parts<c10::ValueError>([&] { lorafuse::save_adapter(*model, dir); },
                                       {dir, "subfolders", "checkpoint-1"});
  CHECK(read_file(dir + "/adapter_config.json") == before);
}

TEST_CASE("threads run forward with their adapters while another loads and deletes adapters", "[cpu][adapters]") {
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4).target_modules({"q_proj", "v_proj"}), 1);
  const auto b = saved_adapter(root, "b", LoraConfig().r(4).target_modules({"q_proj", "v_proj"}), 2);
  const auto c = saved_adapter(root, "c", LoraConfig().r(8).target_modules({"q_proj"}), 3);
  const auto d = saved_adapter(root, "d", LoraConfig().r(2).target_modules({"v_proj"}), 4);
  auto model = tiny_llama();
  lorafuse::load_adapter(*model, a, "a", lorafuse::LoadAdapterOptions().is_trainable(true));
  model->eval();  // served: the loads below then write no module's mode while threads run forward
  lorafuse::load_adapter(*model, b, "b");
  const auto trainable = lorafuse::trainable_parameters(*model).trainable;
  REQUIRE(trainable > 0);  // "a" trains; the loads below must leave that as it is
  std::map<std::string, at::Tensor> reference;
  for (const std::string name : {"a", "b", ""}) {
    lorafuse::AdapterScope scope(name);
    reference[name] = logits(model);
  }
  REQUIRE_FALSE(at::equal(reference["a"], reference["b"]));

  std::atomic<bool> stop{false};
  std::atomic<int> mismatches{0}, failures{0};
  std::vector<int> runs(3, 0);
  std::vector<std::thread> threads;
  const std::vector<std::string> names{"a", "b", ""};
  for (size_t i = 0; i < names.size(); ++i) {
    threads.emplace_back([&, i] {
      try {
        torch::NoGradGuard no_grad;
        lorafuse::AdapterScope scope(names[i]);
        while (!stop) {
          if (!at::equal(model->forward(ids()), reference[names[i]])) ++mismatches;
          ++runs[i];
        }
      } catch (...) {
        ++failures;
      }
    });
  }
  std::vector<double> seconds;
  for (int i = 0; i < 100; ++i) {
    const auto start = std::chrono::steady_clock::now();
    lorafuse::load_adapter(*model, i % 2 ? c : d, "swap" + std::to_string(i));
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (i >= 2) lorafuse::delete_adapter(*model, "swap" + std::to_string(i - 2));
  }
  stop = true;
  for (auto& t : threads) t.join();
  CHECK(failures == 0);
  CHECK(mismatches == 0);
  CHECK(lorafuse::active_adapter(*model) == "a");
  CHECK(lorafuse::trainable_parameters(*model).trainable == trainable);  // loads activated nothing
  for (int n : runs) CHECK(n > 0);
  auto left = lorafuse::adapter_names(*model);
  std::sort(left.begin(), left.end());
  CHECK(left == std::vector<std::string>{"a", "b", "swap98", "swap99"});
  // The 100th load costs about what the first did (medians of the first and last ten).
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double first = median({seconds.begin(), seconds.begin() + 10});
  const double last = median({seconds.end() - 10, seconds.end()});
  INFO("first " << first << " s, last " << last << " s");
  CHECK(last < 3 * first + 0.02);
}

TEST_CASE("an AdapterScope on a layer with a merged adapter is an error unless it names the active one",
          "[cpu][adapters][errors]") {
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4), 1);
  auto model = tiny_llama();
  lorafuse::load_adapter(*model, a, "a");
  lorafuse::load_adapter(*model, a, "b");
  const auto unmerged = logits(model);
  lorafuse::merge_adapter(*model);
  {
    lorafuse::AdapterScope scope("a");
    CHECK(at::allclose(logits(model), unmerged, 1e-4, 1e-5));
  }
  lorafuse::AdapterScope scope("b");
  require_error_parts<c10::ValueError>([&] { logits(model); }, {"AdapterScope(\"b\")", "merged", "unmerge"});
}

TEST_CASE("loading the 100th adapter kept in the model costs about what the first did", "[cpu][adapters]") {
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4).target_modules({"q_proj", "v_proj"}), 1);
  auto model = tiny_llama();
  std::vector<double> seconds;
  for (int i = 0; i < 100; ++i) {
    const auto start = std::chrono::steady_clock::now();
    lorafuse::load_adapter(*model, a, "n" + std::to_string(i));
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  CHECK(lorafuse::adapter_names(*model).size() == 100);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double first = median({seconds.begin(), seconds.begin() + 10});
  const double last = median({seconds.end() - 10, seconds.end()});
  INFO("first " << first << " s, last " << last << " s");
  CHECK(last < 3 * first + 0.02);
}

TEST_CASE("AdapterScopes closed out of order remove only themselves", "[cpu][adapters]") {
  auto outer = std::make_unique<lorafuse::AdapterScope>("a");
  auto inner = std::make_unique<lorafuse::AdapterScope>("b");
  CHECK(lorafuse::AdapterScope::current() == std::optional<std::string>("b"));
  outer.reset();
  CHECK(lorafuse::AdapterScope::current() == std::optional<std::string>("b"));
  inner.reset();
  CHECK_FALSE(lorafuse::AdapterScope::current().has_value());
  REQUIRE_THROWS_AS(lorafuse::AdapterScope("a.b"), c10::ValueError);
  CHECK_FALSE(lorafuse::AdapterScope::current().has_value());
}

// ---- mixed batches: one adapter per row (AdapterScope with a list of names)

namespace {

at::Tensor four_rows() { return at::arange(24, at::kLong).mul(7).remainder(64).reshape({4, 6}); }

// The logits of row i of four_rows() run alone, under AdapterScope(name) ("__base__": no adapter).
at::Tensor row_alone(LlamaForCausalLM& model, int64_t i, const std::string& name) {
  torch::NoGradGuard no_grad;
  lorafuse::AdapterScope scope(name == "__base__" ? "" : name);
  return model->forward(four_rows().narrow(0, i, 1))[0];
}

}  // namespace

TEST_CASE("a mixed batch gives each row its own adapter on the reference Llama", "[cpu][adapters][mixed]") {
  const auto root = temp_dir();
  auto model = tiny_llama();
  // ranks 4, 8 and 2; "c" only in q_proj: the other layers run their base for its rows
  lorafuse::load_adapter(*model, saved_adapter(root, "a", LoraConfig().r(4).target_modules({"q_proj", "v_proj"}), 1),
                         "a");
  lorafuse::load_adapter(*model, saved_adapter(root, "b", LoraConfig().r(8).target_modules("all-linear"), 2), "b");
  lorafuse::load_adapter(*model, saved_adapter(root, "c", LoraConfig().r(2).target_modules({"q_proj"}), 3), "c");
  const std::vector<std::string> names = {"a", "b", "__base__", "c"};
  at::Tensor mixed;
  {
    torch::NoGradGuard no_grad;
    lorafuse::AdapterScope scope(names);
    mixed = model->forward(four_rows());
  }
  for (int64_t i = 0; i < 4; ++i) {
    CAPTURE(i);
    CHECK(at::allclose(mixed[i], row_alone(model, i, names[i]), 1e-5, 1e-5));
  }
  CHECK_FALSE(at::allclose(row_alone(model, 0, "a"), row_alone(model, 0, "b")));
  // two names for four rows: each name covers two consecutive rows (generate's beams)
  {
    torch::NoGradGuard no_grad;
    lorafuse::AdapterScope scope(std::vector<std::string>{"b", "a"});
    mixed = model->forward(four_rows());
  }
  CHECK(at::allclose(mixed[1], row_alone(model, 1, "b"), 1e-5, 1e-5));
  CHECK(at::allclose(mixed[2], row_alone(model, 2, "a"), 1e-5, 1e-5));
  // an empty batch runs
  {
    torch::NoGradGuard no_grad;
    lorafuse::AdapterScope scope(std::vector<std::string>{"a"});
    auto& layer = *lorafuse::lora_layers(*model)[0].second;
    const at::Tensor x = at::randn({0, 32});
    CHECK(layer.lora_forward(x).sizes() == at::IntArrayRef({0, 32}));
  }

  // bad input
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::AdapterScope scope(std::vector<std::string>{"a", "nope", "b", "zzz", "nope"});
      },
      {"AdapterScope: no LoRA layer has adapters named [\"nope\", \"zzz\"]", "a, b, c", "__base__"});
  require_error_parts<c10::ValueError>([&] { lorafuse::AdapterScope scope(std::vector<std::string>{}); },
                                       {"expected one name per row of the batch, found an empty list"});
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::AdapterScope scope(std::vector<std::string>{"a", "b", "c"});
        logits(model);
      },
      {"3 adapter names for a batch of 2 rows"});
  lorafuse::merge_adapter(*model);  // "a", the active adapter, into the weights
  require_error_parts<c10::ValueError>(
      [&] {
        lorafuse::AdapterScope scope(names);
        logits(model);
      },
      {"merged into its weight", "needs unmerged adapters"});
}

TEST_CASE("training a mixed batch gives each adapter the gradients of its rows alone", "[cpu][adapters][mixed]") {
  const auto root = temp_dir();
  auto model = tiny_llama();
  lorafuse::load_adapter(*model, saved_adapter(root, "a", LoraConfig().r(4).target_modules("all-linear"), 1), "a");
  lorafuse::load_adapter(*model, saved_adapter(root, "b", LoraConfig().r(6).target_modules({"q_proj", "o_proj"}), 2),
                         "b");
  model->train();
  std::vector<at::Tensor> params;
  for (auto& [path, layer] : lorafuse::lora_layers(*model)) {
    for (const auto& name : layer->adapter_names()) {
      params.push_back(layer->lora_a(name).requires_grad_(true));
      params.push_back(layer->lora_b(name).requires_grad_(true));
    }
  }
  const std::vector<std::string> names = {"a", "b", "b", "a"};
  std::vector<at::Tensor> mixed;
  {
    lorafuse::AdapterScope scope(names);
    mixed = torch::autograd::grad({model->forward(four_rows()).sum()}, params, {}, false, false, true);
  }
  std::vector<at::Tensor> separate(params.size());
  for (const std::string name : {"a", "b"}) {
    lorafuse::AdapterScope scope(name);
    const at::Tensor rows = name == "a" ? at::tensor({0, 3}, at::kLong) : at::tensor({1, 2}, at::kLong);
    const auto g = torch::autograd::grad({model->forward(four_rows().index_select(0, rows)).sum()}, params, {}, false,
                                         false, true);
    for (size_t i = 0; i < params.size(); ++i) {
      if (g[i].defined()) separate[i] = g[i];
    }
  }
  bool nonzero = false;
  for (size_t i = 0; i < params.size(); ++i) {
    CAPTURE(i);
    REQUIRE(mixed[i].defined() == separate[i].defined());
    if (!mixed[i].defined()) continue;
    CHECK(at::allclose(mixed[i], separate[i], 1e-4, 1e-5));
    nonzero = nonzero || mixed[i].abs().sum().item<double>() > 0;
  }
  CHECK(nonzero);
}

TEST_CASE("threads serve mixed batches while another loads and deletes adapters", "[cpu][adapters][mixed]") {
  const auto root = temp_dir();
  const auto a = saved_adapter(root, "a", LoraConfig().r(4).target_modules({"q_proj", "v_proj"}), 1);
  const auto b = saved_adapter(root, "b", LoraConfig().r(8).target_modules({"q_proj"}), 2);
  const auto c = saved_adapter(root, "c", LoraConfig().r(2).target_modules({"v_proj"}), 3);
  auto model = tiny_llama();
  lorafuse::load_adapter(*model, a, "a");
  lorafuse::load_adapter(*model, b, "b");
  const std::vector<std::vector<std::string>> batches = {{"a", "__base__", "b", "a"}, {"b", "a"}};
  std::vector<at::Tensor> reference;
  for (const auto& names : batches) {
    torch::NoGradGuard no_grad;
    lorafuse::AdapterScope scope(names);
    reference.push_back(model->forward(four_rows()));
  }
  std::atomic<bool> stop{false};
  std::atomic<int> mismatches{0}, failures{0};
  std::vector<int> runs(batches.size(), 0);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < batches.size(); ++i) {
    threads.emplace_back([&, i] {
      try {
        torch::NoGradGuard no_grad;
        lorafuse::AdapterScope scope(batches[i]);
        while (!stop) {
          if (!at::equal(model->forward(four_rows()), reference[i])) ++mismatches;
          ++runs[i];
        }
      } catch (...) {
        ++failures;
      }
    });
  }
  for (int i = 0; i < 40; ++i) {
    lorafuse::load_adapter(*model, c, "swap" + std::to_string(i));
    if (i >= 2) lorafuse::delete_adapter(*model, "swap" + std::to_string(i - 2));
  }
  stop = true;
  for (auto& t : threads) t.join();
  CHECK(failures == 0);
  CHECK(mismatches == 0);
  for (int n : runs) CHECK(n > 0);
  // a loaded adapter joins mixed batches at once
  {
    torch::NoGradGuard no_grad;
    lorafuse::AdapterScope scope(std::vector<std::string>{"swap39", "a", "__base__", "swap38"});
    const at::Tensor mixed = model->forward(four_rows());
    CHECK(at::allclose(mixed[0], row_alone(model, 0, "swap39"), 1e-5, 1e-5));
    CHECK(at::allclose(mixed[3], row_alone(model, 3, "swap38"), 1e-5, 1e-5));
  }
}
