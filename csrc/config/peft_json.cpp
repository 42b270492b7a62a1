// LoraConfig ↔ PEFT's JSON field names: the one mapping, used for adapter_config.json (csrc/io/adapter_config.cpp)
// and for lorafuse.LoraConfig from Python (its fields are PEFT's).
#include <c10/util/Exception.h>
#include <lorafuse/config/peft_json.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include <set>
#include "csrc/config/adapter_json.h"
#include "csrc/config/json.h"

namespace lorafuse {
namespace {

using json = nlohmann::ordered_json;  // PEFT applies rank_pattern / alpha_pattern keys in file order

// Fields that do not change what the adapter computes.
const std::set<std::string> kIgnored = {
    "base_model_name_or_path", "revision",          "inference_mode",      "auto_mapping",  "peft_version",
    "megatron_core",           "qalora_group_size", "ensure_weight_tying", "runtime_config"};

// Fields of PEFT features lorafuse does not support yet, each allowed only at its "off" value.
bool is_off(const json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_array() && v.empty()) ||
         (v.is_object() && v.empty());
}
const std::set<std::string> kUnsupported = {"lora_bias",
                                            "layer_replication",
                                            "use_qalora",
                                            "target_parameters",
                                            "megatron_config",
                                            "trainable_token_indices",
                                            "alora_invocation_tokens",
                                            "eva_config",
                                            "corda_config",
                                            "arrow_config",
                                            "kasa_config",
                                            "lora_ga_config",
                                            "monteclora_config",
                                            "velora_config",
                                            "use_bdlora"};

std::string type_of(const json& v) { return v.type_name(); }

double number(const json& v, const std::string& what, const char* field) {
  TORCH_CHECK_VALUE(v.is_number(), what, ": ", field, " must be a number, found ", type_of(v), " ", v.dump());
  return v.get<double>();
}

int64_t integer(const json& v, const std::string& what, const char* field) {
  TORCH_CHECK_VALUE(v.is_number_integer(), what, ": ", field, " must be an integer, found ", type_of(v), " ", v.dump());
  return v.get<int64_t>();
}

// target_modules / exclude_modules: a list of names, a regular expression, or null.
TargetModules modules_field(const json& v, const std::string& what, const char* field) {
  if (v.is_string()) return TargetModules(v.get<std::string>());
  TORCH_CHECK_VALUE(v.is_array(), what, ": ", field, " must be a list of module names or a regular expression, found ",
                    type_of(v), " ", v.dump());
  std::vector<std::string> names;
  for (const auto& item : v) {
    TORCH_CHECK_VALUE(item.is_string(), what, ": ", field, " must hold module names (strings), found ", item.dump());
    names.push_back(item.get<std::string>());
  }
  return TargetModules(std::move(names));
}

template <typename T, typename Get>
PatternMap<T> pattern_field(const json& v, const std::string& what, const char* field, Get get) {
  PatternMap<T> out;
  if (v.is_null()) return out;
  TORCH_CHECK_VALUE(v.is_object(), what, ": ", field, " must be an object of pattern → value, found ", type_of(v));
  for (const auto& [key, value] : v.items()) out.emplace_back(key, get(value, what, field));
  return out;
}

json modules_json(const TargetModules& m) {
  if (m.empty()) return nullptr;
  if (m.is_regex() || m.is_all_linear()) return m.regex();
  return m.names();
}

}  // namespace

PeftLoraConfig lora_config_from_peft_json(const std::string& json_text, const std::string& what, bool adapter_file) {
  const json j = lorafuse::detail::parse_json<json>(json_text, what, /*max_depth=*/32);
  TORCH_CHECK_VALUE(j.is_object(), what, ": expected a JSON object of LoraConfig fields, found ", type_of(j));
  TORCH_CHECK_VALUE(!adapter_file || j.contains("peft_type"), what,
                    ": no peft_type field; expected \"peft_type\": \"LORA\" (is this a PEFT adapter_config.json?)");
  TORCH_CHECK_VALUE(!j.contains("peft_type") || j["peft_type"] == "LORA", what, ": peft_type is ",
                    j["peft_type"].dump(), "; lorafuse loads LoRA adapters (\"LORA\")");
  for (const auto& field : kUnsupported) {
    if (j.contains(field)) {
      TORCH_CHECK_VALUE(is_off(j[field]), what, ": ", field, " = ", j[field].dump(),
                        " is a PEFT feature that lorafuse does not support yet; only plain LoRA adapters load");
    }
  }

  PeftLoraConfig file;
  LoraConfig& c = file.config;
  for (const auto& [key, value] : j.items()) {
    if (key == "peft_type" || kIgnored.count(key) || kUnsupported.count(key)) {
      if (key == "base_model_name_or_path" && value.is_string())
        file.base_model_name_or_path = value.get<std::string>();
      continue;
    }
    if (key == "r") {
      c.r(integer(value, what, "r"));
    } else if (key == "lora_alpha") {
      c.lora_alpha(number(value, what, "lora_alpha"));
    } else if (key == "lora_dropout") {
      c.lora_dropout(number(value, what, "lora_dropout"));
    } else if (key == "target_modules") {
      if (value.is_null()) {
        file.targets_from_file = adapter_file;  // a LoraConfig's null: the model type's defaults (not given)
      } else {
        c.target_modules(modules_field(value, what, "target_modules"));
      }
    } else if (key == "exclude_modules") {
      if (!value.is_null()) c.exclude_modules(modules_field(value, what, "exclude_modules"));
    } else if (key == "modules_to_save") {
      // PEFT: a list of names or null
      std::vector<std::string> names;
      TORCH_CHECK_VALUE(value.is_null() || value.is_array(), what,
                        ": modules_to_save must be a list of module names or null, found ", type_of(value), " ",
                        value.dump());
      if (value.is_array()) {
        for (const auto& v : value) {
          TORCH_CHECK_VALUE(v.is_string(), what, ": modules_to_save must hold module names (strings), found ",
                            v.dump());
          if (std::find(names.begin(), names.end(), v.get<std::string>()) == names.end())
            names.push_back(v.get<std::string>());  // PEFT's task models extend the list again on each load
        }
      }
      c.modules_to_save(names);
    } else if (key == "task_type") {
      TORCH_CHECK_VALUE(value.is_null() || value.is_string(), what, ": task_type must be a string or null, found ",
                        value.dump());
      if (value.is_string()) c.task_type(value.get<std::string>());
    } else if (key == "bias") {
      TORCH_CHECK_VALUE(value.is_string(), what, ": bias must be a string, found ", value.dump());
      c.bias(value.get<std::string>());
    } else if (key == "layers_to_transform") {
      // PEFT: an int, a list of ints or null
      std::vector<int64_t> layers;
      if (value.is_number_integer()) {
        layers.push_back(value.get<int64_t>());
      } else if (value.is_array()) {
        for (const auto& v : value) layers.push_back(integer(v, what, "layers_to_transform"));
      } else {
        TORCH_CHECK_VALUE(value.is_null(), what,
                          ": layers_to_transform must be a layer index, a list of them or null, ", "found ",
                          value.dump());
      }
      c.layers_to_transform(layers);
    } else if (key == "layers_pattern") {
      // PEFT: a str, a list of str or null ("" and [] mean none)
      std::vector<std::string> patterns;
      if (value.is_string()) {
        if (!value.get<std::string>().empty()) patterns.push_back(value.get<std::string>());
      } else if (value.is_array()) {
        for (const auto& v : value) {
          TORCH_CHECK_VALUE(v.is_string(), what, ": layers_pattern must hold strings, found ", v.dump());
          patterns.push_back(v.get<std::string>());
        }
      } else {
        TORCH_CHECK_VALUE(value.is_null(), what, ": layers_pattern must be a string, a list of strings or null, found ",
                          value.dump());
      }
      c.layers_pattern(patterns);
    } else if (key == "fan_in_fan_out") {
      TORCH_CHECK_VALUE(value.is_boolean(), what, ": fan_in_fan_out must be true or false, found ", value.dump());
      c.fan_in_fan_out(value.get<bool>());
    } else if (key == "use_dora") {
      TORCH_CHECK_VALUE(value.is_boolean(), what, ": use_dora must be true or false, found ", value.dump());
      c.use_dora(value.get<bool>());
    } else if (key == "use_rslora") {
      TORCH_CHECK_VALUE(value.is_boolean(), what, ": use_rslora must be true or false, found ", value.dump());
      c.use_rslora(value.get<bool>());
    } else if (key == "rank_pattern") {
      c.rank_pattern(pattern_field<int64_t>(value, what, "rank_pattern", integer));
    } else if (key == "alpha_pattern") {
      c.alpha_pattern(pattern_field<double>(value, what, "alpha_pattern", number));
    } else if (key == "init_lora_weights") {
      // How fresh weights start (an adapter loaded from a file takes its weights); EVA, CorDA... are not supported.
      TORCH_CHECK_VALUE(value.is_boolean() || value == "gaussian" || value == "loftq" || value == "pissa" ||
                            value == "olora" ||
                            (value.is_string() && value.get<std::string>().rfind("pissa_niter_", 0) == 0),
                        what, ": init_lora_weights = ", value.dump(),
                        " is a PEFT initialisation that lorafuse does not support yet (it supports true, false, "
                        "\"gaussian\", \"loftq\", \"pissa\", \"pissa_niter_N\" and \"olora\")");
      c.init_lora_weights(value.is_boolean() ? nn::InitLoraWeights(value.get<bool>())
                                             : nn::InitLoraWeights(value.get<std::string>()));
    } else if (key == "loftq_config") {
      c.loftq_config(detail::loftq_config_from_json(value, what));
    } else {
      file.warnings.push_back(what + ": unknown field \"" + key + "\" (= " + value.dump() + ") ignored");
    }
  }
  if (adapter_file && !j.contains("target_modules")) file.targets_from_file = true;
  if (file.targets_from_file) {  // the file's layers are the targets: a placeholder that validates
    c.target_modules(TargetModules(".*"));
    c.layers_to_transform({}).layers_pattern({});  // they only narrow target_modules' names, of which there are none
  }
  try {
    c.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, what, ": ", e.what_without_backtrace());
  }
  return file;
}

std::string lora_config_to_peft_json(const LoraConfig& c, const std::string& base_model_name_or_path) {
  json j = json::object();
  // The fields that every PEFT release since 0.13 reads.
  j["peft_type"] = "LORA";
  j["task_type"] = c.task_type().empty() ? json(nullptr) : json(c.task_type());
  j["base_model_name_or_path"] = base_model_name_or_path.empty() ? json(nullptr) : json(base_model_name_or_path);
  j["revision"] = nullptr;
  j["inference_mode"] = true;
  j["r"] = c.r();
  const double alpha = c.lora_alpha();
  j["lora_alpha"] =
      alpha == std::floor(alpha) && std::abs(alpha) < 1e15 ? json(static_cast<int64_t>(alpha)) : json(alpha);
  j["lora_dropout"] = c.lora_dropout();
  j["target_modules"] = modules_json(c.target_modules());
  if (!c.exclude_modules().empty()) j["exclude_modules"] = modules_json(c.exclude_modules());
  j["bias"] = c.bias();
  j["use_rslora"] = c.use_rslora();
  j["fan_in_fan_out"] = c.fan_in_fan_out();
  j["modules_to_save"] = c.modules_to_save().empty() ? json(nullptr) : json(c.modules_to_save());
  j["layers_to_transform"] = c.layers_to_transform().empty() ? json(nullptr) : json(c.layers_to_transform());
  j["layers_pattern"] = c.layers_pattern().empty() ? json(nullptr) : json(c.layers_pattern());
  j["use_dora"] = c.use_dora();
  j["init_lora_weights"] = detail::init_lora_weights_json(c.init_lora_weights());
  j["loftq_config"] = detail::loftq_config_json(c.init_lora_weights(), c.loftq_config());
  json ranks = json::object();
  for (const auto& [key, r] : c.rank_pattern()) ranks[key] = r;
  json alphas = json::object();
  for (const auto& [key, a] : c.alpha_pattern())
    alphas[key] = a == std::floor(a) && std::abs(a) < 1e15 ? json(static_cast<int64_t>(a)) : json(a);
  j["rank_pattern"] = ranks;
  j["alpha_pattern"] = alphas;
  return j.dump(2) + "\n";
}

}  // namespace lorafuse
