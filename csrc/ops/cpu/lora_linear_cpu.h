// CPU pieces of the LoRA ops that nf4_lora_linear shares: the backward of lora_linear and lora_add
// (lora_linear_cpu.cpp) and the branch added to an output (lora_add_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace lorafuse::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale, double dropout_p,
    std::array<bool, 4> output_mask);

// y2 [T, out] += scale · u [T, r] · Bᵀ, in u's (accumulation) dtype: lora_add's branch, also nf4_lora_linear's
// (lora_add_cpu.cpp). A half-precision y2 gets the expand computed in float32 and added once.
void add_expand_(at::Tensor& y2, const at::Tensor& u, const at::Tensor& lora_b, double scale);

}  // namespace lorafuse::cpu
