// lorafuse — the C++ API of the lora_linear op family (csrc/ops/lora_linear.cpp). Each function calls the op through the PyTorch dispatcher
// (torch.ops.lorafuse.*), so C++ and Python callers reach the same CPU, CUDA, Meta and Autograd
// kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace lorafuse {

/// y = x·Wᵀ + b + scale · (dropout(x)·Aᵀ)·Bᵀ
///
/// x [..., in]; weight [out, in] (frozen: no gradient is ever computed for it); bias [out] or none;
/// lora_a [r, in]; lora_b [out, r] (PEFT's shapes). Returns [..., out] in x's dtype.
/// dtypes: x, weight and bias share one of float32, float16, bfloat16 (float64 on CPU and CUDA too);
/// lora_a and lora_b share x's dtype or float32. Accumulation is in float32 (float64 for float64).
/// dropout_p in [0, 1) applies to the LoRA branch only and follows torch's default generator of x's
/// device; backward regenerates the forward's mask from the seed instead of storing it.
/// Differentiable with respect to x, bias, lora_a and lora_b.
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p = 0.0);

/// The training forward: (y, u, rng_state). u = dropout(x)·Aᵀ [T, r] (float32, float64 for float64
/// inputs; T = x.numel() / in) and rng_state [2] int64 (seed, offset) on x's device are what
/// lora_linear_backward needs besides x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                   double scale, double dropout_p);

/// Gradients of lora_linear: (grad_x, grad_lora_a, grad_lora_b, grad_bias). output_mask says which
/// of the four to compute; the others come back as empty tensors of shape [0]. Without weight it is the
/// backward of lora_add: grad_x is the LoRA term alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale, double dropout_p,
    std::array<bool, 4> output_mask);

/// Whether this build of lorafuse has its CUDA kernels (LORAFUSE_CUDA at build time).
bool has_cuda_kernels();

}  // namespace lorafuse
