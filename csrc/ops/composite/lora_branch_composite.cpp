// lora_branch: the adapter-dtype rule of a LoRA branch over a base called as it is, once for the C++ LoRA layers
// and Python's (CompositeImplicitAutograd: it decomposes into a cast and lora_add).
#include <torch/library.h>

#include <lorafuse/ops/lora_add.h>

namespace lorafuse::composite {
namespace {

at::Tensor lora_branch_composite(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, double scale, double dropout_p) {
  const auto dtype = lora_a.scalar_type();
  const bool keep = dtype == x.scalar_type() || dtype == at::kFloat;  // lora_add accumulates in float32 either way
  return lorafuse::lora_add(base_out, keep ? x : x.to(dtype), lora_a, lora_b, scale, dropout_p);
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeImplicitAutograd, m) {
  m.impl("lora_branch", &lorafuse::composite::lora_branch_composite);
}
