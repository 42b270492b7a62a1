// lorafuse — the C++ API of the multi-adapter ops (csrc/ops/lora_multi.cpp): one batch whose rows go through
// different adapters of the same layer (serving many tasks from one base, or training several tenants' adapters in
// one step). Calls go through the dispatcher (torch.ops.lorafuse.lora_segments, lora_multi_add, ...).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>
#include <vector>

namespace lorafuse {

/// The rows of a batch grouped by adapter, computed once per batch and shared by every layer: row_adapter int64
/// [T] holds each row's adapter index in [0, num_adapters) or -1 (the base alone). order int64 [T] lists the rows
/// adapter by adapter, each adapter's in row order, then the base's rows; adapter i's rows are
/// order[offsets[i] : offsets[i + 1]] (offsets int64 [num_adapters + 1]). Shapes are static (no size depends on
/// the values); the index check reads row_adapter once (a small copy from a device).
struct LoraSegments {
  at::Tensor order, offsets;
};
LoraSegments lora_segments(const at::Tensor& row_adapter, int64_t num_adapters);

/// y = base_out, then for each adapter i and each row t of its segment: y[t] += scale[i]·(dropout(x[t])·A[i]ᵀ)·B[i]ᵀ,
/// each row as lora_add computes it (its accumulation dtype rules and dropout mask). Ranks may differ between
/// adapters (lora_a[i] [rᵢ, in], lora_b[i] [out, rᵢ]); nothing is padded. Differentiable in base_out, x and every
/// adapter's A and B; an adapter's gradients come from its rows only.
at::Tensor lora_multi_add(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
                          at::ArrayRef<double> scale, const LoraSegments& segments, double dropout_p = 0.0);

/// The training forward (y, rng_state) and its backward (grad_x, grad_lora_a, grad_lora_b for output_mask = (x,
/// lora_a, lora_b); the others empty).
std::tuple<at::Tensor, at::Tensor> lora_multi_add_forward(const at::Tensor& base_out, const at::Tensor& x,
                                                          at::TensorList lora_a, at::TensorList lora_b,
                                                          at::ArrayRef<double> scale, const LoraSegments& segments,
                                                          double dropout_p);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_add_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
    at::ArrayRef<double> scale, const LoraSegments& segments, const at::Tensor& rng_state, double dropout_p,
    std::array<bool, 3> output_mask);

/// Per token (decode): y = base_out, then y[t] += scale[i]·(x[t]·A[i]ᵀ)·B[i]ᵀ for i = row_adapter[t] (int64, one per
/// row of x; -1: the base alone). No dropout. lora_multi_add's result without grouping the rows first (on CUDA one
/// kernel block per token). Differentiable.
at::Tensor lora_token_add(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
                          at::ArrayRef<double> scale, const at::Tensor& row_adapter);

}  // namespace lorafuse
