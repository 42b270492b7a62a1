// The target_modules that a LoraConfig without them gets, by the model's type (PEFT's table).
#pragma once

#include <lorafuse/config/lora_config.h>

#include <optional>
#include <string>
#include <vector>

namespace lorafuse {

/// PEFT's default target_modules for transformers' `model_type` (peft 0.21's
/// TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): {"q_proj", "v_proj"} for "llama", {"c_attn"} for "gpt2",
/// {"query", "value"} for "bert" ...; std::nullopt for a type the table does not hold. The one copy of the table:
/// the Python front asks it too (lorafuse.default_target_modules).
std::optional<TargetModules> default_target_modules(const std::string& model_type);

/// The model types default_target_modules knows, sorted.
std::vector<std::string> model_types_with_default_targets();

}  // namespace lorafuse
