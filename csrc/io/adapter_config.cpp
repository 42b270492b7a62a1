// adapter_config.json ↔ AdapterFile: the LoraConfig mapping is lorafuse::lora_config_from_peft_json /
// lora_config_to_peft_json (csrc/config/peft_json.cpp).
#include <lorafuse/config/peft_json.h>
#include <lorafuse/io/adapter.h>

namespace lorafuse::io {

AdapterFile parse_adapter_config(const std::string& json_text, const std::string& what) {
  PeftLoraConfig parsed = lora_config_from_peft_json(json_text, what, /*adapter_file=*/true);
  AdapterFile file;
  file.config = std::move(parsed.config);
  file.targets_from_file = parsed.targets_from_file;
  file.base_model_name_or_path = std::move(parsed.base_model_name_or_path);
  file.warnings = std::move(parsed.warnings);
  return file;
}

std::string adapter_config_json(const AdapterFile& file) {
  return lora_config_to_peft_json(file.config, file.base_model_name_or_path);
}

}  // namespace lorafuse::io
