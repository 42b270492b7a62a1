// How quantize_model stores a model's frozen Linear layers (QLoRA's base), with bitsandbytes' / transformers' names.
#pragma once

#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lorafuse {

struct QuantConfig {
  /// ValueError / TypeError naming the field unless the config is valid.
  void validate() const;
  /// The bits of quant_type ("nf3" → 3).
  int64_t bits() const;
  /// Whether the layer at `path` stays dense (modules_to_not_convert).
  bool keeps_dense(const std::string& path) const;

  /// The `quantization_config` object of a Hugging Face config.json (transformers' BitsAndBytesConfig) as a
  /// QuantConfig: quant_method "bitsandbytes" with load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant,
  /// bnb_4bit_compute_dtype, llm_int8_skip_modules (→ modules_to_not_convert; null keeps the default). `json_text`
  /// is that object's JSON. ValueErrors name the field: another quant_method, 8-bit, fp4, a dtype not taken.
  /// The block size is not part of it (each weight's quant_state has its own); blocksize stays 64.
  static QuantConfig from_hf_json(const std::string& json_text, const std::string& what = "quantization_config");
  /// The `quantization_config` object transformers writes for this config, as JSON text, with
  /// llm_int8_skip_modules = `dense_modules` (the paths of the Linear layers left dense, so that transformers
  /// quantizes exactly the layers stored in 4 bits) and bnb_4bit_compute_dtype = compute_dtype (float32 if unset).
  std::string to_hf_json(const std::vector<std::string>& dense_modules) const;

  /// "nf4" (bitsandbytes' 4-bit NormalFloat), or "nf2", "nf3", "nf5" ... "nf8": the b-bit NormalFloat of the same
  /// family (lorafuse/ops/nf.h; double quantization as NF4's: 8-bit statistics in blocks of 256, float32 scales),
  /// which only lorafuse loads.
  TORCH_ARG(std::string, quant_type) = "nf4";
  /// Weights per absmax block: 32, 64, ..., 4096.
  TORCH_ARG(int64_t, blocksize) = 64;
  /// Whether the block statistics are quantized again (8 bits in blocks of 256): 4.127 instead of 4.5 bits per weight.
  TORCH_ARG(bool, double_quant) = true;
  /// The dtype the 4-bit layers compute in (float32, bfloat16 or float16); nullopt: each layer's weight dtype.
  TORCH_ARG(std::optional<c10::ScalarType>, compute_dtype) = std::nullopt;
  /// Layers left dense: a module whose path is an entry or ends with "." + an entry.
  TORCH_ARG(std::vector<std::string>, modules_to_not_convert) = std::vector<std::string>{"lm_head"};
};

}  // namespace lorafuse
