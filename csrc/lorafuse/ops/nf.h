// lorafuse — the C++ API of the quantized-weight ops (csrc/ops/nf.cpp): the one format of QLoRA and LQ-LoRA, NF-b
// codes in absmax blocks with the statistics quantized again, for any bit width. Calls go through the dispatcher
// (torch.ops.lorafuse.quantize_nf, ...). The NF4 ops (lorafuse/ops/nf4.h) are this family at 4 bits with
// bitsandbytes' statistics.
//
// A format is [bits, blocksize, stat_bits, stat_blocksize]:
//   bits            the NF-b code of the weights, 2 .. 8 (nf_code(bits); 4 is bitsandbytes' NF4)
//   blocksize       weights per absmax block, a power of two in [16, 4096]
//   stat_bits       0: every absmax in float32; 8: bitsandbytes' double quantization (offset = mean, the dynamic
//                   8-bit code); 2 .. 7: the LQ-LoRA reference's (offset = min, the uniform code k / (2^b − 1))
//   stat_blocksize  statistics per scale, a power of two in [16, 4096] (0 with stat_bits = 0)
// The scales of the statistics are float32, bfloat16 or float16 (quantize_nf's stat_dtype). Storage per weight:
// bits + stat_bits / blocksize + (scale bits) / (blocksize · stat_blocksize). [4, 64, 8, 256] with float32 scales is
// bitsandbytes' NF4 with double quantization (4.127 bits), to the bit.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace lorafuse {

/// A quantized weight, with bitsandbytes' (and transformers' checkpoint) names:
///   packed         uint8 [ceil(n·bits/8), 1]: the codes as a bit stream, most significant bit first (4 bits: two per
///                  byte, the first element in the high nibble)
///   absmax         float32 [blocks] (stat_bits = 0) or uint8 [ceil(blocks·stat_bits/8)] (the statistics' codes)
///   nested_absmax  the statistics' scales [ceil(blocks/stat_blocksize)] in stat_dtype with double quantization, else
///   [0] offset         float32 [] with double quantization, else [0]
struct NfWeight {
  at::Tensor packed, absmax, nested_absmax, offset;
};

/// Quantizes `weight` (float32, bfloat16 or float16; any shape, read row-major; finite values) in `format`. Each
/// index is taken against its block's exact absmax; the statistics are then quantized as the format says.
NfWeight quantize_nf(const at::Tensor& weight, at::IntArrayRef format, at::ScalarType stat_dtype = at::kFloat);

/// The weight of `shape` in `dtype` (float32, bfloat16 or float16): code[index] · the statistic of its block (decoded
/// as code · scale + offset with double quantization), computed in float32, rounded once to dtype.
at::Tensor dequantize_nf(const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                         at::IntArrayRef format, at::IntArrayRef shape, at::ScalarType dtype);

/// y = x·Wᵀ + bias for the quantized W [out_features, in] (in = x.size(-1); x float32, bfloat16, float16 or float64),
/// dequantized a tile of rows at a time in x's dtype, so the dense weight of a large layer never exists as a whole.
/// Differentiable in x and bias, never in W.
at::Tensor nf_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                     at::IntArrayRef format, int64_t out_features,
                     const std::optional<at::Tensor>& bias = std::nullopt);
/// dX = dY·W [..., in_features] (W as nf_linear computes with it), tile by tile, accumulated in float32.
at::Tensor nf_linear_backward(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              at::IntArrayRef format, int64_t in_features);

/// The LoRA layer over a quantized base in one op: nf_linear(x, W, bias) + scale·(dropout(x)·Aᵀ)·Bᵀ, the branch by
/// lora_add's rules. Differentiable in x, bias, lora_a and lora_b, never in the quantized weight (a statistic that
/// requires grad is an error). On the CPU one kernel; elsewhere nf_linear and lora_add.
at::Tensor nf_lora_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                          at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p = 0.0);
/// Its training forward (out, u = dropout(x)·Aᵀ [T, r], rng_state [2]) and backward (grad_x, grad_lora_a, grad_lora_b,
/// grad_bias for output_mask = (x, lora_a, lora_b, bias); the others empty), as lora_linear_forward / _backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nf_lora_linear_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, at::IntArrayRef format,
    int64_t out_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
    double scale, double dropout_p);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf_lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, at::IntArrayRef format,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale,
    double dropout_p, std::array<bool, 4> output_mask);

/// A quantized layer's forward (bitsandbytes' Linear4bit semantics): x and bias cast to compute_dtype, nf_linear, the
/// result cast back to x's dtype (the C++ and Python Linear4bit and bitsandbytes' layers all run it).
at::Tensor linear_nf(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                     at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias,
                     at::ScalarType compute_dtype);

/// A LoRA layer over a quantized layer — what LoraLinear4bit and Python's quantized kinds run: nf_lora_linear when x
/// is in compute_dtype and lora_a in x's dtype or float32 (the bias cast to compute_dtype), else
/// lora_branch(linear_nf(x, ...), x, A, B, scale, p).
at::Tensor lora_linear_nf(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                          at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias,
                          at::ScalarType compute_dtype, const at::Tensor& lora_a, const at::Tensor& lora_b,
                          double scale, double dropout_p = 0.0);

/// What nf_merge returns: the re-quantized weight and what the rounding cost.
struct NfMerge {
  NfWeight weight;
  /// ‖Ŵ − W'‖_F / ‖W'‖_F: the relative change of the layer's outputs for inputs with uncorrelated features, where
  /// W' = dequant(W) + the adapters (float32) and Ŵ what the new bits encode.
  double output_error;
  /// ‖Ŵ − W'‖_F / ‖W' − dequant(W)‖_F: the rounding measured against what the adapters add (1 = as large).
  double adapter_error;
  /// The two as the op returns them, float32 [2] on the weight's device.
  at::Tensor error;
};

/// Merging into the quantized weight, asked for explicitly: dequant(W) [shape] + Σ scaleᵢ·Bᵢ·Aᵢ in float32
/// (lora_merge; a non-finite result is an error), quantized again in `format` (statistic scales in nested_absmax's
/// dtype). The caller keeps the old bytes to unmerge exactly.
NfMerge nf_merge(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                 const std::optional<at::Tensor>& offset, at::IntArrayRef format, at::IntArrayRef shape,
                 at::TensorList lora_a, at::TensorList lora_b, c10::ArrayRef<double> scale);

/// LoftQ's initialisation of a LoRA layer (PEFT's loftq_init; the op lorafuse::loftq_init): W [out, in] (floating
/// point, finite) quantized to NF-`bits` in blocks of 64 without double quantization (bits = 4: bitsandbytes' NF4, as
/// PEFT quantizes), alternating `num_iter` times with the rank-r truncated SVD of what the quantization leaves, in
/// float32. qweight: dequant(Q) in W's dtype; lora_a = √S·Vᵀ [r, in] and lora_b = U·√S [out, r] in float32, so that
/// qweight + lora_b·lora_a ≈ W. 1 <= r <= min(out, in), 2 <= bits <= 8, num_iter >= 1.
struct LoftqInit {
  at::Tensor qweight, lora_a, lora_b;
};
LoftqInit loftq_init(const at::Tensor& weight, int64_t bits, int64_t r, int64_t num_iter = 1);

/// Bits per weight of `format` with statistic scales in `stat_dtype` (the one offset per matrix left out).
double nf_bits_per_weight(at::IntArrayRef format, at::ScalarType stat_dtype = at::kFloat);

/// Whether `format` with statistic scales in `stat_dtype` is bitsandbytes' NF4: 4 bits, one of its block sizes (32 ..
/// 4096), and its double quantization ([8, 256] with float32 scales) or none ([0, 0]). Only such weights go into
/// bitsandbytes-format checkpoints and bitsandbytes' layers; the rule every layer, file and kind asks.
bool is_bnb_nf4(at::IntArrayRef format, at::ScalarType stat_dtype = at::kFloat);

}  // namespace lorafuse
