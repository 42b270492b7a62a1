#include <c10/util/Exception.h>
#include <lorafuse/config/default_targets.h>
#include <lorafuse/config/lora_config.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>

#include "csrc/config/pattern.h"

namespace lorafuse {
namespace {

// ["classifier", "score"]
std::string quoted(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "[\"" : ", \"") + n + "\"";
  return out.empty() ? "[]" : out + "]";
}

bool last_component_is(const std::string& path, const std::string& name) {
  return path == name ||
         (path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
          path[path.size() - name.size() - 1] == '.');
}

// PEFT's rank_pattern / alpha_pattern rule: re.match(rf"(.*\.)?({key})$", path).
bool pattern_matches(const std::string& path, const std::string& key) {
  return detail::Pattern::compile("(.*\\.)?(" + key + ")$", "rank_pattern")->match(path);
}

void check_regex(const char* field, const std::string& regex) { detail::Pattern::compile(regex, field); }

}  // namespace

bool TargetModules::is_all_linear() const noexcept {
  if (!is_regex_ || regex_.size() != 10) return false;
  std::string lower = regex_;
  for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return lower == "all-linear";
}

bool TargetModules::matches_name(const std::string& path, const std::string& name) {
  return last_component_is(path, name);
}

bool TargetModules::matches(const std::string& path) const {
  if (is_all_linear()) return true;
  if (is_regex_) return detail::Pattern::compile(regex_, "target_modules")->fullmatch(path);
  for (const auto& name : names_) {
    if (matches_name(path, name)) return true;
  }
  return false;
}

std::string TargetModules::str() const {
  if (is_regex_) return "\"" + regex_ + "\"";
  std::string out;
  for (const auto& n : names_) out += (out.empty() ? "\"" : ", \"") + n + "\"";
  return "{" + out + "}";
}

void LoraConfig::validate() const {
  nn::LoraAdapterOptions(r_).lora_alpha(lora_alpha_).lora_dropout(lora_dropout_).validate();
  TORCH_CHECK_VALUE(bias_ == "none" || bias_ == "all" || bias_ == "lora_only",
                    "bias: expected \"none\", \"all\" or \"lora_only\", found \"", bias_, "\"");
  nn::check_task_type(task_type_);
  if (init_lora_weights_.kind() == nn::InitLoraWeights::Kind::kLoftq) loftq_config_.validate();
  if (target_modules_.is_regex()) check_regex("target_modules", target_modules_.regex());
  if (exclude_modules_.is_regex()) check_regex("exclude_modules", exclude_modules_.regex());
  for (const auto& name : target_modules_.names()) {
    TORCH_CHECK_VALUE(!name.empty(), "target_modules: an empty module name");
  }
  for (const auto& name : modules_to_save_) {
    TORCH_CHECK_VALUE(!name.empty(), "modules_to_save: an empty module name; expected names such as \"classifier\"");
    check_regex("modules_to_save", name);  // PEFT puts each entry into a regular expression as it is
  }
  for (const auto index : layers_to_transform_) {
    TORCH_CHECK_VALUE(index >= 0, "layers_to_transform: expected layer indices >= 0, found ", index);
  }
  for (const auto& pattern : layers_pattern_) {
    TORCH_CHECK_VALUE(!pattern.empty(), "layers_pattern: an empty pattern; expected names such as \"layers\"");
    check_regex("layers_pattern", pattern);
  }
  TORCH_CHECK_VALUE(layers_pattern_.empty() || !layers_to_transform_.empty(),
                    "layers_pattern: given without layers_to_transform; expected both (PEFT's rule), or neither");
  TORCH_CHECK_VALUE(layers_to_transform_.empty() || !target_modules_.is_regex_or_all_linear(),
                    "layers_to_transform: cannot be used when target_modules is a string (", target_modules_.str(),
                    "); give target_modules as a list of names (PEFT's rule)");
  for (const auto& [key, r] : rank_pattern_) {
    check_regex("rank_pattern", key);
    TORCH_CHECK_VALUE(r > 0, "rank_pattern: \"", key, "\" gives r=", r, "; expected a rank > 0");
  }
  for (const auto& [key, alpha] : alpha_pattern_) {
    check_regex("alpha_pattern", key);
    TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0, "alpha_pattern: \"", key, "\" gives lora_alpha=", alpha,
                      "; expected a finite value > 0");
  }
}

nn::LoraAdapterOptions LoraConfig::adapter_for(const std::string& path) const {
  int64_t r = r_;
  double alpha = lora_alpha_;
  for (const auto& [key, value] : rank_pattern_) {
    if (pattern_matches(path, key)) {
      r = value;
      break;
    }
  }
  for (const auto& [key, value] : alpha_pattern_) {
    if (pattern_matches(path, key)) {
      alpha = value;
      break;
    }
  }
  return nn::LoraAdapterOptions(r)
      .lora_alpha(alpha)
      .lora_dropout(lora_dropout_)
      .use_rslora(use_rslora_)
      .init_lora_weights(init_lora_weights_)
      .loftq_config(loftq_config_)
      .bias(bias_)
      .task_type(task_type_)
      .use_dora(use_dora_);
}

bool LoraConfig::in_transformed_layers(const TargetModules& targets, const std::string& path) const {
  if (layers_to_transform_.empty() || targets.is_regex_or_all_linear()) return true;
  for (const auto& name : targets.names()) {
    if (path == name) return true;  // named exactly: whatever its layer (PEFT)
  }
  // PEFT's rule: the first layer index in the path (not a nested one such as an expert's)
  // PEFT's regular expressions, the pattern inserted as it is; the index is the group named idx (a pattern may have
  // groups of its own)
  std::string digits;
  bool found = false;
  if (layers_pattern_.empty()) {
    found =
        detail::Pattern::compile(R"(.*?\.[^.]*\.(?P<idx>\d+)\.)", "layers_to_transform")->match(path, &digits, "idx");
  } else {
    for (const auto& pattern : layers_pattern_) {
      const auto re = detail::Pattern::compile("(?:^|.*?\\.)" + pattern + "\\.(?P<idx>\\d+)\\.", "layers_pattern");
      found = re->match(path, &digits, "idx");
      if (found) break;
    }
  }
  if (!found || digits.empty() || digits.size() > 18) return false;  // no index, or none an int64 layer index equals
  const int64_t index = std::stoll(digits);
  return std::find(layers_to_transform_.begin(), layers_to_transform_.end(), index) != layers_to_transform_.end();
}

bool LoraConfig::selects(const std::string& path) const {
  return target_modules_.matches(path) && in_transformed_layers(target_modules_, path);
}

std::vector<std::string> task_heads(const std::string& task_type) {
  if (task_type == "SEQ_CLS" || task_type == "TOKEN_CLS") return {"classifier", "score"};
  if (task_type == "QUESTION_ANS") return {"qa_outputs"};
  return {};
}

std::vector<std::string> LoraConfig::saved_modules() const {
  std::vector<std::string> out;
  for (const auto& list : {modules_to_save_, task_heads(task_type_)}) {
    for (const auto& name : list) {
      if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
    }
  }
  return out;
}

bool LoraConfig::saves_module(const std::string& path) const {
  for (const auto& name : saved_modules()) {
    if (path.size() >= name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0) return true;
  }
  return false;
}

bool LoraConfig::inside_saved_module(const std::string& path) const {
  for (const auto& name : saved_modules()) {
    if (detail::Pattern::compile("(^|.*\\.)" + name + "($|\\..*)", "modules_to_save")->match(path)) return true;
  }
  return false;
}

namespace {

std::string last_component(const std::string& path) {
  const auto dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

// "q_proj (32), v_proj (32), lm_head (1)": the Linear layers that exist, by name.
std::string linear_inventory(const std::vector<ModuleInfo>& modules) {
  std::vector<std::string> order;
  std::map<std::string, int> count;
  for (const auto& m : modules) {
    if (!m.is_linear) continue;
    const auto name = last_component(m.path);
    if (count[name]++ == 0) order.push_back(name);
  }
  if (order.empty()) return "none: the model has no Linear layers";
  std::string out;
  for (const auto& n : order) out += (out.empty() ? "" : ", ") + n + " (" + std::to_string(count[n]) + ")";
  return out;
}

}  // namespace

namespace {

// target_modules as given, or the model type's defaults (PEFT: "Please specify `target_modules`" otherwise).
TargetModules resolved_targets(const LoraConfig& config, const std::string& model_type) {
  if (!config.target_modules().empty()) return config.target_modules();
  const auto defaults = default_target_modules(model_type);
  if (defaults) return *defaults;
  std::string known;
  for (const auto& t : model_types_with_default_targets()) known += (known.empty() ? "" : ", ") + t;
  TORCH_CHECK_VALUE(false, "target_modules: not given, and ",
                    model_type.empty() ? std::string("the model has no model_type (it is not a transformers model)")
                                       : "model_type \"" + model_type + "\" has no default targets",
                    "; pass target_modules: module names such as [\"q_proj\", \"v_proj\"], a regular expression or "
                    "\"all-linear\" (default targets exist for the model types ",
                    known, ")");
  return {};
}

}  // namespace

std::vector<TargetChoice> select_targets(const std::vector<ModuleInfo>& modules, const LoraConfig& config,
                                         const std::string& model_type, std::vector<std::string>* warnings) {
  config.validate();
  const auto targets = resolved_targets(config, model_type);
  const auto& exclude = config.exclude_modules();
  if (!targets.is_all_linear()) {
    for (const auto& m : modules) {
      TORCH_CHECK_VALUE(
          m.takes_lora() || !targets.matches(m.path) || !config.in_transformed_layers(targets, m.path) ||
              config.inside_saved_module(m.path),
          "target_modules: ", targets.str(), " selects \"", m.path, "\", a ", m.type_name,
          ", but LoRA goes into Linear and embedding layers only. Linear layers here: ", linear_inventory(modules));
    }
  }
  std::vector<TargetChoice> chosen;
  bool any_match = false;
  std::vector<std::string> kept_whole;  // selected, but inside a module that modules_to_save trains whole (PEFT)
  for (size_t i = 0; i < modules.size(); ++i) {
    const auto& m = modules[i];
    if (!m.takes_lora() || !targets.matches(m.path) || !config.in_transformed_layers(targets, m.path)) continue;
    if (targets.is_all_linear() && (m.is_output_layer || !m.is_linear)) continue;
    if (config.inside_saved_module(m.path)) {
      kept_whole.push_back(m.path);
      continue;
    }
    any_match = true;
    if (!exclude.empty() && exclude.matches(m.path)) continue;
    chosen.push_back({i, config.adapter_for(m.path)});
  }
  TORCH_CHECK_VALUE(any_match || kept_whole.empty(), "target_modules: ", targets.str(), " selects only \"",
                    kept_whole.front(), "\"", kept_whole.size() > 1 ? " and others" : "",
                    ", inside modules that modules_to_save ", quoted(config.saved_modules()),
                    " trains whole (PEFT leaves LoRA out of them); target other layers");
  TORCH_CHECK_VALUE(any_match,
                    "target_modules: ", targets.names().size() == 1 ? "\"" + targets.names()[0] + "\"" : targets.str(),
                    " matches no module. Linear layers here: ", linear_inventory(modules));
  TORCH_CHECK_VALUE(!chosen.empty(), "exclude_modules: ", exclude.str(), " excludes every layer that target_modules ",
                    targets.str(), " selects");
  // As PEFT: an entry that matches nothing is no error while others match (recipes list names of several
  // architectures); PEFT says nothing, lorafuse says it (not for the model type's defaults, which the user did not
  // write and which may list names of several architectures).
  const auto& given = config.target_modules().names();
  for (const auto& name : given) {
    bool found = false;
    for (const auto& m : modules) found = found || (m.takes_lora() && TargetModules::matches_name(m.path, name));
    if (found) continue;
    const std::string message = "target_modules: \"" + name + "\" matches no module (the other entries select " +
                                std::to_string(chosen.size()) +
                                " layers). Linear layers here: " + linear_inventory(modules);
    if (warnings != nullptr) {
      warnings->push_back(message);
    } else {
      TORCH_WARN(message);
    }
  }
  return chosen;
}

std::vector<size_t> select_saved_modules(const std::vector<ModuleInfo>& modules, const LoraConfig& config, bool strict,
                                         std::vector<std::string>* warnings, const std::vector<size_t>& lora_targets) {
  config.validate();
  const auto names = config.saved_modules();
  std::vector<size_t> chosen;
  if (names.empty()) return chosen;
  auto warn = [&](const std::string& message) {
    if (warnings != nullptr) {
      warnings->push_back(message);
    } else {
      TORCH_WARN(message);
    }
  };
  auto inside = [](const std::string& path, const std::string& outer) {
    return path.size() > outer.size() && path.compare(0, outer.size(), outer) == 0 && path[outer.size()] == '.';
  };
  for (size_t i = 0; i < modules.size(); ++i) {
    const auto& m = modules[i];
    if (!config.saves_module(m.path)) continue;
    TORCH_CHECK_VALUE(m.is_saved_module || !m.is_lora_layer, "modules_to_save: ", quoted(names), " names \"", m.path,
                      "\", a LoRA layer (", m.type_name,
                      "); a module trains either whole (modules_to_save) or through LoRA, not both");
    for (const size_t j : chosen) {
      TORCH_CHECK_VALUE(!inside(m.path, modules[j].path), "modules_to_save: ", quoted(names), " names both \"",
                        modules[j].path, "\" and \"", m.path,
                        "\" inside it; a module is copied whole with what it holds: name one of them");
    }
    for (const auto& inner : modules) {
      TORCH_CHECK_VALUE(!inside(inner.path, m.path) || !inner.is_lora_layer, "modules_to_save: ", quoted(names),
                        " names \"", m.path, "\", which holds the LoRA layer \"", inner.path,
                        "\"; a module trains either whole (modules_to_save) or through LoRA, not both");
    }
    for (const size_t t : lora_targets) {
      const auto& target = modules.at(t).path;
      TORCH_CHECK_VALUE(target != m.path && !inside(target, m.path), "modules_to_save: ", quoted(names), " names \"",
                        m.path, "\" (its path ends with an entry, PEFT's rule), and target_modules selects \"", target,
                        "\"", target == m.path ? "" : " inside it",
                        " for LoRA; a module trains either whole or through LoRA, not both (PEFT refuses it too): "
                        "leave it out of one of them");
    }
    chosen.push_back(i);
  }
  const auto heads = task_heads(config.task_type());
  auto names_something = [&](const std::string& name) {
    for (const auto& m : modules) {
      if (m.path.size() >= name.size() && m.path.compare(m.path.size() - name.size(), name.size(), name) == 0)
        return true;
    }
    return false;
  };
  if (chosen.empty()) {
    const std::string message = "modules_to_save: " + quoted(names) + " names no module of this model" +
                                (config.task_type().empty() ? std::string()
                                                            : " (task_type \"" + config.task_type() + "\" adds " +
                                                                  quoted(heads) + ", the names of its usual heads)") +
                                "; name the module to train whole by its path or last name";
    TORCH_CHECK_VALUE(!strict || config.modules_to_save().empty(), message);
    warn(message + ". Nothing but the LoRA layers trains");
    return chosen;
  }
  for (const auto& name : config.modules_to_save()) {
    if (std::find(heads.begin(), heads.end(), name) != heads.end() || names_something(name)) continue;
    warn("modules_to_save: \"" + name + "\" names no module (the other entries name " + std::to_string(chosen.size()) +
         ")");
  }
  return chosen;
}

}  // namespace lorafuse
