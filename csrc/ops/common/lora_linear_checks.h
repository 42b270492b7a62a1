// Argument validation shared by every backend of lora_linear and lora_add (CPU, CUDA, Meta). Each failure names the
// argument, what was found and what was expected. Sizes are read as SymInts, so the Meta kernels can use
// the same checks under torch.compile's dynamic shapes.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace lorafuse::detail {

// T, the number of tokens: the product of all but the last dimension of x (explicit, since
// reshape({-1, 0}) is ambiguous when in is 0). The SymInt form serves the Meta kernels.
int64_t leading_numel(at::IntArrayRef sizes);
c10::SymInt leading_sym_numel(const at::Tensor& x);

// sizes with the last dimension replaced by `last` (x's shape → the output's).
std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last);

// dtype of u and of all accumulation: float64 when x or the adapter is float64, else float32.
at::ScalarType lora_acc_dtype(const at::Tensor& x, const at::Tensor& lora_a);

// The LoRA branch alone: x [..., in], lora_a [r, in], lora_b [out, r] (out given, `out_from` says whence).
void check_lora_branch_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const c10::SymInt& out, const char* out_from, double scale, double dropout_p);

void check_lora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale, double dropout_p);

// lora_add: base_out [..., out] (the base layer's output for x, any floating dtype) plus the branch.
void check_lora_add_args(const char* op, const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, double scale, double dropout_p);

// weight absent: the backward of lora_add (no dY·W term).
void check_lora_linear_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& lora_a,
                                     const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state,
                                     double scale, double dropout_p);

}  // namespace lorafuse::detail
