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
  /// Whether the layer at `path` stays dense (modules_to_not_convert).
  bool keeps_dense(const std::string& path) const;

  /// "nf4" (bitsandbytes' 4-bit NormalFloat).
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
