// Meta kernels: shapes, dtypes and errors only. They read sizes as SymInts, so the meta device, fake
// tensors and torch.compile (dynamic shapes included) all use them.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "csrc/ops/common/lora_linear_checks.h"

namespace lorafuse::meta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_forward_meta(const at::Tensor& x, const at::Tensor& weight,
                                                                        const std::optional<at::Tensor>& bias,
                                                                        const at::Tensor& lora_a,
                                                                        const at::Tensor& lora_b, double scale,
                                                                        double dropout_p) {
  detail::check_lora_linear_args("lorafuse.lora_linear", x, weight, bias, lora_a, lora_b, scale, dropout_p);
  auto out_shape = x.sym_sizes().vec();
  out_shape.back() = weight.sym_size(0);
  at::Tensor y = at::empty_symint(out_shape, x.options());
  at::Tensor u = at::empty_symint({detail::leading_sym_numel(x), lora_a.sym_size(0)},
                                  x.options().dtype(detail::lora_acc_dtype(x, lora_a)));
  at::Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));
  return {y, u, rng_state};
}

at::Tensor lora_linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  return std::get<0>(lora_linear_forward_meta(x, weight, bias, lora_a, lora_b, scale, dropout_p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale,
    double dropout_p, std::array<bool, 4> output_mask) {
  detail::check_lora_linear_backward_args("lorafuse.lora_linear_backward", grad_out, x, weight, lora_a, lora_b, u,
                                          rng_state, scale, dropout_p);
  auto like_or_empty = [](bool need, const at::Tensor& t, c10::SymIntArrayRef shape) {
    return need ? at::empty_symint(shape, t.options()) : at::empty({0}, t.options());
  };
  return {like_or_empty(output_mask[0], x, x.sym_sizes()),
          like_or_empty(output_mask[1], lora_a, lora_a.sym_sizes()),
          like_or_empty(output_mask[2], lora_b, lora_b.sym_sizes()),
          like_or_empty(output_mask[3], x, lora_b.sym_sizes().slice(0, 1))};
}

}  // namespace
}  // namespace lorafuse::meta

TORCH_LIBRARY_IMPL(lorafuse, Meta, m) {
  m.impl("lora_linear", &lorafuse::meta::lora_linear_meta);
  m.impl("lora_linear_forward", &lorafuse::meta::lora_linear_forward_meta);
  m.impl("lora_linear_backward", &lorafuse::meta::lora_linear_backward_meta);
}
