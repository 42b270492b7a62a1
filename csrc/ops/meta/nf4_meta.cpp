// Meta kernels of the NF4 ops: shapes, dtypes and argument errors (the values are not looked at, so a meta
// weight's finiteness is not checked).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "csrc/ops/common/nf4_checks.h"
#include "cuda/shared/nf4.h"

namespace lorafuse::meta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4_meta(const at::Tensor& weight,
                                                                              int64_t blocksize, bool double_quant) {
  detail::check_quantize_nf4_args(weight, blocksize);
  const c10::SymInt n = weight.sym_numel();
  const c10::SymInt blocks = (n + blocksize - 1) / blocksize;
  const auto f32 = weight.options().dtype(at::kFloat);
  at::Tensor packed = at::empty_symint({(n + 1) / 2, 1}, f32.dtype(at::kByte));
  if (!double_quant) return {packed, at::empty_symint({blocks}, f32), at::empty({0}, f32), at::empty({0}, f32)};
  const c10::SymInt nested = (blocks + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize;
  return {packed, at::empty_symint({blocks}, f32.dtype(at::kByte)), at::empty_symint({nested}, f32),
          at::empty({}, f32)};
}

at::Tensor dequantize_nf4_meta(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                               at::ScalarType dtype) {
  detail::check_dequantize_nf4_args("lorafuse.dequantize_nf4", packed, absmax, nested_absmax, offset,
                                    blocksize, shape, dtype);
  return at::empty(shape, packed.options().dtype(dtype));
}

at::Tensor nf4_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                           int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "lorafuse.nf4_linear: x: expected [..., in_features], found a 0-d tensor");
  const int64_t in_features = x.size(-1);
  detail::check_nf4_linear_args("lorafuse.nf4_linear", x, in_features, packed, absmax, nested_absmax, offset,
                                blocksize, out_features, in_features, bias);
  auto shape = x.sym_sizes().vec();
  shape.back() = out_features;
  return at::empty_symint(shape, x.options());
}

at::Tensor nf4_linear_backward_meta(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t in_features) {
  TORCH_CHECK_VALUE(grad_out.dim() >= 1, "lorafuse.nf4_linear_backward: grad_out: expected [..., out_features]");
  const int64_t out_features = grad_out.size(-1);
  detail::check_nf4_linear_args("lorafuse.nf4_linear_backward", grad_out, out_features, packed, absmax, nested_absmax,
                                offset, blocksize, out_features, in_features, std::nullopt);
  auto shape = grad_out.sym_sizes().vec();
  shape.back() = in_features;
  return at::empty_symint(shape, grad_out.options());
}

}  // namespace
}  // namespace lorafuse::meta

TORCH_LIBRARY_IMPL(lorafuse, Meta, m) {
  m.impl("quantize_nf4", &lorafuse::meta::quantize_nf4_meta);
  m.impl("dequantize_nf4", &lorafuse::meta::dequantize_nf4_meta);
  m.impl("nf4_linear", &lorafuse::meta::nf4_linear_meta);
  m.impl("nf4_linear_backward", &lorafuse::meta::nf4_linear_backward_meta);
}
