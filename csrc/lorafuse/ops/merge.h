// lorafuse — the C++ API of the merge ops (csrc/ops/merge.cpp): the numerics that every LoRA layer (C++ and
// Python, every base kind that can hold a merged weight) uses to fold adapters into its base weight.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace lorafuse {

/// scale · B · A [out, in] in float32 (float64 when lora_a is float64). lora_a [r, in], lora_b [out, r].
at::Tensor lora_delta_weight(const at::Tensor& lora_a, const at::Tensor& lora_b, double scale);

/// weight + Σᵢ scaleᵢ · Bᵢ · Aᵢ, summed in float32 (float64 for a float64 weight) starting from `weight`, rounded
/// once to weight's dtype; a new tensor. ValueError if the result is not finite (float16 overflows at 65504)
/// or the lists disagree in length or shape. Exact unmerging keeps `weight` and restores it.
///
/// `magnitude`: empty (every adapter plain LoRA) or one entry per adapter, undefined for plain LoRA and a DoRA
/// adapter's magnitude vector m [out]: in turn, as PEFT merges, W ← m / ‖W₀ + scale·B·A‖ ⊙ (W + scale·B·A), where W₀
/// is `weight` (the unmerged weight) and the norm is lorafuse::dora_weight_norm's.
at::Tensor lora_merge(const at::Tensor& weight, const std::vector<at::Tensor>& lora_a,
                      const std::vector<at::Tensor>& lora_b, const std::vector<double>& scale,
                      const std::vector<at::Tensor>& magnitude = {});

}  // namespace lorafuse
