// lorafuse::nn::Linear4bit — a frozen linear layer whose weight is stored quantized: 4-bit NF4 by default (QLoRA's
// base, bitsandbytes' bytes), or any format of the family (lorafuse/ops/nf.h: LQ-LoRA's 2 .. 8-bit bases); computed
// by lorafuse::nf_linear a tile of rows at a time.
#pragma once

#include <c10/core/ScalarType.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <lorafuse/config/quant_config.h>
#include <lorafuse/ops/nf4.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace lorafuse::nn {

/// Options of a Linear4bit (bitsandbytes' names).
struct Linear4bitOptions {
  Linear4bitOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  /// Whether the layer has a bias (a Parameter in compute_dtype).
  TORCH_ARG(bool, bias) = true;
  /// The dtype x is cast to and the GEMM runs in: float32, bfloat16 or float16; the output is cast back to x's.
  TORCH_ARG(c10::ScalarType, compute_dtype) = c10::ScalarType::Float;
  /// Weights per absmax block: bitsandbytes' 32, 64, ..., 4096 for NF4; a power of two in [16, 4096] otherwise.
  TORCH_ARG(int64_t, blocksize) = 64;
  /// Whether the block statistics are quantized again (NF4: 8 bits, blocks of 256: 4.127 instead of 4.5 bits per
  /// weight).
  TORCH_ARG(bool, double_quant) = true;
  /// The NF code's bits per weight: 4 is bitsandbytes' NF4; 2 .. 8 for LQ-LoRA's bases.
  TORCH_ARG(int64_t, bits) = 4;
  /// With double_quant: bits per quantized statistic (8: bitsandbytes' dynamic code around the mean; 2 .. 7: the
  /// uniform code above the minimum), statistics per scale, and the scales' dtype (float32, bfloat16 or float16).
  TORCH_ARG(int64_t, stat_bits) = 8;
  TORCH_ARG(int64_t, stat_blocksize) = 256;
  TORCH_ARG(c10::ScalarType, stat_dtype) = c10::ScalarType::Float;

 public:
  /// The quantized-weight format [bits, blocksize, stat_bits, stat_blocksize] (0, 0 without double_quant).
  std::vector<int64_t> format() const {
    return {bits(), blocksize(), double_quant() ? stat_bits() : 0, double_quant() ? stat_blocksize() : 0};
  }
  /// Whether this is bitsandbytes' NF4 (4 bits, its block sizes; its double quantization or none): what its checkpoints
  /// hold.
  bool is_nf4() const { return lorafuse::is_bnb_nf4(format(), stat_dtype()); }
};

/// y = x·Wᵀ + b with W [out, in] held as the buffers `packed`, `absmax`, `nested_absmax` and `offset`
/// (lorafuse::quantize_nf's outputs; for NF4 bitsandbytes' bytes). The weight is frozen: buffers, never a gradient.
class Linear4bitImpl : public torch::nn::Cloneable<Linear4bitImpl> {
 public:
  Linear4bitImpl(int64_t in_features, int64_t out_features)
      : Linear4bitImpl(Linear4bitOptions(in_features, out_features)) {}
  /// A layer holding a zero weight (load a state or use from_linear).
  explicit Linear4bitImpl(const Linear4bitOptions& options);

  /// `linear`'s weight quantized to NF4 (as from_weight) and its bias in compute_dtype, which defaults to the weight's
  /// dtype.
  static std::shared_ptr<Linear4bitImpl> from_linear(const torch::nn::Linear& linear,
                                                     std::optional<c10::ScalarType> compute_dtype = std::nullopt,
                                                     int64_t blocksize = 64, bool double_quant = true);

  /// A layer holding `weight` [out_features, in_features] quantized on its device (a CUDA weight through the CPU in a
  /// build without CUDA kernels: the same bytes either way) and `bias` (undefined for none; cast to compute_dtype).
  static std::shared_ptr<Linear4bitImpl> from_weight(const at::Tensor& weight, const at::Tensor& bias,
                                                     std::optional<c10::ScalarType> compute_dtype = std::nullopt,
                                                     int64_t blocksize = 64, bool double_quant = true);
  /// A layer holding `weight` [out_features, in_features] (the sizes in `options`) quantized in options.format() with
  /// options.stat_dtype on its device, and `bias` (undefined for none; cast to compute_dtype).
  static std::shared_ptr<Linear4bitImpl> from_weight(const at::Tensor& weight, const at::Tensor& bias,
                                                     const Linear4bitOptions& options);
  /// A layer holding already quantized bytes (quantize_nf's outputs for an [out_features, in_features] weight in
  /// options.format() and options.stat_dtype) and `bias` (undefined when options.bias is false). The sizes and dtypes
  /// are checked against the options.
  static std::shared_ptr<Linear4bitImpl> from_nf4(const Linear4bitOptions& options, const Nf4Weight& weight,
                                                  const at::Tensor& bias = at::Tensor());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// [..., in] → [..., out] in x's dtype.
  at::Tensor forward(const at::Tensor& x);
  /// The dense weight [out, in] the quantized bytes encode (a new tensor), in `dtype` (default compute_dtype).
  at::Tensor dequantized_weight(std::optional<c10::ScalarType> dtype = std::nullopt) const;

  Linear4bitOptions options;
  at::Tensor packed, absmax, nested_absmax, offset;  // buffers
  at::Tensor bias;                                   // parameter, or undefined
};

TORCH_MODULE(Linear4bit);

/// The options of an [out_features, in_features] layer that `config` stores (its quant_type's bits, blocksize and
/// double quantization), computing in `compute_dtype`.
Linear4bitOptions linear4bit_options(const QuantConfig& config, int64_t in_features, int64_t out_features, bool bias,
                                     c10::ScalarType compute_dtype);

}  // namespace lorafuse::nn
