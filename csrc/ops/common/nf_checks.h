// What every kernel of the quantized-weight format checks and shares (CPU, Meta, CUDA; cuda/shared/nf_format.h has
// the format): argument rules with messages naming the argument, the output shapes, and the code tables.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "cuda/shared/nf_format.h"

namespace lorafuse::detail {

/// Blocks of `blocksize` over n elements (a partial last block counts).
inline int64_t nf4_blocks(int64_t n, int64_t blocksize) { return nf::blocks_of(n, blocksize); }

/// The `format` argument of the NF ops, [bits, blocksize, stat_bits, stat_blocksize], checked (cuda/shared/nf_format.h
/// has the ranges); the error names the field, what was found and what is allowed.
nf::Format parse_nf_format(const char* op, at::IntArrayRef format);

/// The NF4 ops' format: bitsandbytes' NF4 in blocks of `blocksize` (one of its sizes 32 ... 4096), double quantization
/// [4, blocksize, 8, 256] or none [4, blocksize, 0, 0].
nf::Format nf4_format(const char* op, int64_t blocksize, bool double_quant);
/// The format as the ops' int[] argument.
std::vector<int64_t> format_list(const nf::Format& f);

/// quantize_nf: weight float32/bfloat16/float16, strided, non-empty; stat_dtype float32/bfloat16/float16 (float32
/// without double quantization).
void check_quantize_nf_args(const char* op, const at::Tensor& weight, const nf::Format& f, at::ScalarType stat_dtype);

/// quantize_nf's weight (flat float32, any device) holds finite values only: bitsandbytes turns a NaN into a NaN block
/// statistic and an infinity into NaN codes, and with double quantization the result would depend on undefined
/// float-to-int conversions. The error gives the first bad value's flat index.
void check_nf_finite(const char* op, const at::Tensor& flat);

/// dequantize_nf (and the weight of nf_linear; `op` names the op in messages): sizes and dtypes of packed, absmax,
/// nested_absmax and offset agree with shape and the format. Returns whether the statistics are double-quantized.
bool check_dequantize_nf_args(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              const nf::Format& f, at::IntArrayRef shape, at::ScalarType dtype);

/// nf_linear / nf_linear_backward: x (or grad_out) float32/bfloat16/float16/float64 with its last size matching,
/// the weight [out_features, in_features] as dequantize_nf checks it, bias [out_features] in x's dtype.
/// Returns whether the statistics are double-quantized.
bool check_nf_linear_args(const char* op, const at::Tensor& x, int64_t x_features, const at::Tensor& packed,
                          const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& offset, const nf::Format& f, int64_t out_features,
                          int64_t in_features, const std::optional<at::Tensor>& bias);

/// nf_lora_linear (forward): x [..., in] float32/bfloat16/float16/float64, the weight [out_features, in] and bias
/// as nf_linear checks them, lora_a [r, in] and lora_b [out_features, r] as lora_add checks them.
/// Returns whether the statistics are double-quantized.
bool check_nf_lora_linear_args(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                               const nf::Format& f, int64_t out_features, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p);

/// nf_lora_linear_backward: grad_out, x, u and rng_state as lora_linear_backward checks them (without weight), the
/// weight [lora_b.size(0), x.size(-1)]. Returns whether the statistics are double-quantized.
bool check_nf_lora_linear_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                        const at::Tensor& packed, const at::Tensor& absmax,
                                        const std::optional<at::Tensor>& nested_absmax,
                                        const std::optional<at::Tensor>& offset, const nf::Format& f,
                                        const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
                                        const at::Tensor& rng_state, double scale, double dropout_p);

/// Under grad mode, a quantized weight's statistic that requires grad is an error (the 4-bit weight is frozen: QLoRA
/// trains the adapters), naming the statistic.
void check_nf_statistics_frozen(const char* op, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& offset);

/// The dynamic 8-bit code (256 sorted values), computed once as bitsandbytes' create_dynamic_map(signed=True).
const std::array<float, 256>& dynamic_code();

/// The 2^stat_bits values a statistic's code stands for, ascending: the dynamic code for 8 bits, k / (2^stat_bits − 1)
/// below (cuda/shared/nf_format.h). Built once per width (2 .. 8), shared by every kernel.
const std::vector<float>& statistics_code(int64_t stat_bits);

/// The NF-bits code (nf::code), built once per width (2 .. 8), shared by every kernel.
const std::vector<float>& weight_code(int64_t bits);

/// The 65536-point table of the dynamic code (nf4::build_lut) that 8-bit statistics are quantized through, built once.
const std::vector<uint8_t>& dynamic_lut();

/// The offset the statistics are centred on before their second quantization, from the first-level absmax [blocks]
/// (a CPU tensor, so the reduction order, and so the bytes, are the same on every device): 8 bits, bitsandbytes'
/// mean; fewer, the LQ-LoRA reference's minimum. A float32 scalar tensor on the CPU.
at::Tensor statistics_offset(const nf::Format& f, const at::Tensor& absmax);

}  // namespace lorafuse::detail
