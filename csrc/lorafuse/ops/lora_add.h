// lorafuse — the C++ API of lora_add (csrc/ops/lora_add.cpp): the LoRA branch added to the output of a base
// layer that lorafuse calls as it is (a Linear subclass with its own forward, a layer with hooks, later a
// quantized base). Calls go through the dispatcher (torch.ops.lorafuse.lora_add).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lorafuse {

/// y = base_out + scale · (dropout(x)·Aᵀ)·Bᵀ
///
/// base_out [..., out]: the base layer's output for x (any floating dtype; y has its dtype); x [..., in];
/// lora_a [r, in]; lora_b [out, r], both x's dtype or float32. Accumulation in float32 (float64 for float64);
/// the expand is accumulated onto a copy of base_out (beta = 1). Dropout as in lora_linear.
/// Differentiable with respect to base_out, x, lora_a and lora_b.
at::Tensor lora_add(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                    const at::Tensor& lora_b, double scale, double dropout_p = 0.0);

/// lora_add over a base's output with the adapter-dtype rule every LoRA layer over a base called as it is follows:
/// x is cast to lora_a's dtype unless it is x's or float32 (torch.ops.lorafuse.lora_branch).
at::Tensor lora_branch(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, double scale, double dropout_p = 0.0);

/// The training forward: (y, u, rng_state) as lora_linear_forward; backward is lora_linear_backward without
/// weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_add_forward(const at::Tensor& base_out, const at::Tensor& x,
                                                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                double scale, double dropout_p);

}  // namespace lorafuse
