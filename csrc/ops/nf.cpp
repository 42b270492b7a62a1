// C++ API of the quantized-weight ops → dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <lorafuse/ops/nf.h>

#include "csrc/ops/common/nf_checks.h"

namespace lorafuse {

using OptTensor = std::optional<at::Tensor>;

NfWeight quantize_nf(const at::Tensor& weight, at::IntArrayRef format, at::ScalarType stat_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::quantize_nf", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, at::IntArrayRef, at::ScalarType)>();
  auto [packed, absmax, nested_absmax, offset] = op.call(weight, format, stat_dtype);
  return {packed, absmax, nested_absmax, offset};
}

at::Tensor dequantize_nf(const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
                         const OptTensor& offset, at::IntArrayRef format, at::IntArrayRef shape, at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::dequantize_nf", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                         at::IntArrayRef, at::IntArrayRef, at::ScalarType)>();
  return op.call(packed, absmax, nested_absmax, offset, format, shape, dtype);
}

at::Tensor nf_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const OptTensor& nested_absmax, const OptTensor& offset, at::IntArrayRef format,
                     int64_t out_features, const OptTensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::nf_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, at::IntArrayRef, int64_t, const OptTensor&)>();
  return op.call(x, packed, absmax, nested_absmax, offset, format, out_features, bias);
}

at::Tensor nf_linear_backward(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                              const OptTensor& nested_absmax, const OptTensor& offset, at::IntArrayRef format,
                              int64_t in_features) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::nf_linear_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, at::IntArrayRef, int64_t)>();
  return op.call(grad_out, packed, absmax, nested_absmax, offset, format, in_features);
}

at::Tensor nf_lora_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const OptTensor& nested_absmax, const OptTensor& offset, at::IntArrayRef format,
                          int64_t out_features, const OptTensor& bias, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, double scale, double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::nf_lora_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, at::IntArrayRef, int64_t, const OptTensor&,
                                         const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(x, packed, absmax, nested_absmax, offset, format, out_features, bias, lora_a, lora_b, scale,
                 dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf_lora_linear_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& offset, at::IntArrayRef format, int64_t out_features, const OptTensor& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::nf_lora_linear_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
              at::IntArrayRef, int64_t, const OptTensor&, const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(x, packed, absmax, nested_absmax, offset, format, out_features, bias, lora_a, lora_b, scale,
                 dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf_lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const OptTensor& nested_absmax, const OptTensor& offset, at::IntArrayRef format, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale, double dropout_p,
    std::array<bool, 4> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::nf_lora_linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, at::IntArrayRef, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, double, std::array<bool, 4>)>();
  return op.call(grad_out, x, packed, absmax, nested_absmax, offset, format, lora_a, lora_b, u, rng_state, scale,
                 dropout_p, output_mask);
}

at::Tensor linear_nf(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const OptTensor& nested_absmax, const OptTensor& offset, at::IntArrayRef format,
                     int64_t out_features, const OptTensor& bias, at::ScalarType compute_dtype) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::linear_nf", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                            at::IntArrayRef, int64_t, const OptTensor&, at::ScalarType)>();
  return op.call(x, packed, absmax, nested_absmax, offset, format, out_features, bias, compute_dtype);
}

at::Tensor lora_linear_nf(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const OptTensor& nested_absmax, const OptTensor& offset, at::IntArrayRef format,
                          int64_t out_features, const OptTensor& bias, at::ScalarType compute_dtype,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_linear_nf", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, at::IntArrayRef, int64_t, const OptTensor&, at::ScalarType,
                                         const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(x, packed, absmax, nested_absmax, offset, format, out_features, bias, compute_dtype, lora_a, lora_b,
                 scale, dropout_p);
}

NfMerge nf_merge(const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
                 const OptTensor& offset, at::IntArrayRef format, at::IntArrayRef shape, at::TensorList lora_a,
                 at::TensorList lora_b, c10::ArrayRef<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::nf_merge", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, at::IntArrayRef,
                           at::IntArrayRef, at::TensorList, at::TensorList, c10::ArrayRef<double>)>();
  auto [p, a, n, o, error] = op.call(packed, absmax, nested_absmax, offset, format, shape, lora_a, lora_b, scale);
  const at::Tensor e = error.to(at::kCPU, at::kDouble);
  return {{p, a, n, o}, e[0].item<double>(), e[1].item<double>(), error};
}

LoftqInit loftq_init(const at::Tensor& weight, int64_t bits, int64_t r, int64_t num_iter) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::loftq_init", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, int64_t)>();
  auto [qweight, lora_a, lora_b] = op.call(weight, bits, r, num_iter);
  return {qweight, lora_a, lora_b};
}

double nf_bits_per_weight(at::IntArrayRef format, at::ScalarType stat_dtype) {
  const nf::Format f = detail::parse_nf_format("lorafuse.nf_bits_per_weight", format);
  TORCH_CHECK_TYPE(stat_dtype == at::kFloat || stat_dtype == at::kHalf || stat_dtype == at::kBFloat16,
                   "lorafuse.nf_bits_per_weight: stat_dtype: expected float32, bfloat16 or float16, found ",
                   stat_dtype);
  TORCH_CHECK_TYPE(f.nested() || stat_dtype == at::kFloat,
                   "lorafuse.nf_bits_per_weight: stat_dtype: expected float32 "
                   "without double quantization (stat_bits = 0), found ",
                   stat_dtype);
  return nf::bits_per_weight(f, stat_dtype == at::kFloat ? 32 : 16);
}

}  // namespace lorafuse
