// lora_adapted_weight (<lorafuse/ops/adapted_weight.h>): a matmul and an add (CompositeImplicitAutograd), so autograd,
// the Meta device and torch.compile follow them.
#include <ATen/TensorOperators.h>
#include <ATen/ops/matmul.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

namespace lorafuse::composite {
namespace {

at::Tensor lora_adapted_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               double scale) {
  constexpr const char* op = "lorafuse.lora_adapted_weight";
  TORCH_CHECK_VALUE(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2, op,
                    ": weight [out, in], lora_a [r, in] and lora_b [out, r] must be matrices; found ", weight.sizes(),
                    ", ", lora_a.sizes(), " and ", lora_b.sizes());
  TORCH_CHECK_VALUE(
      lora_a.size(1) == weight.size(1) && lora_b.size(0) == weight.size(0) && lora_b.size(1) == lora_a.size(0), op,
      ": for weight ", weight.sizes(), " expected lora_a [r, ", weight.size(1), "] and lora_b [", weight.size(0),
      ", r]; found ", lora_a.sizes(), " and ", lora_b.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), op, ": weight must be floating point; found ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite; found ", scale);
  return weight + (at::matmul(lora_b, lora_a) * scale).to(weight.scalar_type());
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeImplicitAutograd, m) {
  m.impl("lora_adapted_weight", &lorafuse::composite::lora_adapted_weight);
}
