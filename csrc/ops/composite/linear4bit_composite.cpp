// linear4bit: the compute-dtype rule of a 4-bit layer around nf4_linear, once for the C++ Linear4bit, Python's
// lorafuse.nn.Linear4bit and bitsandbytes' layers (CompositeImplicitAutograd: it decomposes into nf4_linear).
#include <torch/library.h>

#include <lorafuse/ops/nf4.h>

namespace lorafuse::composite {
namespace {

at::Tensor linear4bit_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                                int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                                at::ScalarType compute_dtype) {
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->to(compute_dtype);
  return lorafuse::nf4_linear(x.to(compute_dtype), packed, absmax, nested_absmax, offset, blocksize, out_features, b)
      .to(x.scalar_type());
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeImplicitAutograd, m) {
  m.impl("linear4bit", &lorafuse::composite::linear4bit_composite);
}
