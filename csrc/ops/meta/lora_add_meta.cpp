// Meta kernels of lora_add: shapes, dtypes and errors only (SymInts, for torch.compile).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "csrc/ops/common/lora_linear_checks.h"

namespace lorafuse::meta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_add_forward_meta(const at::Tensor& base_out, const at::Tensor& x,
                                                                     const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                     double scale, double dropout_p) {
  detail::check_lora_add_args("lorafuse.lora_add", base_out, x, lora_a, lora_b, scale, dropout_p);
  at::Tensor y = at::empty_symint(base_out.sym_sizes(), base_out.options());
  at::Tensor u = at::empty_symint({detail::leading_sym_numel(x), lora_a.sym_size(0)},
                                  x.options().dtype(detail::lora_acc_dtype(x, lora_a)));
  at::Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));
  return {y, u, rng_state};
}

at::Tensor lora_add_meta(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, double scale, double dropout_p) {
  return std::get<0>(lora_add_forward_meta(base_out, x, lora_a, lora_b, scale, dropout_p));
}

}  // namespace
}  // namespace lorafuse::meta

TORCH_LIBRARY_IMPL(lorafuse, Meta, m) {
  m.impl("lora_add", &lorafuse::meta::lora_add_meta);
  m.impl("lora_add_forward", &lorafuse::meta::lora_add_forward_meta);
}
