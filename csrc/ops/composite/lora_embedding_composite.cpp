// lora_embedding (<lorafuse/ops/lora_embedding.h>): ATen's embedding and a matmul (CompositeImplicitAutograd), so
// autograd, the Meta device and torch.compile follow them.
#include <ATen/TensorOperators.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/matmul.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

namespace lorafuse::composite {
namespace {

at::Tensor lora_embedding(const at::Tensor& base_out, const at::Tensor& indices, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, double scale, int64_t padding_idx, bool scale_grad_by_freq,
                          bool sparse) {
  constexpr const char* op = "lorafuse.lora_embedding";
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_b.dim() == 2 && lora_b.size(1) == lora_a.size(0), op,
                    ": lora_a must be [r, num_embeddings] and lora_b [embedding_dim, r]; found ", lora_a.sizes(),
                    " and ", lora_b.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(indices.scalar_type(), /*includeBool=*/false), op,
                   ": indices must be an integer tensor; found ", indices.scalar_type());
  TORCH_CHECK_VALUE(base_out.dim() == indices.dim() + 1 && base_out.size(-1) == lora_b.size(0), op,
                    ": base_out must be the embedding's output [..., ", lora_b.size(0), "] for indices ",
                    indices.sizes(), "; found ", base_out.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite; found ", scale);
  const at::Tensor rows = at::embedding(lora_a.t(), indices, padding_idx, scale_grad_by_freq, sparse);  // [..., r]
  const at::Tensor branch = at::matmul(rows, lora_b.t()) * scale;                                       // [..., dim]
  const auto wide = at::promote_types(base_out.scalar_type(), branch.scalar_type());
  return (base_out.to(wide) + branch.to(wide)).to(base_out.scalar_type());
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeImplicitAutograd, m) {
  m.impl("lora_embedding", &lorafuse::composite::lora_embedding);
}
