// lorafuse::LoraConfig ↔ JSON with PEFT's field names (csrc/config/peft_json.cpp): the one mapping, used for
// PEFT's adapter_config.json and for the Python front's lorafuse.LoraConfig (whose fields are PEFT's).
#pragma once

#include <lorafuse/config/lora_config.h>

#include <string>
#include <vector>

namespace lorafuse {

/// A LoraConfig read from JSON, with what the JSON said besides.
struct PeftLoraConfig {
  LoraConfig config;
  /// target_modules was null or absent (PEFT then picks by model type; an adapter file's layers are the targets).
  bool targets_from_file = false;
  std::string base_model_name_or_path;
  /// Unknown fields, ignored (worth telling the user).
  std::vector<std::string> warnings;
};

/// Parses `json_text` (an object of PEFT LoraConfig fields). ValueErrors are prefixed with `what` and name the
/// field: malformed JSON, a field of the wrong type, a peft_type other than "LORA" (required when
/// `adapter_file`), PEFT features lorafuse does not support yet (use_dora, modules_to_save, ...; each allowed
/// only at its "off" value), init_lora_weights other than true/false/"gaussian", and every LoraConfig::validate
/// rule.
PeftLoraConfig lora_config_from_peft_json(const std::string& json_text, const std::string& what, bool adapter_file);

/// The adapter_config.json that PEFT writes for `config`.
std::string lora_config_to_peft_json(const LoraConfig& config, const std::string& base_model_name_or_path = "");

}  // namespace lorafuse
