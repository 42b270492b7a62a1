// lorafuse — the C++ API of the NF4 ops (csrc/ops/nf4.cpp): 4-bit NormalFloat quantization with bitsandbytes'
// exact bytes (QLoRA's frozen base). Calls go through the dispatcher (torch.ops.lorafuse.quantize_nf4, ...).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include <lorafuse/ops/nf.h>

namespace lorafuse {

/// What quantize_nf4 returns (lorafuse/ops/nf.h: NfWeight at 4 bits), with bitsandbytes' (and transformers'
/// checkpoint) names: packed uint8 [ceil(n/2), 1], two codes per byte, the first element in the high nibble; absmax
/// float32 [blocks] or, with double quantization, uint8 [blocks]; nested_absmax float32 [ceil(blocks/256)] and offset
/// float32 [] (the mean of the first-level absmax) with double quantization, else [0].
using Nf4Weight = NfWeight;

/// Quantizes `weight` (float32, bfloat16 or float16; any shape, read row-major; finite values) in blocks of
/// `blocksize` (32, 64, ..., 4096), bit-exact with bitsandbytes' quantize_4bit(quant_type="nf4",
/// compress_statistics=double_quant) on the CPU.
Nf4Weight quantize_nf4(const at::Tensor& weight, int64_t blocksize = 64, bool double_quant = true);

/// The weight of `shape` in `dtype` (float32, bfloat16 or float16) that `packed` and its statistics encode:
/// code[index] · absmax of its block, computed in float32 (absmax first decoded from its 8-bit codes and the
/// offset added when nested_absmax is given), rounded once to dtype — bitsandbytes' dequantize_4bit.
at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                          int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype);

/// y = x·Wᵀ + bias for the NF4 weight W [out_features, in] (in = x.size(-1); x float32, bfloat16, float16 or
/// float64), dequantized a tile of rows at a time (at most ~16 MiB of float32, in a per-thread scratch buffer kept
/// between calls) in x's dtype, so the dense weight of a large layer never exists as a whole. Differentiable in x and
/// bias (dX through nf4_linear_backward), never in W. The QLoRA layer in one op is nf4_lora_linear.
at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                      int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias = std::nullopt);
/// dX = dY·W [..., in_features] (W as nf4_linear computes with it), tile by tile, accumulated in float32.
at::Tensor nf4_linear_backward(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t in_features);

/// A 4-bit layer's forward, bitsandbytes' Linear4bit semantics: x and bias cast to compute_dtype, nf4_linear, the
/// result cast back to x's dtype (the C++ and Python Linear4bit and bitsandbytes' layers all run it).
at::Tensor linear4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                      int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                      at::ScalarType compute_dtype);

/// The QLoRA layer in one op: nf4_linear(x, W4, bias) + scale·(dropout(x)·Aᵀ)·Bᵀ, the branch by lora_add's rules
/// (lora_a in x's dtype or float32, accumulated in float32, float64 for float64; bias in x's dtype). Differentiable in
/// x, bias, lora_a and lora_b, never in the 4-bit weight (a statistic that requires grad is an error). On the CPU one
/// kernel: the branch is added into the base's output in place and dX's two terms go into one buffer; elsewhere
/// nf4_linear and lora_add.
at::Tensor nf4_lora_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                           int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p = 0.0);
/// Its training forward (out, u = dropout(x)·Aᵀ [T, r], rng_state [2]) and backward (grad_x, grad_lora_a, grad_lora_b,
/// grad_bias for output_mask = (x, lora_a, lora_b, bias); the others empty), as lora_linear_forward / _backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, int64_t blocksize,
    int64_t out_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
    double scale, double dropout_p);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, int64_t blocksize,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale,
    double dropout_p, std::array<bool, 4> output_mask);

/// A LoRA layer over a 4-bit layer — what LoraLinear4bit and Python's 4-bit kinds run: nf4_lora_linear when x is in
/// compute_dtype and lora_a in x's dtype or float32 (the bias cast to compute_dtype), else
/// lora_branch(linear4bit(x, ...), x, A, B, scale, p).
at::Tensor lora_linear4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                           int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                           at::ScalarType compute_dtype, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           double scale, double dropout_p = 0.0);

/// What nf4_merge returns: the re-quantized weight and what the rounding cost (NfMerge, lorafuse/ops/nf.h).
using Nf4Merge = NfMerge;

/// Merging into 4 bits, asked for explicitly: dequant(W) [shape] + Σ scaleᵢ·Bᵢ·Aᵢ in float32 (lora_merge; a
/// non-finite result is an error), quantized again with `blocksize` and double quantization when nested_absmax is
/// given and not empty. The caller keeps the old bytes to unmerge exactly.
Nf4Merge nf4_merge(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                   const std::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                   at::TensorList lora_a, at::TensorList lora_b, c10::ArrayRef<double> scale);

/// The 16 NF4 code values (bitsandbytes' quant_map), float32 [16] on the CPU.
at::Tensor nf4_code_map();
/// The 256 values of the dynamic 8-bit code the statistics are quantized with (bitsandbytes' nested_quant_map,
/// create_dynamic_map(signed=True)), float32 [256] on the CPU.
at::Tensor dynamic_code_map();

}  // namespace lorafuse
