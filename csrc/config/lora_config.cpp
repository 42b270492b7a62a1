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
          m.takes_lora() || !targets.matches(m.path) || !config.in_transformed_layers(targets, m.path),
          "target_modules: ", targets.str(), " selects \"", m.path, "\", a ", m.type_name,
          ", but LoRA goes into Linear and embedding layers only. Linear layers here: ",
          linear_inventory(modules));
    }
  }
  std::vector<TargetChoice> chosen;
  bool any_match = false;
  for (size_t i = 0; i < modules.size(); ++i) {
    const auto& m = modules[i];
    if (!m.takes_lora() || !targets.matches(m.path) || !config.in_transformed_layers(targets, m.path)) continue;
    if (targets.is_all_linear() && (m.is_output_layer || !m.is_linear)) continue;
    any_match = true;
    if (!exclude.empty() && exclude.matches(m.path)) continue;
    chosen.push_back({i, config.adapter_for(m.path)});
  }
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

}  // namespace lorafuse
