// The NF4 ops (bitsandbytes' names and fields) as the quantized-weight ops at 4 bits (CompositeImplicitAutograd):
// the format is [4, blocksize, 8, 256] when the statistics are double-quantized (nested_absmax given), else
// [4, blocksize, 0, 0]. quantize_nf4, dequantize_nf4, nf4_linear and nf4_lora_linear check their arguments under
// their own names first, so those errors name the op the user called; what only the kernels can see (a non-finite
// weight) and the internal ops (the _forward/_backward pairs, linear4bit, lora_linear4bit, nf4_merge) report the
// generic op's name.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <lorafuse/ops/nf.h>

#include "csrc/ops/common/nf_checks.h"

namespace lorafuse::composite {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined() && t->sym_numel() > 0; }

std::vector<int64_t> format_of(const char* op, int64_t blocksize, const OptTensor& nested_absmax) {
  return detail::format_list(detail::nf4_format(op, blocksize, given(nested_absmax)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4(const at::Tensor& weight, int64_t blocksize,
                                                                        bool double_quant) {
  constexpr const char* op = "lorafuse.quantize_nf4";
  const nf::Format f = detail::nf4_format(op, blocksize, double_quant);
  detail::check_quantize_nf_args(op, weight, f, at::kFloat);  // finiteness: quantize_nf's kernels look at the values
  auto [packed, absmax, nested, offset] = lorafuse::quantize_nf(weight, detail::format_list(f), at::kFloat);
  return {packed, absmax, nested, offset};
}

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
                          const OptTensor& offset, int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  constexpr const char* op = "lorafuse.dequantize_nf4";
  const auto format = format_of(op, blocksize, nested_absmax);
  detail::check_dequantize_nf_args(op, packed, absmax, nested_absmax, offset, detail::parse_nf_format(op, format),
                                   shape, dtype);
  return lorafuse::dequantize_nf(packed, absmax, nested_absmax, offset, format, shape, dtype);
}

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const OptTensor& nested_absmax, const OptTensor& offset, int64_t blocksize, int64_t out_features,
                      const OptTensor& bias) {
  constexpr const char* op = "lorafuse.nf4_linear";
  const auto format = format_of(op, blocksize, nested_absmax);
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 1, op, ": x: expected [..., in_features]");
  detail::check_nf_linear_args(op, x, x.size(-1), packed, absmax, nested_absmax, offset,
                               detail::parse_nf_format(op, format), out_features, x.size(-1), bias);
  if (at::GradMode::is_enabled()) detail::check_nf_statistics_frozen(op, absmax, nested_absmax, offset);
  return lorafuse::nf_linear(x, packed, absmax, nested_absmax, offset, format, out_features, bias);
}

at::Tensor nf4_linear_backward(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                               const OptTensor& nested_absmax, const OptTensor& offset, int64_t blocksize,
                               int64_t in_features) {
  const auto format = format_of("lorafuse.nf4_linear_backward", blocksize, nested_absmax);
  return lorafuse::nf_linear_backward(grad_out, packed, absmax, nested_absmax, offset, format, in_features);
}

at::Tensor nf4_lora_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const OptTensor& nested_absmax, const OptTensor& offset, int64_t blocksize,
                           int64_t out_features, const OptTensor& bias, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, double scale, double dropout_p) {
  constexpr const char* op = "lorafuse.nf4_lora_linear";
  const auto format = format_of(op, blocksize, nested_absmax);
  detail::check_nf_lora_linear_args(op, x, packed, absmax, nested_absmax, offset, detail::parse_nf_format(op, format),
                                    out_features, bias, lora_a, lora_b, scale, dropout_p);
  if (at::GradMode::is_enabled()) detail::check_nf_statistics_frozen(op, absmax, nested_absmax, offset);
  return lorafuse::nf_lora_linear(x, packed, absmax, nested_absmax, offset, format, out_features, bias, lora_a, lora_b,
                                  scale, dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& offset, int64_t blocksize, int64_t out_features, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scale, double dropout_p) {
  const auto format = format_of("lorafuse.nf4_lora_linear_forward", blocksize, nested_absmax);
  return lorafuse::nf_lora_linear_forward(x, packed, absmax, nested_absmax, offset, format, out_features, bias, lora_a,
                                          lora_b, scale, dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const OptTensor& nested_absmax, const OptTensor& offset, int64_t blocksize, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale, double dropout_p,
    std::array<bool, 4> output_mask) {
  const auto format = format_of("lorafuse.nf4_lora_linear_backward", blocksize, nested_absmax);
  return lorafuse::nf_lora_linear_backward(grad_out, x, packed, absmax, nested_absmax, offset, format, lora_a, lora_b,
                                           u, rng_state, scale, dropout_p, output_mask);
}

at::Tensor linear4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const OptTensor& nested_absmax, const OptTensor& offset, int64_t blocksize, int64_t out_features,
                      const OptTensor& bias, at::ScalarType compute_dtype) {
  const auto format = format_of("lorafuse.linear4bit", blocksize, nested_absmax);
  return lorafuse::linear_nf(x, packed, absmax, nested_absmax, offset, format, out_features, bias, compute_dtype);
}

at::Tensor lora_linear4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const OptTensor& nested_absmax, const OptTensor& offset, int64_t blocksize,
                           int64_t out_features, const OptTensor& bias, at::ScalarType compute_dtype,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  const auto format = format_of("lorafuse.lora_linear4bit", blocksize, nested_absmax);
  return lorafuse::lora_linear_nf(x, packed, absmax, nested_absmax, offset, format, out_features, bias, compute_dtype,
                                  lora_a, lora_b, scale, dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_merge(
    const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax, const OptTensor& offset,
    int64_t blocksize, at::IntArrayRef shape, at::TensorList lora_a, at::TensorList lora_b,
    c10::ArrayRef<double> scale) {
  TORCH_CHECK_VALUE(shape.size() == 2, "lorafuse.nf4_merge: shape must be [out, in]; found ", shape);
  const auto format = format_of("lorafuse.nf4_merge", blocksize, nested_absmax);
  // the op itself, not lorafuse::nf_merge, which reads the error's values (no data-dependent reads under tracing)
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::nf_merge", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, at::IntArrayRef,
                           at::IntArrayRef, at::TensorList, at::TensorList, c10::ArrayRef<double>)>();
  return op.call(packed, absmax, nested_absmax, offset, format, shape, lora_a, lora_b, scale);
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeImplicitAutograd, m) {
  m.impl("quantize_nf4", &lorafuse::composite::quantize_nf4);
  m.impl("dequantize_nf4", &lorafuse::composite::dequantize_nf4);
  m.impl("nf4_linear", &lorafuse::composite::nf4_linear);
  m.impl("nf4_linear_backward", &lorafuse::composite::nf4_linear_backward);
  m.impl("nf4_lora_linear", &lorafuse::composite::nf4_lora_linear);
  m.impl("nf4_lora_linear_forward", &lorafuse::composite::nf4_lora_linear_forward);
  m.impl("nf4_lora_linear_backward", &lorafuse::composite::nf4_lora_linear_backward);
  m.impl("linear4bit", &lorafuse::composite::linear4bit);
  m.impl("lora_linear4bit", &lorafuse::composite::lora_linear4bit);
  m.impl("nf4_merge", &lorafuse::composite::nf4_merge);
}
