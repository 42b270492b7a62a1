// Meta kernels of lora_multi_add and lora_token_add: shapes, dtypes and errors only (the segment values are not read).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "csrc/ops/common/lora_multi_checks.h"

namespace lorafuse::meta {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_multi_add_forward_meta(const at::Tensor& base_out, const at::Tensor& x,
                                                               at::TensorList lora_a, at::TensorList lora_b,
                                                               at::ArrayRef<double> scale, const at::Tensor& order,
                                                               const at::Tensor& offsets, double dropout_p) {
  detail::check_lora_multi_add_args("lorafuse.lora_multi_add", base_out, x, lora_a, lora_b, scale, order, offsets,
                                    dropout_p, /*values=*/false);
  return {at::empty_like(base_out, at::MemoryFormat::Contiguous), at::empty({2}, x.options().dtype(at::kLong))};
}

at::Tensor lora_multi_add_meta(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& order,
                               const at::Tensor& offsets, double dropout_p) {
  return std::get<0>(lora_multi_add_forward_meta(base_out, x, lora_a, lora_b, scale, order, offsets, dropout_p));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_add_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
    at::ArrayRef<double> scale, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& rng_state,
    double dropout_p, std::array<bool, 3> output_mask) {
  detail::check_lora_multi_add_args("lorafuse.lora_multi_add_backward", grad_out, x, lora_a, lora_b, scale, order,
                                    offsets, dropout_p, /*values=*/false);
  std::vector<at::Tensor> ga, gb;
  for (size_t i = 0; i < lora_a.size(); ++i) {
    ga.push_back(output_mask[1] ? at::empty_like(lora_a[i]) : at::empty({0}, lora_a[i].options()));
    gb.push_back(output_mask[2] ? at::empty_like(lora_b[i]) : at::empty({0}, lora_b[i].options()));
  }
  return {output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options()), ga, gb};
}

at::Tensor lora_token_add_meta(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& row_adapter) {
  detail::check_lora_token_add_args("lorafuse.lora_token_add", base_out, x, lora_a, lora_b, scale, row_adapter,
                                    /*values=*/false);
  return at::empty_like(base_out, at::MemoryFormat::Contiguous);
}

}  // namespace
}  // namespace lorafuse::meta

TORCH_LIBRARY_IMPL(lorafuse, Meta, m) {
  m.impl("lora_multi_add", &lorafuse::meta::lora_multi_add_meta);
  m.impl("lora_multi_add_forward", &lorafuse::meta::lora_multi_add_forward_meta);
  m.impl("lora_multi_add_backward", &lorafuse::meta::lora_multi_add_backward_meta);
  m.impl("lora_token_add", &lorafuse::meta::lora_token_add_meta);
}
