// Argument validation of the multi-adapter ops (CPU, Meta, and the composites): each failure names the argument (and
// the adapter), what was found and what was expected.
#pragma once

#include <ATen/core/Tensor.h>

namespace lorafuse::detail {

// lora_segments: row_adapter int64 1-D; each value in [-1, num_adapters) (read on any device: one small copy).
void check_lora_segments_args(const char* op, const at::Tensor& row_adapter, int64_t num_adapters);

// lora_multi_add: at least one adapter; lora_b and scale one entry per adapter; each adapter by lora_add's rules
// (named "op (adapter i)"); order int64 1-D and offsets int64 [adapters + 1] on x's device. With `values` (kernels that
// read them), also offsets non-decreasing from 0 to at most order's length (rows past offsets[n]: the base's), order
// no longer than x's rows, and every row index in [0, rows of x) listed once at most.
void check_lora_multi_add_args(const char* op, const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& order,
                               const at::Tensor& offsets, double dropout_p, bool values);

// lora_token_add: the adapters as lora_multi_add's (no dropout); row_adapter int64 [rows of x] on x's device, with
// `values` also each in [-1, adapters).
void check_lora_token_add_args(const char* op, const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& row_adapter,
                               bool values);

// lora_multi_add_backward: its arguments as lora_multi_add's (with values; grad_out in base_out's place), and
// rng_state int64 [2].
void check_lora_multi_add_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                        at::TensorList lora_a, at::TensorList lora_b, at::ArrayRef<double> scale,
                                        const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& rng_state,
                                        double dropout_p);

}  // namespace lorafuse::detail
