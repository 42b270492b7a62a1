#include <c10/util/Exception.h>
#include <lorafuse/config/adapter_options.h>

#include <cctype>
#include <cmath>

namespace lorafuse::nn {

InitLoraWeights::InitLoraWeights(const std::string& init) {
  if (init == "gaussian") {
    kind_ = Kind::kGaussian;
  } else if (init == "true") {
    kind_ = Kind::kDefault;
  } else if (init == "false") {
    kind_ = Kind::kRandom;
  } else {
    TORCH_CHECK_VALUE(false, "init_lora_weights: expected true, false or \"gaussian\", found \"", init, "\"");
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
}

void check_adapter_name(const std::string& name) {
  TORCH_CHECK_VALUE(!name.empty(), "adapter_name: expected a non-empty name");
  for (unsigned char c : name) {
    TORCH_CHECK_VALUE(c != '.' && !std::isspace(c) && !std::iscntrl(c), "adapter_name: \"", name,
                      "\" may not contain '.', whitespace or control characters (it becomes part of module paths)");
  }
}

}  // namespace lorafuse::nn
