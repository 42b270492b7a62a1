// PEFT's JSON of an adapter's initialisation, one mapping for adapter_config.json (peft_json), lorafuse's module
// archives (adapter_options_json) and the Python front (private to csrc/).
#pragma once

#include <lorafuse/config/adapter_options.h>

#include <nlohmann/json.hpp>
#include <string>

namespace lorafuse::detail {

/// init_lora_weights as PEFT writes it: true / false, or the string ("gaussian", "loftq").
nlohmann::ordered_json init_lora_weights_json(const nn::InitLoraWeights& init);
/// loftq_config as PEFT writes it: {"loftq_bits", "loftq_iter"} with "loftq", {} otherwise.
nlohmann::ordered_json loftq_config_json(const nn::InitLoraWeights& init, const nn::LoftqConfig& loftq);
/// The inverse: an object of integer loftq_bits / loftq_iter ({} gives the defaults; another field is refused;
/// the values are checked with the config, LoftqConfig::validate); ValueErrors start with `what`.
nn::LoftqConfig loftq_config_from_json(const nlohmann::ordered_json& value, const std::string& what);

}  // namespace lorafuse::detail
