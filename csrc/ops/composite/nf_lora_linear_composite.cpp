// nf_lora_linear on every device without a kernel of its own (CompositeExplicitAutograd: CUDA and Meta): nf_linear
// and lora_add_forward, and their backwards summed — the CPU kernel (nf_cpu.cpp) fuses the same arithmetic.
// lora_linear_nf: the rule that picks nf_lora_linear or the quantized layer + lora_branch (CompositeImplicitAutograd;
// under autocast always the latter).
#include <torch/library.h>

#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/lora_linear.h>
#include <lorafuse/ops/nf.h>
#include <lorafuse/ops/nf4.h>

#include "csrc/ops/common/nf_checks.h"

namespace lorafuse::composite {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf_lora_linear_forward_composite(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, at::IntArrayRef format,
    int64_t out_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
    double scale, double dropout_p) {
  constexpr const char* op = "lorafuse.nf_lora_linear";
  detail::check_nf_lora_linear_args(op, x, packed, absmax, nested_absmax, offset, detail::parse_nf_format(op, format),
                                    out_features, bias, lora_a, lora_b, scale, dropout_p);
  const at::Tensor base = lorafuse::nf_linear(x, packed, absmax, nested_absmax, offset, format, out_features, bias);
  return lorafuse::lora_add_forward(base, x, lora_a, lora_b, scale, dropout_p);
}

at::Tensor nf_lora_linear_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& offset, at::IntArrayRef format,
                                    int64_t out_features, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                    double dropout_p) {
  return std::get<0>(nf_lora_linear_forward_composite(x, packed, absmax, nested_absmax, offset, format, out_features,
                                                      bias, lora_a, lora_b, scale, dropout_p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf_lora_linear_backward_composite(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, at::IntArrayRef format,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale,
    double dropout_p, std::array<bool, 4> output_mask) {
  constexpr const char* op = "lorafuse.nf_lora_linear_backward";
  detail::check_nf_lora_linear_backward_args(op, grad_out, x, packed, absmax, nested_absmax, offset,
                                             detail::parse_nf_format(op, format), lora_a, lora_b, u, rng_state, scale,
                                             dropout_p);
  auto [gx, ga, gb, gbias] =
      lorafuse::lora_linear_backward(grad_out, x, std::nullopt, lora_a, lora_b, u, rng_state, scale, dropout_p,
                                     {output_mask[0], output_mask[1], output_mask[2], false});
  if (output_mask[0]) {
    gx = gx.add(lorafuse::nf_linear_backward(grad_out, packed, absmax, nested_absmax, offset, format, x.size(-1)));
  }
  if (output_mask[3]) gbias = grad_out.reshape({-1, lora_b.size(0)}).sum(0);
  return {gx, ga, gb, gbias};
}

// The two-op route: the quantized layer (x cast to compute_dtype), then the branch (x cast to the adapters' dtype
// unless it is x's or float32). Also the whole layer under autocast (registered below): the base computes in its
// compute dtype whatever autocast says, as bitsandbytes' layer does, and only the branch follows it, through
// lora_add's autocast kernel (the one op, nf_lora_linear, shares x between the two).
at::Tensor lora_linear_nf_two_ops(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& offset, at::IntArrayRef format, int64_t out_features,
                                  const std::optional<at::Tensor>& bias, at::ScalarType compute_dtype,
                                  const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  const at::Tensor base =
      lorafuse::linear_nf(x, packed, absmax, nested_absmax, offset, format, out_features, bias, compute_dtype);
  return lorafuse::lora_branch(base, x, lora_a, lora_b, scale, dropout_p);
}

at::Tensor lora_linear_nf_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& offset, at::IntArrayRef format,
                                    int64_t out_features, const std::optional<at::Tensor>& bias,
                                    at::ScalarType compute_dtype, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                    double scale, double dropout_p) {
  const auto adapter = lora_a.scalar_type();
  if (x.scalar_type() == compute_dtype && (adapter == compute_dtype || adapter == at::kFloat)) {
    std::optional<at::Tensor> b;  // linear_nf's rule: the bias in the compute dtype
    if (bias.has_value() && bias->defined()) b = bias->to(compute_dtype);
    return lorafuse::nf_lora_linear(x, packed, absmax, nested_absmax, offset, format, out_features, b, lora_a, lora_b,
                                    scale, dropout_p);
  }
  // x cast to compute_dtype for the base, to the adapters' dtype for the branch: two inputs, the ops apart
  return lora_linear_nf_two_ops(x, packed, absmax, nested_absmax, offset, format, out_features, bias, compute_dtype,
                                lora_a, lora_b, scale, dropout_p);
}

}  // namespace
}  // namespace lorafuse::composite

TORCH_LIBRARY_IMPL(lorafuse, CompositeExplicitAutograd, m) {
  m.impl("nf_lora_linear", &lorafuse::composite::nf_lora_linear_composite);
  m.impl("nf_lora_linear_forward", &lorafuse::composite::nf_lora_linear_forward_composite);
  m.impl("nf_lora_linear_backward", &lorafuse::composite::nf_lora_linear_backward_composite);
}

TORCH_LIBRARY_IMPL(lorafuse, CompositeImplicitAutograd, m) {
  m.impl("lora_linear_nf", &lorafuse::composite::lora_linear_nf_composite);
}

TORCH_LIBRARY_IMPL(lorafuse, AutocastCPU, m) { m.impl("lora_linear_nf", &lorafuse::composite::lora_linear_nf_two_ops); }

TORCH_LIBRARY_IMPL(lorafuse, AutocastCUDA, m) {
  m.impl("lora_linear_nf", &lorafuse::composite::lora_linear_nf_two_ops);
}
