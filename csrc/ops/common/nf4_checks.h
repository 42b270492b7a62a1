// What every NF4 kernel checks and shares (CPU, Meta, later CUDA): argument rules with messages naming the
// argument, the output shapes, and the code tables as float32 arrays.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>

namespace lorafuse::detail {

/// Blocks of `blocksize` over n elements (a partial last block counts).
inline int64_t nf4_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

/// quantize_nf4: weight float32/bfloat16/float16, strided, non-empty; blocksize one of 32 ... 4096.
void check_quantize_nf4_args(const at::Tensor& weight, int64_t blocksize);

/// quantize_nf4's weight (flat float32, any device) holds finite values only: bitsandbytes turns a NaN into a NaN block
/// statistic and an infinity into NaN codes, and with double quantization the result would depend on undefined
/// float-to-int conversions. The error gives the first bad value's flat index.
void check_nf4_finite(const at::Tensor& flat);

/// dequantize_nf4 (and the weight of nf4_linear; `op` names the op in messages): sizes and dtypes of packed, absmax,
/// nested_absmax and offset agree with shape and blocksize.
/// Returns whether the statistics are double-quantized.
bool check_dequantize_nf4_args(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype);

/// nf4_linear / nf4_linear_backward: x (or grad_out) float32/bfloat16/float16/float64 with its last size matching,
/// the NF4 weight [out_features, in_features] as dequantize_nf4 checks it, bias [out_features] in x's dtype.
/// Returns whether the statistics are double-quantized.
bool check_nf4_linear_args(const char* op, const at::Tensor& x, int64_t x_features, const at::Tensor& packed,
                           const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                           int64_t in_features, const std::optional<at::Tensor>& bias);

/// nf4_lora_linear (forward): x [..., in] float32/bfloat16/float16/float64, the NF4 weight [out_features, in] and bias
/// as nf4_linear checks them, lora_a [r, in] and lora_b [out_features, r] as lora_add checks them.
/// Returns whether the statistics are double-quantized.
bool check_nf4_lora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                                int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p);

/// nf4_lora_linear_backward: grad_out, x, u and rng_state as lora_linear_backward checks them (without weight), the NF4
/// weight [lora_b.size(0), x.size(-1)]. Returns whether the statistics are double-quantized.
bool check_nf4_lora_linear_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& packed, const at::Tensor& absmax,
                                         const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& offset, int64_t blocksize,
                                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
                                         const at::Tensor& rng_state, double scale, double dropout_p);

/// Under grad mode, a 4-bit weight's statistic that requires grad is an error (the 4-bit weight is frozen: QLoRA
/// trains the adapters), naming the statistic.
void check_nf4_statistics_frozen(const char* op, const at::Tensor& absmax,
                                 const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& offset);

/// The dynamic 8-bit code (256 sorted values), computed once as bitsandbytes' create_dynamic_map(signed=True).
const std::array<float, 256>& dynamic_code();

}  // namespace lorafuse::detail
