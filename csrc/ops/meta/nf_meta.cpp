// Meta kernels of the quantized-weight ops: shapes, dtypes and argument errors (the values are not looked at, so a
// meta weight's finiteness is not checked).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "csrc/ops/common/nf_checks.h"

namespace lorafuse::meta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf_meta(const at::Tensor& weight,
                                                                            at::IntArrayRef format,
                                                                            at::ScalarType stat_dtype) {
  constexpr const char* op = "lorafuse.quantize_nf";
  const nf::Format f = detail::parse_nf_format(op, format);
  detail::check_quantize_nf_args(op, weight, f, stat_dtype);
  const c10::SymInt n = weight.sym_numel();
  const c10::SymInt blocks = (n + f.blocksize - 1) / f.blocksize;
  const auto f32 = weight.options().dtype(at::kFloat);
  at::Tensor packed = at::empty_symint({(n * f.bits + 7) / 8, 1}, f32.dtype(at::kByte));
  if (!f.nested()) return {packed, at::empty_symint({blocks}, f32), at::empty({0}, f32), at::empty({0}, f32)};
  const c10::SymInt nested = (blocks + f.stat_blocksize - 1) / f.stat_blocksize;
  return {packed, at::empty_symint({(blocks * f.stat_bits + 7) / 8}, f32.dtype(at::kByte)),
          at::empty_symint({nested}, f32.dtype(stat_dtype)), at::empty({}, f32)};
}

at::Tensor dequantize_nf_meta(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              at::IntArrayRef format, at::IntArrayRef shape, at::ScalarType dtype) {
  constexpr const char* op = "lorafuse.dequantize_nf";
  detail::check_dequantize_nf_args(op, packed, absmax, nested_absmax, offset, detail::parse_nf_format(op, format),
                                   shape, dtype);
  return at::empty(shape, packed.options().dtype(dtype));
}

at::Tensor nf_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                          at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lorafuse.nf_linear";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x: expected [..., in_features], found a 0-d tensor");
  const int64_t in_features = x.size(-1);
  detail::check_nf_linear_args(op, x, in_features, packed, absmax, nested_absmax, offset,
                               detail::parse_nf_format(op, format), out_features, in_features, bias);
  auto shape = x.sym_sizes().vec();
  shape.back() = out_features;
  return at::empty_symint(shape, x.options());
}

at::Tensor nf_linear_backward_meta(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& offset, at::IntArrayRef format,
                                   int64_t in_features) {
  constexpr const char* op = "lorafuse.nf_linear_backward";
  TORCH_CHECK_VALUE(grad_out.dim() >= 1, op, ": grad_out: expected [..., out_features]");
  const int64_t out_features = grad_out.size(-1);
  detail::check_nf_linear_args(op, grad_out, out_features, packed, absmax, nested_absmax, offset,
                               detail::parse_nf_format(op, format), out_features, in_features, std::nullopt);
  auto shape = grad_out.sym_sizes().vec();
  shape.back() = in_features;
  return at::empty_symint(shape, grad_out.options());
}

}  // namespace
}  // namespace lorafuse::meta

TORCH_LIBRARY_IMPL(lorafuse, Meta, m) {
  m.impl("quantize_nf", &lorafuse::meta::quantize_nf_meta);
  m.impl("dequantize_nf", &lorafuse::meta::dequantize_nf_meta);
  m.impl("nf_linear", &lorafuse::meta::nf_linear_meta);
  m.impl("nf_linear_backward", &lorafuse::meta::nf_linear_backward_meta);
}
