// The adapter scenario table (tests/scenarios/adapters.json), run by the C++ layer on
// lorafuse::models::LlamaForCausalLM. The same table runs in Python (tests/python/test_scenarios.py) on a
// transformers Llama and on the bound C++ model; the step kinds are described in the table's "step_kinds".
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <lorafuse/config/lora_config.h>
#include <lorafuse/models/llama.h>
#include <lorafuse/peft/adapters.h>
#include <lorafuse/peft/inject.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>

#include "catch.h"
#include "nn/nn_test_util.h"

#ifndef LORAFUSE_SCENARIOS
#error "LORAFUSE_SCENARIOS: the path of tests/scenarios/adapters.json (set in tests/cpp/CMakeLists.txt)"
#endif

using json = nlohmann::json;
using lorafuse::LoraConfig;
using lorafuse::models::LlamaConfig;
using lorafuse::models::LlamaForCausalLM;

namespace {

const json& table() {
  static const json t = [] {
    std::ifstream in(LORAFUSE_SCENARIOS);
    if (!in) throw std::runtime_error(std::string("cannot read ") + LORAFUSE_SCENARIOS);
    return json::parse(in);
  }();
  return t;
}

LlamaForCausalLM build_model() {
  const json& m = table().at("model");
  at::manual_seed(m.at("seed").get<uint64_t>());
  LlamaForCausalLM model(LlamaConfig()
                             .vocab_size(m.at("vocab_size").get<int64_t>())
                             .hidden_size(m.at("hidden_size").get<int64_t>())
                             .intermediate_size(m.at("intermediate_size").get<int64_t>())
                             .num_hidden_layers(m.at("num_hidden_layers").get<int64_t>())
                             .num_attention_heads(m.at("num_attention_heads").get<int64_t>())
                             .num_key_value_heads(m.at("num_key_value_heads").get<int64_t>())
                             .max_position_embeddings(m.at("max_position_embeddings").get<int64_t>()));
  model->eval();
  return model;
}

at::Tensor input_ids() {
  std::vector<int64_t> flat;
  const json& rows = table().at("input_ids");
  for (const auto& row : rows) {
    for (const auto& v : row) flat.push_back(v.get<int64_t>());
  }
  const auto n_rows = static_cast<int64_t>(rows.size());
  return at::tensor(flat, at::kLong).reshape({n_rows, static_cast<int64_t>(flat.size()) / n_rows});
}

LoraConfig lora_config(const std::string& name) {
  const json& c = table().at("configs").at(name);
  const std::string init = c.at("init").get<std::string>();
  LoraConfig config;
  config.r(c.at("r").get<int64_t>()).lora_alpha(c.at("lora_alpha").get<double>());
  config.init_lora_weights(init == "random" ? std::string("false") : init == "default" ? std::string("true") : init);
  if (c.at("targets").is_string()) {
    config.target_modules(c.at("targets").get<std::string>());
  } else {
    config.target_modules(c.at("targets").get<std::vector<std::string>>());
  }
  if (c.contains("modules_to_save")) config.modules_to_save(c.at("modules_to_save").get<std::vector<std::string>>());
  return config;
}

// Every parameter but the adapters', named as in the model without LoRA layers.
std::map<std::string, at::Tensor> base_weights(torch::nn::Module& model) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : model.named_parameters()) {
    std::vector<std::string> parts;
    std::string part;
    for (char ch : p.key() + ".") {
      if (ch != '.') {
        part += ch;
        continue;
      }
      parts.push_back(part);
      part.clear();
    }
    bool adapter = false;
    std::string name;
    for (const auto& x : parts) {
      if (x == "lora_A" || x == "lora_B") adapter = true;
      if (x != "base_layer") name += (name.empty() ? "" : ".") + x;
    }
    if (!adapter) out[name] = p.value().detach().clone();
  }
  return out;
}

class Runner {
 public:
  explicit Runner(std::string folder) : folder_(std::move(folder)), model_(build_model()), ids_(input_ids()) {}

  void run(const json& steps, const std::string& where) {
    for (size_t i = 0; i < steps.size(); ++i) step(steps[i], where + "[" + std::to_string(i) + "] " + steps[i].dump());
  }

 private:
  at::Tensor logits() {
    torch::NoGradGuard no_grad;
    return model_->forward(ids_).clone();
  }

  void step(const json& s, const std::string& where) {
    INFO(where);
    const std::string what = s.at("do").get<std::string>();
    auto& m = *model_;
    if (what == "inject" || what == "add") {
      at::manual_seed(s.at("seed").get<uint64_t>());
      const auto config = lora_config(s.at("config").get<std::string>());
      const auto name = s.at("name").get<std::string>();
      if (what == "inject") {
        lorafuse::inject_lora(m, config, name);
      } else {
        lorafuse::add_adapter(m, name, config);
      }
    } else if (what == "set") {
      lorafuse::set_adapter(m, s.at("name").get<std::string>());
    } else if (what == "disable") {
      lorafuse::disable_adapters(m);
    } else if (what == "enable") {
      lorafuse::enable_adapters(m);
    } else if (what == "delete") {
      lorafuse::delete_adapter(m, s.at("name").get<std::string>());
    } else if (what == "merge") {
      lorafuse::merge_adapter(m, s.value("names", std::vector<std::string>{}));
    } else if (what == "unmerge") {
      lorafuse::unmerge_adapter(m);
    } else if (what == "merge_and_unload") {
      lorafuse::merge_and_unload(m);
    } else if (what == "save") {
      lorafuse::save_adapter(m, folder_ + "/" + s.at("slot").get<std::string>(), s.at("name").get<std::string>());
    } else if (what == "load") {
      lorafuse::load_adapter(m, folder_ + "/" + s.at("slot").get<std::string>(), s.at("name").get<std::string>(),
                             lorafuse::LoadAdapterOptions().is_trainable(s.value("is_trainable", false)));
    } else if (what == "fresh_model") {
      model_ = build_model();
    } else if (what == "scope") {
      lorafuse::AdapterScope scope(s.at("name").get<std::string>());
      run(s.at("steps"), where + " > scope");
    } else if (what == "forward") {
      logits();
    } else if (what == "record") {
      outputs_[s.at("label").get<std::string>()] = logits();
    } else if (what == "record_weights") {
      weights_[s.at("label").get<std::string>()] = base_weights(m);
    } else if (what == "expect_output") {
      expect_output(s);
    } else if (what == "expect_weights_equal" || what == "expect_weights_differ") {
      const auto now = base_weights(m);
      const auto& then = weights_.at(s.at("label").get<std::string>());
      REQUIRE(now.size() == then.size());
      bool same = true;
      for (const auto& [name, t] : now) {
        INFO("parameter " << name);
        REQUIRE(then.count(name) == 1);
        same = same && at::equal(t, then.at(name));
      }
      REQUIRE(same == (what == "expect_weights_equal"));
    } else if (what == "expect_adapters") {
      REQUIRE(lorafuse::adapter_names(m) == s.at("names").get<std::vector<std::string>>());
    } else if (what == "expect_active") {
      REQUIRE(lorafuse::active_adapter(m) == s.at("name").get<std::string>());
    } else if (what == "expect_lora_layers") {
      REQUIRE(static_cast<int64_t>(lorafuse::lora_layers(m).size()) == s.at("count").get<int64_t>());
    } else if (what == "expect_saved_modules") {
      std::vector<std::string> paths;
      for (const auto& [path, wrapper] : lorafuse::saved_modules(m)) paths.push_back(path);
      REQUIRE(paths == s.at("paths").get<std::vector<std::string>>());
    } else if (what == "expect_trainable") {
      REQUIRE(lorafuse::trainable_parameters(m).trainable == s.at("count").get<int64_t>());
    } else if (what == "expect_error") {
      expect_error(s, where);
    } else if (what == "expect_warning") {
      expect_warning(s, where);
    } else {
      FAIL("unknown step kind \"" << what << "\"");
    }
  }

  void expect_output(const json& s) {
    const at::Tensor now = logits();
    if (s.contains("same_as")) {
      const at::Tensor& ref = outputs_.at(s.at("same_as").get<std::string>());
      INFO("max |diff| " << (now - ref).abs().max().item<double>());
      if (s.value("exact", false)) {
        REQUIRE(at::equal(now, ref));
      } else {
        const json& tol = table().at("tolerance");
        REQUIRE(at::allclose(now, ref, tol.at("rtol").get<double>(), tol.at("atol").get<double>()));
      }
    } else {
      const at::Tensor& ref = outputs_.at(s.at("differs_from").get<std::string>());
      const double diff = (now - ref).abs().max().item<double>();
      INFO("max |diff| " << diff);
      REQUIRE(diff > table().at("min_difference").get<double>());
    }
  }

  void expect_error(const json& s, const std::string& where) {
    const std::string type = s.at("type").get<std::string>();
    std::string message;
    bool thrown = false;
    try {
      step(s.at("step"), where + " > step");
    } catch (const c10::ValueError& e) {
      REQUIRE(type == "ValueError");
      message = e.what_without_backtrace();
      thrown = true;
    } catch (const c10::TypeError& e) {
      REQUIRE(type == "TypeError");
      message = e.what_without_backtrace();
      thrown = true;
    }
    REQUIRE(thrown);
    INFO("message: " << message);
    for (const auto& part : s.at("message_contains")) {
      INFO("expected part: " << part.get<std::string>());
      CHECK(message.find(part.get<std::string>()) != std::string::npos);
    }
  }

  struct Collected : c10::WarningHandler {
    void process(const c10::Warning& w) override { messages.push_back(w.msg()); }
    std::vector<std::string> messages;
  };

  void expect_warning(const json& s, const std::string& where) {
    Collected collected;
    {
      c10::WarningUtils::WarningHandlerGuard guard(&collected);
      step(s.at("step"), where + " > step");
    }
    bool found = false;
    for (const auto& m : collected.messages) {
      bool all = true;
      for (const auto& part : s.at("message_contains"))
        all = all && m.find(part.get<std::string>()) != std::string::npos;
      found = found || all;
    }
    INFO(where << ": warnings: " << collected.messages.size() << (collected.messages.empty() ? "" : ", first: ")
               << (collected.messages.empty() ? "" : collected.messages.front()));
    CHECK(found);
  }

  std::string folder_;
  LlamaForCausalLM model_;
  at::Tensor ids_;
  std::map<std::string, at::Tensor> outputs_;
  std::map<std::string, std::map<std::string, at::Tensor>> weights_;
};

using lorafuse_test::TempDir;  // a scenario's saved adapters, removed with its contents when it ends

}  // namespace

TEST_CASE("the adapter scenario table runs against the C++ layer", "[cpu][peft][scenarios]") {
  const json& scenarios = table().at("scenarios");
  REQUIRE(scenarios.size() > 0);
  for (const auto& scenario : scenarios) {
    const std::string name = scenario.at("name").get<std::string>();
    DYNAMIC_SECTION(name) {
      const TempDir folder;
      Runner(folder.path).run(scenario.at("steps"), name);
    }
  }
}
