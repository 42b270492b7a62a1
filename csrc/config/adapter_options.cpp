#include <c10/util/Exception.h>
#include <lorafuse/config/adapter_options.h>

#include "csrc/config/adapter_json.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

namespace lorafuse::nn {

InitLoraWeights::InitLoraWeights(const std::string& init) {
  if (init == "gaussian") {
    kind_ = Kind::kGaussian;
  } else if (init == "loftq") {
    kind_ = Kind::kLoftq;
  } else if (init == "pissa") {
    kind_ = Kind::kPissa;
  } else if (init == "olora") {
    kind_ = Kind::kOlora;
  } else if (init == "true") {
    kind_ = Kind::kDefault;
  } else if (init == "false") {
    kind_ = Kind::kRandom;
  } else if (init.rfind("pissa_niter_", 0) == 0) {
    const std::string digits = init.substr(std::strlen("pissa_niter_"));
    TORCH_CHECK_VALUE(!digits.empty() && digits.size() <= 6 &&
                          std::all_of(digits.begin(), digits.end(), [](unsigned char c) { return std::isdigit(c); }),
                      "init_lora_weights: \"", init,
                      "\": expected \"pissa_niter_N\" with N the number of subspace iterations (0 .. 999999)");
    kind_ = Kind::kPissaNiter;
    niter_ = std::stoll(digits);
  } else {
    TORCH_CHECK_VALUE(false,
                      "init_lora_weights: expected true, false, \"gaussian\", \"loftq\", \"pissa\", "
                      "\"pissa_niter_N\" or \"olora\", found \"",
                      init, "\"");
  }
}

std::string InitLoraWeights::str() const {
  switch (kind_) {
    case Kind::kDefault:
      return "true";
    case Kind::kGaussian:
      return "gaussian";
    case Kind::kRandom:
      return "false";
    case Kind::kLoftq:
      return "loftq";
    case Kind::kPissa:
      return "pissa";
    case Kind::kPissaNiter:
      return "pissa_niter_" + std::to_string(niter_);
    case Kind::kOlora:
      return "olora";
  }
  return "true";
}

double LoraAdapterOptions::scale() const {
  return use_rslora_ ? lora_alpha_ / std::sqrt(static_cast<double>(r_)) : lora_alpha_ / static_cast<double>(r_);
}

void LoraAdapterOptions::validate() const {
  TORCH_CHECK_VALUE(r_ > 0, "r: expected a rank > 0, found ", r_);
  TORCH_CHECK_VALUE(std::isfinite(lora_alpha_) && lora_alpha_ > 0, "lora_alpha: expected a finite value > 0, found ",
                    lora_alpha_);
  TORCH_CHECK_VALUE(lora_dropout_ >= 0.0 && lora_dropout_ < 1.0,
                    "lora_dropout: expected a probability in [0, 1), found ", lora_dropout_);
  TORCH_CHECK_VALUE(bias_ == "none" || bias_ == "all" || bias_ == "lora_only",
                    "bias: expected \"none\", \"all\" or \"lora_only\", found \"", bias_, "\"");
  if (dtype_) {
    TORCH_CHECK_TYPE(c10::isFloatingType(*dtype_),
                     "dtype: expected a floating-point dtype for lora_A and lora_B, found ", *dtype_);
  }
  check_task_type(task_type_);
  if (init_lora_weights_.kind() == InitLoraWeights::Kind::kLoftq) loftq_config_.validate();
}

void LoftqConfig::validate() const {
  TORCH_CHECK_VALUE(loftq_bits_ >= 2 && loftq_bits_ <= 8,
                    "loftq_config: loftq_bits: expected 2 .. 8 (the NF code's bits; PEFT: 4), found ", loftq_bits_);
  TORCH_CHECK_VALUE(loftq_iter_ >= 1, "loftq_config: loftq_iter: expected >= 1, found ", loftq_iter_);
}

void check_task_type(const std::string& task_type) {
  for (const char* known :
       {"", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})
    if (task_type == known) return;
  TORCH_CHECK_VALUE(false,
                    "task_type: expected one of PEFT's task types \"CAUSAL_LM\", \"SEQ_2_SEQ_LM\", "
                    "\"FEATURE_EXTRACTION\", \"SEQ_CLS\", \"TOKEN_CLS\", \"QUESTION_ANS\" or none, found \"",
                    task_type, "\"");
}

void check_adapter_name(const std::string& name) {
  TORCH_CHECK_VALUE(!name.empty(), "adapter_name: expected a non-empty name");
  for (unsigned char c : name) {
    TORCH_CHECK_VALUE(c != '.' && !std::isspace(c) && !std::iscntrl(c), "adapter_name: \"", name,
                      "\" may not contain '.', whitespace or control characters (it becomes part of module paths)");
  }
}

}  // namespace lorafuse::nn

namespace lorafuse::nn {
namespace {

using json = nlohmann::ordered_json;

c10::ScalarType dtype_named(const std::string& name, const std::string& what) {
  for (auto t : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    if (name == c10::toString(t)) return t;
  }
  TORCH_CHECK_VALUE(false, what, ": dtype: expected Float, Double, Half or BFloat16, found \"", name, "\"");
}

}  // namespace

std::string adapter_options_json(const LoraAdapterOptions& a) {
  return json{{"r", a.r()},
              {"lora_alpha", a.lora_alpha()},
              {"lora_dropout", a.lora_dropout()},
              {"use_rslora", a.use_rslora()},
              {"init_lora_weights", detail::init_lora_weights_json(a.init_lora_weights())},
              {"loftq_config", detail::loftq_config_json(a.init_lora_weights(), a.loftq_config())},
              {"bias", a.bias()},
              {"task_type", a.task_type().empty() ? json(nullptr) : json(a.task_type())},
              {"use_dora", a.use_dora()},
              {"dtype", a.dtype() ? json(c10::toString(*a.dtype())) : json(nullptr)}}
      .dump();
}

LoraAdapterOptions adapter_options_from_json(const std::string& text, const std::string& what) {
  try {
    const json j = json::parse(text);
    LoraAdapterOptions a(j.at("r").get<int64_t>());
    a.lora_alpha(j.at("lora_alpha").get<double>())
        .lora_dropout(j.at("lora_dropout").get<double>())
        .use_rslora(j.at("use_rslora").get<bool>())
        .bias(j.at("bias").get<std::string>());
    const json& init = j.at("init_lora_weights");
    a.init_lora_weights(init.is_boolean() ? InitLoraWeights(init.get<bool>())
                                          : InitLoraWeights(init.get<std::string>()));
    if (j.contains("dtype") && !j.at("dtype").is_null()) a.dtype(dtype_named(j.at("dtype").get<std::string>(), what));
    if (j.contains("loftq_config")) a.loftq_config(detail::loftq_config_from_json(j.at("loftq_config"), what));
    // absent in archives written before task_type existed
    if (j.contains("task_type") && !j.at("task_type").is_null()) a.task_type(j.at("task_type").get<std::string>());
    if (j.contains("use_dora")) a.use_dora(j.at("use_dora").get<bool>());  // absent in archives before DoRA
    a.validate();
    return a;
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, what, ": cannot read adapter options from ", text, " (", e.what(), ")");
  }
}

}  // namespace lorafuse::nn

namespace lorafuse::detail {

nlohmann::ordered_json init_lora_weights_json(const nn::InitLoraWeights& init) {
  const auto text = init.str();
  return text == "true" || text == "false" ? nlohmann::ordered_json(text == "true") : nlohmann::ordered_json(text);
}

nlohmann::ordered_json loftq_config_json(const nn::InitLoraWeights& init, const nn::LoftqConfig& loftq) {
  if (init.kind() != nn::InitLoraWeights::Kind::kLoftq) return nlohmann::ordered_json::object();
  return {{"loftq_bits", loftq.loftq_bits()}, {"loftq_iter", loftq.loftq_iter()}};
}

nn::LoftqConfig loftq_config_from_json(const nlohmann::ordered_json& value, const std::string& what) {
  TORCH_CHECK_VALUE(value.is_object(), what, ": loftq_config must be an object, found ", value.type_name(), " ",
                    value.dump());
  nn::LoftqConfig loftq;
  for (const auto& [field, v] : value.items()) {
    const bool bits = field == "loftq_bits";
    TORCH_CHECK_VALUE(bits || field == "loftq_iter", what, ": loftq_config: unknown field \"", field,
                      "\" (expected loftq_bits, loftq_iter)");
    TORCH_CHECK_VALUE(v.is_number_integer(), what, ": loftq_config.", field, " must be an integer, found ",
                      v.type_name(), " ", v.dump());
    if (bits) {
      loftq.loftq_bits(v.get<int64_t>());
    } else {
      loftq.loftq_iter(v.get<int64_t>());
    }
  }
  return loftq;
}

}  // namespace lorafuse::detail
