// lorafuse — the C++ API of the DoRA ops (csrc/ops/dora.cpp): weight-decomposed LoRA (Liu et al., 2024) as PEFT
// computes it (use_dora). A DoRA adapter adds a magnitude vector m [out] to A and B; the layer computes
//   y = m / ‖W + scale·B·A‖ ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b
// with the row norm ‖·‖ of the adapted weight treated as a constant (no gradient flows through it, as the paper and
// PEFT do). Calls go through the dispatcher (torch.ops.lorafuse.dora_*).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace lorafuse {

/// ‖W + scale·B·A‖ per output row [out], in float32 (float64 when weight or an adapter is float64), computed without
/// forming W + scale·B·A: ‖Wᵢ‖² + 2·scale·⟨(W·Aᵀ)ᵢ, Bᵢ⟩ + scale²·Bᵢ·(A·Aᵀ)·Bᵢᵀ (a 16-bit weight is widened in
/// blocks of rows). weight [out, in] (any strides: Conv1D's transposed view), lora_a [r, in], lora_b [out, r]. Never
/// differentiated.
at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale);

/// A DoRA layer's output, PEFT's numerics. Without dropout (dropout_p = 0):
///   y = g ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b,   g = magnitude / dora_weight_norm(W, A, B, scale) (constant norm)
/// computed by the fused lora_linear (no second GEMM; over a 16-bit x with float32 adapters the base GEMM and a float32
/// branch, x cast as PEFT casts it) — or, when `base_out` (the base layer's own output for x: a base called as it is)
/// is given, g ⊙ (base_out − b + scale·(x·Aᵀ)·Bᵀ) + b. With dropout (training), as PEFT: the base
/// output plus (g − 1) ⊙ x̃·Wᵀ + g ⊙ scale·(x̃·Aᵀ)·Bᵀ with x̃ = dropout(x). x [..., in]; weight [out, in]; bias [out]
/// or none; magnitude [out]. y has x's dtype. Differentiable in x, bias, lora_a, lora_b, magnitude and base_out.
at::Tensor dora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                       const at::Tensor& magnitude, const std::optional<at::Tensor>& base_out = std::nullopt);

}  // namespace lorafuse
