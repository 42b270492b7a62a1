// linear_nf: the compute-dtype rule of a quantized layer around nf_linear, once for the C++ Linear4bit, Python's
// lorafuse.nn.Linear4bit and bitsandbytes' layers (CompositeImplicitAutograd: it decomposes into nf_linear).
#include <torch/library.h>

#include <lorafuse/ops/nf.h>

namespace lorafuse::composite {
namespace {

at::Tensor linear_nf_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                               at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias,
                               at::ScalarType compute_dtype) {
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->to(compute_dtype);
  return lorafuse::nf_linear(x.to(compute_dtype), packed, absmax, nested_absmax, offset, format, out_features, b)
      .to(x.scalar_type());
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeImplicitAutograd, m) {
  m.impl("linear_nf", &lorafuse::composite::linear_nf_composite);
}
